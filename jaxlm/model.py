"""Decoder-only Llama-family transformer in Flax NNX.

RMSNorm, rotary position embeddings (Hugging Face "rotate half" layout, so imported weights need
no permutation), grouped-query attention and a SwiGLU MLP. Parameters are stored in fp32 and cast
to `ModelConfig.dtype` for compute; logits come back in fp32.

Every parameter carries logical axis names in its `axes` metadata and activations are constrained
at block boundaries with `sharding.constrain`; which mesh axes those names map to is decided in
`sharding.py` alone, so no mesh axis appears here.

Shape alphabet: B batch, L length, S key length, D model dim, H query heads, K kv heads,
E head dim, F mlp dim, V vocab, N layers (the leading axis of a `scan_layers` model's blocks).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxlm import attention, sharding
from jaxlm import rope as rope_lib
from jaxlm.errors import ConfigError, ConvertError

HF_ARCHITECTURES = ("LlamaForCausalLM",)  # the Hugging Face models from_hf accepts


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the network's shapes and numerics (built once from config.model)."""

    vocab_size: int
    d_model: int  # D
    n_layers: int
    n_heads: int  # H
    n_kv_heads: int  # K; must divide H (grouped-query attention)
    head_dim: int  # E
    d_ff: int  # F, SwiGLU hidden size
    max_seq_len: int = 2048  # longest position the model is meant for (RoPE scaling, checks)
    rope_theta: float = 10000.0
    # RoPE scaling (Llama 3, linear, YaRN) in rope.parse_scaling's canonical tuple, or None.
    rope_scaling: tuple | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype: float32 | bfloat16; params stay float32
    remat: str = "none"  # none | full | dots (save matmul outputs, recompute the rest)
    attention: str = "xla"  # xla | cudnn | splash (see jaxlm/attention.py)
    # Blocks stacked on a leading `layers` axis and run by one scan: compile time and program
    # size stay flat in depth. Parameters then have a (n_layers, ...) shape; see stack_layers.
    scan_layers: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        object.__setattr__(self, "rope_scaling", rope_lib.parse_scaling(self.rope_scaling))
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} must be a multiple of "
                f"model.n_kv_heads={self.n_kv_heads}."
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for RoPE.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.dtype must be float32 or bfloat16, not {self.dtype!r}.")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(
                f"model.remat must be one of {sorted(REMAT_POLICIES)}, not {self.remat!r}."
            )
        if self.attention not in ("auto", *attention.IMPLEMENTATIONS):
            raise ConfigError(
                f"model.attention must be auto or one of {attention.IMPLEMENTATIONS}, "
                f"not {self.attention!r}."
            )

    @classmethod
    def from_config(cls, model_cfg: Any, vocab_size: int) -> ModelConfig:
        """Builds the frozen config from the `config.model` ConfigDict and the tokenizer's vocab
        (`jaxlm.spec.build` is the one caller for a run). `attention="auto"` stays until the
        platform is known: `for_platform` resolves it."""
        return cls.from_dict(dict(model_cfg.items(), vocab_size=vocab_size))

    def for_platform(self, platform: str | None = None) -> ModelConfig:
        """This config with `attention="auto"` resolved for `platform` (tpu | gpu | cpu;
        default: this host's backend), which is the target's when compiling for hardware this
        host does not have."""
        if self.attention != "auto":
            return self
        resolved = attention.default_for(
            platform or jax.default_backend(), self.dtype, self.head_dim
        )
        return dataclasses.replace(self, attention=resolved)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ModelConfig:
        """Builds the config from its JSON form (`model_config.json`, checkpoint metadata);
        keys that are not fields (a run config's other settings) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
        """Builds the config of a Hugging Face Llama `config.json` (`where` names it in errors).

        Raises:
          ConvertError: not a Llama model, or an option jaxlm does not implement.
        """
        arch, model_type = hf.get("architectures") or [], hf.get("model_type")
        if model_type != "llama" or any(a not in HF_ARCHITECTURES for a in arch):
            raise ConvertError(
                f"{where} has architectures={arch} (model_type {model_type!r}); only "
                f"Llama-architecture causal LMs ({', '.join(HF_ARCHITECTURES)}) import."
            )
        if hf.get("quantization_config"):
            raise ConvertError(f"{where}: quantization_config is set; import an unquantized model.")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConvertError(
                f"{where}: hidden_act={hf['hidden_act']!r} is unsupported (only silu)."
            )
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConvertError(f"{where}: {flag}=true is not supported (jaxlm has no biases).")
        theta, scaling = _hf_rope(hf, where)
        try:
            d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            return cls(
                vocab_size=int(hf["vocab_size"]),
                d_model=d_model,
                n_layers=int(hf["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                head_dim=int(hf.get("head_dim") or d_model // n_heads),
                d_ff=int(hf["intermediate_size"]),
                max_seq_len=int(hf.get("max_position_embeddings", 2048)),
                rope_theta=theta,
                rope_scaling=scaling,
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                init_std=float(hf.get("initializer_range", 0.02)),
            )
        except KeyError as e:
            raise ConvertError(
                f"{where} lacks the field {e.args[0]!r} a Llama config needs."
            ) from None
        except ConfigError as e:
            raise ConvertError(f"{where} describes a model jaxlm cannot build: {e}") from None

    def to_hf(
        self, dtype: str = "float32", special_ids: dict[str, int | None] | None = None
    ) -> dict[str, Any]:
        """A `config.json` for transformers' LlamaForCausalLM (read by transformers 4.43+ and 5)."""
        ids = special_ids or {}
        return {
            "architectures": list(HF_ARCHITECTURES),
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.d_ff,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "initializer_range": self.init_std,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_lib.scaling_to_hf(self.rope_scaling),
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "pretraining_tp": 1,
            "use_cache": True,
            **{k: ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
            "torch_dtype": dtype,
            "dtype": dtype,  # transformers 4 reads torch_dtype, 5 dtype
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls plus causal attention.

        N counts every non-embedding parameter (the norm scales too, a rounding error) and the
        output projection (V x D), but not the embedding lookup. Attention scores and values
        cost 2 matmuls of L x L x (H E) per layer forward; causal masking halves the useful
        work, and training is 3x forward: 6 L H E per token per layer, the way MaxText counts it.
        """
        D, H, K, E, F = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        per_layer = D * H * E + 2 * D * K * E + H * E * D + 3 * D * F + 2 * D  # + 2 norms
        matmul_params = self.n_layers * per_layer + D + self.vocab_size * D  # + final norm
        return 6 * matmul_params + self.attention_flops_per_token(seq_len)

    def attention_flops_per_token(self, seq_len: int) -> int:
        """The attention scores' and values' part of `flops_per_token`: 6 L H E per layer."""
        return 6 * self.n_layers * self.n_heads * self.head_dim * seq_len


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _hf_rope(hf: dict[str, Any], where: str) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling or None) from either transformers config format."""
    # transformers < 5 writes rope_theta + rope_scaling; 5 writes rope_parameters.
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(key) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConvertError(f"{where}: a per-layer {key} is not supported (one RoPE for all).")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConvertError(f"{where}: partial_rotary_factor={partial} is not supported (only 1).")
    return theta, rope_lib.scaling_from_hf(
        params, hf.get("max_position_embeddings"), where + ": " + key
    )


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> nnx.Param:
    """A normally initialised fp32 parameter tagged with its logical axis names."""
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...]).astype(x.dtype)


