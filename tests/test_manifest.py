"""manifest: every load checks the tokenizer hash; a broken manifest or tokenizer is one sentence.

Manifests here are written by hand with `records.ShardWriter` and a stand-in tokenizer file
(the hash check never decodes), so each test takes milliseconds; `test_prepare` covers the
manifests `prepare` writes and merges.
"""

from __future__ import annotations

import json
import os

import pytest

from jaxlm.data import curate, files, manifest, records, tokenizer
from jaxlm.errors import JaxlmError
from tests.helpers import tiny_config


def one_sentence(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.endswith(".") and ". " not in msg, msg
    return msg


def _write(root, tok_bytes: bytes = b"tokenizer A", docs: int = 3) -> str:
    """A one-dataset manifest in `root` whose tokenizer file holds `tok_bytes`; returns its path."""
    os.makedirs(root, exist_ok=True)
    tok_path = os.path.join(root, "tokenizer.model")
    with open(tok_path, "wb") as f:
        f.write(tok_bytes)
    info = {"sha256": files.file_sha256(tok_path), "vocab_size": 9, "bos_id": 2, "eos_id": 3}
    datasets = {"d": {"weight": 1.0}}
    for split in manifest.SPLITS:
        writer = records.ShardWriter(str(root), f"{split}/d-{{index:05d}}.ar", 2)
        for i in range(docs):
            writer.write(records.encode_record([5 + i], 3), 2, 1)
        datasets["d"][split] = manifest.split_entry(s.to_dict() for s in writer.close())
    m = manifest.make(
        key="k",
        tokenizer_file="tokenizer.model",
        tokenizer_info=info,
        datasets=datasets,
        curation={"d": curate.CurationReport(documents_in=docs, documents_out=docs).to_dict()},
        problems={"d": []},
        val_gzip_bits_per_byte={"d": 2.0, "all": 2.0},
        host={"process_index": 0, "process_count": 1},
        config={},
    )
    manifest.write(str(root), m)
    return os.path.join(str(root), manifest.FILE)


def test_round_trip_adds_root_and_resolves_paths(tmp_path):
    path = _write(tmp_path / "data")
    for given in (path, str(tmp_path / "data")):  # the file or its folder
        m = manifest.load(given)
        assert m["root"] == str(tmp_path / "data")
        assert manifest.tokenizer_path(m) == str(tmp_path / "data" / "tokenizer.model")
        assert [os.path.basename(p) for p in manifest.shard_paths(m, "d", "val")] == [
            "d-00000.ar",
            "d-00001.ar",
        ]
        assert m["datasets"]["d"]["val"]["documents"] == 3
    with open(path) as f:
        assert "root" not in json.load(f)  # a runtime key, never written


def test_swapped_tokenizer_file_is_refused_on_load_with_one_sentence(tmp_path):
    path = _write(tmp_path)
    manifest.load(path)  # the untouched folder loads
    with open(tmp_path / "tokenizer.model", "wb") as f:
        f.write(b"tokenizer B")  # another tokenizer under the same name
    with pytest.raises(JaxlmError) as e:
        manifest.load(path)
    msg = one_sentence(e)
    assert (
        str(tmp_path / "tokenizer.model") in msg
        and "does not match the tokenizer the data at" in msg
    )
    os.remove(tmp_path / "tokenizer.model")
    with pytest.raises(JaxlmError) as e:
        manifest.load(path)
    assert "is missing" in one_sentence(e)


def test_training_refuses_a_manifest_whose_tokenizer_was_swapped(tmp_path):
    # loop.run reads the manifest through manifest.load before it builds or compiles anything.
    from jaxlm import loop

    path = _write(tmp_path / "data")
    with open(tmp_path / "data" / "tokenizer.model", "wb") as f:
        f.write(b"tokenizer B")
    config = tiny_config()
    config.data.manifest = path
    with pytest.raises(JaxlmError) as e:
        loop.run(config, str(tmp_path / "run"))
    assert "does not match the tokenizer the data at" in one_sentence(e)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "does not exist"),
        ("{not json", "cannot be read"),
        ('{"tokenizer": {}}', "no 'datasets'"),
        ('{"datasets": {}, "tokenizer": {"file": "t"}}', "names no tokenizer file and hash"),
        ('{"version": 7, "datasets": {}, "tokenizer": {"file": "t", "sha256": ""}}', "version 7"),
    ],
)
def test_malformed_manifest_is_one_sentence(tmp_path, content, words):
    path = tmp_path / "manifest.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(JaxlmError) as e:
        manifest.load(str(path))
    msg = one_sentence(e)
    assert words in msg and str(path) in msg


