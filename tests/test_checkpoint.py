"""Checkpoint round trips are exact, and restoring into another model is one clear error."""

import time

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, sharding, train
from jaxlm import spec as run_spec
from tests.helpers import packed_batch, tiny_config


def setup_for(config):
    return train.Setup(run_spec.build(config), vocab_size=62, mesh=sharding.make_mesh((1, -1, 1)))


def test_round_trip_restores_a_state_that_differs_from_the_current_one(tmp_path):
    config = tiny_config()
    setup = setup_for(config)
    step = setup.jit_train_step()
    state, _ = step(
        setup.init_state(), sharding.host_to_global(packed_batch(8, 16, vocab=62), setup.mesh)
    )
    saved = jax.device_get(state)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), config.checkpoint)
    ckpt.save(
        1, state, {"next_index": 7}, {"param_shapes": checkpoint.param_shapes(state["params"])}
    )
    ckpt.wait()
    state, _ = step(
        state, sharding.host_to_global(packed_batch(8, 16, seed=1, vocab=62), setup.mesh)
    )
    current = jax.device_get(state)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(current), strict=True)
    )

    restored_step, restored, data_state, _ = ckpt.restore(setup.abstract_state)
    assert restored_step == 1 and data_state == {"next_index": 7}
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(restored)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert restored["params"]["embed"].sharding == setup.param_shardings["embed"]
    ckpt.close()


def test_restoring_into_a_different_model_names_the_parameter(tmp_path):
    config = tiny_config()
    setup = setup_for(config)
    state = setup.init_state()
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), config.checkpoint)
    ckpt.save(1, state, None, {"param_shapes": checkpoint.param_shapes(state["params"])})
    ckpt.wait()
    other = setup_for(tiny_config(d_ff=64))
    with pytest.raises(
        checkpoint.CheckpointError, match=r"blocks/0/mlp/w_down has shape \(56, 40\)"
    ):
        ckpt.restore(other.abstract_state)
    ckpt.close()


@pytest.mark.parametrize(
    "preset,mesh_shape,n_devices", [("fsdp", (1, 1, 1), 1), ("fsdp_tp", (1, 4, 2), 8)]
)
def test_checkpoint_from_8_device_fsdp_continues_on_another_mesh(
    tmp_path, preset, mesh_shape, n_devices
):
    config = tiny_config()
    batches = [packed_batch(8, 16, seed=s, vocab=62) for s in range(3)]
    source = train.Setup(run_spec.build(config), vocab_size=62, mesh=sharding.make_mesh((1, 8, 1)))
    step = source.jit_train_step()
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), config.checkpoint)
    state, _ = step(source.init_state(), sharding.host_to_global(batches[0], source.mesh))
    ckpt.save(1, state, None, {})
    ckpt.wait()
    expected = []
    for b in batches[1:]:
        state, m = step(state, sharding.host_to_global(b, source.mesh))
        expected.append(float(m["loss"]))

    config.mesh.preset = preset
    target = train.Setup(
        run_spec.build(config),
        vocab_size=62,
        mesh=sharding.make_mesh(mesh_shape, jax.devices()[:n_devices]),
    )
    _, state, _, _ = ckpt.restore(target.abstract_state)
    step = target.jit_train_step()
    got = []
    for b in batches[1:]:
        state, m = step(state, sharding.host_to_global(b, target.mesh))
        got.append(float(m["loss"]))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    ckpt.close()


def test_a_failed_background_save_is_one_error_and_keeps_the_earlier_checkpoints(
    tmp_path, monkeypatch
):
    from orbax.checkpoint._src.handlers import standard_checkpoint_handler as handler

    config = tiny_config()
    config.checkpoint.keep = 1  # a successful save at step 2 would delete step 1
    setup = setup_for(config)
    state = setup.init_state()
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), config.checkpoint)
    ckpt.save(1, state, None, {})
    ckpt.wait()

    class DiskFull:
        def result(self, timeout=None):
            raise OSError(28, "No space left on device")

    original = handler.StandardCheckpointHandler.async_save

    async def failing_save(self, *args, **kwargs):
        return list(await original(self, *args, **kwargs) or []) + [DiskFull()]

    monkeypatch.setattr(handler.StandardCheckpointHandler, "async_save", failing_save)
    assert ckpt.save(2, state, None, {})  # returns at once; the write fails in the background
    deadline = time.time() + 30
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"saving the checkpoint at step 2 in .* failed \(\[Errno 28\] No space left",
    ):
        while time.time() < deadline:
            ckpt.check()  # non-blocking: raises once the background save has failed
            time.sleep(0.01)
    assert ckpt.steps() == [1]
    ckpt.check()  # reported once, then the Checkpointer is usable again
    ckpt.close()


def test_a_checkpoint_written_with_the_old_rng_entry_still_restores(tmp_path):
    config = tiny_config()
    setup = setup_for(config)
    state = setup.init_state()
    assert "rng" not in state
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), config.checkpoint)
    ckpt.save(1, dict(state, rng=jax.random.PRNGKey(0)), None, {})  # as jaxlm wrote them before
    ckpt.wait()
    _, restored, _, _ = ckpt.restore(setup.abstract_state)
    assert sorted(restored) == sorted(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    ckpt.close()
