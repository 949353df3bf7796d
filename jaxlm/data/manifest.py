"""The manifest: the one module that reads, verifies, writes and merges ``manifest.json``.

A manifest sits beside the ArrayRecord shards ``prepare`` writes and describes them::

  version                 VERSION
  key                     the cache key (``prepare.cache_key``) the folder is named after
  tokenizer               {file, sha256, vocab_size, bos_id, eos_id, pad_id}; ``file`` lies
                          beside the manifest and ``sha256`` is that file's hash
  datasets.<name>         {weight, train: SPLIT, val: SPLIT}
    SPLIT                 {shards: [{path, documents, tokens, bytes, sha256}], documents,
                          tokens, bytes}; shard paths are relative to the manifest's folder,
                          tokens include each document's EOS, bytes are UTF-8 text
  validation.<name>       a named validation set (``data.validation``): SPLIT, plus
                          removed_from_training {dataset: documents dropped from it because
                          their text equals one of the set's}; absent in older manifests
  curation.<name>         the curation report (``curate.CurationReport.to_dict``)
  problems.<name>         input problems (``sources.Problems.to_list``)
  val_gzip_bits_per_byte  {<name>: float, all: float}: the gzip baseline of the held-out text
  host | hosts            who wrote it: one host's {process_index, process_count}, or the
                          per-host folders a merged manifest was combined from
  config                  a summary of what the cache key hashed

:func:`load` is how every stage opens one, and it always checks the tokenizer file beside the
manifest against the recorded hash (DESIGN: a stage refuses records whose tokenizer hash does
not match), so a swapped tokenizer is refused before any training step. The loaded dict carries
one extra key, ``root``: the manifest's folder, which shard and tokenizer paths are relative to.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from typing import Any

from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.files import file_sha256, write_json
from jaxlm.data.sources import DataError

VERSION = 1
FILE = "manifest.json"
SPLITS = ("train", "val")
_COUNTS = ("documents", "tokens", "bytes")


def path_of(path: str) -> str:
    """The ``manifest.json`` path for a manifest path or the folder holding it."""
    return os.path.join(path, FILE) if os.path.isdir(path) else path


def _read(path: str) -> dict[str, Any]:
    """The manifest's JSON as written (no ``root``), with its shape checked; one-sentence errors."""
    path = path_of(path)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise DataError(f"manifest {path} does not exist; run prepare or fix the path.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e).splitlines()[0]
        raise DataError(f"manifest {path} cannot be read ({reason}); re-run prepare.") from None
    if not isinstance(m, dict) or not isinstance(m.get("datasets"), dict):
        raise DataError(f"{path} is not a jaxlm manifest (it has no 'datasets'); re-run prepare.")
    tok = m.get("tokenizer")
    if not isinstance(tok, dict) or not {"file", "sha256"} <= set(tok):
        raise DataError(
            f"{path} names no tokenizer file and hash, so its records cannot be checked; "
            "re-run prepare."
        )
    if m.get("version", VERSION) != VERSION:
        raise DataError(
            f"{path} is manifest version {m['version']} but this jaxlm reads version {VERSION}; "
            "re-run prepare."
        )
    return m


def verify(m: dict[str, Any], tok: Any = None, check_shards: bool = False) -> None:
    """Checks that a loaded manifest's tokenizer (and optionally its shards) are what it says.

    Args:
      m: a manifest from :func:`load` (it needs ``root``).
      tok: a loaded tokenizer that is about to read or write this data, if any.
      check_shards: also hash every shard (slow on a large corpus: it reads every byte).

    Raises:
      TokenizerMismatch: ``tok``, or the tokenizer file beside the manifest, is not the
        tokenizer the shards were written with.
      DataError: that file is missing, or (``check_shards``) a shard's bytes changed.
    """
    root = m["root"]
    want = m["tokenizer"]["sha256"]
    if tok is not None:
        tokenizer_lib.check_same(
            tok.sha256,
            want,
            tok.path,
            f"the data at {root} was tokenized with",
            "re-run prepare or use the tokenizer file next to the manifest",
        )
    tok_file = tokenizer_path(m)
    if not os.path.isfile(tok_file):
        raise DataError(
            f"{tok_file}, the tokenizer the data at {root} was written with, is missing; "
            "copy the prepared-data folder whole, or delete it and prepare again."
        )
    tokenizer_lib.check_same(
        file_sha256(tok_file),
        want,
        tok_file,
        f"the data at {root} was written with (its manifest records it)",
        f"put that tokenizer back, or delete {root} and prepare again",
    )
    if check_shards:
        entries = [(n, ds[split]) for n, ds in m["datasets"].items() for split in SPLITS]
        entries += list(m.get("validation", {}).items())
        for name, entry in entries:
            for shard in entry["shards"]:
                if file_sha256(os.path.join(root, shard["path"])) != shard["sha256"]:
                    raise DataError(
                        f"Shard {shard['path']} of dataset {name!r} does not match its "
                        f"manifest (written by another run or tokenizer); delete {root} and "
                        "prepare again."
                    )


def load(path: str, tok: Any = None, check_shards: bool = False) -> dict[str, Any]:
    """Reads and verifies a manifest; the only way jaxlm opens one.

    Args:
      path: a ``manifest.json`` or the folder holding it.
      tok, check_shards: see :func:`verify`; the tokenizer file's hash is checked always.

    Returns:
      The manifest, plus ``root``: its folder as an absolute path.

    Raises:
      DataError, TokenizerMismatch: the manifest is missing or malformed, or :func:`verify`
        refuses it.
    """
    m = _read(path)
    m["root"] = os.path.dirname(os.path.abspath(path_of(path)))
    verify(m, tok, check_shards)
    return m


def tokenizer_path(m: dict[str, Any]) -> str:
    """Absolute path of the tokenizer file of a loaded manifest."""
    return os.path.join(m["root"], m["tokenizer"]["file"])


def split_info(m: dict[str, Any], dataset: str, split: str) -> dict[str, Any]:
    """The SPLIT entry of ``dataset``'s ``split`` (train | val), or of the validation set named
    ``dataset`` when ``split`` is ``validation``."""
    if split == "validation":
        return m.get("validation", {})[dataset]
    return m["datasets"][dataset][split]


def validation_sets(m: dict[str, Any]) -> list[str]:
    """The names of a manifest's validation sets, sorted."""
    return sorted(m.get("validation", {}))


def shard_paths(m: dict[str, Any], dataset: str, split: str) -> list[str]:
    """Absolute paths of one dataset's non-empty shards for ``split`` (train | val |
    validation; see :func:`split_info`)."""
    shards = split_info(m, dataset, split)["shards"]
    return [os.path.join(m["root"], s["path"]) for s in shards if s["documents"] > 0]


def split_entry(shards: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A ``datasets.<name>.<split>`` entry: the shards (``ShardInfo.to_dict()``) and their sums."""
    entry: dict[str, Any] = {"shards": list(shards)}
    for k in _COUNTS:
        entry[k] = sum(s[k] for s in entry["shards"])
    return entry


def make(
    *,
    key: str,
    tokenizer_file: str,
    tokenizer_info: dict[str, Any],
    datasets: dict[str, Any],
    curation: dict[str, Any],
    validation: dict[str, Any] | None = None,
    problems: dict[str, list],
    val_gzip_bits_per_byte: dict[str, float | None],
    host: dict[str, int],
    config: dict[str, Any],
) -> dict[str, Any]:
    """A new manifest (see the module docstring for what each field holds)."""
    return {
        "version": VERSION,
        "key": key,
        "tokenizer": {"file": tokenizer_file, **tokenizer_info},
        "datasets": datasets,
        "validation": validation or {},
        "curation": curation,
        "problems": problems,
        "val_gzip_bits_per_byte": val_gzip_bits_per_byte,
        "host": host,
        "config": config,
    }


def content(m: dict[str, Any]) -> dict[str, Any]:
    """What a manifest says about the data, leaving out who wrote it and where: the tokenizer,
    every shard's file name, counts and sha256, the curation reports and problems. Equal for
    any process count and for the Beam path (``tests/test_beam.py``)."""

    def shards(entry: dict[str, Any]) -> list[tuple]:
        return [
            (os.path.basename(s["path"]), s["documents"], s["tokens"], s["bytes"], s["sha256"])
            for s in entry["shards"]
        ]

    return {
        "key": m["key"],
        "tokenizer": m["tokenizer"],
        "datasets": {
            n: {"weight": ds["weight"], **{sp: shards(ds[sp]) for sp in SPLITS}}
            for n, ds in m["datasets"].items()
        },
        "validation": {
            n: (shards(v), v.get("removed_from_training"))
            for n, v in m.get("validation", {}).items()
        },
        "curation": m["curation"],
        "problems": m["problems"],
        "val_gzip_bits_per_byte": m["val_gzip_bits_per_byte"],
    }


def write(path: str, m: dict[str, Any]) -> None:
    """Writes a manifest atomically (a reader never sees half a file); ``root`` is not stored."""
    write_json(path_of(path), {k: v for k, v in m.items() if k != "root"})


def set_weights(path: str, weights: dict[str, float]) -> None:
    """Refreshes the mixture weights of a written manifest in place.

    Weights do not change the shards, so a cached preparation serves any weights; only names
    the manifest already has are updated.
    """
    m = _read(path)
    if any(m["datasets"].get(n, {}).get("weight") != w for n, w in weights.items()):
        for n, w in weights.items():
            if n in m["datasets"]:
                m["datasets"][n]["weight"] = w
        write(path, m)


def merge(paths: list[str], out_dir: str | None = None) -> dict[str, Any]:
    """Combines per-host manifests into one whose shard paths are relative to ``out_dir``.

    Every host curated the whole corpus (``prepare``), so the curation report, problems and
    gzip baseline are host 0's; each host wrote some of the shards, which are put back in order
    (shard names end in their number within the split).

    Args:
      paths: the hosts' ``manifest.json`` files, host 0's first (each verified as it is loaded).
      out_dir: where the merged manifest will live (default: the hosts' common parent). The
        tokenizer file is copied there if it is not there yet.

    Returns:
      The merged manifest, to be written with :func:`write`.

    Raises:
      DataError: the hosts used different tokenizers (their shards cannot be mixed).
    """
    ms = [load(p) for p in paths]
    dirs = [m["root"] for m in ms]
    out_dir = os.path.abspath(out_dir or os.path.commonpath(dirs))
    shas = {m["tokenizer"]["sha256"] for m in ms}
    if len(shas) != 1:
        raise DataError(f"Host manifests {paths} use {len(shas)} different tokenizers.")
    keep = ("version", "key", "tokenizer", "curation", "problems", "val_gzip_bits_per_byte")
    merged: dict[str, Any] = {k: ms[0][k] for k in keep}
    tok_file = ms[0]["tokenizer"]["file"]
    if not os.path.exists(os.path.join(out_dir, tok_file)):
        shutil.copyfile(os.path.join(dirs[0], tok_file), os.path.join(out_dir, tok_file))

    def shards(entries: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
        out = [
            dict(s, path=os.path.relpath(os.path.join(d, s["path"]), out_dir))
            for entry, d in entries
            for s in entry["shards"]
        ]
        return split_entry(sorted(out, key=lambda s: os.path.basename(s["path"])))

    hosts = list(zip(ms, dirs, strict=True))
    merged["datasets"] = {
        name: {
            "weight": ds["weight"],
            **{s: shards([(m["datasets"][name][s], d) for m, d in hosts]) for s in SPLITS},
        }
        for name, ds in ms[0]["datasets"].items()
    }
    merged["validation"] = {
        name: dict(
            shards([(m["validation"][name], d) for m, d in hosts]),
            removed_from_training=entry["removed_from_training"],
        )
        for name, entry in ms[0].get("validation", {}).items()
    }
    merged["hosts"] = [os.path.relpath(d, out_dir) for d in dirs]
    return merged
