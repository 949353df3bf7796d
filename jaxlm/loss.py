"""Token cross-entropy computed in vocabulary tiles, so the (B, L, V) logits never exist at once.

The plain loss (`jaxlm.train.loss_sums`) multiplies the final hidden states by the output head
into fp32 logits of B x L x V (and the backward pass holds their gradient, as large): at long
lengths and large vocabularies the biggest temporaries of the step. Here the vocabulary is split
into tiles of at most `chunk` entries and a `lax.scan` takes one tile at a time, so logits live
as (B, L, C). The forward pass keeps a running max and sum per token (an online log-sum-exp), the
target's logit and, for evaluation, the running argmax; a custom VJP keeps only each token's
log-normaliser and recomputes a tile's logits in the backward pass, where the head's gradient is
written tile by tile and the hidden states' gradient summed over tiles in fp32.

Per token it is the plain path's arithmetic (the product in the compute dtype, cast to fp32,
log-sum-exp over the whole vocabulary), up to the order of the sums: values and gradients agree
to fp32 rounding, argmax hits exactly. No (B, L, V) array and no (D, V) fp32 accumulator exist;
the temporaries are one tile of logits and the (B, L, D) fp32 gradient sum.

Tiles are strided (tile i holds vocabulary entries i, i + N, i + 2N, ... for N tiles): the head
is viewed as (D, C, N) without a copy and each tile is read in place, and a vocabulary sharded
over devices stays spread evenly over every tile. A vocabulary that is not a multiple of N is
padded with entries whose logits are -inf.

Shapes: B batch, L length, D model dim, V vocab, N tiles, C entries per tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm import sharding


def token_loss_sums(
    hidden: jax.Array,  # (B, L, D) final hidden states, compute dtype
    head: jax.Array,  # (D, V) output head, compute dtype
    targets: jax.Array,  # (B, L) int in [0, V)
    mask: jax.Array,  # (B, L) float loss weights
    chunk: int,  # C, vocabulary entries in one tile (at most)
) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy (fp32) and the summed mask, as `train.loss_sums` returns them,
    without building the whole logits; differentiable in `hidden` and `head`."""
    nll = token_nll(hidden, head, targets, chunk)  # (B, L)
    return jnp.sum(nll * mask), jnp.sum(mask)


