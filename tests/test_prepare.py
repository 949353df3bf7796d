"""prepare: shards equal the curated documents, counts add up, stable val split, caching, hosts."""

import gzip
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from jaxlm.data import content_split, curate, manifest, prepare, records, sources, tokenizer
from jaxlm.errors import TokenizerMismatch
from tests.helpers import Log, copy_stdlib_subset, data_configs, decoded_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("no_home_cache")


def _curated(data_cfg) -> dict[str, list[str]]:
    """What the shards must hold: the sources, curated, split by content hash, in order."""
    out = {"train": [], "val": []}
    cur = curate.Curator(data_cfg.curation)
    for doc in cur(sources.Source(data_cfg.datasets.code.paths)):
        out[content_split.split_of(doc["text"], data_cfg.val_fraction)].append(doc["text"])
    return out


def test_shards_decode_to_the_curated_documents(stdlib_prepared):
    path, data_cfg, _, log, seconds = stdlib_prepared
    want = _curated(data_cfg)
    assert len(want["train"]) > 40 and len(want["val"]) > 2
    assert decoded_shards(path) == want
    print(f"prepared {sum(map(len, want.values()))} docs in {seconds:.1f} s")
    assert any("exact_dedup" in line for line in log)  # the curation table was printed


def test_manifest_counts_match_the_shards(stdlib_prepared):
    path, *_ = stdlib_prepared
    m = manifest.load(path)
    root = os.path.dirname(path)
    assert m["version"] == 1 and m["key"] == os.path.basename(root)
    assert m["tokenizer"]["file"] == "tokenizer.model"
    tok = tokenizer.load(os.path.join(root, "tokenizer.model"))
    assert m["tokenizer"] == {"file": "tokenizer.model", **tok.info()}
    ds = m["datasets"]["code"]
    assert ds["weight"] == 1.0
    for split in ("train", "val"):
        docs = tokens = nbytes = 0
        for shard in ds[split]["shards"]:
            recs = records.read_shard(os.path.join(root, shard["path"]))
            texts = [tok.decode(r[:-1]) for r in recs]
            assert shard["documents"] == len(recs) <= 16
            assert shard["tokens"] == sum(len(r) for r in recs)
            assert shard["bytes"] == sum(len(t.encode()) for t in texts)
            assert shard["path"].startswith(f"{split}/code-")
            docs, tokens, nbytes = (
                docs + len(recs),
                tokens + shard["tokens"],
                nbytes + shard["bytes"],
            )
        assert (ds[split]["documents"], ds[split]["tokens"], ds[split]["bytes"]) == (
            docs,
            tokens,
            nbytes,
        )
    rep = m["curation"]["code"]
    assert rep["documents_out"] == ds["train"]["documents"] + ds["val"]["documents"]
    assert rep["removed"]["exact_dedup"]["documents"] >= 1
    assert m["problems"]["code"] == [] or all("file" in p for p in m["problems"]["code"])


def test_val_gzip_bits_per_byte_is_gzip_of_the_held_out_text(stdlib_prepared):
    path, *_ = stdlib_prepared
    val = "".join(decoded_shards(path)["val"]).encode()
    want = 8 * len(gzip.compress(val, 9)) / len(val)
    bpb = manifest.load(path)["val_gzip_bits_per_byte"]
    assert bpb["code"] == pytest.approx(want, abs=1e-9)
    assert bpb["all"] == pytest.approx(want, abs=1e-9)


def test_second_call_hits_the_cache(stdlib_prepared):
    path, data_cfg, tok_cfg, _, _ = stdlib_prepared
    with open(path, "rb") as f:
        before = f.read()
    os.utime(path, (1, 1))
    log = Log()
    t = time.perf_counter()
    assert prepare.prepare(data_cfg, tok_cfg, log=log) == path
    assert time.perf_counter() - t < 2.0
    assert log == [f"using prepared data at {os.path.dirname(path)}"]
    with open(path, "rb") as f:
        assert f.read() == before  # untouched content ...
    assert os.path.getmtime(path) > 1  # ... but the use is recorded (tools/prepare_data --list)
    data_cfg.num_proc = 7  # does not change the output, so not the key
    assert prepare.prepare(data_cfg, tok_cfg, log=Log()) == path
    data_cfg.num_proc = 1
    data_cfg.datasets.code.weight = 3.0  # neither does a mixture weight: refreshed in place
    assert prepare.prepare(data_cfg, tok_cfg, log=Log()) == path
    assert manifest.load(path)["datasets"]["code"]["weight"] == 3.0
    data_cfg.datasets.code.weight = 1.0
    prepare.prepare(data_cfg, tok_cfg, log=Log())


