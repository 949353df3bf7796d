"""Training pieces: the pure train/eval steps, state set-up, held-out evaluation.

The job that drives them (data, loop, checkpoints, preemption, rollback) is `jaxlm/loop.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm import loss as loss_lib
from jaxlm import model as model_lib
from jaxlm import moe as moe_lib
from jaxlm import objectives, optim, sharding, speedrun
from jaxlm import spec as run_spec
from jaxlm import stages as stages_lib
from jaxlm.data import manifest as manifest_lib
from jaxlm.data import pipeline

TrainState = dict[str, Any]  # {'params', 'opt_state', 'step', 'guard'}
# inputs, targets, segment_ids, positions (B, L) int32; loss_mask f32; non-causal objectives
# add prefix (B, L) int32 (objectives.py).
Batch = dict[str, jax.Array]


# --------------------------------------------------------------------------- the pure steps


# The router statistics a step reports for an MoE model (`moe.summarize`'s keys, renamed).
MOE_METRICS = {
    "balance_loss": "moe_balance_loss",
    "z_loss": "moe_z_loss",
    "dropped": "moe_dropped",
    "load_max_over_mean": "moe_load_max_over_mean",
}


def loss_sums(
    graphdef: Any, params: Any, batch: Batch, loss_chunk: int = 0, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy (fp32) and the number of target tokens in `batch`.

    `loss_chunk` > 0 computes it in vocabulary tiles of that many entries (`jaxlm.loss`): the
    same loss and gradients without the (B, L, V) logits. `z_loss` > 0 adds z_loss * lse^2 per
    target token (lse: the log-normaliser of its logits), which keeps the output's log-partition
    near zero; the training step passes it, held-out evaluation does not.
    """
    loss_sum, count, _ = _sums_and_router_stats(graphdef, params, batch, loss_chunk, z_loss)
    return loss_sum, count


def train_loss_sums(
    graphdef: Any,
    params: Any,
    batch: Batch,
    loss_chunk: int = 0,
    z_loss: float = 0.0,
    mtp_weight: float = 0.0,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, dict[str, jax.Array]]]:
    """What the train step differentiates, and (`loss_sums`' summed loss, target count, router
    and multi-token metrics) beside it.

    For a dense model that is `loss_sums`' loss. An MoE model adds its router losses (balance
    and router z-loss with their coefficients, averaged over the sparse layers) times the
    target count: means over tokens, so they stay means when the step divides by the count.
    `mtp_weight` > 0 (a model with `mtp_heads`) adds that times the heads' mean loss
    (`speedrun.mtp_loss`, reported as `mtp_loss`), times the count likewise.
    """
    loss_sum, count, moe_aux = _sums_and_router_stats(
        graphdef, params, batch, loss_chunk, z_loss, mtp_weight
    )
    total, metrics = loss_sum, {}
    if "mtp_loss" in moe_aux:
        metrics["mtp_loss"] = moe_aux.pop("mtp_loss")
        total = total + count * mtp_weight * metrics["mtp_loss"]
    if moe_aux:
        metrics |= {name: moe_aux[key] for key, name in MOE_METRICS.items()}
        metrics["router_load"] = moe_aux["load"]  # (sparse layers, X): the bias step's input
        total = total + count * moe_aux["loss"]
    return total, (loss_sum, count, metrics)


