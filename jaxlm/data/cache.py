"""The prepared-data cache: list its preparations with size and last use, and prune old ones.

``prepare`` (and the Beam path) write each preparation to ``<cache_root>/<key>/`` and mark it
complete with ``manifest.json``; every later use of it touches that file, so the manifest's
modification time is the preparation's last use. A folder named ``.tmp-*`` is a preparation that
was killed before it finished: it is never used and always safe to remove.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

from jaxlm.data import manifest as manifest_lib

_DAY_S = 86400.0


@dataclasses.dataclass(frozen=True)
class Entry:
    """One folder of the cache."""

    path: str
    bytes: int
    last_used: float  # seconds since the epoch (manifest mtime; folder mtime if incomplete)
    complete: bool
    datasets: str  # "name=paths; ..." from the manifest, '' if incomplete or unreadable


def touch(manifest_path: str) -> None:
    """Records a use of a cached preparation (its manifest's modification time)."""
    try:
        os.utime(manifest_path)
    except OSError:  # a read-only cache is still usable; its last use just stays older
        pass


def _size(path: str) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for fn in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, fn)).st_size
            except OSError:
                pass
    return total


def _datasets(manifest_path: str) -> str:
    try:
        with open(manifest_path) as f:
            config = json.load(f).get("config", {})
        return "; ".join(f"{n}={d.get('paths', '?')}" for n, d in config["datasets"].items())
    except (OSError, ValueError, KeyError, AttributeError):
        return ""


def entries(root: str) -> list[Entry]:
    """Every preparation folder under the cache ``root``, least recently used first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        manifest_path = os.path.join(path, manifest_lib.FILE)
        complete = not name.startswith(".tmp-") and os.path.isfile(manifest_path)
        used = os.path.getmtime(manifest_path if complete else path)
        datasets = _datasets(manifest_path) if complete else ""
        out.append(Entry(path, _size(path), used, complete, datasets))
    return sorted(out, key=lambda e: e.last_used)


def prune(root: str, older_than_days: float, now: float | None = None) -> list[Entry]:
    """Removes incomplete preparations and those unused for ``older_than_days``; returns them."""
    now = time.time() if now is None else now
    gone = []
    for e in entries(root):
        if not e.complete or now - e.last_used > older_than_days * _DAY_S:
            shutil.rmtree(e.path, ignore_errors=True)
            gone.append(e)
    return gone


def local_copy_bytes() -> int:
    """The size bound of the local copies of bucket preparations: $JAXLM_LOCAL_CACHE_GB (50)."""
    return int(float(os.environ.get("JAXLM_LOCAL_CACHE_GB", "50")) * 1e9)


def fit(root: str, max_bytes: int, keep: str) -> list[Entry]:
    """Removes the least recently used preparations under ``root`` (never ``keep``, the one in
    use) until the rest take at most ``max_bytes``; returns them."""
    items = entries(root)
    total, gone = sum(e.bytes for e in items), []
    for e in items:
        if total <= max_bytes:
            break
        if os.path.abspath(e.path) != os.path.abspath(keep):
            shutil.rmtree(e.path, ignore_errors=True)
            total -= e.bytes
            gone.append(e)
    return gone


def table(items: list[Entry], now: float | None = None) -> str:
    """A fixed-width listing: size, days since last use, state, folder and datasets."""
    now = time.time() if now is None else now
    lines = [f"{'MB':>10} {'unused':>8}  {'state':<10} folder  datasets"]
    for e in items:
        state = "complete" if e.complete else "incomplete"
        days = (now - e.last_used) / _DAY_S
        lines.append(
            f"{e.bytes / 1e6:>10.1f} {days:>7.1f}d  {state:<10} {e.path}  {e.datasets}".rstrip()
        )
    lines.append(f"{sum(e.bytes for e in items) / 1e6:>10.1f} MB in {len(items)} folder(s)")
    return "\n".join(lines)
