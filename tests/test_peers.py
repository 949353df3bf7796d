"""A two-process JAX runtime on 127.0.0.1 (gloo collectives, the coordination service in
process 0): SIGKILL of process 0 stops process 1 within seconds with one sentence and no C++
dump; a clean finish is never taken for a death."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import REPO

# Joins the runtime as jaxlm.main does (peers.initialize, peers.Watchdog), then runs an
# all-gather every 50 ms: for ever ("forever"), or 40 times and leaves ("finish"), process 1
# two seconds after process 0 (whose coordination service then waits for it).
_PROCESS = textwrap.dedent(
    """
    import sys, time
    import jax
    import numpy as np

    jax.config.update("jax_num_cpu_devices", 2)
    from jax.experimental import multihost_utils
    from jaxlm import peers

    port, me, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    peers.initialize(f"127.0.0.1:{port}", 2, me)
    watchdog = peers.Watchdog().start()
    for i in range(10**9 if mode == "forever" else 40):
        try:
            multihost_utils.process_allgather(np.int32(i))
        except Exception as e:
            peers.raise_if_peer_lost(e)
            raise
        if i == 5:
            print("ready", flush=True)
        time.sleep(0.05)
    watchdog.stop(clean=True)
    time.sleep(2 * me)
    print("finished", flush=True)
    """
)
# What a C++ abort writes (absl's check failure, its signal handler, std::terminate).
_DUMP_MARKS = ("Check failed", "Check failure", "*** ", "terminate called", "Traceback", "F1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(mode: str) -> list[subprocess.Popen]:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
    return [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS, str(port), str(i), mode],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


@pytest.mark.slow
def test_sigkill_of_the_coordinator_stops_the_other_process_in_one_sentence():
    procs = _start("forever")
    try:
        for line in procs[0].stdout:
            if line.strip() == "ready":
                break
        procs[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = procs[1].communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[1].returncode == 1, stderr
    assert took < 10, took
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]], stderr
    assert errors[0].startswith("error: process 0 (the jax.distributed coordinator) is gone"), (
        stderr
    )
    assert not [m for m in _DUMP_MARKS if m in stderr], stderr


@pytest.mark.slow
def test_processes_that_finish_are_not_taken_for_dead():
    procs = _start("finish")
    results = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr
        assert "finished" in stdout and "error:" not in stderr, stderr
