"""Prepare on Apache Beam: the same shards and ``manifest.json`` as ``prepare``, at any scale.

``prepare_beam(data_cfg, tok_cfg, pipeline_args)`` builds one Beam pipeline from the stages the
local path uses (``sources.read_file``, ``curate.Rules``, ``content_split.split_of``,
``tokenizer.HashSampler``, ``records.ShardWriter``); only the bookkeeping that a stream does by
remembering (keep-first dedup, shard numbering) is done here by grouping:

1. read and curate (``beam_curate.curated``): one task per input file, exact dedup by
   grouping on ``curate.exact_key``, quality and MinHash-LSH near dedup by grouping on band
   keys, PII scrub; the documents keep their place in the corpus ``(file, doc)``;
2. the curation report, summed from every step's counts (a dataset curation left empty is
   refused here, in ``prepare``'s words, before a tokenizer is trained or anything written
   but shards), content-hash split, the held-out fallback, the tokenizer sample (a combine
   over ``HashSampler``) and tokenizer training on one worker;
3. numbering: survivors per file are counted, the counts prefix-summed in file order, and each
   document's rank ``r`` puts it in shard ``r // docs_per_shard`` — the local path's layout;
4. one task per shard tokenizes and writes it (``group_size:1``); a last step writes the
   tokenizer and the manifest (``manifest.make``) with the curation report and problems.

Any runner works (``--runner=DataflowRunner|FlinkRunner|SparkRunner`` with that runner's own
flags; see docs/beam.md); the inputs and the output may be ``s3://`` or ``gs://`` folders, read
and written through jaxlm.storage (the manifest uploaded last). With the DirectRunner and a
local output, the work goes to a temporary folder renamed into place at the end, as
``prepare`` does, so the local cache finds it.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import ml_collections

from jaxlm import storage
from jaxlm.data import (
    beam_curate,
    cache,
    content_split,
    curate,
    prepare,
    records,
    sources,
    tokenizer,
)
from jaxlm.data import manifest as manifest_lib
from jaxlm.data.sources import DataError

SPLITS = manifest_lib.SPLITS
VALIDATION = "validation"


def _require_beam() -> Any:
    root = logging.getLogger()
    level = root.level
    # Importing Beam warns on the root logger that Google Cloud clients are missing, which
    # matters only for gs:// (where the import then fails with its own message).
    root.setLevel(logging.ERROR)
    try:
        import apache_beam as beam
    except ImportError:
        raise DataError("The Beam path needs Apache Beam: pip install 'jaxlm[beam]'.") from None
    finally:
        root.setLevel(level)
    return beam


def _sample_combine(cap: int) -> Any:
    """The tokenizer's ``HashSampler`` as a combine: the samples of parts merge exactly."""
    beam = _require_beam()

    class SampleFn(beam.CombineFn):
        def create_accumulator(self) -> tokenizer.HashSampler:
            return tokenizer.HashSampler(cap)

        def add_input(self, acc: tokenizer.HashSampler, text: str) -> tokenizer.HashSampler:
            acc.add(text, content_split.sample_priority(text))
            return acc

        def merge_accumulators(self, accs: Iterable[tokenizer.HashSampler]) -> Any:
            accs = list(accs)
            for other in accs[1:]:
                accs[0].merge(other)
            return accs[0]

        def extract_output(self, acc: tokenizer.HashSampler) -> list[str]:
            return acc.texts()

    return SampleFn()


def _train_tokenizer(sample: list[str], tok_cfg: dict[str, Any], curation: Any) -> bytes:
    del curation  # a side input only so that an empty dataset is refused before this runs
    if not sample:
        raise DataError("No training documents to train the tokenizer on; add data.")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tokenizer.model")
        tokenizer.train_tokenizer(sample, ml_collections.ConfigDict(tok_cfg), path)
        with open(path, "rb") as f:
            return f.read()


def _split_stats(doc: tuple[str, Any, str], val_fraction: float) -> tuple[str, tuple]:
    ds, order, text = doc
    if content_split.split_of(text, val_fraction) == "val":
        return ds, (0, 1, None)
    return ds, (1, 0, (content_split.split_hash(text), order))


def _sum_split_stats(parts: Iterable[tuple]) -> tuple:
    n_train = n_val = 0
    lowest = None
    for t, v, low in parts:
        n_train, n_val = n_train + t, n_val + v
        if low is not None and (lowest is None or low < lowest):
            lowest = low
    return n_train, n_val, lowest


def _moved(item: tuple[str, tuple]) -> tuple[str, Any]:
    ds, (n_train, n_val, lowest) = item
    return ds, (lowest[1] if content_split.needs_held_out_fallback(n_train, n_val) else None)


