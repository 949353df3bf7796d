"""Every recipe in configs/ parses and builds an abstract model without allocating it."""

import importlib

import jax
import pytest

from jaxlm import model
from tests.helpers import RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_an_abstract_model(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    cfg = model.ModelConfig.from_config(config.model, config.tokenizer.vocab_size)
    abstract = model.abstract(cfg)
    n = model.count_params(jax.tree.leaves(abstract))
    assert n > 0
    assert config.train.seq_len <= cfg.max_seq_len
