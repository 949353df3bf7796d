"""The Hugging Face families beyond Llama (Qwen2, Qwen3, Mistral, OLMo-2, Gemma-2, Gemma-3 text):
for a tiny random model of each (tests/family_models.py: odd sizes, window 7 < the 19-token
rows), built in-process with transformers (fp32, CPU), jaxlm's logits match within 1e-4 on a
padded batch longer than the sliding window, greedy generation is identical, an export reloads
in transformers bit for bit, and cached decoding (scanned layers) equals the full forward pass.
The same models through the tools are tests/test_families_e2e.py's; each switch alone, from
scratch, tests/test_families_switches.py's.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxlm import generate
from jaxlm import model as model_lib
from jaxlm.errors import ConfigError, ConvertError
from tests.family_models import COMMON, FAMILIES, VOCAB, WINDOW, make_family_model
from tests.helpers import export_and_reload, one_sentence, read_params

PAD = 6  # left padding of the second row
ROWS = np.random.RandomState(7).randint(3, VOCAB, (2, 19))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, params, tokens, positions=None, segment_ids=None, cache=None):
    """The model's forward pass, compiled once per family and shape (eager is ~10x slower)."""
    return nnx.merge(graphdef, params)(tokens, positions, segment_ids, cache)


@dataclasses.dataclass
class Built:
    torch_model: object
    hf_dir: str
    cfg: model_lib.ModelConfig
    params: dict


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def built(request, tmp_path_factory):
    """One tiny random transformers model per family, saved and read by jaxlm."""
    family = request.param
    hf_dir = str(tmp_path_factory.mktemp(family))
    torch_model = make_family_model(family, hf_dir)
    cfg, params = read_params(hf_dir)
    return Built(torch_model, hf_dir, cfg, params)


def test_import_sets_the_familys_switches(built):
    family = built.cfg.family
    for key, value in FAMILIES[family][2].items():
        assert getattr(built.cfg, key) == value, key


def _padded_batch():
    """Row 0: 19 tokens; row 1: 13 tokens left-padded by PAD slots. (tokens, mask, positions)."""
    tokens = ROWS.copy()
    mask = np.ones_like(tokens)
    mask[1, :PAD] = 0
    tokens[1, :PAD] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions


def test_logits_match_transformers_on_a_padded_batch_longer_than_the_window(built):
    import torch

    tokens, mask, positions = _padded_batch()
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
    # the padded row's real tokens equal the same tokens alone (padding is invisible)
    alone = np.asarray(_apply(graphdef, built.params, tokens[1:, PAD:]))
    np.testing.assert_allclose(ours[1, PAD:], alone[0], atol=1e-5, rtol=1e-5)


def test_greedy_generation_is_identical(built):
    import torch

    prompts = [list(ROWS[0, :12]), list(ROWS[1, :5])]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = built.torch_model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    graphdef, _ = nnx.split(model_lib.abstract(built.cfg))
    ours = generate.generate(graphdef, built.params, prompts, max_new_tokens=20, eos_id=-1)
    assert ours == out[:, width:].tolist()


def test_export_reloads_in_transformers_bit_for_bit(built, tmp_path):
    reloaded = export_and_reload(built.hf_dir, built.torch_model, tmp_path)
    source = built.torch_model.config
    keys = ("sliding_window", "layer_types", "query_pre_attn_scalar", "head_dim", "rope_parameters")
    for key in (*keys, "bos_token_id", "eos_token_id", "pad_token_id"):
        if hasattr(source, key):  # the settings that shape the function, read back the same
            assert getattr(reloaded.config, key) == getattr(source, key), key


def test_scanned_cached_decoding_equals_the_full_forward(built):
    """On the scanned layout, the padded batch: the forward equals the unrolled one, and a
    4-token prefill then 15 single-token steps (past the window) give the same logits."""
    tokens, mask, positions = _padded_batch()
    unrolled, _ = nnx.split(model_lib.abstract(built.cfg))
    full = np.asarray(_apply(unrolled, built.params, tokens, positions, mask))  # compiled above
    cfg = dataclasses.replace(built.cfg, scan_layers=True)
    graphdef, _ = nnx.split(model_lib.abstract(cfg))
    params = model_lib.stack_layers(built.params)
    real = mask.astype(bool)
    scanned = np.asarray(_apply(graphdef, params, tokens, positions, mask))
    np.testing.assert_allclose(scanned[real], full[real], atol=1e-5, rtol=1e-5)
    cache = model_lib.init_cache(cfg, jnp.asarray(mask))
    steps = []
    for start, end in [(0, 4), *((t, t + 1) for t in range(4, 19))]:
        cols = slice(start, end)
        logits, cache = _apply(
            graphdef, params, tokens[:, cols], positions[:, cols], mask[:, cols], cache
        )
        steps.append(logits)
    decoded = np.concatenate(steps, axis=1)
    np.testing.assert_allclose(decoded[real], full[real], atol=1e-5, rtol=1e-5)


