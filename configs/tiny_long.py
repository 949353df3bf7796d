"""Long context on a laptop CPU: train short, then extend the context 4x with YaRN.

    python -m jaxlm.main --config=configs/tiny_long.py

Data: the interpreter's standard library (as configs/tiny.py), with passkey pairs planted in the
training text (`data.passkeys_per_1k`: `passkey = "KEY48213"` ... `assert passkey ==
"KEY48213"`, 8 to 1,024 tokens apart), because a short CPU run on natural text never learns
to copy from far back.
Stage 1 ("short"): rows of 256 tokens, RoPE as trained. Stage 2 ("long"): rows of 1,024 tokens
(the same 4,096 tokens per step), RoPE scaled by YaRN x4 from 256 positions. Evaluation: held-out
loss at 256 tokens, and the passkey retrieval eval (jaxlm/evaluate/retrieval.py: a key planted at
a random depth of held-out text, exact match of the copied key) at 256 and 1,024 tokens.
Model: 3 layers, d=256 (3.4M parameters), Muon.

Measured (docs/perf.md, "Long context on CPU"): this tiny model does not learn to copy a key in
the CPU budget, so retrieval reads 0% at both lengths before and after the extension stage; the
recipe is the long-context stage demonstrated end to end (the YaRN stage, the retrieval eval at
each length with each stage's RoPE), not yet a demonstration of what the stage buys. Measured
with rows packed end to end, before the stream gave each row its own document (2026-12-08); not
re-measured since.
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.name = "tiny_long"
    c.model.d_model = 256
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.d_ff = 768
    c.model.max_seq_len = 1024
    c.data.passkeys_per_1k = 10.0
    c.data.passkey_max_gap = 1024
    c.train.steps = 0  # the stages set the run's length
    c.train.batch_size = 4  # the micro-batch: stage 1 runs 4 of them per step, stage 2 one
    c.train.seq_len = 256
    c.stages = (
        dict(name="short", steps=200, seq_len=256, batch_size=16, lr=dict(warmup=30)),
        dict(
            name="long",
            steps=40,
            seq_len=1024,
            batch_size=4,
            rope_scaling=("yarn", 4.0, 256),
            lr=dict(decay="wsd", decay_fraction=0.5, end=0.1),
        ),
    )
    c.eval.every = 100
    c.eval.max_batches = 2
    c.eval.batch_size = 16
    c.eval.next_line_examples = 0
    c.eval.retrieval_lengths = "256,1024"
    c.eval.retrieval_examples = 32
    c.checkpoint.every = 100
    return c
