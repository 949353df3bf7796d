"""Compute, memory, time and cost planner for a training config, without running it.

`estimate(config, hardware="h100", chips=8, mfu=0.45)` answers the questions asked before
renting accelerators: how many parameters (counted exactly from the model definition with
`jax.eval_shape`), how many FLOPs, how much memory per device under the configured mesh,
sharding preset, remat policy and micro-batch (and whether it fits), how long and how much, and
how far the token budget is from Chinchilla's ~20 tokens per parameter.
A step that does not fit gets `Estimate.remedies`: config changes with the totals the planner
predicts for them, as overrides a tool can apply (`jaxlm.aot` proposes the cheapest that fits).
`estimate_table.format_table(est)` renders it in 80 columns; `tools/estimate.py` is the CLI;
`estimate_xla.xla_memory` compiles the real train step and reads XLA's own per-device numbers,
to check the model against. A mixture of experts adds `estimate_moe`'s terms: active
parameters, expert weights split over the expert axis, dispatch buffers.

Memory model, per device:
- parameters fp32, split leaf by leaf exactly as `sharding.py` splits them; gradients the same
  (twice with gradient accumulation: the running sum and the micro-batch's); optimizer state from
  `tx.init` traced abstractly, so it follows whatever `optim.py` builds.
- activations: what each layer keeps for the backward pass, plus the costliest transient (one
  layer's backward, after its recomputed forward under remat, or the logits and their gradient).
  For remat="none" the per-layer counts are XLA's, read from its buffer assignment for this model
  (it keeps bf16 attention probabilities but re-derives fp32 ones inside the backward fusion),
  and every layer's weights stay as multiplied (bf16 casts, FSDP-gathered copies). For "full"
  and "dots" they are exactly what JAX saves under the policy: the block input; the projection
  outputs. XLA:CPU hoists recomputation, so only "none" is compared with its totals (tests).
Gradients and activations are summed as if both peaked together, erring high by at most the
smaller of the two. The counts are XLA:CPU's; GPU and TPU compilers fuse at least as hard, so
read activations there as an upper estimate (unmeasured: check with `--measure` on the chip).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm import estimate_moe, hardware, optim, sharding, stages
from jaxlm import model as model_lib
from jaxlm import spec as run_spec
from jaxlm.errors import ConfigError

GiB = hardware.GiB
CHINCHILLA_TOKENS_PER_PARAM = 20.0
USABLE_FRACTION = 0.9  # of HBM: headroom for XLA workspace, fragmentation and the runtime
WIDTH = 80  # columns of the table


# The chip table lives in jaxlm/hardware.py (shared with the trainer's MFU and tools/compile.py).
Hardware = hardware.Chip
HARDWARE = hardware.CHIPS
get_hardware = hardware.get_chip


# --------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts by kind, from the model definition."""

    embedding: int  # input embedding, plus the output head when untied
    head: int  # the untied output head (0 when tied: the embedding doubles as the head)
    attention: int
    mlp: int
    norms: int
    inactive: int = 0  # MoE: routed-expert weights a token is not multiplied by (in `mlp`)

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norms

    @property
    def active(self) -> int:
        """Parameters one token's forward pass uses: all but the experts it was not sent to."""
        return self.total - self.inactive

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def _shapes_only(model_cfg: model_lib.ModelConfig) -> model_lib.ModelConfig:
    # Numerics do not change shapes: one trace serves every remat/dtype/attention variant.
    return dataclasses.replace(model_cfg, remat="none", dtype="float32", attention="xla")


def _abstract_params(model_cfg: model_lib.ModelConfig) -> tuple[dict, dict]:
    """(pure dict of ShapeDtypeStructs, matching dict of logical axes); allocates nothing."""
    return _abstract_params_of(_shapes_only(model_cfg))


@functools.lru_cache(maxsize=8)
def _abstract_params_of(model_cfg: model_lib.ModelConfig) -> tuple[dict, dict]:
    _, state = nnx.split(model_lib.abstract(model_cfg))
    return nnx.to_pure_dict(state), model_lib.logical_axes(state)


@functools.lru_cache(maxsize=8)
def _abstract_opt_state(tx: optax.GradientTransformation, model_cfg: model_lib.ModelConfig):
    return jax.eval_shape(tx.init, _abstract_params_of(model_cfg)[0])


