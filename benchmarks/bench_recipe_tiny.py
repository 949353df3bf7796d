"""Recipe ablation on the tiny recipe itself: each speedrun switch alone against
`configs/tiny.py`, trained on the real prepared data, at equal (estimated idle) wall time.

    python benchmarks/bench_recipe_tiny.py [--arms=base,relu2,...] [--timing_rounds=9]
        [--workroot=/tmp/ablation_tiny] [--out=ablation.json]

Every arm is the tiny recipe (same data, same stream order, same seed) with one switch changed
(`ARMS`). Time is measured apart from training, as in `bench_recipe.py`: first every arm's step
programs are compiled and run for `--timing_rounds` interleaved rounds on the same random
batches (a step's cost does not depend on the tokens), each program's cost the median of its
rounds. Then each arm trains for the steps that fit the base recipe's `train.steps` steps at
those costs (dearer steps: fewer of them, the schedule squeezed to fit), through `loop.run` as
`jaxlm.main` would, with periodic evaluation, the next-line task, the sample and checkpoints
before the end off (they cost every arm the same). Its figure is the final held-out bits per
byte on all held-out text. The table prints that, the steps, and the step cost vs the base
arm; held-out at equal tokens is the same column for arms whose cost is the base's (they run
the base's steps).

The command resumes: the costs are kept in `--workroot`/costs.json (delete it to time again)
and an arm whose run there has finished with the steps it needs is not trained again.
"""

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import timing  # noqa: E402
from configs import tiny  # noqa: E402
from jaxlm import sharding, train, validate  # noqa: E402
from jaxlm import spec as run_spec  # noqa: E402

_ARMS = flags.DEFINE_list("arms", None, "Arms to run, base first (default: all of ARMS).")
_ROUNDS = flags.DEFINE_integer("timing_rounds", 9, "Interleaved timed steps per program.")
_WORKROOT = flags.DEFINE_string("workroot", "/tmp/ablation_tiny", "Each arm's run directory.")
_OUT = flags.DEFINE_string("out", "", "Also write the table as JSON here.")

RAMP_STEPS = 60  # batch_ramp: this many half-batch steps first (~15% of the tokens)
# Arm -> config overrides (dotted keys) on the tiny recipe. relu2 keeps the MLP's parameters
# (SwiGLU 3 x 384 x 1024 = ReLU^2 2 x 384 x 1536).
ARMS = {
    "base": {},
    "relu2": {"model.mlp_act": "relu2", "model.d_ff": 1536},
    "qk_norm": {"model.qk_norm": "head"},
    "zero_init": {"model.zero_init_out": True},
    "softcap": {"model.final_softcap": 15.0},
    "z_loss": {"train.z_loss": 1e-4},
    "untied": {"model.tie_embeddings": False},
    "untied_head_lr": {"model.tie_embeddings": False, "optim.groups.head.lr_scale": 0.5},
    "value_embeds": {"model.value_embeds": 1},  # one table: the first and the last layer
    "mtp": {"model.mtp_heads": 1, "train.mtp_weight": 0.3},
    "polar_express": {"optim.muon.variant": "polar_express"},
    "normuon": {"optim.muon.variant": "normuon"},
    "window": {"model.sliding_window": 64, "model.global_every": 3},  # layer 3 global
    "batch_ramp": {"train.batch_size": 8, "stages": "ramp"},  # 8-row micro-batches throughout
    "micro8": {"train.grad_accum": 2},  # the base's batch in two micro-batches of 8 rows
    "qk_norm+batch_ramp": {"model.qk_norm": "head", "train.batch_size": 8, "stages": "ramp"},
}


def arm_config(name: str, steps: int | None = None):
    """The tiny recipe with arm `name`'s overrides, for `steps` steps (None: the recipe's)."""
    c = tiny.get_config()
    base_steps = c.train.steps
    c.update_from_flattened_dict({k: v for k, v in ARMS[name].items() if k != "stages"})
    if "stages" in ARMS[name]:  # the batch ramp: half batches, then the recipe's batch
        total = steps or base_steps
        c.stages = (
            dict(steps=RAMP_STEPS, batch_size=8),
            dict(steps=total - RAMP_STEPS, batch_size=16),
        )
        c.train.steps = 0
    else:
        c.train.steps = steps or base_steps
    # Off for every arm alike: periodic evaluation, the next-line task, the sample, checkpoints
    # before the last step.
    c.eval.every, c.eval.next_line_examples = 0, 0
    c.sample.max_tokens, c.checkpoint.every = 0, 10**6
    return c


