"""jaxlm against nanoGPT itself on char-level Shakespeare, same machine, same sitting: the wall
time jaxlm's best recipe takes to reach the validation loss nanoGPT ends its 2,000 steps at.

    python benchmarks/bench_nanogpt.py --nanogpt_dir=/path/to/nanoGPT \\
        [--data=../shared/data/tinyshakespeare.txt] [--jaxlm_steps=600] [--eval_every=25]

nanoGPT (a checkout of karpathy/nanoGPT; its `data/shakespeare_char/prepare.py` must have run,
with this `--data` as its input.txt) trains with its README's CPU command: 4 layers, 4 heads,
128 wide, block 64, batch 12, 2,000 iterations, no dropout, `--compile=False`, except that it
evaluates with 200 batches (not 20) and only at the start and the end, so its final validation
loss is a less noisy target. Its training time is the sum of the iteration times it prints,
without the two evaluating iterations (each counted as the median iteration instead).

jaxlm trains bench_optim's model of the same shape (Llama block: SwiGLU F = 3D, RoPE, RMSNorm)
with `--jaxlm_steps` steps of Muon (a whole warmup-cosine schedule of that length) on random
crops of the same 90% split, and evaluates the same way as nanoGPT's `estimate_loss`: the mean
loss of 200 random batches of 12 x 64 from the last 10% (fixed seed), every `--eval_every`
steps. Its training time is the sum of its steps' wall times (each waited for, as nanoGPT's
`loss.item()` waits), evaluations excluded. The result: the first evaluation at or below
nanoGPT's final loss, its cumulative training time and the ratio to nanoGPT's.
"""

import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import bench_optim  # noqa: E402  (its --data, --lr, --muon_lr flags too)
from jaxlm import sharding, train  # noqa: E402
from jaxlm import spec as run_spec  # noqa: E402

_NANOGPT = flags.DEFINE_string("nanogpt_dir", None, "A checkout of karpathy/nanoGPT.")
_JAXLM_STEPS = flags.DEFINE_integer("jaxlm_steps", 600, "jaxlm's steps (its schedule's length).")
_WARMUP = flags.DEFINE_integer("warmup", 50, "jaxlm's warmup steps.")
_RAMP = flags.DEFINE_integer("ramp_steps", 0, "jaxlm: this many 6-row steps first (0: none).")
_SCAN = flags.DEFINE_bool("scan", True, "jaxlm: scanned layers (Muon orthogonalizes them batched).")
_TARGET = flags.DEFINE_string(
    "nanogpt_result", "", "LOSS,SECONDS of an earlier nanoGPT run: skip running it (tuning only)."
)
NANOGPT_ITERS, EVAL_BATCHES = 2000, 200


def run_nanogpt() -> tuple[float, float]:
    """(final validation loss, training seconds) of nanoGPT's README CPU run."""
    cmd = [
        sys.executable,
        "train.py",
        "config/train_shakespeare_char.py",
        "--device=cpu",
        "--compile=False",
        f"--eval_iters={EVAL_BATCHES}",
        f"--eval_interval={NANOGPT_ITERS}",
        "--log_interval=1",
        "--block_size=64",
        "--batch_size=12",
        "--n_layer=4",
        "--n_head=4",
        "--n_embd=128",
        f"--max_iters={NANOGPT_ITERS}",
        f"--lr_decay_iters={NANOGPT_ITERS}",
        "--dropout=0.0",
        "--out_dir=/tmp/bench_nanogpt_out",
    ]
    print("+ nanoGPT:", " ".join(cmd[1:]), flush=True)
    out = subprocess.run(cmd, cwd=_NANOGPT.value, capture_output=True, text=True, check=True).stdout
    times = {
        int(i): float(ms) for i, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", out)
    }
    vals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", out)
    final_step, final_val = vals[-1]
    if int(final_step) != NANOGPT_ITERS or len(times) != NANOGPT_ITERS + 1:
        raise RuntimeError(f"nanoGPT's log is not the expected one:\n{out[-2000:]}")
    median = float(np.median(list(times.values())))
    evaluating = {0, NANOGPT_ITERS}  # these iterations' times include an evaluation
    train_ms = sum(ms for i, ms in times.items() if i not in evaluating) + median * len(evaluating)
    return float(final_val), train_ms / 1e3


