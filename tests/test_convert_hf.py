"""Hugging Face import/export: logits parity with transformers, exact round trips, warm starts
(init_from), and one-sentence errors for bad input. Tokenizers: tests/test_hf_tokenizers.py.

transformers and CPU torch are test-only dependencies (the [test] extra): without them these
tests fail, naming the package.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxlm import checkpoint as ckpt_lib
from jaxlm import model as model_lib
from jaxlm import sharding, train
from jaxlm import spec as run_spec
from jaxlm.convert import hf
from jaxlm.convert import init_from as warm_start
from jaxlm.errors import ConfigError
from tests.helpers import HF_VOCAB as VOCAB
from tests.helpers import (
    hf_logits,
    jaxlm_logits,
    make_hf_model,
    one_sentence,
    packed_batch,
    read_params,
    tiny_config,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# Each case: LlamaConfig overrides. Together: GQA, MHA, MQA, head_dim != hidden/heads, tied and
# untied embeddings, rope_theta != 10000, and Llama-3 rope scaling (with head_dim 10, theta 5000
# and original length 64 its frequencies fall in all three bands: kept, interpolated, slowed).
CASES = {
    "gqa_untied": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=10),
    "mha_tied_theta": dict(
        hidden_size=44,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=12,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "mqa_llama3_scaling": dict(
        hidden_size=36,
        num_attention_heads=6,
        num_key_value_heads=1,
        head_dim=10,
        rope_theta=5000.0,
        rope_scaling=LLAMA3_SCALING,
    ),
}


def tokens_for(vocab, batch=2, length=40, seed=1):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length))


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    model = make_hf_model(tmp_path, seed=len(case), **CASES[case])
    cfg, params = read_params(tmp_path)
    tokens = tokens_for(VOCAB)
    expected = hf_logits(model, tokens)
    got = jaxlm_logits(cfg, params, tokens)
    assert np.abs(expected).max() > 1.0  # logits large enough for 1e-4 to mean something
    assert np.abs(got - expected).max() <= 1e-4


def test_both_config_formats_give_the_same_model():
    """transformers < 5 writes rope_theta + rope_scaling; 5 writes rope_parameters."""
    common = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=36,
        intermediate_size=52,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=1,
        head_dim=10,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    v4 = dict(common, rope_theta=5000.0, rope_scaling=dict(LLAMA3_SCALING))
    v5 = dict(common, rope_parameters=dict(LLAMA3_SCALING, rope_theta=5000.0))
    a, b = model_lib.ModelConfig.from_hf(v4), model_lib.ModelConfig.from_hf(v5)
    assert a == b
    assert a.rope_scaling == (8.0, 1.0, 4.0, 64) and a.rope_theta == 5000.0 and a.tie_embeddings
    # The exported config reads back as the same model.
    assert model_lib.ModelConfig.from_hf(a.to_hf()) == a


# --------------------------------------------------------------------------- round trips


def test_import_export_import_is_bitwise(tmp_path):
    model = make_hf_model(tmp_path / "hf", max_shard_size="40KB", **CASES["mha_tied_theta"])
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")  # sharded source
    hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "a"), progress=False)
    hf.export_hf(str(tmp_path / "a"), str(tmp_path / "out"), max_shard_bytes=30_000, progress=False)
    hf.import_hf(str(tmp_path / "out"), str(tmp_path / "b"), progress=False)

    cfg = json.load(open(tmp_path / "a" / "model_config.json"))
    tensors = hf.layout(model_lib.ModelConfig.from_dict(cfg))
    abstract = {t.path: jax.ShapeDtypeStruct(t.shape, np.float32) for t in tensors}
    a = ckpt_lib.restore_params(str(tmp_path / "a" / "checkpoints"), 0, abstract)
    b = ckpt_lib.restore_params(str(tmp_path / "b" / "checkpoints"), 0, abstract)
    assert a.keys() == b.keys()
    for path in a:
        assert a[path].tobytes() == b[path].tobytes(), path
    # The exported safetensors hold exactly the original tensors, sharded with an index.
    from safetensors import safe_open

    original = {
        k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"
    }  # tied: transformers does not save it
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(original)
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / "out" / file), framework="numpy") as f:
            assert f.get_tensor(name).tobytes() == original[name].tobytes(), name


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A jaxlm model trained a few steps, saved as train.run saves it."""
    workdir = tmp_path_factory.mktemp("trained")
    config = tiny_config(rope_theta=20000.0, tie_embeddings=False)
    config.checkpoint.async_save = False
    setup = train.Setup(
        run_spec.build(config), VOCAB, sharding.make_mesh((1, -1, 1), jax.devices()[:1])
    )
    state, step = setup.init_state(), setup.jit_train_step()
    for s in range(3):
        batch = sharding.host_to_global(packed_batch(8, 16, seed=s, vocab=VOCAB), setup.mesh)
        state, _ = step(state, batch)
    meta = {
        "config": json.loads(config.to_json_best_effort()),
        "tokenizer_sha256": "",
        "param_shapes": ckpt_lib.param_shapes(setup.abstract_state["params"]),
    }
    checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), config.checkpoint)
    checkpointer.save(3, state, None, meta, force=True)
    checkpointer.close()
    return workdir, setup.model_cfg, jax.device_get(state["params"])


