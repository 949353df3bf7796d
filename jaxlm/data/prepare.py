"""Prepare: corpus files -> curated, split, tokenized ArrayRecord shards + ``manifest.json``.

``prepare(config.data, config.tokenizer)`` runs, per dataset:

1. resolve sources (a bad glob fails here, before any work);
2. stream documents through curation; each survivor goes to *val* if
   ``sha256(text) / 2**256 < val_fraction`` else *train* — stable under re-runs and under adding
   files — and is spilled to a temporary file; train documents are offered to a deterministic
   hash-ranked tokenizer sample and val text to a streaming gzip (the baseline bits-per-byte);
3. train the tokenizer on the sample (or load ``tokenizer.path``);
4. tokenize the spilled documents into ArrayRecord shards (see ``records``);
5. write ``manifest.json`` (the format is ``jaxlm.data.manifest``'s).

Named validation sets (``data.validation.<name>``: paths, text_field) are read whole, without
curation, and tokenized into ``validation/`` shards of their own. They are never trained on: a
training document whose text equals one of theirs is dropped before curation (counted in the
manifest's ``validation.<name>.removed_from_training``), so it reaches neither the training
split, the held-out split nor the tokenizer sample.

Caching: the output lives in ``<cache_root>/<key>/``, where the key hashes everything that
changes the output (dataset paths and file sizes/mtimes, Python version for ``stdlib``, the
curation, split, shard and tokenizer settings). A complete manifest means "done": the call
prints one line and returns. Work happens in a temporary directory renamed into place at the
end, so a killed run never leaves a cache that looks complete; the folder of a run killed too
hard to clean up (SIGKILL, SIGTERM) is removed by the next run on the same host.

The output depends on the corpus and the config only, never on how many processes prepared
it (nor on whether ``jaxlm.data.beam`` did): dedup is keep-first in file order over the whole
corpus, the split and the tokenizer sample are content hashes, and shard ``k`` of a split holds
its documents ``k*D .. (k+1)*D-1`` (``D = docs_per_shard``).

Multi-host: every host reads and curates every file (curation is the cheap stage; a corpus too
large for one machine to read goes through the Beam path instead), so each sees the same
documents. Host 0 trains the tokenizer and publishes ``<key>/tokenizer.model``; the other hosts
wait for it. Host ``i`` of ``n`` tokenizes shards ``i, i+n, ...`` into ``<key>/host-i-of-n/``
(tokenization is the expensive stage), and host 0 merges the per-host manifests into
``<key>/manifest.json``, which every host waits for and returns. This needs a shared filesystem.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from jaxlm import storage
from jaxlm.data import cache, content_split, curate, records, sources, tokenizer
from jaxlm.data import manifest as manifest_lib
from jaxlm.data.files import file_sha256, new_work_dir, remove_stale_work_dirs
from jaxlm.data.sources import DataError
from jaxlm.progress import Progress

PREP_VERSION = 5  # bump when a code change alters prepared output, to invalidate old caches
SPLITS = manifest_lib.SPLITS
WAIT_TIMEOUT_S = 6 * 3600  # how long a host waits for the others in multi-host preparation


def _move_to_val(spills: dict, name: str, text: str) -> None:
    """Moves one document from `name`'s train spill to its val spill (both still open)."""
    train = spills[name, "train"]
    train.close()
    kept = _Spill(train.path + ".keep")
    moved = False
    for doc in train:
        if not moved and doc == text:
            moved = True
            continue
        kept.write(doc)
    os.replace(kept.path, train.path)
    kept.path = train.path
    spills[name, "train"] = kept
    spills[name, "val"].write(text)


