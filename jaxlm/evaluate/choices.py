"""Zero-shot multiple-choice scoring, each question's context run once.

Each choice is scored by the log-probability of its tokens given the context,
`log p(choice | BOS + context)`. `accuracy` divides that sum by the choice's length in UTF-8
bytes (the harness's `acc_norm` divides by characters), so long choices are not penalised and
scores stay comparable across tokenizers; the per-token mean and the raw sum are reported too
(`accuracy_per_token`, `accuracy_unnormalized`). Context and choice are encoded separately, so
a choice's tokens never depend on its context.

Shared contexts: contexts (but their last token) are packed as segments into rows and go
through the model once, filling a KV cache (their logits are never computed); the choices of a
context row's questions are then packed, as [last context token] + choice, into continuation
rows scored in passes over that row's cache, each choice in its question's segment so it
attends to its own context and itself only. Running context + choice once per choice (the
packed layout of `scoring.score_sequences`) gives the same numbers up to float rounding (the
tests: 1e-5) but runs every context C times: the shared layout is 2.2x faster on a 4-choice task
(`benchmarks/bench_eval.py`, docs/perf.md). A context too long for `seq_len` is cut from the left
so the longest choice fits; all choices see the same context.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm.errors import JaxlmError
from jaxlm.evaluate import scoring
from jaxlm.evaluate.tasks import Example

Group = tuple[Sequence[int], Sequence[Sequence[int]]]  # (context ids, continuations' ids)


def continuation_logprobs(
    graphdef: Any, params: Any, batch: dict[str, jax.Array], num_segments: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities of continuations that share packed, cached contexts.

    Args:
      batch: context, context_segments, context_positions int32 (Rc, Lc): every context but
        its last token, packed as segments 1..S of rows (0 = padding); inputs, targets,
        segments, positions, mask int32 (Rc, J, W): J continuation rows per context row, each
        holding choices of distinct questions of that row in their question's segment, as
        inputs = [last context token] + choice[:-1] and targets = choice.
      num_segments: S, the most questions a context row holds.

    Returns:
      summed log-probability, token count and argmax hits of each continuation, (J, Rc, S):
      column s is segment s + 1.
    """
    model = nnx.merge(graphdef, params)
    segments = batch["context_segments"]
    Rc, W = segments.shape[0], batch["inputs"].shape[2]
    slots = jnp.concatenate([segments, jnp.zeros((Rc, W), jnp.int32)], axis=1)  # (Rc, Lc + W)
    # Only the cache is kept: the context pass's logits are dead code XLA drops.
    _, cache = model(
        batch["context"],
        batch["context_positions"],
        segments,
        cache=model_lib.init_cache(model.cfg, slots),
    )

    def score(_, rows):
        # One continuation row per context row, reading that row's cache in place (the keys
        # it writes after the context are dropped with the returned cache). Its tokens carry
        # their question's segment id: each sees its own context and its own tokens only.
        seen = dict(cache, segment_ids=jnp.concatenate([segments, rows["segments"]], axis=1))
        logits, _ = model(rows["inputs"], rows["positions"], rows["segments"], cache=seen)
        mask = rows["mask"].astype(jnp.float32)  # (Rc, W)
        logprob = -optax.softmax_cross_entropy_with_integer_labels(logits, rows["targets"])
        hit = (jnp.argmax(logits, axis=-1) == rows["targets"]).astype(jnp.float32)
        onehot = jax.nn.one_hot(rows["segments"] - 1, num_segments, dtype=jnp.float32)
        per_segment = lambda x: jnp.einsum("RW,RWS->RS", x * mask, onehot)  # noqa: E731
        return None, (per_segment(logprob), per_segment(mask), per_segment(hit))

    keys = ("inputs", "targets", "segments", "positions", "mask")
    passes = {k: jnp.swapaxes(batch[k], 0, 1) for k in keys}  # (J, Rc, W)
    return jax.lax.scan(score, None, passes)[1]


@functools.lru_cache(maxsize=8)
def jitted_continuations(mesh_rules: sharding.MeshRules | None) -> Callable:
    """`continuation_logprobs` jitted for `mesh_rules` (graphdef and num_segments static, so
    the jit's own cache keys on them and this one on the mesh and rules)."""
    return sharding.jit(
        continuation_logprobs,
        mesh_rules,
        static_argnames=("graphdef", "num_segments"),
        out_shardings=scoring.replicated(mesh_rules),
    )