@pytest.mark.slow  # trains first: ~30 s of compiling on a 2-core CPU
def test_trained_model_loads_in_transformers_with_equal_logits(trained_checkpoint, tmp_path):
    import transformers

    workdir, cfg, params = trained_checkpoint
    hf.export_hf(str(workdir), str(tmp_path), max_shard_bytes=20_000, progress=False)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = tokens_for(VOCAB, length=16)
    diff = np.abs(hf_logits(model, tokens) - jaxlm_logits(cfg, params, tokens)).max()
    print(f"trained model: transformers vs jaxlm logits max abs diff {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.slow  # shares the trained checkpoint
def test_bfloat16_export_loads_in_transformers(trained_checkpoint, tmp_path):
    import torch
    import transformers

    workdir, cfg, params = trained_checkpoint
    hf.export_hf(
        str(workdir / "checkpoints" / "3"), str(tmp_path), dtype="bfloat16", progress=False
    )
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    tokens = tokens_for(VOCAB, length=16)
    expected = jaxlm_logits(cfg, params, tokens)
    assert np.abs(hf_logits(model, tokens) - expected).max() < 0.1


def test_bfloat16_safetensors_read_without_the_library(tmp_path):
    """The fallback reader for old safetensors (no numpy bfloat16) matches the library."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    x = np.random.RandomState(0).randn(7, 3).astype(jnp.bfloat16)
    save_file({"a": np.zeros(5, np.float32), "b": x}, str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
        expected = f.get_tensor("b")
    got = hf.read_raw(str(tmp_path / "m.safetensors"), "b")
    assert got.dtype == jnp.bfloat16 and got.tobytes() == expected.tobytes() == x.tobytes()


# --------------------------------------------------------------------------- init_from


def write_numpy_hf(path, cfg, seed=0, shards=1):
    """An HF Llama directory written without torch (for error and init_from tests)."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    rng = np.random.RandomState(seed)
    tensors = hf.layout(cfg)
    groups = np.array_split(np.arange(len(tensors)), shards)
    weight_map = {}
    for i, group in enumerate(groups):
        name = (
            f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        )
        out = {
            tensors[j].hf_name: rng.randn(*tensors[j].hf_shape).astype(np.float32) for j in group
        }
        save_file(out, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, name))
    if shards > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)
    return path


SMALL = model_lib.ModelConfig(
    vocab_size=VOCAB,
    d_model=40,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=10,
    d_ff=56,
    max_seq_len=64,
    norm_eps=1e-5,
)


def setup_for(init_from, mesh_shape=(1, -1, 1), preset="fsdp", **changes):
    """A Setup whose model section is copied from `init_from`, then changed by `changes`."""
    config = tiny_config()
    fields = warm_start.model_fields(init_from)
    vocab = fields.pop("vocab_size")
    for key, value in {**fields, **changes}.items():
        config.model[key] = value
    config.mesh.preset = preset
    return train.Setup(run_spec.build(config), vocab, sharding.make_mesh(mesh_shape))


def test_init_from_hf_and_ckpt_place_the_same_params_in_shards(tmp_path):
    src = write_numpy_hf(str(tmp_path / "hf"), SMALL, shards=2)
    hf.import_hf(src, str(tmp_path / "imported"), progress=False)
    setup = setup_for(f"hf:{src}", (2, 4, 1), "fsdp")
    from_hf = warm_start.load_params(f"hf:{src}", setup)
    from_ckpt = warm_start.load_params(f"ckpt:{tmp_path / 'imported'}", setup)
    expected = read_params(src)[1]
    leaves = jax.tree_util.tree_leaves_with_path
    want = dict(leaves(expected))
    for loaded in (from_hf, from_ckpt):
        assert jax.tree.structure(loaded) == jax.tree.structure(setup.abstract_state["params"])
        for path, x in leaves(loaded):
            assert np.asarray(x).tobytes() == want[path].tobytes()
            assert x.sharding == dict(leaves(setup.param_shardings))[path]


