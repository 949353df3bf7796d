"""Two speedrun additions to the decoder (issue 26): value embeddings and multi-token prediction.

Value embeddings (`ModelConfig.value_embeds` = n, modded-nanogpt's form): n extra tables of
shape (V, K, E) look up the input tokens; table i is added to the attention values of layer i
and of layer n_layers - n + i (the first and last n layers, a U shape; where those overlap the
first wins), each time times that layer's learned gate, one scalar per kv head
(`layers.Attention.value_gate`, started at modded-nanogpt's 0.5):
v = x W_v + gate * table_i[token]. They give the layers that use them a direct, per-token path
to the values that costs one gather, no matmul. The model config refuses them with scanned
layers (the blocks would differ); transformers' Llama has no such input (export refuses).

Multi-token prediction (`ModelConfig.mtp_heads` = k, `train.mtp_weight`): head j (1..k)
predicts the token j places after the next, from the final (normed) hidden state h through a
residual map and its own RMSNorm, h_j = norm_j(h + h P_j), then the model's output head. P_j
starts at zero, so every head starts as the next-token prediction. The heads only shape the
trunk's representations during training: evaluation and generation never read them and the
Hugging Face export drops them.

Shape alphabet as in `model.py`; T the mtp heads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm import layers
from jaxlm import loss as loss_lib


def value_table(n_tables: int, n_layers: int, layer: int) -> int:
    """The value-embedding table layer `layer` adds to its values, or -1 for none."""
    if layer < n_tables:
        return layer
    if layer >= n_layers - n_tables:
        return layer - (n_layers - n_tables)
    return -1


def value_tables(cfg: Any, rngs: nnx.Rngs) -> nnx.Param:
    """The (n, V, K, E) value-embedding tables, initialised as the token embedding."""
    shape = (cfg.value_embeds, cfg.vocab_size, cfg.n_kv_heads, cfg.head_dim)
    axes = ("value_embeds", "vocab", "kv_heads", "head_dim")
    return layers.param(rngs, shape, axes, cfg.init_std)


class MTPHeads(nnx.Module):
    """The k multi-token-prediction heads before the shared output head: h -> (T, B, L, D)."""

    def __init__(self, cfg: Any, rngs: nnx.Rngs):
        T, D = cfg.mtp_heads, cfg.d_model
        # Zero: each head starts as the next-token prediction (rngs drawn anyway, as in
        # layers.output_std, so the other parameters' init does not depend on the switch).
        self.w_mtp = layers.param(rngs, (T, D, D), ("mtp_heads", "embed", "embed"), 0.0)
        self.scale = nnx.Param(jnp.ones((T, D), jnp.float32), axes=("mtp_heads", "norm"))
        self.eps = cfg.norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, L, D), the final normed hidden states
        dtype = x.dtype
        h = x[None] + jnp.einsum("BLD,TDC->TBLC", x, self.w_mtp[...].astype(dtype))  # (T, B, L, D)
        h32 = h.astype(jnp.float32)
        h32 = h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, axis=-1, keepdims=True) + self.eps)
        return (h32 * self.scale[...][:, None, None, :]).astype(dtype)


def mtp_loss(
    model: Any, hidden: jax.Array, head: jax.Array, batch: dict[str, jax.Array], loss_chunk: int
) -> jax.Array:
    """The mean over heads of each head's mean cross-entropy (fp32 scalar) on `batch`.

    Head j's prediction at position t is scored against the target of position t + j (the
    token j + 1 after t) where that position holds a target of the same document.
    `hidden` (B, L, D) and `head` (D, V) are `Transformer.hidden_and_head`'s.
    """
    per_head = model.mtp(hidden)  # (T, B, L, D)
    targets, mask, segments = batch["targets"], batch["loss_mask"], batch["segment_ids"]
    L = targets.shape[1]
    losses = []
    for j in range(1, per_head.shape[0] + 1):
        h = per_head[j - 1, :, : L - j]  # (B, L - j, D)
        shifted = targets[:, j:]
        weight = mask[:, j:] * (segments[:, j:] == segments[:, :-j])
        if loss_chunk:
            nll = loss_lib.token_nll(h, head, shifted, loss_chunk)  # (B, L - j)
        else:
            logits = model.logits(h, head)  # (B, L - j, V) fp32
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, shifted)
        losses.append(jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0))
    return jnp.mean(jnp.stack(losses))
