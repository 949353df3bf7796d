"""Tiny Llama on the Python standard library: a real pretraining run on a laptop CPU.

    python -m jaxlm.main --config=configs/tiny.py

Hardware: any CPU. Data: the interpreter's own standard-library source (~31 MB of Python,
prepared once into a cache; 2% of files held out by content hash). Model: 3 layers, d=384,
6.3M parameters, 4096-piece code-safe BPE; 205 steps of 16 x 256 tokens (0.84M tokens), held-out
evaluation every 25 steps on 4 batches and on all held-out text at the end.
Optimizer: Muon on the attention and MLP matrices, AdamW on the tied embedding and norms.

Measured on a 2-core Intel Xeon VM: final held-out 2.003 bits per byte where gzip -9 gets
1.607 on the same text (Python source is very compressible), next-line task 36% (chance 25%),
since the stream gives every row of a batch its own document (2026-12-08; 2.175 and 32% when
rows were packed end to end and one long file filled whole batches, docs/perf.md). Timing, idle
machine, the same step program: training and evaluation 5 min 52 s, 6 min 0 s wall with the
data prepared (2026-12-07 20:05 UTC); data preparation took 14 s from a fresh clone (17:09 UTC;
60 s on the tester's fresh machine). The
same command again on the finished run prints `run complete at step 205 ...; final figures: ...`
in 3 s and exits. The recipe before it (AdamW, 300 steps) took 7 min 55 s in the same session
(2026-12-01), data preparation included, and ended at 2.357: Muon steps cost ~1.35x AdamW's
here, so 205 of them fit in the time of 300 AdamW steps and end 0.24 lower.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.name = "tiny"
    c.model.d_model = 384  # wide enough for CPU matmuls to run efficiently (MFU), ...
    c.model.n_layers = 3  # ... shallow enough to see ~1.5M tokens in the time budget
    c.model.n_heads = 6
    c.model.n_kv_heads = 2
    c.model.head_dim = 64
    c.model.d_ff = 1024
    c.model.max_seq_len = 256
    c.model.tie_embeddings = True
    c.train.steps = 205  # Muon steps cost ~1.35x AdamW's here: 205 fit in 300 AdamW steps' time
    c.train.batch_size = 16
    c.train.seq_len = 256
    c.train.log_every = 10
    c.optim.name = "muon"  # block matrices; embeddings and norms keep AdamW at optim.lr
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.eval.every = 25  # 8 points on the held-out curve of tools/plot_metrics.py
    c.eval.max_batches = 4  # periodic evals on a sample; the final one reads all held-out text
    c.eval.next_line_examples = 100
    c.checkpoint.every = 100
    c.sample.temperature = 0.7  # greedy decoding of a model this small loops on one line
    c.sample.top_p = 0.95
    return c