def test_cache_key_covers_what_changes_the_output(stdlib_corpus, stdlib_prepared, tmp_path):
    path, data_cfg, tok_cfg, _, _ = stdlib_prepared
    key, _ = prepare.cache_key(data_cfg, tok_cfg, prepare.sources_of(data_cfg)[0])
    assert key == os.path.basename(os.path.dirname(path))
    for change in (
        lambda d, t: setattr(d, "val_fraction", 0.2),
        lambda d, t: setattr(d, "docs_per_shard", 8),
        lambda d, t: setattr(d, "max_document_bytes", 4096),
        lambda d, t: setattr(d.curation.near_dedup, "threshold", 0.9),
        lambda d, t: setattr(d.curation.quality, "preset", "web"),
        lambda d, t: setattr(t, "vocab_size", 512),
    ):
        d, t = data_configs(data_cfg.datasets.code.paths, data_cfg.cache_dir)
        change(d, t)
        assert prepare.cache_key(d, t, prepare.sources_of(d)[0])[0] != key
    # how many processes prepare it is not in the key: they all prepare the same data
    assert (
        "process_count"
        not in prepare.cache_key(data_cfg, tok_cfg, prepare.sources_of(data_cfg)[0])[1]
    )


def test_val_split_stable_under_rerun_and_added_files(stdlib_corpus, stdlib_prepared, tmp_path):
    path, data_cfg, tok_cfg, _, _ = stdlib_prepared
    before = decoded_shards(path)
    # Re-run from scratch (fresh cache): identical shards, byte for byte.
    d2, t2 = data_configs(data_cfg.datasets.code.paths, tmp_path / "cache2")
    again = prepare.prepare(d2, t2, log=Log())
    m1, m2 = manifest.load(path), manifest.load(again)
    assert m1["tokenizer"]["sha256"] == m2["tokenizer"]["sha256"]

    def shard_hashes(m):
        return [s["sha256"] for sp in ("train", "val") for s in m["datasets"]["code"][sp]["shards"]]

    assert shard_hashes(m1) == shard_hashes(m2)
    # Add files: every old document keeps its split.
    grown = tmp_path / "grown"
    shutil.copytree(stdlib_corpus / "code", grown)
    copy_stdlib_subset(grown, 17, 5, 25)
    d3, t3 = data_configs(str(grown), tmp_path / "cache3")
    after = decoded_shards(prepare.prepare(d3, t3, log=Log()))
    assert len(after["train"]) + len(after["val"]) > len(before["train"]) + len(before["val"])
    # Texts are decoded with each run's own tokenizer: both round-trip exactly.
    assert set(before["val"]) <= set(after["val"])
    assert set(before["train"]) <= set(after["train"])


def test_other_tokenizer_is_detected_by_sha256(stdlib_prepared, tmp_path):
    path, *_ = stdlib_prepared
    manifest.load(path, check_shards=True)
    root = os.path.dirname(path)
    right = tokenizer.load(os.path.join(root, "tokenizer.model"))
    manifest.load(path, right)
    texts = [f"def f{i}():\n    return {i}\n" for i in range(300)]
    cfg = data_configs("", "")[1]
    other = tokenizer.train_tokenizer(texts, cfg, str(tmp_path / "other.model"))
    with pytest.raises(TokenizerMismatch, match="the data at .* was tokenized with"):
        manifest.load(path, other)
    # A shard rewritten with another tokenizer under the same name: its hash gives it away.
    fake = tmp_path / "fake"
    shutil.copytree(root, fake)
    shard = manifest.load(path)["datasets"]["code"]["train"]["shards"][0]["path"]
    os.remove(fake / shard)
    writer = records.ShardWriter(str(fake), shard, 16)
    for text in texts[:5]:
        ids = other.encode(text)
        writer.write(records.encode_record(ids, other.eos_id), len(ids) + 1, len(text))
    writer.close()
    with pytest.raises(prepare.DataError, match="does not match"):
        manifest.load(str(fake / "manifest.json"), check_shards=True)


