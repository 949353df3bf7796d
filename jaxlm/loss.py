"""Token cross-entropy computed in sequence tiles, so the (B, L, V) logits never exist at once.

The plain loss (`jaxlm.train.loss_sums`) multiplies the final hidden states by the output head
into fp32 logits of B x L x V, which at long lengths and large vocabularies is the biggest
temporary of the step. Here the positions are split into tiles of `chunk` per row and a
`lax.scan` takes one tile at a time: the logits live as (B, chunk, V). A custom VJP keeps only
each token's log-normaliser from the forward pass and recomputes a tile's logits in the
backward pass, accumulating the head's gradient in fp32 across tiles.

Per token it is the same arithmetic as the plain path (the product in the compute dtype, cast
to fp32, log-sum-exp over the whole vocabulary), so losses, argmax hits and gradients agree
up to the order of sums over tokens.

Tiles are strided (tile i holds positions i, i + n, i + 2n, ... for n tiles): every tile has
positions from every part of the sequence, so a sequence sharded over devices stays evenly
spread at each step of the scan. A length that is not a multiple of `chunk` is padded with
masked positions.

Shapes: B batch, L length, D model dim, V vocab, N tiles, C positions per tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm import sharding


def token_loss_sums(
    hidden: jax.Array,  # (B, L, D) final hidden states, compute dtype
    head: jax.Array,  # (D, V) output head, compute dtype
    targets: jax.Array,  # (B, L) int
    mask: jax.Array,  # (B, L) float loss weights
    chunk: int,  # C, positions per row in one tile
) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy (fp32) and the summed mask, as `train.loss_sums` returns them,
    without building the whole logits; differentiable in `hidden` and `head`."""
    nll = token_nll(hidden, head, targets, chunk)  # (B, L)
    return jnp.sum(nll * mask), jnp.sum(mask)


def token_nll_and_hits(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy (B, L) fp32 and whether the argmax is the target (B, L) bool,
    tile by tile (for evaluation: not differentiable)."""
    nll, _, hits = _forward(hidden, head, targets, chunk, with_hits=True)
    return nll, hits


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def token_nll(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """Per-token cross-entropy (B, L) fp32 of logits = hidden @ head, computed in tiles of
    `chunk` positions (forward and backward)."""
    return _forward(hidden, head, targets, chunk, with_hits=False)[0]


def _token_nll_fwd(hidden, head, targets, chunk):
    nll, lse, _ = _forward(hidden, head, targets, chunk, with_hits=False)
    return nll, (hidden, head, targets, lse)


def _token_nll_bwd(chunk, residuals, d_nll):
    hidden, head, targets, lse = residuals
    B, L, _ = hidden.shape
    tiles = _tiles((hidden, targets, lse, d_nll), L, chunk)  # each (N, B, C, ...)

    def step(d_head, tile):  # d_head (D, V) fp32, summed over tiles
        h, t, lse, g_nll = tile
        logits = _logits(h, head)  # (B, C, V) fp32
        # d nll / d logits = softmax - one_hot(target), scaled by the incoming gradient.
        probs = jnp.exp(logits - lse[..., None])
        d_logits = probs - jax.nn.one_hot(t, head.shape[1], dtype=probs.dtype)
        d_logits = (d_logits * g_nll[..., None]).astype(head.dtype)  # as the plain cast's VJP
        d_h = jnp.einsum("BCV,DV->BCD", d_logits, head)
        d_head = d_head + jnp.einsum("BCD,BCV->DV", h, d_logits, preferred_element_type=jnp.float32)
        return d_head, d_h

    d_head, d_hidden = jax.lax.scan(step, jnp.zeros(head.shape, jnp.float32), tiles)
    return _untile(d_hidden, B, L), d_head.astype(head.dtype), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def _forward(hidden, head, targets, chunk, with_hits):
    """(nll, log-normaliser, argmax hits or None), each (B, L), one tile of logits at a time."""
    B, L, _ = hidden.shape

    def step(_, tile):
        h, t = tile
        logits = _logits(h, head)  # (B, C, V) fp32
        lse = jax.nn.logsumexp(logits, axis=-1)  # (B, C)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        hits = jnp.argmax(logits, axis=-1) == t if with_hits else None
        return None, (lse - target_logit, lse, hits)

    _, out = jax.lax.scan(step, None, _tiles((hidden, targets), L, chunk))
    return tuple(None if x is None else _untile(x, B, L) for x in out)


def _logits(h: jax.Array, head: jax.Array) -> jax.Array:
    """A tile's logits (B, C, V) in fp32, as the model computes the whole (B, L, V)."""
    logits = jnp.einsum("BCD,DV->BCV", h, head).astype(jnp.float32)
    return sharding.constrain(logits, ("batch", "seq", "vocab"))


def _tiles(arrays: tuple, L: int, chunk: int) -> tuple:
    """Each (B, L, ...) array as (N, B, C, ...) strided tiles, padded with zeros to N * C."""
    n = -(-L // min(chunk, L))  # N tiles
    c = -(-L // n)  # C <= chunk: as few padded positions as N tiles allow

    def tile(x):
        x = jnp.pad(x, [(0, 0), (0, n * c - L)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(x.shape[0], c, n, *x.shape[2:])  # position j * n + i -> [j, i]
        return jnp.moveaxis(x, 2, 0)

    return tuple(tile(x) for x in arrays)


def _untile(x: jax.Array, B: int, L: int) -> jax.Array:
    """The inverse of `_tiles`: (N, B, C, ...) back to (B, L, ...)."""
    x = jnp.moveaxis(x, 0, 2)  # (B, C, N, ...)
    return x.reshape(B, -1, *x.shape[3:])[:, :L]
