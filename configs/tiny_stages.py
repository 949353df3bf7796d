"""Two-stage pretraining of the tiny model on CPU: a main phase, then a mid-training cool-down.

    python -m jaxlm.main --config=configs/tiny_stages.py
    python tools/plot_metrics.py runs/tiny_stages    # stage boundary, lr / batch / length panels

Data: two disjoint slices of the interpreter's standard library: `library` (the top-level
modules and the packages a-r) and `tests` (the test suite's top-level test_*.py files).
Stage 1 ("main", 90 steps): library only, 32 rows of 128 tokens, warmup to half the tiny
recipe's rates, then constant.
Stage 2 ("cool-down", 40 steps): half library, half tests, 16 rows of 256 tokens (the same
4,096 tokens per step), a WSD cool-down to 0.05 x optim.lr over its last half. Held-out
evaluation runs at 256 tokens on both datasets every 10 steps, so the tests' held-out loss can be
compared before and after the change of mix. Model and optimizer: configs/tiny.py (6.3M
parameters, Muon).

Measured (docs/perf.md, 2026-12-01, 2-core CPU, nothing else running): 5 min 23 s wall, data
preparation (13.5 s) included; training 4 min 57 s. The tests' held-out loss falls at -0.023 per
10 steps in the 40 steps before the transition and -0.086 in the 30 after it; final held-out
2.372 bits/byte over all held-out text. These figures read rows packed end to end, before the
stream gave each row its own document (2026-12-08); not re-measured since.
"""

import sysconfig

from configs import tiny

STDLIB = sysconfig.get_paths()["stdlib"]


def get_config():
    c = tiny.get_config()
    c.name = "tiny_stages"
    c.data.datasets = {
        "library": dict(
            paths=f"{STDLIB}/*.py,{STDLIB}/[a-r]*/**/*.py", text_field="text", weight=1.0,
            split="file",
        ),
        "tests": dict(paths=f"{STDLIB}/test/test_*.py", text_field="text", weight=0.0,
                      split="file"),
    }  # fmt: skip
    c.train.steps = 0  # the stages set the run's length
    c.train.batch_size = 16  # the micro-batch: each step runs 32/16 or 16/16 of them
    c.train.seq_len = 128
    c.stages = (
        dict(
            name="main",
            steps=90,
            weights=dict(library=1.0, tests=0.0),
            seq_len=128,
            batch_size=32,
            # To half of optim.lr (and of muon.lr), then constant: the stable phase. At the full
            # rate the held-out loss jumped by ~0.6 twice while the rate stayed high.
            lr=dict(warmup=20, peak=0.5),
        ),
        dict(
            name="cool-down",
            steps=40,
            weights=dict(library=0.5, tests=0.5),
            seq_len=256,
            batch_size=16,
            lr=dict(decay="wsd", decay_fraction=0.5, end=0.05),  # from 0.5 x optim.lr
        ),
    )
    c.optim.warmup_steps = 0  # the first stage's lr segment warms up
    c.train.log_every = 5
    c.eval.every = 10
    c.eval.max_batches = 4  # periodic evals on a sample; the final one reads all held-out text
    c.eval.batch_size = 16
    c.eval.next_line_examples = 0
    c.checkpoint.every = 50
    return c