def test_given_tokenizer_is_used_and_worker_pool_matches_in_process(stdlib_prepared, tmp_path):
    path, data_cfg, _, _, _ = stdlib_prepared
    root = os.path.dirname(path)
    d, t = data_configs(data_cfg.datasets.code.paths, tmp_path / "cache", num_proc=2)
    t.path = os.path.join(root, "tokenizer.model")
    m = manifest.load(prepare.prepare(d, t, log=Log()))
    ref = manifest.load(path)
    assert m["tokenizer"] == ref["tokenizer"]
    for split in ("train", "val"):  # two spawned workers write the same bytes as one process
        got = [s["sha256"] for s in m["datasets"]["code"][split]["shards"]]
        assert got == [s["sha256"] for s in ref["datasets"]["code"][split]["shards"]]


def test_killed_prepare_leaves_no_complete_looking_cache(stdlib_corpus, tmp_path, monkeypatch):
    d, t = data_configs(str(stdlib_corpus / "code"), tmp_path / "cache")

    def boom(*a, **k):
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of tokenization

    monkeypatch.setattr(records.Encoder, "write_shards", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(d, t, log=Log())
    assert os.listdir(tmp_path / "cache") == []  # the temporary directory was removed
    monkeypatch.undo()
    log = Log()
    path = prepare.prepare(d, t, log=log)
    assert os.path.exists(path) and not log[0].startswith("using")


def test_bad_glob_fails_before_any_work(tmp_path):
    d, t = data_configs(f"{tmp_path}/missing/*.jsonl", tmp_path / "cache")
    with pytest.raises(prepare.DataError, match="missing/\\*.jsonl"):
        prepare.prepare(d, t, log=Log())
    assert not os.path.exists(tmp_path / "cache")


def test_cli_prints_one_line_error(tmp_path):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {REPO!r})
            from tests.helpers import data_configs

            def get_config():
                import ml_collections
                c = ml_collections.ConfigDict()
                paths = "{tmp_path}/nothing*.txt"
                c.data, c.tokenizer = data_configs(paths, "{tmp_path}/c")
                return c
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "prepare_data.py"), f"--config={cfg_file}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: The data path pattern")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_two_hosts_prepare_the_same_records_as_one(stdlib_corpus, stdlib_prepared, tmp_path):
    path, _, _, _, _ = stdlib_prepared
    results, errors = {}, []

    def host(i):
        try:
            d, t = data_configs(str(stdlib_corpus / "code"), tmp_path / "cache")
            results[i] = prepare.prepare(d, t, process_index=i, process_count=2, log=Log())
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=host, args=(i,)) for i in (1, 0)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    assert results[0] == results[1]
    m = manifest.load(results[0], check_shards=True)
    assert m["hosts"] == ["host-0-of-2", "host-1-of-2"]
    for split in ("train", "val"):  # each host wrote its share: shards 0, 2, .. and 1, 3, ..
        for k, s in enumerate(m["datasets"]["code"][split]["shards"]):
            assert s["path"].startswith(f"host-{k % 2}-of-2/{split}/code-{k:05d}")
    # dedup, split, tokenizer sample and shard layout are global: the same data as one process
    assert manifest.content(m) == manifest.content(manifest.load(path))
    assert decoded_shards(results[0]) == decoded_shards(path)


def test_one_long_text_file_is_split_and_always_gets_a_held_out_document(tmp_path):
    """A single book, cut into pieces by the `split` rule: with a val_fraction too small to
    catch any piece by hash, the piece nearest the cut is held out, and nothing is lost."""
    text = open(os.path.join(os.path.dirname(os.__file__), "argparse.py"), encoding="utf-8").read()
    (tmp_path / "book.txt").write_text(text)
    d, t = data_configs(str(tmp_path / "book.txt"), tmp_path / "cache", val_fraction=1e-9)
    d.datasets.code.split = "6000"
    d.curation.quality.preset = "none"
    m = manifest.load(prepare.prepare(d, t, log=lambda s: None))
    counts = {s: m["datasets"]["code"][s]["documents"] for s in ("train", "val")}
    pieces = list(sources.split_text(text, 6000))
    assert counts == {"train": len(pieces) - 1, "val": 1}
    assert all(len(p) <= 6000 for p in pieces) and len(pieces) > len(text) // 6000
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")  # only cuts, no loss
