"""The training stream of every run: per-stage mixtures, lengths and batch sizes, resumable
exactly anywhere, across stage boundaries included (a run without `config.stages` is a plan of
one stage).

A stream is made of three small pieces whose whole state is a JSON dict:

- one document stream per dataset (grain's ArrayRecordDataSource read by index, this stream's
  slice in a new seeded order each epoch): its state is how many documents it has handed out;
- a mixing sampler: the dataset of the k-th document drawn in stage s is a pure function of
  (seed, stream, s, k, the stage's weights), so a resumed stream draws exactly what the
  original would have;
- a packer with one lane per row of the batch: row r of every batch continues lane r's
  document where the previous batch's row r stopped (positions restart at 0, as in grain's
  ConcatThenSplit) and draws the next document when it ends. The rows of one batch thus come
  from different documents: packed end to end into consecutive rows instead, one long source
  file filled whole batches, and the tiny recipe's held-out loss swung by 0.4 bits/byte from
  one evaluation to the next. A lane's state is (dataset, document, offset), re-read on resume;
  at a stage change to fewer rows the lanes cut off wait and are continued before any new
  document is drawn, so no document is replayed or skipped.

Two hooks make the objectives' data: a per-document rewrite before packing (FIM, keyed by the
document's place in its stream, so a resumed stream rewrites it the same way) and a per-batch
rewrite of this host's rows (masked and prefix LM, keyed by the step and global row).

Batch contract as in `pipeline`: inputs, targets, segment_ids, positions int32 (B, L) and
loss_mask float32 (B, L); rows are always full, so loss_mask is all ones (before the batch
rewrite).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from jaxlm import stages
from jaxlm.data import manifest as manifest_lib
from jaxlm.data import pipeline
from jaxlm.errors import ConfigError
from jaxlm.stages import Plan, Stage

DocTransform = Callable[[np.ndarray, tuple], np.ndarray]  # (ids ending in EOS, key) -> ids
BatchRewrite = Callable[[dict, int, int], dict]  # (host batch, step, first global row) -> batch

_BLOCK = 4096  # mixing draws generated per (seed, stream, stage, block) at once


class _Documents:
    """One dataset's documents for one stream: every `streams`-th record from `stream`, in a
    seeded order that changes every epoch; the k-th document is a pure function of k.

    Reads grain's ArrayRecordDataSource directly: ~10x cheaper per document than indexing a
    shuffled, repeated grain MapDataset, which matters for streams of short documents.
    """

    def __init__(self, manifest: dict, name: str, seed: tuple, stream: int, streams: int):
        paths = manifest_lib.shard_paths(manifest, name, "train")
        self.source = grain.sources.ArrayRecordDataSource(paths)
        self.first, self.stride = stream, streams
        self.n = len(range(stream, len(self.source), streams))
        self.seed = seed
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation)

    def __getitem__(self, k: int) -> bytes:
        epoch, i = divmod(k, self.n)
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([*self.seed, epoch])
            self._order = (epoch, rng.permutation(self.n))
        return self.source[self.first + int(self._order[1][i]) * self.stride]


class StageStream:
    """One stream's batches (`stage.batch_size / streams` rows each), step after step."""

    def __init__(
        self,
        manifest: dict,
        plan: Plan,
        *,
        seed: int,
        stream: int,
        streams: int,
        doc_transform: DocTransform | None = None,
    ):
        self.plan, self.seed, self.stream, self.streams = plan, seed, stream, streams
        self.doc_transform = doc_transform
        self.bos = manifest["tokenizer"]["bos_id"]
        names = sorted(manifest["datasets"])
        used = {n for s in plan.stages for n, w in s.weights.items() if w > 0}
        self.docs = {}
        for i, name in enumerate(names):
            if name not in used:
                continue
            docs = _Documents(manifest, name, (seed, i, stream), stream, streams)
            if docs.n == 0:
                raise ConfigError(
                    f"dataset {name!r} has no training documents for stream {stream} of "
                    f"data.streams={streams}; add documents or lower data.streams."
                )
            self.docs[name] = docs
        self.state = {
            "step": 0,
            "stage": 0,
            "drawn": 0,  # documents drawn in this stage (the sampler's k)
            "read": {n: 0 for n in self.docs},  # documents read from each dataset
            "lanes": [],  # per row: [dataset, document index, offset] of its document, or None
            "waiting": [],  # lanes cut off by a stage of fewer rows, continued first
        }
        self._block: tuple | None = None  # (stage, block index, draws)
        self._pairs: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}  # lanes' documents

    def __next__(self) -> dict[str, np.ndarray]:
        st = self.state
        stage = self.plan.stage_at(st["step"])
        if stage.index != st["stage"]:
            st["stage"], st["drawn"] = stage.index, 0
        n_rows = stage.batch_size // self.streams
        lanes = st["lanes"]
        if len(lanes) > n_rows:  # a stage of fewer rows: cut-off lanes wait their turn
            st["waiting"].extend(lane for lane in lanes[n_rows:] if lane is not None)
            del lanes[n_rows:]
        lanes.extend([None] * (n_rows - len(lanes)))
        rows = [self._row(stage, r) for r in range(n_rows)]
        st["step"] += 1
        live = {(lane[0], lane[1]) for lane in lanes + st["waiting"] if lane is not None}
        self._pairs = {key: pair for key, pair in self._pairs.items() if key in live}
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def _row(self, stage: Stage, r: int) -> dict[str, np.ndarray]:
        """Row r of this step: lane r's document from where it stopped, then new ones."""
        L = stage.seq_len
        row = {k: np.zeros(L, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
        lanes, waiting = self.state["lanes"], self.state["waiting"]
        pos, segment = 0, 1
        while pos < L:
            if lanes[r] is None:
                lanes[r] = waiting.pop(0) if waiting else self._draw(stage)
            name, index, offset = lanes[r]
            inputs, targets = self._pair(name, index)
            n = min(len(inputs) - offset, L - pos)
            row["inputs"][pos : pos + n] = inputs[offset : offset + n]
            row["targets"][pos : pos + n] = targets[offset : offset + n]
            row["segment_ids"][pos : pos + n] = segment
            row["positions"][pos : pos + n] = np.arange(n)
            lanes[r] = None if offset + n == len(inputs) else [name, index, offset + n]
            pos, segment = pos + n, segment + 1
        row["loss_mask"] = np.ones(L, np.float32)
        return row

    def _draw(self, stage: Stage) -> list:
        """The next document of `stage`'s mixture, as a lane at its start."""
        name = self._choose(stage, self.state["drawn"])
        self.state["drawn"] += 1
        index = self.state["read"][name]
        self.state["read"][name] += 1
        return [name, index, 0]

    def _pair(self, name: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of the index-th document this stream read from `name` (cached
        while a lane holds it; a pure function of the index, so a resume re-reads it)."""
        key = (name, index)
        if key not in self._pairs:
            record = self.docs[name][index]
            if self.doc_transform is not None:
                key_of_doc = (*self.docs[name].seed, index)  # (seed, dataset, stream, place)
                record = pipeline.rewrite(record, self.doc_transform, key_of_doc)
            pair = pipeline.to_pair(record, self.bos)
            self._pairs[key] = (pair["inputs"], pair["targets"])
        return self._pairs[key]

    def _choose(self, stage: Stage, k: int) -> str:
        """The dataset of the k-th document of `stage`: a function of (seed, stream, stage, k,
        weights) only."""
        block = k // _BLOCK
        if self._block is None or self._block[:2] != (stage.index, block):
            rng = np.random.default_rng([self.seed, self.stream, stage.index, block])
            self._block = (stage.index, block, rng.random(_BLOCK))
        names = [n for n, w in stage.weights.items() if w > 0]
        edges = np.cumsum([stage.weights[n] for n in names])
        i = int(np.searchsorted(edges, self._block[2][k % _BLOCK] * edges[-1], side="right"))
        return names[min(i, len(names) - 1)]


class TrainBatches:
    """This host's rows of the global batch: its share of `streams` independent `StageStream`s.

    The global batch is the row-wise concatenation of `streams` streams, each reading a disjoint
    slice of the documents. A host reads streams `[p * k, (p + 1) * k)` for k = streams / hosts,
    so the data a run sees depends on `streams` alone, not on how many processes read it: two
    hosts with two streams produce exactly the batches of one host with two streams.
    """

    def __init__(
        self,
        manifest: dict,
        plan: Plan,
        *,
        seed: int,
        streams: int,
        process_index: int,
        process_count: int,
        doc_transform: DocTransform | None = None,
        batch_rewrite: BatchRewrite | None = None,
    ):
        for stage in plan.stages:
            if streams % process_count or stage.batch_size % streams:
                raise ConfigError(
                    f"data.streams={streams} must be a multiple of the process count "
                    f"({process_count}) and divide stages[{stage.index}].batch_size="
                    f"{stage.batch_size}."
                )
        per_host = streams // process_count
        first = process_index * per_host
        self.iterators = [
            StageStream(
                manifest, plan, seed=seed, stream=s, streams=streams, doc_transform=doc_transform
            )
            for s in range(first, first + per_host)
        ]
        self.first_stream = first
        self.batch_rewrite = batch_rewrite

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        step = self.iterators[0].state["step"]  # every stream moves in step
        parts = [next(it) for it in self.iterators]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if self.batch_rewrite is not None:
            first_row = self.first_stream * parts[0]["inputs"].shape[0]
            batch = self.batch_rewrite(batch, step, first_row)
        return batch

    def get_state(self) -> list[dict]:
        """JSON-safe states of this host's streams (copies: the streams keep moving)."""
        return [
            {
                **it.state,
                "read": dict(it.state["read"]),
                "lanes": [None if lane is None else list(lane) for lane in it.state["lanes"]],
                "waiting": [list(lane) for lane in it.state["waiting"]],
            }
            for it in self.iterators
        ]

    def set_state(self, states: list[dict]) -> None:
        """Continues from `get_state`'s states (of this host's streams, in order)."""
        if len(states) != len(self.iterators):
            raise ConfigError(
                f"the data state has {len(states)} streams but this host reads "
                f"{len(self.iterators)}; set data.streams to what the state was saved with."
            )
        for stream, state in zip(self.iterators, states, strict=True):
            if "lanes" not in state:
                raise ConfigError(
                    "the checkpoint's data state was written by an older jaxlm's stream (one "
                    "packing lane), which this one cannot continue; start a new --workdir with "
                    "config.init_from=ckpt:<that workdir>."
                )
            lane = lambda v: None if v is None else [str(v[0]), int(v[1]), int(v[2])]  # noqa: E731
            stream.state = {
                **state,
                "read": {n: int(state["read"].get(n, 0)) for n in stream.docs},
                "lanes": [lane(v) for v in state["lanes"]],
                "waiting": [lane(v) for v in state["waiting"]],
            }


def training_batches(
    spec: Any,
    manifest: dict,
    process_index: int,
    process_count: int,
    streams: int,
    doc_transform: DocTransform | None = None,
    batch_rewrite: BatchRewrite | None = None,
) -> TrainBatches:
    """This host's training batches for the run of `spec` (`jaxlm.spec.RunSpec`), read from
    `streams` document streams, with the objective's per-document and per-batch rewrites."""
    stages.check_weights(spec.plan, sorted(manifest["datasets"]), "the prepared data")
    return TrainBatches(
        manifest,
        spec.plan,
        seed=spec.seed,
        streams=streams,
        process_index=process_index,
        process_count=process_count,
        doc_transform=doc_transform,
        batch_rewrite=batch_rewrite,
    )
