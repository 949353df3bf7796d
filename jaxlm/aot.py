"""Ahead-of-time compilation of the train step for hardware this machine does not have.

`compile_step(config, "v5p-64")` builds exactly the step `jaxlm.main` would run (the same
`train.Setup`: shardings, donation, gradient accumulation, remat, attention with `auto`
resolved for the *target*), lays its mesh over a TPU slice's compile-only devices (libtpu), and
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

import jax

from jaxlm import estimate, estimate_table, hardware, sharding, train, validate
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


def compile_step(
    config: Any,
    target: str | hardware.Target,
    vocab_size: int | None = None,
    with_cost: bool = True,
) -> Report:
    """Compiles `config`'s train step for `target` (e.g. "v5p-64", "h100-8") without it.

    Args:
      config: a recipe's ConfigDict, overrides applied.
      target: a target name (see `hardware.parse_target`) or a Target.
      vocab_size: default config.tokenizer.vocab_size.
      with_cost: also run the compiler's cost analysis (for a scanned or accumulated step, two
        small extra compiles); False reports memory and compile time only.
    Raises:
      ConfigError: a bad target, a mesh or batch that cannot be laid out on it, no libtpu.
      DoesNotFit: the step needs more memory per chip than the target has.
    """
    started = time.perf_counter()
    validate.check_config(config)
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
    validate.check_batches(config, mesh)
    t = config.train
    setup = train.Setup(config, vocab, mesh, platform=target.platform)
    planned = estimate.estimate(config, target.chip, chips=target.chips, vocab_size=vocab)
    common = dict(
        name=config.get("name", "config"),
        target=target,
        mesh_shape=dict(mesh.shape),
        preset=config.mesh.preset,
        batch_size=t.batch_size,
        seq_len=t.seq_len,
        grad_accum=t.grad_accum,
        planner_memory=planned.memory.total,
        model_flops_per_step=setup.model_cfg.flops_per_token(t.seq_len) * t.batch_size * t.seq_len,
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
        report = _export_cuda(config, vocab, mesh, setup, target, common)
        return dataclasses.replace(report, wall_seconds=time.perf_counter() - started)

    start = time.perf_counter()
    compiled, lowered = _compile(setup, target, planned)
    seconds = time.perf_counter() - start
    memory = estimate.compiled_memory(compiled)
    if memory["total"] > target.chip.memory_bytes:
        total = memory["total"]
        reason = f"the TPU compiler needs {estimate.format_bytes(total)} per chip of {hbm} HBM"
        raise DoesNotFit(planned, target, reason, total)
    start = time.perf_counter()
    if not with_cost:
        cost, method = None, ""
    elif setup.model_cfg.scan_layers or t.grad_accum > 1:  # loops XLA would cost once
        cost = _extrapolated_cost(config, vocab, mesh, target)
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
        wall_seconds=time.perf_counter() - started,
        **common,
    )


# XLA:TPU writes sizes as "15.75G": binary units (a 16 GiB v5e chip offers 15.75G of HBM).
_XLA_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _compile(
    setup: train.Setup, target: hardware.Target, planned: estimate.Estimate
) -> tuple[Any, Any]:
    """(the TPU executable of the step, its lowering); an out-of-memory compile becomes one
    sentence, in GiB."""
    lowered = setup.lower_train_step()
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
    config: Any, vocab: int, mesh: jax.sharding.Mesh, target: hardware.Target
) -> Cost:
    """Cost of the whole step from unrolled 1- and 2-layer compiles on one micro-batch."""
    t = config.train
    costs = []
    for layers in (1, 2):
        setup = _variant_setup(
            config,
            vocab,
            mesh,
            target,
            model=dict(n_layers=layers, scan_layers=False),
            train=dict(grad_accum=1, batch_size=t.batch_size // t.grad_accum),
        )
        lowered = setup.lower_train_step()
        costs.append(_cost(lowered.compile(), lowered))
    one, two = costs
    n, accum = config.model.n_layers, t.grad_accum

    def whole(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else accum * (a + (n - 1) * (b - a))

    return Cost(
        flops=whole(one.flops, two.flops),
        seconds=whole(one.seconds, two.seconds),
        bytes_accessed=whole(one.bytes_accessed, two.bytes_accessed),
        compiler_loops=max(one.compiler_loops, two.compiler_loops),
    )


def _variant_setup(config, vocab, mesh, target, **sections: dict[str, Any]) -> train.Setup:
    """The Setup of `config` with some keys changed, e.g. model=dict(n_layers=1)."""
    variant = config.copy_and_resolve_references()
    with variant.unlocked():
        for section, values in sections.items():
            for key, value in values.items():
                variant[section][key] = value
    return train.Setup(variant, vocab, mesh, platform=target.platform)


def _export_cuda(config, vocab, mesh, setup, target, common) -> Report:
    """The step exported for CUDA (StableHLO); memory is the planner's estimate."""
    from jax import export

    note = "GPU memory is the planner's estimate: no CUDA compiler runs off-GPU."
    start = time.perf_counter()
    try:
        export.export(setup.jit_train_step(), platforms=["cuda"])(
            setup.abstract_state, setup.abstract_batch()
        )
    except Exception as e:  # cuDNN attention lowers only where the CUDA plugin finds cuDNN
        if setup.model_cfg.attention != "cudnn" or "cuDNN" not in str(e):
            raise
        setup = _variant_setup(config, vocab, mesh, target, model=dict(attention="xla"))
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


