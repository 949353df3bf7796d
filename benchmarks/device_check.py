"""Device check for whoever has a GPU: cuDNN vs XLA attention, then training-step benchmarks.

    pip install -e . "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"
    python benchmarks/device_check.py --out=runs/device_check

Time on one H100/H200: 5-7 minutes, estimated, not measured (no GPU has run it yet): about a
minute of checks, then four benchmarks of ~20 s of steps behind a 30-90 s compile each. The
JSON records each part's seconds; `--configs=llama_1b` reruns one benchmark alone. It
writes `device_check.json` (every number) and `device_check.md` (the tables, also printed)
under --out, rewritten after each part so a run cut short keeps what it measured. It exits 1
if a check fails, a benchmark fails, or "cudnn" did not lower to cuDNN's fused kernel.

1. Checks: `jax.nn.dot_product_attention` with implementation "cudnn" vs "xla" on llama_1b's
   attention shapes (GQA, 32 query / 8 kv heads of 64, L=2048) in bf16, masked by
   `jaxlm.model.attention_mask` over packed documents and a padded tail: outputs and gradients
   w.r.t. q, k, v. Then a small jaxlm model (bf16, attention "cudnn" vs "xla"): logits and the
   training loss's gradients w.r.t. every parameter. Both sides are also compared with an fp32
   XLA reference (full-precision matmuls) on the same bf16-rounded inputs.
2. Benchmarks: benchmarks/bench.py's `bench` on configs/gpt2_124m.py and configs/llama_1b.py (bf16),
   attention xla and cudnn: step time, tokens/s and MFU against the chip's bf16 peak
   (`jaxlm.metrics.peak_flops_per_device`). Batch sizes are flags, sized so that both attention
   kinds fit an 80 GB H100 (planner, tools/estimate.py: at most 63 GiB).

Tolerances, relative to max|fp32 reference| of each tensor: bf16 keeps 8 significant bits, a
rounding error of at most u = 2^-8. Each kernel rounds the softmax probabilities to bf16 before
the P.V matmul and rounds its output; the probabilities sum to one, so each output is within
about 2u of the largest exact value, and two kernels that round at different points (cuDNN's
online softmax, XLA's full one) within 4u of each other: the output tolerance. The backward pass
rounds two more products (dP, dS) and rebuilds rowsum(dO * O) from the bf16 output: 8u for dq,
dk, dv and the model's logits; parameter gradients pass back through every layer: 16u, per
tensor. Measured on CPU (XLA, L=256): bf16 lands within 1u of fp32, while a mask leaking across
documents, a 1/E softmax scale or wrongly grouped kv heads move results 14-90x the tolerances.

Without a GPU the GPU-only parts are skipped with a one-line reason each. `--cpu_smoke` runs
every other code path at tiny sizes on CPU, with XLA on both sides of each comparison (cuDNN
needs a GPU); tests/test_device_check.py runs it.
"""

import dataclasses
import datetime
import gc
import importlib
import json
import os
import subprocess
import sys
import time

# JAX's GPU allocator takes 75% of memory by default, too little for the 63 GiB the planner
# gives the largest benchmark below. Set before jax is imported (benchmarks.bench imports it).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import bench  # noqa: E402
from jaxlm import model as model_lib  # noqa: E402
from jaxlm import train, validate  # noqa: E402

_CONFIGS = flags.DEFINE_list("configs", ["gpt2_124m", "llama_1b"], "Configs to benchmark.")
_OUT = flags.DEFINE_string("out", "runs/device_check", "Folder for the JSON and markdown files.")
_SMOKE = flags.DEFINE_bool("cpu_smoke", False, "Tiny sizes on CPU, XLA vs XLA (for the test).")
_ATTN = flags.DEFINE_list("attn_shape", ["2", "2048", "32", "8", "64"], "B,L,H,K,E of check 1.")
_GPT2_BATCH = flags.DEFINE_integer("gpt2_batch", 32, "gpt2_124m sequences of 1,024 per step.")
_GPT2_ACCUM = flags.DEFINE_integer("gpt2_grad_accum", 1, "gpt2_124m micro-batches per step.")
_LLAMA_BATCH = flags.DEFINE_integer("llama_batch", 16, "llama_1b sequences of 2,048 per step.")
# Micro-batch 2, not the recipe's 4: XLA attention saves each layer's L x L probabilities, and
# at 4 the planner puts llama_1b at 101 GiB (63 GiB at 2; gpt2_124m at batch 32: 61 GiB).
_LLAMA_ACCUM = flags.DEFINE_integer("llama_grad_accum", 8, "llama_1b micro-batches per step.")
_STEPS = flags.DEFINE_integer("bench_steps", 10, "Timed steps per benchmark (after 2 warm-up).")
_ROUNDS = flags.DEFINE_integer("bench_rounds", 5, "Timing windows; the median window counts.")

