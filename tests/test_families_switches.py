"""Each model switch the Hugging Face families brought (jaxlm/families.py), alone, from scratch
on one tiny shared model: the real train step lowers the loss on a repeated batch and moves every
parameter, a run resumed from a checkpoint is bitwise the straight run, and the trained model's
logits under the dp, fsdp and fsdp_tp presets (8 fake devices) equal one device's.

The presets compare forward passes of the trained parameters, not three more training runs: a
train-step compile costs ~4 s of CPU here (without LLVM optimisations), a forward pass ~0.5 s,
and the forward is where a switch meets the sharding (its parameters' logical axes, its
activations' constraints); the sharded train step is checked once in tests/test_train.py.
Every switch at once under each preset is tests/test_families.py's.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm import checkpoint, sharding, train
from jaxlm import model as model_lib
from jaxlm import spec as run_spec
from tests.helpers import packed_batch, tiny_config

VOCAB = 62  # even, as d_model (40), heads (4), kv heads (2) and d_ff (56): fsdp_tp splits them
WINDOW = 5  # < the 16-token rows
SWITCHES = {
    "qkv_bias": dict(qkv_bias=True),
    "qk_norm_head": dict(qk_norm="head"),
    "qk_norm_full": dict(qk_norm="full"),
    "post_norm": dict(norm_placement="post"),
    "both_norms": dict(norm_placement="both"),
    "norm_plus_one": dict(norm_plus_one=True),
    "embed_scale": dict(embed_scale=True),
    "gelu_tanh": dict(mlp_act="gelu_tanh"),
    "window_global_every": dict(sliding_window=WINDOW, global_every=2),
    "rope_local_theta": dict(sliding_window=WINDOW, global_every=2, rope_local_theta=500.0),
    "attn_softcap": dict(attn_softcap=2.0),
    "final_softcap": dict(final_softcap=3.0),
    "query_scale_dim": dict(query_scale_dim=7),
}
PRESETS = {"dp": (8, 1, 1), "fsdp": (2, 4, 1), "fsdp_tp": (1, 4, 2)}
BATCH = packed_batch(8, 16, seed=9, vocab=VOCAB)  # 1-3 documents per row
# The programs are the real ones, compiled without LLVM's optimisations: half the compile time
# on CPU, and every comparison here is between programs compiled the same way.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _setup(switch: dict) -> train.Setup:
    """The tiny model (2 scanned layers) with `switch` on, on one device."""
    config = tiny_config(scan_layers=True, **switch)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    return train.Setup(run_spec.build(config), vocab_size=VOCAB, mesh=mesh)


def _run_fast(jitted, *args) -> np.ndarray:
    """`jitted(*args)` on the host, compiled with FAST_COMPILE."""
    return np.asarray(jitted.lower(*args).compile(FAST_COMPILE)(*args))


def _steps(setup, step, state, n):
    losses = []
    for _ in range(n):
        state, metrics = step(state, sharding.host_to_global(BATCH, setup.mesh))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.slow  # a train-step compile and four forward compiles per switch: ~8 s of CPU
@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_switch_trains_resumes_bitwise_and_shards_exactly(name, tmp_path):
    setup = _setup(SWITCHES[name])
    for key, value in SWITCHES[name].items():  # the config path kept the switch
        assert getattr(setup.model_cfg, key) == value, key
    step = setup.lower_train_step().compile(FAST_COMPILE)
    init = jax.device_get(setup.init_state()["params"])
    straight, losses = _steps(setup, step, setup.init_state(), 3)
    print(f"{name}: losses {', '.join(f'{x:.4f}' for x in losses)}")
    assert losses[0] > losses[1] > losses[2] < losses[0] - 0.1, losses
    trained = jax.device_get(straight["params"])
    for (path, before), (_, after) in zip(
        jax.tree_util.tree_leaves_with_path(init),
        jax.tree_util.tree_leaves_with_path(trained),
        strict=True,
    ):  # no switch parameter is left out of the gradient or the optimizer
        assert not np.array_equal(before, after), path

    # 1 step, a checkpoint, a restore, 2 more steps == 3 straight steps, bit for bit
    first, _ = _steps(setup, step, setup.init_state(), 1)
    ckpt = checkpoint.Checkpointer(str(tmp_path), setup.config.checkpoint)
    ckpt.save(1, first, None, {"param_shapes": checkpoint.param_shapes(first["params"])})
    ckpt.wait()
    _, resumed, _, _ = ckpt.restore(setup.abstract_state)
    ckpt.close()
    resumed, resumed_losses = _steps(setup, step, resumed, 2)
    assert resumed_losses == losses[1:]
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # the trained model's logits under each preset equal one device's
    graphdef, abstract = nnx.split(model_lib.abstract(setup.model_cfg))
    forward = lambda p, t: nnx.merge(graphdef, p)(t)  # noqa: E731
    axes = model_lib.logical_axes(abstract)
    single = _run_fast(jax.jit(forward), trained, BATCH["inputs"])
    for preset, shape in PRESETS.items():
        mesh = sharding.make_mesh(shape)
        rules = sharding.MeshRules.of(mesh, preset)
        where = sharding.tree_shardings(mesh, axes, trained, rules.mapping)
        placed = jax.device_put(trained, where)
        tokens = sharding.host_to_global(BATCH, mesh)["inputs"]
        logits = _run_fast(sharding.jit(forward, rules), placed, tokens)
        np.testing.assert_allclose(logits, single, rtol=1e-5, atol=1e-5, err_msg=preset)
