"""Ahead-of-time compilation of the train step for hardware this machine does not have.

`compile_run(config, "v5p-64")` builds exactly the steps `jaxlm.main` would run, one program per
distinct stage shape and RoPE of the run's plan (the same `train.Setup`: shardings, donation,
gradient accumulation, remat, attention with `auto` resolved for the *target*), lays its mesh
over a TPU slice's compile-only devices (libtpu), and
runs the real TPU compiler on abstract inputs: nothing is allocated and no TPU is needed. For
GPU targets it exports the step for CUDA with `jax.export` (a GPU compiler is not available
off-GPU, so memory there is the planner's estimate, labelled as such).

What the compiler reports:
- memory per device from its buffer assignment (arguments, outputs, donated aliases,
  temporaries), and whether that fits the chip's HBM; a step that does not fit is one sentence
  with the cheapest remedy the planner finds;
- FLOPs and its own estimate of the step time (`cost_analysis`). XLA counts the body of a loop
  once, whatever its trip count, and gives no time estimate for programs with loops; so when the
  step scans its layers or accumulates gradients, the figures come from two small extra
  compiles of the same step, unrolled with 1 and 2 layers on one micro-batch:
  step = grad_accum x (cost(1 layer) + (n_layers - 1) x (cost(2) - cost(1))). That counts the
  optimizer update once per micro-batch (a few FLOPs per parameter against 6 per parameter per
  token: far below 0.1%).
The step time is the compiler's *estimate*, and so are the tokens/s and MFU derived from it.
Splash attention is a Pallas kernel (a custom call) that the cost model does not see: its FLOPs
are missing from the compiler's count and its time from the step estimate, while MFU counts
them as model FLOPs; the report gives their share. Below `MIN_COUNTED_SHARE` of the model's
other FLOPs the count is not trusted and no step time is derived.

The report times each compile: the main one (the step as it runs) apart from the two costing
compiles, and the wall time of the whole call.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from jaxlm import estimate, estimate_xla, hardware, sharding, stages, train, validate
from jaxlm import spec as run_spec
from jaxlm.errors import ConfigError

# The share of the model's FLOPs (splash attention's left out: no cost model sees them) that the
# compiler's cost analysis must count before a step time, tokens/s and MFU are derived from it.
# docs/perf.md quotes this figure.
MIN_COUNTED_SHARE = 0.9


class DoesNotFit(ConfigError):
    """The step needs more memory per chip than the target has: one sentence, and the same
    facts as data (`as_dict`) with the planner's cheapest remedy."""

    def __init__(
        self,
        planned: estimate.Estimate,
        target: hardware.Target,
        reason: str,
        needed: float | None = None,
    ):
        self.name, self.target, self.reason = planned.name, target, reason
        self.needed = needed  # bytes per chip named in `reason`; None where not known
        self.planner_memory = planned.memory.total
        self.remedy = next((r for r in planned.remedies if r.fits), None)
        self.chips_to_fit = None if self.remedy else planned.chips_to_fit
        super().__init__(f"{self.name} does not fit on {target.name}: {reason}; {self._remedy()}")

    def _slice(self) -> str:
        """The target of `chips_to_fit` chips of this kind, e.g. v5e-64."""
        chip = self.target.chip
        return f"{chip.name.split()[-1].lower()}-{self.chips_to_fit * chip.cores_per_chip}"

    def _remedy(self) -> str:
        """The planner's cheapest change that fits, as the end of a sentence."""
        if self.remedy:
            size = estimate.format_bytes(self.remedy.total)
            label = self.remedy.label
            return (
                f"the cheapest fix the planner finds is {label}, which it puts at {size} per chip."
            )
        if self.chips_to_fit:
            tpu = self.target.platform == "tpu"
            where = f" (--target={self._slice()})" if tpu else ""
            how = "with remat=full, fsdp and micro-batch 1"
            return f"it needs {self.chips_to_fit} chips{where}, {how}."
        return "shorten train.seq_len or use more chips."

    def as_dict(self) -> dict[str, Any]:
        """The refusal as JSON-ready data: `fits` false, why, and the remedy."""
        remedy = self.remedy and {
            "label": self.remedy.label,
            "overrides": self.remedy.overrides,
            "flags": self.remedy.flags,
            "planner_memory": self.remedy.total,
        }
        return {
            "name": self.name,
            "target": self.target.name,
            "chips": self.target.chips,
            "fits": False,
            "reason": self.reason,
            "needed_bytes": self.needed,
            "hbm": self.target.chip.memory_bytes,
            "planner_memory": self.planner_memory,
            "remedy": remedy,
            "chips_to_fit": self.chips_to_fit,
            "target_to_fit": self._slice() if self.chips_to_fit else None,
            "error": str(self),
        }


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per-device figures of one train step from the compiler's cost analysis."""

    flops: float
    seconds: float | None  # the compiler's estimate; None where it gives none
    bytes_accessed: float
    compiler_loops: int = 0  # while loops the compiler added (windowed einsums): counted once


