"""A hostile corpus: special files, cut archives, NUL bytes, one huge line, the wrong text field.

Each input costs its own file or document, counted by kind, never the run, a hang or the
machine's memory; a dataset left empty says why in one sentence. A hang fails the test (an
alarm interrupts a blocked ``open``) instead of stalling the suite.
"""

import contextlib
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import ml_collections
import pytest
import zstandard

from configs import base
from jaxlm.data import beam_curate, files, manifest, prepare, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def deadline(seconds: int):
    """Fails with TimeoutError when the block takes longer (e.g. blocked opening a FIFO)."""

    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s: hung")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _kinds(problems: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in problems:
        out[p["kind"]] = out.get(p["kind"], 0) + p["count"]
    return out


def _special_files(root) -> None:
    """A FIFO, a socket and a character device (a link to /dev/zero), all named *.txt."""
    os.mkfifo(root / "fifo.txt")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "socket.txt"))
    sock.close()  # the socket file stays
    os.symlink("/dev/zero", root / "zero.txt")


def test_fifo_socket_and_device_are_skipped_and_counted_by_kind(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\n")
    _special_files(tmp_path)
    with deadline(20):
        src = sources.Source(str(tmp_path / "*.txt"))
        assert [d["text"] for d in src] == ["plain text\n"]
    assert _kinds(src.problems.to_list()) == {"fifo": 1, "socket": 1, "char_device": 1}


def test_a_fifo_swapped_in_after_listing_is_refused_at_open_not_waited_on(tmp_path):
    path = tmp_path / "late.jsonl"
    path.write_text('{"text": "listed as a file"}\n')
    f = sources.resolve_files(str(path))[0]
    path.unlink()
    os.mkfifo(path)  # nobody will ever write to it
    problems = sources.Problems()
    with deadline(20):
        assert list(sources.read_file(f, problems)) == []
    assert _kinds(problems.to_list()) == {"fifo": 1}


def _configs(paths: str, cache_dir) -> tuple[ml_collections.ConfigDict, ...]:
    c = base.get_config()
    c.data.cache_dir = str(cache_dir)
    c.data.datasets = ml_collections.ConfigDict(
        {"code": ml_collections.ConfigDict(dict(paths=paths, text_field="text", weight=1.0))}
    )
    c.data.val_fraction, c.data.num_proc, c.data.docs_per_shard = 0.2, 1, 16
    c.data.curation.near_dedup.enabled = False
    c.tokenizer.update(dict(vocab_size=512, sample_bytes=200_000))
    return c.data, c.tokenizer


def test_preparation_completes_past_special_files_and_leaves_no_work_folders(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sources.stdlib_files()[::97][:12]:
        shutil.copyfile(f.path, corpus / f"{f.name.replace('/', '__')}.txt")
    _special_files(corpus)
    data_cfg, tok_cfg = _configs(str(corpus / "*.txt"), tmp_path / "cache")
    srcs, _ = prepare.sources_of(data_cfg)
    key, _ = prepare.cache_key(data_cfg, tok_cfg, srcs)
    os.makedirs(tmp_path / "cache")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    killed = tmp_path / "cache" / f".tmp-{key}-0badf00d-pid{dead}@{socket.gethostname()}"
    (killed / "spill").mkdir(parents=True)  # what a SIGKILLed run leaves behind
    log = []
    with deadline(120):
        path = prepare.prepare(data_cfg, tok_cfg, log=log.append)
    m = manifest.load(path)
    assert _kinds(m["problems"]["code"]) == {"fifo": 1, "socket": 1, "char_device": 1}
    assert m["curation"]["code"]["documents_in"] == 12
    assert any("char_device, fifo, socket" in line for line in log)
    assert any(line.startswith(f"removed {killed}") for line in log)
    assert sorted(os.listdir(tmp_path / "cache")) == [key]  # no .tmp-* folder left


def test_stale_work_folders_are_only_this_hosts_dead_ones(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    host = socket.gethostname()
    names = {
        "dead": f".tmp-k-00000000-pid{dead}@{host}",
        "alive": f".tmp-k-00000001-pid{os.getpid()}@{host}",
        "other host": f".tmp-k-00000002-pid{dead}@not-{host}",
        "other key": f".tmp-kk-00000003-pid{dead}@{host}",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
    assert files.remove_stale_work_dirs(str(tmp_path), "k") == [str(tmp_path / names["dead"])]
    assert sorted(os.listdir(tmp_path)) == sorted(n for k, n in names.items() if k != "dead")


ROWS = [json.dumps({"text": f"document {i} " + os.urandom(40).hex()}) for i in range(700)]


@pytest.mark.parametrize("rows", [ROWS, ROWS[:1]], ids=["700 lines", "one line"])
@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_a_cut_archive_is_unreadable_and_gives_none_of_its_documents(tmp_path, rows, suffix):
    data = "\n".join(rows).encode() + b"\n"
    packed = gzip.compress(data) if suffix == ".gz" else zstandard.compress(data)
    (tmp_path / f"cut.jsonl{suffix}").write_bytes(packed[: len(packed) * 2 // 3])
    (tmp_path / f"cut.txt{suffix}").write_bytes(packed[: len(packed) * 2 // 3])
    (tmp_path / f"whole.jsonl{suffix}").write_bytes(packed)
    src = sources.Source(str(tmp_path))
    texts = [d["text"] for d in src]
    assert texts == [json.loads(r)["text"] for r in rows]  # whole.jsonl's only
    problems = src.problems.to_list()
    assert [(os.path.basename(p["file"]), p["kind"]) for p in problems] == [
        (f"cut.jsonl{suffix}", "unreadable"),
        (f"cut.txt{suffix}", "unreadable"),
    ]
    assert all(p["examples"][0].startswith("EOFError") for p in problems)


def test_a_cut_second_zstd_frame_is_caught(tmp_path):
    first, second = zstandard.compress(b'{"text": "one"}\n'), zstandard.compress(b'{"text": "2"}\n')
    (tmp_path / "frames.jsonl.zst").write_bytes(first + second[:-3])
    src = sources.Source(str(tmp_path))
    assert list(src) == [] and _kinds(src.problems.to_list()) == {"unreadable": 1}


@pytest.mark.parametrize("where", [100, 20_000])
def test_a_nul_byte_costs_its_document_wherever_it_is(tmp_path, where):
    text = ("Plain UTF-8 text, caf\u00e9 and all.\n" * 1000).encode()
    (tmp_path / "a.txt").write_bytes(text[:where] + b"\x00" + text[where:])
    lines = [json.dumps({"text": f"record {i} " + "x" * 90}).encode() for i in range(300)]
    at = next(i for i in range(len(lines)) if sum(len(x) + 1 for x in lines[: i + 1]) > where)
    lines[at] = lines[at][:20] + b"\x00" + lines[at][20:]  # a raw NUL in the record at `where`
    lines.append(json.dumps({"text": "escaped \u0000 NUL"}).encode())
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    src = sources.Source(str(tmp_path))
    docs = list(src)
    assert len(docs) == 299 and not any("\x00" in d["text"] for d in docs)
    assert f"b.jsonl:{at + 1}" not in {d["source"] for d in docs}
    # the same outcome at byte 100 as at byte 20,000: the text file and one record dropped, not
    # the whole JSONL file; the escaped NUL counted the same way
    assert {
        (os.path.basename(p["file"]), p["kind"], p["count"]) for p in src.problems.to_list()
    } == {
        ("a.txt", "nul_byte", 1),
        ("b.jsonl", "nul_byte", 2),
    }


def test_binary_files_are_still_binary(tmp_path):
    (tmp_path / "utf16.txt").write_bytes("text in UTF-16\n".encode("utf-16"))
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 4)  # NULs, and not UTF-8
    src = sources.Source(str(tmp_path))
    assert list(src) == [] and _kinds(src.problems.to_list()) == {"binary": 2}


HUGE_LINE = """
import resource, sys
from jaxlm.data import sources
src = sources.Source(sys.argv[1])  # the default bound, 8 MiB
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
texts = [d["text"] for d in src]
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(repr((texts, [(p["kind"], p["count"]) for p in src.problems.to_list()], grown // 1024)))
"""


@pytest.mark.parametrize("name", ["huge.jsonl", "huge.jsonl.zst", "huge.txt"])
def test_a_200_mb_line_is_refused_while_reading_in_bounded_memory(tmp_path, name):
    """With the default bound (8 MiB) the 200 MB line never sits in memory: the reader's peak
    RSS grows by far less than the line (it used to reach 20x the line)."""
    mb, body = 200, b"word " * (2**20 // 5)
    head = b'{"text": "before"}\n{"text": "' if name.startswith("huge.jsonl") else b""
    tail = b'"}\n{"text": "after"}\n' if name.startswith("huge.jsonl") else b""
    path = tmp_path / name
    with open(path, "wb") as f:
        w = zstandard.ZstdCompressor().stream_writer(f) if name.endswith(".zst") else f
        w.write(head)
        for _ in range(mb):
            w.write(body)
        w.write(tail)
        if w is not f:
            w.close()
    proc = subprocess.run(
        [sys.executable, "-c", HUGE_LINE, str(path)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    texts, problems, grown_mb = eval(proc.stdout)  # noqa: S307 -- our own printed literals
    assert texts == (["before", "after"] if name != "huge.txt" else [])
    assert problems == [("too_large", 1)]
    assert grown_mb < 64, f"peak RSS grew {grown_mb} MB reading a {mb} MB line"


def test_the_bound_is_the_configured_one_on_the_local_path_and_beam(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": "y" * n}) for n in (100, 2_000, 10)) + "\n")
    assert base.get_config().data.max_document_bytes == sources.MAX_DOCUMENT_BYTES
    data_cfg, _ = _configs(str(path), tmp_path / "cache")
    data_cfg.max_document_bytes = 1_000
    (src,) = prepare.sources_of(data_cfg)[0].values()
    assert [len(d["text"]) for d in src] == [100, 10]
    assert src.problems.to_list()[0]["examples"] == ["line 2: over 1,000 bytes"]
    # Beam reads each file with the source's bound (beam_curate._Read, one file per task)
    read = beam_curate._Read({"code": (src.text_field, src.split, src.max_document_bytes)}, {})
    out = list(read(("code", 0, src.files[0])))
    assert [len(o[2]) for o in out if isinstance(o, tuple)] == [100, 10]
    (problem,) = [o.value[1] for o in out if getattr(o, "tag", None) == "problems"]
    assert problem["kind"] == "too_large"
    data_cfg.max_document_bytes = 0
    with pytest.raises(prepare.DataError, match=r"config\.data\.max_document_bytes=0 must be"):
        prepare.check_config(data_cfg, base.get_config().tokenizer)


def test_records_without_the_text_field_name_it_and_the_fields_they_have(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"text {i}", "id": i}) for i in range(5)))
    data_cfg, tok_cfg = _configs(str(path), tmp_path / "cache")
    log = []
    with pytest.raises(prepare.DataError) as e:
        prepare.prepare(data_cfg, tok_cfg, log=log.append)
    msg = str(e.value)
    assert msg == (
        f"Dataset 'code' has no documents: the records of {path} have no string field 'text' "
        "(the first has body, id); set config.data.datasets.code.text_field to the field that "
        "holds the text."
    )
    assert not any("manifest" in line for line in log)  # none is written, none is pointed at


def test_an_empty_dataset_says_what_the_reading_found(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\x7fELF" + bytes(100))
    data_cfg, tok_cfg = _configs(str(tmp_path / "*.txt"), tmp_path / "cache")
    with pytest.raises(prepare.DataError, match=r"\(0 read; 1 binary\); check its paths and"):
        prepare.prepare(data_cfg, tok_cfg, log=lambda _: None)
