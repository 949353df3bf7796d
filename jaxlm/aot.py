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
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
import time
from typing import Any

import jax

from jaxlm import estimate, hardware, sharding, train, validate
from jaxlm.errors import ConfigError


class DoesNotFit(ConfigError):
    """The step needs more memory per chip than the target has."""


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per-device figures of one train step from the compiler's cost analysis."""

    flops: float
    seconds: float | None  # the compiler's estimate; None where it gives none
    bytes_accessed: float


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
    def cost_complete(self) -> bool:
        """Whether the compiler's cost model saw the whole step. It cannot count fewer FLOPs
        than the model's matmuls need (recomputation only adds), unless it counted a loop of
        its own once: on big FSDP meshes the TPU compiler splits gathered matmuls into loops
        (windowed einsums) whose bodies its cost analysis counts a single time. Splash
        attention is a custom call it does not count at all, so its share is left out."""
        if not self.cost:
            return False
        m = self.model
        expected = self.model_flops_per_step
        if m.attention == "splash":
            per_token = 6 * m.n_layers * m.n_heads * m.head_dim * self.seq_len
            expected -= per_token * self.tokens_per_step
        return self.cost.flops * self.chips >= 0.9 * expected

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
        raise _does_not_fit(
            planned,
            target,
            f"its parameters and optimizer state alone take {estimate.format_bytes(state)} per "
            f"chip of {hbm}",
        )
    if target.platform != "tpu":
        if planned.memory.total > target.chip.memory_bytes:
            raise _does_not_fit(
                planned,
                target,
                f"the planner puts the step at {estimate.format_bytes(planned.memory.total)} per "
                f"GPU of {hbm}",
            )
        return _export_cuda(config, vocab, mesh, setup, target, common)

    start = time.perf_counter()
    compiled = _compile(setup, target, planned)
    seconds = time.perf_counter() - start
    memory = estimate.compiled_memory(compiled)
    if memory["total"] > target.chip.memory_bytes:
        raise _does_not_fit(
            planned,
            target,
            f"the TPU compiler needs {estimate.format_bytes(memory['total'])} per chip of "
            f"{hbm} HBM",
        )
    if not with_cost:
        cost, method = None, ""
    elif setup.model_cfg.scan_layers or t.grad_accum > 1:  # loops XLA would cost once
        cost = _extrapolated_cost(config, vocab, mesh, target)
        method = "extrapolated from 1 and 2 unrolled layers"
    else:
        cost, method = _cost(compiled), "direct"
    return Report(
        model=setup.model_cfg,
        compile_seconds=seconds,
        memory=memory,
        cost=cost,
        cost_method=method,
        **common,
    )


def _compile(setup: train.Setup, target: hardware.Target, planned: estimate.Estimate) -> Any:
    """The TPU executable of the step; an out-of-memory compile becomes one sentence."""
    lowered = setup.lower_train_step()
    try:
        return lowered.compile()
    except Exception as e:  # XLA raises its own runtime error type; only OOM is translated
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
            raise
        # e.g. "... HLO temporaries (44.34G) exceeds available HBM (15.75G)."
        sizes = re.findall(r"\(([\d.]+[KMGT]?)\)", message)
        need = f"{sizes[0]}B of temporaries against {sizes[1]}B" if len(sizes) >= 2 else "more"
        raise _does_not_fit(
            planned, target, f"the TPU compiler needs {need} of HBM per chip"
        ) from None


def _does_not_fit(planned: estimate.Estimate, target: hardware.Target, reason: str) -> DoesNotFit:
    """One sentence: which step, which target, why, and the planner's cheapest remedy."""
    return DoesNotFit(f"{planned.name} does not fit on {target.name}: {reason}; {_remedy(planned)}")


def _remedy(planned: estimate.Estimate) -> str:
    """The planner's cheapest change that fits, as the end of a sentence."""
    for line in planned.suggestions:
        label, _, verdict = line.partition(" -> ")
        if verdict.strip().endswith("fits"):
            size = " ".join(verdict.split()[:2])
            return f"the cheapest fix the planner finds is {label.strip()} ({size} per chip)."
    for line in planned.suggestions:
        match = re.match(r"--chips=(\d+) fits with (.*)\.", line)
        if match:
            chips, how = int(match.group(1)), match.group(2)
            chip = planned.hardware
            size = f"{chip.name.split()[-1].lower()}-{chips * chip.cores_per_chip}"
            slice_name = f" (--target={size})" if chip.platform == "tpu" else ""
            return f"it needs {chips} chips{slice_name}, with {how}."
    return "shorten train.seq_len or use more chips."