class _Spill:
    """Length-prefixed UTF-8 documents in a temporary file: curated once, tokenized later."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 -- closed in close()

    def write(self, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        self._f.write(struct.pack("<Q", len(data)))
        self._f.write(data)

    def close(self) -> None:
        self._f.close()

    def __iter__(self) -> Iterator[str]:
        with open(self.path, "rb") as f:
            while header := f.read(8):
                (n,) = struct.unpack("<Q", header)
                yield f.read(n).decode("utf-8", "surrogatepass")


class GzipMeter:
    """Compressed size of a text stream under ``gzip -9``, without holding the text."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits=31: gzip framing
        self.raw = self.compressed = 0

    def add(self, data: bytes) -> None:
        self.raw += len(data)
        self.compressed += len(self._z.compress(data))

    def bits_per_byte(self) -> float | None:
        self.compressed += len(self._z.flush())
        self._z = zlib.compressobj(9, zlib.DEFLATED, 31)
        return 8.0 * self.compressed / self.raw if self.raw else None


def check_not_empty(
    name: str,
    report: curate.CurationReport,
    problems: list[dict[str, Any]] | None = None,
    text_field: str = "text",
) -> None:
    """Refuses a dataset that curation left without documents, in one sentence that says why
    (no manifest is written, so the sentence carries the input problems itself).

    Args:
      name: the dataset.
      report: its curation report.
      problems: its input problems (``Problems.to_list()``), when known.
      text_field: the JSONL key / Parquet column the dataset reads.
    """
    if report.documents_out:
        return
    problems = problems or []
    missing = [p for p in problems if p["kind"] in ("missing_field", "missing_column")]
    if report.documents_in == 0 and missing:
        has = [e.split("; has ", 1)[1] for e in missing[0]["examples"] if "; has " in e]
        raise DataError(
            f"Dataset {name!r} has no documents: the records of {missing[0]['file']} have no "
            f"string field {text_field!r} (the first has {has[0] if has else 'other fields'}); "
            f"set config.data.datasets.{name}.text_field to the field that holds the text."
        )
    kinds = collections.Counter()
    for p in problems:
        kinds[p["kind"]] += p["count"]
    found = "".join(f"; {n:,} {kind}" for kind, n in sorted(kinds.items()))
    raise DataError(
        f"Dataset {name!r} has no documents left after reading and curation "
        f"({report.documents_in:,} read{found}); check its paths and the curation thresholds."
    )


def dataset_configs(data_cfg: Any) -> dict[str, Any]:
    """``data.datasets`` by name, sorted; DataError when there is none."""
    ds = dict(data_cfg.datasets.items()) if data_cfg.get("datasets") else {}
    if not ds:
        raise DataError("config.data.datasets is empty; name at least one dataset to prepare.")
    return {name: ds[name] for name in sorted(ds)}


def validation_configs(data_cfg: Any) -> dict[str, Any]:
    """``data.validation`` (the named validation sets) by name, sorted."""
    sets = dict(data_cfg.validation.items()) if data_cfg.get("validation") else {}
    return {name: sets[name] for name in sorted(sets)}


def sources_of(data_cfg: Any) -> tuple[dict, dict]:
    """The training datasets' and the validation sets' `sources.Source`s, by name."""
    srcs = {
        name: sources.Source(
            cfg.paths,
            text_field=cfg.get("text_field", "text"),
            split=cfg.get("split", "file"),
            max_document_bytes=max_document_bytes(data_cfg),
        )
        for name, cfg in dataset_configs(data_cfg).items()
    }
    vsrcs = {
        name: sources.Source(
            cfg.paths,
            text_field=cfg.get("text_field", "text"),
            max_document_bytes=max_document_bytes(data_cfg),
        )
        for name, cfg in validation_configs(data_cfg).items()
    }
    return srcs, vsrcs


def max_document_bytes(data_cfg: Any) -> int:
    """``data.max_document_bytes``; DataError unless it is a whole number of bytes >= 1."""
    value = data_cfg.get("max_document_bytes", sources.MAX_DOCUMENT_BYTES)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(
            f"config.data.max_document_bytes={value!r} must be a whole number of bytes >= 1 "
            f"(default {sources.MAX_DOCUMENT_BYTES:,})."
        )
    return value