def test_merge_refuses_hosts_with_different_tokenizers(tmp_path):
    a = _write(tmp_path / "host-0", b"tokenizer A")
    b = _write(tmp_path / "host-1", b"tokenizer B")
    with pytest.raises(JaxlmError, match="2 different tokenizers"):
        manifest.merge([a, b], out_dir=str(tmp_path))
    c = _write(tmp_path / "host-1", b"tokenizer A", docs=4)
    merged = manifest.merge([a, c], out_dir=str(tmp_path))
    manifest.write(str(tmp_path), merged)
    m = manifest.load(str(tmp_path))  # the tokenizer was copied beside the merged manifest
    assert m["datasets"]["d"]["train"]["documents"] == 3 + 4
    # every host curated the whole corpus: the report is host 0's, not a sum
    assert m["curation"]["d"]["documents_in"] == 3
    assert m["hosts"] == ["host-0", "host-1"]
    assert all(os.path.exists(p) for p in manifest.shard_paths(m, "d", "train"))


# --------------------------------------------------------------------------- corrupt tokenizers


def test_one_loader_reads_a_tokenizer_json_by_content_under_any_name(tmp_path):
    import tokenizers

    from jaxlm.data import hf_tokenizer

    vocab = {"<unk>": 0, "</s>": 1, "a": 2}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.model"))  # JSON under a sentencepiece name
    tok = tokenizer.load(str(tmp_path / "tokenizer.model"))
    assert isinstance(tok, tokenizer.HFTokenizer)
    assert (tok.eos_id, tok.encode("a a"), tok.path) == (
        1,
        [2, 2],
        str(tmp_path / "tokenizer.model"),
    )
    assert not hasattr(hf_tokenizer, "load_any")  # one loader: tokenizer.load


@pytest.mark.parametrize("name", ["tokenizer.model", "broken.json", "renamed.model"])
def test_corrupt_tokenizer_file_is_one_sentence_naming_it(tmp_path, name):
    path = tmp_path / name
    # .model: bytes that are no sentencepiece protobuf; .json and JSON content: a cut-off file.
    path.write_bytes(b"\x08\x96\x01junk" if name == "tokenizer.model" else b'{"model": {"vo')
    with pytest.raises(JaxlmError) as e:
        tokenizer.load(str(path))
    assert str(path) in one_sentence(e)


def test_empty_and_missing_tokenizer_files_are_one_sentence(tmp_path):
    (tmp_path / "empty.model").write_bytes(b"")  # sentencepiece parses b"" as an empty model
    with pytest.raises(JaxlmError) as e:
        tokenizer.load(str(tmp_path / "empty.model"))
    assert str(tmp_path / "empty.model") in one_sentence(e)
    with pytest.raises(JaxlmError) as e:
        tokenizer.load(str(tmp_path / "absent.model"))
    assert "does not exist" in one_sentence(e)


@pytest.mark.parametrize("name", ["user.model", "user.json"])
def test_prepare_names_the_users_corrupt_tokenizer_before_reading_data(tmp_path, name):
    from configs import base
    from jaxlm.data import prepare

    bad = tmp_path / name
    bad.write_bytes(b"\x08\x96\x01junk" if name.endswith(".model") else b"{")
    c = base.get_config()
    c.data.datasets.stdlib.paths = str(tmp_path / "*.txt")
    (tmp_path / "doc.txt").write_text("some text\n")
    c.data.cache_dir = str(tmp_path / "cache")
    c.tokenizer.path = str(bad)
    with pytest.raises(JaxlmError) as e:
        prepare.prepare(c.data, c.tokenizer, log=lambda s: None)
    assert str(bad) in one_sentence(e)  # the user's file, not a copy in a temporary folder
    assert not os.path.exists(tmp_path / "cache")  # refused before any curation work
