"""Attention kernels behind one call: XLA or cuDNN (`jax.nn.dot_product_attention`) and Pallas
splash attention for TPU.

All three compute causal attention within documents: a query sees the keys at or before its
position that carry its segment id. XLA and cuDNN read that from a boolean mask (B, 1, L, S);
splash reads the segment ids (B, L) themselves and skips whole blocks that are masked out.
Bidirectional and prefix-LM masks (`model.attention_mask(prefix=...)`) are read from the mask
alone, so they run on XLA or cuDNN; a splash model takes the XLA path for them.

Sliding windows are in the mask the model builds (XLA, cuDNN) and in splash's own block mask
(`window`). Logit soft-capping (Gemma-2/3: cap * tanh(logits / cap)) runs in splash's kernel or
in an explicit XLA softmax; `jax.nn.dot_product_attention` has no soft-cap, so cuDNN cannot run it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm import sharding

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
# The checkpoint name of splash's output and log-sum-exp, the residuals its backward reads: a
# scanned model's remat="none" policy saves them (model.py); named, they are (B, H, L) rather
# than the kernel's lane-padded (B, H, L, 128) fp32 output.
RESIDUALS = "attention_residuals"
SPLASH_BLOCK = 512  # query/key block of the splash kernel; shorter sequences use their length
SPLASH_LANES = 128  # the kernel's blocks must be whole multiples of the TPU's 128 lanes


def default_for(platform: str, dtype: str, head_dim: int) -> str:
    """What `model.attention="auto"` becomes: the fused kernel where the platform has one.

    cuDNN's fused attention takes only 16-bit inputs and head dims that are multiples of 8 (up
    to 128 on every GPU generation), so an fp32 or odd-headed model stays on XLA on a GPU.
    """
    if platform == "gpu":
        cudnn_ok = dtype in ("bfloat16", "float16") and head_dim % 8 == 0 and head_dim <= 128
        return "cudnn" if cudnn_ok else "xla"
    return "splash" if platform == "tpu" else "xla"


def attend(
    q: jax.Array,  # (B, L, H, E)
    k: jax.Array,  # (B, S, K, E)
    v: jax.Array,  # (B, S, K, E)
    mask: jax.Array,  # (B, 1, L, S) bool
    segment_ids: jax.Array | None,  # (B, L); None: the mask is not causal
    implementation: str,
    *,
    scale: float | None = None,
    softcap: float = 0.0,
    window: int | jax.Array = 0,
    windows: tuple[int, ...] = (0,),
) -> jax.Array:  # (B, L, H, E)
    """Softmax(q k^T * scale) v under `mask`, by `implementation`.

    Splash runs where its kernel can tile the sequence (keys aligned with queries, L a multiple
    of 128) and the mask is causal within documents; anything else (KV-cache decoding, short
    scoring batches, bidirectional or prefix attention, marked by `segment_ids=None`) goes
    through XLA. cuDNN reads the mask, so it runs any of them.

    Args:
      scale: multiplies the logits; None is 1/sqrt(E).
      softcap: logits become softcap * tanh(logits / softcap) before masking; 0 is off.
      window: this layer's sliding window (0: none). The mask already holds it; splash, which
        does not read the mask, builds its kernel for it. A traced value (one per layer under
        `lax.scan`) selects among the kernels for `windows`, the model's distinct windows.
    """
    if implementation == "splash":
        if segment_ids is not None and splash_tiles(q.shape[1], k.shape[1]):
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            kernels = [  # static settings bound here: lax.switch traces its operands
                functools.partial(_splash, scale=scale, softcap=softcap, window=w) for w in windows
            ]
            if isinstance(window, int):
                return kernels[windows.index(window)](q, k, v, segment_ids)
            branch = jnp.argmax(jnp.asarray(windows) == window)
            return jax.lax.switch(branch, kernels, q, k, v, segment_ids)
        implementation = "xla"
    if softcap:
        return _softcapped(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale, softcap)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, implementation=implementation
    )


def _softcapped(q, k, v, mask, scale: float, softcap: float) -> jax.Array:
    """Attention with soft-capped logits, spelled out for XLA (query head h reads kv head
    h // (H / K), as `jax.nn.dot_product_attention` and transformers group them)."""
    B, L, H, E = q.shape
    K = k.shape[2]
    q = q.reshape(B, L, K, H // K, E)  # (B, L, K, G, E)
    logits = jnp.einsum("BLKGE,BSKE->BKGLS", q, k).astype(jnp.float32) * scale
    logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)  # (B, 1, 1, L, S)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGLS,BSKE->BLKGE", probs, v)
    return out.reshape(B, L, H, E)


def splash_tiles(q_len: int, kv_len: int) -> bool:
    """Whether the splash kernel takes these lengths (blocks are whole multiples of 128 lanes)."""
    return q_len == kv_len and q_len % SPLASH_LANES == 0 and q_len % min(SPLASH_BLOCK, q_len) == 0


def _splash_kernel(n_heads: int, seq_len: int, interpret: bool, window: int, softcap: float):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # only when used

    block = min(SPLASH_BLOCK, seq_len)
    shape = (seq_len, seq_len)
    # A window of W keys: the query's own and the W - 1 before it (transformers' semantics).
    one = splash.LocalMask(shape, (window - 1, 0), 0) if window else splash.CausalMask(shape)
    mask = splash.MultiHeadMask([one] * n_heads)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    # head_shards/q_seq_shards describe how the mask is split; here each device builds the
    # kernel for its own heads (inside shard_map), so the mask is never split.
    return splash.make_splash_mha(
        mask,
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
        attn_logits_soft_cap=softcap or None,
        residual_checkpoint_name=RESIDUALS,
    )


def _splash(q, k, v, segment_ids, *, scale: float, softcap: float, window: int):
    # Pallas kernels are not partitioned by XLA: run one per device on its own batch rows and
    # heads. Off TPU the kernel runs in interpret mode (slow; for tests).
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    interpret = sharding.platform() != "tpu"  # the target's: compiling for TPU on a CPU is real

    def local(q, k, v, segment_ids):  # this device's slice
        B, L, H, E = q.shape
        kernel = _splash_kernel(H, L, interpret, window, softcap)
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  (B, L, N, E) -> (B, N, L, E)
        out = jax.vmap(kernel)(
            heads_first(q * scale).astype(q.dtype),
            heads_first(k),
            heads_first(v),
            segment_ids=SegmentIds(q=segment_ids, kv=segment_ids),
        )
        return heads_first(out)

    return sharding.per_device(
        local,
        in_axes=(
            ("batch", "seq", "heads", "head_dim"),
            ("batch", "seq", "kv_heads", "head_dim"),
            ("batch", "seq", "kv_heads", "head_dim"),
            ("batch", "seq"),
        ),
        out_axes=("batch", "seq", "heads", "head_dim"),
    )(q, k, v, segment_ids)
