"""The mixture-of-experts Hugging Face families (Qwen3-MoE, OLMoE, Mixtral): for a tiny random
model of each, built in-process with transformers (fp32, CPU), jaxlm's dropless logits match
within 1e-4 on a padded batch longer than the sliding window, and an export reloads in
transformers bit for bit; continued pretraining (`configs/continue_pretraining.py` unchanged)
starts from exactly the source model under expert parallelism and trains; what a family cannot
say is refused in one sentence.

Odd sizes everywhere (6 experts, top-2, expert width 38, hidden 96, 6 heads, 2 kv heads, vocab
333, 3 layers, window 7 < the 19-token rows) so a swapped axis cannot pass by accident.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm import model as model_lib
from jaxlm.convert import hf
from jaxlm.errors import ConvertError
from tests.helpers import export_and_reload, one_sentence, read_params

VOCAB, WINDOW, EXPERTS = 333, 7, 6
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=96,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    router_aux_loss_coef=0.02,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# family -> (transformers config class, its overrides, what the import must set)
FAMILIES = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            num_experts=EXPERTS,
            moe_intermediate_size=38,
            intermediate_size=56,  # the dense layer's MLP
            mlp_only_layers=[0],
            norm_topk_prob=True,
            head_dim=24,  # not hidden / heads
            use_sliding_window=True,
            sliding_window=WINDOW,
        ),
        dict(qk_norm="head", head_dim=24, d_ff=56, sliding_window=WINDOW),
        dict(expert_d_ff=38, normalize_top_k=True, first_dense_layers=1),
    ),
    "olmoe": (
        "OlmoeConfig",
        dict(num_experts=EXPERTS, intermediate_size=38, norm_topk_prob=False),
        dict(qk_norm="full"),
        dict(expert_d_ff=38, normalize_top_k=False, first_dense_layers=0),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(num_local_experts=EXPERTS, intermediate_size=38, sliding_window=WINDOW),
        dict(qk_norm="none", sliding_window=WINDOW),
        dict(expert_d_ff=38, normalize_top_k=True, first_dense_layers=0),
    ),
}
EAGER = dict(attn_implementation="eager", experts_implementation="eager")
PAD = 6  # left padding of the second row
ROWS = np.random.RandomState(7).randint(3, VOCAB, (2, 19))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, params, tokens, positions=None, segment_ids=None):
    return nnx.merge(graphdef, params)(tokens, positions, segment_ids)


@dataclasses.dataclass
class Built:
    torch_model: object
    hf_dir: str
    cfg: model_lib.ModelConfig
    params: dict


def _torch_model(family, **overrides):
    import torch
    import transformers

    config_class, family_overrides, _, _ = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**COMMON, **family_overrides, **overrides})
    torch.manual_seed(len(family))
    auto = transformers.AutoModelForCausalLM
    # eager: the plain softmax attention and per-expert loop (grouped_mm needs 16-byte strides)
    model = auto.from_config(config, **EAGER).eval()
    with torch.no_grad():  # norms (1 at init) random, so none can be skipped
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def built(request, tmp_path_factory):
    """One tiny random transformers model per family, saved and read by jaxlm."""
    family = request.param
    torch_model = _torch_model(family)
    hf_dir = str(tmp_path_factory.mktemp(family))
    torch_model.save_pretrained(hf_dir)
    cfg, params = read_params(hf_dir)
    return Built(torch_model, hf_dir, cfg, params)


def test_import_sets_the_familys_switches_and_routing(built):
    _, _, switches, routing = FAMILIES[built.cfg.family]
    for key, value in switches.items():
        assert getattr(built.cfg, key) == value, key
    moe = built.cfg.moe
    assert (moe.n_experts, moe.top_k, moe.router, moe.n_shared_experts) == (6, 2, "softmax", 0)
    assert moe.aux_loss_coef == 0.02 and moe.capacity_factor == 0  # router_aux_loss_coef; dropless
    for key, value in routing.items():
        assert getattr(moe, key) == value, key
    sparse = [built.cfg.is_sparse(i) for i in range(3)]
    assert sparse == [type(b.mlp).__name__.endswith("SparseMoeBlock") for b in _layers(built)]


def _layers(built):
    return built.torch_model.model.layers


def test_logits_match_transformers_on_a_padded_batch_longer_than_the_window(built):
    import torch

    tokens = ROWS.copy()
    mask = np.ones_like(tokens)
    mask[1, :PAD] = 0
    tokens[1, :PAD] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        theirs = built.torch_model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    graphdef, _ = nnx.split(model_lib.abstract(built.cfg))
    ours = np.asarray(_apply(graphdef, built.params, tokens, positions, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


def test_export_reloads_in_transformers_bit_for_bit(built, tmp_path):
    reloaded = export_and_reload(built.hf_dir, built.torch_model, tmp_path)
    source = built.torch_model.config
    keys = (
        *("num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob"),
        *("moe_intermediate_size", "intermediate_size", "decoder_sparse_step", "mlp_only_layers"),
        *("router_aux_loss_coef", "sliding_window", "head_dim", "rope_parameters", "clip_qkv"),
    )
    for key in (*keys, "bos_token_id", "eos_token_id", "pad_token_id"):
        if hasattr(source, key):  # the settings that shape the function, read back the same
            assert _setting(reloaded.config, key) == _setting(source, key), key


def _setting(config, key):
    """A config's value of `key`; Mixtral's head_dim None means hidden_size / heads."""
    value = getattr(config, key)
    if key == "head_dim" and value is None:
        return config.hidden_size // config.num_attention_heads
    return value


@pytest.mark.slow  # a scanned, expert-parallel train step compiles: ~10 s of CPU
def test_continued_pretraining_from_mixtral_starts_at_its_loss_trains_and_exports(tmp_path):
    """The recipe, unchanged, on a Mixtral directory: a scanned ep_fsdp run (fsdp 2: 3 experts
    a device) whose first loss is transformers' cross-entropy on the same batch, which 3 steps
    lower; the trained, stacked and expert-sharded run exports every tensor bit for bit."""
    import torch
    import transformers

    from configs import continue_pretraining
    from jaxlm import checkpoint as ckpt_lib
    from jaxlm import sharding, train
    from jaxlm import spec as run_spec
    from jaxlm.convert import init_from as warm_start
    from tests.helpers import packed_batch

    torch_model = _torch_model("mixtral")
    hf_dir = tmp_path / "mixtral"
    torch_model.save_pretrained(hf_dir)
    config = continue_pretraining.get_config(str(hf_dir))
    assert config.init_from == f"hf:{hf_dir}" and config.model.scan_layers
    config.model.dtype = "float32"  # the parity is fp32's
    config.train.update(batch_size=8, seq_len=16)
    config.optim.update(init_lr=3e-3, lr=3e-3, warmup_steps=1)  # a random model moves faster
    config.model.moe.grouped_matmul = "ragged"  # CPU's tiled default compiles much slower
    config.mesh.preset = "ep_fsdp"
    setup = train.Setup(
        run_spec.build(config), VOCAB, sharding.make_mesh((1, 2, 1), jax.devices()[:2])
    )
    assert setup.model_cfg.moe.aux_loss_coef == 0.02
    state = setup.init_state()
    state["params"] = warm_start.load_params(config.init_from, setup, log=lambda _: None)
    assert state["params"]["blocks"]["mlp"]["w_gate"].sharding.spec == jax.P(
        None, "fsdp", None, None
    )

    batch = packed_batch(8, 16, seed=3, vocab=VOCAB)
    batch["segment_ids"] = np.ones_like(batch["segment_ids"])  # one document a row, as HF sees
    batch["positions"] = np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy()
    with torch.no_grad():
        logits = torch_model(input_ids=torch.tensor(batch["inputs"], dtype=torch.long)).logits
        theirs = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), torch.tensor(batch["targets"], dtype=torch.long).ravel()
        ).item()
    step, losses = setup.jit_train_step(), []
    for _ in range(3):
        state, metrics = step(state, sharding.host_to_global(batch, setup.mesh))
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(theirs, abs=1e-5)  # the run starts from the HF model
    assert losses[2] < losses[0] - 0.05, losses

    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "run" / "checkpoints"), config.checkpoint)
    meta = {"model_config": dataclasses.asdict(setup.model_cfg)}
    ckpt.save(3, state, None, meta, force=True)
    ckpt.close()
    out = hf.export_hf(str(tmp_path / "run"), str(tmp_path / "out"), progress=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, **EAGER).eval()
    trained = model_lib.unstack_layers(jax.device_get(state["params"]))
    _, exported = read_params(out)  # every tensor, experts restacked, bit for bit
    for (path, want), (_, got) in zip(
        jax.tree_util.tree_leaves_with_path(trained),
        jax.tree_util.tree_leaves_with_path(exported),
        strict=True,
    ):
        assert np.array_equal(got, want), path
    w_up = trained["blocks"][2]["mlp"]["w_up"]  # (X, D, F): expert 5's up_proj is its slice
    fused = reloaded.model.layers[2].mlp.experts.gate_up_proj  # (X, 2F, D): gate, then up
    assert np.array_equal(fused[5, 38:].detach().numpy(), w_up[5].T)


# --------------------------------------------------------------------------- refusals


def _moe_model(**changes):
    fields = dict(
        vocab_size=VOCAB, d_model=96, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=16, d_ff=38,
        moe={"n_experts": EXPERTS, "top_k": 2},
    )  # fmt: skip
    return model_lib.ModelConfig(**{**fields, **changes})


def test_a_dense_family_refuses_an_moe_model_and_an_moe_family_a_dense_one():
    with pytest.raises(ConvertError) as e:
        _moe_model(family="llama").to_hf()
    assert one_sentence(e).startswith(
        "model.moe.n_experts=6 cannot be exported as LlamaForCausalLM, which is a dense model"
    )
    with pytest.raises(ConvertError) as e:
        _moe_model(family="mixtral", moe=None).to_hf()
    assert "model.moe.n_experts=0 cannot be exported as MixtralForCausalLM" in one_sentence(e)
    # With no family named, an MoE model exports as the MoE family with its switches.
    assert _moe_model().to_hf()["architectures"] == ["MixtralForCausalLM"]
    assert _moe_model(qk_norm="full").to_hf()["architectures"] == ["OlmoeForCausalLM"]


@pytest.mark.parametrize(
    "family,moe,message",
    [
        ("mixtral", {"router": "sigmoid"}, "model.moe.router='sigmoid' cannot be exported as Mix"),
        ("mixtral", {"normalize_top_k": False}, "model.moe.normalize_top_k=False cannot be"),
        ("olmoe", {"n_shared_experts": 1}, "model.moe.n_shared_experts=1 cannot be exported as O"),
        ("olmoe", {"first_dense_layers": 1}, "model.moe.first_dense_layers=1 cannot be exported"),
        ("qwen3_moe", {"bias_update_rate": 1e-3}, "model.moe.bias_update_rate=0.001 cannot be"),
    ],
)
def test_a_routing_the_family_lacks_is_refused_on_export(family, moe, message):
    qk_norm = {"mixtral": "none", "olmoe": "full", "qwen3_moe": "head"}[family]
    cfg = _moe_model(family=family, qk_norm=qk_norm, moe={"n_experts": 6, "top_k": 2, **moe})
    with pytest.raises(ConvertError) as e:
        cfg.to_hf()
    assert message in one_sentence(e)


@pytest.mark.parametrize(
    "family,changes,message",
    [
        ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1 is not supported"),
        ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0 is not supported"),
        ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers=[1] is not a pattern jaxlm"),
        ("qwen3_moe", {"decoder_sparse_step": 4}, "leave no sparse layer"),
    ],
)
def test_an_option_jaxlm_lacks_is_refused_on_import(family, changes, message):
    config_class, overrides, _, _ = FAMILIES[family]
    model_type = {"qwen3_moe": "qwen3_moe", "olmoe": "olmoe", "mixtral": "mixtral"}[family]
    architecture = {"qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe", "mixtral": "Mixtral"}[family]
    config = {
        **COMMON,
        **overrides,
        **changes,
        "model_type": model_type,
        "architectures": [architecture + "ForCausalLM"],
    }
    with pytest.raises(ConvertError) as e:
        model_lib.ModelConfig.from_hf(config)
    assert message in one_sentence(e)


def test_init_from_refuses_a_run_whose_experts_differ_from_the_source():
    from jaxlm.convert import init_from as warm_start
    from jaxlm.errors import ConfigError

    source = _moe_model()
    warm_start.check_shapes("hf:base", source, _moe_model(moe={"n_experts": 6, "top_k": 2}))
    for run, message in [
        (_moe_model(moe={"n_experts": 6, "top_k": 3}), "has moe.top_k=2 but the run's model.moe"),
        (_moe_model(moe=None), "has moe.n_experts=6 but the run's model.moe.n_experts is 0"),
    ]:
        with pytest.raises(ConfigError) as e:
            warm_start.check_shapes("hf:base", source, run)
        assert message in one_sentence(e)


@pytest.mark.parametrize(
    "step,dense_layers,sparse",
    [(2, [], [False, True, False, True]), (1, [0, 1, 3], [False, False, True, False])],
)
def test_qwen3_moe_sparse_layers_round_trip(step, dense_layers, sparse):
    config_class, overrides, _, _ = FAMILIES["qwen3_moe"]
    hf_config = {
        **COMMON,
        **overrides,
        "num_hidden_layers": 4,
        "decoder_sparse_step": step,
        "mlp_only_layers": dense_layers,
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
    }
    cfg = model_lib.ModelConfig.from_hf(hf_config)
    assert [cfg.is_sparse(i) for i in range(4)] == sparse
    back = cfg.to_hf()
    assert (back["decoder_sparse_step"], back["mlp_only_layers"]) == (step, dense_layers)


def test_the_recipe_on_a_qwen3_moe_with_dense_layers_asks_for_unscanned_layers(tmp_path):
    """configs/continue_pretraining.py scans the layers; Qwen3-MoE's mlp_only_layers mixes
    dense and sparse blocks, which one scanned block cannot hold: one sentence says what to set."""
    import json

    from configs import continue_pretraining
    from jaxlm import spec as run_spec
    from jaxlm.errors import ConfigError

    _, overrides, _, _ = FAMILIES["qwen3_moe"]
    config = {**COMMON, **overrides, "model_type": "qwen3_moe"}
    config["architectures"] = ["Qwen3MoeForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    recipe = continue_pretraining.get_config(str(tmp_path))
    with pytest.raises(ConfigError) as e:
        run_spec.build(recipe)
    assert "set model.scan_layers=False" in one_sentence(e)
    recipe.model.scan_layers = False
    recipe.train.seq_len = 64  # within the tiny model's 128 positions
    assert run_spec.build(recipe).model.moe.first_dense_layers == 1