def check_config(data_cfg: Any, tok_cfg: Any) -> None:
    """Refuses a bad data or tokenizer config with one sentence, before any work."""
    if not 0.0 <= float(data_cfg.val_fraction) < 1.0:
        raise DataError(f"config.data.val_fraction={data_cfg.val_fraction} must be in [0, 1).")
    if int(data_cfg.docs_per_shard) < 1:
        raise DataError(f"config.data.docs_per_shard={data_cfg.docs_per_shard} must be >= 1.")
    max_document_bytes(data_cfg)
    if tok_cfg.path and not os.path.isfile(os.path.expanduser(tok_cfg.path)):
        raise DataError(f"config.tokenizer.path={tok_cfg.path!r} does not exist.")
    if tok_cfg.path:
        # Load the user's file now: a corrupt one fails before curation, and its error names
        # that file rather than the copy in the temporary folder that is tokenized from later.
        tokenizer.load(os.path.expanduser(tok_cfg.path))
    for name, cfg in dataset_configs(data_cfg).items():
        try:
            sources.check_split(cfg.get("split", "file"))
        except DataError as e:
            raise DataError(f"config.data.datasets.{name}.{e}") from None
    try:
        tokenizer.trainer_options(tok_cfg)  # a bad model_type fails now, not after curation
        for cfg in dataset_configs(data_cfg).values():  # so does a bad quality preset
            curate.thresholds(data_cfg.curation.quality, cfg.get("quality_preset", None))
    except ValueError as e:
        raise DataError(str(e)) from None


def cache_key(
    data_cfg: Any,
    tok_cfg: Any,
    srcs: dict[str, sources.Source],
    validation: dict[str, sources.Source] | None = None,
) -> tuple[str, dict[str, Any]]:
    """A short hash of everything that affects the prepared output, and what it hashed. The
    process count is not in it: any number of processes (or Beam) prepares the same output."""
    tok = {k: v for k, v in tok_cfg.to_dict().items() if k != "path"}
    if tok_cfg.path:
        tok = {"file_sha256": file_sha256(os.path.expanduser(tok_cfg.path))}
    material = {
        "prep_version": PREP_VERSION,
        "datasets": {
            name: {
                "paths": src.paths,
                "text_field": src.text_field,
                "split": src.split,
                "quality_preset": data_cfg.datasets[name].get("quality_preset", None),
                "max_document_bytes": src.max_document_bytes,
                "files": src.fingerprint(),
            }
            for name, src in srcs.items()
        },
        "val_fraction": float(data_cfg.val_fraction),
        "docs_per_shard": int(data_cfg.docs_per_shard),
        "curation": data_cfg.curation.to_dict(),
        "tokenizer": tok,
    }
    if validation:  # only when set, so caches prepared before validation sets existed stay valid
        material["validation"] = {
            name: {
                "paths": src.paths,
                "text_field": src.text_field,
                "max_document_bytes": src.max_document_bytes,
                "files": src.fingerprint(),
            }
            for name, src in validation.items()
        }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:16], material


def _wait_for(path: str, what: str, log: Callable[[str], None]) -> None:
    if os.path.exists(path):
        return
    log(f"waiting for {what} ({path}) ...")
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise DataError(f"Timed out after {WAIT_TIMEOUT_S} s waiting for {path} ({what}).")
        time.sleep(1.0)


