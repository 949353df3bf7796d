"""grain pipeline: mixture shares, lossless packing, exact resume, host slicing, eval coverage.

Most tests build small manifests directly with `records.ShardWriter` (no tokenizer): synthetic
documents whose first token names their dataset, so shares and identities can be counted from
the packed rows alone. One test runs the real `prepare` on a slice of the standard library and
checks that decoded packed rows give back the source files' text.

Packed rows are read back into documents with `packed_documents`: a segment whose first input is BOS
starts a document; any other segment is the continuation of a document split at a row end
(grain's ConcatThenSplit puts that remainder first in the next row, with positions restarting
at 0); a segment whose last target is EOS ends its document.
"""

from __future__ import annotations

import collections
import json
import sysconfig
from collections.abc import Iterable, Iterator

import numpy as np
import pytest

from configs import base
from jaxlm.data import manifest, pipeline, prepare, sources, tokenizer
from tests.helpers import (
    BODY,
    BOS,
    EOS,
    batch_rows,
    packed_documents,
    synthetic_docs,
    write_manifest,
)


def _ids(doc: tuple[np.ndarray, np.ndarray]) -> tuple[int, ...]:
    """A reassembled document's ids, after checking inputs = [BOS]+ids, targets = ids+[EOS]."""
    x, y = doc
    ids = y[:-1]
    assert y[-1] == EOS and EOS not in ids and BOS not in ids
    np.testing.assert_array_equal(x, np.concatenate([[BOS], ids]))
    return tuple(ids.tolist())


def _take(it: Iterator, n: int) -> list:
    return [next(it) for _ in range(n)]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --------------------------------------------------------------------------- mixture


def test_mixture_shares_match_weights_over_10k_documents(tmp_path):
    rng = np.random.RandomState(0)
    # >1000 documents per dataset: grain's index shuffle costs ~20 ms / n per draw.
    m = write_manifest(
        tmp_path,
        {
            "code": {"weight": 0.7, "train": synthetic_docs(rng, 2300, 3, 8)},
            "prose": {"weight": 0.3, "train": synthetic_docs(rng, 1100, 4, 8)},
        },
    )
    it = pipeline.train_dataset(m, seq_len=128, batch_size=16, seed=0)
    counts: collections.Counter = collections.Counter()
    for doc in packed_documents(batch_rows(it)):
        counts[_ids(doc)[0]] += 1
        if counts.total() == 10_000:
            break
    assert counts[3] / 10_000 == pytest.approx(0.7, abs=0.02)
    assert counts[4] / 10_000 == pytest.approx(0.3, abs=0.02)


def test_weights_argument_overrides_manifest_and_zero_excludes(tmp_path):
    rng = np.random.RandomState(1)
    m = write_manifest(
        tmp_path,
        {
            "a": {"weight": 0.5, "train": synthetic_docs(rng, 1100, 3, 8)},
            "b": {"weight": 0.5, "train": synthetic_docs(rng, 1100, 4, 8)},
            "c": {"weight": 0.5, "train": synthetic_docs(rng, 1100, 5, 8)},
        },
    )
    it = pipeline.train_dataset(
        m, seq_len=128, batch_size=8, seed=0, weights={"a": 1.0, "b": 3.0, "c": 0.0}
    )
    counts: collections.Counter = collections.Counter()
    for doc in packed_documents(batch_rows(it)):
        counts[_ids(doc)[0]] += 1
        if counts.total() == 4000:
            break
    assert counts[5] == 0, "a dataset with weight 0 must never be drawn"
    assert counts[4] / 4000 == pytest.approx(0.75, abs=0.02)
    with pytest.raises(ValueError, match="weight 0"):
        pipeline.train_dataset(m, seq_len=16, batch_size=2, seed=0, weights={"a": 0.0})


# --------------------------------------------------------------------------- packing


def test_packing_yields_every_token_once_per_epoch_and_reshuffles(tmp_path):
    L, B = 32, 4
    rng = np.random.RandomState(2)
    # Body tokens make every document unique; lengths cover short, exactly-L, L+1 and several
    # rows long, so splitting across rows (never dropping) is exercised.
    docs = synthetic_docs(rng, 50, 3, 3 * L)
    docs += [[3] + rng.randint(*BODY, size=n - 1).tolist() for n in (L - 1, L, L + 1, 4 * L)]
    assert len({tuple(d) for d in docs}) == len(docs)
    m = write_manifest(tmp_path, {"only": {"train": docs}}, docs_per_shard=7)
    tokens = m["datasets"]["only"]["train"]["tokens"]
    assert tokens == sum(len(d) + 1 for d in docs)

    rows = batch_rows(pipeline.train_dataset(m, seq_len=L, batch_size=B, seed=0))
    counted = []
    for row in rows:
        assert row["loss_mask"].all(), "training rows are full: packing wastes no slot"
        counted.append(row)
        if len(counted) * L >= 2 * tokens + 5 * L:
            break
    stream = packed_documents(counted)
    epochs = [[_ids(next(stream)) for _ in docs] for _ in range(2)]
    source = collections.Counter(tuple(d) for d in docs)
    for epoch in epochs:
        assert collections.Counter(epoch) == source, "each document exactly once per epoch"
    assert epochs[0] != epochs[1], "the second epoch must be a new shuffle"
    split = [d for d in epochs[0] if len(d) + 1 > L]
    assert len(split) >= 5, "long documents are split across rows, not dropped"


# --------------------------------------------------------------------------- resume


