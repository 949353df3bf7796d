"""Context parallelism (jaxlm/context.py): a model whose sequence is split over the `context`
mesh axis gives the unsplit model's logits and gradients for every mask, a train step under a
cp preset is the one-device step, a checkpoint moves between context degrees, and ring
attention compiles for a TPU slice with its K/V blocks moved by collective-permutes.

Lengths: L = 52 = 4 x 13. The ring's zigzag layout cuts the sequence into 2n chunks, so with
n = 2 context devices L must be a multiple of 4; 13 is prime, so no tile size divides it by
accident. all_gather runs over 4 context devices (a multiple of 4, the least it allows).
"""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import checkpoint, context, hardware, sharding, train, validate
from jaxlm import model as model_lib
from jaxlm import spec as run_spec
from jaxlm.errors import ConfigError
from tests.helpers import one_sentence, packed_batch, tiny_config

L = 52
# Layer 0 sees a window of 5 slots, layer 1 the whole sequence (the window is traced under the
# scan); attention logits soft-capped.
CFG = model_lib.ModelConfig(
    vocab_size=61,
    d_model=40,  # split over fsdp x context (8 devices) along `embed`
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=10,
    d_ff=56,
    max_seq_len=64,
    scan_layers=True,
)
WINDOWED = replace(CFG, sliding_window=5, global_every=2, attn_softcap=3.0)


def batch_rows() -> tuple[np.ndarray, ...]:
    """Four rows of (tokens, positions, segment ids, prefix marks): one whole document, two
    packed rows (one ending in padding, segment 0), and one with two documents of 26."""
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 61, (4, L)).astype(np.int32)
    segments = np.ones((4, L), np.int32)
    segments[1, 17:40], segments[1, 40:] = 2, 0
    segments[2, 5:33], segments[2, 33:] = 2, 3
    segments[3, 26:] = 2
    positions = np.zeros((4, L), np.int32)
    for row, seg in zip(positions, segments, strict=True):
        for s in np.unique(seg):
            row[seg == s] = np.arange((seg == s).sum())
    prefix = np.zeros((4, L), np.int32)  # prefix-LM marks inside documents, row 0 none
    prefix[1, 17:25], prefix[2, :3], prefix[2, 5:20], prefix[3, 26:40] = 1, 1, 1, 1
    return tokens, positions, segments, prefix


def logits_and_grads(strategy: str, mesh_shape: tuple[int, ...] | None):
    """For (causal and packed rows; the same rows with prefix-LM marks, windowed layers and
    soft-capped logits): the logits and the gradients of a fixed linear function of them, split
    by `strategy` on `mesh_shape` (None: one device)."""
    tokens, positions, segments, prefix = map(jnp.asarray, batch_rows())
    params = nnx.to_pure_dict(nnx.state(model_lib.create(CFG, seed=3)))
    weights = jax.random.normal(jax.random.key(1), (4, L, 61))

    def case(params, cfg, marks):
        graphdef, _ = nnx.split(model_lib.abstract(cfg))
        forward = lambda p: nnx.merge(graphdef, p)(tokens, positions, segments, prefix=marks)  # noqa: E731
        logits, pullback = jax.vjp(forward, params)
        return logits, pullback(weights)[0]

    def run(params):
        cases = ((CFG, None), (WINDOWED, prefix))
        return [case(params, replace(cfg, context_parallel=strategy), m) for cfg, m in cases]

    if mesh_shape is None:
        return jax.jit(run)(params)
    mesh = sharding.make_mesh(mesh_shape)
    placed = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    return sharding.jit(run, sharding.MeshRules.of(mesh, "cp_fsdp"))(placed)


@pytest.fixture(scope="module")
def unsplit():
    return logits_and_grads("none", None)


@pytest.mark.parametrize(
    "strategy, mesh_shape", [("all_gather", (1, 2, 1, 4)), ("ring", (1, 4, 1, 2))]
)
def test_split_sequence_gives_the_unsplit_logits_and_gradients(strategy, mesh_shape, unsplit):
    split = logits_and_grads(strategy, mesh_shape)
    for (logits, grads), (want_logits, want_grads) in zip(split, unsplit, strict=True):
        for a, b in zip(
            jax.tree.leaves(grads) + [logits],
            jax.tree.leaves(want_grads) + [want_logits],
            strict=True,
        ):
            # fp32 rounding of sums taken in another order: relative to the array's largest entry
            # (an embedding gradient row sums many tokens: its small entries carry its error)
            assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1.0)
    # the masks differ: a test that ignored them could not pass both
    assert not np.allclose(unsplit[0][0], unsplit[1][0], atol=1e-3)


