"""FIM benchmark: a FIM-trained tiny model against the same model trained causally on the same
tokens, scored on filling the middle of held-out standard-library functions.

    python benchmarks/bench_fim.py [--steps=300] [--functions=400] [--workdir=/tmp/bench_fim]

Both runs use one prepared corpus (the standard library, tokenized with the FIM sentinels), the
same seed, model, batches of documents and step count; the FIM run rearranges `--fim_rate` of
its documents (half PSM, half SPM). A run already complete in `--workdir` is only evaluated
(jaxlm resumes it at its last step), so runs can be shared between calls. Held-out functions
come from the held-out split's files (never trained on): each function or method of 3-40 lines
gets a middle of 1-3 whole lines of its body (chosen by a fixed seed), the rest is prefix and
suffix. Middle-span loss is the mean nll of the middle's tokens (EOS not counted), exact match
the share of middles whose every token is the argmax (what greedy decoding would write). Both
models are scored on three layouts: PSM `<fim_prefix> prefix <fim_suffix> suffix <fim_middle>
middle`, SPM `<fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle`, and `prefix middle`
(left to right: what a causal model is used with, without the suffix).
"""

import ast
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from configs import tiny  # noqa: E402
from jaxlm import loop, objectives, sharding, train  # noqa: E402
from jaxlm import spec as run_spec
from jaxlm.data import manifest as manifest_lib  # noqa: E402
from jaxlm.data import pipeline  # noqa: E402
from jaxlm.data import prepare as prepare_lib  # noqa: E402
from jaxlm.evaluate import trained as trained_lib  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 300, "Training steps of each run.")
_FUNCTIONS = flags.DEFINE_integer("functions", 400, "Held-out functions to score (at most).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_fim", "Where the two runs are written.")
_OUT = flags.DEFINE_string("out", "", "Also write the result as JSON here.")
_FIM_RATE = flags.DEFINE_float("fim_rate", 0.5, "Share of the FIM run's documents rearranged.")
_SCORE_ONLY = flags.DEFINE_bool(
    "score_only", False, "Score the runs already in --workdir (same --steps) instead of training."
)

SEQ_LEN, BATCH = 256, 16


def bench_config(objective: str, steps: int):
    """A small model on the tiny recipe's data (2 layers x 128: minutes per run on a CPU)."""
    c = tiny.get_config()
    c.name = f"bench_fim_{objective}"
    c.objective = objective
    c.objectives.fim_rate = _FIM_RATE.value
    c.model.update(dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384))
    c.model.attention = "xla"
    c.train.update(dict(steps=steps, batch_size=BATCH, seq_len=SEQ_LEN, log_every=50))
    c.optim.warmup_steps = min(30, steps // 10)
    c.eval.update(dict(every=0, max_batches=4, next_line_examples=0))
    c.checkpoint.every = steps
    c.sample.max_tokens = 0
    c.mesh.shape = (1, 1, 1)
    return c


def heldout_functions(manifest: dict, tok, n: int) -> list[tuple[str, str, str]]:
    """(prefix, middle, suffix) texts from the held-out files' functions, middles whole lines."""
    rng = np.random.RandomState(0)
    out = []
    for ids in pipeline.first_documents(manifest, 10**6, split="val"):
        text = tok.decode(ids[:-1])
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first, last = node.lineno - 1, node.end_lineno  # the function's lines [first, last)
            body = node.body[0].lineno - 1  # middles start inside the body
            if not 3 <= last - first <= 40 or last - body < 2:
                continue
            start = rng.randint(body, last - 1)
            end = min(last, start + rng.randint(1, 4))
            fn = lines[first:last]
            pre, mid, suf = (
                "".join(fn[: start - first]),
                "".join(fn[start - first : end - first]),
                "".join(fn[end - first :]),
            )
            if mid.strip():
                out.append((pre, mid, suf))
    order = rng.permutation(len(out))[:n]
    return [out[i] for i in sorted(order)]


def rows(tok, examples, layout: str) -> list[tuple[list[int], list[int]]]:
    """(tokens, scored) per example: `scored` marks the positions whose next token is middle."""
    pre_id, mid_id, suf_id = (tok.piece_to_id(p) for p in objectives.FIM_PIECES)
    out = []
    for pre, mid, suf in examples:
        p, m, s = tok.encode(pre), tok.encode(mid), tok.encode(suf)
        if layout == "psm":
            head = [tok.bos_id, pre_id, *p, suf_id, *s, mid_id]
        elif layout == "spm":  # the prefix flows straight into the middle
            head = [tok.bos_id, pre_id, suf_id, *s, mid_id, *p]
        else:  # left to right: prefix, then the middle
            head = [tok.bos_id, *p]
        tokens = head + m
        out.append((tokens, [0] * (len(head) - 1) + [1] * len(m)))
    return out


def score(setup, params, examples: list[tuple[list[int], list[int]]]) -> dict[str, float]:
    """Middle-span loss, token accuracy and exact match of `examples` (one per row)."""
    step = sharding.jit(train.make_eval_step(setup.graphdef, detail=True), setup.mesh_rules)
    sums: dict[str, float] = {}
    kept = [e for e in examples if len(e[0]) <= SEQ_LEN + 1]
    for i in range(0, len(kept), BATCH):
        chunk = kept[i : i + BATCH]
        batch = {k: np.zeros((BATCH, SEQ_LEN), np.int32) for k in ("inputs", "targets")}
        batch["segment_ids"] = np.zeros((BATCH, SEQ_LEN), np.int32)
        batch["positions"] = np.zeros((BATCH, SEQ_LEN), np.int32)
        batch["loss_mask"] = np.zeros((BATCH, SEQ_LEN), np.float32)
        for r, (tokens, scored) in enumerate(chunk):
            n = len(tokens) - 1
            batch["inputs"][r, :n], batch["targets"][r, :n] = tokens[:-1], tokens[1:]
            batch["segment_ids"][r, :n], batch["positions"][r, :n] = 1, np.arange(n)
            batch["loss_mask"][r, :n] = scored[:n]
        found = step(params, sharding.host_to_global(batch, setup.mesh))
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in found.items()}
    return {
        "middle_loss": sums["nll"] / sums["count"],
        "middle_token_accuracy": sums["correct"] / sums["count"],
        "middle_exact_match": sums["exact"] / sums["spans"],
        "functions": len(kept),
        "middle_tokens": sums["count"],
    }