def attention_mask(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_offset: jax.Array | int = 0,
    prefix: jax.Array | None = None,
) -> jax.Array:
    """Causal, same-segment mask (B, 1, L, S).

    Padding (segment id 0) attends only to padding, never to a document, and no document token
    attends to it; letting padding see itself keeps every softmax row non-empty (no NaN).

    `q_offset` is the index of the first query within the key sequence (non-zero when decoding
    with a KV cache). `prefix` (B, L), for queries that are the keys (no cache): tokens marked
    non-zero also see the later marked tokens of their document (bidirectional prefix).
    """
    L, S = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    q_idx = jnp.arange(L)[:, None] + q_offset
    causal = q_idx >= jnp.arange(S)[None, :]  # (L, S)
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # (B, L, S)
    if prefix is None:
        return (causal[None] & same_segment)[:, None]
    marked = prefix > 0
    both_ways = marked[:, :, None] & marked[:, None, :]  # (B, L, S)
    return ((causal[None] | both_ways) & same_segment)[:, None]


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # keeps the residual stream's scale
        self.wq = _param(rngs, (D, H, E), ("embed", "heads", "head_dim"), cfg.init_std)
        self.wk = _param(rngs, (D, K, E), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.wv = _param(rngs, (D, K, E), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.wo = _param(rngs, (H, E, D), ("heads", "head_dim", "embed"), out_std)
        self.cfg = cfg

    def __call__(
        self,
        x: jax.Array,  # (B, L, D)
        positions: jax.Array,  # (B, L)
        mask: jax.Array,  # (B, 1, L, S)
        segment_ids: jax.Array | None,  # (B, L); None when the mask is not causal
        rope: tuple[jax.Array, jax.Array],  # rope.cos_sin(positions): (B, L, E/2) each
        cache: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        dtype = x.dtype
        q = jnp.einsum("BLD,DHE->BLHE", x, self.wq[...].astype(dtype))
        k = jnp.einsum("BLD,DKE->BLKE", x, self.wk[...].astype(dtype))
        v = jnp.einsum("BLD,DKE->BLKE", x, self.wv[...].astype(dtype))
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
        out = attention.attend(q, k, v, mask, segment_ids, self.cfg.attention)
        out = sharding.constrain(out, ("batch", "seq", "heads", "head_dim"))  # (B, L, H, E)
        return jnp.einsum("BLHE,HED->BLD", out, self.wo[...].astype(dtype)), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.d_ff
        self.w_gate = _param(rngs, (D, F), ("embed", "mlp"), cfg.init_std)
        self.w_up = _param(rngs, (D, F), ("embed", "mlp"), cfg.init_std)
        self.w_down = _param(
            rngs, (F, D), ("mlp", "embed"), cfg.init_std / math.sqrt(2 * cfg.n_layers)
        )

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, L, D)
        dtype = x.dtype
        # One matmul for gate and up: on XLA:CPU two separate ones make the backward pass fuse
        # the SiLU gradient into a strided transposing copy (~15% of the tiny step). Stacking
        # on a new axis keeps the "mlp" axis, and so its sharding, intact.
        w_gate_up = jnp.stack([self.w_gate[...], self.w_up[...]], axis=1).astype(dtype)
        gate_up = jnp.einsum("BLD,DCF->BLCF", x, w_gate_up)  # (B, L, 2, F)
        gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        h = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        return jnp.einsum("BLF,FD->BLD", h, self.w_down[...].astype(dtype))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, mask, segment_ids, rope, cache=None):
        h, cache = self.attn(self.attn_norm(x), positions, mask, segment_ids, rope, cache)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return sharding.constrain(x, ("batch", "seq", "embed")), cache


class Transformer(nnx.Module):
    """The language model: tokens (B, L) -> logits (B, L, V) in fp32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        if cfg.scan_layers:
            self.blocks = _stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = _param(
                rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std
            )

    def __call__(
        self,
        tokens: jax.Array,  # (B, L) int
        positions: jax.Array | None = None,  # (B, L); default 0..L-1
        segment_ids: jax.Array | None = None,  # (B, L); default one document per row
        cache: dict[str, Any] | None = None,
        prefix: jax.Array | None = None,  # (B, L); marked tokens see each other both ways
    ) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
        """Returns logits (B, L, V) fp32, or (logits, new_cache) when a KV cache is passed.

        `prefix` (no cache) marks, per token, the bidirectional part of its document: all of it
        for an encoder, the prefix of a prefix-LM; None is causal attention throughout.
        """
        x, head, cache = self.hidden_and_head(tokens, positions, segment_ids, cache, prefix)
        logits = jnp.einsum("BLD,DV->BLV", x, head).astype(jnp.float32)
        logits = sharding.constrain(logits, ("batch", "seq", "vocab"))
        return logits if cache is None else (logits, cache)

    def hidden_and_head(
        self, tokens, positions=None, segment_ids=None, cache=None, prefix=None
    ) -> tuple[jax.Array, jax.Array, dict[str, Any] | None]:
        """(final hidden states (B, L, D), output head (D, V), new cache or None), both arrays
        in the compute dtype: the logits are their product, which `jaxlm.loss` takes in tiles."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        B, L = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        if segment_ids is None:
            segment_ids = jnp.ones((B, L), jnp.int32)
        if prefix is not None:
            mask = attention_mask(segment_ids, segment_ids, prefix=prefix)
            # Splash reads segment ids and assumes causal attention: without them attention
            # takes a path that reads the mask (attention.attend).
            segment_ids = None
        elif cache is None:
            mask = attention_mask(segment_ids, segment_ids)
        else:
            # Keys are every cache slot; the cache's segment row marks which hold real tokens.
            mask = attention_mask(segment_ids, cache["segment_ids"], cache["index"])
        inv_freq = rope_lib.frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        scale = rope_lib.attention_factor(cfg.rope_scaling)
        rope = rope_lib.cos_sin(positions, inv_freq, scale)  # once, shared by all layers

        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)  # (B, L, D)
        x = sharding.constrain(x, ("batch", "seq", "embed"))

        if cfg.scan_layers:
            x, new_layers = self._scan_blocks(x, positions, mask, segment_ids, rope, cache)
        else:
            x, new_layers = self._loop_blocks(x, positions, mask, segment_ids, rope, cache)

        x = self.final_norm(x)
        head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]  # (D, V)
        if cache is not None:
            cache = dict(cache, layers=new_layers, index=cache["index"] + L)
        return x, head.astype(dtype), cache

    def _loop_blocks(self, x, positions, mask, segment_ids, rope, cache):
        """The blocks one after another (a Python loop: one copy of each in the program)."""
        new_layers = []
        for i, block in enumerate(self.blocks):
            if cache is not None:
                layer_cache = dict(cache["layers"][i], index=cache["index"])
                x, layer_cache = block(x, positions, mask, segment_ids, rope, layer_cache)
                new_layers.append({"k": layer_cache["k"], "v": layer_cache["v"]})
            elif self.cfg.remat != "none":
                remat_block = nnx.remat(
                    lambda blk, x: blk(x, positions, mask, segment_ids, rope)[0],
                    policy=REMAT_POLICIES[self.cfg.remat],
                )
                x = remat_block(block, x)
            else:
                x, _ = block(x, positions, mask, segment_ids, rope)
        return x, new_layers

    def _scan_blocks(self, x, positions, mask, segment_ids, rope, cache):
        """The stacked blocks under one `lax.scan`: one copy of a block in the program.

        The scan slices each stacked parameter (and, when decoding, each stacked cache entry)
        along its leading `layers` axis; the residual stream is the carry.
        """
        graphdef, stacked = nnx.split(self.blocks)

        def body(x, layer):
            block_state, layer_cache = layer
            block = nnx.merge(graphdef, block_state)
            if layer_cache is not None:
                layer_cache = dict(layer_cache, index=cache["index"])
            x, layer_cache = block(x, positions, mask, segment_ids, rope, layer_cache)
            if layer_cache is not None:
                layer_cache = {"k": layer_cache["k"], "v": layer_cache["v"]}
            return sharding.constrain(x, ("batch", "seq", "embed")), layer_cache

        if cache is None and self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat])
        layer_caches = None if cache is None else cache["layers"]
        x, new_layers = jax.lax.scan(body, x, (stacked, layer_caches))
        return x, new_layers


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """n_layers blocks as one Block whose parameters have a leading `layers` axis."""
    keys = jax.random.split(rngs.params(), cfg.n_layers)
    blocks = nnx.vmap(lambda key: Block(cfg, nnx.Rngs(params=key)))(keys)
    for _, var in nnx.iter_graph(blocks):
        if isinstance(var, nnx.Param):
            var.set_metadata("axes", ("layers", *var.get_metadata()["axes"]))
    return blocks


