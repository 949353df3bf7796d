"""The one progress line: silent in a pipe until the final line, redrawn in place on a terminal,
periodic in a run's log, and its figures (bar, share, amounts, rate) right."""

import io

import pytest

from jaxlm import progress as progress_lib


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress_lib.time, "perf_counter", c)
    return c


def test_a_pipe_gets_one_final_line_with_the_counts_and_the_rate(clock):
    out = io.StringIO()
    p = progress_lib.Progress("tokenize a", unit="MB", scale=1e6, counts=("docs",), stream=out)
    for _ in range(4):
        clock.now += 1.0
        p.update(3_000_000, docs=2)
    assert out.getvalue() == ""  # partial lines would be noise in a log file
    assert p.finish() == pytest.approx(3.0)  # MB/s
    assert out.getvalue() == "  tokenize a: 12.00 MB, 8 docs, 3.0 MB/s, 4.0 s\n"
    p.finish()
    assert out.getvalue().count("\n") == 1  # a second finish prints nothing


def test_a_terminal_line_is_redrawn_in_place_and_ends_with_the_bar_full(clock):
    out = Terminal()
    p = progress_lib.Progress("export", 2e9, "GB", scale=1e9, stream=out)
    clock.now += 0.5
    p.update(1e9)
    assert out.getvalue() == "\r  export [" + "#" * 15 + " " * 15 + "]  50% 1.00/2.00 GB 0.5 s"
    p.update(0.5e9)  # within the redraw interval: not drawn
    assert out.getvalue().count("\r") == 1
    clock.now += 61
    p(2e9)  # the callback form: units done so far
    p.finish()
    assert out.getvalue().endswith("\r  export [" + "#" * 30 + "] 100% 2.00/2.00 GB 1m01s\n")


def test_a_run_log_gets_a_line_every_so_often_until_the_total_and_none_at_the_end(clock):
    lines = []
    p = progress_lib.Progress("eval", 480, "batches", print_fn=lines.append, every_s=20)
    for done in range(1, 481):
        clock.now += 0.125  # 60 s in all: lines at 20 s and 40 s, none at the total
        p(done)
    p.finish()
    assert [line.split("] ")[1] for line in lines] == [
        " 33% 160/480 batches 20.0 s",
        " 67% 320/480 batches 40.0 s",
    ]