def run_jaxlm(train_ids, val_ids, vocab: int, target: float) -> list[tuple[int, float, float]]:
    """[(step, cumulative training seconds, validation loss)] of jaxlm's recipe, stopping at the
    first evaluation at or below `target` (or at the end)."""
    import jax

    c = bench_optim.char_config("muon", _JAXLM_STEPS.value)
    c.optim.warmup_steps = _WARMUP.value
    c.model.scan_layers = _SCAN.value
    half = bench_optim.BATCH // 2
    if _RAMP.value:  # the batch-size ramp: half batches first (micro-batches of half a batch)
        c.train.batch_size, c.train.steps = half, 0
        c.stages = (
            dict(steps=_RAMP.value, batch_size=half),
            dict(steps=_JAXLM_STEPS.value - _RAMP.value, batch_size=bench_optim.BATCH),
        )
    setup = train.Setup(run_spec.build(c), vocab, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    state, eval_fn = setup.init_state(), setup.jit_eval_step()
    programs = {}
    for stage in setup.plan.programs:  # compiled before the clock starts, as nanoGPT's is eager
        programs[stage.batch_size] = setup.jit_train_step(stage)
        rows = bench_optim.crops(train_ids, stage.batch_size, np.random.RandomState(9))
        warm = programs[stage.batch_size](
            setup.init_state(), sharding.host_to_global(rows, setup.mesh)
        )
        jax.block_until_ready(warm)  # a throwaway state: the step may donate its input
    val_rng = np.random.RandomState(1234)
    val = [
        sharding.host_to_global(bench_optim.crops(val_ids, bench_optim.BATCH, val_rng), setup.mesh)
        for _ in range(EVAL_BATCHES)
    ]
    rng = np.random.RandomState(0)
    spent, curve = 0.0, []
    for step in range(1, _JAXLM_STEPS.value + 1):
        rows = setup.plan.stage_at(step - 1).batch_size
        batch = sharding.host_to_global(bench_optim.crops(train_ids, rows, rng), setup.mesh)
        t0 = time.perf_counter()
        state, metrics = programs[rows](state, batch)
        float(metrics["loss"])  # waits, as nanoGPT's loss.item() does
        spent += time.perf_counter() - t0
        if step % bench_optim._EVAL_EVERY.value == 0 or step == _JAXLM_STEPS.value:
            losses = [eval_fn(state["params"], b) for b in val]
            loss = float(np.mean([float(s["nll"]) / float(s["count"]) for s in losses]))
            curve.append((step, spent, loss))
            print(
                f"jaxlm step {step:>5} ({spent:6.1f} s of training): val loss {loss:.4f}",
                flush=True,
            )
            if loss <= target:
                break
    return curve


def main(argv):
    del argv
    if not _NANOGPT.value or not os.path.isfile(os.path.join(_NANOGPT.value, "train.py")):
        sys.exit("error: --nanogpt_dir must be a checkout of karpathy/nanoGPT (it has train.py).")
    if not os.path.isfile(os.path.join(_NANOGPT.value, "data/shakespeare_char/train.bin")):
        sys.exit(
            "error: run nanoGPT's data/shakespeare_char/prepare.py first (input.txt = --data)."
        )
    text = open(bench_optim._DATA.value, encoding="utf-8").read()
    chars = sorted(set(text))  # nanoGPT's vocabulary and split
    table = {ch: i for i, ch in enumerate(chars)}
    ids = np.fromiter((table[ch] for ch in text), np.int32, len(text))
    split = int(len(ids) * 0.9)
    if _TARGET.value:  # tuning: not this sitting's nanoGPT, so not a result to report
        target, nano_s = map(float, _TARGET.value.split(","))
    else:
        target, nano_s = run_nanogpt()
    print(f"nanoGPT: val loss {target:.4f} after {NANOGPT_ITERS} iterations, {nano_s:.1f} s")
    curve = run_jaxlm(ids[:split], ids[split:], len(chars), target)
    step, spent, loss = curve[-1]
    if loss > target:
        print(f"jaxlm did not reach {target:.4f} in {step} steps ({loss:.4f} at {spent:.1f} s)")
        return 1
    print(
        f"\n| | val loss | steps | training s | vs nanoGPT |\n| --- | ---: | ---: | ---: | ---: |\n"
        f"| nanoGPT (README CPU baby) | {target:.4f} | {NANOGPT_ITERS} | {nano_s:.1f} | 1 |\n"
        f"| jaxlm (Muon, {_JAXLM_STEPS.value}-step schedule) | {loss:.4f} | {step} | {spent:.1f} "
        f"| {spent / nano_s:.2f} |"
    )


if __name__ == "__main__":
    from jaxlm import cli

    cli.run_cli(main, require_config=False)
