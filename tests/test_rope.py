"""RoPE scaling: YaRN and linear as Hugging Face defines them, next to Llama 3's rule.

Logits of tiny random transformers models with each scaling equal jaxlm's after import, the
scaling config survives import -> export, and every other form is refused in one sentence.
"""

import json

import numpy as np
import pytest

from jaxlm import model as model_lib
from jaxlm import rope, stages
from jaxlm.convert import hf
from jaxlm.errors import ConfigError, ConvertError
from tests.helpers import (
    hf_logits,
    jaxlm_logits,
    make_hf_model,
    one_sentence,
    read_params,
    tiny_config,
)

VOCAB = 67
# head_dim 14, theta 500 and original length 64: YaRN's ramp spans dimensions 0-3, so some
# frequencies are kept, some divided by the factor and some blended; 97 positions > 64.
SHAPE = dict(hidden_size=44, num_attention_heads=4, num_key_value_heads=2, head_dim=14)
THETA, ORIGINAL, LENGTH = 500.0, 64, 97
SCALINGS = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn_options": {
        "rope_type": "yarn",
        "factor": 3.0,
        "original_max_position_embeddings": ORIGINAL,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "attention_factor": 1.3,
        "truncate": False,
    },
    "linear": {"rope_type": "linear", "factor": 2.5},
}


def tokens(seed=1):
    return np.random.RandomState(seed).randint(0, VOCAB, (2, LENGTH))


@pytest.mark.parametrize("case", sorted(SCALINGS))
def test_llama_logits_match_transformers(case, tmp_path):
    scaling = SCALINGS[case]
    model = make_hf_model(
        tmp_path, seed=len(case), rope_theta=THETA, rope_scaling=dict(scaling), **SHAPE
    )
    cfg, params = read_params(tmp_path)
    assert cfg.rope_scaling[0] == scaling["rope_type"]
    expected = hf_logits(model, tokens())
    got = jaxlm_logits(cfg, params, tokens())
    assert np.abs(expected).max() > 1.0  # logits large enough for 1e-4 to mean something
    assert np.abs(got - expected).max() <= 1e-4
    # The scaling matters: the same weights without it are far off.
    plain = model_lib.ModelConfig(**{**cfg.__dict__, "rope_scaling": None})
    assert np.abs(jaxlm_logits(plain, params, tokens()) - expected).max() > 1e-2


def test_qwen2_logits_match_transformers_with_yarn(tmp_path):
    """A tiny random Qwen2 (q/k/v biases) with YaRN: imported, its logits equal transformers'."""
    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        intermediate_size=52,
        num_hidden_layers=2,
        max_position_embeddings=4 * ORIGINAL,
        rope_theta=THETA,
        rope_scaling=dict(SCALINGS["yarn_options"]),
        tie_word_embeddings=False,
        **SHAPE,
    )
    torch.manual_seed(5)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: randomise them so neither hides
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else torch.randn_like(p))
    model.save_pretrained(tmp_path)
    cfg, params = read_params(tmp_path)
    assert cfg.qkv_bias and cfg.rope_scaling[0] == "yarn"
    expected = hf_logits(model, tokens())
    assert np.abs(jaxlm_logits(cfg, params, tokens()) - expected).max() <= 1e-4


def test_import_export_round_trips_the_scaling(tmp_path):
    scaling = SCALINGS["yarn_options"]
    model = make_hf_model(tmp_path / "hf", rope_theta=THETA, rope_scaling=dict(scaling), **SHAPE)
    cfg = hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "w"), progress=False)
    hf.export_hf(str(tmp_path / "w"), str(tmp_path / "out"), progress=False)
    exported = json.load(open(tmp_path / "out" / "config.json"))
    assert exported["rope_scaling"] == scaling and exported["rope_theta"] == THETA
    assert model_lib.ModelConfig.from_hf(exported) == cfg
    import transformers

    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert np.abs(hf_logits(again, tokens()) - hf_logits(model, tokens())).max() <= 1e-6
    # Defaults come back explicit, and every kind reads back as itself.
    short = rope.scaling_to_hf(rope.scaling_from_hf(SCALINGS["yarn"], 256, "x"))
    assert short == dict(SCALINGS["yarn"], beta_fast=32.0, beta_slow=1.0)
    for value in [(8.0, 1.0, 4.0, 64), ("linear", 2.5), ("yarn", 4.0, 64, 16.0, 2.0, 1.2, False)]:
        assert rope.scaling_from_hf(rope.scaling_to_hf(value), 256, "x") == value


def test_accepted_forms_are_canonical_and_hashable():
    assert rope.parse_scaling([8, 1, 4, 8192]) == (8.0, 1.0, 4.0, 8192)  # JSON's list
    assert rope.parse_scaling(("llama3", 8, 1, 4, 8192)) == (8.0, 1.0, 4.0, 8192)
    assert rope.parse_scaling(["linear", 2]) == ("linear", 2.0)
    full = ("yarn", 4.0, 4096, 32.0, 1.0, None, True)
    assert rope.parse_scaling(("yarn", 4, 4096)) == full
    assert hash(full) == hash(rope.parse_scaling(list(full)))
    # A checkpoint's metadata (JSON) builds the same config as the run's tuple.
    cfg = model_lib.ModelConfig.from_config(tiny_config(rope_scaling=("yarn", 4, 64)).model, 61)
    assert cfg.rope_scaling == ("yarn", 4.0, 64, 32.0, 1.0, None, True)
    assert model_lib.ModelConfig.from_dict(json.loads(json.dumps(cfg.__dict__))) == cfg
    # A stage may switch to YaRN; the plan holds the canonical form.
    c = tiny_config()
    c.train.steps = 0
    c.stages = (dict(steps=2), dict(steps=2, seq_len=32, rope_scaling=("yarn", 4, 16)))
    assert stages.build(c).stages[1].rope_scaling == ("yarn", 4.0, 16, 32.0, 1.0, None, True)


@pytest.mark.parametrize(
    "value,expected",
    [
        (("dynamic", 2.0), "RoPE scaling type 'dynamic' is not supported"),
        (("longrope", 2.0), "RoPE scaling type 'longrope' is not supported"),
        (("yarn", 4.0), "has 1 values after the type"),
        (("yarn", 4.0, 64, 1.0, 32.0), "beta_fast must exceed beta_slow"),
        (("linear", 0), "factor=0 must be a positive number"),
        ((8.0, 1.0, 4.0, 8192.5), "original_max_pos=8192.5 must be a positive whole number"),
        ("yarn", "must be None, Llama 3's"),
    ],
)
def test_unsupported_forms_are_refused_in_one_sentence(value, expected):
    with pytest.raises(ConfigError) as e:
        rope.parse_scaling(value, "stages[1].rope_scaling")
    assert expected in one_sentence(e) and "stages[1].rope_scaling" in str(e.value)


@pytest.mark.parametrize(
    "params,expected",
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "rope_scaling.rope_type='dynamic'"),
        ({"rope_type": "longrope", "short_factor": [1.0]}, "rope_scaling.rope_type='longrope'"),
        ({"rope_type": "yarn", "factor": 4.0, "mscale": 0.7}, "mscale (DeepSeek's"),
        ({"rope_type": "linear"}, "lacks the field 'factor'"),
        ({"type": "yarn", "factor": 2.0}, "lacks the field 'original_max_position_embeddings'"),
    ],
)
def test_unsupported_hf_configs_are_refused_in_one_sentence(params, expected):
    with pytest.raises(ConvertError) as e:
        rope.scaling_from_hf(params, None, "config.json: rope_scaling")
    assert expected in one_sentence(e)
