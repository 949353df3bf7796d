"""Beam path = local path; dedup is global; hostile inputs are skipped and counted, not fatal.

One corpus serves every test: real standard-library files, planted exact and near duplicates
whose originals and copies lie in different files (as they would on different hosts), and a
folder of hostile files. It is prepared once locally, once by two local processes and once by
Beam's DirectRunner with two workers.
"""

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import threading

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxlm.data import curate, manifest, prepare, sources
from tests.helpers import Log, copy_stdlib_subset, data_configs, decoded_shards

pytestmark = pytest.mark.slow  # three preparations of a 55 MB corpus, one on Beam (~20 s)

N_NEAR, N_EXACT = 60, 12
BIG_MB = 50


def _vocabulary() -> list[str]:
    """Distinct lower-case words of the standard library's source: real, on every machine."""
    words: set[str] = set()
    for f in sources.stdlib_files()[::40]:
        with open(f.path, encoding="utf-8", errors="replace") as fh:
            words.update(w for w in fh.read().lower().split() if w.isalpha() and len(w) > 3)
    return sorted(words)


def _near_copy(text: str, rng: random.Random, vocab: list[str]) -> str:
    """The text with two words replaced: true Jaccard ~0.9 on word 5-gram shingles."""
    words = text.split()
    for i in rng.sample(range(len(words)), 2):
        words[i] = rng.choice(vocab)
    return " ".join(words)


def _write_jsonl(path, texts) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam_corpus")
    rng = random.Random(15)
    vocab = _vocabulary()
    code = copy_stdlib_subset(root / "code", 23, 5, 30)
    held = tmp_path_factory.mktemp("held")  # a named validation set: two of the code files
    for name in code[:2]:
        shutil.copyfile(root / "code" / name, held / name)
    # Distinct documents in one "host's" file; their copies in another's.
    originals = [" ".join(rng.choice(vocab) for _ in range(200)) + "." for _ in range(N_NEAR)]
    near = [_near_copy(t, rng, vocab) for t in originals]
    exact = [f"  {t.upper()}\n" for t in originals[:N_EXACT]]  # same words, other case/spacing
    _write_jsonl(str(root / "host0" / "part-0.jsonl"), originals)
    _write_jsonl(str(root / "host1" / "part-1.jsonl"), near + exact)

    bad = root / "hostile"
    bad.mkdir()
    (bad / "program.txt").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 8)
    (bad / "picture.txt").write_bytes(
        b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(999))
    )
    (bad / "empty.txt").write_bytes(b"")
    latin1 = "Caf\xe9 cr\xe8me: a good document with latin-1 bytes in it, kept with a marker."
    (bad / "latin1.txt").write_bytes(latin1.encode("latin-1"))
    # 50 MB on one line: over data.max_document_bytes (8 MiB), refused while reading
    (bad / "one_line.txt").write_bytes((b"x" * 999 + b" ") * (BIG_MB * 2**20 // 1000))
    good_json = "A good JSON line in a file that also has broken lines, kept as a document."
    (bad / "mixed.jsonl").write_text(
        json.dumps({"text": good_json}) + '\n{"text": "unterminated\n' + '{"title": "no text"}\n'
    )
    pq.write_table(pa.table({"body": ["the text is under another column"]}), bad / "t.parquet")
    whole = gzip.compress(b"A compressed document that ends in the middle. " * 400)
    (bad / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])  # fails to read mid-way
    os.symlink("loop.txt", bad / "loop.txt")
    os.symlink("..", bad / "cycle")  # hostile/cycle -> the corpus root: a directory cycle
    return {
        "root": root,
        "code": code,
        "held": held,
        "originals": originals,
        "near": near,
        "good": {latin1.replace("\xe9", "\ufffd").replace("\xe8", "\ufffd"), good_json},
    }


def _cfgs(corpus, cache):
    d, t = data_configs(f"{corpus['root']}/**", cache, docs_per_shard=8)
    d.validation = ml_collections.ConfigDict({"held": {"paths": str(corpus["held"])}})
    return d, t


@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory):
    d, t = _cfgs(corpus, tmp_path_factory.mktemp("cache"))
    return prepare.prepare(d, t, log=Log())


