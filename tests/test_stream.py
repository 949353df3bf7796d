"""The training stream of every run (`jaxlm.data.stream`), for a plan of one stage: mixture weights
(0 excludes), lossless packing with a new shuffle each epoch, exact resume through JSON at every
packer state, one host reading what two hosts read, and the per-document hook (FIM's) applied
the same way on resume. The multi-stage behaviour (per-stage mixtures, a resume across a stage
boundary) is in test_stages.py.

Manifests are written directly with `records.ShardWriter` (no tokenizer): synthetic documents
whose first token names their dataset, so shares and identities can be counted from the packed
rows alone. Packed rows are read back into documents with `lane_documents`.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from jaxlm import stages
from jaxlm.data import stream
from jaxlm.errors import ConfigError
from tests.helpers import (
    BODY,
    BOS,
    EOS,
    document_ids,
    lane_documents,
    synthetic_docs,
    tiny_config,
    write_manifest,
)


def _plan(seq_len: int, batch_size: int, weights: dict[str, float], steps: int = 1000):
    """A run's one-stage plan: what a config without `stages` trains on."""
    c = tiny_config()
    c.model.max_seq_len = max(seq_len, 16)
    c.data.datasets = {n: dict(paths="-", weight=w) for n, w in weights.items()}
    c.train.seq_len, c.train.batch_size, c.train.grad_accum, c.train.steps = (
        seq_len,
        batch_size,
        1,
        steps,
    )
    return stages.build(c)


