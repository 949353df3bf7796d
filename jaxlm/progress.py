"""The one progress line of jaxlm's long phases: curating and tokenizing a corpus, converting
weights, scoring text files, evaluating inside a run.

Where it goes depends on who reads it. On a terminal the line is redrawn in place (at most ten
times a second) and stays as a final line; in a pipe or a log file only the final line is
printed, since a hundred partial lines are noise there. A run's log (`print_fn` with `every_s`)
instead gets a line every `every_s` seconds while the phase lasts, so a long evaluation never
looks like a hang, and none at the end (the run prints the result itself).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

_BAR_WIDTH = 30  # characters of '#' at 100%
_REDRAW_S = 0.1  # a terminal line is redrawn at most this often


def format_duration(seconds: float) -> str:
    """'1h02m03s', or '2m03s' under an hour."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _elapsed(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else format_duration(seconds)


class Progress:
    """A phase's progress: units done out of a known total (a bar), or of an unknown one (a rate).

    Feed it with `update(n, **counts)` (units added) or call it as `progress(done, total)`
    (units so far: the callback form), then `finish()` once.

    Args:
      label: what is under way, e.g. 'tokenize stdlib'.
      total: units in all, if known: the line then shows a bar and the share done.
      unit: the shown unit, after dividing by `scale` ('GB' for bytes with scale 1e9).
      scale: units per shown unit; a scaled amount is shown with two decimals.
      counts: names of further tallies shown beside the units (e.g. 'docs', 'tokens'); `update`
        adds to them by name.
      print_fn, every_s: a run's log instead of a terminal: a line through `print_fn` at most
        every `every_s` seconds until the total is reached; no final line.
      enabled: False prints nothing (a caller's quiet mode).
      stream: the terminal's stream (default: stderr).
    """

    def __init__(
        self,
        label: str,
        total: float | None = None,
        unit: str = "",
        *,
        scale: float = 1.0,
        counts: tuple[str, ...] = (),
        print_fn: Callable[[str], Any] | None = None,
        every_s: float = 20.0,
        enabled: bool = True,
        stream: Any = None,
    ) -> None:
        self.label, self.total, self.unit, self.scale = label, total, unit, scale
        self.counts = dict.fromkeys(counts, 0)
        self.done = 0.0
        self.print_fn, self.every_s, self.enabled = print_fn, every_s, enabled
        self.stream = stream or sys.stderr
        self.tty = print_fn is None and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, n: float = 1, **counts: int) -> None:
        """Adds `n` units (and to the named tallies); redraws when due."""
        self.done += n
        for name, k in counts.items():
            self.counts[name] += k
        self._draw()

    def __call__(self, done: float, total: float | None = None) -> None:
        """Sets the units done so far (and the total, when the caller knows it)."""
        self.done = done
        if total is not None:
            self.total = total
        self._draw()

    def finish(self, final_line: bool = True) -> float:
        """Ends the phase: prints the final line (or clears the live one); returns the rate in
        shown units per second. A second call prints nothing."""
        rate = self.done / self.scale / max(time.perf_counter() - self.start, 1e-9)
        if self.enabled and self.print_fn is None:
            if final_line:
                print(("\r" if self.tty else "") + self.line(), file=self.stream, flush=True)
            elif self.tty:
                print("\r" + " " * len(self.line()) + "\r", end="", file=self.stream, flush=True)
        self.enabled = False
        return rate

    def line(self) -> str:
        """The status line as it stands."""
        seconds = time.perf_counter() - self.start
        tallies = "".join(f", {k:,} {name}" for name, k in self.counts.items())
        unit = f" {self.unit}" if self.unit else ""
        if self.total is None:
            rate = self.done / self.scale / max(seconds, 1e-9)
            return (
                f"  {self.label}: {self._amount(self.done)}{unit}{tallies}, "
                f"{rate:,.1f}{unit}/s, {_elapsed(seconds)}"
            )
        frac = min(max(self.done / max(self.total, 1e-9), 0.0), 1.0)
        return (
            f"  {self.label} [{'#' * int(_BAR_WIDTH * frac):<{_BAR_WIDTH}}] {frac:4.0%} "
            f"{self._amount(self.done)}/{self._amount(self.total)}{unit}{tallies} "
            f"{_elapsed(seconds)}"
        )

    def _amount(self, units: float) -> str:
        return f"{units / self.scale:,.2f}" if self.scale != 1 else f"{int(units):,}"

    def _draw(self) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.print_fn is not None:
            unfinished = self.total is None or self.done < self.total
            if now - self.last >= self.every_s and unfinished:
                self.last = now
                self.print_fn(self.line())
        elif self.tty and now - self.last >= _REDRAW_S:
            self.last = now
            print("\r" + self.line(), end="", file=self.stream, flush=True)