def prepare(
    data_cfg: Any,
    tok_cfg: Any,
    *,
    process_index: int = 0,
    process_count: int = 1,
    log: Callable[[str], None] | None = None,
) -> str:
    """Prepares (or finds in the cache) the tokenized shards of ``data_cfg.datasets``.

    Args:
      data_cfg: ``config.data`` (datasets, cache_dir, val_fraction, num_proc, docs_per_shard,
        curation).
      tok_cfg: ``config.tokenizer`` (path, model_type, vocab_size, sample_bytes, byte_fallback,
        code_safe).
      process_index, process_count: this host's share of the shards to tokenize.
      log: where progress lines go (default: print to stdout).

    Returns:
      Path of the complete ``manifest.json``.

    Raises:
      DataError: bad config or input (one sentence), raised before expensive work where possible.
    """
    if log is None:
        log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    check_config(data_cfg, tok_cfg)
    ds_cfgs = dataset_configs(data_cfg)
    # Every host curates every file, so dedup, the split and the tokenizer sample are global
    # and the output does not depend on the process count; the hosts divide the tokenization.
    # Every host reads every validation set whole (they are small) and writes the same shards.
    srcs, vsrcs = sources_of(data_cfg)
    key, material = cache_key(data_cfg, tok_cfg, srcs, vsrcs)
    root = sources.cache_root(data_cfg.cache_dir)
    if storage.is_remote(root):
        return _through_bucket(data_cfg, tok_cfg, storage.join(root, key), process_count, log)
    key_dir = os.path.join(root, key)
    final_manifest = os.path.join(key_dir, manifest_lib.FILE)
    if os.path.exists(final_manifest):
        weights = {name: float(cfg.get("weight", 1.0)) for name, cfg in ds_cfgs.items()}
        manifest_lib.set_weights(final_manifest, weights)
        cache.touch(final_manifest)  # its last use, for tools/prepare_data.py --list/--prune
        log(f"using prepared data at {key_dir}")
        return final_manifest

    job = _Job(
        ds_cfgs, srcs, vsrcs, data_cfg, tok_cfg, key, material, process_index, process_count, log
    )
    if not os.path.exists(os.path.join(job.out_dir, manifest_lib.FILE)):
        n_files = sum(len(s.files) for s in srcs.values())
        log(f"preparing {len(srcs)} dataset(s), {n_files:,} files -> {job.out_dir}")
        _prepare_host(job)
    if process_count > 1:
        host_manifests = [
            os.path.join(key_dir, _host_dir(i, process_count), manifest_lib.FILE)
            for i in range(process_count)
        ]
        if process_index == 0:
            for i, p in enumerate(host_manifests):
                _wait_for(p, f"host {i}'s shards", log)
            manifest_lib.write(final_manifest, manifest_lib.merge(host_manifests, out_dir=key_dir))
        _wait_for(final_manifest, "host 0 to merge the manifests", log)
    log(f"prepared data at {key_dir} in {time.perf_counter() - t0:.1f} s")
    return final_manifest


def _through_bucket(
    data_cfg: Any, tok_cfg: Any, remote: str, process_count: int, log: Callable[[str], None]
) -> str:
    """A preparation cached in a bucket: downloaded into a local copy (under
    storage.local_root()/prepared, size-bounded by cache.fit) when the bucket holds it whole,
    else prepared there and published to the bucket with its manifest uploaded last, so a
    reader never trusts a partial upload. ArrayRecord's reader needs local files, hence the
    local copy."""
    if process_count > 1:
        raise DataError(
            f"the prepared-data cache {remote} is a bucket, which one process fills; prepare it "
            "first with tools/prepare_data.py, then start the run."
        )
    local_root = os.path.join(storage.local_root(), "prepared")
    local = os.path.join(local_root, os.path.basename(remote))
    if not os.path.exists(os.path.join(local, manifest_lib.FILE)):
        if storage.fetch_dir(remote, local, marker=manifest_lib.FILE):
            log(f"downloaded prepared data from {remote}")
    local_cfg = copy.deepcopy(data_cfg)
    local_cfg.cache_dir = local_root
    manifest_path = prepare(local_cfg, tok_cfg, log=log)  # finds the download, or prepares
    if not storage.is_published(remote, marker=manifest_lib.FILE):
        storage.publish_dir(local, remote, marker=manifest_lib.FILE)
        log(f"published prepared data to {remote}")
    cache.fit(local_root, cache.local_copy_bytes(), keep=local)
    return manifest_path


