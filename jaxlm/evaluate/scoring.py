"""Log-probabilities of token sequences, packed: the forward pass every evaluation shares.

A scored sequence is `(ids, n)`: token ids whose last `n` are scored, each given every token
before it, `log p(ids[-n:] | ids[:-n])`. Sequences are packed in order into rows of `seq_len`
as separate segments (attention never crosses a segment), and one jitted function returns each
segment's summed log-probability, its scored-token count and how many scored tokens were the
model's argmax, so an evaluation compiles once and runs in a few batches.

Held-out text windows (`jaxlm.evaluate.text`), the lm-eval adapter's requests and the
one-call-per-choice reference of multiple-choice scoring all go through `score_sequences`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlm import sharding

Scored = tuple[Sequence[int], int]  # (token ids, how many of the last ones are scored)


class TextEncoder(Protocol):
    """What scoring needs from a tokenizer."""

    bos_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per-sequence results, in the order the sequences were given."""

    logprob: np.ndarray  # (N,) float64: summed log-probability of the scored tokens
    tokens: np.ndarray  # (N,) int: scored tokens
    greedy: np.ndarray  # (N,) bool: every scored token was the model's most likely one


def segment_logprobs(
    graphdef: Any, params: Any, batch: dict[str, jax.Array], num_segments: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed target log-probability, target count and argmax hits of each packed segment.

    Args:
      batch: inputs, targets, segment_ids (0 = padding, else 1..num_segments), positions
        int32 (B, L); loss_mask float32 (B, L), 1 on the tokens being scored.
      num_segments: S, the most segments any row holds.

    Returns:
      (logprob sums, token counts, argmax hits), each (B, S); column s is segment id s + 1.
    """
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])  # (B, L, V) fp32
    mask = batch["loss_mask"]
    logprob = -optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # (B, L)
    hit = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)  # (B, L)
    # Padding has segment id 0 -> index -1 -> an all-zero one-hot row.
    onehot = jax.nn.one_hot(batch["segment_ids"] - 1, num_segments, dtype=jnp.float32)  # (B, L, S)
    per_segment = lambda x: jnp.einsum("BL,BLS->BS", x * mask, onehot)  # noqa: E731
    return per_segment(logprob), per_segment(jnp.ones_like(mask)), per_segment(hit)


@functools.lru_cache(maxsize=8)
def jitted_scorer(mesh_rules: sharding.MeshRules | None) -> Callable:
    """`segment_logprobs` jitted for `mesh_rules` (graphdef and num_segments static, so the
    jit's own cache keys on them and this one on the mesh and rules)."""
    return sharding.jit(
        segment_logprobs,
        mesh_rules,
        static_argnames=("graphdef", "num_segments"),
        out_shardings=replicated(mesh_rules),
    )


def replicated(mesh_rules: sharding.MeshRules | None) -> jax.sharding.Sharding | None:
    """Whole on every device of the mesh (None without one): every host can read every score."""
    if mesh_rules is None:
        return None
    return jax.sharding.NamedSharding(mesh_rules.mesh, jax.sharding.PartitionSpec())


@dataclasses.dataclass
class Packed:
    rows: dict[str, np.ndarray]  # the batch fields, (R, L)
    where: np.ndarray  # (N, 2): (row, segment column) of each sequence, in the given order
    num_segments: int


def pack(seqs: Sequence[Scored], seq_len: int, max_segments: int = 32) -> Packed:
    """Packs scored sequences in order into rows of `seq_len` (inputs are ids[:-1]).

    Every sequence must have 2..seq_len + 1 ids and 1..len(ids) - 1 scored tokens; callers
    check (and explain) that before packing.
    """
    rows: list[list[Scored]] = [[]]
    used = 0
    where = []
    for ids, n in seqs:
        if not 1 <= n < len(ids) <= seq_len + 1:
            raise ValueError(f"a scored sequence of {len(ids)} ids scores {n}; see pack().")
        if used + len(ids) - 1 > seq_len or len(rows[-1]) == max_segments:
            rows.append([])
            used = 0
        where.append((len(rows) - 1, len(rows[-1])))
        rows[-1].append((ids, n))
        used += len(ids) - 1
    fields = {
        k: np.zeros((len(rows), seq_len), np.int32)
        for k in ("inputs", "targets", "segment_ids", "positions")
    }
    fields["loss_mask"] = np.zeros((len(rows), seq_len), np.float32)
    for r, row in enumerate(rows):
        start = 0
        for s, (ids, n_scored) in enumerate(row):
            n = len(ids) - 1
            span = slice(start, start + n)
            fields["inputs"][r, span] = ids[:-1]
            fields["targets"][r, span] = ids[1:]
            fields["segment_ids"][r, span] = s + 1
            fields["positions"][r, span] = np.arange(n)
            fields["loss_mask"][r, start + n - n_scored : start + n] = 1.0
            start += n
    # Rounded up to a power of two so evaluations of similar shape share one compiled function.
    num_segments = 1 << (max(len(row) for row in rows) - 1).bit_length()
    return Packed(fields, np.asarray(where, np.int64).reshape(-1, 2), num_segments)


def device_rows(rows: dict[str, np.ndarray], mesh: jax.sharding.Mesh | None) -> dict:
    """Host rows onto the devices: split over the mesh's batch axes, or onto the default one."""
    if mesh is None:
        return jax.device_put(rows)  # explicit, so a transfer guard does not object
    return {k: sharding.place(v, _rows_of(mesh, v.ndim)) for k, v in rows.items()}


def _rows_of(mesh: jax.sharding.Mesh, ndim: int) -> jax.sharding.NamedSharding:
    """The first axis split over the batch axes, the others whole."""
    spec = jax.sharding.PartitionSpec(sharding.BATCH, *([None] * (ndim - 1)))
    return jax.sharding.NamedSharding(mesh, spec)


def round_batch(batch_size: int, mesh: jax.sharding.Mesh | None) -> int:
    """`batch_size` rounded up to a multiple of the mesh's batch split."""
    if mesh is None:
        return batch_size
    split = sharding.batch_divisor(mesh)
    return -(-batch_size // split) * split


def score_sequences(
    graphdef: Any,
    params: Any,
    seqs: Sequence[Scored],
    *,
    seq_len: int,
    batch_size: int,
    mesh_rules: sharding.MeshRules | None = None,
    max_segments: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> Scores:
    """Scores every sequence with the model, packed into rows of `seq_len`.

    Args:
      graphdef, params: the model (`Setup.graphdef`, `state['params']`).
      seqs: `(ids, n)` pairs, 2 <= len(ids) <= seq_len + 1, 1 <= n < len(ids).
      seq_len: L, tokens per packed row.
      batch_size: rows per call (rounded up to a multiple of the mesh's batch split).
      mesh_rules: the mesh and rules the model runs with (a `Setup`'s); rows are split over
        the mesh's batch axes (params keep their own shardings); every process must pass the
        same sequences. None: one device.
      max_segments: most sequences packed into one row.
      progress: called as `progress(rows done, rows in all)` after each batch.
    """
    if not seqs:
        empty = np.zeros(0)
        return Scores(empty, empty.astype(np.int64), empty.astype(bool))
    packed = pack(seqs, seq_len, max_segments)
    n_rows = len(packed.rows["inputs"])
    mesh = mesh_rules.mesh if mesh_rules else None
    batch_size = round_batch(batch_size, mesh)
    scorer = jitted_scorer(mesh_rules)
    outs = []
    for lo in range(0, n_rows, batch_size):
        chunk = {k: v[lo : lo + batch_size] for k, v in packed.rows.items()}
        pad = batch_size - len(chunk["inputs"])
        if pad:  # one batch shape, one compilation; padding rows have segment id 0 everywhere
            chunk = {
                k: np.concatenate([v, np.zeros((pad, seq_len), v.dtype)]) for k, v in chunk.items()
            }
        out = scorer(graphdef, params, device_rows(chunk, mesh), num_segments=packed.num_segments)
        outs.append(jax.device_get(out))  # explicit, so a transfer guard does not object
        if progress is not None:
            progress(min(lo + batch_size, n_rows), n_rows)
    sums, counts, hits = (np.concatenate([o[i] for o in outs]) for i in range(3))  # (R, S)
    at = (packed.where[:, 0], packed.where[:, 1])
    tokens = counts[at].round().astype(np.int64)
    return Scores(sums[at].astype(np.float64), tokens, hits[at].round() == tokens)
