"""Zero-shot multiple-choice scoring, each question's context run once.

Each choice is scored by the log-probability of its tokens given the context,
`log p(choice | BOS + context)`. `accuracy` divides that sum by the choice's length in UTF-8
bytes (the harness's `acc_norm` divides by characters), so long choices are not penalised and
scores stay comparable across tokenizers; the per-token mean and the raw sum are reported too
(`accuracy_per_token`, `accuracy_unnormalized`). Context and choice are encoded separately, so
a choice's tokens never depend on its context.

Shared contexts: the contexts of a batch of questions go through the model once, filling a KV
cache; every choice is then scored as a continuation attending to its question's cache rows
(gathered, not recomputed). Running context + choice once per choice (the packed layout of
`scoring.score_sequences`) gives the same numbers up to float rounding (1e-5 in the tests) at
C context passes per question instead of one (`tools/bench_eval.py`, docs/perf.md). A context
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
    graphdef: Any, params: Any, batch: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed log-probability, token count and all-argmax flag of each continuation row.

    Args:
      batch: context, context_mask int32 (Q, P), contexts left-padded (mask 0 on padding);
        owner (R,) the question of each continuation row; first (R,) its first token;
        inputs, targets, mask int32 (R, W): the rest of the continuation, right-padded
        (inputs = cont[:-1], targets = cont[1:]).

    Returns:
      (logprob sums (R,), token counts (R,), greedy (R,) bool).
    """
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    context, context_mask = batch["context"], batch["context_mask"]
    owner, inputs, mask = batch["owner"], batch["inputs"], batch["mask"]
    Q, W = context.shape[0], inputs.shape[1]
    positions = jnp.maximum(jnp.cumsum(context_mask, axis=1) - 1, 0)  # (Q, P)
    slots = jnp.concatenate([context_mask, jnp.zeros((Q, W), jnp.int32)], axis=1)  # (Q, P + W)
    logits, cache = model(context, positions, context_mask, cache=model_lib.init_cache(cfg, slots))
    last = jax.nn.log_softmax(logits[:, -1])  # (Q, V): predicts every continuation's first token
    first_logprob = last[owner, batch["first"]]  # (R,)
    first_hit = jnp.argmax(last, axis=-1)[owner] == batch["first"]

    # Each continuation row gets a copy of its question's cache rows (a scanned model stacks
    # layers in front of the batch axis).
    batch_axis = 1 if cfg.scan_layers else 0
    layers = jax.tree.map(lambda a: jnp.take(a, owner, axis=batch_axis), cache["layers"])
    cache = {
        "layers": layers,
        "index": cache["index"],
        "segment_ids": jnp.concatenate([context_mask[owner], mask], axis=1),  # (R, P + W)
    }
    start = jnp.sum(context_mask, axis=1)[owner]  # (R,) real context tokens
    logits, _ = model(inputs, start[:, None] + jnp.arange(W)[None], mask, cache=cache)
    maskf = mask.astype(jnp.float32)  # (R, W)
    logprob = -optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * maskf
    hits = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32) * maskf
    count = 1 + maskf.sum(axis=1)
    greedy = first_hit & (hits.sum(axis=1) == maskf.sum(axis=1))
    return first_logprob + logprob.sum(axis=1), count, greedy


@functools.lru_cache(maxsize=8)
def _jitted(mesh: jax.sharding.Mesh | None) -> Callable:
    out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(continuation_logprobs, static_argnames=("graphdef",), out_shardings=out)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def score_continuations(
    graphdef: Any,
    params: Any,
    groups: Sequence[Group],
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> scoring.Scores:
    """Scores each group's continuations given its context, the context run once per group.

    Args:
      graphdef, params: the model.
      groups: (context ids, [continuation ids, ...]); contexts hold at least one token (BOS),
        continuations at least one, and context + continuation fit the model's positions.
      batch_size: groups per call (rounded up to a multiple of the mesh's batch split).
      mesh: when given, rows are split over its batch axes; every process passes the same
        groups.
      progress: called as `progress(groups done, groups in all)` after each call.

    Returns:
      Scores of every continuation, flattened in group order.
    """
    batch_size = scoring.round_batch(batch_size, mesh)
    max_choices = max((len(conts) for _, conts in groups), default=1)
    rows = scoring.round_batch(batch_size * max_choices, mesh)
    offsets = np.cumsum([0] + [len(conts) for _, conts in groups])
    logprob, tokens = np.zeros(offsets[-1]), np.zeros(offsets[-1], np.int64)
    greedy = np.zeros(offsets[-1], bool)
    # Similar context lengths share a call (less padding); widths are powers of two so a task
    # compiles a handful of shapes.
    order = sorted(range(len(groups)), key=lambda g: len(groups[g][0]))
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        P = _pow2(max(len(groups[g][0]) for g in chunk))
        W = _pow2(max(len(c) - 1 for g in chunk for c in groups[g][1]) or 1)
        host = {
            "context": np.zeros((batch_size, P), np.int32),
            "context_mask": np.zeros((batch_size, P), np.int32),
            "owner": np.zeros(rows, np.int32),
            "first": np.zeros(rows, np.int32),
            **{k: np.zeros((rows, W), np.int32) for k in ("inputs", "targets", "mask")},
        }
        r, where = 0, []
        for q, g in enumerate(chunk):
            context, conts = groups[g]
            host["context"][q, P - len(context) :] = context
            host["context_mask"][q, P - len(context) :] = 1
            for c, cont in enumerate(conts):
                n = len(cont) - 1
                host["owner"][r], host["first"][r] = q, cont[0]
                host["inputs"][r, :n], host["targets"][r, :n] = cont[:-1], cont[1:]
                host["mask"][r, :n] = 1
                where.append(offsets[g] + c)
                r += 1
        out = _jitted(mesh)(graphdef, params, scoring.device_rows(host, mesh))
        lp, count, hit = jax.device_get(out)  # explicit, so a transfer guard does not object
        logprob[where], tokens[where], greedy[where] = lp[:r], count[:r].round(), hit[:r]
        if progress is not None:
            progress(min(lo + batch_size, len(order)), len(order))
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
      batch_size: questions per call (rounded up to a multiple of the mesh's batch split).
      mesh: when given, rows are split over its batch axes (params keep their own shardings);
        every process must pass the same examples.

    Returns:
      accuracy (choice log-prob per UTF-8 byte), accuracy_per_token, accuracy_unnormalized,
      n (examples) and chance (the expected accuracy of a random guess).
    """
    if not examples:
        raise JaxlmError("the task has no examples to score.")
    groups = encode_task(tokenizer, examples, seq_len)
    scores = score_continuations(graphdef, params, groups, batch_size=batch_size, mesh=mesh)
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
