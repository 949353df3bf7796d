"""Tiny Llama on the Python standard library: a real pretraining run on a laptop CPU.

    python -m jaxlm.main --config=configs/tiny.py

Hardware: any CPU (measured on 2 cores). Data: the interpreter's own standard-library source
(~31 MB of Python, prepared once into a cache, ~2% held out by file). Model: 4 layers, d=256,
~5M parameters, 4096-piece code-safe BPE. Expected: about 8 minutes in all on 2 cores, final
held-out bits per byte ~TBD against gzip -9's ~TBD on the same text.
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
    c.train.steps = 600
    c.train.batch_size = 16
    c.train.seq_len = 256
    c.train.log_every = 20
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.eval.every = 200
    c.eval.max_batches = 0
    c.checkpoint.every = 200
    return c
