"""The planner's estimate (`jaxlm.estimate.Estimate`) as a plain-text table of 80 columns.

`row` and `wrap` lay out every table the tools print (this one and `jaxlm.aot`'s report): a
note too long for its column continues on the next line under the note column, and a heading
too long for the width continues indented; no word is ever cut.
"""

from __future__ import annotations

import textwrap

from jaxlm import estimate_moe
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


def wrap(text: str, width: int = WIDTH, indent: str = "", first: str = "") -> list[str]:
    """`text` in lines of at most `width` columns (a longer word keeps its own line, uncut):
    the first starts with `first`, the rest with `indent`."""
    return textwrap.wrap(
        text,
        width,
        initial_indent=first,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,  # "micro-batch" stays one word
    ) or [first.rstrip()]


def row(label: str, value: str, note: str, columns: tuple[int, int], width: int) -> list[str]:
    """One table row: label and value in columns of the given widths, then the note, wrapped
    under its own column (or, where that column would be narrower than 24, under the row)."""
    head = f"  {label:<{columns[0]}}{value:>{columns[1]}}"
    if not note:
        return [head]
    column = len(head) + 2
    if width - column < 24:
        return [head, *wrap(note, width, " " * 6, " " * 6)]
    lines = wrap(note, width - column)
    return [f"{head}  {lines[0]}", *(" " * column + line for line in lines[1:])]


def format_table(est: Estimate, width: int = WIDTH) -> str:
    """The estimate as a plain-text table no wider than `width` columns."""
    m, p, mem, lay, hw = est.model, est.params, est.memory, est.layout, est.hardware
    mesh = " x ".join(f"{k} {v}" for k, v in lay.mesh_shape.items())

    def cell(label: str, value: str, note: str = "") -> list[str]:
        return row(label, value, note, (24, 16), width)

    heads = f"{m.n_heads} q / {m.n_kv_heads} kv heads x {m.head_dim}"
    untied = f"input {format_count(p.embedding - p.head)} + head {format_count(p.head)}"
    head = untied if p.head else "tied"
    steps = f"{est.tokens / (lay.batch_size * lay.seq_len):,.0f} steps"
    fit = f"{mem.total / hw.memory_bytes:.0%} of {format_bytes(hw.memory_bytes)} HBM: " + (
        "fits" if mem.fits else "DOES NOT FIT"
    )
    scores = f", L x L scores {format_bytes(mem.attention_scores)}" if mem.attention_scores else ""
    step_time = _duration(lay.batch_size * lay.seq_len / est.tokens_per_second)
    mlp = f"SwiGLU {m.d_model} -> {m.d_ff}"
    if m.moe:  # the sparse layers' experts, and the parameters a token actually meets
        sparse = estimate_moe.sparse_layers(m)
        mlp = f"{m.moe.n_experts} experts of {m.moe.expert_d_ff} in {sparse} layers"
    lines: list[str] = [
        *wrap(f"{est.name}: {est.chips} x {hw.name}, mesh {mesh} ({lay.preset})", width, "  "),
        "=" * width,
        "Model",
        *cell("parameters", format_count(p.total), f"{p.total:,}"),
        *cell("  embeddings", format_count(p.embedding), head),
        *cell("  attention", format_count(p.attention), heads),
        *cell("  MLP", format_count(p.mlp), mlp),
        *cell("  norms", format_count(p.norms)),
    ]
    if m.moe:
        routed = f"{p.active:,}: top-{m.moe.top_k} of {m.moe.n_experts} experts"
        lines += cell("active per token", format_count(p.active), routed)
    lines += [
        *cell("shape", f"{m.n_layers} layers", f"d_model {m.d_model}, vocab {m.vocab_size:,}"),
        "Compute",
        *cell(
            "FLOPs/token, 6N",
            _sci(6 * p.active),
            "N = active parameters" if m.moe else "N = all parameters",
        ),
        *cell("FLOPs/token, model", _sci(est.flops_per_token), "6 x matmul weights + attention"),
        *cell(
            "  of which attention", _sci(est.attention_flops_per_token), "6 x layers x H x E x L"
        ),
        *cell(
            "training tokens", _sci(est.tokens), f"{steps} x {lay.batch_size:,} x {lay.seq_len:,}"
        ),
        *cell("training FLOPs, 6ND", _sci(est.train_flops_6nd)),
        *cell("training FLOPs, model", _sci(est.train_flops), "what MFU is measured against"),
        *wrap(
            f"Memory per device   micro-batch {mem.micro_batch} x {lay.seq_len:,}, "
            f"remat {m.remat}, {m.dtype}, {m.attention} attention",
            width,
            " " * 20,
        ),
        *cell("parameters", format_bytes(mem.params), "fp32"),
    ]
    if mem.expert_params:
        group = estimate_moe.expert_group(m, lay)
        split = f"{m.moe.n_experts // group} whole experts per device" if group > 1 else "split"
        lines += cell("  routed experts", format_bytes(mem.expert_params), split)
    lines += [
        *cell(
            "gradients", format_bytes(mem.grads), "+ accumulator" if lay.grad_accum > 1 else "fp32"
        ),
        *cell("optimizer state", format_bytes(mem.opt_state), "AdamW moments, fp32"),
        *cell("activations", format_bytes(mem.activations)),
        *cell("  saved by each layer", format_bytes(mem.saved_per_layer), f"x {m.n_layers} layers"),
    ]
    if mem.weights_kept:
        lines += cell("  weights kept for bwd", format_bytes(mem.weights_kept), "casts, gathers")
    lines += cell("  working set", format_bytes(mem.working), f"{mem.working_kind}{scores}")
    if mem.dispatch:
        rows = f"{estimate_moe.dispatch_rows(m, lay):,} token-expert rows"
        lines += cell("    MoE dispatch", format_bytes(mem.dispatch), rows)
    lines += [
        *cell("total", format_bytes(mem.total), fit),
        *wrap(
            f"Time & cost   MFU {est.mfu:.0%} of {hw.peak_flops / 1e12:,.0f} TFLOP/s per chip",
            width,
            " " * 14,
        ),
        *cell(
            "throughput", f"{format_count(est.tokens_per_second)} tok/s", f"{step_time} per step"
        ),
        *cell("wall time", _duration(est.seconds)),
        *cell(
            "chip-hours",
            f"{est.chip_hours:,.0f}" if est.chip_hours >= 10 else f"{est.chip_hours:.2g}",
        ),
    ]
    if est.cost is not None:
        cost = f"${est.cost:,.0f}" if est.cost >= 100 else f"${est.cost:.2f}"
        lines += cell("cost", cost, f"at ${est.price_per_chip_hour:g} per chip-hour")
    lines += [
        "Chinchilla   compute-optimal at ~20 tokens per parameter",
        *cell(
            "optimal tokens",
            _sci(est.chinchilla_tokens),
            f"20 x {format_count(p.total)} parameters",
        ),
        *cell(
            "this run",
            f"{est.tokens / est.chinchilla_tokens:.2f}x",
            f"{est.tokens / p.total:,.1f} tokens per parameter",
        ),
        *cell(
            "optimal size, budget",
            format_count(est.chinchilla_params),
            f"for {_sci(est.train_flops_6nd)} FLOPs (6ND)",
        ),
        "Suggestions",
    ]
    for s in est.suggestions:
        lines += wrap(s, width, "    ", "  - ")
    return "\n".join(lines)
