"""A synthetic long-context check: retrieve a key planted at a random depth of held-out text.

Each example is `length` tokens: held-out text with one line `passkey = "KEY48213"` planted at a
line boundary at a random depth (uniform over the context), ending in `assert passkey == "KEY`;
the answer is the key's digits (`48213`). The question repeats the needle's last tokens, so a
model can find the key with the induction circuit small transformers learn first. An example
counts when every answer token is the model's argmax given the tokens before it, which is what
greedy decoding would print: exact match. A model that cannot attend that far back scores near
zero (a 5-digit key is guessed with probability 1/90,000); one that can copy from anywhere in
its context scores high. Scored at several lengths (`eval.retrieval_lengths`), it shows what a
context-extension stage bought (configs/tiny_long.py).

The text is the run's own held-out split (Python source for the tiny recipes), so nothing is
downloaded and the filler is in-distribution: only the key's position is new.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jaxlm import sharding
from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.evaluate import choices, scoring

KEY_DIGITS = 5
NEEDLE = 'passkey = "KEY{key}"\n'  # planted at a line boundary
QUESTION = 'assert passkey == "KEY'  # ends the context; the answer is the key's digits
ANSWER = '{key}"\n'  # how a planted question goes on in training text (the eval scores {key})


@dataclasses.dataclass(frozen=True)
class Example:
    """One retrieval example as token ids: BOS + context, and the answer the model must copy."""

    context: tuple[int, ...]
    answer: tuple[int, ...]
    depth: float  # where the needle starts, as a fraction of the context's tokens


def build(
    texts: Iterable[str],
    tokenizer: scoring.TextEncoder,
    length: int,
    n_examples: int,
    seed: int = 0,
) -> list[Example]:
    """`n_examples` retrieval examples of `length` tokens (context + answer) from `texts`.

    Deterministic given the texts (in order), the tokenizer, `length` and `seed`.

    Raises:
      JaxlmError: the held-out text is too short to fill one context of `length` tokens.
    """
    lines = [line for text in texts for line in text.splitlines(keepends=True) if line.strip()]
    # Per-line token counts, to pick a span of about the right size before encoding it whole
    # (encoding the span at once keeps the tokenizer's merges across line breaks).
    sizes = np.array([len(tokenizer.encode(line)) for line in lines])
    question = tokenizer.encode(QUESTION)
    head = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    if sizes.sum() < 2 * length:
        raise JaxlmError(
            f"the held-out text has {int(sizes.sum())} tokens; the retrieval eval at length "
            f"{length} needs at least {2 * length} (more held-out text, or a shorter length)."
        )
    rng = random.Random(seed * 1_000_003 + length)
    examples = []
    while len(examples) < n_examples:
        key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))
        needle, answer = tokenizer.encode(NEEDLE.format(key=key)), tokenizer.encode(key)
        budget = length - len(head) - len(needle) - len(question) - len(answer)
        start = rng.randrange(len(lines))
        end = int(np.searchsorted(np.cumsum(sizes[start:]), budget)) + start
        if end >= len(lines):  # ran off the end: draw another start
            continue
        depth = rng.random()
        cut = start + round(depth * (end - start))
        before, after = "".join(lines[start:cut]), "".join(lines[cut:end])
        before_ids, after_ids = tokenizer.encode(before), tokenizer.encode(after)
        # Encoded whole, a span may differ from its lines' sum: trim the far end to fit.
        over = len(head) + len(before_ids) + len(needle) + len(after_ids) + len(question)
        over += len(answer) - length
        if over > 0:
            before_ids = before_ids[over:]
        context = [*head, *before_ids, *needle, *after_ids, *question]
        examples.append(
            Example(tuple(context), tuple(answer), (len(head) + len(before_ids)) / len(context))
        )
    return examples


def score(
    graphdef: Any,
    params: Any,
    examples: Sequence[Example],
    *,
    length: int,
    batch_size: int,
    mesh_rules: sharding.MeshRules | None = None,
) -> dict[str, float]:
    """Exact-match accuracy of the model on `examples` (each at most `length` tokens).

    Returns:
      accuracy (the fraction of examples whose whole answer is the model's argmax), answer_nll
      (mean negative log-likelihood of an answer token), n and chance (a uniformly guessed key).
    """
    groups = [(ex.context, [ex.answer]) for ex in examples]
    scores = choices.score_continuations(
        graphdef, params, groups, seq_len=length, batch_size=batch_size, mesh_rules=mesh_rules,
        max_segments=1,
    )  # fmt: skip
    return {
        "accuracy": float(np.mean(scores.greedy)),
        "answer_nll": float(-scores.logprob.sum() / scores.tokens.sum()),
        "n": len(examples),
        "chance": 10.0 ** -(KEY_DIGITS - 1) / 9,
    }


@dataclasses.dataclass(frozen=True)
class Planter:
    """A training-text drill: passkey pairs planted in documents (`data.passkeys_per_1k`).

    A short run on natural text never learns to copy a number it saw hundreds of tokens back,
    so the retrieval eval would read zero before and after any context extension. Planting
    pairs in the training text, `passkey = "KEY<key>"` at a line start and `assert passkey ==
    "KEY<key>"` at a later line start (a log-uniform 8..`max_gap` tokens on), teaches that copy
    at the lengths a stage trains on; the eval then asks at lengths and depths the run never
    trained on. Keys come from a fixed pool of 4,096 (the eval draws from all 90,000), pairs
    never overlap, and a document's plan is a function of (seed, its key in the stream) only,
    so resume is exact.
    """

    seed: int
    per_1k: float  # pairs per 1,000 tokens of text, on average
    max_gap: int  # tokens from a needle to its question, at most
    ends_line: np.ndarray  # (V,) bool: the piece ends a line
    needles: tuple[np.ndarray, ...]  # the pool's `passkey = KEY\n` ids
    answers: tuple[np.ndarray, ...]  # the pool's ANSWER ids (the question's completion)
    question: np.ndarray  # QUESTION ids

    @classmethod
    def build(cls, tokenizer: Any, seed: int, per_1k: float, max_gap: int) -> Planter:
        """The planter of a run's tokenizer and `data.passkeys_per_1k` / `passkey_max_gap`."""
        rng = random.Random(seed)
        keys = [str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS)) for _ in range(4096)]
        enc = lambda text: np.array(tokenizer.encode(text), np.int32)  # noqa: E731
        pieces = (tokenizer.decode([i]) for i in range(tokenizer.vocab_size))
        return cls(
            seed=seed,
            per_1k=per_1k,
            max_gap=max_gap,
            ends_line=np.array([p.endswith("\n") for p in pieces]),
            needles=tuple(enc(NEEDLE.format(key=k)) for k in keys),
            answers=tuple(enc(ANSWER.format(key=k)) for k in keys),
            question=enc(QUESTION),
        )

    def __call__(self, ids: np.ndarray, key: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0x9A55, *key])
        body = ids[:-1]  # the record ends in EOS
        starts = np.flatnonzero(self.ends_line[body]) + 1  # token indices that start a line
        parts, cursor = [], 0
        while True:
            # The next needle starts an exponential distance on (mean: 1000 / per_1k tokens).
            at = _line_start(starts, cursor + rng.exponential(1000 / self.per_1k))
            gap = np.exp(rng.uniform(np.log(8), np.log(self.max_gap)))
            ask = _line_start(starts, (at or 0) + gap)
            if at is None or ask is None:
                break
            k = rng.integers(len(self.needles))
            parts += [body[cursor:at], self.needles[k], body[at:ask], self.question]
            parts.append(self.answers[k])
            cursor = ask
        return np.concatenate([*parts, body[cursor:], ids[-1:]]).astype(ids.dtype)


