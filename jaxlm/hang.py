"""A hung run stops with its stacks in the log and one sentence, instead of stalling silently.

A collective that never completes (a peer stuck in a save, a dead interconnect link, a data
reader blocked on storage) leaves every process waiting without a word. `Watchdog` is told each
time a step finishes; when none has finished in `factor` times the recent median step time (and
at least `min_s` seconds, plus `slow_s` while a checkpoint of either tier saves or an evaluation
runs), it writes every thread's Python stack of this process to stderr, tells the other
processes (which then log theirs: `peers.announce_hang`) and stops the process with one
`error:` line.

It starts watching after the first step finished, since that one waits for compilation.
"""

from __future__ import annotations

import contextlib
import faulthandler
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import jax

from jaxlm import peers


class Watchdog:
    """Watches the time since the last finished step from a daemon thread."""

    def __init__(
        self, factor: float, min_s: float, slow_s: float, enabled: bool = True, recent: int = 20
    ):
        """Args:
        factor: a step is overdue after this many times the median of the recent step times.
        min_s: ... and never before this many seconds (step times jitter; logging, GC).
        slow_s: extra seconds allowed while a `slow` block (a save, an evaluation) runs.
        enabled: False keeps it from watching (`train.hang_watchdog`, for runs that pause).
        recent: how many recent step times the median is taken over.
        """
        self.enabled = enabled
        self.factor, self.min_s, self.slow_s = factor, min_s, slow_s
        self.step_times: deque[float] = deque(maxlen=recent)
        self.last_step_end: float | None = None  # None until the first step finished
        self.slow_blocks = 0  # saves and evaluations in progress
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="jaxlm-hang-watchdog", daemon=True)

    @classmethod
    def from_config(cls, train_cfg: Any) -> Watchdog:
        """The watchdog `config.train` asks for (`hang_watchdog`, `hang_factor`, `hang_min_s`,
        `hang_slow_s`)."""
        t = train_cfg
        return cls(t.hang_factor, t.hang_min_s, t.hang_slow_s, enabled=t.hang_watchdog)

    def start(self) -> Watchdog:
        """Starts watching, if enabled; returns self."""
        if self.enabled:
            self.thread.start()
        return self

    def stop(self) -> None:
        """Stops watching (the run is ending)."""
        self.stopped.set()

    def step_done(self) -> None:
        """Records that a training step finished now."""
        now = time.monotonic()
        if self.last_step_end is not None:
            self.step_times.append(now - self.last_step_end)
        self.last_step_end = now

    @contextlib.contextmanager
    def slow(self) -> Iterator[None]:
        """A block (a checkpoint save, an evaluation) given `slow_s` more seconds; the time it
        took does not count toward the next step."""
        self.slow_blocks += 1
        try:
            yield
        finally:
            self.slow_blocks -= 1
            if self.last_step_end is not None:
                self.last_step_end = time.monotonic()

    def limit_s(self) -> float:
        """Seconds without a finished step after which the run is taken for hung."""
        median = statistics.median(self.step_times) if self.step_times else 0.0
        return max(self.min_s, self.factor * median) + (self.slow_s if self.slow_blocks else 0.0)

    def _run(self) -> None:
        poll_s = min(1.0, self.min_s / 4)
        while not self.stopped.wait(poll_s):
            if self.last_step_end is None:
                continue
            waited, limit = time.monotonic() - self.last_step_end, self.limit_s()
            if waited > limit:
                self._stop_hung(waited, limit)

    def _stop_hung(self, waited: float, limit: float) -> None:
        faulthandler.dump_traceback(all_threads=True)  # to stderr, the run's log
        peers.announce_hang()
        median = statistics.median(self.step_times) if self.step_times else 0.0
        peers.stop_process(
            f"no training step finished in {waited:.0f} s (the limit is {limit:.0f} s: "
            f"{self.factor:g} x the median step time {median:.2f} s, at least {self.min_s:g} s, "
            f"+{self.slow_s:g} s during saves and evaluations); the run is taken for hung and "
            f"the stacks of process {jax.process_index()}'s threads are above. Restart every "
            "process to resume from the last checkpoint."
        )