def step_costs(names: list[str], vocab: int) -> dict[str, dict[int, float]]:
    """Per arm, {rows per step: median ms}: every program compiled, then `--timing_rounds`
    interleaved rounds of one step each (reversed every other round)."""
    import jax

    mesh = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
    work = []  # [arm, rows, program, state, batch, times]
    for name in names:
        setup = train.Setup(run_spec.build(arm_config(name)), vocab, mesh)
        for stage in setup.plan.programs:
            host = timing.synthetic_batch(stage.batch_size, stage.seq_len, vocab, seed=7)
            batch = sharding.host_to_global(host, mesh)
            program = setup.jit_train_step(stage)
            _, (state, _) = timing.timed(program, setup.init_state(), batch)  # compiles
            work.append([name, stage.batch_size, program, state, batch, []])
        print(f"compiled {name}", flush=True)
    for round_ in range(_ROUNDS.value):
        for item in work[:: -1 if round_ % 2 else 1]:
            _, _, program, state, batch, times = item
            seconds, (item[3], _) = timing.timed(program, state, batch)
            times.append(seconds)
    costs: dict[str, dict[int, float]] = {}
    for name, rows, _, _, _, times in work:
        costs.setdefault(name, {})[rows] = 1e3 * float(np.median(times))
    return costs


def equal_time_steps(name: str, costs: dict[int, float], budget_ms: float) -> int:
    """The steps of arm `name` whose summed costs fit `budget_ms`."""
    if "stages" in ARMS[name]:
        rest = budget_ms - RAMP_STEPS * costs[8]
        return RAMP_STEPS + int(round(rest / costs[16]))
    (ms,) = costs.values()
    return int(round(budget_ms / ms))


def final_bits_per_byte(workdir: str) -> tuple[float, int]:
    """(held-out bits per byte, step) of the run's last evaluation in metrics.jsonl."""
    found = None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "eval/bits_per_byte" in row:
                found = (row["eval/bits_per_byte"], row["step"])
    if found is None:
        raise RuntimeError(f"{workdir} has no evaluation in metrics.jsonl")
    return found


def _saved_costs(path: str, names: list[str]) -> dict[str, dict[int, float]] | None:
    """The step costs an earlier invocation timed, if they cover every arm of this one."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = {name: {int(r): ms for r, ms in c.items()} for name, c in json.load(f).items()}
    return saved if all(name in saved for name in names) else None


def _finished(workdir: str) -> int | None:
    """The step of the final evaluation of a run in `workdir`, or None."""
    try:
        return final_bits_per_byte(workdir)[1]
    except (OSError, RuntimeError):
        return None


def main(argv):
    del argv
    from jaxlm import loop

    names = _ARMS.value or list(ARMS)
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        sys.exit(f"error: --arms has {unknown}; the arms are {', '.join(ARMS)}.")
    if names[0] != "base":
        sys.exit("error: --arms must start with base (the time budget is its steps).")
    base_cfg = tiny.get_config()
    for name in names:  # every arm's run config is valid before any work
        validate.check(arm_config(name), os.path.join(_WORKROOT.value, name))
    vocab = base_cfg.tokenizer.vocab_size  # the prepared tokenizer's (a step's cost is all)
    costs_path = os.path.join(_WORKROOT.value, "costs.json")
    costs = _saved_costs(costs_path, names)
    if costs is None:
        costs = step_costs(names, vocab)
        os.makedirs(_WORKROOT.value, exist_ok=True)
        with open(costs_path, "w") as f:
            json.dump(costs, f)
    else:
        print(f"step costs from {costs_path} (delete it to time again)")
    base_ms = costs["base"][base_cfg.train.batch_size]
    budget_ms = base_cfg.train.steps * base_ms
    rows = []
    for name in names:
        steps = equal_time_steps(name, costs[name], budget_ms)
        c = arm_config(name, steps)
        workdir = os.path.join(_WORKROOT.value, name)
        t0 = time.perf_counter()
        if _finished(workdir) != steps:  # else: this arm's run is done (an earlier invocation)
            shutil.rmtree(workdir, ignore_errors=True)
            loop.run(c, workdir)
        bpb, _ = final_bits_per_byte(workdir)
        cost = ", ".join(
            f"{ms / base_ms:.2f}x" + (f" ({r} rows)" if r != base_cfg.train.batch_size else "")
            for r, ms in sorted(costs[name].items())
        )
        rows.append(dict(arm=name, steps=steps, bits_per_byte=bpb, cost=cost))
        print(f"== {name}: {bpb:.4f} bits/byte in {steps} steps ({time.perf_counter() - t0:.0f} s)")
    base_bpb = rows[0]["bits_per_byte"]
    print(
        f"\nequal time: {base_cfg.train.steps} base steps at {base_ms:.0f} ms (interleaved median)"
    )
    print("| arm | held-out bits/byte | vs base | steps | step cost vs base |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        delta = r["bits_per_byte"] - base_bpb
        print(
            f"| {r['arm']} | {r['bits_per_byte']:.4f} | {delta:+.4f} | {r['steps']} | {r['cost']} |"
        )
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(dict(base_ms=base_ms, rows=rows, arms=ARMS), f, indent=1)


if __name__ == "__main__":
    from jaxlm import cli

    cli.run_cli(main, require_config=False)
