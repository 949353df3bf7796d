"""Recipe ablation: each speedrun switch (issue 26) against the base recipe, at equal tokens and
at equal (estimated idle) wall time, robust to a loaded machine.

    python benchmarks/bench_recipe.py [--data=../shared/data/tinyshakespeare.txt] [--steps=600]
        [--arms=base,relu2,...,all] [--optimizer=muon] [--timing_rounds=15] [--eval_every=50]

The model is bench_optim's char-level nanoGPT "baby Shakespeare" shape (4 layers x 128 wide,
block 64, batch 12); every arm trains on the same random crops in the same order from the same
seed, under a constant learning rate after 100 warmup steps (no cool-down, so an arm that
stops earlier is not favoured).

Wall time on a shared machine says more about the neighbours than about the arm, so time is
measured apart from training, in one pass first: every arm's step programs (one per distinct
batch shape of its stages) are compiled, then `--timing_rounds` rounds run one step of each in
turn (reversed every other round), and each program's cost is the median of its rounds. Back to
back and interleaved, every arm sees the same load, so the ratios should hold for an idle
machine; under heavy load they still move by ~15% (docs/perf.md), so raise the rounds. Then each
arm trains until its estimated time (the sum of its steps' median costs) reaches the base arm's
`--steps` steps: arms with dearer steps take fewer. The held-out loss (the file's last 10%,
fixed crops) is measured every `--eval_every` base-batches of tokens and when the time runs out;
the table gives it at equal estimated time (the end), at equal tokens (the most tokens every arm
reached) and each arm's step cost relative to the base arm. `--out` writes the curves and costs
as JSON.
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

_STEPS = bench_optim._STEPS  # here: the base arm's steps, the time budget of every arm
_ROUNDS = flags.DEFINE_integer("timing_rounds", 15, "Interleaved timed steps per program.")
_OPTIMIZER = flags.DEFINE_string("optimizer", "muon", "optim.name of every arm.")
_ARMS = flags.DEFINE_list(
    "arms",
    ["base", "relu2", "zero_init", "z_loss", "head_lr", "value_embeds", "mtp"]
    + ["polar_express", "normuon", "batch_ramp", "all"],
    "Arms to run, base first.",
)

HALF = bench_optim.BATCH // 2
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
    "value_embeds": {"model.value_embeds": 2},  # 4 layers: tables 0, 1 feed layers 0, 1 and 2, 3
    "value_embeds1": {"model.value_embeds": 1},  # layers 0 and 3
    "mtp": {"model.mtp_heads": 1, "train.mtp_weight": 0.3},
    "polar_express": {"optim.muon.variant": "polar_express"},
    "normuon": {"optim.muon.variant": "normuon"},
    # Batch-size schedule: half-size batches for the first --steps / 2 steps (a quarter of the
    # base budget's tokens), then the full batch; micro-batches of HALF rows throughout.
    "batch_ramp": {
        "train.batch_size": HALF,
        "train.steps": 0,
        "stages": "ramp",
    },
}
ALL = ("relu2", "zero_init", "z_loss", "head_lr")  # the "all" arm: these switches together
ARMS["all"] = {key: value for arm in ALL for key, value in ARMS[arm].items()}


def arm_config(overrides: dict) -> object:
    """bench_optim's char config under a constant lr (after warmup), with `overrides`."""
    c = bench_optim.char_config(_OPTIMIZER.value, steps=10**6)
    c.optim.schedule = "constant"
    c.update_from_flattened_dict({k: v for k, v in overrides.items() if k != "stages"})
    if "stages" in overrides:  # the ramp, sized from --steps
        half = _STEPS.value // 2
        c.stages = (dict(steps=half, batch_size=HALF), dict(steps=10**6, batch_size=2 * HALF))
    return c


class Arm:
    """One arm's setup, its state, its step programs and their measured costs."""

    def __init__(self, name: str, vocab: int):
        import jax

        self.name = name
        mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
        self.setup = train.Setup(run_spec.build(arm_config(ARMS[name])), vocab, mesh)
        self.plan = self.setup.plan
        self.step_ms: dict[int, float] = {}  # rows per step -> median ms

    def batch(self, ids: np.ndarray, step: int, rng: np.random.RandomState):
        """This arm's batch at `step` (its stage's rows), on the mesh, and its row count."""
        rows = self.plan.stage_at(step).batch_size
        crops = bench_optim.crops(ids, rows, rng)
        return sharding.host_to_global(crops, self.setup.mesh), rows

    def program(self, step: int):
        return self.setup.jit_train_step(self.plan.stage_at(step))