def test_zigzag_gives_device_i_chunks_i_and_2n_minus_1_minus_i():
    n, c = 3, 2
    seq = context.Sequence(None, None, None, "ring", n)
    x = jnp.arange(2 * n * c)[None]  # (1, 12): chunk j holds 2j, 2j + 1
    order = np.asarray(seq.order(x))[0].reshape(n, 2 * c)
    for i in range(n):
        assert order[i].tolist() == [2 * i, 2 * i + 1, 2 * (2 * n - 1 - i), 2 * (2 * n - 1 - i) + 1]
    np.testing.assert_array_equal(seq.restore(seq.order(x)), x)
    # a length the chunks cannot cut (a short scoring batch) takes the unsplit path
    assert context.Sequence.of("ring", jnp.ones((1, 7), jnp.int32), None) is None


def test_train_steps_under_cp_equal_one_device_and_restore_on_one_device(tmp_path):
    """Two ring steps on (fsdp 4, context 2): the losses of two one-device steps; their
    checkpoint restores onto one device (another context degree) with its parameters."""
    batches = [packed_batch(8, 16, seed=s, vocab=62) for s in range(2)]

    def two_steps(setup):
        state, step, losses = setup.init_state(), setup.jit_train_step(), []
        for batch in batches:
            state, metrics = step(state, sharding.host_to_global(batch, setup.mesh))
            losses.append(float(metrics["loss"]))
        return state, losses

    config = tiny_config()
    one = train.Setup(run_spec.build(config), 62, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    want_state, want = two_steps(one)
    config.mesh.preset, config.mesh.shape = "cp_fsdp", (1, 4, 1, 2)
    config.model.context_parallel = "ring"
    ring = train.Setup(run_spec.build(config), 62, sharding.make_mesh(config.mesh.shape))
    state, losses = two_steps(ring)
    np.testing.assert_allclose(losses, want, rtol=1e-5)

    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), config.checkpoint)
    ckpt.save(2, state, None, {})
    ckpt.wait()
    _, restored, _, _ = ckpt.restore(one.abstract_state)
    ckpt.close()
    for a, b in zip(
        jax.tree.leaves(restored["params"]), jax.tree.leaves(want_state["params"]), strict=True
    ):
        assert a.sharding == b.sharding  # on the one device, not the 8 it was saved from
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_ring_attention_compiles_for_a_tpu_slice_with_collective_permutes():
    config = tiny_config()
    config.model.dtype, config.model.attention = "bfloat16", "auto"  # auto: xla under the ring
    config.model.context_parallel = "ring"
    config.mesh.preset, config.mesh.shape = "cp_fsdp_tp", (1, 1, 2, 2)  # heads over tensor
    target = hardware.parse_target("v5e-4")
    mesh = sharding.make_mesh(config.mesh.shape, hardware.target_devices(target))
    setup = train.Setup(run_spec.build(config), 62, mesh, platform=target.platform)
    assert setup.model_cfg.attention == "xla"
    hlo = setup.lower_train_step().compile().as_text()
    assert "collective-permute" in hlo
    assert "tpu_custom_call" not in hlo  # no splash kernel


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"mesh.preset": "cp_fsdp"}, "set model.context_parallel"),
        ({"model.context_parallel": "ring"}, "needs a mesh.preset that splits"),
        ({"mesh.shape": (1, 2, 1, 4)}, "does not split the sequence"),
        ({"model.context_parallel": "rings", "mesh.preset": "cp_fsdp"}, "must be one of"),
        (
            {
                "model.context_parallel": "ring",
                "mesh.preset": "cp_fsdp",
                "model.attention": "splash",
            },
            "splash cannot attend",
        ),
        (
            {
                "model.context_parallel": "ring",
                "mesh.preset": "cp_fsdp",
                "model.attention": "cudnn",
            },
            "computes its blocks in XLA",
        ),
    ],
)
def test_context_settings_that_cannot_work_are_refused_in_one_sentence(keys, message):
    config = tiny_config()
    for key, value in keys.items():
        section, name = key.split(".")
        config[section][name] = value
    with pytest.raises(ConfigError) as excinfo:
        validate.check_config(config)
    assert message in one_sentence(excinfo)


def test_a_length_the_zigzag_cannot_cut_is_refused_with_the_multiple():
    config = tiny_config()
    config.mesh.preset, config.mesh.shape = "cp_fsdp", (1, 2, 1, 4)
    config.model.context_parallel = "ring"
    config.train.seq_len = 20  # not a multiple of 2 x 4
    spec = validate.check_config(config)
    with pytest.raises(ConfigError) as excinfo:
        validate.check_batches(spec, sharding.make_mesh(config.mesh.shape))
    assert "train.seq_len=20 must be a multiple of 8" in one_sentence(excinfo)
