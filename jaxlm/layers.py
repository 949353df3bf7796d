"""The layers a transformer block is made of: RMSNorm, grouped-query attention, the gated MLP.

Each reads the switches of `model.ModelConfig` that concern it (q/k/v biases, QK-norm, the
`(1 + w)` norm weight, soft-capping, the attention scale, the MLP activation); with every switch
off they are the Llama layers. Parameters are fp32 and carry logical axis names; compute runs in
the input's dtype. Shape alphabet as in `model.py`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import attention, context, sharding
from jaxlm import rope as rope_lib

# The layers read a `model.ModelConfig` (typed `Config` here: model.py imports this module, so
# importing it back would be a cycle).
Config = Any

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # transformers' gelu_pytorch_tanh
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),  # ungated: down(relu(x @ up)^2)
}
UNGATED = ("relu2",)  # activations whose MLP has no gate matrix


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> nnx.Param:
    """A normally initialised fp32 parameter tagged with its logical axis names."""
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm over the trailing `len(shape)` axes, computed in fp32.

    `plus_one` is Gemma's convention: the weight is stored as an offset from 1 (initialised to
    zeros) and the output is scaled by (1 + w).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        eps: float,
        plus_one: bool = False,
        axes: tuple[str, ...] = ("norm",),
    ):
        init = jnp.zeros if plus_one else jnp.ones
        self.scale = nnx.Param(init(shape, jnp.float32), axes=axes)
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x: jax.Array) -> jax.Array:
        reduce = tuple(range(-self.scale.ndim, 0))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=reduce, keepdims=True) + self.eps)
        scale = self.scale[...] + 1.0 if self.plus_one else self.scale[...]
        return (x32 * scale).astype(x.dtype)


def norm(cfg: Config, dim: int) -> RMSNorm:
    """An RMSNorm of width `dim` with the model's epsilon and weight convention."""
    return RMSNorm((dim,), cfg.norm_eps, cfg.norm_plus_one)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; optional q/k/v biases and QK-norm, and with
    `value_gate` a gated value embedding added to the values (`jaxlm/speedrun.py`)."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs, value_gate: bool = False):
        D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        out_std = output_std(cfg)
        self.wq = param(rngs, (D, H, E), ("embed", "heads", "head_dim"), cfg.init_std)
        self.wk = param(rngs, (D, K, E), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.wv = param(rngs, (D, K, E), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.wo = param(rngs, (H, E, D), ("heads", "head_dim", "embed"), out_std)
        if cfg.qkv_bias:
            self.bq = nnx.Param(jnp.zeros((H, E), jnp.float32), axes=("heads", "head_dim"))
            self.bk = nnx.Param(jnp.zeros((K, E), jnp.float32), axes=("kv_heads", "head_dim"))
            self.bv = nnx.Param(jnp.zeros((K, E), jnp.float32), axes=("kv_heads", "head_dim"))
        if cfg.qk_norm == "head":  # one (E,) weight shared by the heads (Qwen3, Gemma-3)
            self.q_norm = norm(cfg, E)
            self.k_norm = norm(cfg, E)
        elif cfg.qk_norm == "full":  # over the whole projection, H*E and K*E wide (OLMo-2)
            plus_one = cfg.norm_plus_one
            self.q_norm = RMSNorm((H, E), cfg.norm_eps, plus_one, ("heads", "head_dim"))
            self.k_norm = RMSNorm((K, E), cfg.norm_eps, plus_one, ("kv_heads", "head_dim"))
        if value_gate:  # (K,), not random: the other parameters' draws stay as they were
            self.value_gate = nnx.Param(jnp.full((K,), 0.5, jnp.float32), axes=("kv_heads",))
        self.cfg = cfg

    def __call__(
        self,
        x: jax.Array,  # (B, L, D)
        mask: jax.Array | context.Sequence,  # (B, 1, L, S), or a split sequence's description
        segment_ids: jax.Array | None,  # (B, L); None when the mask is not causal
        rope: tuple[jax.Array, jax.Array],  # rope.cos_sin(positions): (B, L, E/2) each
        cache: dict[str, jax.Array] | None = None,
        window: int | jax.Array = 0,  # this layer's sliding window (0: none), for splash
        value_embed: jax.Array | None = None,  # (B, L, K, E), with value_gate
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        cfg, dtype = self.cfg, x.dtype
        q = jnp.einsum("BLD,DHE->BLHE", x, self.wq[...].astype(dtype))
        k = jnp.einsum("BLD,DKE->BLKE", x, self.wk[...].astype(dtype))
        v = jnp.einsum("BLD,DKE->BLKE", x, self.wv[...].astype(dtype))
        if cfg.qkv_bias:
            q = q + self.bq[...].astype(dtype)
            k = k + self.bk[...].astype(dtype)
            v = v + self.bv[...].astype(dtype)
        if value_embed is not None:
            v = v + self.value_gate[...].astype(dtype)[:, None] * value_embed
        if cfg.qk_norm != "none":  # before RoPE, as all three families do
            q, k = self.q_norm(q), self.k_norm(k)
        q = sharding.constrain(rope_lib.apply(q, rope), ("batch", "seq", "heads", "head_dim"))
        k = rope_lib.apply(k, rope)
        if cache is not None:
            # Write this step's keys/values at `index` and attend over the whole cache (B, S, K, E).
            index = cache["index"]
            k = jax.lax.dynamic_update_slice_in_dim(
                cache["k"], k.astype(cache["k"].dtype), index, axis=1
            )
            v = jax.lax.dynamic_update_slice_in_dim(
                cache["v"], v.astype(cache["v"].dtype), index, axis=1
            )
            cache = {"k": k, "v": v, "index": index + x.shape[1]}
            k, v = k.astype(dtype), v.astype(dtype)
        scale = cfg.query_scale_dim**-0.5 if cfg.query_scale_dim else None
        if isinstance(mask, context.Sequence):  # the sequence is split over devices
            out = context.attend(
                q, k, v, mask, cfg.attention, scale=scale, softcap=cfg.attn_softcap, window=window
            )
        else:
            out = attention.attend(
                q,
                k,
                v,
                mask,
                segment_ids,
                cfg.attention,
                scale=scale,
                softcap=cfg.attn_softcap,
                window=window,
                windows=cfg.window_sizes(),
            )
        out = sharding.constrain(out, ("batch", "seq", "heads", "head_dim"))  # (B, L, H, E)
        return jnp.einsum("BLHE,HED->BLD", out, self.wo[...].astype(dtype)), cache


def output_std(cfg: Config) -> float:
    """Init std of the projections back into the residual stream (attention's wo, the MLP's
    w_down): scaled by depth to keep the stream's scale, or 0 with `zero_init_out`, where each
    block starts as the identity (drawn all the same, so every other parameter's init stays)."""
    return 0.0 if cfg.zero_init_out else cfg.init_std / math.sqrt(2 * cfg.n_layers)


class MLP(nnx.Module):
    """Gated feed-forward: down(act(x @ gate) * (x @ up)); SwiGLU, or GeGLU with gelu_tanh.
    With relu2 (`UNGATED`) there is no gate: down(relu(x @ up)^2), two matrices."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.d_ff
        self.gated = cfg.mlp_act not in UNGATED
        if self.gated:
            self.w_gate = param(rngs, (D, F), ("embed", "mlp"), cfg.init_std)
        self.w_up = param(rngs, (D, F), ("embed", "mlp"), cfg.init_std)
        self.w_down = param(rngs, (F, D), ("mlp", "embed"), output_std(cfg))
        self.act = ACTIVATIONS[cfg.mlp_act]

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, L, D)
        dtype = x.dtype
        if not self.gated:
            h = self.act(jnp.einsum("BLD,DF->BLF", x, self.w_up[...].astype(dtype)))
            h = sharding.constrain(h, ("batch", "seq", "mlp"))
            return jnp.einsum("BLF,FD->BLD", h, self.w_down[...].astype(dtype))
        # One matmul for gate and up: on XLA:CPU two separate ones make the backward pass fuse
        # the SiLU gradient into a strided transposing copy (~15% of the tiny step). Stacking
        # on a new axis keeps the "mlp" axis, and so its sharding, intact.
        w_gate_up = jnp.stack([self.w_gate[...], self.w_up[...]], axis=1).astype(dtype)
        gate_up = jnp.einsum("BLD,DCF->BLCF", x, w_gate_up)  # (B, L, 2, F)
        gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        h = sharding.constrain(self.act(gate) * up, ("batch", "seq", "mlp"))
        return jnp.einsum("BLF,FD->BLD", h, self.w_down[...].astype(dtype))
