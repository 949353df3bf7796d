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
rows that read that row's cache, each choice in its question's segment so it attends to its own
context and itself only. Running context + choice once per choice (the
packed layout of `scoring.score_sequences`) gives the same numbers up to float rounding (the
tests: 1e-5) but runs every context C times (`tools/bench_eval.py`, docs/perf.md). A context
too long for `seq_len` is cut from the left so the longest choice fits; all choices see the
same context.
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
        its last token, packed as segments 1..S of rows (0 = padding); owner (R,): the context
        row each continuation row reads; inputs, targets, segments, positions, mask int32
        (R, W): choices of distinct questions of the owner row, each in its question's segment,
        as inputs = [last context token] + choice[:-1] and targets = choice.
      num_segments: S, the most questions a context row holds.

    Returns:
      summed log-probability, token count and argmax hits of each continuation, (R, S):
      column s is segment s + 1.
    """
    model = nnx.merge(graphdef, params)
    segments = batch["context_segments"]
    Rc, W = segments.shape[0], batch["inputs"].shape[1]
    slots = jnp.concatenate([segments, jnp.zeros((Rc, W), jnp.int32)], axis=1)  # (Rc, Lc + W)
    # Only the cache is kept: the context pass's logits are dead code XLA drops.
    _, cache = model(
        batch["context"],
        batch["context_positions"],
        segments,
        cache=model_lib.init_cache(model.cfg, slots),
    )
    # A continuation row reads its context row's cache (a scanned model stacks layers in front
    # of the batch axis); its tokens carry their question's segment id, so each sees its own
    # context and its own earlier tokens only.
    owner = batch["owner"]  # (R,)
    batch_axis = 1 if model.cfg.scan_layers else 0
    cache = {
        "layers": jax.tree.map(lambda a: jnp.take(a, owner, axis=batch_axis), cache["layers"]),
        "index": cache["index"],
        "segment_ids": jnp.concatenate([segments[owner], batch["segments"]], axis=1),
    }
    logits, _ = model(batch["inputs"], batch["positions"], batch["segments"], cache=cache)
    mask = batch["mask"].astype(jnp.float32)  # (R, W)
    logprob = -optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    hit = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    onehot = jax.nn.one_hot(batch["segments"] - 1, num_segments, dtype=jnp.float32)  # (R, W, S)
    per_segment = lambda x: jnp.einsum("RW,RWS->RS", x * mask, onehot)  # noqa: E731
    return per_segment(logprob), per_segment(mask), per_segment(hit)


@functools.lru_cache(maxsize=8)
def _jitted(mesh: jax.sharding.Mesh | None) -> Callable:
    out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        continuation_logprobs, static_argnames=("graphdef", "num_segments"), out_shardings=out
    )


def _round_up(n: int, step: int = 32) -> int:
    """Widths in steps of 32 (powers of two below): a task compiles a handful of shapes."""
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
    groups: Sequence[Group], chunk: list[list[int]], width: int
) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """Continuation rows of `width` tokens: (context row, [(segment, group, choice), ...]).

    A row reads one context row's cache and holds at most one choice per question (two choices
    of one question would share a segment and see each other).
    """
    out = []
    for r, row in enumerate(chunk):
        items: list[tuple[int, int, int]] = []
        used = 0
        n_choices = max(len(groups[g][1]) for g in row)
        for j in range(n_choices):  # choice-major: a row rarely meets a question twice
            for s, g in enumerate(row):
                if j >= len(groups[g][1]):
                    continue
                n = len(groups[g][1][j])
                if used + n > width or any(s == t for t, _, _ in items):
                    out.append((r, items))
                    items, used = [], 0
                items.append((s, g, j))
                used += n
        out.append((r, items))
    return out


def score_continuations(
    graphdef: Any,
    params: Any,
    groups: Sequence[Group],
    *,
    seq_len: int,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
    max_segments: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> scoring.Scores:
    """Scores each group's continuations given its context, the context run once per group.

    Contexts are packed as segments into rows of `seq_len` and run once, filling a KV cache;
    the choices of a context row's questions are packed into continuation rows that read that
    row's cache, each choice in its question's segment. So no context is run twice and little
    is padding.

    Args:
      graphdef, params: the model.
      groups: (context ids, [continuation ids, ...]); contexts hold 1..seq_len tokens (BOS
        first), continuations at least one.
      seq_len: tokens per context row.
      batch_size: context rows per call (rounded up to a multiple of the mesh's batch split).
      mesh: when given, rows are split over its batch axes; every process passes the same
        groups.
      max_segments: most contexts packed into one row.
      progress: called as `progress(rows done, rows in all)` after each call.

    Returns:
      Scores of every continuation, flattened in group order.
    """
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
        conts = _pack_continuations(groups, chunk, W)
        # Row counts in steps of 8: few shapes to compile, little padding in the last call.
        n_rows = -(-len(conts) // (8 * split)) * 8 * split
        n_context = min(batch_size, -(-len(chunk) // (8 * split)) * 8 * split)
        host = {
            k: np.zeros((n_context, seq_len), np.int32)
            for k in ("context", "context_segments", "context_positions")
        }
        for k in ("inputs", "targets", "segments", "positions", "mask"):
            host[k] = np.zeros((n_rows, W), np.int32)
        host["owner"] = np.zeros(n_rows, np.int32)
        for r, row in enumerate(chunk):
            start = 0
            for s, g in enumerate(row):
                context = groups[g][0]
                n = len(context) - 1  # the last context token starts every continuation
                host["context"][r, start : start + n] = context[:-1]
                host["context_segments"][r, start : start + n] = s + 1
                host["context_positions"][r, start : start + n] = np.arange(n)
                start += n
        where = []  # (flat index, continuation row, segment column)
        for c_row, (r, items) in enumerate(conts):
            host["owner"][c_row] = r
            start = 0
            for s, g, j in items:
                context, cont = groups[g][0], groups[g][1][j]
                span = slice(start, start + len(cont))
                host["inputs"][c_row, span] = [context[-1], *cont[:-1]]
                host["targets"][c_row, span] = cont
                host["segments"][c_row, span] = s + 1
                host["positions"][c_row, span] = len(context) - 1 + np.arange(len(cont))
                host["mask"][c_row, span] = 1
                start += len(cont)
                where.append((offsets[g] + j, c_row, s))
        out = _jitted(mesh)(graphdef, params, scoring.device_rows(host, mesh), num_segments=S)
        sums, counts, hits = jax.device_get(out)  # explicit, so a transfer guard does not object
        flat, c_rows, cols = (np.asarray(x) for x in zip(*where, strict=True))
        tokens[flat] = counts[c_rows, cols].round().astype(np.int64)
        logprob[flat] = sums[c_rows, cols]
        greedy[flat] = hits[c_rows, cols].round() == tokens[flat]
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
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, float]:
    """Zero-shot multiple-choice accuracy of a model on `examples`.

    Args:
      graphdef, params: the model (`Setup.graphdef`, `state['params']`).
      tokenizer: `.encode(str) -> list[int]` and `.bos_id`.
      examples: `{"context", "choices", "gold"}` dicts (see `tasks.load_task`).
      seq_len: L, the most tokens context + choice may take (the context is cut from the left).
      batch_size: rows of packed contexts per call (rounded up to a multiple of the mesh's
        batch split).
      mesh: when given, rows are split over its batch axes (params keep their own shardings);
        every process must pass the same examples.

    Returns:
      accuracy (choice log-prob per UTF-8 byte), accuracy_per_token, accuracy_unnormalized,
      n (examples) and chance (the expected accuracy of a random guess).
    """
    if not examples:
        raise JaxlmError("the task has no examples to score.")
    groups = encode_task(tokenizer, examples, seq_len)
    scores = score_continuations(
        graphdef, params, groups, seq_len=seq_len, batch_size=batch_size, mesh=mesh
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
