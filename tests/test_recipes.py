"""The size recipes build the models their names promise, counted without allocating a weight.

Each model is traced once per module with `jax.eval_shape` (`model.abstract`). The Llama-3-8B
count is tested in tests/test_estimate.py. The Hugging Face fields below are the published
config.json values of meta-llama/Llama-3.2-1B and upstage/TinySolar-248m-4k, so a recipe that
drifts from the model it is named after fails here, not in a conversion weeks later.
"""

import dataclasses

import jax
import pytest

from configs import gpt2_124m, llama_1b, tinysolar_248m
from jaxlm import model, sharding, train
from jaxlm import spec as run_spec

LLAMA_3_2_1B_HF = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
}

TINYSOLAR_248M_4K_HF = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 12,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
}


def _model_cfg(config) -> model.ModelConfig:
    return model.ModelConfig.from_config(config.model, config.tokenizer.vocab_size)


def _n_params(config) -> int:
    return model.count_params(jax.tree.leaves(model.abstract(_model_cfg(config))))


@pytest.fixture(scope="module")
def gpt2_params() -> int:
    return _n_params(gpt2_124m.get_config())


@pytest.fixture(scope="module")
def llama_1b_params() -> int:
    return _n_params(llama_1b.get_config())


@pytest.fixture(scope="module")
def tinysolar_params() -> int:
    return _n_params(tinysolar_248m.get_config())


def test_gpt2_124m_rounds_to_124m_parameters(gpt2_params):
    # GPT-2 small's 124.4M include 0.8M learned position embeddings that RoPE does without.
    assert gpt2_params == 123_551_232
    assert round(gpt2_params / 1e6) == 124


def test_llama_1b_has_llama_3_2_1b_published_count(llama_1b_params):
    assert llama_1b_params == 1_235_814_400  # Meta's 1.24B, tied embeddings counted once


def test_tinysolar_rounds_to_its_published_248m(tinysolar_params):
    # The Hub lists 248M parameters (a 496 MB bf16 safetensors file).
    assert tinysolar_params == 248_013_824
    assert round(tinysolar_params / 1e6) == 248


@pytest.mark.parametrize(
    "recipe, published",
    [(llama_1b, LLAMA_3_2_1B_HF), (tinysolar_248m, TINYSOLAR_248M_4K_HF)],
    ids=["llama_1b", "tinysolar_248m"],
)
def test_recipe_shapes_equal_the_published_config_json(recipe, published):
    ours = _model_cfg(recipe.get_config())
    theirs = model.ModelConfig.from_hf(published)
    # Only the trained context differs: the published files allow far longer positions.
    keep = dict(max_seq_len=ours.max_seq_len, dtype=ours.dtype, remat=ours.remat)
    keep["scan_layers"] = ours.scan_layers  # how the layers run, not what they are
    theirs = dataclasses.replace(theirs, attention=ours.attention, **keep)
    assert ours == theirs


def test_parameter_count_is_independent_of_sequence_length(gpt2_params):
    # RoPE has no position table: neither train.seq_len nor max_seq_len may add parameters.
    # Counted through train.Setup, the path a real run takes (optimizer and shardings included).
    mesh = sharding.make_mesh((1, -1, 1))
    shapes, counts = [], []
    for seq_len in (128, 1024):
        config = gpt2_124m.get_config()
        config.model.max_seq_len = seq_len
        config.train.seq_len = seq_len
        setup = train.Setup(run_spec.build(config), config.tokenizer.vocab_size, mesh)
        counts.append(setup.n_params)
        shapes.append(jax.tree.map(lambda x: x.shape, setup.abstract_state["params"]))
    assert counts == [gpt2_params, gpt2_params]
    assert shapes[0] == shapes[1]
