"""Sources: every supported format streams, bad input is counted per file, bad globs fail fast."""

import gzip
import json
import os
import sysconfig

import pytest

from jaxlm.data import sources

STDLIB = sysconfig.get_paths()["stdlib"]


def _write(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _problems(src: sources.Source) -> dict[tuple[str, str], int]:
    return {(os.path.basename(p["file"]), p["kind"]): p["count"] for p in src.problems.to_list()}


def test_stdlib_source_lists_every_py_file_sorted_without_site_packages():
    files = sources.stdlib_files()
    names = [f.name for f in files]
    assert len(files) > 1000
    assert names == sorted(names)
    assert all(n.endswith(".py") for n in names)
    assert not any("site-packages" in n or "__pycache__" in n for n in names)
    assert "json/decoder.py" in names


def test_stdlib_documents_carry_relative_path_and_real_text():
    src = sources.Source("stdlib")
    for doc in src:
        if doc["source"] == "json/decoder.py":
            with open(os.path.join(STDLIB, "json", "decoder.py"), encoding="utf-8") as f:
                assert doc["text"] == f.read()
            break
    else:
        pytest.fail("json/decoder.py not streamed")


def test_text_markdown_and_python_files_one_document_each_bom_and_crlf_normalised(tmp_path):
    _write(tmp_path / "a.txt", b"\xef\xbb\xbfline one\r\nline two\r\n")
    _write(tmp_path / "sub" / "b.md", b"# Title\n\nbody\n")
    _write(tmp_path / "sub" / "deeper" / "c.py", b"def f():\r\n    return 1\r\n")
    _write(tmp_path / "ignored.bin", b"\x00\x01")
    docs = list(sources.Source(str(tmp_path)))
    assert [d["text"] for d in docs] == [
        "line one\nline two\n",
        "# Title\n\nbody\n",  # sorted by path: sub/b.md < sub/deeper/c.py
        "def f():\n    return 1\n",
    ]
    assert docs[0]["source"].endswith("a.txt")


def test_paragraph_split_option(tmp_path):
    _write(tmp_path / "a.txt", b"first para\nstill first\n\nsecond\n\n\n\nthird\n")
    docs = list(sources.Source(str(tmp_path / "*.txt"), split="paragraphs"))
    assert [d["text"] for d in docs] == ["first para\nstill first", "second", "third"]
    assert len(list(sources.Source(str(tmp_path / "*.txt")))) == 1  # default: one per file


def test_jsonl_malformed_lines_and_missing_fields_counted_with_file_name(tmp_path):
    lines = [
        json.dumps({"text": "good one"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        "",
        json.dumps({"text": "good two", "id": 7}),
        '{"text": "truncated',
    ]
    _write(tmp_path / "d.jsonl", "\n".join(lines).encode())
    src = sources.Source(str(tmp_path / "*.jsonl"))
    docs = list(src)
    assert [d["text"] for d in docs] == ["good one", "good two"]
    assert docs[1]["source"].endswith("d.jsonl:5")
    assert _problems(src) == {("d.jsonl", "malformed_json"): 2, ("d.jsonl", "missing_field"): 1}
    examples = src.problems.to_list()[0]["examples"]
    assert examples[0].startswith("line 2:")


def test_custom_text_field_and_compressed_jsonl(tmp_path):
    import zstandard

    rows = "\n".join(json.dumps({"content": f"doc {i}"}) for i in range(3)).encode()
    _write(tmp_path / "a.jsonl.gz", gzip.compress(rows))
    _write(tmp_path / "b.jsonl.zst", zstandard.ZstdCompressor().compress(rows))
    _write(tmp_path / "c.txt.gz", gzip.compress(b"plain gz text\n"))
    docs = list(sources.Source(str(tmp_path), text_field="content"))
    assert [d["text"] for d in docs] == ["doc 0", "doc 1", "doc 2"] * 2 + ["plain gz text\n"]


def test_truncated_compressed_file_is_counted_whole_and_the_other_files_still_read(tmp_path):
    rows = "\n".join(json.dumps({"text": os.urandom(60).hex()}) for i in range(200)).encode()
    packed = gzip.compress(rows)
    _write(tmp_path / "a.jsonl.gz", packed[: len(packed) // 2])
    _write(tmp_path / "b.txt", b"still here\n")
    src = sources.Source(str(tmp_path))
    docs = list(src)
    # read whole or not at all: none of the ~100 documents before the cut is kept
    assert [d["text"] for d in docs] == ["still here\n"]
    assert _problems(src) == {("a.jsonl.gz", "unreadable"): 1}


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    _write(tmp_path / "latin.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    _write(tmp_path / "mixed.jsonl", b'{"text": "ok"}\n{"text": "bad \xff byte"}\n')
    src = sources.Source(str(tmp_path))
    docs = list(src)
    assert docs[0]["text"] == "caf\ufffd cr\ufffdme\n"  # kept, with replacement characters
    assert docs[2]["text"] == "bad \ufffd byte"
    assert _problems(src) == {("latin.txt", "non_utf8"): 1, ("mixed.jsonl", "non_utf8"): 1}


def test_empty_files_counted_not_crashing(tmp_path):
    _write(tmp_path / "empty.txt", b"")
    _write(tmp_path / "blank.md", b"\n\n  \n")
    _write(tmp_path / "empty.jsonl", b"\n")
    _write(tmp_path / "ok.txt", b"hello\n")
    src = sources.Source(str(tmp_path))
    assert [d["text"] for d in src] == ["hello\n"]
    assert _problems(src) == {
        ("empty.txt", "empty_file"): 1,
        ("blank.md", "empty_file"): 1,
        ("empty.jsonl", "empty_file"): 1,
    }


def test_parquet_read_in_batches_and_missing_column_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i} text" for i in range(2500)]  # > one 1024-row batch
    pq.write_table(pa.table({"text": texts, "n": list(range(2500))}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "b.parquet")
    src = sources.Source(str(tmp_path / "*.parquet"))
    docs = list(src)
    assert [d["text"] for d in docs] == texts
    assert docs[5]["source"].endswith("a.parquet#5")
    assert _problems(src) == {("b.parquet", "missing_column"): 1}
    assert "has body" in src.problems.to_list()[0]["examples"][0]


def test_glob_matching_nothing_is_one_clear_error_before_any_reading(tmp_path):
    _write(tmp_path / "ok.txt", b"fine\n")
    pattern = str(tmp_path / "nope" / "*.jsonl")
    with pytest.raises(sources.SourceError) as e:
        sources.Source(f"{tmp_path}/ok.txt,{pattern}")
    msg = str(e.value)
    assert pattern in msg and "\n" not in msg and msg.count(".") >= 1
    assert isinstance(e.value, ValueError)
    with pytest.raises(sources.SourceError, match="empty"):
        sources.Source(" , ")


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    path = _write(tmp_path / "a.txt", b"one\n")
    before = sources.Source(str(tmp_path)).fingerprint()
    _write(tmp_path / "a.txt", b"one two\n")
    os.utime(path, ns=(1, 1))
    assert sources.Source(str(tmp_path)).fingerprint() != before
    assert sources.Source("stdlib").fingerprint()[-1].startswith(sources.sys.version[:4])