@pytest.fixture(scope="module")
def beam(corpus, tmp_path_factory):
    from jaxlm.data import beam

    d, t = _cfgs(corpus, tmp_path_factory.mktemp("cache"))
    args = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    return beam.prepare_beam(d, t, ["--runner=DirectRunner", *args], log=Log())


def _texts(path) -> set[str]:
    return {t for split in decoded_shards(path).values() for t in split}


def test_beam_with_two_workers_writes_the_local_paths_records(local, beam):
    m_local, m_beam = manifest.load(local), manifest.load(beam, check_shards=True)
    assert m_beam["host"]["engine"] == "beam"
    held = m_beam["validation"]["held"]
    assert held["documents"] == 2 and held["removed_from_training"] == {"code": 2}
    # tokenizer hash, shard files (sha256), documents, tokens, curation counts, problems
    assert manifest.content(m_beam) == manifest.content(m_local)
    assert decoded_shards(beam) == decoded_shards(local)


def test_two_processes_write_the_same_records_as_one(corpus, local, tmp_path):
    results, errors = {}, []

    def host(i):
        try:
            d, t = _cfgs(corpus, tmp_path / "cache")
            results[i] = prepare.prepare(d, t, process_index=i, process_count=2, log=Log())
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=host, args=(i,)) for i in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert manifest.content(manifest.load(results[0])) == manifest.content(manifest.load(local))


def test_duplicates_in_different_files_are_removed_globally(corpus, local):
    m = manifest.load(local)
    texts = _texts(local)
    removed_near = [t for t in corpus["near"] if t not in texts]
    assert len(corpus["near"]) >= 50
    assert len(removed_near) / len(corpus["near"]) >= 0.95  # near-dup recall
    assert all(t in texts for t in corpus["originals"])  # keep-first: the earlier file's copy
    rep = m["curation"]["code"]
    assert rep["removed"]["exact_dedup"]["documents"] == N_EXACT
    # nothing distinct was removed as a near duplicate: only planted copies were
    assert rep["removed"]["near_dedup"]["documents"] == len(removed_near)


def test_hostile_files_are_skipped_and_counted_by_kind(corpus, local):
    m = manifest.load(local)
    kinds: dict[str, int] = {}
    for p in m["problems"]["code"]:
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + p["count"]
    assert kinds == {
        "binary": 2,
        "empty_file": 1,
        "non_utf8": 1,
        "malformed_json": 1,
        "missing_field": 1,
        "missing_column": 1,
        "symlink_loop": 1,
        "symlink_cycle": 1,
        "unreadable": 1,
        "too_large": 1,
    }
    by_kind = {p["kind"]: p["file"] for p in m["problems"]["code"]}
    assert by_kind["binary"].endswith(("program.txt", "picture.txt"))
    assert by_kind["symlink_cycle"].endswith("cycle")
    assert by_kind["unreadable"].endswith("cut.txt.gz")
    assert by_kind["too_large"].endswith("one_line.txt")
    rep = m["curation"]["code"]
    # every good document is kept, each once: the directory cycle did not read files twice
    texts = _texts(local)
    clean = curate.Curator(_cfgs(corpus, "")[0].curation)  # the code files alone, curated
    code = [d for d in sources.Source(str(corpus["root"] / "code"))]
    code = [d for d in code if os.path.basename(d["source"]) not in corpus["code"][:2]]
    want_code = {d["text"] for d in clean(code)}  # all but the two held-out files
    assert corpus["good"] | set(corpus["originals"]) | want_code <= texts
    assert rep["documents_in"] == len(corpus["code"]) - 2 + 2 * N_NEAR + N_EXACT + 2
    assert not any(t.startswith(("\x7fELF", "\x89PNG")) for t in texts)
    assert np.isfinite(m["val_gzip_bits_per_byte"]["all"])