def _sums_and_router_stats(
    graphdef: Any,
    params: Any,
    batch: Batch,
    loss_chunk: int,
    z_loss: float,
    mtp_weight: float = 0.0,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(summed loss, target count, router statistics; with `mtp_weight` also the mtp heads'
    mean loss, under `mtp_loss`)."""
    mask, targets = batch["loss_mask"], batch["targets"]
    model = nnx.merge(graphdef, params)
    hidden, head, _, moe_aux = model.hidden_and_head(
        batch["inputs"], batch["positions"], batch["segment_ids"], prefix=batch.get("prefix")
    )  # (B, L, D), (D, V): `model.forward`'s logits are their product
    if mtp_weight:  # the heads read the same final hidden states: one forward pass for both
        moe_aux = dict(moe_aux, mtp_loss=speedrun.mtp_loss(model, hidden, head, batch, loss_chunk))
    if loss_chunk:
        if not z_loss:
            nll_sum, count = loss_lib.token_loss_sums(hidden, head, targets, mask, loss_chunk)
            return nll_sum, count, moe_aux
        nll, lse = loss_lib.token_nll_and_lse(hidden, head, targets, loss_chunk)
    else:
        logits = model.logits(hidden, head)  # (B, L, V) fp32
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # (B, L)
        if not z_loss:
            return jnp.sum(nll * mask), jnp.sum(mask), moe_aux
        lse = jax.nn.logsumexp(logits, axis=-1)  # (B, L)
    return jnp.sum((nll + z_loss * jnp.square(lse)) * mask), jnp.sum(mask), moe_aux


def _logits(graphdef: Any, params: Any, batch: Batch) -> jax.Array:
    return _logits_and_router_stats(graphdef, params, batch)[0]  # (B, L, V) fp32


def _logits_and_router_stats(
    graphdef: Any, params: Any, batch: Batch
) -> tuple[jax.Array, dict[str, jax.Array]]:
    model = nnx.merge(graphdef, params)
    # A causal batch has no `prefix`: None builds exactly the program of before objectives.
    prefix = batch.get("prefix")
    logits, _, moe_aux = model.forward(
        batch["inputs"], batch["positions"], batch["segment_ids"], prefix=prefix
    )
    return logits, moe_aux


def _hidden_and_head(graphdef: Any, params: Any, batch: Batch) -> tuple[jax.Array, ...]:
    model = nnx.merge(graphdef, params)
    hidden, head, _, moe_aux = model.hidden_and_head(
        batch["inputs"], batch["positions"], batch["segment_ids"], prefix=batch.get("prefix")
    )
    return hidden, head, moe_aux  # (B, L, D), (D, V), router statistics


def eval_sums(
    graphdef: Any, params: Any, batch: Batch, loss_chunk: int = 0
) -> dict[str, jax.Array]:
    """Summed nll, target count, argmax hits, and whole spans: `spans` documents with targets
    in the row, `exact` of them with every target the argmax (for FIM's middle span that is
    greedy decoding reproducing it exactly; a document split across rows counts per row).
    `loss_chunk` as in `loss_sums`."""
    mask = batch["loss_mask"]
    if loss_chunk:
        hidden, head, _ = _hidden_and_head(graphdef, params, batch)
        nll, hit = loss_lib.token_nll_and_hits(hidden, head, batch["targets"], loss_chunk)
    else:
        logits = _logits(graphdef, params, batch)  # (B, L, V) fp32
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # (B, L)
        hit = jnp.argmax(logits, axis=-1) == batch["targets"]
    hits = hit * mask  # (B, L)
    B, L = mask.shape
    span = (jnp.arange(B)[:, None] * (L + 1) + batch["segment_ids"]).reshape(-1)  # (B L,)
    targets_per_span = jax.ops.segment_sum(mask.reshape(-1), span, B * (L + 1))
    hits_per_span = jax.ops.segment_sum(hits.reshape(-1), span, B * (L + 1))
    has_targets = targets_per_span > 0
    return {
        "nll": jnp.sum(nll * mask),
        "count": jnp.sum(mask),
        "correct": jnp.sum(hits),
        "spans": jnp.sum(has_targets),
        "exact": jnp.sum(has_targets & (hits_per_span == targets_per_span)),
    }


def accumulate_gradients(
    graphdef: Any,
    params: Any,
    batch: Batch,
    grad_accum: int,
    loss_chunk: int = 0,
    z_loss: float = 0.0,
    mtp_weight: float = 0.0,
) -> tuple:
    """Summed cross-entropy, target count, summed gradients (of `train_loss_sums`) and the
    router and multi-token metrics (means over the micro-batches; {} for a dense model) over
    `grad_accum` micro-batches.

    Sums (not means) make the result independent of how the batch is split: dividing by the
    total count afterwards gives exactly the whole batch's mean-loss gradient.
    """
    grad_fn = jax.grad(
        lambda p, b: train_loss_sums(graphdef, p, b, loss_chunk, z_loss, mtp_weight),
        has_aux=True,
    )
    if grad_accum == 1:
        grads, (loss_sum, count, moe_metrics) = grad_fn(params, batch)
        return loss_sum, count, grads, moe_metrics
    # Row i goes to micro-batch i % grad_accum: each device's block of rows splits evenly over
    # the micro-batches (no rows move between devices), whatever the mesh.
    micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

    def add(carry, micro_batch):
        grads, (loss_sum, count, moe_metrics) = grad_fn(params, micro_batch)
        acc_loss, acc_count, acc_grads = carry
        return (
            acc_loss + loss_sum,
            acc_count + count,
            jax.tree.map(jnp.add, acc_grads, grads),
        ), moe_metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, count, grads), moe_metrics = jax.lax.scan(add, (0.0, 0.0, zeros), micro)
    moe_metrics = {k: jnp.mean(v, axis=0) for k, v in moe_metrics.items()}  # over micro-batches
    return loss_sum, count, grads, moe_metrics


def make_train_step(
    graphdef: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int,
    spike_ratio: float = 0.0,
    spike_warmup: int = 50,
    ema_decay: float = 0.99,
    loss_chunk: int = 0,
    z_loss: float = 0.0,
    router_bias_rate: float = 0.0,
    mtp_weight: float = 0.0,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Builds `train_step(state, batch) -> (state, metrics)`: one optimizer update, the one step
    of every run (a stage of a staged run is a `grad_accum` and a batch shape).

    The batch is split into `grad_accum` micro-batches, scanned inside the program, whose summed
    gradients are normalised by the total target count, so the update equals the one of the
    whole batch. The loss (and its logged value) includes the `z_loss` term (`loss_sums`).

    A step whose loss or gradient is not finite, or (after `spike_warmup` good steps) whose loss
    exceeds `spike_ratio` times the running mean of accepted losses, is skipped: parameters and
    optimizer state stay bitwise unchanged and `metrics['skipped']` is 1. The running mean lives
    in the state, so it is checkpointed and a resumed run decides exactly as the original would.

    `metrics['loss']` leaves out an MoE model's router losses (so it compares with dense runs):
    they enter the gradient and are reported as `MOE_METRICS`.
    `router_bias_rate` > 0 (`model.moe.bias_update_rate`) moves every MoE layer's selection bias
    toward balance by that much per step (`moe.update_bias`), outside the gradient.
    `mtp_weight` weighs the multi-token heads' loss (`train_loss_sums`; metric `mtp_loss`).
    """

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        params = state["params"]
        loss_sum, count, grads, moe_metrics = accumulate_gradients(
            graphdef, params, batch, grad_accum, loss_chunk, z_loss, mtp_weight
        )
        router_load = moe_metrics.pop("router_load", None)
        count = jnp.maximum(count, 1.0)
        loss = loss_sum / count
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optim.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        if router_bias_rate:
            new_params = _step_router_biases(new_params, params, router_load, router_bias_rate)

        guard = state["guard"]
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        spike = (
            (spike_ratio > 0)
            & (guard["accepted"] >= max(spike_warmup, 1))
            & (loss > spike_ratio * guard["loss_ema"])
        )
        ok = finite & ~spike
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        ema = jnp.where(
            guard["accepted"] == 0, loss, ema_decay * guard["loss_ema"] + (1 - ema_decay) * loss
        )
        new_guard = {
            "loss_ema": jnp.where(ok, ema, guard["loss_ema"]),
            "accepted": guard["accepted"] + ok.astype(jnp.int32),
        }
        new_params = keep(new_params, params)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "update_norm": jnp.where(ok, optim.global_norm(updates), 0.0),
            "param_norm": optim.global_norm(new_params),
            "lr": schedule(state["step"]),
            "tokens": count,
            "skipped": 1 - ok.astype(jnp.int32),
            **moe_metrics,
        }
        new_state = {
            "params": new_params,
            "opt_state": keep(opt_state, state["opt_state"]),
            "step": state["step"] + 1,
            "guard": new_guard,
        }
        return new_state, metrics

    return train_step