def main(argv):
    del argv
    fim_config = bench_config("fim", _STEPS.value)
    t0 = time.perf_counter()
    manifest_path = prepare_lib.prepare(fim_config.data, objectives.tokenizer_config(fim_config))
    manifest = manifest_lib.load(manifest_path)
    results = {}
    for objective in ("causal", "fim"):
        config = bench_config(objective, _STEPS.value)
        config.data.manifest = manifest_path  # one corpus and tokenizer for both
        workdir = os.path.join(_WORKDIR.value, objective)
        t = time.perf_counter()
        summary = {} if _SCORE_ONLY.value else loop.run(config, workdir)
        trained = trained_lib.load_trained(workdir)
        tok = trained.tokenizer
        if objective == "causal":
            examples = heldout_functions(manifest, tok, _FUNCTIONS.value)
        setup = train.Setup(
            run_spec.build(config), trained.setup.model_cfg.vocab_size, trained.setup.mesh
        )
        results[objective] = {
            "train_s": time.perf_counter() - t,
            "final_train_loss": summary.get("train_loss"),
            **{
                layout: score(setup, trained.params, rows(tok, examples, layout))
                for layout in ("psm", "spm", "left_to_right")
            },
        }
    results["steps"], results["tokens"] = _STEPS.value, _STEPS.value * BATCH * SEQ_LEN
    results["wall_s"] = time.perf_counter() - t0
    print(json.dumps(results, indent=2))
    first = results["fim"]["psm"]
    print(
        f"middle-span loss on {first['functions']} held-out functions "
        f"({first['middle_tokens']:.0f} tokens), {results['tokens']:,} training tokens each:"
    )
    print("| model | PSM | SPM | prefix only (left to right) |\n| --- | ---: | ---: | ---: |")
    for objective in ("fim", "causal"):
        cells = [
            f"{r['middle_loss']:.3f} ({r['middle_token_accuracy']:.1%}, "
            f"exact {r['middle_exact_match']:.1%})"
            for r in (results[objective][k] for k in ("psm", "spm", "left_to_right"))
        ]
        print(f"| {objective} | " + " | ".join(cells) + " |")
    if _OUT.value:
        with open(_OUT.value, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    from jaxlm import cli

    cli.run_cli(main, require_config=False)