def _batches(m, plan, streams=1, index=0, count=1, seed=5, **hooks) -> stream.TrainBatches:
    return stream.TrainBatches(
        m, plan, seed=seed, streams=streams, process_index=index, process_count=count, **hooks
    )


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_weights_set_the_shares_and_zero_excludes_a_dataset(tmp_path):
    rng = np.random.RandomState(1)
    m = write_manifest(
        tmp_path,
        {
            "a": {"train": synthetic_docs(rng, 300, 3, 8)},
            "b": {"train": synthetic_docs(rng, 300, 4, 8)},
            "c": {"train": synthetic_docs(rng, 300, 5, 8)},
        },
    )
    reader = _batches(m, _plan(128, 8, {"a": 1.0, "b": 3.0, "c": 0.0}))
    counts: collections.Counter = collections.Counter()
    for doc in lane_documents(reader):
        counts[document_ids(doc)[0]] += 1
        if counts.total() == 4000:
            break
    assert counts[5] == 0, "a dataset with weight 0 must never be drawn"
    assert counts[4] / 4000 == pytest.approx(0.75, abs=0.02)
    with pytest.raises(ConfigError, match="weights must be non-negative and not all 0"):
        _plan(16, 2, {"a": 0.0})


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

    reader = _batches(m, _plan(L, B, {"only": 1.0}))
    batches = [next(reader) for _ in range((2 * tokens) // (B * L) + 20)]
    assert all(b["loss_mask"].all() for b in batches), "training rows are full: no slot wasted"
    documents = lane_documents(batches)
    epochs = [[document_ids(next(documents)) for _ in docs] for _ in range(2)]
    source = collections.Counter(tuple(d) for d in docs)
    for epoch in epochs:
        assert collections.Counter(epoch) == source, "each document exactly once per epoch"
    assert epochs[0] != epochs[1], "the second epoch must be a new shuffle"
    split = [d for d in epochs[0] if len(d) + 1 > L]
    assert len(split) >= 5, "long documents are split across rows, not dropped"


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> dict:
    rng = np.random.RandomState(3)
    # Short documents (1-8 ids) end exactly at a row end often (the packer then holds nothing);
    # a few long ones split across rows (it holds a document's rest).
    return write_manifest(
        tmp_path_factory.mktemp("mixture"),
        {
            "a": {"train": synthetic_docs(rng, 600, 3, 8) + synthetic_docs(rng, 40, 3, 40)},
            "b": {"train": synthetic_docs(rng, 300, 4, 8)},
        },
    )


def _reversed_sometimes(ids: np.ndarray, key: tuple) -> np.ndarray:
    """A stand-in per-document rewrite (FIM's shape: ids ending in EOS -> ids ending in EOS),
    whose choice depends on the key alone."""
    if np.random.default_rng(list(key)).random() < 0.5:
        return ids
    return np.concatenate([ids[-2::-1], ids[-1:]]).astype(ids.dtype)


@pytest.mark.parametrize("hook", [None, _reversed_sometimes])
def test_two_streams_resume_exactly_through_json_at_every_packer_state(mixture, hook):
    plan = _plan(16, 8, {"a": 2.0, "b": 1.0})
    hooks = {"doc_transform": hook}
    reader = _batches(mixture, plan, streams=2, **hooks)
    ref, states = [], []
    for _ in range(16):
        states.append(json.loads(json.dumps(reader.get_state())))  # as a checkpoint stores it
        ref.append(next(reader))
    cuts = range(1, 13)
    # The cuts cover a resume inside a document and one at an exact document end.
    assert any(ref[k]["inputs"][0, 0] != BOS for k in cuts)
    assert any(ref[k - 1]["targets"][3, -1] == EOS for k in cuts)
    for k in cuts:
        fresh = _batches(mixture, plan, streams=2, **hooks)
        fresh.set_state(states[k])
        _same([next(fresh) for _ in range(4)], ref[k : k + 4])
    with pytest.raises(ConfigError, match="streams"):
        _batches(mixture, plan, streams=4).set_state(states[1])
    if hook is not None:  # the rewrite happened: some documents come out reversed
        plain = _batches(mixture, plan, streams=2)
        assert any(not np.array_equal(next(plain)["inputs"], b["inputs"]) for b in ref), (
            "the per-document hook changed nothing"
        )


@pytest.mark.parametrize("streams", [2, 4])
def test_one_host_reads_what_two_hosts_read_together(mixture, streams):
    plan = _plan(16, 8, {"a": 2.0, "b": 1.0})
    one = _batches(mixture, plan, streams=streams)
    hosts = [_batches(mixture, plan, streams=streams, index=i, count=2) for i in range(2)]
    for _ in range(10):
        whole = next(one)
        parts = [next(h) for h in hosts]
        assert parts[0]["inputs"].shape == (4, 16)
        _same([whole], [{k: np.concatenate([p[k] for p in parts]) for k in whole}])
    # The streams read disjoint documents: the two halves are not copies of each other.
    assert not np.array_equal(parts[0]["inputs"], parts[1]["inputs"])


def test_the_batch_rewrite_sees_the_step_and_the_global_row(mixture):
    """Masked / prefix LM rewrite a host's rows keyed by (step, first global row): on two hosts
    the rewritten rows equal one host's."""
    plan = _plan(16, 8, {"a": 1.0, "b": 1.0})

    def mark(batch, step, first_row):
        rows = np.arange(first_row, first_row + len(batch["inputs"]))[:, None]
        return dict(batch, loss_mask=batch["loss_mask"] * (100 * step + rows))

    one = _batches(mixture, plan, streams=2, batch_rewrite=mark)
    hosts = [
        _batches(mixture, plan, streams=2, index=i, count=2, batch_rewrite=mark) for i in (0, 1)
    ]
    for step in range(3):
        whole = next(one)
        joined = np.concatenate([next(h)["loss_mask"] for h in hosts])
        np.testing.assert_array_equal(whole["loss_mask"], joined)
        np.testing.assert_array_equal(whole["loss_mask"][:, 0], 100 * step + np.arange(8))


def test_each_row_is_its_own_documents_lane_and_fewer_rows_skip_none(tmp_path):
    """Row r of every batch continues lane r, so a long document does not fill a whole batch;
    a stage of fewer rows leaves lanes waiting, continued before new documents (none skipped,
    none replayed), also through a JSON resume in the middle of the wait."""
    L = 16
    rng = np.random.RandomState(4)
    docs = [[3] + rng.randint(*BODY, size=rng.randint(4 * L, 9 * L)).tolist() for _ in range(40)]
    m = write_manifest(tmp_path, {"only": {"train": docs}})
    c = tiny_config()
    c.model.max_seq_len = L
    c.data.datasets = {"only": dict(paths="-", weight=1.0)}
    c.train.batch_size, c.train.grad_accum, c.train.steps = 2, 1, 0
    c.stages = (
        dict(steps=3, seq_len=L, batch_size=6),
        dict(steps=40, seq_len=L, batch_size=2),  # four lanes wait, mid-document
        dict(steps=300, seq_len=L, batch_size=6),
    )
    plan = stages.build(c)
    reader = _batches(m, plan)
    first = next(reader)
    # Six rows, six different documents: each row opens with BOS and its own first ids.
    assert (first["inputs"][:, 0] == BOS).all()
    assert len({tuple(r[1:4]) for r in first["inputs"]}) == 6
    batches = [first] + [next(reader) for _ in range(5)]
    state = json.loads(json.dumps(reader.get_state()))
    assert len(state[0]["waiting"]) == 4
    resumed = _batches(m, plan)
    resumed.set_state(state)
    rest = [next(resumed) for _ in range(200)]
    _same(rest[:20], [next(reader) for _ in range(20)])
    read = [document_ids(d) for d in lane_documents(batches + rest)]
    assert collections.Counter(read[: len(docs)]) == collections.Counter(map(tuple, docs))