def _step_router_biases(new_params: Any, params: Any, load: jax.Array, rate: float) -> Any:
    """`new_params` with each MoE layer's `router_bias` set to its DeepSeek-V3 step from
    `params` (whatever the optimizer did to it: no gradient reaches it). `load` (sparse layers,
    X) is in layer order, as the biases flatten: one (X,) per layer, or one (N, X) scanned."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(new_params)
    old = jax.tree.leaves(params)
    leaves, row = [], 0
    for (path, leaf), before in zip(flat, old, strict=True):
        if getattr(path[-1], "key", None) == "router_bias":
            rows = leaf.size // load.shape[-1]
            leaf = moe_lib.update_bias(before, load[row : row + rows].reshape(leaf.shape), rate)
            row += rows
        leaves.append(leaf)
    return jax.tree.unflatten(treedef, leaves)


def make_eval_step(
    graphdef: Any, detail: bool = False, loss_chunk: int = 0
) -> Callable[[Any, Batch], dict]:
    """Builds `eval_step(params, batch) -> {'nll', 'count'}` (summed nll, target count), or with
    `detail` the whole dict of `eval_sums` (the non-causal objectives' metrics)."""
    if detail:
        return lambda params, batch: eval_sums(graphdef, params, batch, loss_chunk)

    def eval_step(params, batch):
        nll, count = loss_sums(graphdef, params, batch, loss_chunk)
        return {"nll": nll, "count": count}

    return eval_step


# --------------------------------------------------------------------------- state set-up


class Setup:
    """The model, optimizer, shardings and step programs of a run, built once from its spec."""

    def __init__(
        self,
        spec: run_spec.RunSpec,
        vocab_size: int,
        mesh: jax.sharding.Mesh,
        platform: str | None = None,
    ):
        """`platform` (default: the mesh's devices') is what `model.attention=auto` resolves
        for; a CUDA export from a CPU host passes "gpu"."""
        self.spec = spec
        self.config = spec.config  # the sections the spec does not own (checkpoint, sample, ...)
        platform = platform or mesh.devices.flat[0].platform
        self.model_cfg = spec.model_for(vocab_size, platform)
        # The mesh and rules every jitted function of the run is built with (`sharding.jit`).
        self.mesh_rules = sharding.MeshRules.of(mesh, spec.preset)
        self.plan = spec.plan
        self.schedule = spec.plan.schedule
        self.tx = spec.optimizer()
        abstract_model = model_lib.abstract(self.model_cfg)
        self.graphdef, abstract_params_state = nnx.split(abstract_model)
        axes = model_lib.logical_axes(abstract_params_state)
        abstract_params = nnx.to_pure_dict(abstract_params_state)
        self.param_shardings = sharding.tree_shardings(
            mesh, axes, abstract_params, self.mesh_rules.mapping
        )
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        opt_shardings = optim.map_param_leaves(
            abstract_opt,
            abstract_params,
            self.param_shardings,
            per_param=lambda _, s: s,
            other=lambda _: replicated,
        )
        self.state_shardings = {
            "params": self.param_shardings,
            "opt_state": opt_shardings,
            "step": replicated,
            "guard": {"loss_ema": replicated, "accepted": replicated},
        }
        abstract_state = jax.eval_shape(self._init_fn)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            self.state_shardings,
        )
        self.n_params = model_lib.count_params(abstract_params)
        self._graphdefs: dict[tuple, Any] = {}  # (rope_theta, rope_scaling) -> graphdef
        self._train_steps: dict[tuple, Callable] = {}  # (grad_accum, rope) -> jitted step
        self.programs: list[tuple[int, int, int]] = []  # (rows, length, micro-batches) traced
        self._eval_steps: dict[tuple, Callable] = {}  # rope -> jitted eval step

    @property
    def mesh(self) -> jax.sharding.Mesh:
        """The run's device mesh."""
        return self.mesh_rules.mesh

    def graphdef_for(self, stage: stages_lib.Stage) -> Any:
        """The model of `stage`: the run's, or the same parameters under the stage's RoPE."""
        rope = stage.rope
        if rope == (self.model_cfg.rope_theta, self.model_cfg.rope_scaling):
            return self.graphdef
        if rope not in self._graphdefs:
            cfg = dataclasses.replace(
                self.model_cfg, rope_theta=stage.rope_theta, rope_scaling=stage.rope_scaling
            )
            self._graphdefs[rope] = nnx.split(model_lib.abstract(cfg))[0]
        return self._graphdefs[rope]

    def _init_fn(self) -> TrainState:
        with nnx.use_eager_sharding(False):
            model = model_lib.Transformer(
                self.model_cfg, nnx.Rngs(params=model_lib.init_key(self.spec.seed))
            )
        params = nnx.to_pure_dict(nnx.state(model))
        return {
            "params": params,
            "opt_state": self.tx.init(params),
            "step": jnp.array(0, jnp.int32),
            "guard": {"loss_ema": jnp.array(0.0, jnp.float32), "accepted": jnp.array(0, jnp.int32)},
        }

    def init_state(self) -> TrainState:
        """Fresh state, created directly in its shards (no full copy on one device)."""
        init = sharding.jit(self._init_fn, self.mesh_rules, out_shardings=self.state_shardings)
        return init()

    def jit_train_step(self, stage: stages_lib.Stage | None = None) -> Callable:
        """The jitted `train_step(state, global_batch)` of `stage` (default: the first): donated
        state, explicit shardings; one function per (micro-batches, RoPE), compiled once per
        batch shape, so stages with the same shapes share a program."""
        stage = stage or self.plan.stages[0]
        key = (stage.grad_accum, stage.rope)
        if key not in self._train_steps:
            step = make_train_step(
                self.graphdef_for(stage),
                self.tx,
                self.schedule,
                stage.grad_accum,
                self.spec.spike_ratio,
                self.spec.spike_warmup,
                loss_chunk=self.spec.loss_chunk,
                z_loss=self.spec.z_loss,
                router_bias_rate=self.model_cfg.moe.bias_update_rate if self.model_cfg.moe else 0,
                mtp_weight=self.spec.mtp_weight if self.model_cfg.mtp_heads else 0.0,
            )

            def traced(state, batch, step=step, accum=stage.grad_accum):
                # Runs once per compiled program (at trace time): what `aot` must plan.
                self.programs.append((*batch["inputs"].shape, accum))
                return step(state, batch)

            self._train_steps[key] = sharding.jit(
                traced,
                self.mesh_rules,
                in_shardings=(self.state_shardings, sharding.batch_sharding(self.mesh)),
                out_shardings=(self.state_shardings, None),
                donate_argnums=0,
            )
        return self._train_steps[key]

    def jit_eval_step(self, stage: stages_lib.Stage | None = None) -> Callable:
        """The jitted `eval_step(params, batch)` of `stage`'s model (default: the first): a dict
        of on-device sums (`eval_sums`), added up by `evaluate` with one read at the end."""
        stage = stage or self.plan.stages[0]
        if stage.rope not in self._eval_steps:
            detail = self.spec.objective != "causal"
            self._eval_steps[stage.rope] = sharding.jit(
                make_eval_step(self.graphdef_for(stage), detail, self.spec.loss_chunk),
                self.mesh_rules,
                in_shardings=(self.param_shardings, sharding.batch_sharding(self.mesh)),
            )
        return self._eval_steps[stage.rope]

    def abstract_batch(self, stage: stages_lib.Stage | None = None) -> Batch:
        """ShapeDtypeStructs of `stage`'s global train batch (default: the first stage's),
        sharded as the step takes it: for compiling without data."""
        stage = stage or self.plan.stages[0]
        rows_sharding = sharding.batch_sharding(self.mesh)
        shape = (stage.batch_size, stage.seq_len)
        batch = {
            k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows_sharding)
            for k in ("inputs", "targets", "segment_ids", "positions")
        }
        batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=rows_sharding)
        if self.spec.objective in objectives.BIDIRECTIONAL:
            batch["prefix"] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows_sharding)
        return batch

    def lower_train_step(self, stage: stages_lib.Stage | None = None) -> jax.stages.Lowered:
        """`stage`'s train step lowered on abstract state and batch: compile it, or read its
        HLO."""
        return self.jit_train_step(stage).lower(self.abstract_state, self.abstract_batch(stage))