def _cost_notes(r: Report) -> list[str]:
    """What the reader must know to read the compiler's FLOPs and step time."""
    notes = []
    share = r.kernel_flops_share
    if share and r.estimated_mfu is not None:
        notes.append(
            f"Splash attention ({share:.1%} of the model's FLOPs) runs in a kernel the compiler's "
            "cost model does not see: its FLOPs are not in the compiler's count and its time is "
            "not in the step estimate, while MFU counts them: were the kernel as fast as the "
            f"rest of the step, MFU would be {share:.1%} lower than printed."
        )
    if r.cost and not r.cost_complete:
        loops = r.cost.compiler_loops
        cause = (
            f"the program it costed holds {loops} loop(s) the compiler made itself (on FSDP "
            "meshes, windowed einsums split gathered matmuls into loops), and it counts each "
            "loop's body once"
            if loops
            else "the program it costed holds no loop of the compiler's making, so the cause "
            "is not a loop counted once; it was not found"
        )
        notes.append(
            f"The compiler's cost analysis counted {r.counted_share:.0%} of the model's FLOPs "
            f"(those outside splash attention), under the {MIN_COUNTED_SHARE:.0%} needed to "
            f"trust it: {cause}. No step time is derived from it."
        )
    return notes


def format_report(r: Report, width: int = estimate.WIDTH) -> str:
    """The report as a plain-text table of `width` columns; estimates are labelled as such."""
    fmt_b, fmt_n = estimate.format_bytes, estimate.format_count
    lines: list[str] = []

    def cell(label: str, value: str, note: str = "") -> None:
        lines.extend(estimate_table.row(label, value, note, (30, 14), width))

    def text(words: str, indent: str) -> None:
        lines.extend(estimate_table.wrap(words, width, indent))

    m = r.model
    mesh = " x ".join(f"{k} {v}" for k, v in r.mesh_shape.items())
    where = f"topology {r.target.topology}" if r.target.platform == "tpu" else "CUDA export"
    layers = f"{m.n_layers} layers {'scanned' if m.scan_layers else 'unrolled'}"
    shards = r.mesh_shape["data"] * r.mesh_shape["fsdp"]
    micro = r.batch_size // (r.grad_accum * shards)
    text(f"{r.name} on {r.target.name}: {r.chips} x {r.target.chip.name} ({where})", "  ")
    lines.append("=" * width)
    for i, phrase in enumerate(
        (
            f"mesh {mesh} ({r.preset}), batch {r.batch_size:,} x {r.seq_len:,} tokens,",
            f"grad_accum {r.grad_accum} (micro-batch {micro} per device), {m.dtype},",
            f"remat {m.remat}, {m.attention} attention, {layers}",
        )
    ):
        lines.extend(estimate_table.wrap(phrase, width, " " * 7, " " * 7 if i else "Step   "))
    if r.memory:
        mem = r.memory
        lines.append("Memory per device (the TPU compiler's buffer assignment)")
        cell("arguments", fmt_b(mem["arguments"]), "parameters, optimizer state, batch")
        cell("outputs", fmt_b(mem["outputs"]))
        cell("aliased (donated state)", "-" + fmt_b(mem["aliased"]))
        cell("temporaries", fmt_b(mem["temp"]), "activations, gradients, workspace")
    else:
        text("Memory per device (no CUDA compiler off-GPU: the planner's estimate)", "  ")
    fit = f"{r.total_memory / r.hbm:.0%} of {fmt_b(r.hbm)} HBM: " + (
        "fits" if r.fits else "DOES NOT FIT"
    )
    cell("total", fmt_b(r.total_memory), fit)
    if r.memory:
        gap = r.planner_memory / r.memory["total"] - 1
        cell("planner's estimate", fmt_b(r.planner_memory), f"{gap:+.0%} vs compiler")
    lines.append("Compute per step")
    cell("model FLOPs, all chips", f"{r.model_flops_per_step:.3g}", "what MFU counts")
    if r.cost:
        cell("compiler FLOPs, all chips", f"{r.cost.flops * r.chips:.3g}", r.cost_method)
        if r.kernel_flops_share:
            cell("  splash attention", f"{r.kernel_flops_share:.1%}", "of model FLOPs, not costed")
        if not r.cost_complete:
            cell("step time (compiler est.)", "n/a", f"cost model saw {r.counted_share:.0%}")
        elif r.cost.seconds:
            peak = f"of {r.target.chip.peak_flops / 1e12:,.0f} TFLOP/s per chip"
            cell("step time (compiler est.)", f"{r.cost.seconds:.3g} s", "an estimate")
            cell("tokens/s (from that est.)", fmt_n(r.estimated_tokens_per_second))
            cell("MFU (from that est.)", f"{r.estimated_mfu:.0%}", peak)
        else:
            cell("step time (compiler est.)", "n/a", "the compiler gave none")
    lines.append("Time on this machine")
    if r.target.platform == "tpu":
        cell("main compile", f"{r.compile_seconds:,.0f} s", "the step as it runs")
        if r.costing_seconds:
            cell("costing compiles", f"{r.costing_seconds:,.0f} s", "1 and 2 layers, unrolled")
    else:
        cell("export", f"{r.compile_seconds:,.0f} s", "StableHLO for CUDA")
    cell("wall time", f"{r.wall_seconds:,.0f} s", "tracing, planning and every compile")
    for note in ([r.note] if r.note else []) + _cost_notes(r):
        lines.extend(estimate_table.wrap(note, width, " " * 8, "  note: "))
    return "\n".join(lines)


