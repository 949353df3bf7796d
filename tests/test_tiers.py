"""Multi-tier checkpoints (jaxlm/tiers.py): a two-process run killed with SIGKILL at a random
step resumes from the local tier losing at most `local_every` steps; with one host's local tier
deleted it resumes from the persistent tier; either way its losses and final state are bitwise
those of the uninterrupted run. The tier choice and the local round-trip are checked alone."""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import tiers, validate
from jaxlm.errors import ConfigError
from tests.helpers import REPO, one_sentence, tiny_config, train_losses, write_run_config

AUTO = (jax.sharding.AxisType.Auto,)


@pytest.mark.parametrize(
    "local, persistent, expected",
    [
        ([[4, 6], [4, 6]], [], ("local", 6, ())),
        ([[4, 6], [4]], [], ("local", 4, (1,))),  # process 1 was killed while writing 6
        ([[12, 14], []], [10], ("persistent", 10, (1,))),  # process 1 lost its local tier
        ([[8], [8]], [10], ("persistent", 10, ())),  # the persistent tier is newer
        ([[2], []], [], (None, 0, (1,))),  # nothing every host has: from the start
        ([[], []], [], (None, 0, ())),
    ],
)
def test_the_newest_step_every_host_can_restore_is_chosen(local, persistent, expected):
    choice = tiers.choose(local, persistent)
    assert (choice.tier, choice.step, choice.short) == expected


@pytest.mark.parametrize(
    "local_dir, words",
    [
        ("gs://bucket/local", "must be a directory on this host"),
        ("", "must be a directory on this host"),
        ("/proc/jaxlm-local", "cannot be written"),
    ],
)
def test_a_local_tier_without_a_writable_host_directory_is_one_sentence(tmp_path, local_dir, words):
    config = tiny_config()
    config.checkpoint.local_every, config.checkpoint.local_dir = 2, local_dir
    with pytest.raises(ConfigError) as e:
        validate.check(config, str(tmp_path / "run"))
    assert words in one_sentence(e)


def _state(mesh):
    """A state with a sharded, a replicated and a bfloat16 leaf (prime dimensions)."""
    rows = NamedSharding(mesh, PartitionSpec("x"))
    whole = NamedSharding(mesh, PartitionSpec())
    w = jnp.arange(8 * 7, dtype=jnp.float32).reshape(8, 7) / 3
    return {
        "params": {"w": jax.device_put(w, rows)},
        "moment": jax.device_put(w[:, :5].astype(jnp.bfloat16) * 1.7, rows),
        "step": jax.device_put(jnp.int32(12), whole),
    }


def test_local_round_trip_is_bitwise_and_refuses_another_layout(tmp_path):
    mesh = jax.make_mesh((8,), ("x",), axis_types=AUTO)
    state = _state(mesh)
    tier = tiers.LocalTier(str(tmp_path / "local"), str(tmp_path))
    for step in (2, 4, 6):
        tier.save(step, state, {"process_0": [{"i": step}]}, {"note": step})
    assert tier.steps() == [4, 6]  # tiers.KEEP newest
    abstract = _abstract(state)
    assert tier.usable_steps(abstract) == [4, 6]
    restored, data, meta = tier.restore(6, abstract)
    assert data == {"process_0": [{"i": 6}]} and meta == {"note": 6}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Cut another way (4 devices), the local steps are of no use: the persistent tier serves.
    other = jax.make_mesh(
        (4,), ("x",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,)
    )
    assert tier.usable_steps(_abstract(_state(other))) == []
    tier.delete_after(4)
    assert tier.steps() == [4]


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, workdir: str, local_dir: str) -> list[subprocess.Popen]:
    """The run as two processes of 4 CPU devices each, joined on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "JAX_NUM"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=REPO)
    port = _free_port()
    flags = [
        f"--config={config}",
        f"--workdir={workdir}",
        "--config.optim.name=adamw",  # the cheapest step to compile
        "--config.data.streams=2",
        "--config.eval.batch_size=256",  # the final evaluation in a few batches
        "--config.logging.tensorboard=False",
        "--config.checkpoint.local_every=2",
        f"--config.checkpoint.local_dir={local_dir}",
        f"--config.mesh.coordinator=127.0.0.1:{port}",
        "--config.mesh.num_processes=2",
    ]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "jaxlm.main", *flags, f"--config.mesh.process_id={i}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def _finish(procs: list[subprocess.Popen]) -> str:
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    return results[0][0]


def _kill_after(
    procs: list[subprocess.Popen], workdir: str, step: int, wait_for: str = ""
) -> tuple[int, str]:
    """SIGKILLs both processes once `step` is logged (and `wait_for` exists); returns the last
    step logged and process 0's output."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and max(train_losses(workdir), default=0) >= step) or (
        wait_for and not os.path.isdir(wait_for)
    ):
        ended = [p for p in procs if p.poll() is not None]
        assert not ended, ended[0].communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    stdout = [p.communicate()[0] for p in procs][0]
    return max(train_losses(workdir)), stdout


def _resumed_at(stdout: str) -> int:
    return int(stdout.split("resuming from checkpoint at step ")[1].split()[0])


@pytest.mark.slow
def test_sigkill_loses_at_most_the_local_interval_and_resumes_bitwise(stdlib_prepared, tmp_path):
    config = write_run_config(
        tmp_path / "run.py", stdlib_prepared[0], steps=14, checkpoint_every=10
    )
    reference = str(tmp_path / "reference")
    _finish(_launch(config, reference, str(tmp_path / "local_reference")))

    workdir, local_dir = str(tmp_path / "killed"), str(tmp_path / "local")
    rng = random.Random(30)
    first_kill, second_kill = rng.randint(3, 8), rng.randint(11, 12)
    killed_at, _ = _kill_after(_launch(config, workdir, local_dir), workdir, first_kill)
    # Restarted on the same hosts: from the local tier, at most local_every (2) steps back.
    persistent = os.path.join(workdir, "checkpoints")
    _, stdout = _kill_after(
        _launch(config, workdir, local_dir), workdir, second_kill, os.path.join(persistent, "10")
    )
    resumed_at = _resumed_at(stdout)
    assert killed_at - 2 <= resumed_at <= killed_at, (killed_at, stdout)
    assert f"step {resumed_at} in the local tier {local_dir}" in stdout, stdout
    # One host's local tier is lost (a replaced machine): every host falls back to step 10.
    shutil.rmtree(os.path.join(local_dir, tiers.run_id(workdir), "process_1"))
    last = _finish(_launch(config, workdir, local_dir))
    assert f"resuming from checkpoint at step 10 in {persistent}\n" in last, last
    assert "process(es) 1 have no local checkpoint at step 1" in last, last

    a, b = train_losses(reference), train_losses(workdir)
    assert sorted(b) == list(range(1, 15))
    assert [a[s] for s in range(1, 15)] == [b[s] for s in range(1, 15)]  # exact
    final = [
        _host_state(os.path.join(w, "checkpoints", "14", "state")) for w in (reference, workdir)
    ]
    for x, y in zip(jax.tree.leaves(final[0]), jax.tree.leaves(final[1]), strict=True):
        np.testing.assert_array_equal(x, y)


def _host_state(path: str):
    """A saved state as host numpy arrays (it was written by devices this process lacks)."""
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, restore_args=args)
