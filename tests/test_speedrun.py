"""The speedrun switches (issue 26): ReLU² MLP, zero-initialised output projections, z-loss,
the untied head's own optimizer group, value embeddings, multi-token prediction heads, the Muon
variants (Polar Express, NorMuon). Each learns from scratch, all of them together shard exactly
and resume bitwise, the z-loss and the heads' loss are their formulas, and a model Hugging Face
cannot express is refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import checkpoint, loss, optim, sharding, speedrun, train
from jaxlm import model as model_lib
from jaxlm import spec as run_spec
from jaxlm.convert import hf
from jaxlm.errors import ConfigError, ConvertError
from tests.helpers import one_sentence, packed_batch, tiny_config

VOCAB = 62  # the tokenizer's vocabulary in the train tests
RELU2 = {"model.mlp_act": "relu2", "model.d_ff": 84}  # 1.5 x the tiny SwiGLU's 56: same size
ZERO_INIT = {"model.zero_init_out": True}
# A frozen embedding beside a moving head shows the head's group is its own.
HEAD = {"optim.groups.embedding.lr_scale": 0.0, "optim.groups.head.lr_scale": 2.0}
VALUE_EMBEDS = {"model.value_embeds": 1}  # 2 layers: the one table feeds both
MTP = {"model.mtp_heads": 2}
NORMUON = {"optim.name": "muon", "optim.muon.variant": "normuon"}
ALL = {**RELU2, **ZERO_INIT, **HEAD, "optim.groups.head.wd_scale": 0.0, "train.z_loss": 1e-2}
ALL |= {**VALUE_EMBEDS, **MTP, **NORMUON}


def make_setup(overrides, devices=None):
    config = tiny_config()
    for key, value in overrides.items():
        section, *inner, name = key.split(".")
        node = config[section]
        for part in inner:
            node = node[part]
        node[name] = value
    mesh = sharding.make_mesh((1, -1, 1), devices)
    return train.Setup(run_spec.build(config), vocab_size=VOCAB, mesh=mesh)


def run_steps(setup, batches, metric="loss"):
    state, step, losses = setup.init_state(), setup.jit_train_step(), []
    for batch in batches:
        state, metrics = step(state, sharding.host_to_global(batch, setup.mesh))
        losses.append(float(metrics[metric]))
    return state, losses


# Each model switch alone; z-loss and the head group (step-only switches, whose programs cost
# a compile each) learn in the all-on run below and are checked exactly on their own.
@pytest.mark.parametrize(
    "switch",
    [RELU2, ZERO_INIT, VALUE_EMBEDS, MTP],
    ids=["relu2", "zero_init_out", "value_embeds", "mtp_heads"],
)
def test_each_model_switch_learns_from_scratch_on_a_repeated_batch(switch):
    setup = make_setup(switch, jax.devices()[:1])
    init = jax.device_get(setup.init_state()["params"])["blocks"][0]
    # The heads' own loss must fall too: they are trained, not only carried.
    metric = "mtp_loss" if switch is MTP else "loss"
    _, losses = run_steps(setup, [packed_batch(8, 16, seed=9, vocab=VOCAB)] * 6, metric)
    assert losses[-1] < (0.9 if switch is MTP else 0.75) * losses[0], losses
    plain = make_setup({}, jax.devices()[:1]).n_params
    if switch is VALUE_EMBEDS:  # one (V, K, E) table, one (K,) gate in each of the 2 layers
        assert setup.n_params == plain + VOCAB * 2 * 10 + 2 * 2
        np.testing.assert_array_equal(init["attn"]["value_gate"], [0.5, 0.5])
    elif switch is MTP:  # per head a (D, D) map and a (D,) norm scale
        assert setup.n_params == plain + 2 * (40 * 40 + 40)
    elif switch is RELU2:  # two MLP matrices, as many parameters as the SwiGLU
        assert sorted(init["mlp"]) == ["w_down", "w_up"]
        assert setup.n_params == plain
    else:  # only the output projections start at zero
        assert not init["attn"]["wo"].any() and not init["mlp"]["w_down"].any()
        assert init["attn"]["wq"].any() and init["mlp"]["w_up"].any()


def test_all_switches_on_learn_shard_exactly_and_resume_bitwise(tmp_path):
    batches = [packed_batch(8, 16, seed=9, vocab=VOCAB)] * 4
    _, expected = run_steps(make_setup(ALL, jax.devices()[:1]), batches)
    assert expected[-1] < 0.85 * expected[0], expected
    setup = make_setup(ALL)
    assert setup.mesh.devices.size == 8
    init = jax.device_get(setup.init_state()["params"])
    state, losses = run_steps(setup, batches)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    params = jax.device_get(state["params"])
    np.testing.assert_array_equal(params["embed"], init["embed"])
    assert not np.array_equal(params["lm_head"], init["lm_head"])

    half, _ = run_steps(setup, batches[:2])
    ckpt = checkpoint.Checkpointer(str(tmp_path), setup.config.checkpoint)
    ckpt.save(2, half, None, {"param_shapes": checkpoint.param_shapes(half["params"])})
    ckpt.wait()
    _, restored, _, _ = ckpt.restore(setup.abstract_state)
    ckpt.close()
    step = setup.jit_train_step()
    for batch in batches[2:]:
        restored, _ = step(restored, sharding.host_to_global(batch, setup.mesh))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_z_loss_is_the_formula_in_training_and_absent_from_held_out_loss():
    setup = make_setup({}, jax.devices()[:1])
    graphdef, params = setup.graphdef, setup.init_state()["params"]
    batch = packed_batch(4, 16, seed=2, vocab=VOCAB)
    batch["loss_mask"][:, :5] = 0.0  # only target tokens count
    coef = 0.3  # large, so a missing or doubled term cannot hide in rounding

    def losses(params):
        plain = train.loss_sums(graphdef, params, batch, 0, coef)
        tiled = train.loss_sums(graphdef, params, batch, 16, coef)  # 4 tiles of the vocabulary
        held_out = train.make_eval_step(graphdef)(params, batch)
        return train._logits(graphdef, params, batch), plain, tiled, held_out

    logits, plain, tiled, held_out = jax.jit(losses)(params)
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits).sum(-1))  # (B, L)
    nll = lse - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    expected = ((nll + coef * lse**2) * mask).sum() / mask.sum()
    for total, count in (plain, tiled):
        np.testing.assert_allclose(float(total / count), expected, rtol=1e-6)
    np.testing.assert_allclose(
        float(held_out["nll"] / held_out["count"]), (nll * mask).sum() / mask.sum(), rtol=1e-6
    )


def test_tiled_z_loss_gradients_equal_the_plain_ones():
    r = np.random.RandomState(0)
    hidden = jnp.asarray(r.randn(3, 7, 11), jnp.float32)
    head = jnp.asarray(r.randn(11, 53), jnp.float32)  # 53: a ragged last tile of 8
    targets = jnp.asarray(r.randint(0, 53, (3, 7)), jnp.int32)

    def plain(hidden, head):
        logits = jnp.einsum("BLD,DV->BLV", hidden, head)
        lse = jax.nn.logsumexp(logits, axis=-1)
        nll = lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return jnp.sum(nll + 0.3 * lse**2)

    def tiled(hidden, head):
        nll, lse = loss.token_nll_and_lse(hidden, head, targets, 8)
        return jnp.sum(nll + 0.3 * lse**2)

    both = jax.jit(lambda *a: (jax.grad(tiled, (0, 1))(*a), jax.grad(plain, (0, 1))(*a)))
    got, want = both(hidden, head)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_relu2_flops_count_the_two_matrices_and_export_is_refused_in_one_sentence():
    cfg = model_lib.ModelConfig(VOCAB, 40, 2, 4, 2, 10, 84, mlp_act="relu2")
    n_params = model_lib.count_params(nnx.state(model_lib.abstract(cfg), nnx.Param))
    matmul = n_params - VOCAB * 40  # every weight but the embedding lookup (the head is counted)
    assert cfg.flops_per_token(13) == 6 * matmul + cfg.attention_flops_per_token(13)
    for family in ("", "llama"):
        with pytest.raises(ConvertError, match="mlp_act") as refused:
            dataclasses.replace(cfg, family=family).to_hf()
        assert "\n" not in str(refused.value) and str(refused.value).count(". ") == 0


def test_a_head_group_without_an_untied_head_is_refused():
    with pytest.raises(ConfigError, match="optim.groups.head"):
        make_setup({"model.tie_embeddings": True, **HEAD})


def test_mtp_loss_is_the_cross_entropy_of_later_targets_in_the_same_document():
    setup = make_setup(MTP, jax.devices()[:1])
    graphdef, params = setup.graphdef, setup.init_state()["params"]
    batch = packed_batch(4, 16, seed=3, vocab=VOCAB)
    batch["loss_mask"][:, 11:] = 0.0

    def both(params):
        model = nnx.merge(graphdef, params)
        hidden, head, _, _ = model.hidden_and_head(
            batch["inputs"], batch["positions"], batch["segment_ids"]
        )
        mtp = speedrun.mtp_loss(model, hidden, head, batch, 0)
        return mtp, train._logits(graphdef, params, batch)

    got, logits = jax.jit(both)(params)
    # At init each head's map is zero: head j reads the main prediction at t, scored against
    # the target of t + j, where t + j holds a target of t's document.
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    seg, targets, mask = batch["segment_ids"], batch["targets"], batch["loss_mask"]
    expected = []
    for j in (1, 2):
        nll = -np.take_along_axis(logp[:, :-j], targets[:, j:, None], -1)[..., 0]
        weight = mask[:, j:] * (seg[:, j:] == seg[:, :-j])
        assert 0 < weight.sum() < weight.size  # documents and the mask both cut pairs
        expected.append((nll * weight).sum() / weight.sum())
    np.testing.assert_allclose(float(got), np.mean(expected), rtol=1e-4)


def _matrix_update(variant, grad, ns_loop=False):
    """The first Muon step of `variant` on one (fan-in, fan-out) matrix at learning rate 1."""
    c = tiny_config().optim
    c.muon.ns_loop = ns_loop
    c.name, c.muon.variant, c.muon.lr, c.lr, c.clip_norm, c.weight_decay = (
        "muon",
        variant,
        1.0,
        1.0,
        0.0,
        0.0,
    )
    tx = optim.make_optimizer(c, lambda _: 1.0)
    params = {"w_up": jnp.zeros_like(grad)}
    updates, _ = tx.update({"w_up": grad}, tx.init(params), params)
    return np.asarray(updates["w_up"], np.float64)


def test_polar_express_orthogonalizes_tighter_and_normuon_evens_the_neurons():
    r = np.random.RandomState(0)
    grad = jnp.asarray(r.randn(37, 53) * np.logspace(-2, 0, 53), jnp.float32)  # a wide spectrum
    spread = {}
    for variant in ("newton_schulz", "polar_express"):
        s = np.linalg.svd(_matrix_update(variant, grad), compute_uv=False)
        spread[variant] = s.max() / s.min()
    assert spread["polar_express"] < 1.4 < 1.6 < spread["newton_schulz"], spread
    plain, normed = _matrix_update("newton_schulz", grad), _matrix_update("normuon", grad)
    neuron_norms = np.linalg.norm(normed, axis=0)  # one per output (fan-out) neuron
    np.testing.assert_allclose(neuron_norms, neuron_norms.mean(), rtol=1e-4)
    assert np.ptp(np.linalg.norm(plain, axis=0)) > 0.1 * neuron_norms.mean()
    np.testing.assert_allclose(np.linalg.norm(normed), np.linalg.norm(plain), rtol=1e-5)
    with pytest.raises(ConfigError, match="optim.muon.ns_steps=6"):
        optim.polar_express_coeffs(6)
    # Newton-Schulz unrolled (the default) and as a scanned loop: the same update.
    looped = _matrix_update("newton_schulz", grad, ns_loop=True)
    np.testing.assert_allclose(plain, looped, rtol=2e-5, atol=1e-6)
    assert np.abs(plain - _matrix_update("polar_express", grad)).max() > 1e-2  # it can fail


def test_value_embeds_refuse_export_and_scanning_and_mtp_heads_are_dropped_or_refused():
    cfg = model_lib.ModelConfig(VOCAB, 40, 2, 4, 2, 10, 56, value_embeds=1)
    for family in ("", "llama"):
        with pytest.raises(ConvertError, match="value_embeds") as refused:
            dataclasses.replace(cfg, family=family).to_hf()
        assert "\n" not in str(refused.value) and str(refused.value).count(". ") == 0
    with pytest.raises(ConfigError, match="scan_layers"):
        dataclasses.replace(cfg, scan_layers=True)
    mtp = model_lib.ModelConfig(VOCAB, 40, 2, 4, 2, 10, 56, mtp_heads=2)
    assert mtp.to_hf() == dataclasses.replace(mtp, mtp_heads=0).to_hf()
    assert hf.layout(mtp) == hf.layout(dataclasses.replace(mtp, mtp_heads=0))
    config = tiny_config(mtp_heads=2)
    config.objective = "masked"
    with pytest.raises(ConfigError, match="objective=causal"):
        run_spec.build(config)


def test_a_muon_setting_that_reshapes_the_optimizer_state_refuses_to_resume_in_one_sentence():
    from jaxlm import resume

    old = {"optim": {"name": "muon", "muon": {"variant": "newton_schulz"}}}  # before ns_loop
    looped = {"optim": {"name": "muon", "muon": {"variant": "newton_schulz", "ns_loop": True}}}
    resume.check_optimizer_state(old, old, "W")
    resume.check_optimizer_state(  # the default of the missing key is the saved run's
        {"optim": {"name": "muon", "muon": {"variant": "newton_schulz", "ns_loop": False}}},
        old,
        "W",
    )
    with pytest.raises(ConfigError, match=r"optim.muon.ns_loop=True .* W \(False\)") as refused:
        resume.check_optimizer_state(looped, old, "W")
    one_sentence(refused)
    adam = {"optim": {"name": "adamw", "muon": {"ns_loop": True}}}
    resume.check_optimizer_state(adam, {"optim": {"name": "adamw"}}, "W")  # not Muon's state
    with pytest.raises(ConfigError, match="optim.name='adamw'"):
        resume.check_optimizer_state(adam, old, "W")
