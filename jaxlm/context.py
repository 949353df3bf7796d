"""Context parallelism: attention that stays exact when the sequence is split over devices.

Under a preset that maps the logical `seq` axis to the `context` mesh axis (`cp_fsdp`,
`cp_fsdp_tp` in `sharding.PRESETS`), every activation (B, L, ...) holds L / n tokens per device
(n: the context degree). Everything but attention is per token, so XLA partitions it alone;
attention needs every key of a query's document, so it runs here, per device (shard_map), by
`model.context_parallel`:

- `all_gather`: each device gathers the whole K and V (and the tokens' slots, segment ids and
  prefix marks) over `context` and attends its L / n queries to all L keys. The mask is built
  locally, so the XLA and cuDNN kernels both run it; memory grows with L / n x L logits.
- `ring`: K and V travel round the ring of context devices in n steps (`ppermute`); each step
  attends the local queries to one visiting block and folds the result into a running softmax
  (max, sum, weighted values in fp32). Logits are one block, L / n x L / n, recomputed in the
  backward pass (`jax.checkpoint` per step), so memory is flat in n. Load balancing: the
  sequence is laid out zigzag (device i holds chunks i and 2n-1-i of 2n), so under a causal mask
  every step after the first needs exactly half a block: all queries against the visitor's
  early chunk when it comes from a lower device, else the local late chunk against the whole
  visitor. The model permutes tokens, positions, segment ids and prefix marks into that order
  and its final hidden states back (`Sequence`), so callers and the loss never see it.

Both read masks as the model does (`model.attention_mask`): causal within a segment, padding
(segment 0) sees only padding, prefix-marked tokens see each other both ways, and a sliding
window keeps keys fewer than W slots away; logit soft-capping runs in both. A bidirectional
(prefix) mask is not contained in the causal one, so the ring takes whole blocks every step.

Splash is not used under context parallelism: its kernel tiles a whole local sequence against
itself with no query offset or running softmax to carry (`validate` refuses model.attention=splash
with it; `auto` resolves to XLA). The ring runs its own XLA blocks, so cuDNN is refused for it.

Shapes: B batch, L length (local inside shard_map), H heads, K kv heads, G = H / K, E head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxlm import attention, sharding
from jaxlm.errors import ConfigError

STRATEGIES = ("none", "all_gather", "ring")
_SEQ = ("batch", "seq")
_Q = ("batch", "seq", "heads", "head_dim")
_KV = ("batch", "seq", "kv_heads", "head_dim")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("slots", "segment_ids", "prefix"),
    meta_fields=("strategy", "degree"),
)
@dataclasses.dataclass(frozen=True)
class Sequence:
    """What context-parallel attention reads in place of a (B, 1, L, S) mask, which at long
    lengths would not fit: per token (B, L), its slot in the unpermuted sequence, its segment id
    and prefix mark (None: causal), in the device order of `strategy` (zigzag for the ring)."""

    slots: jax.Array  # (B, L) int32
    segment_ids: jax.Array  # (B, L)
    prefix: jax.Array | None  # (B, L); non-zero tokens see each other both ways
    strategy: str
    degree: int  # n, the context devices the sequence is split over

    @classmethod
    def of(cls, strategy: str, segment_ids: jax.Array, prefix: jax.Array | None) -> Sequence | None:
        """The layout of a (B, L) batch for `strategy` on the mesh being traced (degree 1 off
        a mesh); `order` then puts per-token inputs into it. None when L does not split over
        the context devices (`validate` refuses that for training; a short scoring batch then
        attends the unsplit way, which XLA partitions itself)."""
        B, L = segment_ids.shape
        degree = sharding.logical_size("seq")
        if L % multiple(strategy, degree):
            return None
        slots = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        seq = cls(slots, segment_ids, prefix, strategy, degree)
        return dataclasses.replace(
            seq,
            slots=seq.order(slots),
            segment_ids=seq.order(segment_ids),
            prefix=None if prefix is None else seq.order(prefix),
        )

    def order(self, x: jax.Array) -> jax.Array:
        """(B, L, ...) in sequence order -> device order: zigzag for the ring, else as is."""
        if self.strategy != "ring" or self.degree == 1:
            return x
        B, L, n = x.shape[0], x.shape[1], self.degree
        halves = x.reshape(B, 2, n, L // (2 * n), *x.shape[2:])  # chunks 0..n-1, n..2n-1
        # device i: chunk i, then chunk 2n-1-i (the late half read backwards)
        pairs = jnp.stack([halves[:, 0], jnp.flip(halves[:, 1], axis=1)], axis=2)
        return pairs.reshape(x.shape)

    def restore(self, x: jax.Array) -> jax.Array:
        """(B, L, ...) in device order -> sequence order (undoes `order`)."""
        if self.strategy != "ring" or self.degree == 1:
            return x
        B, L, n = x.shape[0], x.shape[1], self.degree
        pairs = x.reshape(B, n, 2, L // (2 * n), *x.shape[2:])
        halves = jnp.stack([pairs[:, :, 0], jnp.flip(pairs[:, :, 1], axis=1)], axis=1)
        return halves.reshape(x.shape)


def check(strategy: str, implementation: str) -> None:
    """Refuses a `model.context_parallel` that is unknown or that `implementation` cannot run."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"model.context_parallel must be one of {STRATEGIES}, not {strategy!r}.")
    if strategy != "none" and implementation == "splash":
        raise ConfigError(
            "model.attention=splash cannot attend over a sequence split by "
            "model.context_parallel (its kernel carries no running softmax between devices); "
            "use model.attention=xla or auto."
        )
    if strategy == "ring" and implementation == "cudnn":
        raise ConfigError(
            "model.context_parallel=ring computes its blocks in XLA; use model.attention=xla or "
            "auto (all_gather runs on cuDNN)."
        )


