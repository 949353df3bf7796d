"""Small shared builders for tests: prime-sized model configs and synthetic packed batches."""

import ml_collections
import numpy as np

from configs import base

VOCAB = 61  # prime, so a swapped vocab/other axis cannot pass by accident


def tiny_config(**model_overrides) -> ml_collections.ConfigDict:
    """A config whose model is small enough to compile in a few seconds on CPU."""
    c = base.get_config()
    c.model.d_model = 40
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.head_dim = 10
    c.model.d_ff = 56
    c.model.max_seq_len = 64
    c.model.attention = "xla"
    for k, v in model_overrides.items():
        setattr(c.model, k, v)
    c.train.batch_size = 8
    c.train.seq_len = 16
    c.train.steps = 20
    c.optim.warmup_steps = 2
    c.optim.lr = 1e-2
    return c


def packed_batch(batch: int, seq_len: int, seed: int = 0, vocab: int = VOCAB) -> dict:
    """Random tokens packed as 1-3 documents per row, with the batch contract's fields."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    segment_ids = np.zeros((batch, seq_len), np.int32)
    positions = np.zeros((batch, seq_len), np.int32)
    for b in range(batch):
        cuts = sorted(rng.choice(np.arange(1, seq_len), rng.randint(0, 3), replace=False))
        bounds = [0, *cuts, seq_len]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            segment_ids[b, lo:hi] = s + 1
            positions[b, lo:hi] = np.arange(hi - lo)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": np.ones((batch, seq_len), np.float32),
    }