def stack_layers(params: dict) -> dict:
    """Per-layer parameters {'blocks': {0: tree, 1: tree, ...}} -> one tree of (n_layers, ...)
    arrays, the layout of a `scan_layers` model. Works on numpy and jax arrays alike."""
    layers = [params["blocks"][i] for i in sorted(params["blocks"])]
    stack = np.stack if isinstance(jax.tree.leaves(layers[0])[0], np.ndarray) else jnp.stack
    return dict(params, blocks=jax.tree.map(lambda *xs: stack(xs), *layers))


def unstack_layers(params: dict) -> dict:
    """The inverse of `stack_layers`: one tree per layer, keyed 0 .. n_layers - 1."""
    stacked = params["blocks"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    return dict(params, blocks={i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)})


def init_cache(cfg: ModelConfig, segment_ids: jax.Array) -> dict[str, Any]:
    """An empty KV cache with one slot per column of `segment_ids` (B, S).

    `segment_ids` marks the slots that will hold real tokens (1) and padding (0), so left-padded
    prompts of different lengths can share one batch. A `scan_layers` model keeps one
    (n_layers, B, S, K, E) array for keys and one for values; otherwise a list per layer.
    """
    B, S = segment_ids.shape
    shape = (B, S, cfg.n_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    if cfg.scan_layers:
        layers: Any = {
            "k": jnp.zeros((cfg.n_layers, *shape), dtype),
            "v": jnp.zeros((cfg.n_layers, *shape), dtype),
        }
    else:
        layers = [
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(cfg.n_layers)
        ]
    return {
        "layers": layers,
        "index": jnp.array(0, jnp.int32),
        "segment_ids": segment_ids,
    }


def init_key(seed: int) -> jax.Array:
    """The parameter-init key. RBG compiles several times faster than threefry for a jitted
    init of many tensors; its values do not depend on the mesh the params are created on."""
    return jax.random.key(seed, impl="rbg")


def create(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Builds the model on the default device, without eager sharding (sharding.py places it)."""
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, nnx.Rngs(params=init_key(seed)))


def abstract(cfg: ModelConfig) -> Transformer:
    """The model with ShapeDtypeStruct leaves: shapes and counts at no memory cost."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=init_key(0))))


def logical_axes(state: nnx.State) -> dict:
    """Nested dict of each parameter's logical axis names, shaped like `state.to_pure_dict()`."""
    return traverse_util.unflatten_dict(
        {path: var.get_metadata()["axes"] for path, var in nnx.to_flat_state(state)}
    )


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