def test_init_from_places_the_same_weights_in_a_scanned_fsdp_run(built):
    """config.init_from='hf:<dir>' (the continued-pretraining path): the family's switches
    copied into a run, its weights stacked and sharded, bit for bit."""
    from jaxlm import sharding, train
    from jaxlm import spec as run_spec
    from jaxlm.convert import init_from as warm_start
    from tests.helpers import tiny_config

    init_from = f"hf:{built.hf_dir}"
    config = tiny_config()
    fields = warm_start.model_fields(init_from)
    vocab = fields.pop("vocab_size")
    for key, value in {**fields, "scan_layers": True}.items():
        config.model[key] = value
    config.mesh.preset = "fsdp"
    setup = train.Setup(run_spec.build(config), vocab, sharding.make_mesh((2, 4, 1)))
    assert setup.model_cfg.family == built.cfg.family
    params = warm_start.load_params(init_from, setup, log=lambda _: None)
    want = model_lib.stack_layers(built.params)
    placed = jax.tree_util.tree_leaves_with_path(setup.param_shardings)
    for (path, x), (_, w), (_, where) in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree_util.tree_leaves_with_path(want),
        placed,
        strict=True,
    ):
        assert np.asarray(x).tobytes() == np.asarray(w).tobytes(), path
        assert x.sharding == where, path


# --------------------------------------------------------------------------- refusals


def test_an_unsupported_layer_pattern_is_named():
    config = dict(
        COMMON,
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        use_sliding_window=True,
        sliding_window=WINDOW,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
    )
    with pytest.raises(ConvertError) as e:
        model_lib.ModelConfig.from_hf(config)
    assert "layer_types=" in one_sentence(e)


def test_a_switch_the_family_lacks_is_refused_on_export():
    cfg = model_lib.ModelConfig(
        vocab_size=VOCAB, d_model=96, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=16,
        d_ff=124, family="mistral", qkv_bias=True,
    )  # fmt: skip
    with pytest.raises(ConvertError) as e:
        cfg.to_hf()
    assert "model.qkv_bias=True cannot be exported as MistralForCausalLM" in one_sentence(e)
    assert dataclasses.replace(cfg, family="").to_hf()["architectures"] == ["Qwen2ForCausalLM"]


# --------------------------------------------------------------------------- from scratch

SWITCHED = model_lib.ModelConfig(
    vocab_size=62,  # even, and d_model, heads, d_ff too: fsdp_tp splits them over tensor=2
    d_model=28,
    n_layers=3,
    n_heads=6,
    n_kv_heads=2,
    head_dim=10,
    d_ff=44,
    scan_layers=True,
    qkv_bias=True,
    qk_norm="full",
    norm_placement="both",
    norm_plus_one=True,
    embed_scale=True,
    mlp_act="gelu_tanh",
    sliding_window=5,
    global_every=3,
    rope_local_theta=500.0,
    attn_softcap=4.0,
    final_softcap=6.0,
    query_scale_dim=7,
)


@pytest.mark.parametrize("preset", ["dp", "fsdp", "fsdp_tp"])
def test_every_switch_on_gives_the_same_logits_under_each_sharding_preset(preset):
    from jaxlm import sharding

    net = model_lib.create(SWITCHED, seed=1)
    graphdef, state = nnx.split(net)
    params = nnx.to_pure_dict(state)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 62, (8, 16)))
    single = np.asarray(_apply(graphdef, params, tokens))
    mesh = sharding.make_mesh((1, 4, 2) if preset == "fsdp_tp" else (2, 4, 1))
    rules = sharding.MeshRules.of(mesh, preset)
    shardings = sharding.tree_shardings(mesh, model_lib.logical_axes(state), params, rules.mapping)
    placed = jax.device_put(params, shardings)
    forward = sharding.jit(lambda p, t: nnx.merge(graphdef, p)(t), rules)
    np.testing.assert_allclose(forward(placed, tokens), single, rtol=1e-5, atol=1e-5)


def test_flops_per_token_counts_the_switched_weights_and_windows():
    """Biases, QK-norms and the extra norms are in the shape formula; windowed layers attend to
    at most W keys (so count 2W of the causal L)."""
    n_params = model_lib.count_params(nnx.state(model_lib.abstract(SWITCHED), nnx.Param))
    V, D, H, E, L = 62, 28, 6, 10, 37
    attention_flops = 6 * H * E * (2 * min(L, 2 * 5) + L)  # layers: window 5, window 5, global
    matmul = n_params - V * D  # every weight but the embedding lookup (the head is counted)
    assert SWITCHED.flops_per_token(L) == 6 * matmul + attention_flops


def test_soft_capping_is_refused_on_cudnn_and_auto_picks_xla():
    with pytest.raises(ConfigError) as e:
        dataclasses.replace(SWITCHED, attention="cudnn")
    assert "model.attn_softcap cannot run on cuDNN attention" in one_sentence(e)
    fields = dict(dataclasses.asdict(SWITCHED), attention="auto", dtype="bfloat16", head_dim=16)
    fields.pop("vocab_size")
    for softcap, expected in ((4.0, "xla"), (0.0, "cudnn")):
        model_cfg = ml_collections.ConfigDict(dict(fields, attn_softcap=softcap))
        cfg = model_lib.ModelConfig.from_config(model_cfg, 62).for_platform("gpu")
        assert cfg.attention == expected