def time_arms(arms: list[Arm], ids: np.ndarray) -> None:
    """Each arm's step cost per program: compiled first, then `--timing_rounds` interleaved
    rounds of one step per program, median per program (`Arm.step_ms`)."""
    import jax

    rng = np.random.RandomState(7)
    work = []  # (arm, first step of a program, state)
    for arm in arms:
        for stage in arm.plan.programs:
            state = arm.setup.init_state()
            batch, _ = arm.batch(ids, stage.start, rng)
            state, metrics = arm.program(stage.start)(state, batch)  # compiles
            jax.block_until_ready(metrics["loss"])
            work.append([arm, stage.start, state, []])
    for round_ in range(_ROUNDS.value):
        # Odd rounds run the programs in reverse: no arm always goes first (after the host's
        # round bookkeeping) or last.
        for item in work[:: -1 if round_ % 2 else 1]:
            arm, start, state, times = item
            batch, _ = arm.batch(ids, start, rng)
            t0 = time.perf_counter()
            state, metrics = arm.program(start)(state, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
            item[2] = state
    for arm, start, _, times in work:
        arm.step_ms[arm.plan.stage_at(start).batch_size] = 1e3 * float(np.median(times))


def train_arm(arm: Arm, budget_ms: float, ids, val_batches) -> dict:
    """Trains `arm` until its estimated time reaches `budget_ms`: [(tokens, estimated ms,
    held-out loss)], steps taken."""
    eval_tokens = bench_optim._EVAL_EVERY.value * bench_optim.BATCH * bench_optim.SEQ_LEN
    state, eval_fn = arm.setup.init_state(), arm.setup.jit_eval_step()
    rng = np.random.RandomState(0)  # the same crops, in the same order, for every arm
    spent, step, tokens, curve = 0.0, 0, 0, []
    while spent < budget_ms:
        batch, rows = arm.batch(ids, step, rng)
        state, _ = arm.program(step)(state, batch)
        step, spent = step + 1, spent + arm.step_ms[rows]
        before, tokens = tokens, tokens + rows * bench_optim.SEQ_LEN
        if tokens // eval_tokens > before // eval_tokens or spent >= budget_ms:
            mesh = arm.setup.mesh
            sums = [eval_fn(state["params"], sharding.host_to_global(b, mesh)) for b in val_batches]
            nll, count = (sum(float(s[k]) for s in sums) for k in ("nll", "count"))
            curve.append((tokens, spent, nll / count))
            print(f"{arm.name:>14} {tokens:>8} tokens (~{spent / 1e3:5.1f} s): {nll / count:.4f}")
    return dict(curve=curve, steps=step, step_ms=arm.step_ms)


def main(argv):
    del argv
    unknown = [a for a in _ARMS.value if a not in ARMS]
    if unknown:
        sys.exit(f"error: --arms has {unknown}; the arms are {', '.join(ARMS)}.")
    if _ARMS.value[0] != "base":
        sys.exit("error: --arms must start with base (the time budget is its --steps steps).")
    if not os.path.isfile(bench_optim._DATA.value):
        sys.exit(f"error: --data={bench_optim._DATA.value} is not a file.")
    text = open(bench_optim._DATA.value, encoding="utf-8").read()
    table = {ch: i for i, ch in enumerate(sorted(set(text)))}
    ids = np.fromiter((table[ch] for ch in text), np.int32, len(text))
    split = int(len(ids) * 0.9)
    val_rng = np.random.RandomState(1234)
    val = [bench_optim.crops(ids[split:], bench_optim.BATCH, val_rng) for _ in range(10)]
    arms = [Arm(name, len(table)) for name in _ARMS.value]
    time_arms(arms, ids[:split])
    base_ms = arms[0].step_ms[bench_optim.BATCH]
    budget = _STEPS.value * base_ms
    results = {arm.name: train_arm(arm, budget, ids[:split], val) for arm in arms}
    eval_tokens = bench_optim._EVAL_EVERY.value * bench_optim.BATCH * bench_optim.SEQ_LEN
    common = min(  # the most tokens every arm reached at an evaluation on the common grid
        max((t for t, _, _ in r["curve"] if t % eval_tokens == 0), default=0)
        for r in results.values()
    )
    if not common:
        sys.exit("error: an arm evaluated no common point; raise --steps.")
    print(
        f"\n{_OPTIMIZER.value}; equal time: {_STEPS.value} base steps at the interleaved median "
        f"costs ({budget / 1e3:.1f} s); equal tokens: {common:,}"
    )
    print(
        "| arm | held-out at equal time | steps in that time | held-out at equal tokens "
        "| step cost vs base (interleaved median) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        at_tokens = next(loss for t, _, loss in r["curve"] if t == common)
        costs = ", ".join(
            f"{ms / base_ms:.2f}x" + (f" ({rows} rows)" if rows != bench_optim.BATCH else "")
            for rows, ms in sorted(r["step_ms"].items())
        )
        print(f"| {name} | {r['curve'][-1][2]:.4f} | {r['steps']} | {at_tokens:.4f} | {costs} |")
    print(f"(base step: {base_ms:.1f} ms median on this machine as loaded)")
    if bench_optim._OUT.value:
        with open(bench_optim._OUT.value, "w") as f:
            json.dump(dict(base_ms=base_ms, budget_ms=budget, arms=ARMS, results=results), f)


if __name__ == "__main__":
    from jaxlm import cli

    cli.run_cli(main, require_config=False)
