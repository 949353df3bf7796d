"""Decoder-only transformer in Flax NNX: the Llama block and the switches of the families in
`families.py` (Qwen2/3, Mistral, OLMo-2, Gemma-2/3).

RMSNorm, rotary position embeddings (Hugging Face "rotate half" layout, so imported weights need
no permutation), grouped-query attention and a gated MLP (`layers.py`); in the sparse layers of
an MoE model (`ModelConfig.moe`) a mixture of experts (`moe.py`), whose router statistics
`Transformer.forward` returns. Parameters are stored in fp32 and cast to `ModelConfig.dtype` for
compute; logits come back in fp32.

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

from jaxlm import attention, context, families, layers, sharding, speedrun
from jaxlm import moe as moe_lib
from jaxlm import rope as rope_lib
from jaxlm.errors import ConfigError, ConvertError

QK_NORMS = ("none", "head", "full")
NORM_PLACEMENTS = ("pre", "post", "both")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the network's shapes and numerics (built once from config.model)."""

    vocab_size: int
    d_model: int  # D
    n_layers: int
    n_heads: int  # H
    n_kv_heads: int  # K; must divide H (grouped-query attention)
    head_dim: int  # E
    d_ff: int  # F, MLP hidden size
    max_seq_len: int = 2048  # longest position the model is meant for (RoPE scaling, checks)
    rope_theta: float = 10000.0
    # RoPE scaling (Llama 3, linear, YaRN) in rope.parse_scaling's canonical tuple, or None.
    rope_scaling: tuple | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype: float32 | bfloat16; params stay float32
    remat: str = "none"  # none | full | dots (save matmul outputs, recompute the rest)
    attention: str = "xla"  # xla | cudnn | splash (see jaxlm/attention.py)
    context_parallel: str = "none"  # none | all_gather | ring (see jaxlm/context.py)
    # Blocks stacked on a leading `layers` axis and run by one scan: compile time and program
    # size stay flat in depth. Parameters then have a (n_layers, ...) shape; see stack_layers.
    scan_layers: bool = False
    init_std: float = 0.02
    # Architecture switches (all off: the Llama block). See docs/families.md.
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: str = "none"  # none | head (RMSNorm per head over E: Qwen3, Gemma-3) | full (OLMo-2)
    norm_placement: str = "pre"  # pre (Llama) | post (sublayer outputs: OLMo-2) | both (Gemma)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), w initialised to 0 (Gemma)
    embed_scale: bool = False  # embeddings multiplied by sqrt(d_model) (Gemma)
    mlp_act: str = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU, Gemma) | relu2 (ReLU², no gate)
    sliding_window: int = 0  # W > 0: a query sees itself and the W - 1 tokens before it
    global_every: int = 0  # with a window, layers N-1, 2N-1, ... attend globally; 0: none do
    rope_local_theta: float = 0.0  # RoPE base of the windowed layers (Gemma-3); 0: rope_theta
    attn_softcap: float = 0.0  # attention logits -> c * tanh(logits / c); 0: off
    final_softcap: float = 0.0  # output logits -> c * tanh(logits / c); 0: off
    query_scale_dim: int = 0  # attention logits scaled by this**-0.5 (Gemma-3); 0: head_dim
    zero_init_out: bool = False  # attention's wo and the MLP's w_down start at zero
    value_embeds: int = 0  # n value-embedding tables (jaxlm/speedrun.py); 0: off
    mtp_heads: int = 0  # multi-token-prediction heads (jaxlm/speedrun.py); 0: off
    family: str = ""  # Hugging Face family to export as; "": the first whose switches these are
    # Mixture of experts in place of the MLP of the sparse layers (jaxlm/moe.py); None: dense.
    # A `config.model.moe` section (dict) is built into its MoEConfig here (n_experts=0: None).
    moe: moe_lib.MoEConfig | None = None

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
        choices = {
            "qk_norm": QK_NORMS,
            "norm_placement": NORM_PLACEMENTS,
            "mlp_act": tuple(layers.ACTIVATIONS),
            "family": ("", *families.FAMILIES),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"model.{key} must be one of {allowed}, not {getattr(self, key)!r}."
                )
        for key in (
            "sliding_window",
            "global_every",
            "query_scale_dim",
            "value_embeds",
            "mtp_heads",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be 0 (off) or more.")
        if self.value_embeds and (self.scan_layers or self.value_embeds > self.n_layers):
            raise ConfigError(
                f"model.value_embeds={self.value_embeds} needs unscanned layers "
                f"(model.scan_layers=False) and at most model.n_layers={self.n_layers} tables."
            )
        if self.global_every and not self.sliding_window:
            raise ConfigError("model.global_every needs model.sliding_window > 0.")
        if self.attention == "cudnn" and self.attn_softcap:
            raise ConfigError(
                "model.attn_softcap cannot run on cuDNN attention (jax's cuDNN call has no "
                "soft-cap); use model.attention=xla."
            )
        context.check(self.context_parallel, self.attention)
        if self.moe is not None and not isinstance(self.moe, moe_lib.MoEConfig):
            object.__setattr__(self, "moe", moe_lib.MoEConfig.from_fields(self.moe, self.d_ff))
        if self.moe is not None:
            self.moe.check_model(self.n_layers, self.scan_layers, self.mlp_act)

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
        if resolved == "cudnn" and self.attn_softcap:
            resolved = "xla"  # jax's cuDNN attention has no soft-cap
        if self.context_parallel == "ring" or (
            self.context_parallel != "none" and resolved == "splash"
        ):
            resolved = "xla"  # what runs a split sequence (jaxlm/context.py)
        return dataclasses.replace(self, attention=resolved)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ModelConfig:
        """Builds the config from its JSON form (`model_config.json`, checkpoint metadata);
        keys that are not fields (a run config's other settings) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
        """Builds the config of a Hugging Face `config.json` of one of `families.FAMILIES`
        (`where` names it in errors).

        Raises:
          ConvertError: another architecture, or an option jaxlm does not implement.
        """
        fields = families.fields_from_hf(hf, where)
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConvertError(f"{where} describes a model jaxlm cannot build: {e}") from None

    def to_hf(
        self, dtype: str = "float32", special_ids: dict[str, int | None] | None = None
    ) -> dict[str, Any]:
        """A `config.json` for transformers' class of this model's family (`families.py`)."""
        return families.hf_config(self, dtype, special_ids)

    def layer_windows(self) -> tuple[int, ...]:
        """Each layer's sliding window (0: attends to the whole sequence)."""
        every = self.global_every
        return tuple(
            0 if every and (i + 1) % every == 0 else self.sliding_window
            for i in range(self.n_layers)
        )

    def is_sparse(self, layer: int) -> bool:
        """Whether block `layer` has the MoE feed-forward (`model.moe`) instead of the MLP."""
        return self.moe is not None and self.moe.is_sparse(layer)

    def window_sizes(self) -> tuple[int, ...]:
        """The distinct windows of the layers, sorted (0: global)."""
        return tuple(sorted(set(self.layer_windows())))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls plus causal attention.

        N counts every non-embedding parameter (the norm scales too, a rounding error) and the
        output projection (V x D), but not the embedding lookup; in an MoE layer only the
        parameters a token is multiplied by (`moe.active_params`). Attention scores and values
        cost 2 matmuls of L x L x (H E) per layer forward; causal masking halves the useful
        work, and training is 3x forward: 6 L H E per token per layer, the way MaxText counts it.
        """
        D, H, K, E, F = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        mlp_matrices = 2 if self.mlp_act in layers.UNGATED else 3
        per_layer = D * H * E + 2 * D * K * E + H * E * D
        per_layer += D * (4 if self.norm_placement == "both" else 2)  # block norms
        per_layer += (H + 2 * K) * E if self.qkv_bias else 0
        per_layer += {"none": 0, "head": 2 * E, "full": (H + K) * E}[self.qk_norm]
        feed_forward = sum(
            moe_lib.active_params(self.moe, D) if self.is_sparse(i) else mlp_matrices * D * F
            for i in range(self.n_layers)
        )
        matmul_params = self.n_layers * per_layer + feed_forward + D + self.vocab_size * D
        matmul_params += self.mtp_heads * (D * D + D + self.vocab_size * D)  # training only
        return 6 * matmul_params + self.attention_flops_per_token(seq_len)

    def attention_flops_per_token(self, seq_len: int) -> int:
        """The attention scores' and values' part of `flops_per_token`: 6 L H E per layer.

        A query sees L / 2 keys on average under a causal mask; in a layer with a sliding
        window W it sees at most W, so such a layer counts 6 min(L, 2 W) H E.
        """
        keys = [min(seq_len, 2 * w) if w else seq_len for w in self.layer_windows()]
        return 6 * self.n_heads * self.head_dim * sum(keys)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _save_matmuls_and_attention(prim: Any, *_, **params) -> bool:
    """The scan's `remat="none"` policy: save matmul outputs and attention's residuals (splash's,
    named `attention.RESIDUALS`; cuDNN's forward), recompute the elementwise work between them.
    A scan's residuals are (n_layers, ...) stacks XLA cannot fuse into the backward as it does
    unrolled; saving every norm and SwiGLU intermediate cost llama_1b 1.64x the unrolled
    temporaries on v5p-8 (docs/perf.md). No matmul or attention kernel runs twice."""
    if prim.name == "name":
        return params["name"] == attention.RESIDUALS
    # cuDNN attention's forward is bound as the wrapper primitive under autodiff.
    cudnn = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")
    return prim.name in ("dot_general", "ragged_dot_general", *cudnn)


# What the scanned body saves for the backward pass; remat="none" has its policy too (above).
SCAN_POLICIES = dict(REMAT_POLICIES, none=_save_matmuls_and_attention)


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


class Block(nnx.Module):
    """Transformer block: x + attn(norm(x)), then x + mlp(norm(x)) (`norm_placement="pre"`).

    "post" normalises the sublayer's output instead (x + norm(attn(x)), OLMo-2), "both" does
    both (x + norm(attn(norm(x))), Gemma). A `sparse` block's mlp is an `moe.MoEBlock`, whose
    router statistics the block returns beside x.
    """

    def __init__(
        self, cfg: ModelConfig, rngs: nnx.Rngs, sparse: bool = False, value_table: int = -1
    ):
        """`value_table`: which of `inputs.value_embeds` this block's values add (-1: none)."""
        pre, post = cfg.norm_placement != "post", cfg.norm_placement != "pre"
        if pre:
            self.attn_norm = layers.norm(cfg, cfg.d_model)
        self.attn = layers.Attention(cfg, rngs, value_gate=value_table >= 0)
        if post:
            self.attn_post_norm = layers.norm(cfg, cfg.d_model)
        if pre:
            self.mlp_norm = layers.norm(cfg, cfg.d_model)
        if sparse:
            out_std = layers.output_std(cfg)  # the experts' w_down as the dense MLP's
            self.mlp = moe_lib.MoEBlock(cfg.moe, cfg.d_model, cfg.init_std, out_std, rngs)
        else:
            self.mlp = layers.MLP(cfg, rngs)
        if post:
            self.mlp_post_norm = layers.norm(cfg, cfg.d_model)
        self.pre, self.post, self.sparse = pre, post, sparse
        self.value_table = value_table

    def __call__(
        self,
        x: jax.Array,  # (B, L, D)
        inputs: LayerInputs,
        window: int | jax.Array,  # this layer's sliding window (0: none); traced under scan
        cache: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None, dict[str, jax.Array]]:
        """(x, the new cache or None, the MoE block's aux ({} in a dense block))."""
        mask, rope = inputs.for_window(window)
        h = self.attn_norm(x) if self.pre else x
        value_embed = inputs.value_embeds[self.value_table] if self.value_table >= 0 else None
        h, cache = self.attn(h, mask, inputs.segment_ids, rope, cache, window, value_embed)
        x = x + (self.attn_post_norm(h) if self.post else h)
        h = self.mlp(self.mlp_norm(x) if self.pre else x)
        h, aux = h if self.sparse else (h, {})
        x = x + (self.mlp_post_norm(h) if self.post else h)
        return sharding.constrain(x, ("batch", "seq", "embed")), cache, aux


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """What every block reads besides the residual stream, built once per forward pass.

    `masks` and `ropes` hold one entry per distinct layer window (`windows`, 0 first when some
    layer is global): the windowed layers' mask keeps only keys less than W slots away, and
    their RoPE may have its own base (`rope_local_theta`).
    """

    windows: tuple[int, ...]
    masks: tuple[jax.Array | context.Sequence, ...]  # (B, 1, L, S) bool each
    ropes: tuple[tuple[jax.Array, jax.Array], ...]  # (cos, sin), (B, L, E/2) each
    segment_ids: jax.Array | None  # (B, L); None when the mask is not causal
    value_embeds: jax.Array | None = None  # (n, B, L, K, E): each table's lookup of the tokens

    def for_window(self, window: int | jax.Array) -> tuple[jax.Array, tuple]:
        """(mask, rope) of a layer: picked in Python for a static window, by value for a
        traced one (one scanned program for all layers)."""
        if len(self.windows) == 1:
            return self.masks[0], self.ropes[0]
        if isinstance(window, int):
            i = self.windows.index(window)
            return self.masks[i], self.ropes[i]
        picks = [window == w for w in self.windows]
        pick = lambda *options: jnp.select(picks, options, options[0])  # noqa: E731
        return jax.tree.map(pick, *self.masks), jax.tree.map(pick, *self.ropes)


def _windowed(mask: jax.Array, window: int, q_offset: jax.Array | int) -> jax.Array:
    """`mask` (B, 1, L, S) keeping only keys fewer than `window` slots from the query.

    Slots, not positions, as transformers counts: the query's own and the W - 1 before it (and,
    in a bidirectional prefix, after it). Padding slots inside the window stay masked.
    """
    L, S = mask.shape[-2:]
    distance = jnp.arange(L)[:, None] + q_offset - jnp.arange(S)[None, :]  # (L, S)
    return mask & (jnp.abs(distance) < window)


class Transformer(nnx.Module):
    """The language model: tokens (B, L) -> logits (B, L, V) in fp32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = layers.param(
            rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std
        )
        if cfg.scan_layers:
            self.blocks = _stacked_blocks(cfg, rngs)
        else:
            tables = [
                speedrun.value_table(cfg.value_embeds, cfg.n_layers, i) for i in range(cfg.n_layers)
            ]
            self.blocks = nnx.List(
                [Block(cfg, rngs, cfg.is_sparse(i), tables[i]) for i in range(cfg.n_layers)]
            )
        self.final_norm = layers.norm(cfg, cfg.d_model)
        if not cfg.tie_embeddings:
            self.lm_head = layers.param(
                rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std
            )
        # Drawn last, so that switching them on leaves every other parameter's init as it was.
        if cfg.value_embeds:
            self.value_embeds = speedrun.value_tables(cfg, rngs)
        if cfg.mtp_heads:
            self.mtp = speedrun.MTPHeads(cfg, rngs)

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
        logits, cache, _ = self.forward(tokens, positions, segment_ids, cache, prefix)
        return logits if cache is None else (logits, cache)

    def forward(
        self, tokens, positions=None, segment_ids=None, cache=None, prefix=None
    ) -> tuple[jax.Array, dict[str, Any] | None, dict[str, jax.Array]]:
        """(logits (B, L, V) fp32, new cache or None, router statistics): `__call__` with the
        MoE layers' `moe.summarize` ({} for a dense model), which the train loss adds."""
        x, head, cache, moe_aux = self.hidden_and_head(
            tokens, positions, segment_ids, cache, prefix
        )
        return self.logits(x, head), cache, moe_aux

    def logits(self, x: jax.Array, head: jax.Array) -> jax.Array:
        """Final hidden states (B, L, D) times the output head (D, V): logits (B, L, V) fp32,
        soft-capped with `final_softcap`."""
        logits = jnp.einsum("BLD,DV->BLV", x, head).astype(jnp.float32)
        if self.cfg.final_softcap:
            logits = self.cfg.final_softcap * jnp.tanh(logits / self.cfg.final_softcap)
        return sharding.constrain(logits, ("batch", "seq", "vocab"))

    def hidden_and_head(
        self, tokens, positions=None, segment_ids=None, cache=None, prefix=None
    ) -> tuple[jax.Array, jax.Array, dict[str, Any] | None, dict[str, jax.Array]]:
        """(final hidden states (B, L, D), output head (D, V), new cache or None, router
        statistics as in `forward`), both arrays in the compute dtype: the logits are their
        product, which `jaxlm.loss` takes in tiles."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        B, L = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        if segment_ids is None:
            segment_ids = jnp.ones((B, L), jnp.int32)
        q_offset, seq = 0, None
        if cfg.context_parallel != "none" and cache is None:
            seq = context.Sequence.of(cfg.context_parallel, segment_ids, prefix)
        if seq is not None:
            # The mask is described, not built (L x L would not fit); the ring's token order.
            tokens, positions = seq.order(tokens), seq.order(positions)
            mask, segment_ids = seq, None
        elif prefix is not None:
            mask = attention_mask(segment_ids, segment_ids, prefix=prefix)
            # Splash reads segment ids and assumes causal attention: without them attention
            # takes a path that reads the mask (attention.attend).
            segment_ids = None
        elif cache is None:
            mask = attention_mask(segment_ids, segment_ids)
        else:
            # Keys are every cache slot; the cache's segment row marks which hold real tokens.
            q_offset = cache["index"]
            mask = attention_mask(segment_ids, cache["segment_ids"], q_offset)
        inv_freq = rope_lib.frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        scale = rope_lib.attention_factor(cfg.rope_scaling)
        rope = rope_lib.cos_sin(positions, inv_freq, scale)  # once, shared by all layers
        windows = cfg.window_sizes()
        local_rope = rope
        if cfg.rope_local_theta:  # Gemma-3: the windowed layers' own base, without scaling
            local_freq = rope_lib.frequencies(cfg.head_dim, cfg.rope_local_theta, None)
            local_rope = rope_lib.cos_sin(positions, local_freq)
        inputs = LayerInputs(
            windows=windows,
            masks=tuple(_windowed(mask, w, q_offset) if w and not seq else mask for w in windows),
            ropes=tuple(local_rope if w else rope for w in windows),
            segment_ids=segment_ids,
            value_embeds=(
                jnp.take(self.value_embeds[...], tokens, axis=1).astype(dtype)  # (n, B, L, K, E)
                if cfg.value_embeds
                else None
            ),
        )

        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)  # (B, L, D)
        if cfg.embed_scale:  # in the compute dtype, as transformers' Gemma rounds it
            x = x * jnp.asarray(math.sqrt(cfg.d_model), dtype)
        x = sharding.constrain(x, ("batch", "seq", "embed"))

        if cfg.scan_layers:
            x, new_layers, moe_aux = self._scan_blocks(x, inputs, cache)
        else:
            x, new_layers, moe_aux = self._loop_blocks(x, inputs, cache)

        x = self.final_norm(x if seq is None else seq.restore(x))
        head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]  # (D, V)
        if cache is not None:
            cache = dict(cache, layers=new_layers, index=cache["index"] + L)
        return x, head.astype(dtype), cache, moe_lib.summarize(moe_aux) if moe_aux else {}

    def _loop_blocks(self, x, inputs, cache):
        """The blocks one after another (a Python loop: one copy of each in the program);
        returns the sparse layers' aux stacked on a leading axis ({} if none)."""
        new_layers, moe_aux = [], []
        windows = self.cfg.layer_windows()
        for i, (block, window) in enumerate(zip(self.blocks, windows, strict=True)):
            if cache is not None:
                layer_cache = dict(cache["layers"][i], index=cache["index"])
                x, layer_cache, aux = block(x, inputs, window, layer_cache)
                new_layers.append({"k": layer_cache["k"], "v": layer_cache["v"]})
            elif self.cfg.remat != "none":
                remat_block = nnx.remat(
                    _block_call(inputs, window), policy=REMAT_POLICIES[self.cfg.remat]
                )
                x, aux = remat_block(block, x)
            else:
                x, _, aux = block(x, inputs, window)
            if aux:
                moe_aux.append(aux)
        stacked = jax.tree.map(lambda *v: jnp.stack(v), *moe_aux) if moe_aux else {}
        return x, new_layers, stacked

    def _scan_blocks(self, x, inputs, cache):
        """The stacked blocks under one `lax.scan`: one copy of a block in the program.

        The scan slices each stacked parameter (and, when decoding, each stacked cache entry)
        along its leading `layers` axis; the residual stream is the carry. With windowed and
        global layers mixed, each layer's window is scanned too, and picks its mask and RoPE.
        """
        graphdef, stacked = nnx.split(self.blocks)
        windows = inputs.windows
        per_layer = jnp.asarray(self.cfg.layer_windows(), jnp.int32) if len(windows) > 1 else None

        def body(x, layer):
            block_state, layer_cache, window = layer
            block = nnx.merge(graphdef, block_state)
            if layer_cache is not None:
                layer_cache = dict(layer_cache, index=cache["index"])
            window = windows[0] if window is None else window
            x, layer_cache, aux = block(x, inputs, window, layer_cache)
            if layer_cache is not None:
                layer_cache = {"k": layer_cache["k"], "v": layer_cache["v"]}
            return sharding.constrain(x, ("batch", "seq", "embed")), (layer_cache, aux)

        if cache is None:
            # The scan already keeps the recomputation apart from the forward: no CSE barrier.
            body = jax.checkpoint(body, policy=SCAN_POLICIES[self.cfg.remat], prevent_cse=False)
        layer_caches = None if cache is None else cache["layers"]
        x, (new_layers, moe_aux) = jax.lax.scan(body, x, (stacked, layer_caches, per_layer))
        return x, new_layers, moe_aux


def _block_call(inputs: LayerInputs, window: int):
    """block, x -> (block's output, its MoE aux), for `nnx.remat`; the window is closed over,
    not an argument, so that it stays a Python int (remat traces every argument, defaults too)."""

    def call(block: Block, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        x, _, aux = block(x, inputs, window)
        return x, aux

    return call


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """n_layers blocks as one Block whose parameters have a leading `layers` axis."""
    keys = jax.random.split(rngs.params(), cfg.n_layers)
    # Every layer sparse or every one dense (ModelConfig refuses a mix with scan_layers).
    blocks = nnx.vmap(lambda key: Block(cfg, nnx.Rngs(params=key), cfg.is_sparse(0)))(keys)
    for _, var in nnx.iter_graph(blocks):
        if isinstance(var, (nnx.Param, moe_lib.RouterBias)):
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
