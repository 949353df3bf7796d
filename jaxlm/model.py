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

from jaxlm import attention, context, layers, sharding, speedrun
from jaxlm import moe as moe_lib
from jaxlm import rope as rope_lib
from jaxlm.model_config import ModelConfig

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