def _mixture_manifest(tmp_path) -> dict:
    rng = np.random.RandomState(3)
    # Short documents (1-8 ids) end exactly at a row end often, the case that needs a whole,
    # unsplit document as the packer's saved remainder; a few long ones split across rows.
    return write_manifest(
        tmp_path,
        {
            "a": {
                "weight": 2.0,
                "train": synthetic_docs(rng, 2400, 3, 8) + synthetic_docs(rng, 40, 3, 40),
            },
            "b": {"weight": 1.0, "train": synthetic_docs(rng, 1200, 4, 8)},
        },
    )


def _recorded(it: Iterator, n: int) -> tuple[list[dict], list]:
    """`n` batches and the iterator state taken before each of them."""
    batches, states = [], []
    for _ in range(n):
        states.append(it.get_state())
        batches.append(next(it))
    return batches, states


def _check_cuts(ref: list[dict], cuts: Iterable[int], rows_per_stream: int) -> None:
    """The cuts must include a resume inside a document and one at an exact document end."""
    inside = any(ref[k]["inputs"][0, 0] != BOS for k in cuts)
    flush = any(
        ref[k - 1]["targets"][r, -1] == EOS
        for k in cuts
        for r in range(rows_per_stream - 1, len(ref[0]["inputs"]), rows_per_stream)
    )
    assert inside and flush, "pick cuts that cover both packer states"


def test_train_iterator_resumes_exactly(tmp_path):
    m = _mixture_manifest(tmp_path)
    kw = dict(seq_len=16, batch_size=4, seed=7)
    ref, states = _recorded(iter(pipeline.train_dataset(m, **kw)), 16)
    cuts = range(1, 13)
    _check_cuts(ref, cuts, 4)
    for k in cuts:
        fresh = iter(pipeline.train_dataset(m, **kw))
        fresh.set_state(states[k])  # grain's own state; the JSON round trip is HostBatches' job
        _assert_same_batches(_take(fresh, 4), ref[k : k + 4])


def test_read_options_change_speed_not_data_and_states_cross_over(tmp_path):
    m = _mixture_manifest(tmp_path)
    kw = dict(seq_len=16, batch_size=4, seed=7)
    ref, states = _recorded(iter(pipeline.train_dataset(m, **kw, read_options=(16, 500))), 8)
    fast = iter(pipeline.train_dataset(m, **kw))  # the default: no read-ahead threads
    _assert_same_batches(_take(fast, 8), ref)
    fresh = iter(pipeline.train_dataset(m, **kw, read_options=(2, 64)))
    fresh.set_state(states[3])  # a state saved under other read options restores exactly
    _assert_same_batches(_take(fresh, 4), ref[3:7])


def _host_batches(m: dict, streams: int, index: int = 0, count: int = 1) -> pipeline.HostBatches:
    return pipeline.HostBatches(
        m,
        seq_len=16,
        global_batch=8,
        seed=5,
        streams=streams,
        process_index=index,
        process_count=count,
    )


def _grain_state(state):
    """JSON turned grain's (-1, -1) "whole document" tuples into lists: turn them back."""
    if isinstance(state, dict):
        return {k: _grain_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return tuple(_grain_state(v) for v in state)
    return state


def _resume_host_batches(m: dict, restore) -> None:
    ref, states = _recorded(_host_batches(m, 2), 16)
    cuts = range(1, 13)
    _check_cuts(ref, cuts, 4)
    for k in cuts:
        saved = json.loads(json.dumps({"process_0": states[k]}))  # as the checkpoint stores it
        assert len(saved["process_0"]) == 2
        fresh = _host_batches(m, 2)
        fresh.set_state(restore(saved["process_0"]))
        _assert_same_batches(_take(fresh, 4), ref[k : k + 4])
    with pytest.raises(ValueError, match="streams"):
        _host_batches(m, 4).set_state(states[1])


def test_host_batches_with_two_streams_resume_exactly_given_tuple_slices(tmp_path):
    # Shows the fix for the test below suffices: with grain's tuples restored, resume is exact.
    _resume_host_batches(_mixture_manifest(tmp_path), lambda s: [_grain_state(x) for x in s])


def test_host_batches_with_two_streams_resume_exactly(tmp_path):
    _resume_host_batches(_mixture_manifest(tmp_path), lambda s: s)


@pytest.mark.parametrize("streams", [2, 4])
def test_one_host_reads_what_two_hosts_read_together(tmp_path, streams):
    m = _mixture_manifest(tmp_path)
    one = _host_batches(m, streams)
    hosts = [_host_batches(m, streams, i, 2) for i in range(2)]
    for _ in range(10):
        whole = next(one)
        parts = [next(h) for h in hosts]
        assert parts[0]["inputs"].shape == (4, 16)
        joined = {k: np.concatenate([p[k] for p in parts]) for k in whole}
        _assert_same_batches([whole], [joined])
    # The streams read disjoint documents: the two halves are not copies of each other.
    assert not np.array_equal(parts[0]["inputs"], parts[1]["inputs"])


# --------------------------------------------------------------------------- eval


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
    found = collections.Counter(_ids(d) for d in packed_documents(batch_rows(batches)))
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
    train_rows = batch_rows(pipeline.train_dataset(m, seq_len=L, batch_size=8, seed=0))
    train = decoded(
        packed_documents(train_rows, tok.bos_id, tok.eos_id), stats["train"]["documents"]
    )
    n_eval = pipeline.eval_num_batches(m, "stdlib", L, 8, max_batches=0)
    val_rows = batch_rows(
        pipeline.eval_batches(m, "stdlib", seq_len=L, batch_size=8, num_batches=n_eval)
    )
    val = decoded(packed_documents(val_rows, tok.bos_id, tok.eos_id), stats["val"]["documents"])
    assert len(train) > 20 and len(val) > 3
    assert len(set(train + val)) == len(train) + len(val), "one epoch holds each file once"
    assert set(train + val) <= originals, "decoded rows must be the files' text, byte for byte"
