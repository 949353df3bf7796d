"""grain pipelines from prepared ArrayRecord shards to packed, batched training rows.

A record holds one document's token ids followed by EOS (`records.py`). Each document becomes a
next-token pair `inputs = [BOS] + ids`, `targets = ids + [EOS]`, so every token of every
document is a target exactly once per epoch. Documents are packed end to end into rows of
`seq_len` (long ones split across rows, never dropped); `segment_ids` (0 = padding) keep
attention inside a document.

Batch contract (host-local numpy): inputs, targets, segment_ids, positions int32 (B, L) and
loss_mask float32 (B, L).

A run with `config.stages` trains on `staged.py`'s stream instead (per-stage mixture, length and
batch); both turn documents into pairs with `to_pair`, and evaluation always runs here.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

from jaxlm.data import manifest as manifest_lib
from jaxlm.errors import ConfigError


def to_pair(record: bytes, bos_id: int) -> dict[str, np.ndarray]:
    """One document's record -> its next-token pair: inputs [BOS]+ids, targets ids+[EOS].

    The one place a document's ids become training tokens (the record already ends in EOS):
    every training stream, staged or not, and every held-out pass goes through here.
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


class _Rewrite(grain.transforms.MapWithIndex):
    """Record bytes -> record bytes of `transform(ids, (key, index))`: a per-document hook
    (`objectives.FIM`) that sees each document once, before packing, with a position that is
    the same on every resume."""

    def __init__(self, transform: Callable[[np.ndarray, tuple], np.ndarray], key: int):
        self.transform, self.key = transform, key

    def map_with_index(self, index: int, record: bytes) -> bytes:
        ids = np.frombuffer(record, dtype="<i4")  # (n,) ending in EOS
        return self.transform(ids, (self.key, index)).astype("<i4").tobytes()


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


def train_dataset(
    manifest: dict,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    weights: dict[str, float] | None = None,
    worker_count: int = 0,
    read_options: tuple[int, int] = (0, 500),
    doc_transform: Callable | None = None,
) -> grain.IterDataset:
    """Endless stream of packed batches over a weighted mixture of datasets.

    Args:
      manifest: from `jaxlm.data.manifest.load`.
      seq_len: L, tokens per row.
      batch_size: rows per batch.
      seed: shuffle seed; each dataset reshuffles every epoch.
      shard_index, shard_count: which slice of the documents this stream reads.
      weights: mixture weights by dataset name (default: the manifest's); normalised here.
      worker_count: grain worker processes for decoding and packing (0 = in-process).
      read_options: grain's read-ahead (threads, buffered documents); the data is the same.
      doc_transform: `(ids, key) -> ids`, applied to each document before packing, or None.
    """
    names = sorted(manifest["datasets"])
    weights = weights or {n: manifest["datasets"][n].get("weight", 1.0) for n in names}
    names = [n for n in names if weights.get(n, 0) > 0]
    if not names:
        raise ConfigError(
            "every dataset has mixture weight 0 (data.datasets.<name>.weight); "
            "give at least one a positive weight."
        )
    bos = manifest["tokenizer"]["bos_id"]
    streams = []
    for i, name in enumerate(names):
        docs = _documents(manifest, name, "train", shard_index, shard_count)
        if len(docs) == 0:
            raise ConfigError(
                f"dataset {name!r} has no training documents for stream {shard_index} of "
                f"data.streams={shard_count}; add documents or lower data.streams."
            )
        # Each stream gets its own order, or streams would read neighbouring documents in step.
        shuffle_seed = seed + i + 7919 * shard_index
        docs = docs.shuffle(seed=shuffle_seed).repeat()
        if doc_transform is not None:
            docs = docs.map_with_index(_Rewrite(doc_transform, shuffle_seed))
        streams.append(docs.map(_ToPair(bos)))
    mixed = (
        grain.MapDataset.mix(streams, [weights[n] for n in names])
        if len(streams) > 1
        else streams[0]
    )
    threads, buffer = read_options
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
    ds = _packed_rows(mixed.to_iter_dataset(read), seq_len).batch(batch_size, drop_remainder=True)
    if worker_count > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return ds


class HostStreams:
    """This host's rows of the global batch: its share of `streams` independent streams.

    The global batch is the row-wise concatenation of `streams` streams, each reading a disjoint
    slice of the documents. A host reads streams `[p * k, (p + 1) * k)` for k = streams / hosts,
    so the data a run sees depends on `streams` alone, not on how many processes read it: two
    hosts with two streams produce exactly the batches of one host with two streams.
    Subclasses say how one stream is made (`make_stream`) and how its saved state is restored.
    """

    def __init__(self, streams: int, process_index: int, process_count: int, make_stream: Callable):
        per_host = streams // process_count
        first = process_index * per_host
        self.iterators = [make_stream(s) for s in range(first, first + per_host)]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def set_state(self, states: list[dict]) -> None:
        if len(states) != len(self.iterators):
            raise ConfigError(
                f"the data state has {len(states)} streams but this host reads "
                f"{len(self.iterators)}; set data.streams to what the state was saved with."
            )
        for it, state in zip(self.iterators, states, strict=True):
            self._restore_stream(it, state)

    def _restore_stream(self, stream: Any, state: dict) -> None:
        raise NotImplementedError


class HostBatches(HostStreams):
    """`HostStreams` of single-stage grain pipelines (`train_dataset`)."""

    def __init__(
        self,
        manifest: dict,
        *,
        seq_len: int,
        global_batch: int,
        seed: int,
        streams: int,
        process_index: int,
        process_count: int,
        weights: dict[str, float] | None = None,
        worker_count: int = 0,
        read_options: tuple[int, int] = (0, 500),
        doc_transform: Callable | None = None,
    ):
        if streams % process_count or global_batch % streams:
            raise ConfigError(
                f"data.streams={streams} must be a multiple of the process count ({process_count}) "
                f"and divide train.batch_size={global_batch}."
            )

        def make_stream(s: int):
            return iter(
                train_dataset(
                    manifest,
                    seq_len=seq_len,
                    batch_size=global_batch // streams,
                    seed=seed,
                    shard_index=s,
                    shard_count=streams,
                    weights=weights,
                    worker_count=worker_count,
                    read_options=read_options,
                    doc_transform=doc_transform,
                )
            )

        super().__init__(streams, process_index, process_count, make_stream)

    def get_state(self) -> list[dict]:
        """JSON-safe states of this host's streams."""
        return [json.loads(json.dumps(it.get_state())) for it in self.iterators]

    def _restore_stream(self, stream: Any, state: dict) -> None:
        stream.set_state(_from_json(state))


def _from_json(state):
    """Undoes JSON's tuple-to-list change: grain's packer compares its slices with tuples, and a
    list there would silently drop a document on resume."""
    if isinstance(state, dict):
        return {k: _from_json(v) for k, v in state.items()}
    if isinstance(state, list):
        return tuple(_from_json(v) for v in state)
    return state


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