# --------------------------------------------------------------------------- evaluation


def eval_sets(setup: Setup, manifest: dict, max_batches: int = 0) -> list[tuple[str, str, int]]:
    """(name, split, batches) of each held-out split and named validation set an evaluation
    reads, in order: what `evaluate` will do, for a progress line before it starts."""
    spec = setup.spec
    sets = [(n, "val") for n in sorted(manifest["datasets"])]
    sets += [(n, "validation") for n in manifest_lib.validation_sets(manifest)]
    return [
        (
            name,
            split,
            pipeline.eval_num_batches(
                manifest, name, spec.eval_seq_len, spec.eval_batch_size, max_batches, split=split
            ),
        )
        for name, split in sets
        if manifest_lib.split_info(manifest, name, split)["documents"] > 0
    ]


def evaluate(
    setup: Setup,
    eval_step: Callable,
    params: Any,
    manifest: dict,
    sets: list[tuple[str, str, int]],
    objective: objectives.Objective | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte for each dataset and for all together, and
    for each named validation set (`<name>/loss`, ...; not part of the held-out totals).

    `sets` are `eval_sets`' (name, split, batches): how much of each split to read. Each batch's
    sums stay on the devices until every batch is dispatched, then all are read at once and
    added on the host in float64 (float32 running sums on the device would round).
    A non-causal `objective` scores what it predicts (masked tokens, the text after the prefix,
    the FIM middle span) and adds its own metrics (`objectives.Objective.metrics`); bits per
    byte then count the bytes of the scored tokens only at the split's average bytes per token.
    `progress`, if given, is called with the number of batches dispatched so far (over all
    sets).
    """
    per_batch, host_sums, done = [], [], 0
    for name, split, n in sets:
        on_device, on_host = _eval_split(
            setup, eval_step, params, manifest, name, split, n, objective, progress, done
        )
        per_batch.append(on_device)
        host_sums.append(on_host)
        done += n
    # The one read of the evaluation: explicit, as the training loop guards against implicit ones.
    fetched = jax.device_get(per_batch)
    out, totals = {}, {}
    for (name, split, _), batches, host in zip(sets, fetched, host_sums, strict=True):
        sums = {"nll": 0.0, "count": 0.0}
        for found in batches:
            sums = {k: sums.get(k, 0.0) + float(v) for k, v in found.items()}
        sums |= host
        nll, count = sums["nll"], sums["count"]
        loss = nll / max(count, 1)
        nbytes = count * pipeline.val_bytes_per_target(manifest, name, split)
        out[f"{name}/loss"] = loss
        out[f"{name}/perplexity"] = math.exp(min(loss, 50))
        out[f"{name}/bits_per_byte"] = nll / math.log(2) / max(nbytes, 1)
        if split == "val":
            sums["bytes"] = nbytes
            totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
    if totals.get("count"):
        out["loss"] = totals["nll"] / totals["count"]
        out["perplexity"] = math.exp(min(out["loss"], 50))
        out["bits_per_byte"] = totals["nll"] / math.log(2) / totals["bytes"]
        if objective is not None:
            out.update(objective.metrics(totals))
    return out


def _eval_split(
    setup: Setup,
    eval_step: Callable,
    params: Any,
    manifest: dict,
    name: str,
    split: str,
    n: int,
    objective: objectives.Objective | None = None,
    progress: Callable[[int], None] | None = None,
    done_before: int = 0,
) -> tuple[list[dict[str, jax.Array]], dict[str, float]]:
    """`eval_step`'s sums (on the devices, not read) for each of the first `n` batches of one
    held-out split or validation set, and the objective's host-side sums."""
    spec = setup.spec
    local_rows = spec.eval_batch_size // jax.process_count()
    device_sums, host_sums = [], {}
    for i, host_batch in enumerate(
        pipeline.eval_batches(
            manifest,
            name,
            seq_len=spec.eval_seq_len,
            batch_size=local_rows,
            num_batches=n,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            split=split,
            doc_transform=objective and objective.doc_transform(evaluation=True),
        )
    ):
        if objective is not None:
            host_batch = objective.apply(
                host_batch, i, jax.process_index() * local_rows, evaluation=True
            )
            for k, v in objective.host_sums(host_batch).items():
                host_sums[k] = host_sums.get(k, 0.0) + v
        device_sums.append(eval_step(params, sharding.host_to_global(host_batch, setup.mesh)))
        if progress is not None:
            progress(done_before + i + 1)
    return device_sums, host_sums
