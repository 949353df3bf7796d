"""Hang detection: a step overdue against the recent median stops the run with its stacks."""

import os
import socket
import subprocess
import sys
import time

import pytest

from jaxlm import hang
from tests.helpers import REPO, write_run_config


def test_the_limit_follows_the_median_step_time_with_a_floor_and_a_save_allowance():
    watchdog = hang.Watchdog(factor=4, min_s=1.0, slow_s=30.0)
    assert watchdog.limit_s() == 1.0  # no step times yet: the floor
    watchdog.step_times.extend([0.5, 0.7, 60.0])  # one slow outlier does not move the median
    assert watchdog.limit_s() == pytest.approx(2.8)
    with watchdog.slow():
        assert watchdog.limit_s() == pytest.approx(32.8)
    assert watchdog.limit_s() == pytest.approx(2.8)


def test_no_watching_before_the_first_step_nor_when_turned_off():
    watchdog = hang.Watchdog(factor=1, min_s=0.01, slow_s=0.0).start()
    time.sleep(0.2)  # compiling the first step: no step has finished yet, so no verdict
    assert watchdog.thread.is_alive()
    watchdog.stop()
    off = hang.Watchdog(factor=1, min_s=0.01, slow_s=0.0, enabled=False).start()
    off.step_done()
    assert not off.thread.is_alive()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_process_that_sleeps_stops_both_processes_with_their_stacks(stdlib_prepared, tmp_path):
    config = write_run_config(
        tmp_path / "run.py", stdlib_prepared[0], steps=1000, checkpoint_every=4
    )
    workdir, port, min_s = str(tmp_path / "run"), _free_port(), 5
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jaxlm.main",
                f"--config={config}",
                f"--workdir={workdir}",
                "--config.data.streams=2",
                "--config.model.n_layers=1",  # the quickest compile
                "--config.train.inject_hang_at=8",  # process 1 sleeps when it draws batch 8
                f"--config.train.hang_min_s={min_s}",
                "--config.train.hang_slow_s=60",
                f"--config.mesh.coordinator=127.0.0.1:{port}",
                "--config.mesh.num_processes=2",
                f"--config.mesh.process_id={i}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        for line in procs[0].stdout:  # process 0 logs; step 7 is the last one both finish
            if line.startswith("step      7/"):
                break
        hung = time.monotonic()
        results = [p.communicate(timeout=120) for p in procs]
        took = time.monotonic() - hung
    finally:
        for p in procs:
            p.kill()
    # the limit (the floor here: steps take milliseconds), the peers' grace and start-up slack
    assert took < min_s + 10, took
    for p, (_, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 1, stderr[-3000:]
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert [x for x in lines if x.startswith("error: ")] == [lines[-1]], stderr[-3000:]
        assert lines[-1].startswith("error: no training step finished in "), stderr[-3000:]
        assert "the run is taken for hung" in lines[-1]
        assert "Thread 0x" in stderr and 'File "' in stderr  # faulthandler's stacks
    # the sleeping process's main thread is seen sleeping in the fault injection
    assert "in __next__" in results[1][1] and "faults.py" in results[1][1]
