"""Optimizers beyond AdamW: Muon on block matrices (AdamW for the rest) and Lion, per-group
learning rates and weight decay; each shards and checkpoints exactly like AdamW."""

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, optim, sharding, train
from jaxlm import spec as run_spec
from tests.helpers import packed_batch, tiny_config


def make_setup(name, mesh_shape=(1, -1, 1), devices=None, scan_layers=False, preset="fsdp"):
    config = tiny_config(scan_layers=scan_layers)
    config.optim.name = name
    config.mesh.preset = preset
    return train.Setup(
        run_spec.build(config), vocab_size=62, mesh=sharding.make_mesh(mesh_shape, devices)
    )


def batch(setup, seed):
    return sharding.host_to_global(packed_batch(8, 16, seed=seed, vocab=62), setup.mesh)


def steps(setup, state, seeds, step=None):
    step = step or setup.jit_train_step()
    losses = []
    for seed in seeds:
        state, metrics = step(state, batch(setup, seed))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_groups_are_by_name_so_stacked_norm_scales_get_no_decay():
    setup = make_setup("adamw", devices=jax.devices()[:1], scan_layers=True)
    params = setup.abstract_state["params"]
    groups = optim.param_groups(params)
    assert params["blocks"]["attn_norm"]["scale"].shape == (2, 40)  # rank 2, yet a norm
    assert groups["blocks"]["attn_norm"]["scale"] == "vector"
    assert groups["blocks"]["attn"]["wq"] == "matrix"
    assert groups["embed"] == "embedding"


def test_muon_orthogonalizes_each_layers_block_matrices_and_leaves_the_rest_to_adam():
    setup = make_setup("muon", devices=jax.devices()[:1], scan_layers=True)
    config = setup.config
    state = setup.init_state()
    old = jax.device_get(state["params"])  # the step donates its input state
    new, _ = steps(setup, state, [0])
    lr = float(setup.schedule(0)) * config.optim.muon.lr / config.optim.lr
    wd = config.optim.weight_decay
    old_wq = old["blocks"]["attn"]["wq"]  # (layers, D, H, E)
    new_wq = np.asarray(new["params"]["blocks"]["attn"]["wq"])
    update = (new_wq - old_wq * (1 - lr * wd)) / -lr
    for layer in update:  # each layer's (D, H*E) update is orthogonal: singular values near 1
        singular = np.linalg.svd(layer.reshape(40, -1), compute_uv=False)
        # Five Newton-Schulz steps map the bulk of the spectrum into about [0.7, 1.2].
        assert 0.6 < np.quantile(singular, 0.1) and singular.max() < 1.3, singular
    # Adam's first step moves every embedding entry by about lr, not a unit-spectral matrix.
    embed_step = np.abs(np.asarray(new["params"]["embed"]) - old["embed"])
    assert np.median(embed_step) == pytest.approx(float(setup.schedule(0)), rel=0.2)


@pytest.mark.parametrize("name", ["muon", "lion"])
def test_fsdp_tp_equals_one_device_and_resumes_bitwise(name, tmp_path):
    one = make_setup(name, devices=jax.devices()[:1])
    _, expected = steps(one, one.init_state(), range(6))
    setup = make_setup(name, mesh_shape=(1, 4, 2), preset="fsdp_tp")
    step = setup.jit_train_step()
    straight, losses = steps(setup, setup.init_state(), range(6), step)
    np.testing.assert_allclose(losses, expected, rtol=2e-5)
    assert len(set(expected)) == 6

    half, first = steps(setup, setup.init_state(), range(3), step)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), setup.config.checkpoint)
    ckpt.save(3, half, None, {"param_shapes": checkpoint.param_shapes(half["params"])})
    ckpt.wait()
    _, restored, _, _ = ckpt.restore(setup.abstract_state)
    ckpt.close()
    resumed, rest = steps(setup, restored, range(3, 6), step)
    assert first + rest == losses
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_group_lr_scale_and_wd_scale_apply_to_their_group_only():
    base = make_setup("adamw", devices=jax.devices()[:1])
    config = base.config.copy_and_resolve_references()
    config.optim.groups.embedding.lr_scale = 0.0
    frozen = train.Setup(run_spec.build(config), vocab_size=62, mesh=base.mesh)
    state = frozen.init_state()
    old = jax.device_get(state["params"])  # the step donates its input state
    new, _ = steps(frozen, state, [0])
    np.testing.assert_array_equal(np.asarray(new["params"]["embed"]), old["embed"])
    moved = np.asarray(new["params"]["blocks"][0]["mlp"]["w_up"])
    assert not np.array_equal(moved, old["blocks"][0]["mlp"]["w_up"])
