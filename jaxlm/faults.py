"""Fault injection for tests: a batch iterator that poisons chosen batches, or hangs.

`config.train.inject_nan_at` / `inject_spike_at` / `inject_hang_at` name positions in the data
stream (the n-th batch drawn, counting from 1 over the whole run); the loop wraps its batch
iterator in `FaultyBatches` once at set-up when any is set, so the per-step path carries no
test code.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import jax
import numpy as np


class FaultyBatches:
    """Yields `batches`' batches, with NaN loss masks or scrambled targets at chosen positions.

    Positions belong to the data stream, not to optimizer steps: a rollback rewinds the steps
    but not the stream, so a poisoned batch is never drawn twice.
    """

    def __init__(
        self,
        batches: Iterator[dict[str, np.ndarray]],
        nan_at: Iterable[int] = (),
        spike_at: Iterable[int] = (),
        vocab_size: int = 1,
        drawn: int = 0,
        hang_at: int = 0,
    ):
        """Args:
        batches: the host batch iterator to wrap.
        nan_at: 1-based stream positions whose loss mask becomes NaN (a non-finite loss).
        spike_at: positions whose targets become random ids below `vocab_size` (a loss spike).
        vocab_size: the model's vocabulary size.
        drawn: batches already drawn before this iterator (the step a resumed run starts at).
        hang_at: the position at which the last process sleeps for good (its peers then wait
            in their next collective: a hung run); 0 = never.
        """
        self.batches = batches
        self.nan_at, self.spike_at = frozenset(nan_at), frozenset(spike_at)
        self.vocab_size = vocab_size
        self.drawn = drawn
        self.hang_at = hang_at

    def __iter__(self) -> FaultyBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.batches)
        self.drawn += 1
        if self.drawn == self.hang_at and jax.process_index() == jax.process_count() - 1:
            while True:  # short sleeps: the main thread stays visible in a stack dump
                time.sleep(0.1)
        if self.drawn in self.nan_at:
            batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
        if self.drawn in self.spike_at:
            rng = np.random.RandomState(self.drawn)  # the same scramble on every rerun
            targets = rng.randint(0, self.vocab_size, batch["targets"].shape).astype(np.int32)
            batch = dict(batch, targets=targets)
        return batch
