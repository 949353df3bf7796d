"""The planner's estimate (`jaxlm.estimate.Estimate`) as a plain-text table of 80 columns."""

from __future__ import annotations

import textwrap

from jaxlm.estimate import WIDTH, Estimate, format_bytes, format_count


def _sci(x: float) -> str:
    """Three significant digits and a bare exponent: 3.15e23."""
    mantissa, _, exponent = f"{x:.2e}".partition("e")
    return f"{mantissa}e{int(exponent)}"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds * 1e3:.3g} ms"


def format_table(est: Estimate) -> str:
    """The estimate as a plain-text table no wider than 80 columns."""
    m, p, mem, lay, hw = est.model, est.params, est.memory, est.layout, est.hardware
    mesh = " x ".join(f"{k} {v}" for k, v in lay.mesh_shape.items())
    row = lambda label, value, note="": f"  {label:<24}{value:>16}  {note}".rstrip()  # noqa: E731
    heads = f"{m.n_heads} q / {m.n_kv_heads} kv heads x {m.head_dim}"
    untied = f"input {format_count(p.embedding - p.head)} + head {format_count(p.head)}"
    head = untied if p.head else "tied"
    steps = f"{est.tokens / (lay.batch_size * lay.seq_len):,.0f} steps"
    fit = f"{mem.total / hw.memory_bytes:.0%} of {format_bytes(hw.memory_bytes)} HBM: " + (
        "fits" if mem.fits else "DOES NOT FIT"
    )
    scores = f", L x L scores {format_bytes(mem.attention_scores)}" if mem.attention_scores else ""
    step_time = _duration(lay.batch_size * lay.seq_len / est.tokens_per_second)
    lines = [
        f"{est.name}: {est.chips} x {hw.name}, mesh {mesh} ({lay.preset})",
        "=" * WIDTH,
        "Model",
        row("parameters", format_count(p.total), f"{p.total:,}"),
        row("  embeddings", format_count(p.embedding), head),
        row("  attention", format_count(p.attention), heads),
        row("  MLP", format_count(p.mlp), f"SwiGLU {m.d_model} -> {m.d_ff}"),
        row("  norms", format_count(p.norms)),
        row("shape", f"{m.n_layers} layers", f"d_model {m.d_model}, vocab {m.vocab_size:,}"),
        "Compute",
        row("FLOPs/token, 6N", _sci(6 * p.total), "N = all parameters"),
        row("FLOPs/token, model", _sci(est.flops_per_token), "6 x matmul weights + attention"),
        row("  of which attention", _sci(est.attention_flops_per_token), "6 x layers x H x E x L"),
        row("training tokens", _sci(est.tokens), f"{steps} x {lay.batch_size:,} x {lay.seq_len:,}"),
        row("training FLOPs, 6ND", _sci(est.train_flops_6nd)),
        row("training FLOPs, model", _sci(est.train_flops), "what MFU is measured against"),
        f"Memory per device   micro-batch {mem.micro_batch} x {lay.seq_len:,}, "
        f"remat {m.remat}, {m.dtype}, {m.attention} attention",
        row("parameters", format_bytes(mem.params), "fp32"),
        row(
            "gradients", format_bytes(mem.grads), "+ accumulator" if lay.grad_accum > 1 else "fp32"
        ),
        row("optimizer state", format_bytes(mem.opt_state), "AdamW moments, fp32"),
        row("activations", format_bytes(mem.activations)),
        row("  saved by each layer", format_bytes(mem.saved_per_layer), f"x {m.n_layers} layers"),
    ]
    if mem.weights_kept:
        lines.append(
            row("  weights kept for bwd", format_bytes(mem.weights_kept), "casts, gathers")
        )
    lines += [
        row("  working set", format_bytes(mem.working), f"{mem.working_kind}{scores}"),
        row("total", format_bytes(mem.total), fit),
        f"Time & cost   MFU {est.mfu:.0%} of {hw.peak_flops / 1e12:,.0f} TFLOP/s per chip",
        row("throughput", f"{format_count(est.tokens_per_second)} tok/s", f"{step_time} per step"),
        row("wall time", _duration(est.seconds)),
        row(
            "chip-hours",
            f"{est.chip_hours:,.0f}" if est.chip_hours >= 10 else f"{est.chip_hours:.2g}",
        ),
    ]
    if est.cost is not None:
        cost = f"${est.cost:,.0f}" if est.cost >= 100 else f"${est.cost:.2f}"
        lines.append(row("cost", cost, f"at ${est.price_per_chip_hour:g} per chip-hour"))
    lines += [
        "Chinchilla   compute-optimal at ~20 tokens per parameter",
        row(
            "optimal tokens",
            _sci(est.chinchilla_tokens),
            f"20 x {format_count(p.total)} parameters",
        ),
        row(
            "this run",
            f"{est.tokens / est.chinchilla_tokens:.2f}x",
            f"{est.tokens / p.total:,.1f} tokens per parameter",
        ),
        row(
            "optimal size, budget",
            format_count(est.chinchilla_params),
            f"for {_sci(est.train_flops_6nd)} FLOPs (6ND)",
        ),
        "Suggestions",
    ]
    lines = [line[:WIDTH] for line in lines]
    for s in est.suggestions:
        lines += textwrap.wrap(s, WIDTH, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(lines)
