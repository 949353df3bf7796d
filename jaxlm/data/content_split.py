"""Which split a document goes to, decided by its content alone.

A document's split, its rank in the tokenizer sample and its identity (what keeps a
validation document out of training) are hashes of its text: the same on every host, for any
process count, and on the local path and Beam alike.
"""

from __future__ import annotations

import hashlib


def split_hash(text: str) -> int:
    """The 64-bit content hash that decides a document's split."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")


def split_of(text: str, val_fraction: float) -> str:
    """'val' or 'train' for a document, from its content hash alone."""
    return "val" if split_hash(text) < val_fraction * 2.0**64 else "train"


def needs_held_out_fallback(n_train: int, n_val: int) -> bool:
    """Whether a dataset's split left val empty, so its train document with the lowest
    :func:`split_hash` moves to val (a few dozen pieces of one book can miss the cut)."""
    return n_val == 0 and n_train >= 2


def sample_priority(text: str) -> int:
    """A document's rank in the tokenizer sample (lowest first), from its content alone."""
    # A second, independent hash: the tokenizer sample must not correlate with the val split.
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass")).digest()[:8])


def text_digest(text: str) -> bytes:
    """The identity of a document's text: what keeps a validation document out of training."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
