"""The benchmarks' one timing harness: warm up, time with the device's work included, summarise.

Every figure in docs/perf.md is wall time from `time.perf_counter` around calls whose results
are waited for with `jax.block_until_ready` (asynchronous dispatch would otherwise return before
the device finished), taken after untimed warm-up calls (compilation, caches, worker start-up).
A benchmark picks the summary that suits its noise: the mean over many calls, the median of
windows (robust to a slow window on a shared host) or the best of a few repeats.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Seconds taken by one call `fn(*args)`, waiting for the device arrays it returns, and its
    result."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, out


def seconds_per_call(fn: Callable[..., Any], *args: Any, calls: int, warmup: int = 1) -> float:
    """Mean seconds per call of `fn(*args)` over `calls` calls, after `warmup` untimed calls.

    Only the last result is waited for: consecutive calls overlap as they do in a real loop.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls


def windows(
    run: Callable[[int], Any],
    rounds: int,
    per_round: int,
    between: Callable[[], Any] | None = None,
) -> list[float]:
    """Seconds per unit in each of `rounds` windows, a window being `run(per_round)` (which does
    `per_round` units of work and returns what to wait for). `between()`, if given, runs untimed
    before each window (e.g. a peak measurement bracketing it)."""
    out = []
    for _ in range(rounds):
        if between is not None:
            between()
        seconds, _ = timed(run, per_round)
        out.append(seconds / per_round)
    return out


def best_of(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """The fastest of `repeats` timed calls of `fn()` after `warmup` untimed ones, and the last
    call's result."""
    result = None
    for _ in range(warmup):
        result = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        seconds, result = timed(fn)
        times.append(seconds)
    return min(times), result


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens laid out as packed rows of two documents each (the real batch contract)."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    half = seq_len // 2
    segment_ids = np.concatenate([np.ones((batch, half)), 2 * np.ones((batch, seq_len - half))], 1)
    positions = np.concatenate([np.arange(half), np.arange(seq_len - half)])[None].repeat(batch, 0)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids.astype(np.int32),
        "positions": positions.astype(np.int32),
        "loss_mask": np.ones((batch, seq_len), np.float32),
    }