def report_dict(r: Report) -> dict[str, Any]:
    """The report as JSON-ready data (for docs/perf.md tables and scripts)."""
    return {
        "name": r.name,
        "target": r.target.name,
        "chips": r.chips,
        "mesh_shape": r.mesh_shape,
        "preset": r.preset,
        "attention": r.model.attention,
        "scan_layers": r.model.scan_layers,
        "remat": r.model.remat,
        "dtype": r.model.dtype,
        "batch_size": r.batch_size,
        "seq_len": r.seq_len,
        "grad_accum": r.grad_accum,
        "compile_seconds": r.compile_seconds,
        "costing_seconds": r.costing_seconds,
        "wall_seconds": r.wall_seconds,
        "memory": r.memory,
        "planner_memory": r.planner_memory,
        "hbm": r.hbm,
        "fits": r.fits,
        "compiler_flops_per_step": r.cost.flops * r.chips if r.cost else None,
        "compiler_step_seconds_estimate": r.cost.seconds if r.cost else None,
        "cost_method": r.cost_method,
        "model_flops_per_step": r.model_flops_per_step,
        "estimated_tokens_per_second": r.estimated_tokens_per_second,
        "estimated_mfu": r.estimated_mfu,
        "splash_flops_share": r.kernel_flops_share,
        "counted_share": r.counted_share,
        "min_counted_share": MIN_COUNTED_SHARE,
        "compiler_loops": r.cost.compiler_loops if r.cost else None,
        "cost_complete": r.cost_complete,
        "note": " ".join(([r.note] if r.note else []) + _cost_notes(r)),
        "remedy": None,
    }