def local_manifest(path: str) -> str:
    """`path` (a manifest, or its directory) when local; for a bucket path, the manifest of a
    local copy of its preparation, downloaded once into storage.local_root()/prepared."""
    if not storage.is_remote(path):
        return path
    remote = path[: -len(manifest_lib.FILE) - 1] if path.endswith(manifest_lib.FILE) else path
    local_root = os.path.join(storage.local_root(), "prepared")
    local = storage.local_copy_dir("prepared", remote)
    if not os.path.exists(os.path.join(local, manifest_lib.FILE)):
        if not storage.fetch_dir(remote, local, marker=manifest_lib.FILE):
            raise DataError(
                f"{path} is not a complete preparation (it has no {manifest_lib.FILE})."
            )
    cache.fit(local_root, cache.local_copy_bytes(), keep=local)
    return os.path.join(local, manifest_lib.FILE)


def _host_dir(process_index: int, process_count: int) -> str:
    return f"host-{process_index}-of-{process_count}"


@dataclasses.dataclass
class _Job:
    """One host's preparation: its inputs, settings, and where the result goes."""

    ds_cfgs: dict[str, Any]
    srcs: dict[str, sources.Source]
    vsrcs: dict[str, sources.Source]  # the named validation sets
    data_cfg: Any
    tok_cfg: Any
    key: str
    material: dict[str, Any]
    process_index: int
    process_count: int
    log: Callable[[str], None]

    @property
    def out_dir(self) -> str:
        key_dir = os.path.join(sources.cache_root(self.data_cfg.cache_dir), self.key)
        if self.process_count == 1:
            return key_dir
        return os.path.join(key_dir, _host_dir(self.process_index, self.process_count))


def _prepare_host(job: _Job) -> None:
    """Curate, split, train/load the tokenizer, tokenize, and publish ``out_dir`` atomically."""
    out_dir = job.out_dir
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    for stale in remove_stale_work_dirs(parent, os.path.basename(out_dir)):
        job.log(f"removed {stale}, left by a killed preparation")
    tmp = new_work_dir(parent, os.path.basename(out_dir))
    os.makedirs(os.path.join(tmp, "spill"))
    try:
        manifest = _build(job, tmp)
        shutil.rmtree(os.path.join(tmp, "spill"))
        manifest_lib.write(tmp, manifest)
        publish(tmp, out_dir, job.log)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: str, out_dir: str, log: Callable[[str], None]) -> None:
    """Moves a finished preparation from `tmp` to `out_dir` in one rename, unless another process
    published a complete one there first (then `tmp` is left for the caller to remove)."""
    if os.path.exists(out_dir):
        if os.path.exists(os.path.join(out_dir, manifest_lib.FILE)):
            log(f"another process finished {out_dir} first; using it")
            return
        shutil.rmtree(out_dir)  # an incomplete leftover; it never had a manifest
    os.rename(tmp, out_dir)


