"""The compile report of `jaxlm.aot` as text and data: the table `tools/compile.py` prints (one
per program, estimates labelled as such), the one-row-per-program summary of a staged run, and
the JSON form that docs/perf.md's tables and sweeps read.
"""

from __future__ import annotations

from typing import Any

from jaxlm import aot, estimate, estimate_table


def cost_notes(r: aot.Report) -> list[str]:
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
            f"(those outside splash attention), under the {aot.MIN_COUNTED_SHARE:.0%} needed to "
            f"trust it: {cause}. No step time is derived from it."
        )
    return notes


def format_report(r: aot.Report, width: int = estimate.WIDTH) -> str:
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
    of_stage = f", {r.stage}" if r.stage else ""
    text(f"{r.name}{of_stage} on {r.target.name}: {r.chips} x {r.target.chip.name} ({where})", "  ")
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
    for note in ([r.note] if r.note else []) + cost_notes(r):
        lines.extend(estimate_table.wrap(note, width, " " * 8, "  note: "))
    return "\n".join(lines)


def format_programs(reports: list[aot.Report], width: int = estimate.WIDTH) -> str:
    """One row per distinct program of a run (`compile_run`): its first stage, shapes, memory
    per device and compile time; the program that needs the most memory decides "fits"."""
    worst = max(reports, key=lambda r: r.total_memory)
    first = reports[0]
    lines = [f"{first.name} on {first.target.name}: {len(reports)} step programs", "=" * width]
    lines.append(
        f"{'program':<24}{'batch x length':>16}{'micro':>7}{'memory':>12}{'HBM':>6}{'s':>6}"
    )
    for r in reports:
        lines.append(
            f"{r.stage or 'the run':<24}{f'{r.batch_size:,} x {r.seq_len:,}':>16}"
            f"{r.grad_accum:>7}{estimate.format_bytes(r.total_memory):>12}"
            f"{r.total_memory / r.hbm:>6.0%}{r.compile_seconds:>6.0f}"
        )
    verdict = "every program fits" if worst.fits else f"{worst.stage} DOES NOT FIT"
    lines.append(f"{verdict}; the largest, {worst.stage}, in full below:")
    return "\n".join(lines)


def report_dict(r: aot.Report) -> dict[str, Any]:
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
        "stage": r.stage,
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
        "min_counted_share": aot.MIN_COUNTED_SHARE,
        "compiler_loops": r.cost.compiler_loops if r.cost else None,
        "cost_complete": r.cost_complete,
        "note": " ".join(([r.note] if r.note else []) + cost_notes(r)),
        "remedy": None,
    }