@dataclasses.dataclass(frozen=True)
class Report:
    """What `compile_step` found; every figure is per device unless named otherwise."""

    name: str
    target: hardware.Target
    mesh_shape: dict[str, int]
    preset: str
    model: Any  # the ModelConfig compiled (attention resolved for the target)
    batch_size: int
    seq_len: int
    grad_accum: int
    compile_seconds: float
    memory: dict[str, float] | None  # the compiler's: arguments, outputs, aliased, temp, total
    planner_memory: float  # the planner's estimate of the same total
    cost: Cost | None  # None for a CUDA export (no compiler cost model off-GPU)
    cost_method: str  # "direct" | "extrapolated from 1 and 2 unrolled layers" | ""
    model_flops_per_step: float  # all devices: 6 x matmul weights + attention, x tokens
    note: str = ""
    costing_seconds: float = 0.0  # the extra compiles for the cost analysis (0: none ran)
    wall_seconds: float = 0.0  # the whole call (or tool): tracing, planning, every compile
    stage: str = ""  # "stage 1 (cool-down)": the first stage that runs this program, if several

    @property
    def chips(self) -> int:
        return self.target.chips

    @property
    def hbm(self) -> float:
        return self.target.chip.memory_bytes

    @property
    def total_memory(self) -> float:
        return self.memory["total"] if self.memory else self.planner_memory

    @property
    def fits(self) -> bool:
        return self.total_memory <= self.hbm

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def kernel_flops_share(self) -> float:
        """Share of the model's FLOPs inside the splash attention kernel, a custom call the
        compiler's cost model does not see (0 for XLA or cuDNN attention)."""
        m = self.model
        if m.attention != "splash":
            return 0.0
        return m.attention_flops_per_token(self.seq_len) / m.flops_per_token(self.seq_len)

    @property
    def counted_share(self) -> float | None:
        """The compiler's FLOPs over the model's FLOPs it can see (splash attention's left
        out); under 1 only if it counted a loop body once (recomputation adds FLOPs)."""
        if not self.cost:
            return None
        visible = self.model_flops_per_step * (1 - self.kernel_flops_share)
        return self.cost.flops * self.chips / visible

    @property
    def cost_complete(self) -> bool:
        """Whether the compiler's cost model saw the whole step (`MIN_COUNTED_SHARE`)."""
        return self.cost is not None and self.counted_share >= MIN_COUNTED_SHARE

    @property
    def estimated_tokens_per_second(self) -> float | None:
        """Tokens/s implied by the compiler's step-time estimate (not a measurement)."""
        if not self.cost_complete or not self.cost.seconds:
            return None
        return self.tokens_per_step / self.cost.seconds

    @property
    def estimated_mfu(self) -> float | None:
        """Model-FLOPs utilisation implied by the compiler's step-time estimate."""
        if not self.cost_complete or not self.cost.seconds:
            return None
        return self.model_flops_per_step / (
            self.cost.seconds * self.chips * self.target.chip.peak_flops
        )


def compile_run(
    config: Any,
    target: str | hardware.Target,
    vocab_size: int | None = None,
    with_cost: bool = True,
) -> list[Report]:
    """Compiles every distinct train-step program `config`'s run executes (`Plan.programs`:
    one per stage batch shape and RoPE) for `target` (e.g. "v5p-64", "h100-8") without it.

    Args:
      config: a recipe's ConfigDict, overrides applied.
      target: a target name (see `hardware.parse_target`) or a Target.
      vocab_size: default config.tokenizer.vocab_size.
      with_cost: also run the compiler's cost analysis (for a scanned or accumulated step, two
        small extra compiles); False reports memory and compile time only.
    Returns:
      One report per program, in the order the run first executes them.
    Raises:
      ConfigError: a bad target, a mesh or batch that cannot be laid out on it, no libtpu.
      DoesNotFit: a program needs more memory per chip than the target has (the first found;
        the run fits only if every stage does).
    """
    started = time.perf_counter()
    spec = validate.check_config(config)
    target = target if isinstance(target, hardware.Target) else hardware.parse_target(target)
    vocab = int(vocab_size or config.tokenizer.vocab_size)
    devices = hardware.target_devices(target)
    if len(devices) < target.chips:
        raise ConfigError(
            f"exporting for {target.name} needs {target.chips} host devices but this process "
            f"has {len(devices)}; run tools/compile.py (it sets them) or set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={target.chips} before jax starts."
        )
    mesh = sharding.make_mesh(config.mesh.shape, devices[: target.chips])
    validate.check_batches(spec, mesh)
    setup = train.Setup(spec, vocab, mesh, platform=target.platform)
    reports = []
    for stage in spec.plan.programs:
        report = _compile_program(setup, stage, target, vocab, with_cost)
        reports.append(dataclasses.replace(report, wall_seconds=time.perf_counter() - started))
    return reports