def _build(job: _Job, tmp: str) -> dict[str, Any]:
    """Does the work in ``tmp`` and returns the manifest."""
    data_cfg, tok_cfg, log = job.data_cfg, job.tok_cfg, job.log
    srcs, ds_cfgs = job.srcs, job.ds_cfgs
    process_index, process_count = job.process_index, job.process_count
    val_fraction = float(data_cfg.val_fraction)
    sampler = tokenizer.HashSampler(int(tok_cfg.sample_bytes))
    gz_all = GzipMeter()
    gz: dict[str, GzipMeter] = {}
    spills: dict[tuple[str, str], _Spill] = {}
    reports: dict[str, dict[str, Any]] = {}

    # 0. the validation sets, whole: their texts are what training must never see.
    reserved: dict[bytes, str] = {}  # text digest -> validation set
    removed = {name: dict.fromkeys(srcs, 0) for name in job.vsrcs}
    for name, vsrc in job.vsrcs.items():
        spills[name, "validation"] = _Spill(os.path.join(tmp, "spill", f"{name}-validation.bin"))
        for doc in vsrc:
            spills[name, "validation"].write(doc["text"])
            reserved.setdefault(content_split.text_digest(doc["text"]), name)
        spills[name, "validation"].close()
        if vsrc.documents == 0:
            raise DataError(
                f"validation set {name!r} ({vsrc.paths}) holds no documents; give it files "
                "with text."
            )
        log(f"[validation] {name}: {vsrc.documents:,} documents from {len(vsrc.files):,} files")

    # 1. read + curate + split, one streaming pass per dataset.
    for step, (name, src) in enumerate(srcs.items(), 1):
        t = time.perf_counter()
        preset = ds_cfgs[name].get("quality_preset", None)
        curator = curate.Curator(data_cfg.curation, preset)
        gz[name] = GzipMeter()
        for split in SPLITS:
            spills[name, split] = _Spill(os.path.join(tmp, "spill", f"{name}-{split}.bin"))
        counts = dict.fromkeys(SPLITS, 0)
        lowest: tuple[int, str] | None = None  # the train document nearest to the val cut
        progress = Progress(f"curate {name}", unit="MB", scale=1e6, counts=("docs",))
        rep = curator.report
        for doc in src:
            held_by = reserved.get(content_split.text_digest(doc["text"])) if reserved else None
            if held_by is not None:  # a validation document: never trained on
                removed[held_by][name] += 1
                continue
            seen = (rep.documents_in, rep.bytes_in)
            out = curator.process(doc)
            progress.update(rep.bytes_in - seen[1], docs=rep.documents_in - seen[0])
            if out is None:
                continue
            text = out["text"]
            split = content_split.split_of(text, val_fraction)
            spills[name, split].write(text)
            counts[split] += 1
            if split == "train":
                sampler.add(text, content_split.sample_priority(text))
                if val_fraction > 0 and (
                    lowest is None or content_split.split_hash(text) < lowest[0]
                ):
                    lowest = (content_split.split_hash(text), text)
            else:
                data = text.encode("utf-8", "surrogatepass")
                gz[name].add(data)
                gz_all.add(data)
        if (
            content_split.needs_held_out_fallback(counts["train"], counts["val"])
            and lowest is not None
        ):
            # A small corpus (one book cut into a few dozen pieces) can miss the val cut by
            # chance; hold out the one document closest to it, so every such dataset is
            # evaluated. (The tokenizer sample may have seen it: only when one is trained.)
            _move_to_val(spills, name, lowest[1])
            data = lowest[1].encode("utf-8", "surrogatepass")
            gz[name].add(data)
            gz_all.add(data)
            counts["train"], counts["val"] = counts["train"] - 1, 1
        for split in SPLITS:
            spills[name, split].close()
        progress.finish(final_line=False)
        reports[name] = rep.to_dict()
        dt = time.perf_counter() - t
        log(
            f"[curate {step}/{len(srcs)}] {name}: {len(src.files):,} files, "
            f"{rep.bytes_in / 1e6:.1f} MB in {dt:.1f} s ({rep.bytes_in / 1e6 / max(dt, 1e-9):.1f}"
            f" MB/s); train {counts['train']:,} docs, val {counts['val']:,} docs"
        )
        log(rep.table(f"curation of {name}"))
        # Before the problems line: that line points at a manifest, which an empty dataset
        # never gets; the error carries its problems itself.
        check_not_empty(name, rep, src.problems.to_list(), src.text_field)
        if len(src.problems):
            kinds = sorted({p["kind"] for p in src.problems.to_list()})
            log(
                f"  input problems: {src.problems.count():,} ({', '.join(kinds)}) in "
                f"{len({p['file'] for p in src.problems.to_list()}):,} files; see the manifest"
            )

    # 2. tokenizer: load, wait for host 0's, or train on the sample.
    t = time.perf_counter()
    given = os.path.expanduser(tok_cfg.path) if tok_cfg.path else ""
    # Named by content, as tokenizer.load reads it: a tokenizer.json under another name stays one.
    is_json = bool(given) and tokenizer.is_tokenizer_json(given)
    tok_file = "tokenizer.json" if is_json else "tokenizer.model"
    tok_path = os.path.join(tmp, tok_file)
    shared = os.path.join(os.path.dirname(job.out_dir), tok_file)
    if given:
        shutil.copyfile(given, tok_path)
        how = f"loaded {tok_cfg.path}"
    elif process_count > 1 and process_index != 0:
        _wait_for(shared, "host 0's tokenizer", log)
        shutil.copyfile(shared, tok_path)
        how = f"loaded host 0's {shared}"
    else:
        sample = sampler.texts()
        if not sample:
            raise DataError("No training documents to train the tokenizer on; add data.")
        try:
            tokenizer.train_tokenizer(sample, tok_cfg, tok_path)
        except ValueError as e:
            raise DataError(str(e)) from None
        how = (
            f"trained {tok_cfg.model_type} vocab {tok_cfg.vocab_size} on a "
            f"{sampler.bytes / 1e6:.1f} MB sample"
        )
        if process_count > 1:
            shutil.copyfile(tok_path, shared + ".tmp")
            os.replace(shared + ".tmp", shared)
    tok = tokenizer.load(tok_path)
    log(
        f"[tokenizer] {how} in {time.perf_counter() - t:.1f} s: vocab {tok.vocab_size}, "
        f"sha256 {tok.sha256[:12]}"
    )

    # 3. tokenize the spilled documents into shards, one worker pool for all of them.
    # Shard k of a split holds its documents k*D .. (k+1)*D-1 (D = docs_per_shard), whoever
    # writes it: host i writes shards i, i+n, ... of every split.
    dps = int(data_cfg.docs_per_shard)
    datasets: dict[str, Any] = {}
    with records.Encoder(tok_path, int(data_cfg.num_proc)) as encoder:
        for name in srcs:
            datasets[name] = {"weight": float(ds_cfgs[name].get("weight", 1.0))}
            for split in SPLITS:
                shards, _ = encoder.write_shards(
                    _my_shards(spills[name, split], dps, process_index, process_count),
                    tmp,
                    shard_pattern(split, name),
                    dps,
                    label=f"tokenize {name}/{split}",
                    stride=(process_index, process_count),
                )
                datasets[name][split] = manifest_lib.split_entry(s.to_dict() for s in shards)
        validation: dict[str, Any] = {}
        for name in job.vsrcs:
            shards, _ = encoder.write_shards(
                _my_shards(spills[name, "validation"], dps, process_index, process_count),
                tmp,
                shard_pattern("validation", name),
                dps,
                label=f"tokenize validation {name}",
                stride=(process_index, process_count),
            )
            validation[name] = manifest_lib.split_entry(s.to_dict() for s in shards)
            validation[name]["removed_from_training"] = removed[name]
            if sum(removed[name].values()):
                log(
                    f"[validation] {name}: {sum(removed[name].values()):,} identical documents "
                    f"removed from training ({removed[name]})"
                )

    bpb = {name: m.bits_per_byte() for name, m in gz.items()}
    bpb["all"] = gz_all.bits_per_byte()
    return manifest_lib.make(
        key=job.key,
        tokenizer_file=tok_file,
        tokenizer_info=tok.info(),
        datasets=datasets,
        validation=validation,
        curation=reports,
        problems={name: src.problems.to_list() for name, src in srcs.items()},
        val_gzip_bits_per_byte=bpb,
        host={"process_index": process_index, "process_count": process_count},
        config=config_summary(job.material),
    )


def shard_pattern(split: str, name: str) -> str:
    """Shard file names of one split of one dataset (``split`` may be 'validation')."""
    return f"{split}/{name}-{{index:05d}}.array_record"


def _my_shards(texts: Iterator[str], dps: int, index: int, count: int) -> Iterator[str]:
    """The documents of shards ``index, index+count, ...`` (``dps`` documents per shard)."""
    for r, text in enumerate(texts):
        if (r // dps) % count == index:
            yield text


def config_summary(material: dict[str, Any]) -> dict[str, Any]:
    """The key material for the manifest, with file lists reduced to counts (they can be huge)."""
    out = json.loads(json.dumps(material, default=str))
    for ds in out["datasets"].values():
        ds["files"] = sum(1 for f in ds["files"] if isinstance(f, list))
    out["python"] = sys.version
    return out