def token_nll_and_hits(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy (B, L) fp32 and whether the argmax (first index among equal
    logits, as `jnp.argmax`) is the target (B, L) bool, tile by tile; for evaluation."""
    nll, _, argmax = _forward(hidden, head, targets, chunk, with_argmax=True)
    return nll, argmax == targets


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def token_nll(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """Per-token cross-entropy (B, L) fp32 of the logits hidden @ head, computed in vocabulary
    tiles of at most `chunk` entries, forward and backward."""
    return _forward(hidden, head, targets, chunk, with_argmax=False)[0]


def _token_nll_fwd(hidden, head, targets, chunk):
    nll, lse, _ = _forward(hidden, head, targets, chunk, with_argmax=False)
    return nll, (hidden, head, targets, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def token_nll_and_lse(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-normaliser log(sum(exp(logits))), (B, L) fp32 each, as
    `token_nll` computes them; both differentiable (the z-loss penalises the second)."""
    nll, lse, _ = _forward(hidden, head, targets, chunk, with_argmax=False)
    return nll, lse


def _token_nll_and_lse_fwd(hidden, head, targets, chunk):
    nll, lse, _ = _forward(hidden, head, targets, chunk, with_argmax=False)
    return (nll, lse), (hidden, head, targets, lse)


def _token_nll_and_lse_bwd(chunk, residuals, cotangents):
    d_nll, d_lse = cotangents
    return _backward(chunk, residuals, d_nll, d_lse)


token_nll_and_lse.defvjp(_token_nll_and_lse_fwd, _token_nll_and_lse_bwd)


def _token_nll_bwd(chunk, residuals, d_nll):
    return _backward(chunk, residuals, d_nll)


def _backward(chunk, residuals, d_nll, d_lse=None):
    """Gradients of hidden and head, tile by tile, for the incoming gradients of the nll and
    (when given) of the log-normaliser."""
    hidden, head, targets, lse = residuals
    head_tiles, n, c = _tiled_view(head, chunk)  # (D, C, N)
    tile_of, column_of = targets % n, targets // n  # (B, L) each

    def step(carry, i):
        d_hidden, d_head_tiles = carry  # (B, L, D) fp32, (D, C, N)
        w = jax.lax.dynamic_index_in_dim(head_tiles, i, axis=2, keepdims=False)  # (D, C)
        logits = _tile_logits(hidden, w, i, n, head.shape[1])  # (B, L, C) fp32
        # d nll / d logits = softmax - one_hot(target); d lse / d logits = softmax.
        probs = jnp.exp(logits - lse[..., None])
        is_target = (tile_of == i)[..., None] & (column_of[..., None] == jnp.arange(c))
        if d_lse is None:
            d_logits = (probs - is_target) * d_nll[..., None]
        else:
            d_logits = probs * (d_nll + d_lse)[..., None] - is_target * d_nll[..., None]
        d_logits = d_logits.astype(head.dtype)  # as the cast's VJP
        d_hidden = d_hidden + jnp.einsum(
            "BLC,DC->BLD", d_logits, w, preferred_element_type=jnp.float32
        )
        d_w = jnp.einsum("BLD,BLC->DC", hidden, d_logits)  # (D, C), all tokens in one product
        d_head_tiles = jax.lax.dynamic_update_index_in_dim(d_head_tiles, d_w, i, axis=2)
        return (d_hidden, d_head_tiles), None

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros_like(head_tiles))
    (d_hidden, d_head_tiles), _ = jax.lax.scan(step, init, jnp.arange(n))
    d_head = d_head_tiles.reshape(head.shape[0], n * c)[:, : head.shape[1]]
    return d_hidden.astype(hidden.dtype), d_head, None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def _forward(hidden, head, targets, chunk, with_argmax):
    """(nll, log-normaliser, argmax or None), each (B, L), one vocabulary tile at a time."""
    head_tiles, n, c = _tiled_view(head, chunk)  # (D, C, N)
    tile_of, column_of = targets % n, targets // n  # (B, L) each
    B, L, _ = hidden.shape

    def step(carry, i):
        running_max, running_sum, target_logit, best = carry  # (B, L) fp32 each, best a pair
        w = jax.lax.dynamic_index_in_dim(head_tiles, i, axis=2, keepdims=False)  # (D, C)
        logits = _tile_logits(hidden, w, i, n, head.shape[1])  # (B, L, C) fp32
        tile_max = jnp.max(logits, axis=-1)
        new_max = jnp.maximum(running_max, tile_max)  # finite: every tile has a real entry
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max[..., None]), axis=-1
        )
        picked = jnp.take_along_axis(logits, column_of[..., None], axis=-1)[..., 0]
        target_logit = jnp.where(tile_of == i, picked, target_logit)
        if with_argmax:  # the lowest vocabulary index among equal maxima, as jnp.argmax
            best_logit, best_index = best
            index = jnp.argmax(logits, axis=-1) * n + i
            better = (tile_max > best_logit) | ((tile_max == best_logit) & (index < best_index))
            best = (jnp.where(better, tile_max, best_logit), jnp.where(better, index, best_index))
        return (new_max, running_sum, target_logit, best), None

    lowest = jnp.full((B, L), -jnp.inf, jnp.float32)
    best = (lowest, jnp.zeros((B, L), jnp.int32)) if with_argmax else None
    init = (lowest, jnp.zeros((B, L), jnp.float32), jnp.zeros((B, L), jnp.float32), best)
    (running_max, running_sum, target_logit, best), _ = jax.lax.scan(step, init, jnp.arange(n))
    lse = running_max + jnp.log(running_sum)
    return lse - target_logit, lse, None if best is None else best[1]


def _tiled_view(head: jax.Array, chunk: int) -> tuple[jax.Array, int, int]:
    """The head (D, V) as (D, C, N): entry v at [v // N, v % N], so tile i is [:, :, i]; the
    fewest tiles N of at most `chunk` entries, padded with zero columns to N * C."""
    D, V = head.shape
    n = -(-V // min(chunk, V))
    c = -(-V // n)
    if n * c != V:  # a copy of the head; none when N divides V
        head = jnp.pad(head, [(0, 0), (0, n * c - V)])
    return head.reshape(D, c, n), n, c


def _tile_logits(hidden: jax.Array, w: jax.Array, i: jax.Array, n: int, V: int) -> jax.Array:
    """Tile i's logits (B, L, C) in fp32, as the model computes the whole (B, L, V); padding
    entries (index >= V) are -inf."""
    logits = jnp.einsum("BLD,DC->BLC", hidden, w).astype(jnp.float32)
    logits = sharding.constrain(logits, ("batch", "seq", "vocab"))
    real = jnp.arange(w.shape[1]) * n + i < V  # (C,)
    return jnp.where(real, logits, -jnp.inf)