def test_prepare_beam_cli_bad_path_is_one_error_line(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(repo, "tools", "prepare_beam.py"),
            "--config=configs/tiny.py",
            f"--config.data.datasets.stdlib.paths={tmp_path}/missing/*.jsonl",
        ],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: The data path pattern '{tmp_path}/missing/*.jsonl' matches no "
        ".txt/.md/.rst/.py/.jsonl/.parquet files (optionally .gz/.zst/.bz2/.xz); check the path "
        "or the glob."
    ]


def test_prepare_beam_cli_with_user_beam_flags_prints_only_its_own_lines(tmp_path):
    """With the user's own pipeline options (README's two-worker example), the workers' log
    lines stay quiet: the output is the tool's progress and the manifest's path."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    texts = []
    for f in sources.stdlib_files()[:40]:
        with open(f.path, encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read())
    _write_jsonl(str(tmp_path / "corpus" / "docs.jsonl"), texts)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(repo, "tools", "prepare_beam.py"),
            "--config=configs/tiny.py",
            f"--config.data.datasets.stdlib.paths={tmp_path}/corpus/*.jsonl",
            "--config.tokenizer.vocab_size=512",
            "--config.data.val_fraction=0.2",
            f"--output={tmp_path}/out",
            "--",
            "--runner=DirectRunner",
            "--direct_num_workers=2",
            "--direct_running_mode=multi_processing",
        ],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    ours = [line for line in lines if not line.startswith(("INFO:", "WARNING:"))]
    assert ours == [
        f"preparing 1 dataset(s), 1 files with Beam (DirectRunner) -> {tmp_path}/out",
        f"prepared data at {tmp_path}/out",
        f"{tmp_path}/out/manifest.json",
    ]
    # Each worker process logs two lines while starting, before it reads the log level it is
    # given (apache_beam's sdk_worker_main); nothing after. They printed ~20 each before.
    assert len(lines) - len(ours) <= 2 * 2, lines


def test_a_dataset_curation_empties_is_refused_like_the_local_path_does(tmp_path):
    from jaxlm.data import beam

    _write_jsonl(str(tmp_path / "short.jsonl"), ["too short", "also too short", "short again"])
    errors = []
    for engine in ("local", "beam"):
        d, t = data_configs(str(tmp_path / "short.jsonl"), tmp_path / engine)
        d.curation.quality.min_words = 100
        with pytest.raises(sources.DataError) as e:
            if engine == "local":
                prepare.prepare(d, t, log=Log())
            else:
                args = ["--direct_num_workers=2", "--direct_running_mode=multi_threading"]
                beam.prepare_beam(d, t, ["--runner=DirectRunner", *args], log=Log())
        errors.append(str(e.value))
    assert (
        errors[1]
        == errors[0]
        == (
            "Dataset 'code' has no documents left after reading and curation (3 read); check its "
            "paths and the curation thresholds."
        )
    )
    assert not list((tmp_path / "beam").rglob(manifest.FILE))  # nothing half-written


def test_threaded_direct_runner_has_no_timed_flush():
    """Beam's threaded workers flush output every second from a timer thread, unsynchronised
    with the writer, which lost a document in 2 of 5 runs on the standard library; the Beam
    path runs the same workers with that timer out of reach (see data/beam.py)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from jaxlm.data import beam

    def runner(mode):
        opts = PipelineOptions(["--direct_num_workers=2", f"--direct_running_mode={mode}"])
        return beam._safe_direct_runner(opts)

    threaded = runner("multi_threading")
    assert threaded._default_environment.data_buffer_time_limit_ms >= 10**9  # ms: never
    assert runner("multi_processing") is None  # its workers flush by size only
