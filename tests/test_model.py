"""Properties of the transformer: causality, packing isolation, KV-cache equivalence, shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import attention, generate, model

CFG = model.ModelConfig(
    vocab_size=61,
    d_model=28,
    n_layers=2,
    n_heads=6,
    n_kv_heads=2,
    head_dim=6,
    d_ff=44,
    max_seq_len=64,
)


@pytest.fixture(scope="module")
def net():
    return model.create(CFG, seed=3)


def test_changing_a_future_token_never_changes_past_logits(net):
    tokens = np.random.RandomState(0).randint(0, 61, (2, 13))
    changed = tokens.copy()
    changed[:, 7] = (changed[:, 7] + 5) % 61
    a, b = net(jnp.asarray(tokens)), net(jnp.asarray(changed))
    np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
    assert not np.allclose(a[:, 7:], b[:, 7:])  # the change is visible from position 7 on


def test_packed_documents_do_not_attend_to_each_other(net):
    rng = np.random.RandomState(1)
    doc_a, doc_b = rng.randint(0, 61, 5), rng.randint(0, 61, 8)
    packed = np.concatenate([doc_a, doc_b])[None]
    segment_ids = np.array([[1] * 5 + [2] * 8])
    positions = np.array([list(range(5)) + list(range(8))])
    logits = net(jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segment_ids))
    alone_a, alone_b = net(jnp.asarray(doc_a[None])), net(jnp.asarray(doc_b[None]))
    np.testing.assert_allclose(logits[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0, 5:], alone_b[0], rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_full_forward(net):
    graphdef, state = nnx.split(net)
    params = nnx.to_pure_dict(state)
    prompts = [[5, 17, 3, 44, 2], [9, 1, 30]]
    new = generate.generate(graphdef, params, prompts, max_new_tokens=7, eos_id=-1)
    for prompt, continuation in zip(prompts, new, strict=True):
        seq = list(prompt)
        for token in continuation:
            full = net(jnp.asarray([seq]))
            assert int(jnp.argmax(full[0, -1])) == token
            seq.append(token)


def test_cached_step_logits_match_full_forward_within_1e5(net):
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 61, (1, 11)))
    full = net(tokens)
    cache = model.init_cache(CFG, jnp.ones((1, 11), jnp.int32))
    logits, cache = net(
        tokens[:, :4], jnp.arange(4)[None], jnp.ones((1, 4), jnp.int32), cache=cache
    )
    steps = [logits]
    for t in range(4, 11):
        logits, cache = net(
            tokens[:, t : t + 1], jnp.array([[t]]), jnp.ones((1, 1), jnp.int32), cache=cache
        )
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_keeps_fp32_params_and_logits():
    net = model.create(dataclasses.replace(CFG, dtype="bfloat16"))
    logits = net(jnp.zeros((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(net)))


def test_remat_gives_the_same_gradients():
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, 61, (2, 9)))

    def grads(cfg):
        net = model.create(cfg, seed=0)
        graphdef, state = nnx.split(net)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)  # noqa: E731
        return jax.grad(loss)(nnx.to_pure_dict(state))

    plain, remat = grads(CFG), grads(dataclasses.replace(CFG, remat="full"))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_head_counts_are_one_clear_error():
    with pytest.raises(ValueError, match="n_heads=6 must be a multiple of model.n_kv_heads=4"):
        model.ModelConfig(
            vocab_size=61, d_model=28, n_layers=1, n_heads=6, n_kv_heads=4, head_dim=6, d_ff=44
        )


def test_splash_attention_equals_xla_in_logits_and_gradients():
    """The Pallas kernel (interpret mode off TPU) under packing, padding and GQA."""
    cfg = dataclasses.replace(CFG, max_seq_len=attention.SPLASH_LANES)
    splash_net = model.create(dataclasses.replace(cfg, attention="splash"), seed=3)
    xla_net = model.create(cfg, seed=3)
    rng = np.random.RandomState(4)
    L = attention.SPLASH_LANES  # the shortest sequence the kernel takes
    tokens = jnp.asarray(rng.randint(0, 61, (2, L)))
    segment_ids = np.ones((2, L), np.int32)
    segment_ids[0, 41:] = 2  # two documents in row 0 ...
    segment_ids[1, 100:] = 0  # ... padding at the end of row 1
    positions = np.concatenate([np.arange(41), np.arange(L - 41)])[None].repeat(2, 0)
    args = (tokens, jnp.asarray(positions), jnp.asarray(segment_ids))

    def loss_and_grads(net):
        graphdef, state = nnx.split(net)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(*args) ** 2)  # noqa: E731
        return net(*args), jax.grad(loss)(nnx.to_pure_dict(state))

    splash_logits, splash_grads = loss_and_grads(splash_net)
    xla_logits, xla_grads = loss_and_grads(xla_net)
    np.testing.assert_allclose(splash_logits, xla_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(splash_grads), jax.tree.leaves(xla_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_windowed_soft_capped_splash_under_scan_equals_xla_unrolled():
    """Splash's local and causal kernels, picked per layer inside one scan, with soft-capping
    and a query scale, against the XLA mask path: logits and gradients."""
    switches = dict(sliding_window=5, global_every=2, attn_softcap=2.0, query_scale_dim=7)
    cfg = dataclasses.replace(CFG, max_seq_len=attention.SPLASH_LANES, **switches)
    xla_net = model.create(cfg, seed=3)
    splash_cfg = dataclasses.replace(cfg, attention="splash", scan_layers=True)
    graphdef, _ = nnx.split(model.abstract(splash_cfg))
    L = attention.SPLASH_LANES
    rng = np.random.RandomState(5)
    tokens = jnp.asarray(rng.randint(0, 61, (1, L)))
    segment_ids = np.ones((1, L), np.int32)
    segment_ids[0, 50:] = 2
    positions = np.concatenate([np.arange(50), np.arange(L - 50)])[None]
    args = (tokens, jnp.asarray(positions), jnp.asarray(segment_ids))
    params = nnx.to_pure_dict(nnx.state(xla_net))

    def loss_and_grads(forward, params):
        loss = lambda p: jnp.mean(forward(p) ** 2)  # noqa: E731
        return forward(params), jax.grad(loss)(params)

    xla_logits, xla_grads = loss_and_grads(
        lambda p: nnx.merge(*nnx.split(xla_net)[:1], p)(*args), params
    )
    splash_logits, splash_grads = loss_and_grads(
        lambda p: nnx.merge(graphdef, p)(*args), model.stack_layers(params)
    )
    np.testing.assert_allclose(splash_logits, xla_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(
        jax.tree.leaves(model.unstack_layers(splash_grads)), jax.tree.leaves(xla_grads), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    no_window = model.create(dataclasses.replace(cfg, sliding_window=0, global_every=0), seed=3)
    assert not np.allclose(no_window(*args), xla_logits, atol=1e-3)  # the window matters here


def test_auto_attention_picks_the_fused_kernel_each_platform_can_run():
    assert attention.default_for("tpu", "float32", 64) == "splash"
    assert attention.default_for("gpu", "bfloat16", 128) == "cudnn"
    assert attention.default_for("gpu", "float32", 64) == "xla"  # cuDNN takes 16-bit inputs only
    assert attention.default_for("gpu", "bfloat16", 6) == "xla"  # ... and head dims of 8k
    assert attention.default_for("cpu", "bfloat16", 64) == "xla"


def test_splash_falls_back_to_xla_where_its_kernel_cannot_tile():
    # Scoring batches and KV-cache decoding have lengths the kernel cannot take.
    splash_net = model.create(dataclasses.replace(CFG, attention="splash"), seed=3)
    xla_net = model.create(CFG, seed=3)
    tokens = jnp.asarray(np.random.RandomState(5).randint(0, 61, (2, 40)))
    np.testing.assert_array_equal(splash_net(tokens), xla_net(tokens))
    assert not attention.splash_tiles(40, 40) and not attention.splash_tiles(128, 256)
    assert attention.splash_tiles(128, 128) and attention.splash_tiles(1024, 1024)


# --------------------------------------------------------------------------- scanned layers

SCAN_CFG = dataclasses.replace(CFG, n_layers=3)  # three layers: a mix-up of layers shows


def _unrolled_and_scanned(cfg=SCAN_CFG):
    """The same weights as an unrolled model and as a scanned one (stacked by stack_layers)."""
    unrolled = model.create(cfg, seed=5)
    g_loop, state = nnx.split(unrolled)
    params = nnx.to_pure_dict(state)
    g_scan, _ = nnx.split(model.abstract(dataclasses.replace(cfg, scan_layers=True)))
    return g_loop, params, g_scan, model.stack_layers(params)


def test_scanned_layers_equal_unrolled_in_logits_and_gradients():
    g_loop, params, g_scan, stacked = _unrolled_and_scanned()
    batch = {k: jnp.asarray(v) for k, v in _packed(3, 17).items()}

    def loss(graphdef, p):
        logits = nnx.merge(graphdef, p)(batch["inputs"], batch["positions"], batch["segment_ids"])
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

    (l_loop, logits_loop), grads_loop = jax.value_and_grad(lambda p: loss(g_loop, p), has_aux=True)(
        params
    )
    (l_scan, logits_scan), grads_scan = jax.value_and_grad(lambda p: loss(g_scan, p), has_aux=True)(
        stacked
    )
    np.testing.assert_allclose(logits_scan, logits_loop, rtol=0, atol=1e-5)
    assert abs(float(l_scan - l_loop)) < 1e-6
    flat_loop = jax.tree.leaves(model.stack_layers(grads_loop))
    for a, b in zip(jax.tree.leaves(grads_scan), flat_loop, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The layers really are distinct: reversing their order changes the logits.
    reversed_layers = dict(params, blocks={i: params["blocks"][2 - i] for i in range(3)})
    other = nnx.merge(g_scan, model.stack_layers(reversed_layers))(batch["inputs"])
    assert not np.allclose(other, nnx.merge(g_scan, stacked)(batch["inputs"]), atol=1e-3)


def test_scanned_parameters_carry_a_leading_layers_axis():
    scanned = model.abstract(dataclasses.replace(SCAN_CFG, scan_layers=True))
    axes = model.logical_axes(nnx.state(scanned))
    shapes = nnx.to_pure_dict(nnx.state(scanned))
    assert axes["blocks"]["attn"]["wq"] == ("layers", "embed", "heads", "head_dim")
    assert shapes["blocks"]["attn"]["wq"].shape == (3, 28, 6, 6)
    assert axes["embed"] == ("vocab", "embed")  # outside the blocks nothing changes
    unrolled = model.abstract(SCAN_CFG)
    assert model.count_params(shapes) == model.count_params(nnx.to_pure_dict(nnx.state(unrolled)))


def test_stack_and_unstack_layers_are_inverse():
    _, params, _, stacked = _unrolled_and_scanned()
    back = model.unstack_layers(jax.tree.map(np.asarray, stacked))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_scanned_cached_decoding_equals_unrolled():
    g_loop, params, g_scan, stacked = _unrolled_and_scanned()
    prompts = [[5, 17, 3, 44, 2], [9, 1, 30]]
    loop = generate.generate(g_loop, params, prompts, max_new_tokens=6, eos_id=-1)
    scan = generate.generate(g_scan, stacked, prompts, max_new_tokens=6, eos_id=-1)
    assert scan == loop


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_scanned_remat_gives_the_same_gradients(policy):
    _, params, g_scan, stacked = _unrolled_and_scanned()
    remat_cfg = dataclasses.replace(SCAN_CFG, scan_layers=True, remat=policy)
    g_remat, _ = nnx.split(model.abstract(remat_cfg))
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 61, (2, 11)))
    grad = lambda g: jax.grad(lambda p: jnp.sum(nnx.merge(g, p)(tokens) ** 2))(stacked)  # noqa: E731
    for a, b in zip(jax.tree.leaves(grad(g_remat)), jax.tree.leaves(grad(g_scan)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _packed(batch, seq_len):
    from tests.helpers import packed_batch

    return packed_batch(batch, seq_len, seed=4)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("scan", [True, False])
def test_flops_per_token_counts_every_weight_of_the_built_model(tie, scan):
    """The shape formula in ModelConfig.flops_per_token cannot drift from the real model."""
    cfg = dataclasses.replace(CFG, tie_embeddings=tie, scan_layers=scan)
    n_params = model.count_params(nnx.state(model.abstract(cfg), nnx.Param))
    V, D, L = cfg.vocab_size, cfg.d_model, 37
    matmul = n_params - V * D * (1 if tie else 2) + V * D  # the head, never the lookup
    attention_flops = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * L
    assert cfg.flops_per_token(L) == 6 * matmul + attention_flops
