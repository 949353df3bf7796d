"""Curation: switchable, counted rules that turn raw Documents into training Documents.

Rules run in order of cost, cheapest first, on a stream (nothing is held but the dedup indexes):

1. **exact dedup** — drop a document whose whitespace- and case-normalised text was seen before.
2. **quality** — Gopher/C4-style heuristics (length, mean word length, symbol ratio, lines ending
   in punctuation, duplicate lines, most-repeated n-gram, alphabetic words, longest line). The
   thresholds come from a preset (``code``, ``web``, ``none``), each overridable in the config.
3. **near dedup** — MinHash over word 5-gram shingles with banded LSH; a document whose estimated
   Jaccard similarity to an already *kept* document is >= threshold is dropped (keep-first, so
   the result is deterministic for a given input order).
4. **PII scrub** — e-mails, IPv4/IPv6 addresses and phone numbers become ``<EMAIL>``, ``<IP>``,
   ``<PHONE>``; version numbers, dates and plain numbers are left alone.

Every removal and replacement is counted in a :class:`CurationReport` (documents and bytes in,
removed per rule, PII replacements per kind, out), printable as a table.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import ipaddress
import re
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import ml_collections
import numpy as np

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
# Word statistics shared by the quality rules and MinHash


def _word_hashes(words: list[str]) -> np.ndarray:
    """Deterministic 32-bit hash per word (crc32; Python's hash() is salted per process)."""
    table = {w: zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in set(words)}
    return np.fromiter((table[w] for w in words), dtype=np.uint64, count=len(words))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _ngram_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every word n-gram (polynomial over the word hashes, wrapping mod 2^64)."""
    m = len(h) - n + 1
    out = np.zeros(max(m, 0), np.uint64)
    for k in range(n):
        out = out * _GOLDEN + h[k : k + m]
    return out


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the polynomial hash over all 64 bits."""
    x = x ^ (x >> np.uint64(31))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(29))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(32))


def top_ngram_fraction(h: np.ndarray, lengths: np.ndarray, n: int) -> float:
    """Fraction of word characters covered by occurrences of the most frequent word n-gram."""
    if len(h) < n:
        return 0.0
    grams = _ngram_hashes(h, n)
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
# MinHash LSH


class NearDedup:
    """Streaming MinHash-LSH index over word n-gram shingles; keeps the first of each cluster.

    Permutations are multiply-shift hashes ``(a*x + b) >> 32`` on 64-bit shingle hashes, so a
    signature is a handful of vectorised numpy ops per document (~2 s for 30 MB on one core).
    """

    def __init__(
        self, threshold: float, ngram: int, num_perm: int, bands: int, seed: int = 0
    ) -> None:
        if num_perm % bands:
            raise ValueError(f"near_dedup.num_perm={num_perm} is not a multiple of bands={bands}.")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.threshold, self.ngram, self.num_perm = threshold, ngram, num_perm
        self.bands, self.rows = bands, num_perm // bands
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.signatures: list[np.ndarray] = []

    def signature(self, h: np.ndarray) -> np.ndarray:
        """uint32[num_perm] MinHash signature of the word-hash sequence ``h``."""
        if len(h) < self.ngram:  # a short document is one shingle: itself
            h = np.concatenate([h, np.zeros(self.ngram - len(h), np.uint64)])
        shingles = np.unique(_mix64(_ngram_hashes(h, self.ngram)))
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, np.uint64)
        for i in range(0, len(shingles), 4096):  # bounded memory: 4096 x num_perm x 8 bytes
            x = shingles[i : i + 4096, None] * self.a[None, :] + self.b[None, :]
            np.minimum(sig, x.min(axis=0), out=sig)
        return (sig >> np.uint64(32)).astype(np.uint32)

    def band_keys(self, sig: np.ndarray) -> list[bytes]:
        """The LSH bucket key of each band: documents sharing any key are compared."""
        return [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]

    def similar(self, a: np.ndarray, b: np.ndarray) -> bool:
        """Whether two signatures' estimated Jaccard similarity reaches the threshold."""
        return bool(np.mean(a == b) >= self.threshold)

    def is_duplicate(self, h: np.ndarray) -> bool:
        """True if similar to a kept document; otherwise index this one as kept."""
        return self.is_duplicate_signature(self.signature(h))

    def is_duplicate_signature(self, sig: np.ndarray) -> bool:
        """:meth:`is_duplicate` for a signature computed already."""
        keys = self.band_keys(sig)
        seen: set[int] = set()
        for band, key in zip(self.buckets, keys, strict=True):
            for j in band.get(key, ()):
                if j in seen:
                    continue
                seen.add(j)
                if self.similar(self.signatures[j], sig):
                    return True
        idx = len(self.signatures)
        self.signatures.append(sig)
        for band, key in zip(self.buckets, keys, strict=True):
            band.setdefault(key, []).append(idx)
        return False


def near_duplicates(edges: Iterable[tuple[Any, Any]]) -> set[Any]:
    """The documents near-dedup removes, given every similar pair among the candidates.

    The streaming :class:`NearDedup` drops a document when it is similar to an earlier *kept*
    one. Replaying that rule over the whole similarity graph, in document order, gives the same
    survivors wherever the pairs were found (one process, or LSH buckets grouped by Beam): a
    chain a~b~c with a !~ c keeps a and c, exactly as the stream does.

    Args:
      edges: pairs ``(i, j)`` of orderable document ids (the stream order) whose signatures are
        similar and share an LSH bucket; any order, duplicates allowed.

    Returns:
      The ids to remove.
    """
    earlier: dict[Any, set[Any]] = collections.defaultdict(set)
    for i, j in edges:
        if i != j:
            earlier[max(i, j)].add(min(i, j))
    dropped: set[Any] = set()
    for j in sorted(earlier):  # every earlier id's fate is settled before j's
        if any(i not in dropped for i in earlier[j]):
            dropped.add(j)
    return dropped


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """Exact Jaccard similarity of two texts' word n-gram shingle sets (for tests and tuning)."""

    def shingles(t: str) -> set[tuple[str, ...]]:
        w = t.lower().split()
        return {tuple(w[i : i + ngram]) for i in range(max(len(w) - ngram + 1, 1))}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / max(len(sa | sb), 1)


# ---------------------------------------------------------------------------------------------
# PII

# Each pattern starts with a plain character class and checks what precedes it with a lookbehind
# *after* that first character: a leading lookbehind would make the regex engine try a full match
# at every position, which is 3-5x slower on 30 MB.
#
# E-mails are found from the '@' (a literal, which the engine scans for at C speed); the local
# part before it is then walked back by hand (see PiiScrubber._emails).
_EMAIL_AT = re.compile(
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w@])"
)
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_IPV6 = re.compile(
    r"[0-9A-Fa-f:](?<![\w:.][0-9A-Fa-f:])(?:(?<=:)|[0-9A-Fa-f]{0,3}:)(?:[0-9A-Fa-f]{0,4}:){1,6}"
    r"(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)"
)
# Not preceded by a word char or dot, not followed by another ".digit": 3.11.7 and 1.2.3.4.5
# (versions, OIDs) are not addresses.
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?!\.?\d)(?!\w)")
# NANP (555-123-4567, (555) 123-4567, +1 555.123.4567) with one consistent separator, or an
# international number that starts with '+' and has space/dash separators. A date (2024-01-15)
# has the wrong digit groups; '+4294967296' (no separator) is a number, not a phone.
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"(?:\+?1[ .-]?)?(?:\(\d{3}\) ?\d{3}[ .-]|\d{3}([.-])\d{3}\1)\d{4}"
    r"|\+\d{1,3}(?:[ -]\(?\d{1,4}\)?)?(?:[ -]\d{2,10}){1,4}"
    r")(?!\w|[.-]\d)"
)
# Something every phone match contains; documents without it skip the slower _PHONE scan.
_PHONE_HINT = re.compile(r"\+\d{1,3}[ (-]|\d{3}[ .-]\d{4}")


def _valid_ipv6(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    groups = [g for g in re.split(r"::?", s) if g]
    # Compressed forms like 1::2 are Python slices far more often than addresses.
    return "::" not in s or len(groups) >= 3 or any(len(g) >= 3 for g in groups)


def _valid_ipv4(s: str) -> bool:
    return all(int(p) <= 255 for p in s.split("."))


def _valid_phone(s: str) -> bool:
    digits = sum(c.isdigit() for c in s)
    return 10 <= digits <= 15 if not s.startswith("+") else 8 <= digits <= 15


class PiiScrubber:
    """Replaces e-mails, IPs and phone numbers with placeholders, counting each kind."""

    def __init__(self, email: bool = True, ip: bool = True, phone: bool = True) -> None:
        self.email = email
        # Order matters: IPv6 before IPv4 (mapped addresses), IPs before phones (dotted digits).
        # Each rule: kind, pattern, placeholder, validator, a cheap hint the text must contain.
        rules = [
            (ip, "ip", _IPV6, "<IP>", _valid_ipv6, lambda t: "::" in t or ":0" in t or ":f" in t),
            (ip, "ip", _IPV4, "<IP>", _valid_ipv4, lambda t: "." in t),
            (phone, "phone", _PHONE, "<PHONE>", _valid_phone, _PHONE_HINT.search),
        ]
        self.rules = [r[1:] for r in rules if r[0]]
        self.counts: dict[str, int] = collections.Counter()

    def _emails(self, text: str, counts: collections.Counter) -> str:
        out, last = [], 0
        for m in _EMAIL_AT.finditer(text):
            at = start = m.start()
            while start > last and at - start < 64 and text[start - 1] in _LOCAL_CHARS:
                start -= 1
            while start < at and not text[start].isalnum():  # local part starts alphanumeric
                start += 1
            if start == at or (start > 0 and text[start - 1] in _LOCAL_CHARS and at - start >= 64):
                continue
            out += [text[last:start], "<EMAIL>"]
            last = m.end()
            counts["email"] += 1
        if not out:
            return text
        out.append(text[last:])
        return "".join(out)

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        """The scrubbed text and its replacements per kind; keeps no state (Beam calls this)."""
        counts: collections.Counter = collections.Counter()
        if self.email and "@" in text:
            text = self._emails(text, counts)
        for kind, pattern, placeholder, valid, hint in self.rules:
            if not hint(text):
                continue

            def repl(m: re.Match[str], kind=kind, placeholder=placeholder, valid=valid) -> str:
                if not valid(m.group(0)):
                    return m.group(0)
                counts[kind] += 1
                return placeholder

            text = pattern.sub(repl, text)
        return text, dict(counts)

    def __call__(self, text: str) -> str:
        """The scrubbed text; replacements are added to ``self.counts``."""
        text, counts = self.scrub(text)
        self.counts.update(counts)
        return text


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
        h = _word_hashes(words)
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