def _line_start(starts: np.ndarray, at: float) -> int | None:
    """The first line start at or after token `at`, None past the last."""
    i = int(np.searchsorted(starts, at))
    return int(starts[i]) if i < len(starts) else None


class RetrievalEval:
    """The retrieval examples of a run at each of its lengths, built once, scored at each
    evaluation as `passkey_<length>/accuracy` (the task summary and plots pick them up)."""

    def __init__(self, texts: Sequence[str], tokenizer: Any, lengths: Sequence[int], n: int, seed):
        self.examples = {L: build(texts, tokenizer, L, n, seed) for L in lengths}

    def __call__(self, graphdef: Any, params: Any, batch_size: int, mesh_rules: Any) -> dict:
        """Scores every length; a flat `{'passkey_<L>/<metric>': value}` dict."""
        out = {}
        for length, examples in self.examples.items():
            result = score(
                graphdef, params, examples, length=length, batch_size=batch_size,
                mesh_rules=mesh_rules,
            )  # fmt: skip
            out.update({f"passkey_{length}/{k}": v for k, v in result.items()})
        return out


def eval_of(config: Any, manifest: dict, tokenizer: Any) -> RetrievalEval | None:
    """The run's retrieval eval (`eval.retrieval_lengths`, `eval.retrieval_examples`), or None."""
    lengths = lengths_of(config.eval.retrieval_lengths)
    if not lengths:
        return None
    from jaxlm.evaluate import tasks  # grain, on first use only

    texts = list(tasks.heldout_texts(manifest, tokenizer.decode))
    return RetrievalEval(texts, tokenizer, lengths, config.eval.retrieval_examples, config.seed)


def planter_of(config: Any, tokenizer: Any) -> Planter | None:
    """The run's training drill (`data.passkeys_per_1k`, `data.passkey_max_gap`), or None."""
    if not config.data.passkeys_per_1k:
        return None
    return Planter.build(
        tokenizer, config.seed, config.data.passkeys_per_1k, config.data.passkey_max_gap
    )


def lengths_of(value: Any, key: str = "eval.retrieval_lengths") -> tuple[int, ...]:
    """The lengths of `eval.retrieval_lengths`: a tuple of ints, or a comma-separated string."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    else:
        parts = list(value or ())
    try:
        lengths = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be lengths such as '256,1024', not {value!r}.") from None
    if any(n < 16 for n in lengths):
        raise ConfigError(f"{key} lengths must be at least 16 tokens, not {value!r}.")
    return lengths