def compile_step(
    config: Any,
    target: str | hardware.Target,
    vocab_size: int | None = None,
    with_cost: bool = True,
) -> Report:
    """`compile_run`'s report of the program that needs the most memory per chip: the one
    that decides whether the run fits (the only one of a run without stages)."""
    return max(compile_run(config, target, vocab_size, with_cost), key=lambda r: r.total_memory)


def _compile_program(
    setup: train.Setup,
    stage: stages.Stage,
    target: hardware.Target,
    vocab: int,
    with_cost: bool,
) -> Report:
    """The report of `stage`'s train-step program on `target`."""
    spec, mesh = setup.spec, setup.mesh
    config = spec.config
    planned = estimate.estimate(
        config, target.chip, chips=target.chips, vocab_size=vocab, stage=stage, spec=spec
    )
    several = len(spec.plan.programs) > 1
    common = dict(
        name=config.get("name", "config"),
        target=target,
        mesh_shape=dict(mesh.shape),
        preset=config.mesh.preset,
        batch_size=stage.batch_size,
        seq_len=stage.seq_len,
        grad_accum=stage.grad_accum,
        stage=f"stage {stage.index} ({stage.name})" if several else "",
        planner_memory=planned.memory.total,
        model_flops_per_step=setup.model_cfg.flops_per_token(stage.seq_len)
        * stage.batch_size
        * stage.seq_len,
    )
    hbm = estimate.format_bytes(target.chip.memory_bytes)
    state = planned.memory.params + planned.memory.opt_state  # exact: no compile needed
    if state > target.chip.memory_bytes:
        reason = (
            f"its parameters and optimizer state alone take {estimate.format_bytes(state)} per "
            f"chip of {hbm}"
        )
        raise DoesNotFit(planned, target, reason, state)
    if target.platform != "tpu":
        if planned.memory.total > target.chip.memory_bytes:
            total = planned.memory.total
            reason = f"the planner puts the step at {estimate.format_bytes(total)} per GPU of {hbm}"
            raise DoesNotFit(planned, target, reason, total)
        return _export_cuda(setup, stage, target, vocab, common)

    start = time.perf_counter()
    compiled, lowered = _compile(setup, stage, target, planned)
    seconds = time.perf_counter() - start
    memory = estimate_xla.compiled_memory(compiled)
    if memory["total"] > target.chip.memory_bytes:
        total = memory["total"]
        where = f" ({common['stage']})" if several else ""
        reason = f"the TPU compiler needs {estimate.format_bytes(total)} per chip of {hbm} HBM"
        raise DoesNotFit(planned, target, reason + where, total)
    start = time.perf_counter()
    if not with_cost:
        cost, method = None, ""
    elif setup.model_cfg.scan_layers or stage.grad_accum > 1:  # loops XLA would cost once
        cost = _extrapolated_cost(setup, stage, vocab, target)
        method = "extrapolated from 1 and 2 unrolled layers"
    else:
        cost, method = _cost(compiled, lowered), "direct"
    costing = time.perf_counter() - start if method.startswith("extrapolated") else 0.0
    return Report(
        model=setup.model_cfg,
        compile_seconds=seconds,
        memory=memory,
        cost=cost,
        cost_method=method,
        costing_seconds=costing,
        **common,
    )