U = 2.0**-8  # bf16 unit roundoff
TOLERANCES = {"out": 4 * U, "dq": 8 * U, "dk": 8 * U, "dv": 8 * U, "logits": 8 * U, "grads": 16 * U}
MD_NAME, JSON_NAME = "device_check.md", "device_check.json"
BENCH_HEADER = "| config | attention | batch x seq (accum) | step ms | tokens/s | MFU % |"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every size a run uses: `gpu_plan()` reads them from the flags, `SMOKE` is tiny."""

    impls: tuple[str, str]  # compared attention implementations (reference side first)
    attn_shape: tuple[int, ...]  # B, L, H, K, E
    model: dict  # ModelConfig fields of the whole-model check (dtype and attention added)
    model_batch: tuple[int, int]  # B, L of the whole-model check
    bench: dict  # config name -> {section: {key: value}} overrides
    bench_impls: tuple[str, ...]
    steps: int
    rounds: int
    vocab: int = 0  # benchmark vocabulary; 0 = the config's tokenizer.vocab_size


CHECK_MODEL = dict(
    vocab_size=512, d_model=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=32, d_ff=512
)
SMOKE_MODEL = dict(d_model=64, n_layers=1, n_heads=4, head_dim=16, d_ff=96, max_seq_len=64)
SMOKE = Plan(
    impls=("xla", "xla"),
    attn_shape=(2, 32, 4, 2, 16),
    model=dict(CHECK_MODEL, vocab_size=61, d_model=64, n_layers=1, n_heads=4, head_dim=16, d_ff=96),
    model_batch=(2, 32),
    bench={
        "gpt2_124m": {
            "model": dict(SMOKE_MODEL, n_kv_heads=4),
            "train": dict(seq_len=32, batch_size=4, grad_accum=1),
        },
        "llama_1b": {
            "model": dict(SMOKE_MODEL, n_kv_heads=1),  # llama_1b's 4 query heads per kv head
            "train": dict(seq_len=32, batch_size=4, grad_accum=2),  # the accumulation path too
        },
    },
    bench_impls=("xla", "cudnn"),  # cudnn rows are skipped off GPU, with their reason
    steps=2,
    rounds=1,
    vocab=61,
)


def gpu_plan() -> Plan:
    """The full-size plan, sized by the flags."""
    return Plan(
        impls=("xla", "cudnn"),
        attn_shape=tuple(int(x) for x in _ATTN.value),
        model=CHECK_MODEL,
        model_batch=(4, 512),
        bench={  # filtered by --configs in main
            "gpt2_124m": {
                "train": dict(batch_size=_GPT2_BATCH.value, grad_accum=_GPT2_ACCUM.value)
            },
            "llama_1b": {
                "train": dict(batch_size=_LLAMA_BATCH.value, grad_accum=_LLAMA_ACCUM.value)
            },
        },
        bench_impls=("xla", "cudnn"),
        steps=_STEPS.value,
        rounds=_ROUNDS.value,
    )


def packed_batch(B: int, L: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of 1-4 random-length documents (the batch contract); row 0 ends in padding (id 0)."""
    rng = np.random.RandomState(seed)
    segment_ids = np.zeros((B, L), np.int32)
    positions = np.zeros((B, L), np.int32)
    for b in range(B):
        cuts = sorted(rng.choice(np.arange(1, L), rng.randint(0, 4), replace=False))
        bounds = [0, *cuts, L]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            segment_ids[b, lo:hi] = s + 1
            positions[b, lo:hi] = np.arange(hi - lo)
    segment_ids[0, L - L // 8 :] = 0  # padding attends only to padding: a mask case of its own
    tokens = rng.randint(0, vocab, (B, L + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": (segment_ids > 0).astype(np.float32),
    }


def compare(a, b, ref, tol: float) -> dict:
    """Max |a - b| over a pytree's leaves, judged per leaf against tol x max|ref leaf|.

    Per leaf, so a tensor of small values (early layers' gradients) is not hidden behind a large
    one. Also reports how far each side is from `ref` in the same relative units. In numpy: the
    leaves are on the host already, and eager jnp ops would compile a kernel per leaf shape.
    """

    def rel(x, y, scale):  # an all-zero reference leaf: any difference counts as 100%
        return float(np.max(np.abs(x - y))) / scale if scale else float(np.any(x != y))

    worst, worst_leaf, a_err, b_err, max_abs = -1.0, "", 0.0, 0.0, 0.0
    leaves = zip(
        jax.tree.leaves_with_path(a), jax.tree.leaves(b), jax.tree.leaves(ref), strict=True
    )
    for (path, x), y, r in leaves:
        x, y, r = (np.asarray(t, np.float32) for t in (x, y, r))
        scale = float(np.max(np.abs(r)))
        max_abs = max(max_abs, float(np.max(np.abs(x - y))))
        a_err, b_err = max(a_err, rel(x, r, scale)), max(b_err, rel(y, r, scale))
        if rel(x, y, scale) > worst:
            worst, worst_leaf = rel(x, y, scale), jax.tree_util.keystr(path)
    return {
        "max_abs_diff": max_abs,
        "relative": worst,  # the worst leaf's max|a - b| / max|ref|
        "worst_leaf": worst_leaf,
        "tolerance": tol,
        "a_vs_ref": a_err,
        "b_vs_ref": b_err,
        "ok": worst <= tol,
    }


def _run_and_lowering(fn, *args) -> tuple:
    """fn(*args) jitted, and whether its program calls cuDNN's fused attention (the check
    would pass trivially if "cudnn" quietly ran XLA's kernel)."""
    jitted = jax.jit(fn)
    uses_cudnn = "cudnn$fmha" in jitted.lower(*args).as_text()
    return jax.device_get(jitted(*args)), uses_cudnn


def _compare_runs(run, impls: tuple[str, str]) -> dict:
    """`run(impl, dtype)` for both implementations in bf16 and for XLA in fp32, compared."""
    (a, _), (b, b_cudnn) = run(impls[0], "bfloat16"), run(impls[1], "bfloat16")
    with jax.default_matmul_precision("float32"):  # no TF32 on GPU: the reference is exact
        ref, _ = run("xla", "float32")
    quantities = {k: compare(a[k], b[k], ref[k], tol) for k, tol in TOLERANCES.items() if k in ref}
    return {"b_uses_cudnn": b_cudnn, "quantities": quantities}


def attention_check(shape: tuple[int, ...], impls: tuple[str, str]) -> dict:
    """Outputs and q/k/v gradients of two attention implementations and an fp32 reference."""
    B, L, H, K, E = shape
    seg = jnp.asarray(packed_batch(B, L, vocab=2)["segment_ids"])
    mask = model_lib.attention_mask(seg, seg)  # (B, 1, L, L): what the model passes
    keys = jax.random.split(jax.random.key(0), 4)
    q, ct = (jax.random.normal(k, (B, L, H, E), jnp.bfloat16) for k in keys[:2])
    k, v = (jax.random.normal(k, (B, L, K, E), jnp.bfloat16) for k in keys[2:])

    def run(impl, dtype):  # the call jaxlm.attention.attend makes for "xla" and "cudnn"
        def fn(q, k, v, ct, mask):
            att = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
                q, k, v, mask=mask, implementation=impl
            )
            out, vjp = jax.vjp(att, q, k, v)
            dq, dk, dv = vjp(ct)  # the gradients of sum(out * ct)
            return {"out": out, "dq": dq, "dk": dk, "dv": dv}

        return _run_and_lowering(fn, *(x.astype(dtype) for x in (q, k, v, ct)), mask)

    return {"shape_BLHKE": list(shape), **_compare_runs(run, impls)}


def model_check(fields: dict, batch_shape: tuple[int, int], impls: tuple[str, str]) -> dict:
    """Logits and loss gradients of one small jaxlm model under two attention implementations."""
    base = model_lib.ModelConfig(**fields)
    params = nnx.to_pure_dict(nnx.state(model_lib.create(base, seed=0)))
    batch = jax.tree.map(jnp.asarray, packed_batch(*batch_shape, vocab=base.vocab_size, seed=1))

    def run(impl, dtype):
        graphdef = nnx.split(
            model_lib.abstract(dataclasses.replace(base, dtype=dtype, attention=impl))
        )[0]

        def fn(params, batch):
            model = nnx.merge(graphdef, params)
            logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
            loss = lambda p: train.loss_sums(graphdef, p, batch)[0]  # noqa: E731  the step's loss
            return {"logits": logits, "grads": jax.grad(loss)(params)}

        return _run_and_lowering(fn, params, batch)

    return {"model": dataclasses.asdict(base), **_compare_runs(run, impls)}


def bench_config(name: str, overrides: dict, impl: str, plan: Plan) -> dict:
    """benchmarks/bench.py's figures for configs/<name>.py with `overrides` and attention `impl`."""
    config = importlib.import_module(f"configs.{name}").get_config()
    config.lock()  # an override naming a key the config lacks fails instead of adding it
    for section, values in overrides.items():
        for key, value in values.items():
            config[section][key] = value
    config.model.attention = impl
    validate.check_config(config)
    vocab = plan.vocab or config.tokenizer.vocab_size
    r = bench.bench(config, plan.steps, plan.rounds, vocab, checkpoint_every=0, split=False)
    t = config.train
    tokens = t.batch_size * t.seq_len
    shape = dict(batch_size=t.batch_size, seq_len=t.seq_len, grad_accum=t.grad_accum)
    return {"config": name, "attention": impl, **shape, "tokens_per_step": tokens, **r}


def markdown(report: dict) -> str:
    """The report's tables, ready to paste into docs/perf.md."""
    meta = report["meta"]
    a, b = meta["impls"]
    lines = [
        f"Device check on {meta['device']} ({meta['platform']}), jax {meta['jax']}, jaxlm "
        f"{meta['commit']}, {meta['time_utc']} UTC: `{meta['command']}`",
        "",
        f"| check | quantity | max abs diff | diff / max ref | tolerance | {a} vs fp32 | "
        f"{b} vs fp32 | ok |",
        "|---" * 8 + "|",
    ]
    for check in ("attention_check", "model_check"):
        result = report.get(check, {})
        if "error" in result:
            lines.append(f"| {check} | {result['error']} |||||| **NO** |")
        for q, c in result.get("quantities", {}).items():
            lines.append(
                f"| {check} | {q} | {c['max_abs_diff']:.3g} | {c['relative']:.3g} | "
                f"{c['tolerance']:.3g} | {c['a_vs_ref']:.3g} | {c['b_vs_ref']:.3g} | "
                f"{'yes' if c['ok'] else '**NO**'} |"
            )
    lines += ["", BENCH_HEADER + " compile s | compiled GB |", "|---" * 8 + "|"]
    for r in report["bench"]:
        shape = f"{r['batch_size']} x {r.get('seq_len', '?')} ({r.get('grad_accum', '?')})"
        if "error" in r:
            lines.append(f"| {r['config']} | {r['attention']} | {shape} | {r['error']} |||||")
            continue
        lines.append(
            f"| {r['config']} | {r['attention']} | {shape} | {r['step_time_s'] * 1e3:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['mfu_pct']:.1f} | {r['compile_s']:.0f} | "
            f"{r.get('compiled_memory_gb', float('nan')):.1f} |"
        )
    peaks = {
        f"{r['peak_tflops_per_s']:,.4g} TFLOP/s ({r['peak_source']})"
        for r in report["bench"]
        if "peak_source" in r
    }
    lines += [f"\nMFU against {p}." for p in sorted(peaks)]
    if report["skipped"]:
        lines += ["", "Skipped:", *(f"- {s}" for s in report["skipped"])]
    return "\n".join(lines) + "\n"


def write(report: dict, out: str) -> None:
    """Writes the JSON and the markdown (again after each part: a cut-short run keeps its data)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, JSON_NAME), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, MD_NAME), "w") as f:
        f.write(markdown(report))


def _commit() -> str:
    try:
        args = ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _attempt(fn, *args) -> dict:
    """fn(*args), or {"error": its first line}: on a rented GPU one failure (an out-of-memory
    config, a shape cuDNN refuses) must not lose the other parts' numbers."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}


def run(plan: Plan, out: str, smoke: bool) -> dict:
    """Runs every part the platform allows; returns (and writes) the report."""
    platform = jax.default_backend()
    report = {
        "meta": {
            "device": jax.devices()[0].device_kind,
            "platform": platform,
            "devices": jax.device_count(),
            "jax": jax.__version__,
            "commit": _commit(),
            "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(["python", *sys.argv]),
            "impls": list(plan.impls),
            "cpu_smoke": smoke,
            "seconds": {},  # per part, to see how the 8-minute budget is spent
        },
        "skipped": [],  # one line per part that did not run, with the reason
        "bench": [],
    }
    no_gpu = f"no GPU here ({platform}); --cpu_smoke runs the rest at tiny sizes"
    if plan.impls[1] != "cudnn":
        report["skipped"].append(f"cuDNN side of the checks: {plan.impls[1]} stands in for it")
    parts = {
        "attention_check": (attention_check, plan.attn_shape, plan.impls),
        "model_check": (model_check, plan.model, plan.model_batch, plan.impls),
    }
    for name, (fn, *args) in parts.items():
        if platform != "gpu" and not smoke:
            report["skipped"].append(f"{name}: {no_gpu}")
            continue
        t0 = time.perf_counter()
        report[name] = _attempt(fn, *args)
        report["meta"]["seconds"][name] = time.perf_counter() - t0
        write(report, out)
    for impl in plan.bench_impls:
        for name, overrides in plan.bench.items():
            if platform != "gpu" and (impl == "cudnn" or not smoke):
                why = "cuDNN attention needs a GPU" if impl == "cudnn" else no_gpu
                report["skipped"].append(f"bench {name} {impl}: {why}")
                continue
            t0 = time.perf_counter()
            row = {"config": name, "attention": impl, **overrides.get("train", {})}
            row.update(_attempt(bench_config, name, overrides, impl, plan))
            report["bench"].append(row)
            report["meta"]["seconds"][f"bench {name} {impl}"] = time.perf_counter() - t0
            gc.collect()  # drop the last run's state before the next one allocates its own
            write(report, out)
    checks = [report[p] for p in parts if p in report]
    report["ok"] = (
        all("error" not in c for c in checks + report["bench"])
        and all(q["ok"] for c in checks for q in c["quantities"].values())
        and (plan.impls[1] != "cudnn" or all(c["b_uses_cudnn"] for c in checks))
    )
    write(report, out)
    return report


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if _SMOKE.value:
        jax.config.update("jax_platforms", "cpu")  # before the first backend call
    plan = SMOKE if _SMOKE.value else gpu_plan()
    unknown = set(_CONFIGS.value) - set(plan.bench)
    if unknown:
        sys.exit(f"error: --configs takes {', '.join(plan.bench)}, not {', '.join(unknown)}.")
    plan = dataclasses.replace(plan, bench={k: plan.bench[k] for k in _CONFIGS.value})
    report = run(plan, _OUT.value, _SMOKE.value)
    print(markdown(report), end="")
    print(f"wrote {os.path.join(_OUT.value, JSON_NAME)} and {MD_NAME}")
    if not report["ok"]:
        sys.exit("error: a check failed or a benchmark did not run; see the tables above.")


if __name__ == "__main__":
    from jaxlm import cli

    cli.run_cli(main, require_config=False)
