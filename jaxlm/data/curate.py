"""Curation: switchable, counted rules that turn raw Documents into training Documents.

Rules run in order of cost, cheapest first, on a stream (nothing is held but the dedup indexes):

1. **exact dedup** — drop a document whose whitespace- and case-normalised text was seen before.
2. **quality** — Gopher/C4-style heuristics (length, mean word length, symbol ratio, lines ending
   in punctuation, duplicate lines, most-repeated n-gram, alphabetic words, longest line). The
   thresholds come from a preset (``code``, ``web``, ``none``), each overridable in the config.
3. **near dedup** — MinHash over word 5-gram shingles with banded LSH (jaxlm/data/minhash.py); a
   document whose estimated Jaccard similarity to an already *kept* document is >= threshold is
   dropped (keep-first, so the result is deterministic for a given input order).
4. **PII scrub** — e-mails, IPv4/IPv6 addresses and phone numbers become ``<EMAIL>``, ``<IP>``,
   ``<PHONE>`` (jaxlm/data/pii.py); version numbers, dates and plain numbers are left alone.

Every removal and replacement is counted in a :class:`CurationReport` (documents and bytes in,
removed per rule, PII replacements per kind, out), printable as a table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

import ml_collections
import numpy as np

from jaxlm.data.minhash import NearDedup, ngram_hashes, word_hashes
from jaxlm.data.pii import PiiScrubber

Document = dict[str, Any]

# Quality presets. None switches a rule off. `web` follows Gopher (Rae et al. 2021) and C4;
# `code` is loose enough to keep ~all of the Python standard library while still dropping
# minified blobs and machine-generated tables.
PRESETS: dict[str, dict[str, float | int | None]] = {
    "web": dict(
        min_words=50,
        max_words=100_000,
        min_mean_word_length=3.0,
        max_mean_word_length=10.0,
        max_line_length=None,
        max_symbol_ratio=0.1,
        min_punct_lines=0.12,
        max_dup_lines=0.3,
        min_alpha_words=0.8,
        max_top_2gram=0.20,
        max_top_3gram=0.18,
        max_top_4gram=0.16,
    ),
    "code": dict(
        min_words=3,
        max_words=1_000_000,
        min_mean_word_length=1.5,
        max_mean_word_length=40.0,
        max_line_length=20_000,
        max_symbol_ratio=None,  # '#' starts every comment; the ratio says nothing about code
        min_punct_lines=None,  # code lines end in ':' or ')', not sentence punctuation
        max_dup_lines=0.9,  # test files repeat lines a lot; only generated filler goes past 0.9
        min_alpha_words=0.2,
        max_top_2gram=0.8,
        max_top_3gram=0.8,
        max_top_4gram=0.8,
    ),
    "none": {},
}
THRESHOLDS = tuple(PRESETS["web"])  # every quality threshold name, in the order checked


def default_config() -> ml_collections.ConfigDict:
    """Every curation switch and threshold, with its meaning and units."""
    c = ml_collections.ConfigDict()
    c.exact_dedup = True  # drop documents whose whitespace/case-normalised text was seen before
    c.near_dedup = ml_collections.ConfigDict()
    c.near_dedup.enabled = True  # MinHash-LSH near-duplicate removal (~2 s per 30 MB of code)
    c.near_dedup.threshold = 0.8  # estimated Jaccard similarity (0..1) at or above which to drop
    c.near_dedup.ngram = 5  # shingle size, in whitespace-separated, lower-cased words
    c.near_dedup.num_perm = 128  # MinHash permutations; estimate std ~ sqrt(J(1-J)/num_perm)
    c.near_dedup.bands = 32  # LSH bands (num_perm/bands rows each); more bands = higher recall
    c.near_dedup.seed = 0  # seed of the MinHash permutations
    c.quality = ml_collections.ConfigDict()
    c.quality.preset = "code"  # code | web | none: the threshold set used unless overridden
    # Overrides of the preset; None = the preset's value (see PRESETS).
    q = c.quality
    q.min_words = _unset(int)  # fewest whitespace-separated words in a document
    q.max_words = _unset(int)  # most whitespace-separated words in a document
    q.min_mean_word_length = _unset(float)  # smallest mean word length, characters
    q.max_mean_word_length = _unset(float)  # largest mean word length, characters
    q.max_symbol_ratio = _unset(float)  # most ('#' + '...' + '…') occurrences per word
    q.min_punct_lines = _unset(float)  # least fraction of non-empty lines ending in .!?"'…
    q.max_dup_lines = _unset(float)  # most fraction of non-empty lines repeating an earlier one
    q.max_top_2gram = _unset(float)  # most fraction of word chars in the top word 2-gram's copies
    q.max_top_3gram = _unset(float)  # same for word 3-grams
    q.max_top_4gram = _unset(float)  # same for word 4-grams
    q.min_alpha_words = _unset(float)  # least fraction of words containing a letter
    q.max_line_length = _unset(int)  # longest line, characters (minified code, data blobs)
    c.pii = ml_collections.ConfigDict()
    c.pii.enabled = True  # master switch for the scrubbing below
    c.pii.email = True  # e-mail addresses -> <EMAIL>
    c.pii.ip = True  # IPv4 and IPv6 addresses -> <IP>
    c.pii.phone = True  # phone numbers (NANP 3-3-4, or '+' country code) -> <PHONE>
    return c


def _unset(kind: type) -> ml_collections.FieldReference:
    """A typed None, so `--config.data.curation.quality.min_words=3` still parses as an int."""
    return ml_collections.FieldReference(None, field_type=kind)


def thresholds(quality_cfg: Any, preset: str | None = None) -> dict[str, Any]:
    """The effective thresholds: the preset's values, overridden by non-None config fields."""
    name = preset or quality_cfg.preset
    if name not in PRESETS:
        raise ValueError(f"Unknown quality preset {name!r}; use one of {sorted(PRESETS)}.")
    out = {k: PRESETS[name].get(k) for k in THRESHOLDS}
    out.update({k: quality_cfg[k] for k in THRESHOLDS if quality_cfg.get(k) is not None})
    return out


