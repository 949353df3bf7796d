"""Goodput: where every second of a run's wall time went, across its restarts.

`Accountant` keeps one clock per process, always in exactly one phase: start-up (from the
process's start until the loop's first phase), productive steps, compilation, data waiting,
checkpoint stalls (the blocking part of persistent saves, and local-tier saves: jaxlm/tiers.py),
evaluation. Time spent on steps after the checkpoint a restart resumes from
(or a rollback returns to) was thrown away: it moves from productive to lost. The totals and the
step times since the last checkpoints are kept in `<workdir>/goodput.json`, rewritten every
`persist_every_s` by a thread of its own (so a kill during a long save, evaluation or hang loses
at most that much of the account), and the next start of the same workdir continues it.

Times are the host's: with asynchronous dispatch a step's device time shows up where the host
waits for it (the step call, or reading its metrics), and data waiting is the time the host
spent getting the next batch, whether or not the devices were busy meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

# Category -> its words in the breakdown line, in the line's order.
CATEGORIES = {
    "productive": "productive steps",
    "compile": "compilation",
    "data": "data waiting",
    "checkpoint": "checkpoint stalls",
    "eval": "evaluation",
    "startup": "start-up",
    "lost": "lost to restarts",
}
FILE = "goodput.json"


def process_start_time() -> float:
    """When this process started (Unix seconds): start-up counts from there, imports included."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:  # (not /proc/stat's btime: whole seconds only)
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):  # not Linux: from the first import of jaxlm
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


class Accountant:
    """Attributes this process's wall time to `CATEGORIES`; cumulative over a workdir's starts.

    Only the writing process (process 0) persists; the others keep their own clock unread.
    """

    def __init__(self, workdir: str, writes: bool = True, persist_every_s: float = 0.25):
        """Args:
        workdir: the run directory holding goodput.json.
        writes: whether this process persists the account (process 0 of a run).
        persist_every_s: the longest stretch of time a SIGKILL can take out of the account.
        """
        self.lock = threading.Lock()  # the loop's thread changes the account, the writer reads it
        self.path = os.path.join(workdir, FILE)
        self.writes, self.persist_every_s = writes, persist_every_s
        earlier = _load(self.path)
        self.earlier: dict[str, float] = {c: earlier["totals"].get(c, 0.0) for c in CATEGORIES}
        self.earlier["productive"] -= earlier.get("unfinished_s", 0.0)  # the step a kill cut
        self.earlier["lost"] += earlier.get("unfinished_s", 0.0)
        self.starts = earlier.get("starts", 0) + 1
        # Productive seconds of each step not yet covered by a checkpoint known to be complete.
        self.step_s: dict[int, float] = {int(s): v for s, v in earlier["step_s"].items()}
        self.now: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)  # this start's seconds
        self.phase, self.since = "startup", process_start_time()
        self.this_step_s = 0.0  # productive seconds since the last finished step
        self.saved: list[int] = []  # steps saved by this start, newest last
        self.stopped = threading.Event()
        if writes:
            threading.Thread(target=self._keep, name="jaxlm-goodput", daemon=True).start()

    def enter(self, phase: str) -> None:
        """Closes the current phase's stretch and starts `phase`'s."""
        with self.lock:
            now = time.time()
            self.now[self.phase] += now - self.since
            if self.phase == "productive":
                self.this_step_s += now - self.since
            self.phase, self.since = phase, now

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        """`phase` for the block, then back to the phase before it."""
        previous = self.phase
        self.enter(phase)
        try:
            yield
        finally:
            self.enter(previous)

    def step_done(self, step: int) -> None:
        """Step `step` finished: its productive time is kept until a checkpoint covers it."""
        self.enter(self.phase)
        with self.lock:
            self.step_s[step] = self.step_s.get(step, 0.0) + self.this_step_s
            self.this_step_s = 0.0

    def resumed_at(self, step: int) -> None:
        """The state is back at `step` (a restart or a rollback): later steps' time was lost."""
        with self.lock:
            lost = sum(v for s, v in self.step_s.items() if s > step)
            self.earlier["productive"] -= lost
            self.earlier["lost"] += lost
            self.step_s = {s: v for s, v in self.step_s.items() if s <= step}

    def saved_at(self, step: int) -> None:
        """A checkpoint of `step` is being written. The one before it is then complete (orbax
        finishes a save before starting the next), so no restart can lose the steps up to it."""
        with self.lock:
            if self.saved:
                self.step_s = {s: v for s, v in self.step_s.items() if s > self.saved[-1]}
            self.saved.append(step)

    def totals(self) -> dict[str, float]:
        """Seconds per category over every start of the workdir, up to now."""
        self.enter(self.phase)
        return {c: self.earlier[c] + self.now[c] for c in CATEGORIES}

    def summary(self) -> tuple[str, dict[str, float]]:
        """The breakdown line and its scalars (`<category>_s`, `wall_s`, `goodput`, `starts`)."""
        totals = self.totals()
        wall = sum(totals.values())
        share = {c: s / wall if wall else 0.0 for c, s in totals.items()}
        line = "goodput: " + " | ".join(
            f"{words} {share[c]:.1%} ({totals[c]:.1f} s)" for c, words in CATEGORIES.items()
        )
        line += f" | wall {wall:.1f} s over {self.starts} start{'s' if self.starts > 1 else ''}"
        scalars = {f"{c}_s": s for c, s in totals.items()}
        scalars.update(wall_s=wall, goodput=share["productive"], starts=self.starts)
        self.stopped.set()  # the account ends here: the rest of the exit is not in it
        if self.writes:
            self._persist()
        return line, scalars

    def _keep(self) -> None:
        while not self.stopped.wait(self.persist_every_s):
            self._persist()

    def _persist(self) -> None:
        with self.lock:
            totals = {c: self.earlier[c] + self.now[c] for c in CATEGORIES}
            open_s = time.time() - self.since  # the current stretch, as of now
            totals[self.phase] += open_s
            unfinished = self.this_step_s + (open_s if self.phase == "productive" else 0.0)
            record = {
                "totals": totals,
                "step_s": {str(s): v for s, v in self.step_s.items()},
                "unfinished_s": unfinished,  # a step in progress: lost if the process dies now
                "starts": self.starts,
            }
            # Written beside and renamed over: a kill mid-write leaves the last account whole.
            with open(self.path + ".tmp", "w") as f:
                json.dump(record, f)
            os.replace(self.path + ".tmp", self.path)


def report(accountant: Accountant, writer: Any, step: int) -> None:
    """Prints the breakdown line and writes its scalars (`goodput/...`) at `step` through
    `writer` (a `metrics.Writer`: metrics.jsonl, TensorBoard, W&B)."""
    line, scalars = accountant.summary()
    writer.print(line)
    writer.write(step, scalars, prefix="goodput/")


def _load(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {"totals": {}, "step_s": {}, "starts": 0}
    with open(path) as f:
        return json.load(f)