def _cost(compiled: Any) -> Cost:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    seconds = analysis.get("optimal_seconds")
    return Cost(
        flops=float(analysis.get("flops", 0.0)),
        seconds=float(seconds) if seconds and seconds > 0 else None,
        bytes_accessed=float(analysis.get("bytes accessed", 0.0)),
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
        costs.append(_cost(setup.lower_train_step().compile()))
    one, two = costs
    n, accum = config.model.n_layers, t.grad_accum

    def whole(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else accum * (a + (n - 1) * (b - a))

    return Cost(
        flops=whole(one.flops, two.flops),
        seconds=whole(one.seconds, two.seconds),
        bytes_accessed=whole(one.bytes_accessed, two.bytes_accessed),
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


def format_report(r: Report) -> str:
    """The report as a plain-text table of 80 columns; estimates are labelled as such."""
    fmt_b, fmt_n = estimate.format_bytes, estimate.format_count
    row = lambda label, value, note="": f"  {label:<30}{value:>14}  {note}".rstrip()  # noqa: E731
    m = r.model
    mesh = " x ".join(f"{k} {v}" for k, v in r.mesh_shape.items())
    where = f"topology {r.target.topology}" if r.target.platform == "tpu" else "CUDA export"
    layers = f"{m.n_layers} layers {'scanned' if m.scan_layers else 'unrolled'}"
    shards = r.mesh_shape["data"] * r.mesh_shape["fsdp"]
    micro = r.batch_size // (r.grad_accum * shards)
    lines = [
        f"{r.name} on {r.target.name}: {r.chips} x {r.target.chip.name} ({where})",
        "=" * estimate.WIDTH,
        f"Step   mesh {mesh} ({r.preset}), batch {r.batch_size:,} x {r.seq_len:,} tokens,",
        f"       grad_accum {r.grad_accum} (micro-batch {micro} per device), {m.dtype},",
        f"       remat {m.remat}, {m.attention} attention, {layers}",
    ]
    if r.memory:
        mem = r.memory
        lines += [
            "Memory per device (the TPU compiler's buffer assignment)",
            row("arguments", fmt_b(mem["arguments"]), "parameters, optimizer state, batch"),
            row("outputs", fmt_b(mem["outputs"])),
            row("aliased (donated state)", "-" + fmt_b(mem["aliased"])),
            row("temporaries", fmt_b(mem["temp"]), "activations, gradients, workspace"),
        ]
    else:
        lines.append("Memory per device (no CUDA compiler off-GPU: the planner's estimate)")
    fit = f"{r.total_memory / r.hbm:.0%} of {fmt_b(r.hbm)} HBM: " + (
        "fits" if r.fits else "DOES NOT FIT"
    )
    lines.append(row("total", fmt_b(r.total_memory), fit))
    if r.memory:
        gap = r.planner_memory / r.memory["total"] - 1
        lines.append(row("planner's estimate", fmt_b(r.planner_memory), f"{gap:+.0%} vs compiler"))
    verb = "compile" if r.target.platform == "tpu" else "export"
    lines += ["Compute per step", row(f"{verb} time", f"{r.compile_seconds:,.0f} s")]
    lines.append(row("model FLOPs, all chips", f"{r.model_flops_per_step:.3g}", "what MFU counts"))
    if r.cost:
        lines.append(
            row("compiler FLOPs, all chips", f"{r.cost.flops * r.chips:.3g}", r.cost_method)
        )
        if not r.cost_complete:
            share = r.cost.flops * r.chips / r.model_flops_per_step
            lines.append(row("step time (compiler est.)", "n/a", f"cost model saw {share:.0%}"))
            r = dataclasses.replace(
                r,
                note=(r.note + " " if r.note else "")
                + (
                    f"The compiler's cost analysis counted {share:.0%} of the model's FLOPs: it "
                    "counts the body of each loop once, including loops it makes itself (windowed "
                    "einsums on large FSDP meshes), so no step time is derived from it."
                ),
            )
        elif r.cost.seconds:
            lines += [
                row("step time (compiler est.)", f"{r.cost.seconds:.3g} s", "an estimate"),
                row("tokens/s (from that est.)", fmt_n(r.estimated_tokens_per_second)),
                row(
                    "MFU (from that est.)",
                    f"{r.estimated_mfu:.0%}",
                    f"of {r.target.chip.peak_flops / 1e12:,.0f} TFLOP/s per chip",
                ),
            ]
        else:
            lines.append(row("step time (compiler est.)", "n/a", "the compiler gave none"))
    lines = [line[: estimate.WIDTH] for line in lines]
    if r.note:
        lines += textwrap.wrap(r.note, estimate.WIDTH, initial_indent="  note: ")
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
        "cost_complete": r.cost_complete,
        "note": r.note,
    }