# ---------------------------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class CurationReport:
    """Counts of what curation did. Removals are counted under the first rule that fired."""

    documents_in: int = 0
    bytes_in: int = 0
    documents_out: int = 0
    bytes_out: int = 0
    removed: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    pii: dict[str, int] = dataclasses.field(default_factory=dict)

    def remove(self, rule: str, nbytes: int) -> None:
        r = self.removed.setdefault(rule, {"documents": 0, "bytes": 0})
        r["documents"] += 1
        r["bytes"] += nbytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CurationReport:
        return cls(**d)

    def merge(self, other: CurationReport) -> CurationReport:
        """The sum of two reports (e.g. from two hosts)."""
        out = CurationReport.from_dict(self.to_dict())
        out.documents_in += other.documents_in
        out.bytes_in += other.bytes_in
        out.documents_out += other.documents_out
        out.bytes_out += other.bytes_out
        for rule, r in other.removed.items():
            mine = out.removed.setdefault(rule, {"documents": 0, "bytes": 0})
            mine["documents"] += r["documents"]
            mine["bytes"] += r["bytes"]
        for kind, n in other.pii.items():
            out.pii[kind] = out.pii.get(kind, 0) + n
        return out

    def table(self, title: str = "curation") -> str:
        """A fixed-width table: one row per rule, documents and MB, with percentages."""

        def row(label: str, docs: int, nbytes: int) -> str:
            pct = 100.0 * docs / max(self.documents_in, 1)
            return f"  {label:<28} {docs:>10,} {pct:>6.2f}% {nbytes / 1e6:>10.2f} MB"

        lines = [f"{title}:", f"  {'':<28} {'documents':>10} {'':>7} {'bytes':>13}"]
        lines.append(row("in", self.documents_in, self.bytes_in))
        for rule, r in self.removed.items():
            lines.append(row(f"- {rule}", r["documents"], r["bytes"]))
        lines.append(row("out", self.documents_out, self.bytes_out))
        if self.pii:
            pii = ", ".join(f"{k} {n:,}" for k, n in sorted(self.pii.items()))
            lines.append(f"  PII replaced: {pii}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Quality


def top_ngram_fraction(h: np.ndarray, lengths: np.ndarray, n: int) -> float:
    """Fraction of word characters covered by occurrences of the most frequent word n-gram."""
    if len(h) < n:
        return 0.0
    grams = ngram_hashes(h, n)
    uniq, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
    best = int(np.argmax(counts))
    if counts[best] < 2:
        return 0.0
    first = int(np.argmax(inverse == best))
    gram_chars = int(lengths[first : first + n].sum())
    return float(counts[best] * gram_chars) / max(int(lengths.sum()), 1)


_NO_LETTER_WORD = re.compile(r"(?<!\S)(?:[^\s\w]|[\d_])+(?!\S)")
_PUNCT_END = (".", "!", "?", '"', "'", "…")


class _Stats:
    """Lazily computed document statistics: a rule only pays for what it reads."""

    def __init__(self, text: str, words: list[str], h: np.ndarray) -> None:
        self.text, self.words, self.h = text, words, h
        self.n = max(len(words), 1)
        self._lengths: np.ndarray | None = None
        self._lines: list[str] | None = None

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = np.fromiter(map(len, self.words), np.int64, len(self.words))
        return self._lengths

    @property
    def lines(self) -> list[str]:  # non-empty, stripped
        if self._lines is None:
            self._lines = [s for s in (ln.strip() for ln in self.text.split("\n")) if s]
        return self._lines

    def get(self, name: str) -> float:
        t = self.text
        if name == "words":
            return len(self.words)
        if name == "mean_word_length":
            return float(self.lengths.mean()) if self.words else 0.0
        if name == "line_length":
            return max(map(len, t.split("\n")))
        if name == "symbol_ratio":
            return (t.count("#") + t.count("...") + t.count("…")) / self.n
        if name == "punct_lines":
            return sum(ln.endswith(_PUNCT_END) for ln in self.lines) / max(len(self.lines), 1)
        if name == "dup_lines":
            return (len(self.lines) - len(set(self.lines))) / max(len(self.lines), 1)
        if name == "alpha_words":
            return 1.0 - len(_NO_LETTER_WORD.findall(t)) / self.n
        if name.startswith("top_"):
            return top_ngram_fraction(self.h, self.lengths, int(name[4]))
        raise KeyError(name)


def quality_failure(stats: _Stats, th: dict[str, Any]) -> str | None:
    """Name of the first quality rule the document fails, or None if it passes all."""
    for key, value in th.items():
        if value is None:
            continue
        bound, stat = key.split("_", 1)
        x = stats.get(stat)
        if (bound == "min" and x < value) or (bound == "max" and x > value):
            return f"quality.{key}"
    return None


# ---------------------------------------------------------------------------------------------
# The curator


def exact_key(words: list[str]) -> bytes:
    """The exact-dedup identity of a document: a hash of its lower-cased words."""
    return hashlib.blake2b(" ".join(words).encode("utf-8", "replace"), digest_size=16).digest()


class Rules:
    """The per-document curation rules, holding no state between documents.

    Both ways of preparing data apply these same functions: the streaming :class:`Curator`
    (which adds the dedup indexes) and the Beam pipeline (which finds duplicates by grouping).

    Args:
      cfg: a ConfigDict shaped like :func:`default_config`.
      preset: overrides ``cfg.quality.preset`` (e.g. per dataset).
    """

    def __init__(self, cfg: Any, preset: str | None = None) -> None:
        self.exact = bool(cfg.exact_dedup)
        self.thresholds = thresholds(cfg.quality, preset)
        self.check_quality = any(v is not None for v in self.thresholds.values())
        nd = cfg.near_dedup
        self.minhash = (
            NearDedup(nd.threshold, nd.ngram, nd.num_perm, nd.bands, nd.seed)
            if nd.enabled
            else None
        )
        p = cfg.pii
        self.pii = PiiScrubber(p.email, p.ip, p.phone) if p.enabled else None

    def screen(self, text: str, words: list[str]) -> tuple[str | None, np.ndarray | None]:
        """The quality rule the document fails (or None), and its MinHash signature (None when
        it failed or near dedup is off)."""
        if not (self.check_quality or self.minhash is not None):
            return None, None
        h = word_hashes(words)
        if self.check_quality:
            rule = quality_failure(_Stats(text, words, h), self.thresholds)
            if rule is not None:
                return rule, None
        return None, (self.minhash.signature(h) if self.minhash is not None else None)

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        """PII-scrubbed text and replacements per kind (the text unchanged if PII is off)."""
        return self.pii.scrub(text) if self.pii is not None else (text, {})


class Curator:
    """Applies :class:`Rules` to a stream of Documents, with the dedup indexes, and keeps the
    report. Keep-first: the result is fixed by the input order.

    Args:
      cfg: a ConfigDict shaped like :func:`default_config`.
      preset: overrides ``cfg.quality.preset`` (e.g. per dataset).
    """

    def __init__(self, cfg: Any, preset: str | None = None) -> None:
        self.cfg = cfg
        self.rules = Rules(cfg, preset)
        self.thresholds = self.rules.thresholds
        self.near = self.rules.minhash
        self.seen: set[bytes] | None = set() if self.rules.exact else None
        self.report = CurationReport()

    def process(self, doc: Document) -> Document | None:
        """The curated document, or None if a rule removed it (and counted why)."""
        text = doc["text"]
        nbytes = len(text.encode("utf-8", "surrogatepass"))
        self.report.documents_in += 1
        self.report.bytes_in += nbytes
        words = text.lower().split()
        if self.seen is not None:
            digest = exact_key(words)
            if digest in self.seen:
                self.report.remove("exact_dedup", nbytes)
                return None
            self.seen.add(digest)
        rule, sig = self.rules.screen(text, words)
        if rule is not None:
            self.report.remove(rule, nbytes)
            return None
        if sig is not None and self.near.is_duplicate_signature(sig):
            self.report.remove("near_dedup", nbytes)
            return None
        if self.rules.pii is not None:
            text, counts = self.rules.scrub(text)
            doc = {**doc, "text": text}
            for kind, n in counts.items():
                self.report.pii[kind] = self.report.pii.get(kind, 0) + n
            nbytes = len(text.encode("utf-8", "surrogatepass"))
        self.report.documents_out += 1
        self.report.bytes_out += nbytes
        return doc

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            out = self.process(doc)
            if out is not None:
                yield out
