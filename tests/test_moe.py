"""The MoE block: both dispatches equal the dense per-expert oracle, capacity drops exactly the
overflow, the router's losses match a hand computation, and expert parallelism equals one device.

Odd sizes throughout (6 experts, top-2, D 96, F 19, 37 tokens a row) so a swapped axis or an
off-by-one in a group boundary cannot pass by accident.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from jaxlm import moe, sharding
from jaxlm.errors import ConfigError

D, F, X, K, L = 96, 19, 6, 2, 37
BASE = moe.MoEConfig(n_experts=X, top_k=K, expert_d_ff=F, n_shared_experts=1, z_loss_coef=1e-3)
SIGMOID = dataclasses.replace(
    BASE,
    router="sigmoid",
    normalize_top_k=False,
    n_shared_experts=0,
    bias_update_rate=1e-3,
    grouped_matmul="ragged",  # BASE's auto is tiled on CPU: both run
)


def make_block(cfg: moe.MoEConfig, seed: int = 0) -> moe.MoEBlock:
    with nnx.use_eager_sharding(False):
        return moe.MoEBlock(cfg, D, D**-0.5, F**-0.5, nnx.Rngs(params=seed))


def with_cfg(block: moe.MoEBlock, cfg: moe.MoEConfig) -> moe.MoEBlock:
    """The same weights under another routing config (the config is static, not state)."""
    graphdef, state = nnx.split(block)
    twin = nnx.merge(graphdef, state)
    twin.moe = cfg
    return twin


def inputs(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def loss_and_grads(fn, block, x, probe):
    """d/d(params, x) of sum(y * probe) / T + aux loss, fn(block, x) -> (y, aux)."""
    graphdef, state = nnx.split(block)

    def loss(state, x):
        y, aux = fn(nnx.merge(graphdef, state), x)
        return jnp.sum(y * probe) / probe[..., 0].size + aux["loss"], y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
    return y, nnx.to_pure_dict(grads[0]), grads[1]


def assert_trees_close(a, b, tol=1e-5):
    """Each leaf equal within tol of its own scale (max |a|), leaf paths named on failure."""
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for path in flat_a:
        x, y = np.asarray(flat_a[path]), np.asarray(flat_b[path])
        assert np.abs(x).max() > 0, path  # a zero gradient would compare equal trivially
        np.testing.assert_allclose(x, y, rtol=0, atol=tol * np.abs(x).max(), err_msg=str(path))


@pytest.mark.parametrize("cfg", [BASE, SIGMOID], ids=["softmax_tiled", "sigmoid_ragged"])
def test_dropless_equals_dense_reference_in_outputs_and_gradients(cfg):
    block = make_block(cfg)
    if cfg.bias_update_rate:  # a bias that changes the selection, so that path is exercised
        block.router_bias[...] = jnp.linspace(-0.3, 0.3, X)
    x, probe = inputs((1, L, D), 1), inputs((1, L, D), 2)
    y, grads, dx = loss_and_grads(lambda b, x: b(x), block, x, probe)
    y_ref, grads_ref, dx_ref = loss_and_grads(moe.dense_reference, block, x, probe)
    assert np.abs(y_ref).max() > 0.1
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * np.abs(y_ref).max())
    params_ref = {k: v for k, v in grads_ref.items() if k != "router_bias"}
    assert_trees_close(params_ref, {k: v for k, v in grads.items() if k != "router_bias"})
    assert_trees_close({"x": dx_ref}, {"x": dx})
    if cfg.bias_update_rate:  # state, not a parameter: no gradient reaches it
        np.testing.assert_array_equal(grads["router_bias"], 0)


def test_tiled_grouped_matmul_equals_ragged_dot():
    # 41 rows, tile 8: a group spanning tiles, an empty group, rows past the groups (zero).
    group_sizes = jnp.array([9, 0, 17, 1, 5, 3], jnp.int32)  # 35 of 41 rows
    xs, w = inputs((41, D), 8), inputs((X, D, F), 9)
    probe = inputs((41, F), 10)

    def run(implementation):
        def loss(xs, w):
            out = moe.grouped_matmul(xs, w, group_sizes, implementation, tile=8)
            return jnp.sum(out * probe), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(xs, w)

    (_, out), grads = run("tiled")
    (_, out_ref), grads_ref = run("ragged")
    np.testing.assert_array_equal(out[35:], 0.0)
    assert_trees_close(
        {"out": out_ref, "dxs": grads_ref[0], "dw": grads_ref[1]},
        {"out": out, "dxs": grads[0], "dw": grads[1]},
    )


def kept_by_hand(experts: np.ndarray, capacity: int) -> np.ndarray:
    """(B, L, k) bool: walk each row in order, keeping an assignment while its expert has room."""
    kept = np.zeros(experts.shape, bool)
    for b, row in enumerate(experts):
        used = np.zeros(X, int)
        for t, choices in enumerate(row):
            for j, e in enumerate(choices):
                kept[b, t, j] = used[e] < capacity
                used[e] += 1
    return kept


def test_capacity_drops_exactly_the_tokens_over_capacity():
    cfg = dataclasses.replace(BASE, capacity_factor=1.0)
    C = cfg.capacity(L)
    assert C == 13  # ceil(37 * 2 / 6)
    block = make_block(cfg)
    # Router reads only features 0..5: every token of row 0 picks experts 3 and 4 (74
    # assignments, 26 slots: the last 24 tokens lose both), row 1 spreads out at random.
    w_router = np.zeros((D, X), np.float32)
    w_router[np.arange(X), np.arange(X)] = 1.0
    block.w_router[...] = jnp.asarray(w_router)
    x = np.asarray(inputs((2, L, D), 3)).copy()
    x[0, :, :X] = 0.0
    x[0, :, 3], x[0, :, 4] = 5.0, 4.0
    x = jnp.asarray(x)
    bare = with_cfg(block, dataclasses.replace(cfg, n_shared_experts=0))
    dropless = with_cfg(block, BASE)

    @jax.jit
    def run(x):  # one program for every view of the same routing
        experts = block.route(x)[0]
        return block(x), experts, block.shared(x), bare(x)[0], dropless(x)

    (y, aux), experts, shared, y_bare, (y_dropless, aux_dropless) = run(x)
    experts = np.asarray(experts)
    assert (experts[0] == [3, 4]).all()
    kept = kept_by_hand(experts, C)
    assert kept[0].sum() == 2 * C and not kept[0, C:].any()  # the first 13 tokens keep both
    np.testing.assert_array_equal(np.asarray(moe.capacity_kept(jnp.asarray(experts), cfg)), kept)
    np.testing.assert_allclose(float(aux["dropped"]), 1 - kept.mean(), rtol=1e-6)
    # The dropped tokens' outputs are the shared expert's alone (exactly zero without one); the
    # rest equal the oracle with only the kept assignments weighted.
    np.testing.assert_array_equal(np.asarray(y[0, C:]), np.asarray(shared[0, C:]))
    np.testing.assert_array_equal(np.asarray(y_bare[0, C:]), 0.0)
    y_ref, _ = jax.jit(moe.dense_reference)(block, x, jnp.asarray(kept))
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * np.abs(y_ref).max())
    # Dropless on the same routing drops nothing and differs exactly there.
    assert float(aux_dropless["dropped"]) == 0.0
    np.testing.assert_allclose(y_dropless[0, :C], y[0, :C], rtol=0, atol=1e-5)
    assert np.abs(np.asarray(y_dropless[0, C:] - y[0, C:])).min() > 0


def test_router_losses_and_load_equal_a_hand_computation():
    block = make_block(BASE)
    x = inputs((3, L, D), 4)
    _, aux = jax.jit(lambda x: block(x))(x)
    logits = np.asarray(x, np.float64).reshape(-1, D) @ np.asarray(block.w_router[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :K]  # (T, k)
    T = logits.shape[0]
    counts = np.bincount(top.ravel(), minlength=X)
    # Switch/OLMoE: X * sum_x (tokens sent to x / T) * mean probability of x.
    balance = X * np.sum(counts / T * probs.mean(0))
    z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    np.testing.assert_allclose(float(aux["balance_loss"]), balance, rtol=1e-5)
    np.testing.assert_allclose(float(aux["z_loss"]), z, rtol=1e-5)
    np.testing.assert_allclose(
        float(aux["loss"]), BASE.aux_loss_coef * balance + BASE.z_loss_coef * z, rtol=1e-5
    )
    np.testing.assert_allclose(np.asarray(aux["load"]), counts / (T * K), rtol=1e-6)
    assert abs(float(jnp.sum(aux["load"])) - 1.0) < 1e-6


def test_router_bias_selects_experts_but_never_weights_them():
    block = make_block(SIGMOID)
    x = inputs((1, L, D), 5)
    block.router_bias[...] = jnp.zeros(X).at[5].set(10.0)  # expert 5 wins every token
    scores = jax.nn.sigmoid(x @ block.w_router[...])  # (1, L, X)
    experts, weights, aux = jax.jit(lambda x: block.route(x))(x)
    assert (np.asarray(experts[..., 0]) == 5).all()
    np.testing.assert_allclose(weights[..., 0], scores[..., 5], rtol=1e-6)  # unbiased score
    assert float(aux["load"][5]) == pytest.approx(1 / K)
    # The bias step moves toward balance: down for the overloaded expert, up for the idle.
    new = np.asarray(moe.update_bias(block.router_bias[...], aux["load"], 0.01))
    assert new[5] == pytest.approx(10.0 - 0.01)
    unused = np.asarray(aux["load"]) == 0
    np.testing.assert_allclose(new[unused], 0.01)


def test_parameter_counts_and_sparse_layers():
    cfg = dataclasses.replace(BASE, n_shared_experts=2, first_dense_layers=1, every=2)
    block = make_block(cfg)
    params = nnx.state(block, nnx.Param)
    assert moe.total_params(cfg, D) == sum(v.size for v in jax.tree.leaves(params))
    expert = 3 * D * F
    assert moe.total_params(cfg, D) - moe.active_params(cfg, D) == (X - K) * expert
    assert moe.active_params(cfg, D) == D * X + (K + 2) * expert
    assert [cfg.is_sparse(i) for i in range(6)] == [False, False, True, False, True, False]
    assert [BASE.is_sparse(i) for i in range(3)] == [True, True, True]


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_k", 7),
        ("router", "relu"),
        ("capacity_factor", -1.0),
        ("every", 0),
        ("grouped_matmul", "megablox"),
    ],
)
def test_bad_config_is_one_sentence(field, value):
    with pytest.raises(ConfigError, match=rf"model\.moe\.{field}"):
        dataclasses.replace(BASE, **{field: value})


def collectives(hlo: str) -> dict[str, list[str]]:
    """Result shapes of each collective in a compiled HLO text, by kind."""
    kinds = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
    found = {kind: [] for kind in kinds}
    pattern = r"= (\(.*?\)|\S+) (" + "|".join(kinds) + r")(?:-start)?\("  # tuple or one shape
    for shape, kind in re.findall(pattern, hlo):
        found[kind].append(shape)
    return found


@pytest.mark.parametrize(
    "preset, mesh_shape, capacity_factor",
    [("ep_fsdp", (4, 2, 1), 0.0), ("ep_fsdp", (4, 2, 1), 1.0), ("fsdp", (2, 4, 1), 0.0)],
    ids=["ep_fsdp-dropless", "ep_fsdp-capacity", "fsdp-dropless_ragged"],
)
def test_sharded_equals_one_device(preset, mesh_shape, capacity_factor):
    matmul = "auto" if preset == "ep_fsdp" else "ragged"
    cfg = dataclasses.replace(BASE, capacity_factor=capacity_factor, grouped_matmul=matmul)
    block = make_block(cfg)
    x, probe = inputs((8, 13, D), 6), inputs((8, 13, D), 7)
    y_one, grads_one, dx_one = loss_and_grads(lambda b, x: b(x), block, x, probe)

    mesh = sharding.make_mesh(mesh_shape)  # ep_fsdp: experts split 2 ways, batch 8 ways
    rules = sharding.MeshRules.of(mesh, preset)
    graphdef, state = nnx.split(block)
    axes = traverse_util.unflatten_dict(
        {path: var.get_metadata()["axes"] for path, var in nnx.to_flat_state(state)}
    )
    params = nnx.to_pure_dict(state)
    param_shardings = sharding.tree_shardings(mesh, axes, params, rules.mapping)
    batch = jax.NamedSharding(mesh, jax.P(sharding.BATCH))

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params)(x)
        return jnp.sum(y * probe) / probe[..., 0].size + aux["loss"], y

    step = sharding.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
        rules,
        in_shardings=(param_shardings, batch),
        out_shardings=((None, batch), (param_shardings, batch)),
    )
    args = jax.device_put(params, param_shardings), jax.device_put(x, batch)
    (_, y), (grads, dx) = step(*args)
    np.testing.assert_allclose(y, y_one, rtol=0, atol=1e-5 * np.abs(y_one).max())
    assert_trees_close(grads_one, grads)
    assert_trees_close({"x": dx_one}, {"x": dx})

    if preset != "ep_fsdp":
        return
    assert param_shardings["w_gate"].spec == jax.P("fsdp", None, None)  # whole experts
    # The token exchange XLA compiled: expert weights never move (no all-gather has a whole
    # expert tensor's shape); capacity reshards its (X, B, C, D) buffers by all-to-all, forward
    # and backward; dropless all-gathers tokens within the expert group and reduce-scatters
    # the partial outputs back.
    found = collectives(step.lower(*args).compile().as_text())
    whole = {f"f32[{X},{D},{F}]", f"f32[{X},{F},{D}]"}
    assert not whole & {s.split("{")[0] for s in found["all-gather"]}
    if capacity_factor:
        assert len(found["all-to-all"]) == 4
    else:
        assert not found["all-to-all"] and found["reduce-scatter"]


# --------------------------------------------------------------------------- in the model


EXPERTS = 4  # per layer in the model tests: one per device of the ep_fsdp mesh's fsdp axis


def moe_config(**moe_overrides):
    """tests.helpers.tiny_config with every layer sparse: 4 experts, top-2, width 19; ragged_dot
    (tiled, CPU's default, takes longer to compile and equals it: test above)."""
    from tests.helpers import tiny_config

    c = tiny_config()
    c.model.moe.update(
        n_experts=EXPERTS, top_k=2, expert_d_ff=19, z_loss_coef=1e-3, grouped_matmul="ragged"
    )
    c.model.moe.update(**moe_overrides)
    return c


def moe_setup(config, preset="fsdp", mesh_shape=(1, -1, 1), devices=None):
    from jaxlm import spec as run_spec
    from jaxlm import train

    config.mesh.preset = preset
    return train.Setup(run_spec.build(config), 62, sharding.make_mesh(mesh_shape, devices))


def run_steps(setup, batch, n):
    """Each step's metrics and the routers' selection biases (layers, X) after it."""
    state, step, metrics, biases = setup.init_state(), setup.jit_train_step(), [], []
    for _ in range(n):
        state, m = step(state, sharding.host_to_global(batch, setup.mesh))
        metrics.append({k: float(v) for k, v in m.items()})
        blocks = state["params"]["blocks"]
        biases.append(np.stack([np.asarray(blocks[i]["mlp"]["router_bias"]) for i in (0, 1)]))
    return metrics, biases


@pytest.fixture(scope="module")
def repeated_batch():
    from tests.helpers import packed_batch

    return packed_batch(8, 16, seed=9, vocab=62)


RATE = 1e-2  # the DeepSeek-V3 bias step of the model tests


@pytest.fixture(scope="module")
def one_device_setup():
    return moe_setup(moe_config(bias_update_rate=RATE), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def one_device_run(one_device_setup, repeated_batch):
    return run_steps(one_device_setup, repeated_batch, 5)


def test_moe_model_learns_a_repeated_batch_and_reports_its_router(one_device_run):
    metrics, _ = one_device_run
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < 0.8 * losses[0], losses
    first = metrics[0]
    assert first["moe_dropped"] == 0.0  # dropless
    assert 1.0 <= first["moe_load_max_over_mean"] <= 4.0  # between balanced and one expert
    assert first["moe_balance_loss"] >= 0.99 * K  # k at perfect balance, more otherwise
    assert first["moe_z_loss"] > 0


@pytest.fixture(scope="module")
def first_forward(one_device_setup, repeated_batch):
    """(logits, router statistics) of the initial params on the repeated batch, unrolled and
    with the same weights stacked under scan_layers: one program for both."""
    from jaxlm import model

    setup = one_device_setup
    params = nnx.to_pure_dict(nnx.state(model.create(setup.model_cfg, setup.spec.seed)))
    scanned = dataclasses.replace(setup.model_cfg, scan_layers=True)
    graphdef_scan, _ = nnx.split(model.abstract(scanned))
    batch = repeated_batch

    @jax.jit
    def both(params):
        args = (batch["inputs"], batch["positions"], batch["segment_ids"])
        loop = nnx.merge(setup.graphdef, params).forward(*args)
        scan = nnx.merge(graphdef_scan, model.stack_layers(params)).forward(*args)
        return loop[::2], scan[::2]

    return both(params)


def test_router_bias_steps_toward_balance_outside_the_gradient(first_forward, one_device_run):
    # The first step from zero biases: +RATE for each expert under the mean load, -RATE over
    # it, whatever the optimizer would have done (no gradient reaches the bias).
    (_, aux), _ = first_forward
    expected = moe.update_bias(jnp.zeros((2, EXPERTS)), aux["load"], RATE)
    _, biases = one_device_run
    assert np.abs(expected).max() == RATE
    np.testing.assert_allclose(biases[0], expected, rtol=1e-6)
    # Later steps add +-RATE or 0 per expert.
    steps = np.diff(np.stack(biases), axis=0) / RATE
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)


def test_expert_parallel_training_equals_one_device(one_device_run, repeated_batch):
    # ep_fsdp on (data 2, fsdp 4): each device holds one whole expert; two steps, so the
    # second loss also checks the first update (router-loss gradients included).
    setup = moe_setup(moe_config(bias_update_rate=RATE), "ep_fsdp", (2, 4, 1))
    metrics, biases = run_steps(setup, repeated_batch, 2)
    assert setup.param_shardings["blocks"][0]["mlp"]["w_gate"].spec == jax.P("fsdp", None, None)
    one_metrics, one_biases = one_device_run
    for key in ("loss", "grad_norm", "moe_balance_loss", "moe_z_loss"):
        got, want = [m[key] for m in metrics], [m[key] for m in one_metrics[:2]]
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(biases, one_biases[:2], rtol=1e-6)


def test_scanned_moe_model_equals_unrolled(first_forward):
    (logits, aux), (logits_scan, aux_scan) = jax.device_get(first_forward)
    np.testing.assert_allclose(logits_scan, logits, rtol=1e-5, atol=1e-5)
    assert aux["load"].shape == (2, EXPERTS)
    assert float(aux["dropped"]) == float(aux_scan["dropped"]) == 0.0
    del aux["dropped"], aux_scan["dropped"]
    assert_trees_close(aux, aux_scan)


def test_no_experts_is_the_dense_model():
    from jaxlm import model, train
    from tests.helpers import tiny_config

    dense = tiny_config()
    del dense.model["moe"]
    off = moe_config(n_experts=0)
    cfg = model.ModelConfig.from_config(off.model, 61)
    assert cfg.moe is None and cfg == model.ModelConfig.from_config(dense.model, 61)
    # The train objective of a dense model is its cross-entropy sum and nothing more.
    graphdef, state = nnx.split(model.abstract(cfg))
    batch = {
        k: jax.ShapeDtypeStruct((2, 8), jnp.float32 if k == "loss_mask" else jnp.int32)
        for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    }
    trace = lambda f: str(jax.make_jaxpr(f)(state, batch))  # noqa: E731
    assert trace(lambda p, b: train.train_loss_sums(graphdef, p, b)[0]) == trace(
        lambda p, b: train.loss_sums(graphdef, p, b)[0]
    )


def test_model_config_of_an_moe_model_round_trips_and_counts_active_flops():
    from jaxlm import model

    c = moe_config(first_dense_layers=1)
    cfg = model.ModelConfig.from_config(c.model, 61)
    assert [cfg.is_sparse(i) for i in range(2)] == [False, True]
    assert model.ModelConfig.from_dict(dataclasses.asdict(cfg)) == cfg  # checkpoint metadata
    dense = dataclasses.replace(cfg, moe=None)
    D, F = cfg.d_model, cfg.d_ff
    extra = moe.active_params(cfg.moe, D) - 3 * D * F  # one sparse layer
    assert cfg.flops_per_token(37) - dense.flops_per_token(37) == 6 * extra
    # Built with expert_d_ff=0: the model's d_ff.
    c.model.moe.expert_d_ff = 0
    assert model.ModelConfig.from_config(c.model, 61).moe.expert_d_ff == F


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(moe__colour=1), "model.moe.colour"),
        (dict(moe__n_experts=-2), "model.moe.n_experts"),
        (dict(moe__first_dense_layers=2), "model.moe.first_dense_layers"),
        (dict(moe__first_dense_layers=1, scan_layers=True), "model.scan_layers"),
        (dict(moe__bias_update_rate=-1e-3), "model.moe.bias_update_rate"),
        (dict(mlp_act="gelu_tanh"), "model.mlp_act"),
    ],
)
def test_moe_model_that_cannot_be_built_is_one_sentence(change, key):
    from jaxlm import model

    c = moe_config()
    with c.model.ignore_type(), c.model.moe.ignore_type():
        for name, value in change.items():
            section, _, field = name.rpartition("__")
            (c.model.moe if section else c.model)[field] = value
    with pytest.raises(ConfigError, match=re.escape(key)) as e:
        model.ModelConfig.from_config(c.model, 61)
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def expert_parallel_checkpoint(tmp_path_factory):
    """A run under ep_fsdp on (data 2, fsdp 4), one expert a device: saved after step 1, then
    steps 2 and 3. (checkpointer, saved state on the host, [step 2, step 3] losses, batches)."""
    from jaxlm import checkpoint
    from tests.helpers import packed_batch

    config = moe_config(bias_update_rate=RATE)
    source = moe_setup(config, "ep_fsdp", (2, 4, 1))
    batches = [packed_batch(8, 16, seed=s, vocab=62) for s in range(3)]
    ckpt = checkpoint.Checkpointer(str(tmp_path_factory.mktemp("ep") / "ckpt"), config.checkpoint)
    step = source.jit_train_step()
    state, _ = step(source.init_state(), sharding.host_to_global(batches[0], source.mesh))
    ckpt.save(1, state, None, {})
    ckpt.wait()
    saved = jax.device_get(state)
    losses = []
    for batch in batches[1:]:
        state, metrics = step(state, sharding.host_to_global(batch, source.mesh))
        losses.append(float(metrics["loss"]))
    yield source, ckpt, saved, losses, batches
    ckpt.close()