def param_counts(model_cfg: model_lib.ModelConfig) -> ParamCounts:
    """Counts every parameter of the model `model_cfg` describes, by kind."""
    params, _ = _abstract_params(model_cfg)
    kinds = dict.fromkeys(("embedding", "head", "attention", "mlp", "norms"), 0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        n = math.prod(leaf.shape)
        if any("norm" in k for k in keys):
            kinds["norms"] += n
        elif keys[0] in ("embed", "lm_head"):
            kinds["embedding"] += n
            kinds["head"] += n if keys[0] == "lm_head" else 0
        elif "attn" in keys or "mlp" in keys:
            kinds["attention" if "attn" in keys else "mlp"] += n
        else:
            raise ValueError(f"parameter {'/'.join(keys)} has no kind; teach param_counts it.")
    return ParamCounts(**kinds, inactive=estimate_moe.inactive_params(model_cfg))


def training_flops_6nd(n_params: float, tokens: float) -> float:
    """The classic 6ND estimate of training compute (2N forward + 4N backward per token)."""
    return 6.0 * n_params * tokens


# --------------------------------------------------------------------------- memory


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a step is laid out on the devices: the knobs the suggestions turn."""

    preset: str  # dp | fsdp | fsdp_tp
    mesh_shape: dict[str, int]  # resolved (data, fsdp, tensor) sizes
    batch_size: int  # global sequences per optimizer step
    grad_accum: int
    seq_len: int

    @property
    def batch_shards(self) -> int:
        return self.mesh_shape["data"] * self.mesh_shape["fsdp"]

    @property
    def micro_batch(self) -> int:
        """Sequences per device per micro-batch (rounded up when the split is uneven)."""
        return max(math.ceil(self.batch_size / (self.grad_accum * self.batch_shards)), 1)


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device during one train step."""

    params: float
    grads: float
    opt_state: float
    activations: float  # the parts below, plus the batch and the final norm
    saved_per_layer: float  # what one layer keeps for its backward pass
    weights_kept: float  # weights as multiplied, kept for the backward (remat="none")
    working: float  # costliest transient: one layer's backward, or the logits
    working_kind: str  # "layer backward" | "logits"
    attention_scores: float  # L x L tensors in a layer's backward (0 with cudnn)
    dispatch: float  # MoE: one sparse layer's dispatch buffers, in `working` (estimate_moe)
    expert_params: float  # MoE: the routed experts' share of `params`
    micro_batch: int  # sequences per device per micro-batch
    budget: float  # usable HBM per chip

    @property
    def total(self) -> float:
        return self.params + self.grads + self.opt_state + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


def state_bytes(
    model_cfg: model_lib.ModelConfig, tx: optax.GradientTransformation, layout: Layout
) -> tuple[float, float]:
    """(parameter bytes, optimizer-state bytes) per device under the layout's preset."""
    params, axes = _abstract_params(model_cfg)
    rules = sharding.rules_for(layout.preset)

    def local_fraction(logical: tuple, p: jax.ShapeDtypeStruct) -> float:
        local = 1  # uneven splits round up, as padding would
        for dim, mesh_axes in zip(p.shape, sharding.logical_to_spec(logical, rules), strict=True):
            names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
            local *= math.ceil(dim / math.prod(layout.mesh_shape[a] for a in names))
        return local / max(math.prod(p.shape), 1)

    frac = jax.tree.map(local_fraction, axes, params, is_leaf=lambda x: isinstance(x, tuple))
    nbytes = lambda x: math.prod(x.shape) * jnp.dtype(x.dtype).itemsize  # noqa: E731
    param_bytes = sum(jax.tree.leaves(jax.tree.map(lambda p, f: nbytes(p) * f, params, frac)))
    # Moments are split like their parameter (as train.Setup does); counters are replicated.
    opt_state = _abstract_opt_state(tx, _shapes_only(model_cfg))
    opt = optim.map_param_leaves(
        opt_state, params, frac, per_param=lambda s, f: nbytes(s) * f, other=nbytes
    )
    return float(param_bytes), float(sum(jax.tree.leaves(opt)))


# What one layer keeps for its backward pass with remat="none": bytes per token per unit of each
# width (D, F, H*E, K*E, and H*S for attention probabilities), by compute-dtype bytes. Read from
# XLA's buffer assignment: fp32 keeps 11 D-, 6 F-, 2 H*E- and 2 K*E-sized tensors; bf16 keeps
# fewer D-sized ones (in fp32), but also fp32 probabilities and their bf16 copy.
_SAVED_NONE = {
    4: {"D": 11 * 4, "F": 6 * 4, "HE": 2 * 4, "KE": 2 * 4, "HS": 0},
    2: {"D": 4 * 4, "F": 4 * 2 + 4, "HE": 2 * 2, "KE": 4 + 2, "HS": 4 + 2},
}


def memory(
    m: model_lib.ModelConfig, tx: optax.GradientTransformation, layout: Layout, budget: float
) -> Memory:
    """Per-device memory of one train step of `m` (attention resolved: xla | cudnn | splash)."""
    tensor = layout.mesh_shape["tensor"] if layout.preset == "fsdp_tp" else 1
    params, opt = state_bytes(m, tx, layout)
    a = jnp.dtype(m.dtype).itemsize
    tokens = layout.micro_batch * layout.seq_len
    heads, kv_heads = m.n_heads / tensor, max(m.n_kv_heads / tensor, 1)
    w = {"D": m.d_model, "F": m.d_ff / tensor, "HE": heads * m.head_dim}
    w |= {"KE": kv_heads * m.head_dim, "HS": heads * layout.seq_len if m.attention == "xla" else 0}
    none_layer = tokens * sum(w[k] * c for k, c in _SAVED_NONE[4 if a == 4 else 2].items())
    if m.remat == "none":
        saved = none_layer
    elif m.remat == "full":  # the block input only
        saved = tokens * m.d_model * a
    else:  # dots: q, k, v, gate, up, and the two D-sized projection outputs
        saved = tokens * a * (2 * w["D"] + 2 * w["F"] + w["HE"] + 2 * w["KE"])
    scores = 2 * tokens * w["HS"] * 4  # one layer's fp32 scores and probabilities
    layer_backward = scores + tokens * 4 * (2 * w["D"] + 2 * w["F"])
    if m.remat != "none":
        layer_backward += none_layer  # the layer's forward is recomputed first
    dispatch = estimate_moe.dispatch_bytes(m, layout)
    layer_backward += dispatch
    logits = tokens * m.vocab_size / tensor * (4 + 4 + a)  # logits, fp32 copy, fp32 gradient
    weights = 0.0
    sharded = layout.preset != "dp" and layout.mesh_shape["fsdp"] * tensor > 1
    if m.remat == "none" and (a != 4 or sharded):  # bf16 casts or gathered copies, all layers
        attention = 2 * m.d_model * (m.n_heads + m.n_kv_heads) * m.head_dim
        mlp = (m.n_layers - estimate_moe.sparse_layers(m)) * 3 * m.d_model * m.d_ff
        weights = (m.n_layers * attention + mlp + m.vocab_size * m.d_model) * a / tensor
        weights += estimate_moe.kept_expert_bytes(m, layout, a)
    working = max(logits, layer_backward)
    batch = tokens * layout.grad_accum * 5 * 4  # four int32 fields and the fp32 loss mask
    final_norm = 2 * tokens * m.d_model * 4
    return Memory(
        params=params,
        grads=params * (2 if layout.grad_accum > 1 else 1),
        opt_state=opt,
        activations=m.n_layers * saved + weights + working + final_norm + batch,
        saved_per_layer=saved,
        weights_kept=weights,
        working=working,
        working_kind="logits" if logits > layer_backward else "layer backward",
        attention_scores=0.0 if logits > layer_backward else scores,
        dispatch=dispatch,
        expert_params=estimate_moe.expert_param_bytes(m, layout),
        micro_batch=layout.micro_batch,
        budget=budget,
    )


# --------------------------------------------------------------------------- the estimate


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Everything `format_table` prints; every number is here for notebooks too."""

    name: str
    model: model_lib.ModelConfig  # attention resolved for the hardware
    params: ParamCounts
    hardware: Hardware
    chips: int
    layout: Layout
    tokens: float  # training tokens
    flops_per_token: float  # model FLOPs (matmul weights + attention): what MFU divides by
    attention_flops_per_token: float
    memory: Memory
    mfu: float
    price_per_chip_hour: float | None
    remedies: tuple[Remedy, ...] = ()  # what the planner tried when the step does not fit
    chips_to_fit: int | None = None  # when no remedy fits: chips at which fsdp, remat=full fit
    suggestions: tuple[str, ...] = ()  # the table's lines: the remedies, or "none needed"
    stage: int | None = None  # the stage whose program this is (a run of several stages)

    @property
    def train_flops(self) -> float:
        """Model FLOPs of the whole run (per-token model FLOPs x tokens)."""
        return self.flops_per_token * self.tokens

    @property
    def train_flops_6nd(self) -> float:
        return training_flops_6nd(self.params.active, self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.chips * self.hardware.peak_flops * self.mfu / self.flops_per_token

    @property
    def seconds(self) -> float:
        return self.tokens / self.tokens_per_second

    @property
    def chip_hours(self) -> float:
        return self.chips * self.seconds / 3600

    @property
    def cost(self) -> float | None:
        price = self.price_per_chip_hour
        return None if price is None else self.chip_hours * price

    @property
    def chinchilla_tokens(self) -> float:
        """Compute-optimal tokens for this model size (~20 per parameter)."""
        return CHINCHILLA_TOKENS_PER_PARAM * self.params.total

    @property
    def chinchilla_params(self) -> float:
        """Compute-optimal model size for this run's 6ND budget (C = 6 N x 20 N)."""
        return math.sqrt(self.train_flops_6nd / (6 * CHINCHILLA_TOKENS_PER_PARAM))


def _check(chips: Any, mfu: Any, price: Any, tokens: Any, hw: Hardware) -> None:
    if isinstance(chips, bool) or not isinstance(chips, int) or chips <= 0:
        raise ConfigError(f"chips must be a positive whole number, not {chips!r}.")
    if isinstance(mfu, bool) or not isinstance(mfu, (int, float)) or not 0 < mfu <= 1:
        raise ConfigError(f"mfu must be a fraction in (0, 1], such as 0.45, not {mfu!r}.")
    if price is not None and not price >= 0:
        raise ConfigError(f"the price per chip-hour must not be negative, not {price!r}.")
    if tokens is not None and not tokens > 0:
        raise ConfigError(f"tokens must be a positive count, not {tokens!r}.")
    if not (hw.peak_flops > 0 and hw.memory_bytes > 0):
        raise ConfigError(f"hardware {hw.name!r} needs a positive peak FLOP/s and memory.")


def default_chips(config: Any) -> int:
    """The mesh's size when config.mesh.shape is fixed, else 8 (one host)."""
    shape = tuple(config.mesh.shape)
    return math.prod(shape) if all(s > 0 for s in shape) else 8


def estimate(
    config: Any,
    hardware: str | Hardware = "h100",
    chips: int | None = None,
    mfu: float = 0.4,
    price_per_chip_hour: float | None = None,
    tokens: float | None = None,
    vocab_size: int | None = None,
    stage: stages.Stage | None = None,
    spec: run_spec.RunSpec | None = None,
) -> Estimate:
    """Parameters, FLOPs, memory per device, time, cost and a Chinchilla check for `config`.

    Args:
      config: a recipe's ConfigDict (configs/*.py `get_config()`).
      hardware: a preset name (see HARDWARE) or a `Hardware` with your own numbers.
      chips: accelerator chips in the run; default `default_chips(config)`.
      mfu: model-FLOPs utilisation to assume, a fraction in (0, 1].
      price_per_chip_hour: dollars per chip-hour, for the cost line (None: no cost).
      tokens: training tokens; default every stage's steps x batch x length.
      vocab_size: default config.tokenizer.vocab_size.
      stage: the stage whose step shapes the memory and FLOPs describe; default the estimate
        of the distinct program (`Plan.programs`) that needs the most memory.
      spec: the config's `jaxlm.spec.RunSpec` if the caller has it (else built here).
    Raises:
      ConfigError: unknown hardware, MFU outside (0, 1], chips <= 0, a mesh that cannot be built.
    """
    hw = hardware if isinstance(hardware, Hardware) else get_hardware(hardware)
    chips = default_chips(config) if chips is None else chips
    _check(chips, mfu, price_per_chip_hour, tokens, hw)
    spec = spec or run_spec.build(config)
    vocab = int(vocab_size or config.tokenizer.vocab_size)
    if stage is None:  # the program that needs the most memory decides whether the run fits
        per_program = [
            estimate(config, hw, chips, mfu, price_per_chip_hour, tokens, vocab, stage=s, spec=spec)
            for s in spec.plan.programs
        ]
        return max(per_program, key=lambda e: e.memory.total)
    # `auto` attention becomes what the trainer picks on that hardware's platform.
    m = spec.model_for(vocab, hw.platform)
    shape = sharding.resolve_mesh_shape(config.mesh.shape, chips)
    tx = spec.optimizer()
    layout = Layout(
        config.mesh.preset,
        dict(zip(sharding.MESH_AXES, shape, strict=True)),
        stage.batch_size,
        stage.grad_accum,
        stage.seq_len,
    )
    counts = param_counts(m)
    per_token = m.flops_per_token(stage.seq_len)
    planned = spec.plan.tokens_before(spec.plan.total_steps)
    est = Estimate(
        name=config.get("name", "config"),
        model=m,
        params=counts,
        hardware=hw,
        chips=chips,
        layout=layout,
        tokens=float(tokens if tokens is not None else planned),
        flops_per_token=per_token,
        attention_flops_per_token=float(m.attention_flops_per_token(stage.seq_len)),
        memory=memory(m, tx, layout, hw.memory_bytes * USABLE_FRACTION),
        mfu=float(mfu),
        price_per_chip_hour=price_per_chip_hour,
        stage=stage.index if len(spec.plan.stages) > 1 else None,
    )
    est = dataclasses.replace(est, remedies=remedies(est, tx))
    if est.remedies and not any(r.fits for r in est.remedies):
        full = dataclasses.replace(est.model, remat="full")
        est = dataclasses.replace(est, chips_to_fit=_chips_to_fit(est, tx, full))
    return dataclasses.replace(est, suggestions=tuple(suggest(est)))


# --------------------------------------------------------------------------- suggestions


@dataclasses.dataclass(frozen=True)
class Remedy:
    """A config change the planner tried on a step that does not fit, with its new total."""

    label: str  # what the suggestions list prints, e.g. "train.grad_accum=8 (micro-batch 8)"
    overrides: dict[str, Any]  # config keys and values, e.g. {"train.grad_accum": 8}
    total: float  # the planner's bytes per device with the change
    fits: bool

    @property
    def flags(self) -> str:
        """The change as command-line overrides: --config.train.grad_accum=8."""
        show = lambda v: f"({','.join(map(str, v))})" if isinstance(v, tuple) else str(v)  # noqa: E731
        return " ".join(f"--config.{k}={show(v)}" for k, v in self.overrides.items())


def suggest(est: Estimate) -> list[str]:
    """Config changes that would make the step fit (each with its new total), or none needed."""
    mem, lay = est.memory, est.layout
    notes = []
    if lay.batch_size % (lay.grad_accum * lay.batch_shards):
        notes.append(
            f"train.batch_size={lay.batch_size} does not split over {lay.batch_shards} batch "
            f"shards x grad_accum {lay.grad_accum}; the trainer refuses it: use a multiple of "
            f"{lay.batch_shards * lay.grad_accum}."
        )
    if mem.fits:
        return notes + [
            f"none needed: {format_bytes(mem.budget - mem.total)} to spare of the usable "
            f"{format_bytes(mem.budget)} ({USABLE_FRACTION:.0%} of HBM)."
        ]
    lines = [
        f"{r.label:<44} -> {format_bytes(r.total):>9} {'fits' if r.fits else 'too big'}"
        for r in est.remedies
    ]
    if not any(r.fits for r in est.remedies):
        lines.append(
            f"--chips={est.chips_to_fit} fits with remat=full, fsdp and micro-batch 1."
            if est.chips_to_fit
            else "no chip count fits one sequence's activations: shorten train.seq_len."
        )
    return notes + lines


def remedies(est: Estimate, tx: optax.GradientTransformation) -> tuple[Remedy, ...]:
    """The changes the planner tries when the step does not fit, cheapest first (none if it
    fits): each alone, then all at once with micro-batch 1."""
    mem, lay, m = est.memory, est.layout, est.model
    if mem.fits:
        return ()
    fsdp_preset = "fsdp" if lay.preset == "dp" else lay.preset
    fsdp = {
        "preset": fsdp_preset,
        "mesh_shape": dict(lay.mesh_shape, data=1, fsdp=lay.batch_shards),
    }
    fsdp_keys = {"mesh.preset": fsdp_preset, "mesh.shape": (1, -1, lay.mesh_shape["tensor"])}
    full = dataclasses.replace(m, remat="full")
    accum = _grad_accum_to_fit(m, tx, lay, mem.budget)
    trials = []  # (label, overrides, model, layout changes)
    if m.remat != "full":
        trials.append(("model.remat=full", {"model.remat": "full"}, full, {}))
    if accum:
        micro = f"micro-batch {lay.batch_size // (accum * lay.batch_shards)}"
        label = f"train.grad_accum={accum} ({micro})"
        trials.append((label, {"train.grad_accum": accum}, m, {"grad_accum": accum}))
    if m.attention == "xla" and est.hardware.platform == "gpu" and mem.attention_scores:
        cudnn = dataclasses.replace(m, attention="cudnn")
        label = "model.attention=cudnn (flash attention)"
        trials.append((label, {"model.attention": "cudnn"}, cudnn, {}))
    if m.dtype == "float32":
        bf16 = dataclasses.replace(m, dtype="bfloat16")
        trials.append(("model.dtype=bfloat16", {"model.dtype": "bfloat16"}, bf16, {}))
    if lay.preset == "dp" or lay.mesh_shape["data"] > 1:
        label = f"mesh.preset={fsdp_preset} mesh.shape=(1,-1,{lay.mesh_shape['tensor']})"
        trials.append((label, fsdp_keys, m, fsdp))
    if mem.micro_batch == 1 and lay.seq_len > 1:  # one sequence is already too much
        half = lay.seq_len // 2
        trials.append((f"train.seq_len={half}", {"train.seq_len": half}, m, {"seq_len": half}))
    if len(trials) > 1:  # everything at once, micro-batch 1
        most = lay.batch_size // lay.batch_shards or 1
        both = dataclasses.replace(full, dtype="bfloat16")
        keys = {"model.remat": "full", "model.dtype": "bfloat16", **fsdp_keys}
        trials.append(
            (
                f"remat=full, bfloat16, fsdp, grad_accum={most}",
                {**keys, "train.grad_accum": most},
                both,
                {**fsdp, "grad_accum": most},
            )
        )
    out = []
    for label, overrides, mc, changes in trials:
        changed = memory(mc, tx, dataclasses.replace(lay, **changes), mem.budget)
        out.append(Remedy(label, overrides, changed.total, changed.fits))
    return tuple(out)


def _grad_accum_to_fit(m, tx, lay: Layout, budget: float) -> int | None:
    """Smallest grad_accum above the current one that fits (else micro-batch 1), or None."""
    candidates = [
        k
        for k in range(lay.grad_accum + 1, lay.batch_size // lay.batch_shards + 1)
        if lay.batch_size % (k * lay.batch_shards) == 0
    ]
    for k in candidates:
        if memory(m, tx, dataclasses.replace(lay, grad_accum=k), budget).fits:
            return k
    return candidates[-1] if candidates else None


def _chips_to_fit(est: Estimate, tx: optax.GradientTransformation, m: model_lib.ModelConfig):
    """Fewest chips (doubling) at which all-FSDP with micro-batch 1 fits, or None."""
    lay, chips = est.layout, est.chips * 2
    while chips <= 65536:
        tensor = lay.mesh_shape["tensor"]
        trial = dataclasses.replace(
            lay,
            preset="fsdp" if lay.preset == "dp" else lay.preset,
            grad_accum=max(lay.batch_size // (chips // tensor), 1),
            mesh_shape={"data": 1, "fsdp": chips // tensor, "tensor": tensor, "context": 1},
        )
        if memory(m, tx, trial, est.memory.budget).fits:
            return chips
        chips *= 2
    return None


# --------------------------------------------------------------------------- units


def _human(n: float, units: tuple[tuple[str, float], ...]) -> str:
    for unit, size in units:
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 1000 else f"{n / size:,.0f} {unit}"
    return f"{n:.0f}"


def format_bytes(n: float) -> str:
    """Bytes in binary units, three significant digits: 14.4 GiB."""
    return _human(n, (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024), ("B", 1)))


def format_count(n: float) -> str:
    """A count with a short scale word, three significant digits: 8.03 B."""
    return _human(n, (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)))