def _round_up(n: int, step: int = 32) -> int:
    """`n` rounded up to a power of two below `step`, else to a multiple of `step`: a task
    compiles a handful of shapes."""
    return 1 << max(n - 1, 0).bit_length() if n <= step else -(-n // step) * step


def _pack_contexts(groups: Sequence[Group], seq_len: int, max_segments: int) -> list[list[int]]:
    """Group indices packed in order into rows of `seq_len` context tokens."""
    rows: list[list[int]] = [[]]
    used = 0
    for g, (context, _) in enumerate(groups):
        n = len(context) - 1  # its last token goes with the continuations
        if not 0 <= n < seq_len:
            raise ValueError(f"a context of {len(context)} tokens does not fit seq_len={seq_len}.")
        if used + n > seq_len or len(rows[-1]) == max_segments:
            rows.append([])
            used = 0
        rows[-1].append(g)
        used += n
    return rows


def _pack_continuations(
    groups: Sequence[Group], row: list[int], width: int
) -> list[list[tuple[int, int, int]]]:
    """The continuation rows of one context row: [(segment, group, choice), ...] each.

    A row holds at most `width` tokens and one choice per question (two choices of one
    question would share a segment and see each other).
    """
    out: list[list[tuple[int, int, int]]] = [[]]
    used = 0
    for j in range(max(len(groups[g][1]) for g in row)):  # choice-major: rarely a repeat
        for s, g in enumerate(row):
            if j >= len(groups[g][1]):
                continue
            n = len(groups[g][1][j])
            if used + n > width or any(s == t for t, _, _ in out[-1]):
                out.append([])
                used = 0
            out[-1].append((s, g, j))
            used += n
    return out


def score_continuations(
    graphdef: Any,
    params: Any,
    groups: Sequence[Group],
    *,
    seq_len: int,
    batch_size: int,
    mesh_rules: sharding.MeshRules | None = None,
    max_segments: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> scoring.Scores:
    """Scores each group's continuations given its context, the context run once per group.

    Contexts are packed as segments into rows of `seq_len` and run once, filling a KV cache;
    the choices of a context row's questions are packed into continuation rows, each choice in
    its question's segment, and scored in passes (a scan) that each read the cache in place:
    no context runs twice, the cache is never copied, and little is padding.

    Args:
      graphdef, params: the model.
      groups: (context ids, [continuation ids, ...]); contexts hold 1..seq_len tokens (BOS
        first), continuations at least one.
      seq_len: tokens per context row.
      batch_size: context rows per call (rounded up to a multiple of the mesh's batch split).
      mesh_rules: the mesh and rules the model runs with (a `Setup`'s); rows are split over
        the mesh's batch axes; every process passes the same groups. None: one device.
      max_segments: most contexts packed into one row.
      progress: called as `progress(rows done, rows in all)` after each call.

    Returns:
      Scores of every continuation, flattened in group order.
    """
    mesh = mesh_rules.mesh if mesh_rules else None
    batch_size = scoring.round_batch(batch_size, mesh)
    offsets = np.cumsum([0] + [len(conts) for _, conts in groups])
    logprob, tokens = np.zeros(offsets[-1]), np.zeros(offsets[-1], np.int64)
    greedy = np.zeros(offsets[-1], bool)
    rows = _pack_contexts(groups, seq_len, max_segments)
    S = 1 << (max(len(row) for row in rows) - 1).bit_length()  # a power of two
    # Continuation rows hold a few choices each: wide enough for the longest, no wider, so
    # little of them is padding.
    W = _round_up(max(64, *(len(cont) for _, conts in groups for cont in conts)))
    split = scoring.round_batch(1, mesh)
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        conts = [_pack_continuations(groups, row, W) for row in chunk]
        # Passes as many as the fullest row needs (rounding them up cost a third more time on
        # the next-line task); context rows in steps of 8, so the last call pads little.
        J = max(len(c) for c in conts)
        n_context = min(batch_size, -(-len(chunk) // (8 * split)) * 8 * split)
        host = {
            k: np.zeros((n_context, seq_len), np.int32)
            for k in ("context", "context_segments", "context_positions")
        }
        for k in ("inputs", "targets", "segments", "positions", "mask"):
            host[k] = np.zeros((n_context, J, W), np.int32)
        where = []  # (flat index, pass, context row, segment column)
        for r, row in enumerate(chunk):
            start = 0
            for s, g in enumerate(row):
                context = groups[g][0]
                n = len(context) - 1  # the last context token starts every continuation
                host["context"][r, start : start + n] = context[:-1]
                host["context_segments"][r, start : start + n] = s + 1
                host["context_positions"][r, start : start + n] = np.arange(n)
                start += n
            for p, items in enumerate(conts[r]):
                start = 0
                for s, g, j in items:
                    context, cont = groups[g][0], groups[g][1][j]
                    span = (r, p, slice(start, start + len(cont)))
                    host["inputs"][span] = [context[-1], *cont[:-1]]
                    host["targets"][span] = cont
                    host["segments"][span] = s + 1
                    host["positions"][span] = len(context) - 1 + np.arange(len(cont))
                    host["mask"][span] = 1
                    start += len(cont)
                    where.append((offsets[g] + j, p, r, s))
        rows_on_devices = scoring.device_rows(host, mesh)
        out = jitted_continuations(mesh_rules)(graphdef, params, rows_on_devices, num_segments=S)
        sums, counts, hits = jax.device_get(out)  # explicit, so a transfer guard does not object
        flat, *at = np.asarray(where).T  # at: (pass, context row, segment column)
        at = tuple(at)
        tokens[flat] = counts[at].round().astype(np.int64)
        logprob[flat] = sums[at]
        greedy[flat] = hits[at].round() == tokens[flat]
        if progress is not None:
            progress(min(lo + batch_size, len(rows)), len(rows))
    return scoring.Scores(logprob, tokens, greedy)


def encode_task(
    tokenizer: scoring.TextEncoder, examples: Sequence[Example], seq_len: int
) -> list[Group]:
    """Each example as (BOS + context, [choice ids, ...]), the context cut to fit `seq_len`.

    Raises:
      JaxlmError: a choice encodes to no token or more than `seq_len`, or an example has an
        empty context and the tokenizer no BOS (its first choice token has nothing to follow).
    """
    # Every training row starts a document with BOS; a tokenizer without one gets no prefix.
    head = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    groups = []
    for e, ex in enumerate(examples):
        context = tokenizer.encode(ex["context"])
        choices = [tokenizer.encode(choice) for choice in ex["choices"]]
        for c, ids in enumerate(choices):
            if not ids or len(ids) > seq_len:
                raise JaxlmError(
                    f"example {e} choice {c} encodes to {len(ids)} tokens; a choice needs 1 to "
                    f"seq_len={seq_len} tokens (raise seq_len or shorten the choice)."
                )
        # Inputs are BOS + context + choice[:-1]: at most seq_len tokens for the longest choice.
        budget = seq_len + 1 - len(head) - max(len(ids) for ids in choices)
        context = [*head, *context[max(0, len(context) - budget) :]]
        if not context:
            raise JaxlmError(
                f"example {e} has an empty context and the tokenizer has no BOS token, so "
                "its first choice token cannot be scored; give it a context."
            )
        groups.append((context, choices))
    return groups


def score_task(
    graphdef: Any,
    params: Any,
    tokenizer: scoring.TextEncoder,
    examples: Sequence[Example],
    *,
    seq_len: int,
    batch_size: int,
    mesh_rules: sharding.MeshRules | None = None,
) -> dict[str, float]:
    """Zero-shot multiple-choice accuracy of a model on `examples`.

    Args:
      graphdef, params: the model (`Setup.graphdef`, `state['params']`).
      tokenizer: `.encode(str) -> list[int]` and `.bos_id`.
      examples: `{"context", "choices", "gold"}` dicts (see `tasks.load_task`).
      seq_len: L, the most tokens context + choice may take (the context is cut from the left).
      batch_size: rows of packed contexts per call (rounded up to a multiple of the mesh's
        batch split).
      mesh_rules: the mesh and rules the model runs with (a `Setup`'s); rows are split over
        the mesh's batch axes (params keep their own shardings); every process must pass the
        same examples. None: one device.

    Returns:
      accuracy (choice log-prob per UTF-8 byte), accuracy_per_token, accuracy_unnormalized,
      n (examples) and chance (the expected accuracy of a random guess).
    """
    if not examples:
        raise JaxlmError("the task has no examples to score.")
    groups = encode_task(tokenizer, examples, seq_len)
    scores = score_continuations(
        graphdef, params, groups, seq_len=seq_len, batch_size=batch_size, mesh_rules=mesh_rules
    )
    return accuracies(examples, scores.logprob, scores.tokens)


def accuracies(
    examples: Sequence[Example], logprob: np.ndarray, tokens: np.ndarray
) -> dict[str, float]:
    """The accuracies of `score_task` from each choice's log-probability and token count,
    flattened in example-choice order."""
    hits = {"bytes": 0, "tokens": 0, "raw": 0}
    k = 0
    for ex in examples:
        n = len(ex["choices"])
        lp, nt = logprob[k : k + n], tokens[k : k + n]
        nbytes = np.array([max(len(c.encode("utf-8")), 1) for c in ex["choices"]], np.float64)
        for name, score in (("bytes", lp / nbytes), ("tokens", lp / nt), ("raw", lp)):
            hits[name] += int(np.argmax(score) == ex["gold"])
        k += n
    total = len(examples)
    return {
        "accuracy": hits["bytes"] / total,
        "accuracy_per_token": hits["tokens"] / total,
        "accuracy_unnormalized": hits["raw"] / total,
        "n": total,
        "chance": float(np.mean([1 / len(ex["choices"]) for ex in examples])),
    }


def score_tasks(
    graphdef: Any,
    params: Any,
    tokenizer: scoring.TextEncoder,
    tasks: dict[str, Sequence[Example]],
    **kwargs: Any,
) -> dict[str, float]:
    """`score_task` over named tasks, flattened as `{'<task>/accuracy': ..., ...}` for logging."""
    out = {}
    for name in sorted(tasks):
        result = score_task(graphdef, params, tokenizer, tasks[name], **kwargs)
        out.update({f"{name}/{k}": float(v) for k, v in result.items()})
    return out
