"""Optimizer benchmark: steps each optimizer needs to reach AdamW's held-out loss.

    python benchmarks/bench_optim.py [--data=../shared/data/tinyshakespeare.txt] [--steps=2000]

A char-level model in nanoGPT's "baby Shakespeare" shape (4 layers x 128 wide, 4 heads, block
64, batch 12) trains with AdamW for `--steps`, then with every other optimizer in
`--optimizers` on the same batches, the same schedule shape and the same initial weights. The
held-out loss (the file's last 10%, fixed crops) is measured every `--eval_every` steps; the
result is the first step at which each optimizer reaches AdamW's final held-out loss, as a
fraction of AdamW's steps. Batches are random crops of the text (as nanoGPT samples them), so
the benchmark measures the optimizers, not the data pipeline.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from configs import base  # noqa: E402
from jaxlm import sharding, train  # noqa: E402
from jaxlm import spec as run_spec

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DATA = flags.DEFINE_string(
    "data", os.path.join(_REPO, "..", "shared", "data", "tinyshakespeare.txt"), "A text file."
)
_STEPS = flags.DEFINE_integer("steps", 2000, "AdamW's steps; the others get as many.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "Steps between held-out evaluations.")
_OPTIMIZERS = flags.DEFINE_list("optimizers", ["adamw", "muon", "lion"], "adamw comes first.")
_LR = flags.DEFINE_float("lr", 1e-3, "Peak lr of AdamW (and of the AdamW groups under Muon).")
_MUON_LR = flags.DEFINE_float("muon_lr", 0.02, "Peak Muon step size for the block matrices.")
_LION_LR = flags.DEFINE_float("lion_lr", 2e-4, "Peak Lion lr (Lion wants ~3-10x less).")
_OUT = flags.DEFINE_string("out", "", "Also write the result as JSON here.")

SEQ_LEN, BATCH, VAL_BATCHES = 64, 12, 40


def char_config(optimizer: str, steps: int) -> object:
    """The baby-Shakespeare shape on jaxlm's Llama block (SwiGLU F = 3 D, RoPE, RMSNorm)."""
    c = base.get_config()
    c.model.update(dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=32, d_ff=384))
    c.model.max_seq_len = SEQ_LEN
    c.model.attention = "xla"
    c.train.update(dict(steps=steps, batch_size=BATCH, seq_len=SEQ_LEN))
    c.optim.update(dict(name=optimizer, warmup_steps=100, schedule="cosine", b2=0.99))
    c.optim.lr = _LION_LR.value if optimizer == "lion" else _LR.value
    c.optim.muon.lr = _MUON_LR.value
    c.mesh.shape = (1, 1, 1)
    return c


def crops(ids: np.ndarray, n: int, rng: np.random.RandomState) -> dict[str, np.ndarray]:
    """`n` random windows of SEQ_LEN + 1 characters as one-document rows of the batch contract."""
    starts = rng.randint(0, len(ids) - SEQ_LEN - 1, n)
    windows = np.stack([ids[s : s + SEQ_LEN + 1] for s in starts])  # (n, L + 1)
    return {
        "inputs": windows[:, :-1],
        "targets": windows[:, 1:],
        "segment_ids": np.ones((n, SEQ_LEN), np.int32),
        "positions": np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), (n, SEQ_LEN)).copy(),
        "loss_mask": np.ones((n, SEQ_LEN), np.float32),
    }


def run(optimizer: str, train_ids, val_batches, vocab: int, steps: int) -> list[tuple[int, float]]:
    """[(step, held-out loss)] every `--eval_every` steps of one optimizer."""
    import jax

    config = char_config(optimizer, steps)
    setup = train.Setup(
        run_spec.build(config), vocab, sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    )
    state, step_fn, eval_fn = setup.init_state(), setup.jit_train_step(), setup.jit_eval_step()
    rng = np.random.RandomState(0)  # the same batches for every optimizer
    curve = []
    for i in range(1, steps + 1):
        state, _ = step_fn(state, sharding.host_to_global(crops(train_ids, BATCH, rng), setup.mesh))
        if i % _EVAL_EVERY.value == 0 or i == steps:
            sums = [
                eval_fn(state["params"], sharding.host_to_global(b, setup.mesh))
                for b in val_batches
            ]
            nll, count = (sum(float(s[k]) for s in sums) for k in ("nll", "count"))
            curve.append((i, nll / count))
            print(f"{optimizer:>6} step {i:>5}: held-out loss {curve[-1][1]:.4f}", flush=True)
    return curve


def main(argv):
    del argv
    if not os.path.isfile(_DATA.value):
        sys.exit(
            f"error: --data={_DATA.value} is not a file (tinyshakespeare.txt is in ../shared/data)."
        )
    if _OPTIMIZERS.value[0] != "adamw":
        sys.exit("error: --optimizers must start with adamw: its final loss is the target.")
    text = open(_DATA.value, encoding="utf-8").read()
    chars = sorted(set(text))
    table = {ch: i for i, ch in enumerate(chars)}
    ids = np.fromiter((table[ch] for ch in text), np.int32, len(text))
    split = int(len(ids) * 0.9)
    val_rng = np.random.RandomState(1234)
    val_batches = [crops(ids[split:], BATCH, val_rng) for _ in range(VAL_BATCHES)]
    results, target = {}, None
    for optimizer in _OPTIMIZERS.value:
        t0 = time.perf_counter()
        curve = run(optimizer, ids[:split], val_batches, len(chars), _STEPS.value)
        target = curve[-1][1] if target is None else target
        reached = next((s for s, loss in curve if loss <= target), None)
        results[optimizer] = dict(
            final_loss=curve[-1][1],
            steps_to_adamw_loss=reached,
            fraction_of_adamw_steps=reached / _STEPS.value if reached else None,
            wall_s=time.perf_counter() - t0,
            curve=curve,
        )
    print(f"\ntarget: AdamW's held-out loss after {_STEPS.value} steps = {target:.4f}")
    print("| optimizer | final held-out loss | steps to AdamW's final loss | fraction | wall s |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        frac = (
            f"{r['fraction_of_adamw_steps']:.2f}" if r["fraction_of_adamw_steps"] else "not reached"
        )
        print(
            f"| {name} | {r['final_loss']:.4f} | {r['steps_to_adamw_loss'] or '-'} | {frac} "
            f"| {r['wall_s']:.0f} |"
        )
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(dict(target=target, steps=_STEPS.value, results=results), f, indent=1)


if __name__ == "__main__":
    from jaxlm import cli

    cli.run_cli(main, require_config=False)
