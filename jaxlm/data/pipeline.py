"""grain pipelines from prepared ArrayRecord shards to packed, batched training rows.

A record holds one document's token ids followed by EOS (`records.py`). Each document becomes a
next-token pair `inputs = [BOS] + ids`, `targets = ids + [EOS]`, so every token of every
document is a target exactly once per epoch. Documents are packed end to end into rows of
`seq_len` (long ones split across rows, never dropped); `segment_ids` (0 = padding) keep
attention inside a document.

Batch contract (host-local numpy): inputs, targets, segment_ids, positions int32 (B, L) and
loss_mask float32 (B, L).

Training reads `stream.py`'s stream (per-stage mixture, length and batch); evaluation runs
here; both turn documents into pairs with `to_pair`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import grain
import numpy as np

from jaxlm.data import manifest as manifest_lib


def to_pair(record: bytes, bos_id: int) -> dict[str, np.ndarray]:
    """One document's record -> its next-token pair: inputs [BOS]+ids, targets ids+[EOS].

    The one place a document's ids become training tokens (the record already ends in EOS):
    the training stream and every held-out pass go through here.
    """
    ids = np.frombuffer(record, dtype="<i4").astype(np.int32)  # (n,) ending in EOS
    return {
        "inputs": np.concatenate([[bos_id], ids[:-1]]).astype(np.int32),
        "targets": ids,
    }


class _ToPair(grain.transforms.Map):
    """`to_pair` as a grain transform."""

    def __init__(self, bos_id: int):
        self.bos_id = bos_id

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        return to_pair(record, self.bos_id)


_EVAL_KEY = 1 << 30  # held-out documents' rewrite key: never a training stream's shuffle seed


def rewrite(
    record: bytes, transform: Callable[[np.ndarray, tuple], np.ndarray], key: tuple
) -> bytes:
    """A document's record -> the record of `transform(ids, key)`: the per-document hook
    (`objectives.FIM`), applied once per document before packing, by the training stream and
    by held-out passes, with a key that is the same on every resume."""
    ids = np.frombuffer(record, dtype="<i4")  # (n,) ending in EOS
    return transform(ids, key).astype("<i4").tobytes()


class _Rewrite(grain.transforms.MapWithIndex):
    """`rewrite` as a grain transform, keyed by (key, the document's index)."""

    def __init__(self, transform: Callable[[np.ndarray, tuple], np.ndarray], key: int):
        self.transform, self.key = transform, key

    def map_with_index(self, index: int, record: bytes) -> bytes:
        return rewrite(record, self.transform, (self.key, index))


def _to_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = packed["inputs_segment_ids"].astype(np.int32)
    return {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "segment_ids": segment_ids,
        "positions": packed["inputs_positions"].astype(np.int32),
        "loss_mask": (segment_ids > 0).astype(np.float32),
    }


def _documents(manifest: dict, dataset: str, split: str, shard_index: int, shard_count: int):
    source = grain.sources.ArrayRecordDataSource(manifest_lib.shard_paths(manifest, dataset, split))
    # Every shard_count-th document: disjoint slices, no coordination between readers needed.
    return grain.MapDataset.source(source)[shard_index::shard_count]


def _packed_rows(docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """Documents packed end to end into rows of the batch contract (one row per element)."""
    packed = grain.experimental.ConcatThenSplitIterDataset(
        docs, length_struct={"inputs": seq_len, "targets": seq_len}
    )
    return packed.map(_to_batch)


def eval_batches(
    manifest: dict,
    dataset: str,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "val",
    doc_transform: Callable | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Exactly `num_batches` host-local batches over one pass of a dataset's val split (or of
    the validation set named `dataset`, with split="validation"), in order.

    Every host packs the whole split and keeps rows `process_index::process_count`, so hosts
    share the rows evenly however the documents' lengths fall. Rows past the end are padding
    (loss_mask 0): every host yields the same number of batches and a full pass counts each
    held-out token once.
    """
    bos = manifest["tokenizer"]["bos_id"]
    docs = _documents(manifest, dataset, split, 0, 1)
    if doc_transform is not None:  # e.g. FIM: held-out documents rearranged the same every time
        docs = docs.map_with_index(_Rewrite(doc_transform, _EVAL_KEY))
    docs = docs.map(_ToPair(bos))
    packed = _packed_rows(docs.to_iter_dataset(), seq_len)
    rows = (row for r, row in enumerate(packed) if r % process_count == process_index)
    for _ in range(num_batches):
        chunk = list(itertools.islice(rows, batch_size))
        if chunk:
            batch = {k: np.stack([row[k] for row in chunk]) for k in chunk[0]}
        else:
            batch = {k: np.zeros((0, seq_len), v.dtype) for k, v in _empty_row(seq_len).items()}
        yield _pad_rows(batch, batch_size)


def first_documents(manifest: dict, n: int, split: str = "train") -> Iterator[np.ndarray]:
    """The token ids (ending in EOS) of up to `n` documents of each dataset's `split`, in order."""
    for name in sorted(manifest["datasets"]):
        docs = _documents(manifest, name, split, 0, 1)
        for i in range(min(n, len(docs))):
            yield np.frombuffer(docs[i], dtype="<i4")


def _empty_row(seq_len: int) -> dict[str, np.ndarray]:
    z = np.zeros((1, seq_len), np.int32)
    return {
        "inputs": z,
        "targets": z,
        "segment_ids": z,
        "positions": z,
        "loss_mask": z.astype(np.float32),
    }


def _pad_rows(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    missing = batch_size - batch["inputs"].shape[0]
    if missing == 0:
        return batch
    return {
        k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
        for k, v in batch.items()
    }


def eval_num_batches(
    manifest: dict,
    dataset: str,
    seq_len: int,
    global_batch: int,
    max_batches: int,
    split: str = "val",
) -> int:
    """Batches for a full pass over a val split or validation set (manifest tokens include each
    document's EOS).

    Packing fills every row but the last, so the split is ceil(tokens / seq_len) rows.
    """
    rows = math.ceil(manifest_lib.split_info(manifest, dataset, split)["tokens"] / seq_len)
    full = math.ceil(rows / global_batch)
    return full if max_batches <= 0 else min(full, max_batches)


def val_bytes_per_target(manifest: dict, dataset: str, split: str = "val") -> float:
    """UTF-8 bytes of held-out text per predicted token: converts nats/token to bits/byte."""
    val = manifest_lib.split_info(manifest, dataset, split)
    return val["bytes"] / max(val["tokens"], 1)