@pytest.mark.parametrize("target", ["same", "ep_fsdp_2", "one_device"])
def test_a_checkpoint_saved_under_expert_parallelism_resumes_on_another_degree(
    target, expert_parallel_checkpoint, one_device_setup
):
    """The expert-parallel degree is the fsdp axis's size (ep_fsdp puts `expert` on fsdp): a
    checkpoint of EP=4 restores bit for bit onto EP=4, EP=2 (fsdp 2 on 2 devices) and one
    device (every expert local), and continues: bitwise on the same mesh; within 1e-6 on
    another, where the gradient and expert-output sums run over other device groups (float
    addition in another order)."""
    source, ckpt, saved, losses, batches = expert_parallel_checkpoint
    setup = {
        "same": source,
        "ep_fsdp_2": moe_setup(moe_config(bias_update_rate=RATE), "ep_fsdp", (1, 2, 1),
                               jax.devices()[:2]),
        "one_device": one_device_setup,
    }[target]  # fmt: skip
    step, state, _, _ = ckpt.restore(setup.abstract_state, 1)
    assert step == 1
    w_gate = state["params"]["blocks"][0]["mlp"]["w_gate"]  # (X, D, F): whole experts a device
    if target != "one_device":
        assert w_gate.sharding.spec == jax.P("fsdp", None, None)
    assert w_gate.sharding.num_devices == {"same": 8, "ep_fsdp_2": 2, "one_device": 1}[target]
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(saved),
        jax.tree_util.tree_leaves_with_path(jax.device_get(state)),
        strict=True,
    ):
        assert np.array_equal(a, b), path  # optimizer state and router biases too
    train_step, got = setup.jit_train_step(), []
    for batch in batches[1:]:
        state, metrics = train_step(state, sharding.host_to_global(batch, setup.mesh))
        got.append(float(metrics["loss"]))
    if target == "same":
        assert got == losses
    else:
        np.testing.assert_allclose(got, losses, rtol=1e-6)