# XLA:TPU writes sizes as "15.75G": binary units (a 16 GiB v5e chip offers 15.75G of HBM).
_XLA_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _compile(
    setup: train.Setup, stage: stages.Stage, target: hardware.Target, planned: estimate.Estimate
) -> tuple[Any, Any]:
    """(the TPU executable of `stage`'s step, its lowering); an out-of-memory compile becomes
    one sentence, in GiB."""
    lowered = setup.lower_train_step(stage)
    try:
        return lowered.compile(), lowered
    except Exception as e:  # XLA raises its own runtime error type; only OOM is translated
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
            raise
        # e.g. "... HLO temporaries (44.34G) exceeds available HBM (15.75G)."
        sizes = [
            float(number) * _XLA_UNITS[unit]
            for number, unit in re.findall(r"\(([\d.]+)([KMGT]?)B?\)", message)
        ]
        if len(sizes) < 2:
            raise DoesNotFit(planned, target, "the TPU compiler ran out of HBM") from None
        need, have = sizes[:2]
        reason = (
            f"the TPU compiler needs {estimate.format_bytes(need)} of temporaries per chip, "
            f"more than the {estimate.format_bytes(have)} of HBM it can use"
        )
        raise DoesNotFit(planned, target, reason, need) from None


def _cost(compiled: Any, lowered: Any) -> Cost:
    """The compiler's cost analysis of one executable, and how many loops it added to the
    program it was given (`lowered`): their bodies are counted once."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    seconds = analysis.get("optimal_seconds")
    ours = lowered.as_text().count("stablehlo.while")
    loops = len(re.findall(r"\swhile\(", compiled.as_text())) - ours
    return Cost(
        flops=float(analysis.get("flops", 0.0)),
        seconds=float(seconds) if seconds and seconds > 0 else None,
        bytes_accessed=float(analysis.get("bytes accessed", 0.0)),
        compiler_loops=max(loops, 0),
    )


def _extrapolated_cost(
    setup: train.Setup, stage: stages.Stage, vocab: int, target: hardware.Target
) -> Cost:
    """Cost of `stage`'s whole step from unrolled 1- and 2-layer compiles on one micro-batch."""
    costs = []
    for layers in (1, 2):
        variant = _variant_setup(
            setup,
            stage,
            vocab,
            target,
            model=dict(n_layers=layers, scan_layers=False),
            train=dict(grad_accum=1, batch_size=setup.plan.micro_batch),
        )
        lowered = variant.lower_train_step()
        costs.append(_cost(lowered.compile(), lowered))
    one, two = costs
    n, accum = setup.model_cfg.n_layers, stage.grad_accum

    def whole(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else accum * (a + (n - 1) * (b - a))

    return Cost(
        flops=whole(one.flops, two.flops),
        seconds=whole(one.seconds, two.seconds),
        bytes_accessed=whole(one.bytes_accessed, two.bytes_accessed),
        compiler_loops=max(one.compiler_loops, two.compiler_loops),
    )


def _variant_setup(
    setup: train.Setup,
    stage: stages.Stage,
    vocab: int,
    target: hardware.Target,
    **sections: dict[str, Any],
) -> train.Setup:
    """A one-stage Setup of `stage`'s shapes and RoPE with some keys changed, e.g.
    model=dict(n_layers=1)."""
    variant = setup.config.copy_and_resolve_references()
    with variant.unlocked():
        variant.stages = ()
        variant.train.steps = max(stage.steps, 1)
        variant.train.seq_len = stage.seq_len
        variant.train.batch_size = stage.batch_size
        variant.train.grad_accum = stage.grad_accum
        variant.model.rope_theta = stage.rope_theta
        variant.model.rope_scaling = stage.rope_scaling
        for section, values in sections.items():
            for key, value in values.items():
                variant[section][key] = value
    return train.Setup(run_spec.build(variant), vocab, setup.mesh, platform=target.platform)


def _export_cuda(
    setup: train.Setup, stage: stages.Stage, target: hardware.Target, vocab: int, common: dict
) -> Report:
    """`stage`'s step exported for CUDA (StableHLO); memory is the planner's estimate."""
    from jax import export

    note = "GPU memory is the planner's estimate: no CUDA compiler runs off-GPU."
    start = time.perf_counter()
    try:
        export.export(setup.jit_train_step(stage), platforms=["cuda"])(
            setup.abstract_state, setup.abstract_batch(stage)
        )
    except Exception as e:  # cuDNN attention lowers only where the CUDA plugin finds cuDNN
        if setup.model_cfg.attention != "cudnn" or "cuDNN" not in str(e):
            raise
        setup = _variant_setup(setup, stage, vocab, target, model=dict(attention="xla"))
        export.export(setup.jit_train_step(), platforms=["cuda"])(
            setup.abstract_state, setup.abstract_batch()
        )
        note = (
            "exported with XLA attention: cuDNN attention lowers only with jax-cuda12-plugin "
            "and nvidia-cudnn-cu12 installed. " + note
        )
    return Report(
        model=setup.model_cfg,
        compile_seconds=time.perf_counter() - start,
        memory=None,
        cost=None,
        cost_method="",
        note=note,
        **common,
    )
