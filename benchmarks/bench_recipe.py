"""Recipe ablation: each speedrun switch (issue 26) against the base recipe, on a fixed time budget.

    python benchmarks/bench_recipe.py [--data=../shared/data/tinyshakespeare.txt] [--budget_s=120]
        [--arms=base,relu2,zero_init,z_loss,head_lr,qk_norm,softcap,all] [--optimizer=muon]
        [--eval_every=50]

The model is bench_optim's char-level nanoGPT "baby Shakespeare" shape (4 layers x 128 wide,
block 64, batch 12); every arm trains on the same random crops in the same order from the same
seed, under a constant learning rate after 100 warmup steps (no cool-down, so a shorter arm is
not favoured), until `--budget_s` seconds of training steps have run (compilation and held-out
evaluation are not counted: the first step's time is left out). The held-out loss (the file's
last 10%, fixed crops) is measured every `--eval_every` steps and at the end; `--data`, `--lr`,
`--muon_lr`, `--eval_every` and `--out` are bench_optim's flags. The table gives each arm's held-out
loss at equal wall time (the evaluation when the budget runs out), at equal tokens (the largest
step every arm reached) and its step cost; `--out` writes the curves as JSON.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import bench_optim  # noqa: E402  (its --data, --lr, --muon_lr flags too)
from jaxlm import sharding, train  # noqa: E402
from jaxlm import spec as run_spec  # noqa: E402

_BUDGET = flags.DEFINE_float("budget_s", 120.0, "Seconds of training steps per arm.")
_OPTIMIZER = flags.DEFINE_string("optimizer", "muon", "optim.name of every arm.")
_ARMS = flags.DEFINE_list("arms", ["base", "relu2", "zero_init", "z_loss", "head_lr", "all"], "")

# Arm -> config overrides (dotted keys) on top of the base recipe. relu2 keeps the parameter
# count: d_ff = 1.5 x the SwiGLU's 384.
ARMS = {
    "base": {},
    "relu2": {"model.mlp_act": "relu2", "model.d_ff": 576},
    "zero_init": {"model.zero_init_out": True},
    "z_loss": {"train.z_loss": 1e-4},
    "head_lr": {"optim.groups.head.lr_scale": 0.5},
    "qk_norm": {"model.qk_norm": "head"},
    "softcap": {"model.final_softcap": 15.0},
}
ALL = ("relu2", "zero_init", "z_loss", "head_lr")  # the "all" arm: these switches together
ARMS["all"] = {key: value for arm in ALL for key, value in ARMS[arm].items()}


def arm_config(overrides: dict) -> object:
    """bench_optim's char config under a constant lr (after warmup), with `overrides`."""
    c = bench_optim.char_config(_OPTIMIZER.value, steps=10**6)
    c.optim.schedule = "constant"
    for key, value in overrides.items():
        *path, name = key.split(".")
        node = c
        for part in path:
            node = node[part]
        node[name] = value
    return c


def run_arm(name: str, train_ids, val_batches, vocab: int) -> dict:
    """One arm: [(step, seconds of steps so far, held-out loss)] and its median step time."""
    import jax

    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    setup = train.Setup(run_spec.build(arm_config(ARMS[name])), vocab, mesh)
    state, step_fn, eval_fn = setup.init_state(), setup.jit_train_step(), setup.jit_eval_step()
    rng = np.random.RandomState(0)  # the same crops, in the same order, for every arm
    spent, step, curve, times = 0.0, 0, [], []
    while spent < _BUDGET.value:
        batch = sharding.host_to_global(bench_optim.crops(train_ids, bench_optim.BATCH, rng), mesh)
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics["loss"])
        if step:  # the first step compiles: outside the budget
            times.append(time.perf_counter() - t0)
            spent += times[-1]
        step += 1
        if step % bench_optim._EVAL_EVERY.value == 0 or spent >= _BUDGET.value:
            sums = [eval_fn(state["params"], sharding.host_to_global(b, mesh)) for b in val_batches]
            nll, count = (sum(float(s[k]) for s in sums) for k in ("nll", "count"))
            curve.append((step, spent, nll / count))
            print(f"{name:>10} step {step:>6} ({spent:6.1f} s): held-out {nll / count:.4f}")
    return dict(curve=curve, step_ms=1e3 * float(np.median(times)), steps=step)


def main(argv):
    del argv
    unknown = [a for a in _ARMS.value if a not in ARMS]
    if unknown:
        sys.exit(f"error: --arms has {unknown}; the arms are {', '.join(ARMS)}.")
    if not os.path.isfile(bench_optim._DATA.value):
        sys.exit(f"error: --data={bench_optim._DATA.value} is not a file.")
    text = open(bench_optim._DATA.value, encoding="utf-8").read()
    table = {ch: i for i, ch in enumerate(sorted(set(text)))}
    ids = np.fromiter((table[ch] for ch in text), np.int32, len(text))
    split = int(len(ids) * 0.9)
    val_rng = np.random.RandomState(1234)
    val = [bench_optim.crops(ids[split:], bench_optim.BATCH, val_rng) for _ in range(10)]
    results = {name: run_arm(name, ids[:split], val, len(table)) for name in _ARMS.value}
    every = bench_optim._EVAL_EVERY.value
    # The largest evaluated step every arm reached: equal tokens.
    common = min(
        max((s for s, _, _ in r["curve"] if s % every == 0), default=0) for r in results.values()
    )
    if not common:
        sys.exit("error: an arm ran fewer than --eval_every steps; raise --budget_s.")
    print(
        f"\n{_OPTIMIZER.value}, {_BUDGET.value:.0f} s of steps per arm; equal tokens: step {common}"
    )
    print("| arm | held-out at equal time | steps in budget | held-out at equal tokens | ms/step |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        at_tokens = next(loss for s, _, loss in r["curve"] if s == common)
        print(
            f"| {name} | {r['curve'][-1][2]:.4f} | {r['steps']} | {at_tokens:.4f} "
            f"| {r['step_ms']:.1f} |"
        )
    if bench_optim._OUT.value:
        with open(bench_optim._OUT.value, "w") as f:
            json.dump(dict(budget_s=_BUDGET.value, arms=ARMS, results=results), f, indent=1)


if __name__ == "__main__":
    from jaxlm import cli

    cli.run_cli(main, require_config=False)
