"""Pretraining objectives: what a packed batch asks the model to predict, and what it may see.

`config.objective` is read here and nowhere else:

- ``causal`` (default): next-token prediction; batches pass through untouched.
- ``masked``: BERT-style masked LM. A share of tokens (``objectives.mask_rate``) is chosen, whole
  words optionally; of those 80% become ``[MASK]``, 10% a random piece, 10% stay. The model sees
  each document bidirectionally and predicts the original token at the chosen positions only.
- ``prefix``: prefix-LM. Each document in a row gets a split point; the prefix is seen both ways,
  the rest causally, and only tokens after the prefix are predicted.
- ``fim``: fill-in-the-middle. Documents are rearranged before packing (`FIM`, a per-document
  hook of the data pipeline) into prefix/suffix/middle order with sentinel pieces; training is
  then next-token prediction on the rearranged text.

The model learns only one extra thing: a per-token ``prefix`` marker (B, L) in the batch, where
marked tokens of one document attend to each other both ways (all of a document for ``masked``).
Batches without it are causal, so a causal run builds exactly the program it built before.

Every random choice is a function of (``config.seed``, step, global row) for batches and of
(seed, stream, position in the stream) for documents, so a resumed run makes the same choices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from jaxlm.errors import ConfigError

OBJECTIVES = ("causal", "masked", "prefix", "fim")
BIDIRECTIONAL = ("masked", "prefix")  # the objectives whose batches carry a `prefix` marker
MASK_PIECE = "[MASK]"
FIM_PIECES = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>")
_TRAIN, _EVAL = 0, 1  # random-stream namespaces: held-out masks never repeat training ones


def default_config() -> ml_collections.ConfigDict:
    """`config.objectives`: the options of the non-causal objectives."""
    c = ml_collections.ConfigDict()
    c.mask_rate = 0.15  # masked: share of tokens to predict
    c.mask_token_rate = 0.8  # masked: share of chosen tokens replaced by [MASK] ...
    c.random_token_rate = 0.1  # ... and by a random piece (the rest keep their token)
    c.whole_word = False  # masked: choose whole words (pieces joined by letters/digits/_)
    c.prefix_fraction = 0.0  # prefix: prefix share of each document; 0 = uniform random split
    c.fim_rate = 0.5  # fim: share of documents rearranged (the rest stay in order)
    c.fim_spm_rate = 0.5  # fim: share of rearranged documents in SPM order (the rest PSM)
    return c


def special_pieces(objective: str) -> tuple[str, ...]:
    """The pieces the tokenizer must have for `objective` (added only when needed, so a causal
    run keeps its tokenizer, its data cache and its numbers)."""
    return {"masked": (MASK_PIECE,), "fim": FIM_PIECES}.get(objective, ())


def tokenizer_config(config: Any) -> ml_collections.ConfigDict:
    """`config.tokenizer` with the objective's `special_pieces` (a key that exists only when the
    objective needs pieces: the prepared-data cache key of a causal run does not change)."""
    tok = ml_collections.ConfigDict(config.tokenizer.to_dict())
    pieces = special_pieces(config.get("objective", "causal"))
    if pieces:
        tok.special_pieces = pieces
    return tok


def check(config: Any) -> None:
    """Refuses an unknown objective or option values that cannot work (one sentence each)."""
    name = config.get("objective", "causal")
    if name not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, not {name!r}.")
    o = config.objectives
    for key in ("mask_token_rate", "random_token_rate", "prefix_fraction", "fim_rate"):
        if not 0 <= o[key] <= 1:
            raise ConfigError(f"objectives.{key}={o[key]!r} must be in [0, 1].")
    if not 0 < o.mask_rate < 1:
        raise ConfigError(f"objectives.mask_rate={o.mask_rate!r} must be in (0, 1).")
    if o.mask_token_rate + o.random_token_rate > 1:
        raise ConfigError(
            f"objectives.mask_token_rate + objectives.random_token_rate = "
            f"{o.mask_token_rate + o.random_token_rate:g} must be at most 1."
        )
    if not 0 <= o.fim_spm_rate <= 1:
        raise ConfigError(f"objectives.fim_spm_rate={o.fim_spm_rate!r} must be in [0, 1].")


def check_tokenizer(config: Any, tokenizer: Any) -> None:
    """Refuses a tokenizer that lacks the objective's pieces (a given `tokenizer.path`)."""
    missing = [
        p
        for p in special_pieces(config.get("objective", "causal"))
        if tokenizer.piece_to_id(p) is None
    ]
    if missing:
        raise ConfigError(
            f"objective={config.objective} needs the pieces {missing}, which the tokenizer "
            f"{tokenizer.path} lacks; prepare the data with tokenizer.path='' so that jaxlm "
            "trains one that has them."
        )