def _assign_split(
    doc: tuple[str, Any, str], val_fraction: float, moved: dict
) -> tuple[str, str, Any, str]:
    ds, order, text = doc
    split = "val" if moved.get(ds) == order else content_split.split_of(text, val_fraction)
    return ds, split, order, text


def _by_file(doc: tuple[str, str, Any, str]) -> tuple[tuple[str, str, int], tuple[int, str]]:
    ds, split, (file_no, doc_no), text = doc
    return (ds, split, file_no), (doc_no, text)


def _offsets(item: tuple[tuple[str, str], Iterable[tuple[int, int]]]) -> Iterator[Any]:
    (ds, split), counts = item
    offset = 0
    for file_no, n in sorted(counts):
        yield (ds, split, file_no), offset
        offset += n


def _ranked(item: tuple[tuple[str, str, int], Iterable[Any]], offsets: dict, dps: int) -> Iterator:
    key, docs = item
    ds, split, _ = key
    for i, (_, text) in enumerate(sorted(docs)):
        rank = offsets[key] + i
        yield (ds, split, rank // dps), (rank, text)


def _publish(local_root: str, rel: str, out_root: str) -> None:
    """Copies one written file to a bucket output through jaxlm.storage (each worker's own
    fsspec client: the same credentials, errors and retries as every other bucket access)."""
    with open(os.path.join(local_root, rel), "rb") as src:
        storage.write_bytes(storage.join(out_root, rel), src.read())


_TOKENIZERS: dict[str, Any] = {}  # per worker: the tokenizer, loaded once per content


def _load_tokenizer(model: bytes, tok_file: str) -> Any:
    digest = hashlib.sha256(model).hexdigest()
    if digest not in _TOKENIZERS:
        d = tempfile.mkdtemp(prefix="jaxlm-tok-")
        path = os.path.join(d, tok_file)
        with open(path, "wb") as f:
            f.write(model)
        _TOKENIZERS[digest] = tokenizer.load(path)
    return _TOKENIZERS[digest]


def _write_shard(
    item: tuple[tuple[str, str, int], Iterable[tuple[int, str]]],
    model: bytes,
    tok_file: str,
    out_root: str,
    dps: int,
) -> tuple[tuple[str, str], dict[str, Any]]:
    """Tokenizes one shard's documents in rank order and writes it; returns its ShardInfo."""
    (ds, split, index), docs = item
    tok = _load_tokenizer(model, tok_file)
    texts = [text for _, text in sorted(docs)]
    remote = storage.is_remote(out_root)
    root = tempfile.mkdtemp(prefix="jaxlm-shard-") if remote else out_root
    writer = records.ShardWriter(root, prepare.shard_pattern(split, ds), dps, stride=(index, 1))
    for text, (rec, ntok) in zip(texts, records.encode_batch(texts, tok), strict=True):
        writer.write(rec, ntok, beam_curate.nbytes(text))
    (info,) = writer.close()
    if remote:
        _publish(root, info.path, out_root)
        shutil.rmtree(root, ignore_errors=True)
    return (ds, split), info.to_dict()


def _val_gzip(val_docs: list[tuple[str, Any, str]]) -> dict[str, float | None]:
    """The gzip baseline of the held-out text, fed in the local path's order."""
    meters: dict[str, prepare.GzipMeter] = {}
    total = prepare.GzipMeter()
    for ds, _, text in sorted(val_docs):
        data = text.encode("utf-8", "surrogatepass")
        meters.setdefault(ds, prepare.GzipMeter()).add(data)
        total.add(data)
    out: dict[str, float | None] = {ds: m.bits_per_byte() for ds, m in meters.items()}
    out["all"] = total.bits_per_byte()
    return out


def _curation(
    _: Any,
    *,
    names: list[str],
    vnames: list[str],
    events: list[tuple[tuple, tuple[int, int]]],
    text_fields: dict[str, str],
    listed: dict[str, list[dict[str, Any]]],
    problems: list[tuple[str, dict[str, Any]]],
) -> tuple[dict[str, curate.CurationReport], dict[str, dict[str, int]]]:
    """Each dataset's curation report, and how many documents each validation set held out of
    each dataset, from the summed events; refuses a dataset curation left empty, as ``prepare``
    does, before a tokenizer is trained or a manifest written."""
    reports = {ds: curate.CurationReport() for ds in names}
    removed = {v: dict.fromkeys(names, 0) for v in vnames}
    for key, (docs, nbytes) in sorted(events):
        what, ds = key[0], key[1]
        rep = reports[ds]
        if what == "in":
            rep.documents_in, rep.bytes_in = docs, nbytes
        elif what == "out":
            rep.documents_out, rep.bytes_out = docs, nbytes
        elif what == "removed":
            rep.removed[key[2]] = {"documents": docs, "bytes": nbytes}
        elif what == "pii":
            rep.pii[key[2]] = docs
        else:  # reserved: a training document equal to one of a validation set's
            removed[key[2]][ds] = docs
    for ds in names:
        found = listed[ds] + [p for d, p in problems if d == ds]  # resolving's, then reading's
        prepare.check_not_empty(ds, reports[ds], found, text_fields[ds])
    return reports, removed


def _write_manifest(
    _: Any,
    *,
    plan: dict[str, Any],
    model: bytes,
    shards: list[tuple[tuple[str, str], dict[str, Any]]],
    curation: tuple[dict[str, curate.CurationReport], dict[str, dict[str, int]]],
    problems: list[tuple[str, dict[str, Any]]],
    val_docs: list[tuple[str, Any, str]],
) -> str:
    """The last step: tokenizer file and ``manifest.json``, the same fields ``prepare`` writes."""
    names, vnames = plan["datasets"], plan["validation"]
    by_split: dict[tuple[str, str], list] = collections.defaultdict(list)
    for key, info in shards:
        by_split[key].append(info)
    entry = lambda k: manifest_lib.split_entry(sorted(by_split[k], key=lambda s: s["path"]))  # noqa: E731
    datasets = {
        ds: {"weight": plan["weights"][ds], **{sp: entry((ds, sp)) for sp in SPLITS}}
        for ds in names
    }
    reports, removed = curation
    validation = {v: dict(entry((v, VALIDATION)), removed_from_training=removed[v]) for v in vnames}
    for ds in names:  # a runner that lost or duplicated an element must fail, not write
        written = sum(datasets[ds][sp]["documents"] for sp in SPLITS)
        if written != reports[ds].documents_out:
            raise DataError(
                f"dataset {ds!r}: curation kept {reports[ds].documents_out:,} documents but "
                f"{written:,} reached the shards; the runner lost or repeated elements, so no "
                "manifest was written; run again."
            )
    found: dict[str, list] = {ds: list(plan["problems"][ds]) for ds in names}
    for ds, p in problems:
        found[ds].append(p)
    out, tok_file = plan["output"], plan["tokenizer_file"]
    with tempfile.TemporaryDirectory() as d:
        tok_path = os.path.join(d, tok_file)
        with open(tok_path, "wb") as f:
            f.write(model)
        tok = tokenizer.load(tok_path)
        m = manifest_lib.make(
            key=plan["key"],
            tokenizer_file=tok_file,
            tokenizer_info=tok.info(),
            datasets=datasets,
            validation=validation,
            curation={ds: reports[ds].to_dict() for ds in names},
            problems={ds: sorted(found[ds], key=lambda p: (p["file"], p["kind"])) for ds in names},
            val_gzip_bits_per_byte=_val_gzip(val_docs),
            host={"engine": "beam", "runner": plan["runner"]},
            config=plan["config"],
        )
        if storage.is_remote(out):
            manifest_lib.write(d, m)
            _publish(d, tok_file, out)
            _publish(d, manifest_lib.FILE, out)  # last: a manifest means "complete"
        else:
            shutil.copyfile(tok_path, os.path.join(out, tok_file))
            manifest_lib.write(out, m)
    return storage.join(out, manifest_lib.FILE)


# --------------------------------------------------------------------------- the pipeline


def _sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    docs = nbytes = 0
    for d, b in pairs:
        docs, nbytes = docs + d, nbytes + b
    return docs, nbytes


def build(
    p: Any,
    plan: dict[str, Any],
    srcs: dict[str, sources.Source],
    model: bytes | None,
    validation_texts: dict[str, list[str]],
    reserved: dict[bytes, str],
) -> None:
    """Adds the preparation to the Beam pipeline ``p`` (see the module docstring)."""
    beam = _require_beam()
    val_fraction, dps = plan["val_fraction"], plan["docs_per_shard"]
    docs, events, problems = beam_curate.curated(p, plan, srcs, reserved)
    counts = events | "all events" >> beam.Flatten() | "count" >> beam.CombinePerKey(_sum_pairs)
    curation = beam.pvalue.AsSingleton(
        p
        | "once: report" >> beam.Create([None])
        | "curation report"
        >> beam.Map(
            _curation,
            names=plan["datasets"],
            vnames=plan["validation"],
            events=beam.pvalue.AsList(counts),
            text_fields={ds: src.text_field for ds, src in srcs.items()},
            listed=plan["problems"],
            problems=beam.pvalue.AsList(problems),
        )
    )

    if model is None:
        sample = (
            docs
            | "train docs"
            >> beam.Filter(lambda d: content_split.split_of(d[2], val_fraction) == "train")
            | "texts" >> beam.Map(lambda d: d[2])
            | "sample" >> beam.CombineGlobally(_sample_combine(plan["sample_bytes"]))
        )
        tok_model = sample | "train tokenizer" >> beam.Map(
            _train_tokenizer, plan["tokenizer"], curation
        )
    else:
        tok_model = p | "given tokenizer" >> beam.Create([model])
    tok_model = beam.pvalue.AsSingleton(tok_model)

    moved = (
        docs
        | "split stats" >> beam.Map(_split_stats, val_fraction)
        | "sum split stats" >> beam.CombinePerKey(_sum_split_stats)
        | "held-out fallback" >> beam.Map(_moved)
    )
    split = docs | "split" >> beam.Map(_assign_split, val_fraction, beam.pvalue.AsDict(moved))
    by_file = split | "by file" >> beam.Map(_by_file)
    offsets = (
        by_file
        | "ones" >> beam.Map(lambda kv: (kv[0], 1))
        | "per file" >> beam.CombinePerKey(sum)
        | "by split" >> beam.Map(lambda kv: ((kv[0][0], kv[0][1]), (kv[0][2], kv[1])))
        | "group files" >> beam.GroupByKey()
        | "prefix sums" >> beam.FlatMap(_offsets)
    )
    ranked = (
        by_file
        | "group file" >> beam.GroupByKey()
        | "rank" >> beam.FlatMap(_ranked, beam.pvalue.AsDict(offsets), dps)
    )
    vdocs = [
        ((v, VALIDATION, r // dps), (r, text))
        for v, texts in validation_texts.items()
        for r, text in enumerate(texts)
    ]
    shard_docs = (ranked, p | "validation docs" >> beam.Create(vdocs)) | beam.Flatten()
    shards = (
        shard_docs
        | "group shards" >> beam.GroupByKey()
        | "write shards"
        >> beam.Map(_write_shard, tok_model, plan["tokenizer_file"], plan["work_dir"], dps)
    )
    val_docs = (
        split
        | "val docs" >> beam.Filter(lambda d: d[1] == "val")
        | "val texts" >> beam.Map(lambda d: (d[0], d[2], d[3]))
    )
    _ = (
        p
        | "once: manifest" >> beam.Create([None])
        | "manifest"
        >> beam.Map(
            _write_manifest,
            plan=dict(plan, output=plan["work_dir"]),
            model=tok_model,
            shards=beam.pvalue.AsList(shards),
            curation=curation,
            problems=beam.pvalue.AsList(problems),
            val_docs=beam.pvalue.AsList(val_docs),
        )
    )


_DATA_ERROR = re.compile(r"DataError: (.+?)(?: \[while running '[^']*'\])?$", re.MULTILINE)


def _data_error(e: BaseException) -> DataError | None:
    """A DataError one of our steps raised, as one sentence again: runners report it inside
    another exception, with the worker's traceback as text and the step's name appended."""
    text = f"DataError: {e}" if isinstance(e, DataError) else str(e)
    found = _DATA_ERROR.findall(text)
    return DataError(found[-1]) if found else None


# The DirectRunner's multi_threading workers (apache-beam 2.77) send their output buffer from a
# timer thread every second (data_plane.TimeBasedBufferingClosableOutputStream): flush() reads
# the buffer, hands it on, then clears it, unsynchronised with the thread still writing elements
# into it, so an element written in between is dropped (or cut, failing the decode downstream).
# Reproduced with Beam alone: a 1 ms flush period cuts elements of a 20,000-element GroupByKey in
# 3 of 3 runs; with the timer out of reach, 3 of 3 are exact. multi_processing's workers flush
# by size only, so they never raced. Same in-process workers, timer pushed out of reach:
_NO_TIMED_FLUSH_MS = 10**12


def _safe_direct_runner(options: Any) -> Any:
    """The runner for ``options``: None (Beam picks it from the options), except for the
    DirectRunner's ``multi_threading`` mode, which becomes the same in-process workers without
    Beam's racy timed flush (see above); ``direct_num_workers`` still sets their number."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    direct = options.view_as(DirectOptions)
    name = options.view_as(StandardOptions).runner or "DirectRunner"
    if name not in ("DirectRunner", "direct") or direct.direct_running_mode != "multi_threading":
        return None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.transforms.environments import EmbeddedPythonGrpcEnvironment

    # FnApiRunner replaces the environment given here when the mode says multi_threading.
    direct.direct_running_mode = "in_memory"
    env = EmbeddedPythonGrpcEnvironment(data_buffer_time_limit_ms=_NO_TIMED_FLUSH_MS)
    return FnApiRunner(default_environment=env)


def prepare_beam(
    data_cfg: Any,
    tok_cfg: Any,
    pipeline_args: list[str],
    output: str = "",
    log: Any = None,
) -> str:
    """Prepares ``data_cfg.datasets`` with Beam; the result equals ``prepare.prepare``'s.

    Args:
      data_cfg, tok_cfg: ``config.data`` and ``config.tokenizer``, as for ``prepare``.
      pipeline_args: Beam pipeline options, e.g. ``['--runner=DirectRunner',
        '--direct_num_workers=2', '--direct_running_mode=multi_processing']``.
      output: where the shards and manifest go (a local folder, ``gs://`` or ``s3://``);
        default: the local cache folder ``prepare`` would use, so training finds the data.
      log: where progress lines go (default: print).

    Returns:
      The path of the written (or already complete, cached) ``manifest.json``.

    Raises:
      DataError: bad config or input, or Beam is not installed (one sentence, before any work).
    """
    if log is None:
        log = lambda s: print(s, flush=True)  # noqa: E731
    prepare.check_config(data_cfg, tok_cfg)
    ds_cfgs = prepare.dataset_configs(data_cfg)
    srcs, vsrcs = prepare.sources_of(data_cfg)
    key, material = prepare.cache_key(data_cfg, tok_cfg, srcs, vsrcs)
    out = storage.absolute(output) if output else None
    out = out or storage.join(sources.cache_root(data_cfg.cache_dir), key)
    if storage.isfile(storage.join(out, manifest_lib.FILE)):  # a manifest means "complete"
        if not storage.is_remote(out):
            cache.touch(os.path.join(out, manifest_lib.FILE))
        log(f"using prepared data at {out}")
        return storage.join(out, manifest_lib.FILE)

    # The named validation sets are small: read whole here, as the local path does.
    validation_texts, reserved = {}, {}
    for name, vsrc in vsrcs.items():
        validation_texts[name] = [doc["text"] for doc in vsrc]
        if not validation_texts[name]:
            raise DataError(
                f"validation set {name!r} ({vsrc.paths}) holds no documents; give it files "
                "with text."
            )
        for text in validation_texts[name]:
            reserved.setdefault(content_split.text_digest(text), name)
    model = None
    tok_file = "tokenizer.model"
    if tok_cfg.path:
        given = os.path.expanduser(tok_cfg.path)
        tok_file = "tokenizer.json" if tokenizer.is_tokenizer_json(given) else tok_file
        with open(given, "rb") as f:
            model = f.read()

    beam = _require_beam()  # after the checks: importing Beam takes seconds and logs lines
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(pipeline_args)
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    work = out
    if not storage.is_remote(out):
        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        work = os.path.join(parent, f".tmp-{os.path.basename(out)}-beam-{uuid.uuid4().hex[:8]}")
        os.makedirs(work)
    plan = {
        "key": key,
        "work_dir": work,
        "datasets": sorted(srcs),
        "validation": sorted(vsrcs),
        "weights": {n: float(c.get("weight", 1.0)) for n, c in ds_cfgs.items()},
        "presets": {n: c.get("quality_preset", None) for n, c in ds_cfgs.items()},
        "problems": {n: src.problems.to_list() for n, src in srcs.items()},
        "curation": data_cfg.curation.to_dict(),
        "tokenizer": tok_cfg.to_dict(),
        "tokenizer_file": tok_file,
        "sample_bytes": int(tok_cfg.sample_bytes),
        "val_fraction": float(data_cfg.val_fraction),
        "docs_per_shard": int(data_cfg.docs_per_shard),
        "runner": runner,
        "config": prepare.config_summary(material),
    }
    n_files = sum(len(s.files) for s in srcs.values())
    log(f"preparing {len(srcs)} dataset(s), {n_files:,} files with Beam ({runner}) -> {out}")
    try:
        try:
            with beam.Pipeline(runner=_safe_direct_runner(options), options=options) as p:
                build(p, plan, srcs, model, validation_texts, reserved)
        except Exception as e:
            found = _data_error(e)
            if found is None:
                raise
            raise found from None
        if work != out:
            prepare.publish(work, out, log)
    finally:
        if work != out and os.path.exists(work):
            shutil.rmtree(work, ignore_errors=True)
    log(f"prepared data at {out}")
    return storage.join(out, manifest_lib.FILE)
