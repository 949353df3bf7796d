"""Ctrl-C reaches a whole process group: the command prints one line, its tokenizer workers
none, and it exits 130 at once; resuming a run prints no orbax warnings."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp

from jaxlm import checkpoint
from jaxlm.data import tokenizer
from tests.helpers import tiny_config

# Tokenizes an endless stream with two worker processes under the commands' Ctrl-C handling;
# prints "ready" once the workers have returned a batch.
_ENDLESS_TOKENIZATION = textwrap.dedent(
    """
    import itertools, signal, sys
    from jaxlm import cli
    from jaxlm.data import records

    # A terminal's foreground job takes Ctrl-C, even where the tests run in a background job,
    # which inherits SIGINT ignored (as the job runner of a non-interactive shell gives it).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def texts():
        for i in itertools.count():
            if i == 50:
                print("ready", flush=True)
            yield f"def f{i}(x):\\n    return x + {i}\\n" * 2000

    with cli.ctrl_c_is_one_line():
        with records.Encoder(sys.argv[1], num_proc=2) as encoder:
            encoder.write_shards(texts(), sys.argv[2], "train-{index:05d}.arrayrecord", 10**9)
    """
)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except FileNotFoundError:
        return False


def test_ctrl_c_to_the_process_group_during_tokenization_is_one_line(tmp_path):
    tok_cfg = tiny_config().tokenizer
    tok_cfg.vocab_size, tok_cfg.byte_fallback = 40, False
    tok_path = str(tmp_path / "t.model")
    tokenizer.train_tokenizer(["def f(x):\n    return x + 1\n" * 200], tok_cfg, tok_path)
    env = dict(os.environ, PYTHONPATH=os.getcwd(), JAXLM_TRACEBACK="")
    proc = subprocess.Popen(
        [sys.executable, "-c", _ENDLESS_TOKENIZATION, tok_path, str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a shell gives a command
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = _children(proc.pid)
        assert len(workers) >= 2  # the pool's workers are alive when Ctrl-C comes
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < 10
    # the progress line (printed on exit) may stand before it; nothing else may
    lines = [line for line in err.splitlines() if line.strip() and "MB/s" not in line]
    assert lines == ["stopped by Ctrl-C."], err
    deadline = time.monotonic() + 5
    while any(_running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(w) for w in workers), "a worker outlived Ctrl-C"


def test_a_resume_logs_no_orbax_warnings(tmp_path, caplog):
    state = {"step": jnp.asarray(5, jnp.int32), "w": jnp.arange(7.0)}
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False)
    ckpt.save(5, state, {"next_index": 3}, {"note": "saved"})
    ckpt.close()

    caplog.set_level(logging.INFO)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False)
    meta = ckpt.read_meta(5)  # what a resume reads first: the metadata alone
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    step, restored, data_state, _ = ckpt.restore(abstract)
    ckpt.close()
    assert meta["note"] == "saved" and step == 5 and data_state == {"next_index": 3}
    assert float(restored["w"][6]) == 6.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []
