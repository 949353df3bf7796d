"""MinHash near-duplicate detection over word n-gram shingles, and the word hashes it shares
with the quality rules.

A document's words are hashed once (:func:`word_hashes`); :class:`NearDedup` turns their
n-grams into a MinHash signature and indexes it in banded LSH buckets, dropping a document whose
estimated Jaccard similarity to an already *kept* one reaches the threshold (keep-first, so the
result is fixed by the input order). :func:`near_duplicates` replays the same rule over a
similarity graph, which is how the Beam pipeline (jaxlm/data/beam_curate.py) gets the same
survivors from grouped buckets.
"""

from __future__ import annotations

import collections
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np


def word_hashes(words: list[str]) -> np.ndarray:
    """Deterministic 32-bit hash per word (crc32; Python's hash() is salted per process)."""
    table = {w: zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in set(words)}
    return np.fromiter((table[w] for w in words), dtype=np.uint64, count=len(words))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def ngram_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every word n-gram (polynomial over the word hashes, wrapping mod 2^64)."""
    m = len(h) - n + 1
    out = np.zeros(max(m, 0), np.uint64)
    for k in range(n):
        out = out * _GOLDEN + h[k : k + m]
    return out


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the polynomial hash over all 64 bits."""
    x = x ^ (x >> np.uint64(31))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(29))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(32))


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
        shingles = np.unique(mix64(ngram_hashes(h, self.ngram)))
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
