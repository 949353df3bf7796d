"""Properties of the train step: it learns, traces once, shards exactly, accumulates exactly."""

import jax
import numpy as np
import pytest

from jaxlm import faults, sharding, train
from jaxlm import spec as run_spec
from tests.helpers import packed_batch, tiny_config


def make_setup(preset="fsdp", mesh_shape=(1, -1, 1), devices=None, **overrides):
    config = tiny_config()
    config.mesh.preset = preset
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(config[section], name, value)
    mesh = sharding.make_mesh(mesh_shape, devices)
    return train.Setup(run_spec.build(config), vocab_size=62, mesh=mesh)


def run_steps(setup, batches):
    state = setup.init_state()
    step = setup.jit_train_step()
    losses = []
    for batch in batches:
        state, metrics = step(state, sharding.host_to_global(batch, setup.mesh))
        losses.append(float(metrics["loss"]))
    return state, losses, step


@pytest.fixture(scope="module")
def batches():
    return [packed_batch(8, 16, seed=s, vocab=62) for s in range(5)]


@pytest.fixture(scope="module")
def single_device_run(batches):
    setup = make_setup(devices=jax.devices()[:1])
    return run_steps(setup, batches)


def test_loss_falls_on_a_repeated_batch():
    setup = make_setup(devices=jax.devices()[:1])
    _, losses, _ = run_steps(setup, [packed_batch(8, 16, seed=9, vocab=62)] * 15)
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_step_compiles_once(single_device_run):
    _, _, step = single_device_run
    assert step._cache_size() == 1


@pytest.mark.parametrize(
    "preset,mesh_shape", [("dp", (8, 1, 1)), ("fsdp", (2, 4, 1)), ("fsdp_tp", (1, 4, 2))]
)
def test_sharded_losses_equal_single_device(preset, mesh_shape, batches, single_device_run):
    setup = make_setup(preset, mesh_shape)
    state, losses, _ = run_steps(setup, batches)
    np.testing.assert_allclose(losses, single_device_run[1], rtol=1e-5)
    wq = state["params"]["blocks"][0]["attn"]["wq"].sharding.spec  # (D, H, E)
    expected = {
        "dp": (None, None, None),
        "fsdp": ("fsdp", None, None),
        "fsdp_tp": ("fsdp", "tensor", None),
    }
    assert tuple(wq) + (None,) * (3 - len(wq)) == expected[preset]
    mu = jax.tree.leaves(state["opt_state"][1][0].mu)[0]
    assert mu.sharding.spec == jax.tree.leaves(state["params"])[0].sharding.spec


def test_splash_attention_on_a_tensor_parallel_mesh_equals_xla_on_one_device():
    # The Pallas kernel runs per device under shard_map (batch rows over fsdp, heads over tensor).
    long = dict(train__seq_len=128, model__max_seq_len=128)
    batches = [packed_batch(8, 128, seed=s, vocab=62) for s in range(3)]
    splash = make_setup("fsdp_tp", (1, 4, 2), model__attention="splash", **long)
    xla = make_setup(devices=jax.devices()[:1], **long)
    np.testing.assert_allclose(run_steps(splash, batches)[1], run_steps(xla, batches)[1], rtol=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
    setup = make_setup(devices=jax.devices()[:1])
    params = setup.init_state()["params"]
    big = {k: jax.numpy.asarray(v) for k, v in packed_batch(8, 16, seed=5, vocab=62).items()}
    whole = jax.jit(lambda p, b: train.accumulate_gradients(setup.graphdef, p, b, 1))(params, big)
    split = jax.jit(lambda p, b: train.accumulate_gradients(setup.graphdef, p, b, 4))(params, big)
    np.testing.assert_allclose(split[0], whole[0], rtol=1e-5)  # summed loss
    assert float(split[1]) == float(whole[1]) == 8 * 16  # target count
    for a, b in zip(jax.tree.leaves(whole[2]), jax.tree.leaves(split[2]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(a))))

    # And through the whole step: the same loss and gradient norm.
    _, one_losses, _ = run_steps(setup, [packed_batch(8, 16, seed=5, vocab=62)])
    accum = make_setup(devices=jax.devices()[:1], train__grad_accum=4)
    _, accum_losses, _ = run_steps(accum, [packed_batch(8, 16, seed=5, vocab=62)])
    np.testing.assert_allclose(accum_losses, one_losses, rtol=1e-5)


def test_indivisible_dimension_is_one_clear_error():
    with pytest.raises(
        sharding.ShardingError,
        match=r"dimension 'kv_heads' of size 2 cannot be split over mesh axes \('tensor',\)",
    ):
        make_setup("fsdp_tp", (1, 2, 4))


def test_mesh_that_does_not_cover_the_devices_is_an_error():
    with pytest.raises(sharding.ShardingError, match="uses 6 devices but 8 are present"):
        sharding.make_mesh((2, 3, 1))


def test_nan_and_spiking_batches_are_skipped_bitwise():
    setup = make_setup(devices=jax.devices()[:1], train__spike_warmup=0)
    step = setup.jit_train_step()
    good = packed_batch(8, 16, seed=2, vocab=62)
    state, m = step(setup.init_state(), sharding.host_to_global(good, setup.mesh))
    assert int(m["skipped"]) == 0
    before = jax.device_get(state)

    poisoned = dict(good, loss_mask=np.full_like(good["loss_mask"], np.nan))
    state, m = step(state, sharding.host_to_global(poisoned, setup.mesh))
    assert int(m["skipped"]) == 1
    after_nan = jax.device_get(state)

    # A batch whose loss is far above the running mean: pretend the mean is tiny.
    state["guard"]["loss_ema"] = jax.numpy.asarray(0.01, np.float32)
    state, m = step(state, sharding.host_to_global(good, setup.mesh))
    assert int(m["skipped"]) == 1
    after_spike = jax.device_get(state)

    for other in (after_nan, after_spike):
        for key in ("params", "opt_state"):
            for a, b in zip(jax.tree.leaves(before[key]), jax.tree.leaves(other[key]), strict=True):
                np.testing.assert_array_equal(a, b)
    assert after_spike["step"] == before["step"] + 2


def test_fault_injection_poisons_only_the_named_stream_positions():
    batches = iter([packed_batch(2, 16, seed=s, vocab=61) for s in range(6)])
    # Resumed after 2 batches: positions 3..8 are drawn; 4 gets NaN, 6 scrambled targets.
    stream = faults.FaultyBatches(batches, nan_at=(1, 4), spike_at=(6,), vocab_size=61, drawn=2)
    got = list(stream)
    for i, (position, batch) in enumerate(zip(range(3, 9), got, strict=True)):
        clean = packed_batch(2, 16, seed=i, vocab=61)
        assert np.isnan(batch["loss_mask"]).all() == (position == 4)
        assert np.array_equal(batch["targets"], clean["targets"]) == (position != 6)
        assert batch["targets"].max() < 61
