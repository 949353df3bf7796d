"""Goodput accounting: every second of a run's wall time in one category, across restarts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxlm import goodput
from tests.helpers import REPO, write_run_config


class Clock:
    """A stand-in for time.time that moves only when told."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_each_second_goes_to_its_phase_and_a_restart_moves_uncovered_steps_to_lost(
    tmp_path, monkeypatch
):
    clock = Clock(100.0)
    monkeypatch.setattr(goodput.time, "time", clock)
    monkeypatch.setattr(goodput, "process_start_time", lambda: 97.0)
    first = goodput.Accountant(str(tmp_path), persist_every_s=3600)
    first.resumed_at(0)
    for step, (data_s, step_s) in enumerate([(1.0, 5.0), (0.5, 2.0), (0.25, 3.0)], start=1):
        first.enter("data")
        clock.now += data_s
        first.enter("compile" if step == 1 else "productive")
        clock.now += step_s
        first.step_done(step)
        if step == 1:
            with first.during("checkpoint"):
                clock.now += 7.0
            first.saved_at(1)
    first.enter("productive")
    clock.now += 0.5  # step 4 is under way when the process is killed
    first._persist()  # what its writer thread does every persist_every_s
    clock.now += 11.0  # the restart's own start-up
    monkeypatch.setattr(goodput, "process_start_time", lambda: clock.now - 11.0)
    second = goodput.Accountant(str(tmp_path))
    second.resumed_at(1)  # the checkpoint at step 1: steps 2 and 3 are done again
    line, scalars = second.summary()
    assert scalars["starts"] == 2
    assert scalars["startup_s"] == 3.0 + 11.0
    assert scalars["compile_s"] == 5.0  # step 1's call: not productive, so not lost either
    assert scalars["data_s"] == 1.75 and scalars["checkpoint_s"] == 7.0
    assert scalars["lost_s"] == 5.5 and scalars["productive_s"] == 0.0
    assert scalars["wall_s"] == clock.now - 97.0
    assert "lost to restarts 16.5% (5.5 s)" in line and "over 2 starts" in line


def test_a_save_covers_the_steps_before_the_previous_save(tmp_path):
    account = goodput.Accountant(str(tmp_path), writes=False)
    for step in range(1, 7):
        account.step_done(step)
        if step % 2 == 0:
            account.saved_at(step)
    # the save at 6 may still be in flight; the one at 4 is complete: 5 and 6 can still be lost
    assert sorted(account.step_s) == [5, 6]


@pytest.mark.slow
def test_killed_and_resumed_run_accounts_for_its_wall_time_and_lost_work(stdlib_prepared, tmp_path):
    config = write_run_config(tmp_path / "run.py", stdlib_prepared[0], steps=16, checkpoint_every=4)
    workdir = str(tmp_path / "run")
    command = [sys.executable, "-m", "jaxlm.main", f"--config={config}", f"--workdir={workdir}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")

    t0 = time.time()
    # The 7th batch never comes: killed after step 6, steps 5 and 6 (past the checkpoint at 4)
    # and the wait for batch 7 are done again by the restart.
    hang = ["--config.train.inject_hang_at=7", "--config.train.hang_watchdog=False"]
    proc = subprocess.Popen(command + hang, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step      6/"):
            break
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "4")):  # async save finalised
        assert proc.poll() is None
        time.sleep(0.01)
    time.sleep(0.5)  # the account's writer has seen it all
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_wall = time.time() - t0
    with open(os.path.join(workdir, goodput.FILE)) as f:
        account = json.load(f)
    t1 = time.time()
    resumed = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    stdout = ""
    for line in resumed.stdout:
        stdout += line
        if line.startswith("goodput: "):  # the account ends here; closing and exit follow
            total_wall = killed_wall + time.time() - t1
    stdout += resumed.communicate()[0]
    assert resumed.returncode == 0, stdout

    at = int(stdout.split("resuming from checkpoint at step ")[1].split()[0])
    redone = {int(s): v for s, v in account["step_s"].items() if int(s) > at}
    assert at == 4 and sorted(redone) == [5, 6], (at, account["step_s"])
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    final = next(r for r in rows if "goodput/wall_s" in r)
    parts = {c: final[f"goodput/{c}_s"] for c in goodput.CATEGORIES}
    assert account["unfinished_s"] < 0.01  # it was waiting for batch 7, not stepping
    lost = sum(redone.values()) + account["unfinished_s"]
    assert final["goodput/lost_s"] == pytest.approx(lost, rel=1e-9)
    assert final["goodput/lost_s"] > 0 and final["goodput/starts"] == 2
    assert all(parts[c] > 0 for c in ("productive", "compile", "data", "checkpoint", "startup"))
    assert sum(parts.values()) == pytest.approx(final["goodput/wall_s"], rel=1e-9)
    # measured from outside: both processes, from their start to the kill and to the report
    assert final["goodput/wall_s"] == pytest.approx(total_wall, rel=0.02), (parts, total_wall)
    assert stdout.count("goodput: productive steps ") == 1


def test_the_dashboard_draws_each_runs_breakdown_as_one_bar(tmp_path):
    from tools import plot_metrics

    seconds = dict(zip(goodput.CATEGORIES, [13.0, 5.0, 2.0, 3.0, 7.0, 11.0, 17.0], strict=True))
    rows = [{"step": s, "train/loss": 5.0 - s / 10} for s in range(1, 4)]
    rows.append({"step": 3, **{f"goodput/{c}_s": v for c, v in seconds.items()}})
    rows[-1].update({"goodput/wall_s": sum(seconds.values()), "goodput/goodput": 13 / 58})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot_metrics.dashboard([str(tmp_path)])
    ax = next(a for a in fig.axes if a.get_title().startswith("goodput"))
    bars = ax.patches
    assert [b.get_width() for b in bars] == list(seconds.values())
    assert [b.get_x() for b in bars][-1] == sum(seconds.values()) - seconds["lost"]  # stacked
    assert "22%" in [t.get_text() for t in ax.texts]  # productive: 13 of 58 s