def test_scanned_runs_load_and_export_the_same_weights(tmp_path):
    """HF -> a scan_layers run (stacked) -> its checkpoint -> HF and -> an unrolled run: the same
    per-layer tensors everywhere."""
    src = write_numpy_hf(str(tmp_path / "hf"), SMALL)
    expected = traverse_util.flatten_dict(read_params(src)[1])
    scanned = setup_for(f"hf:{src}", (2, 4, 1), "fsdp", scan_layers=True)
    params = warm_start.load_params(f"hf:{src}", scanned)
    assert params["blocks"]["attn"]["wq"].shape == (2, 40, 4, 10)
    for path, x in traverse_util.flatten_dict(params).items():
        assert x.sharding == traverse_util.flatten_dict(scanned.param_shardings)[path]
    unstacked = traverse_util.flatten_dict(model_lib.unstack_layers(jax.device_get(params)))
    assert unstacked.keys() == expected.keys()
    for path, x in unstacked.items():
        assert np.asarray(x).tobytes() == expected[path].tobytes(), path

    config = scanned.config
    meta = {
        "config": json.loads(config.to_json_best_effort()),
        "tokenizer_sha256": "",
        "param_shapes": ckpt_lib.param_shapes(params),
    }
    state = dict(scanned.init_state(), params=params)
    config.checkpoint.async_save = False
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "run" / "checkpoints"), config.checkpoint)
    checkpointer.save(1, state, None, meta, force=True)
    checkpointer.close()
    hf.export_hf(str(tmp_path / "run"), str(tmp_path / "out"), progress=False)
    assert traverse_util.flatten_dict(read_params(str(tmp_path / "out"))[1]).keys() == (
        expected.keys()
    )
    for path, x in traverse_util.flatten_dict(read_params(str(tmp_path / "out"))[1]).items():
        assert x.tobytes() == expected[path].tobytes(), path
    unrolled = setup_for(f"ckpt:{tmp_path / 'run'}", (1, -1, 1), "fsdp")
    assert not unrolled.model_cfg.scan_layers
    loaded = warm_start.load_params(f"ckpt:{tmp_path / 'run'}", unrolled)
    for path, x in traverse_util.flatten_dict(loaded).items():
        assert np.asarray(x).tobytes() == expected[path].tobytes(), path
    # Resuming a run with the other layout is one sentence, not a missing-key dump.
    with pytest.raises(ckpt_lib.CheckpointError, match="scan_layers=True; resume with the same"):
        ckpt_lib.check_compatible(meta, unrolled.abstract_state)


def test_init_from_with_another_model_shape_names_the_field(tmp_path):
    src = write_numpy_hf(str(tmp_path / "hf"), SMALL)
    setup = setup_for(f"hf:{src}", d_ff=64)
    with pytest.raises(ConfigError, match=r"d_ff=56 but the run's model.d_ff is 64"):
        warm_start.load_params(f"hf:{src}", setup)
    with pytest.raises(ConfigError, match="must be 'hf:<model dir>' or 'ckpt:"):
        warm_start.load_params(f"{src}", setup)


# --------------------------------------------------------------------------- bad input


def test_directory_without_config_json(tmp_path):
    with pytest.raises(hf.ConvertError) as e:
        hf.import_hf(str(tmp_path), str(tmp_path / "w"), progress=False)
    assert "has no config.json" in one_sentence(e)


def test_non_llama_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64})
    )
    with pytest.raises(hf.ConvertError) as e:
        hf.import_hf(str(tmp_path), str(tmp_path / "w"), progress=False)
    assert "architectures=['GPT2LMHeadModel']" in one_sentence(e)


def test_missing_shard(tmp_path):
    src = write_numpy_hf(str(tmp_path / "hf"), SMALL, shards=3)
    os.remove(os.path.join(src, "model-00002-of-00003.safetensors"))
    with pytest.raises(hf.ConvertError) as e:
        hf.import_hf(src, str(tmp_path / "w"), progress=False)
    assert "shard model-00002-of-00003.safetensors listed in" in one_sentence(e)


@pytest.mark.parametrize(
    "field,value,expected",
    [
        (
            "rope_scaling",
            {"rope_type": "dynamic", "factor": 2.0},
            "rope_scaling.rope_type='dynamic'",
        ),
        ("attention_bias", True, "attention_bias=true"),
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("hidden_size", 44, "tensor model.embed_tokens.weight has shape (67, 40)"),
    ],
)
def test_unsupported_options_are_named(tmp_path, field, value, expected):
    src = write_numpy_hf(str(tmp_path / "hf"), SMALL)
    config = json.load(open(os.path.join(src, "config.json")))
    config[field] = value
    json.dump(config, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(hf.ConvertError) as e:
        hf.import_hf(src, str(tmp_path / "w"), progress=False)
    assert expected in one_sentence(e)


def test_cli_prints_one_error_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "tools/convert_hf.py",
            "import",
            f"--hf_dir={tmp_path}",
            f"--workdir={tmp_path / 'w'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path} has no config.json; point at a Hugging Face model directory "
        "(config.json + *.safetensors)."
    ]


def test_cli_import_then_export(tmp_path):
    src = write_numpy_hf(str(tmp_path / "hf"), SMALL)
    for args in (
        ["import", f"--hf_dir={src}", f"--workdir={tmp_path / 'w'}"],
        ["export", f"--workdir={tmp_path / 'w'}", f"--out_dir={tmp_path / 'out'}"],
    ):
        result = subprocess.run(
            [sys.executable, "tools/convert_hf.py", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
    assert read_params(str(tmp_path / "out"))[0] == read_params(src)[0]