def multiple(strategy: str, degree: int) -> int:
    """What a sequence length must be a multiple of under `strategy` over `degree` devices."""
    return 2 * degree if strategy == "ring" else degree


def attend(
    q: jax.Array,  # (B, L, H, E)
    k: jax.Array,  # (B, L, K, E)
    v: jax.Array,  # (B, L, K, E)
    seq: Sequence,
    implementation: str,
    *,
    scale: float | None = None,
    softcap: float = 0.0,
    window: int | jax.Array = 0,
) -> jax.Array:  # (B, L, H, E)
    """`attention.attend` for a sequence split over the context axis, by `seq.strategy`.

    Args:
      implementation: the kernel of an all-gather's local attention (xla | cudnn); the ring
        always computes its blocks in XLA.
      scale, softcap, window: as in `attention.attend` (a traced window selects by value).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    axes = sharding.mesh_axes("seq")
    if seq.strategy == "all_gather":
        local = functools.partial(
            _gathered, axes=axes, implementation=implementation, scale=scale, softcap=softcap
        )
    else:
        local = functools.partial(_ring, axes=axes, degree=seq.degree, scale=scale, softcap=softcap)
    return sharding.per_device(local, in_axes=(_Q, _KV, _KV, _SEQ, ()), out_axes=_Q)(
        q, k, v, seq, jnp.asarray(window, jnp.int32)
    )


def _allowed(q: Sequence, k: Sequence, window: jax.Array) -> jax.Array:
    """(B, Lq, Lk) bool: which keys each query sees, as `model.attention_mask` and
    `model._windowed` decide it, from the tokens' slots rather than their places."""
    causal = q.slots[:, :, None] >= k.slots[:, None, :]
    if q.prefix is not None:
        causal = causal | ((q.prefix > 0)[:, :, None] & (k.prefix > 0)[:, None, :])
    same_segment = q.segment_ids[:, :, None] == k.segment_ids[:, None, :]
    near = jnp.abs(q.slots[:, :, None] - k.slots[:, None, :]) < window
    return causal & same_segment & ((window == 0) | near)


def _gathered(q, k, v, seq, window, *, axes, implementation, scale, softcap):
    """One device: its queries against the whole gathered K and V."""
    if axes:
        gather = functools.partial(jax.lax.all_gather, axis_name=axes, axis=1, tiled=True)
        k, v, keys = gather(k), gather(v), jax.tree.map(gather, seq)
    else:
        keys = seq
    mask = _allowed(seq, keys, window)[:, None]  # (B, 1, Lq, Lk)
    return attention.attend(q, k, v, mask, None, implementation, scale=scale, softcap=softcap)


