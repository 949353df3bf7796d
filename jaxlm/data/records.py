"""Records: tokenize documents in worker processes and write ArrayRecord shards.

The contract with the training pipeline (``jaxlm.data.pipeline``): **one record per document**,
``np.asarray(ids + [eos_id], dtype='<i4').tobytes()`` — the document's tokens followed by EOS.
Shards are written with ``group_size:1`` so any record can be read without decoding its
neighbours, which grain's global shuffle relies on.

Tokenization runs in ``num_proc`` spawned worker processes, each loading the tokenizer
once. Results come back in submission order, so the shards are identical for any ``num_proc``.
Spawn, not fork: the caller may already have imported JAX, whose threads do not survive a fork.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from jaxlm.data.files import file_sha256
from jaxlm.progress import Progress

RECORD_DTYPE = "<i4"
ARRAY_RECORD_OPTIONS = "group_size:1"  # random access per record; zstd-compressed by default
_TASK_BYTES = 256 * 1024  # text per worker task: small enough for smooth progress and memory


def encode_record(ids: list[int], eos_id: int) -> bytes:
    """The bytes stored for one document: its token ids, then EOS, as little-endian int32."""
    return np.asarray(ids + [eos_id], dtype=RECORD_DTYPE).tobytes()


def decode_record(record: bytes) -> np.ndarray:
    """Token ids (EOS included) of one stored record."""
    return np.frombuffer(record, dtype=RECORD_DTYPE)


def read_shard(path: str) -> list[np.ndarray]:
    """Every record of one shard, decoded (for tests and inspection; training uses grain)."""
    import grain

    source = grain.sources.ArrayRecordDataSource([path])
    return [decode_record(source[i]) for i in range(len(source))]


@dataclasses.dataclass
class ShardInfo:
    """One written shard. ``path`` is relative to the output root; ``bytes`` are UTF-8 text."""

    path: str
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ShardWriter:
    """Writes records into numbered ArrayRecord shards of ``docs_per_shard`` documents each.

    Args:
      root: output directory; shard paths in :class:`ShardInfo` are relative to it.
      pattern: shard file name with one ``{index}`` field, e.g. ``'train/stdlib-{index:05d}.ar'``.
      docs_per_shard: documents per shard before a new one is started.
      stride: ``(i, n)``: this writer's shards are numbers ``i, i+n, ...`` of the whole split
        (the records given are those shards' documents), so ``n`` writers together write the
        same files one writer does.
    """

    def __init__(
        self, root: str, pattern: str, docs_per_shard: int, stride: tuple[int, int] = (0, 1)
    ) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        self._writer_cls = ArrayRecordWriter
        self.root, self.pattern, self.docs_per_shard = root, pattern, max(1, int(docs_per_shard))
        self.stride = stride
        self.shards: list[ShardInfo] = []
        self._writer: Any = None

    def write(self, record: bytes, tokens: int, nbytes: int) -> None:
        if self._writer is None or self.shards[-1].documents >= self.docs_per_shard:
            self._close_current()
            rel = self.pattern.format(index=self.stride[0] + self.stride[1] * len(self.shards))
            os.makedirs(os.path.dirname(os.path.join(self.root, rel)), exist_ok=True)
            self._writer = self._writer_cls(os.path.join(self.root, rel), ARRAY_RECORD_OPTIONS)
            self.shards.append(ShardInfo(rel))
        self._writer.write(record)
        info = self.shards[-1]
        info.documents += 1
        info.tokens += tokens
        info.bytes += nbytes

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            info = self.shards[-1]
            info.sha256 = file_sha256(os.path.join(self.root, info.path))

    def close(self) -> list[ShardInfo]:
        self._close_current()
        return self.shards


# --- worker side: one tokenizer per process, loaded by the pool initializer ------------------

_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    from jaxlm.data import tokenizer

    _WORKER_TOKENIZER = tokenizer.load(tokenizer_path)


def encode_batch(texts: list[str], tok: Any) -> list[tuple[bytes, int]]:
    """Each text's record (:func:`encode_record`) and its token count, EOS included."""
    encoded = tok.encode_batch(texts)  # single-threaded: the processes are the parallelism
    return [(encode_record(ids, tok.eos_id), len(ids) + 1) for ids in encoded]


def _encode_batch(texts: list[str], tok: Any = None) -> list[tuple[bytes, int]]:
    return encode_batch(texts, tok or _WORKER_TOKENIZER)


def _batches(texts: Iterable[str]) -> Iterator[tuple[list[str], list[int]]]:
    """Groups texts into ~_TASK_BYTES tasks, with each text's UTF-8 size."""
    batch: list[str] = []
    sizes: list[int] = []
    total = 0
    for text in texts:
        batch.append(text)
        sizes.append(len(text.encode("utf-8", "surrogatepass")))
        total += sizes[-1]
        if total >= _TASK_BYTES:
            yield batch, sizes
            batch, sizes, total = [], [], 0
    if batch:
        yield batch, sizes


def resolve_num_proc(num_proc: int) -> int:
    """``num_proc`` workers, 0 meaning one per CPU."""
    return int(num_proc) if num_proc and num_proc > 0 else (os.cpu_count() or 1)


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Processes started inside ignore SIGINT: Ctrl-C reaches the whole process group, and
    each worker would print its own KeyboardInterrupt traceback; the parent stops them.

    An ignored signal stays ignored across exec, and Python installs its KeyboardInterrupt
    handler only over the default one, so spawned workers never see it, even at start-up.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change signal handlers (and receives SIGINT)
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Encoder:
    """A pool of tokenizer workers, reused for every shard set written inside its ``with``.

    Args:
      tokenizer_path: the tokenizer file (``tokenizer.load``) each worker loads once.
      num_proc: worker processes; 0 = one per CPU; 1 = tokenize in this process (no pool).
    """

    def __init__(self, tokenizer_path: str, num_proc: int = 0) -> None:
        self.tokenizer_path = tokenizer_path
        self.num_proc = resolve_num_proc(num_proc)
        self._pool: Any = None
        self._tok: Any = None

    def __enter__(self) -> Encoder:
        if self.num_proc == 1:
            from jaxlm.data import tokenizer

            self._tok = tokenizer.load(self.tokenizer_path)
        else:
            ctx = mp.get_context("spawn")
            with _workers_ignore_ctrl_c():
                self._pool = ctx.Pool(
                    self.num_proc, initializer=_init_worker, initargs=(self.tokenizer_path,)
                )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def _encoded(self, texts: Iterable[str]) -> Iterator[tuple[list[tuple[bytes, int]], list[int]]]:
        """(records, text sizes) per task, in input order."""
        if self._pool is None:
            for batch, sizes in _batches(texts):
                yield _encode_batch(batch, self._tok), sizes
            return
        # Pool.imap would drain the input eagerly; a bounded window keeps memory flat.
        pending: collections.deque = collections.deque()
        for batch, sizes in _batches(texts):
            pending.append((self._pool.apply_async(_encode_batch, (batch,)), sizes))
            if len(pending) >= 2 * self.num_proc:
                res, sz = pending.popleft()
                yield res.get(), sz
        while pending:
            res, sz = pending.popleft()
            yield res.get(), sz

    def write_shards(
        self,
        texts: Iterable[str],
        root: str,
        pattern: str,
        docs_per_shard: int,
        label: str = "tokenize",
        stride: tuple[int, int] = (0, 1),
    ) -> tuple[list[ShardInfo], float]:
        """Tokenizes ``texts`` in order into ArrayRecord shards under ``root``.

        Args:
          texts: documents, consumed lazily (at most two tasks per worker are in flight).
          root, pattern, docs_per_shard, stride: see :class:`ShardWriter`.
          label: progress-line label.

        Returns:
          The shards written (none if ``texts`` is empty) and the throughput in MB/s of text.
        """
        writer = ShardWriter(root, pattern, docs_per_shard, stride)
        progress = Progress(label, unit="MB", scale=1e6, counts=("docs", "tokens"))
        for recs, sizes in self._encoded(texts):
            for (rec, ntok), nbytes in zip(recs, sizes, strict=True):
                writer.write(rec, ntok, nbytes)
            progress.update(sum(sizes), docs=len(sizes), tokens=sum(t for _, t in recs))
        shards = writer.close()
        return shards, progress.finish()