# --------------------------------------------------------------------------- FIM, per document


@dataclasses.dataclass(frozen=True)
class FIM:
    """Rearranges one document's ids (ending in EOS) into fill-in-the-middle order.

    PSM: ``<fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle EOS``;
    SPM: ``<fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle EOS`` (the prefix then
    flows straight into the middle, as in Bavarian et al. 2022). The two cut points fall between
    tokens, never inside a piece, and never before a UTF-8 continuation byte of a byte-fallback
    character, so each part decodes to whole characters.
    """

    seed: int
    rate: float
    spm_rate: float
    prefix_id: int
    middle_id: int
    suffix_id: int
    no_cut_before: np.ndarray  # (V,) bool: pieces a part may not start with

    def __call__(self, ids: np.ndarray, key: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([self.seed, *key])
        rearrange, spm = rng.random(2)
        if rearrange >= self.rate:
            return ids
        body = ids[:-1]
        cuts = np.flatnonzero(np.append(~self.no_cut_before[body], True))  # allowed cut indices
        a, b = np.sort(rng.choice(cuts, size=2))
        pre, mid, suf = body[:a], body[a:b], body[b:]
        P, M, S = [self.prefix_id], [self.middle_id], [self.suffix_id]
        if spm < self.spm_rate:
            parts = [P, S, suf, M, pre, mid]
        else:
            parts = [P, pre, S, suf, M, mid]
        return np.concatenate([*parts, ids[-1:]]).astype(ids.dtype)


# --------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class Objective:
    """The run's objective, built once from the config and the tokenizer."""

    name: str
    seed: int
    options: Any  # config.objectives (read-only here)
    bos_id: int = 2
    mask_id: int = -1
    fim_ids: tuple[int, int, int] = (-1, -1, -1)  # prefix, middle, suffix sentinels
    replacement_ids: np.ndarray | None = None  # (n,) pieces a random replacement draws from
    word_chars: np.ndarray | None = None  # (V, 2) bool: piece starts / ends with a word char
    no_cut_before: np.ndarray | None = None  # (V,) bool: UTF-8 continuation-byte pieces
    baseline_id: int = -1  # the most frequent training token (unigram baseline of masked LM)

    @classmethod
    def build(cls, config: Any, tokenizer: Any = None, manifest: dict | None = None) -> Objective:
        """The objective of `config`; `tokenizer` gives the special ids (not needed for causal),
        `manifest` the training text a masked LM's unigram baseline is counted on."""
        name = config.get("objective", "causal")
        if name == "causal":
            return cls(name, int(config.seed), config.objectives)
        pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
        special = {tokenizer.piece_to_id(p) for p in special_pieces(name)}
        special |= {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id}
        return cls(
            name=name,
            seed=int(config.seed),
            options=config.objectives,
            bos_id=tokenizer.bos_id,
            mask_id=tokenizer.piece_to_id(MASK_PIECE) if name == "masked" else -1,
            fim_ids=tuple(tokenizer.piece_to_id(p) if name == "fim" else -1 for p in FIM_PIECES),
            replacement_ids=np.array([i for i in range(len(pieces)) if i not in special], np.int32),
            word_chars=np.array(
                [(_word_char(p[:1]), _word_char(p[-1:])) for p in pieces], bool
            ).reshape(-1, 2),
            no_cut_before=np.array([_continuation_byte(p) for p in pieces], bool),
            baseline_id=unigram_mode(manifest, tokenizer.bos_id)
            if name == "masked" and manifest
            else -1,
        )

    @property
    def bidirectional(self) -> bool:
        """Whether batches carry a `prefix` marker (the model's only view of the objective)."""
        return self.name in BIDIRECTIONAL

    def doc_transform(self, evaluation: bool = False) -> FIM | None:
        """The per-document rewrite applied before packing: FIM's, else None. Held-out
        documents are all rearranged, in PSM order, so their middle span can be scored."""
        if self.name != "fim":
            return None
        o = self.options
        return FIM(
            seed=self.seed,
            rate=1.0 if evaluation else float(o.fim_rate),
            spm_rate=0.0 if evaluation else float(o.fim_spm_rate),
            prefix_id=self.fim_ids[0],
            middle_id=self.fim_ids[1],
            suffix_id=self.fim_ids[2],
            no_cut_before=self.no_cut_before,
        )

    def apply(
        self, batch: dict[str, np.ndarray], step: int, row_offset: int = 0, evaluation: bool = False
    ) -> dict[str, np.ndarray]:
        """The model's batch for `step`: inputs, targets, loss mask and (non-causal) prefix.

        Args:
          batch: a packed host batch of the pipeline's contract (next-token pairs).
          step: the train step (or eval batch index) the batch is for; seeds the choices.
          row_offset: the global index of this host's first row, so choices do not depend on
            how many processes read the batch.
          evaluation: held-out batches draw from their own random stream.
        """
        if self.name == "causal":
            return batch
        if self.name == "fim":
            return _middle_only(batch, self.fim_ids[1]) if evaluation else batch
        space = _EVAL if evaluation else _TRAIN
        rows = range(batch["inputs"].shape[0])
        rngs = [np.random.default_rng([self.seed, space, step, row_offset + r]) for r in rows]
        if self.name == "masked":
            return self._mask(batch, rngs)
        return self._prefix(batch, rngs)

    def _mask(self, batch: dict[str, np.ndarray], rngs: list) -> dict[str, np.ndarray]:
        o = self.options
        tokens, seg = batch["inputs"], batch["segment_ids"]  # (B, L): [BOS] + ids per document
        B, L = tokens.shape
        inputs, chosen = tokens.copy(), np.zeros((B, L), bool)
        candidate = (seg > 0) & (tokens != self.bos_id)
        for r, rng in enumerate(rngs):
            draw = rng.random((3, L))  # choose, how to corrupt, which random piece
            if o.whole_word:
                starts = np.ones(L, bool)
                chars = self.word_chars[tokens[r]]  # (L, 2)
                starts[1:] = (seg[r, 1:] != seg[r, :-1]) | ~(chars[:-1, 1] & chars[1:, 0])
                word = np.cumsum(starts) - 1  # (L,) word index of each token
                chosen[r] = candidate[r] & (draw[0][word] < o.mask_rate)
            else:
                chosen[r] = candidate[r] & (draw[0] < o.mask_rate)
            to_mask = chosen[r] & (draw[1] < o.mask_token_rate)
            to_random = chosen[r] & ~to_mask & (draw[1] < o.mask_token_rate + o.random_token_rate)
            random_ids = self.replacement_ids[(draw[2] * len(self.replacement_ids)).astype(int)]
            inputs[r] = np.where(to_mask, self.mask_id, np.where(to_random, random_ids, inputs[r]))
        return dict(
            batch,
            inputs=inputs,
            targets=tokens,  # the original token at the same position
            loss_mask=chosen.astype(np.float32),
            prefix=(seg > 0).astype(np.int32),  # the whole document, both ways
        )

    def _prefix(self, batch: dict[str, np.ndarray], rngs: list) -> dict[str, np.ndarray]:
        seg = batch["segment_ids"]
        prefix = np.zeros(seg.shape, np.int32)
        loss_mask = batch["loss_mask"].copy()
        fraction = float(self.options.prefix_fraction)
        for r, rng in enumerate(rngs):
            for start, end in _segments(seg[r]):
                n = end - start
                if n < 2:
                    continue
                k = rng.integers(1, n) if fraction == 0 else min(n - 1, max(1, round(fraction * n)))
                prefix[r, start : start + k] = 1
                # Prefix positions see the whole prefix, so their targets would be visible; the
                # last one predicts the first token after it, which it cannot see.
                loss_mask[r, start : start + k - 1] = 0
        return dict(batch, prefix=prefix, loss_mask=loss_mask)

    def host_sums(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """Held-out sums computed from a batch alone: the unigram baseline's hits (masked LM)."""
        if self.name != "masked" or self.baseline_id < 0:
            return {}
        hits = batch["loss_mask"] * (batch["targets"] == self.baseline_id)
        return {"baseline_hits": float(np.sum(hits))}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Objective-specific held-out metrics from summed eval outputs."""
        count = max(sums.get("count", 0.0), 1.0)
        if self.name == "masked":
            out = {"masked_accuracy": sums["correct"] / count}
            if "baseline_hits" in sums:
                out["unigram_accuracy"] = sums["baseline_hits"] / count
            return out
        if self.name == "fim":
            return {
                "middle_token_accuracy": sums["correct"] / count,
                "middle_exact_match": sums["exact"] / max(sums["spans"], 1.0),
            }
        if self.name == "prefix":
            return {"loss_after_prefix": sums["nll"] / count}  # what `loss` is here, by name
        return {}


def summary(result: dict[str, float]) -> str:
    """' | masked-token accuracy 41.0% | ...': the held-out metrics of `Objective.metrics` in
    `result` (an evaluation, or its saved record), formatted for the log; '' for causal LM."""
    parts = []
    if "masked_accuracy" in result:
        parts.append(f"masked-token accuracy {result['masked_accuracy']:.1%}")
        if result.get("unigram_accuracy"):
            ratio = result["masked_accuracy"] / result["unigram_accuracy"]
            parts.append(f"unigram baseline {result['unigram_accuracy']:.1%} ({ratio:.2f}x)")
    if "loss_after_prefix" in result:
        parts.append(f"loss after the prefix {result['loss_after_prefix']:.4f}")
    if "middle_exact_match" in result:
        parts.append(
            f"middle-span token accuracy {result['middle_token_accuracy']:.1%} | "
            f"middle exact match {result['middle_exact_match']:.1%}"
        )
    return "".join(f" | {p}" for p in parts)


def _middle_only(batch: dict[str, np.ndarray], middle_id: int) -> dict[str, np.ndarray]:
    """Loss on the middle span (and its closing EOS) of PSM documents only: the targets after
    each segment's `<fim_middle>` input."""
    seg, inputs = batch["segment_ids"], batch["inputs"]
    after = np.zeros(seg.shape, bool)
    for r in range(seg.shape[0]):
        for start, end in _segments(seg[r]):
            after[r, start:end] = np.cumsum(inputs[r, start:end] == middle_id) > 0
    return dict(batch, loss_mask=batch["loss_mask"] * after)


def _segments(seg: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each document (non-zero segment id run) in one row."""
    edges = np.flatnonzero(np.diff(seg, prepend=0, append=0))
    return [(s, e) for s, e in zip(edges[:-1], edges[1:], strict=True) if seg[s] > 0]


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def _continuation_byte(piece: str) -> bool:
    """Whether a byte-fallback piece (``<0xNN>``) is a UTF-8 continuation byte (10xxxxxx)."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return 0x80 <= int(piece[3:5], 16) < 0xC0
    return False


def unigram_mode(manifest: dict, bos_id: int, max_docs: int = 2000) -> int:
    """The most frequent maskable token in the first `max_docs` training documents: what a
    unigram-frequency model predicts at every masked position."""
    from jaxlm.data import pipeline

    counts: dict[int, int] = {}
    for ids in pipeline.first_documents(manifest, max_docs):
        values, n = np.unique(ids[:-1], return_counts=True)  # EOS is never masked
        for v, c in zip(values.tolist(), n.tolist(), strict=True):
            counts[v] = counts.get(v, 0) + c
    counts.pop(bos_id, None)
    return max(counts, key=counts.get) if counts else -1