def _ring(q, k, v, seq, window, *, axes, degree, scale, softcap):
    """One device: its queries against each device's K/V block in turn, round the ring."""
    B, L, H, E = q.shape
    K = k.shape[2]
    q = q.reshape(B, L, K, H // K, E)
    fold = jax.checkpoint(functools.partial(_fold, window=window, scale=scale, softcap=softcap))
    acc = (
        jnp.zeros((B, L, K, H // K, E), jnp.float32),  # softmax-weighted values, unnormalised
        jnp.full((B, K, H // K, L), -jnp.inf, jnp.float32),  # running max of the logits
        jnp.zeros((B, K, H // K, L), jnp.float32),  # running sum of exp(logit - max)
    )
    acc = fold(acc, q, seq, (k, v, seq))  # the local block: causal inside
    if degree > 1:
        me = jax.lax.axis_index(axes)
        c = L // 2  # one chunk; the local block is [chunk me, chunk 2n-1-me]
        causal = seq.prefix is None

        def early_keys(acc, block):  # visitor from a lower device: its early chunk only
            k, v, keys = block
            first = jax.tree.map(lambda x: x[:, :c], (k, v, keys))
            return fold(acc, q, seq, first)

        def late_queries(acc, block):  # visitor from a higher device: the late chunk sees it
            late = jax.tree.map(lambda x: x[:, c:], seq)
            o, m, s = fold(_rows(acc, slice(c, None)), q[:, c:], late, block)
            return _joined(acc, (o, m, s), c)

        def step(carry, shift):
            acc, block = carry
            visiting = jax.lax.ppermute(block, axes, [(i, (i + 1) % degree) for i in range(degree)])
            source = (me - shift) % degree
            if causal:
                acc = jax.lax.cond(source < me, early_keys, late_queries, acc, visiting)
            else:
                acc = fold(acc, q, seq, visiting)
            return (acc, visiting), None

        (acc, _), _ = jax.lax.scan(step, (acc, (k, v, seq)), jnp.arange(1, degree))
    o, _, total = acc
    out = o / jnp.moveaxis(total, -1, 1)[..., None]  # (B, L, K, G, E)
    return out.reshape(B, L, H, E).astype(v.dtype)


def _rows(acc, rows: slice):
    """The accumulator of the queries `rows` (of L)."""
    o, m, s = acc
    return o[:, rows], m[..., rows], s[..., rows]


def _joined(acc, late, c: int):
    """`acc` with the queries from `c` on replaced by `late`."""
    o, m, s = _rows(acc, slice(None, c))
    lo, lm, ls = late
    return (
        jnp.concatenate([o, lo], axis=1),
        jnp.concatenate([m, lm], axis=-1),
        jnp.concatenate([s, ls], axis=-1),
    )


def _fold(acc, q, queries: Sequence, block, *, window, scale, softcap):
    """`acc` (weighted values, max, sum) updated with the keys and values of `block`.

    q (B, Lq, K, G, E); block: k, v (B, Lk, K, E) and their `Sequence`. Masked logits add
    nothing (exp is replaced by 0), so a query whose keys are all elsewhere keeps its running
    values; every query sees at least itself somewhere on the ring, so the final sum is > 0.
    """
    k, v, keys = block
    o, m, s = acc
    logits = jnp.einsum("BLKGE,BSKE->BKGLS", q, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    allowed = _allowed(queries, keys, window)[:, None, None]  # (B, 1, 1, Lq, Lk)
    # The max only keeps exp in range: the output does not depend on it.
    block_max = jnp.max(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    new_m = jax.lax.stop_gradient(jnp.maximum(m, block_max))
    safe_m = jnp.where(jnp.isfinite(new_m), new_m, 0.0)  # no key seen yet: nothing to rescale
    probs = jnp.where(allowed, jnp.exp(logits - safe_m[..., None]), 0.0)  # (B, K, G, Lq, Lk)
    rescale = jnp.where(jnp.isfinite(m), jnp.exp(m - safe_m), 0.0)  # (B, K, G, Lq)
    s = s * rescale + jnp.sum(probs, axis=-1)
    weighted = jnp.einsum("BKGLS,BSKE->BLKGE", probs.astype(v.dtype), v)
    o = o * jnp.moveaxis(rescale, -1, 1)[..., None] + weighted.astype(jnp.float32)
    return o, new_m, s
