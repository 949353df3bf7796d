"""fp32 precision against a float64 reference on a deep model with trained-like magnitudes.

The reference is the same transformers Llama run in float64 *throughout*: transformers keeps
two fp32 islands even in a float64 model (RMSNorm upcasts to fp32; the rotary angles are
computed in fp32), which makes its float64 model share transformers fp32's rounding there and
flatter it. Both islands are replaced by float64 arithmetic for the reference only.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import model as model_lib
from tests.helpers import make_hf_model, read_params

LENGTH = 2048
HEAD_DIM = 16
THETA = 10000.0


def _float64_reference(model, monkeypatch):
    """A float64 copy of `model` with transformers' fp32 RMSNorm and RoPE made float64."""
    import copy

    import torch
    from transformers.models.llama import modeling_llama

    def norm(self, h):  # (B, L, D) float64 in, float64 out
        return self.weight * (
            h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    def rotary(x, position_ids):  # angles in float64, not fp32
        exponents = torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM
        angles = position_ids[..., None].double() / THETA**exponents  # (B, L, E/2)
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", norm)
    ref = copy.deepcopy(model).double()
    ref.model.rotary_emb.forward = rotary
    return ref


@pytest.mark.slow  # a 30-layer model on 2,048 tokens in three implementations: ~20 s of CPU
def test_fp32_logits_are_as_close_to_float64_as_transformers(tmp_path, monkeypatch):
    import torch

    model = make_hf_model(
        tmp_path,
        seed=0,
        vocab=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=30,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=LENGTH,
        rope_theta=THETA,
        initializer_range=0.4,  # trained-like: a residual stream far from the init's
    )
    with torch.no_grad():  # a sharper output layer: logits to about +-30, as trained models have
        model.lm_head.weight.mul_(2.0)
    model.save_pretrained(tmp_path)
    tokens = np.random.RandomState(1).randint(0, 257, (1, LENGTH))
    with torch.no_grad():
        fp32 = model(torch.tensor(tokens)).logits.double().numpy()
        reference = _float64_reference(model, monkeypatch)(torch.tensor(tokens)).logits.numpy()
    cfg, params = read_params(tmp_path)
    cfg = dataclasses.replace(cfg, scan_layers=True)  # one layer to compile, not 30
    graphdef, _ = nnx.split(model_lib.abstract(cfg))
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    ours = np.asarray(forward(model_lib.stack_layers(params), jnp.asarray(tokens)), np.float64)

    assert np.abs(reference).max() > 25  # logits of a trained model's size, not of an init's
    transformers_error = np.abs(fp32 - reference).max()
    jaxlm_error = np.abs(ours - reference).max()
    print(
        f"max logit error vs float64: transformers fp32 {transformers_error:.2e}, "
        f"jaxlm fp32 {jaxlm_error:.2e}"
    )
    assert jaxlm_error <= 1.5 * transformers_error
