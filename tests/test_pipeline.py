"""Held-out batches (grain pipeline): every held-out token counted once, on one host or two;
and real standard-library text round-tripping through `prepare`, the training stream's packing
and the held-out packing. The training stream itself is tested in test_stream.py.

Most tests build small manifests directly with `records.ShardWriter` (no tokenizer). One test runs
the real `prepare` on a slice of the standard library and checks that decoded packed rows give
back the source files' text.

Packed rows are read back into documents with `packed_documents`: a segment whose first input is BOS
starts a document; any other segment is the continuation of a document split at a row end
(grain's ConcatThenSplit puts that remainder first in the next row, with positions restarting
at 0); a segment whose last target is EOS ends its document.
"""

from __future__ import annotations

import collections
import sysconfig
from collections.abc import Iterator

import numpy as np

from configs import base
from jaxlm import stages
from jaxlm.data import manifest, pipeline, prepare, sources, stream, tokenizer
from tests.helpers import (
    BODY,
    batch_rows,
    document_ids,
    lane_documents,
    packed_documents,
    synthetic_docs,
    write_manifest,
)


def _eval_docs(rng: np.random.RandomState) -> list[list[int]]:
    return synthetic_docs(rng, 37, 6, 40) + [[6, *rng.randint(*BODY, size=70).tolist()]]


def test_eval_counts_every_val_token_once_and_pads_with_zero_mask(tmp_path):
    L, B = 16, 4
    rng = np.random.RandomState(4)
    val = _eval_docs(rng)
    m = write_manifest(
        tmp_path, {"a": {"train": synthetic_docs(rng, 5, 3, 9), "val": val}}, docs_per_shard=10
    )
    tokens = m["datasets"]["a"]["val"]["tokens"]
    n = pipeline.eval_num_batches(m, "a", L, B, max_batches=0)
    batches = list(pipeline.eval_batches(m, "a", seq_len=L, batch_size=B, num_batches=n))
    assert len(batches) == n and all(b["inputs"].shape == (B, L) for b in batches)
    assert sum(float(b["loss_mask"].sum()) for b in batches) == tokens
    padding = [r for r in batch_rows(batches) if not r["segment_ids"].any()]
    assert padding and all(not r["loss_mask"].any() for r in padding)
    found = collections.Counter(document_ids(d) for d in packed_documents(batch_rows(batches)))
    assert found == collections.Counter(tuple(d) for d in val), "val documents, in full, once"
    assert pipeline.eval_num_batches(m, "a", L, B, max_batches=2) == 2
    assert pipeline.val_bytes_per_target(m, "a") == m["datasets"]["a"]["val"]["bytes"] / tokens


def _two_host_eval_count(m: dict, L: int, global_batch: int) -> float:
    n = pipeline.eval_num_batches(m, "a", L, global_batch, max_batches=0)
    total = 0.0
    for p in range(2):
        batches = list(
            pipeline.eval_batches(
                m,
                "a",
                seq_len=L,
                batch_size=global_batch // 2,
                num_batches=n,
                process_index=p,
                process_count=2,
            )
        )
        assert len(batches) == n, "every host must run the same number of eval steps"
        total += sum(float(b["loss_mask"].sum()) for b in batches)
    return total


def test_eval_on_two_hosts_counts_every_val_token_once(tmp_path):
    rng = np.random.RandomState(5)
    m = write_manifest(
        tmp_path, {"a": {"train": synthetic_docs(rng, 5, 3, 9), "val": _eval_docs(rng)}}
    )
    assert _two_host_eval_count(m, 16, 8) == m["datasets"]["a"]["val"]["tokens"]


def test_eval_on_two_hosts_with_unbalanced_documents_counts_every_token(tmp_path):
    # Documents go to hosts by index (even/odd), so one long document makes host 0 the heavy one.
    val = [[6, *range(100, 1099)], [7] * 9, [8] * 9, [9] * 9]
    m = write_manifest(tmp_path, {"a": {"train": [[3, 100]], "val": val}})
    assert _two_host_eval_count(m, 16, 4) == m["datasets"]["a"]["val"]["tokens"]


# --------------------------------------------------------------------------- real text


def test_real_stdlib_text_round_trips_through_prepare_and_packing(tmp_path):
    stdlib = sysconfig.get_paths()["stdlib"]
    c = base.get_config()
    c.data.datasets.stdlib.paths = f"{stdlib}/json,{stdlib}/email"
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.val_fraction = 0.25
    c.data.num_proc = 1
    c.data.docs_per_shard = 8
    c.data.curation.pii.enabled = False  # PII scrubbing rewrites e-mail addresses in email/
    c.tokenizer.vocab_size = 512
    m = manifest.load(prepare.prepare(c.data, c.tokenizer, log=lambda s: None))
    tok = tokenizer.load(manifest.tokenizer_path(m))
    assert m["tokenizer"]["bos_id"] == tok.bos_id and m["tokenizer"]["eos_id"] == tok.eos_id
    originals = set()
    for f in sources.resolve_files(c.data.datasets.stdlib.paths):  # the files prepare read
        with open(f.path, "rb") as fh:
            originals.add(sources.normalize_newlines(fh.read().decode("utf-8")))
    stats = m["datasets"]["stdlib"]

    def decoded(docs: Iterator, n: int) -> list[str]:
        out = []
        for x, y in (next(docs) for _ in range(n)):
            assert x[0] == tok.bos_id and y[-1] == tok.eos_id
            np.testing.assert_array_equal(x[1:], y[:-1])
            out.append(tok.decode(y[:-1].tolist()))
        return out

    L = 256
    c.train.seq_len, c.train.batch_size, c.train.grad_accum, c.train.steps = L, 8, 1, 100
    plan = stages.build(c)
    train_batches = stream.TrainBatches(
        m, plan, seed=0, streams=1, process_index=0, process_count=1
    )
    train = decoded(
        lane_documents(train_batches, 1, tok.bos_id, tok.eos_id), stats["train"]["documents"]
    )
    n_eval = pipeline.eval_num_batches(m, "stdlib", L, 8, max_batches=0)
    val_rows = batch_rows(
        pipeline.eval_batches(m, "stdlib", seq_len=L, batch_size=8, num_batches=n_eval)
    )
    val = decoded(packed_documents(val_rows, tok.bos_id, tok.eos_id), stats["val"]["documents"])
    assert len(train) > 20 and len(val) > 3
    assert len(set(train + val)) == len(train) + len(val), "one epoch holds each file once"
    assert set(train + val) <= originals, "decoded rows must be the files' text, byte for byte"
