"""Storage: one path type for local directories and object storage (``s3://``, ``gs://``).

Every location a run names (corpus globs, the prepared-data cache, ``data.manifest``,
``--workdir`` with its checkpoints, metrics and TensorBoard events, Hugging Face folders, Beam's
inputs and output) is a string;
this module alone decides whether it is local or a bucket and talks to the bucket through
fsspec (s3fs for ``s3://``, gcsfs for ``gs://``; endpoint and credentials come from the usual
``AWS_*`` / ``GOOGLE_*`` environment). Local paths keep plain ``os`` calls.

Object storage has no rename and no append, so what must appear whole is published with a
marker written last (:func:`publish_dir`) and read only when its marker exists
(:func:`fetch_dir`). Readers that need local files (ArrayRecord's C++ reader; orbax, whose
tensorstore specs know ``gs://`` but not ``s3://``) work on a local copy under
:func:`local_root`: prepared data bounded in size (``jaxlm.data.cache.fit``), a workdir kept
in step by :class:`WorkdirMirror`. docs/storage.md has the usage and the guarantees.

Every failure of a bucket call is one sentence naming the path (:class:`StorageError`):
missing credentials, a bucket that does not exist, a permission error, or a network failure
retried ``RETRIES`` times with exponential backoff first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

from jaxlm.errors import JaxlmError

SCHEMES = ("s3://", "gs://")
RETRIES = 4  # tries of a bucket call that failed on the network
BACKOFF_S = 1.0  # the wait after the first failed try; it doubles after each next one
MARKER = ".jaxlm-complete"  # the object a published directory gets last (see publish_dir)

T = TypeVar("T")


class StorageError(JaxlmError):
    """A bucket could not be used: credentials, bucket, permission or network, with its path."""


def is_remote(path: str) -> bool:
    """Whether `path` names object storage rather than the local file system."""
    return str(path).startswith(SCHEMES)


def join(base: str, *parts: str) -> str:
    """`base`/`parts`, with ``/`` separators for buckets (os.path.join would keep ``s3:/``)."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def absolute(path: str) -> str:
    """A local path made absolute (``~`` expanded); a bucket path as given, less trailing ``/``."""
    return path.rstrip("/") if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def local_root() -> str:
    """Where local copies of bucket data live: ``$JAXLM_LOCAL_CACHE``, else ~/.cache/jaxlm."""
    root = os.environ.get("JAXLM_LOCAL_CACHE", "") or "~/.cache/jaxlm"
    return os.path.abspath(os.path.expanduser(root))


def local_copy_dir(kind: str, remote: str) -> str:
    """The local directory that mirrors bucket path `remote`, under local_root()/`kind`."""
    digest = hashlib.sha256(remote.encode()).hexdigest()[:16]
    name = remote.rstrip("/").rsplit("/", 1)[-1]
    return os.path.join(local_root(), kind, f"{name}-{digest}")


def _fs(path: str) -> Any:
    """The fsspec file system of a bucket path (see _filesystem)."""
    env = tuple(os.environ.get(k, "") for k in _FS_ENV)
    protocol = path.split("://", 1)[0]
    try:
        return _filesystem(protocol, env)
    except ImportError:
        package = {"s3": "s3fs", "gs": "gcsfs"}[protocol]
        raise StorageError(
            f"{path} needs {package}: pip install 'jaxlm[storage]' (or {package})."
        ) from None


# The settings a file system is built from: one is made again when they change (a test's
# endpoint, refreshed credentials), never silently reused.
_FS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE")


@functools.lru_cache(maxsize=8)
def _filesystem(protocol: str, env: tuple[str, ...]) -> Any:
    """Listings are never cached: another process (or orbax) may have written since, and the
    newest checkpoint or a preparation's marker must be seen as soon as it exists."""
    import fsspec

    del env  # (the cache key)
    return fsspec.filesystem(protocol, skip_instance_cache=True, use_listings_cache=False)


def _network_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(
        names
        & {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "TimeoutError"}
        or names & {"ClientConnectorError", "ServerDisconnectedError", "ConnectionError"}
    )


def _error_code(e: BaseException) -> str:
    """The service's error code (e.g. 'AccessDenied') of `e` or of the error that caused it."""
    seen: BaseException | None = e
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
        seen = seen.__cause__ or seen.__context__
    return ""


_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "ExpiredToken"}


def _sentence(path: str, e: BaseException) -> str:
    """One sentence for a failed bucket call on `path`."""
    names = {c.__name__ for c in type(e).__mro__}
    code, text = _error_code(e), str(e)
    if "NoCredentialsError" in names or "DefaultCredentialsError" in names:
        return (
            f"no credentials for {path}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE; GOOGLE_APPLICATION_CREDENTIALS for gs://)."
        )
    if code in _REFUSED:
        return (
            f"the credentials were refused for {path} ({code}); check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY."
        )
    if code == "NoSuchBucket" or (isinstance(e, FileNotFoundError) and "bucket" in text.lower()):
        bucket = path.split("://", 1)[1].split("/", 1)[0]
        return f"the bucket {bucket!r} of {path} does not exist; create it or fix the path."
    if isinstance(e, PermissionError) or code in ("AccessDenied", "AllAccessDisabled"):
        return f"permission denied on {path}; grant these credentials read and write there."
    if _network_error(e):
        return (
            f"could not reach the storage of {path} after {RETRIES} tries "
            f"({type(e).__name__}); check the endpoint and the network."
        )
    return f"{path}: {type(e).__name__}: {text}"


def call(path: str, fn: Callable[[], T]) -> T:
    """`fn()`, a bucket call on `path`: network failures retried with backoff, every other
    failure but a missing object (FileNotFoundError, for the caller) turned into one sentence.

    Raises:
      StorageError: credentials, bucket, permission, or the network after RETRIES tries.
    """
    for attempt in range(RETRIES):
        try:
            return fn()
        except StorageError:
            raise
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():
                raise StorageError(_sentence(path, e)) from None
            raise
        except Exception as e:  # noqa: BLE001 (botocore, aiohttp and google errors alike)
            if _network_error(e) and attempt + 1 < RETRIES:
                time.sleep(BACKOFF_S * 2**attempt)
                continue
            raise StorageError(_sentence(path, e)) from None
    raise AssertionError("unreachable")


# ---- file operations: a local path goes to os, a bucket path to fsspec ----


def exists(path: str) -> bool:
    """Whether a file or directory (a bucket prefix with objects under it) is at `path`."""
    if not is_remote(path):
        return os.path.exists(path)
    return call(path, lambda: _fs(path).exists(path))


def isfile(path: str) -> bool:
    """Whether `path` is a file (an object)."""
    if not is_remote(path):
        return os.path.isfile(path)
    return call(path, lambda: _fs(path).isfile(path))


def open_file(path: str, mode: str = "rb") -> IO:
    """`path` opened; a bucket object is streamed in blocks, never copied whole first."""
    if not is_remote(path):
        return open(path, mode)
    return call(path, lambda: _fs(path).open(path, mode))


def read_bytes(path: str) -> bytes:
    """The whole content of the file at `path`."""
    with open_file(path, "rb") as f:
        return call(path, f.read)


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` whole: a local temp file renamed over it; a bucket object is
    whole by itself (one PUT)."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    call(path, lambda: _fs(path).pipe_file(path, data))


def remove(path: str) -> None:
    """Deletes the file or directory tree at `path` (nothing there: nothing to do)."""
    if not is_remote(path):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
        return
    with contextlib.suppress(FileNotFoundError):
        call(path, lambda: _fs(path).rm(path, recursive=True))


def listdir(path: str) -> list[str]:
    """Names directly under `path`, sorted ([] if nothing is there)."""
    if not is_remote(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    try:
        entries = call(path, lambda: _fs(path).ls(path, detail=False))
    except FileNotFoundError:
        return []
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})


def files_under(path: str) -> dict[str, dict]:
    """{path relative to `path`: {"size", "mtime_ns"}} of every file under a bucket prefix."""
    fs = _fs(path)
    found = call(path, lambda: fs.find(path, detail=True))
    root = fs._strip_protocol(path).rstrip("/") + "/"
    out = {}
    for name, info in found.items():
        if info.get("type") == "directory" or not name.startswith(root):
            continue
        out[name[len(root) :]] = {"size": int(info["size"]), "mtime_ns": _mtime_ns(info)}
    return out


def _mtime_ns(info: dict) -> int:
    """An object's modification time in ns from its fsspec info (S3 and GCS name it apart)."""
    modified = info.get("LastModified") or info.get("updated") or info.get("mtime")
    return int(modified.timestamp() * 1e9) if hasattr(modified, "timestamp") else 0


def glob(pattern: str) -> list[str]:
    """Bucket paths matching `pattern` (``*``, ``?``, ``[...]``, ``**``), sorted; a pattern
    without magic that names a prefix gives every object under it."""
    fs = _fs(pattern)
    scheme = pattern.split("://", 1)[0] + "://"
    if not any(c in pattern for c in "*?["):
        if call(pattern, lambda: fs.isdir(pattern)):
            return sorted(join(pattern, rel) for rel in files_under(pattern))
        return [pattern] if call(pattern, lambda: fs.isfile(pattern)) else []
    return sorted(scheme + p for p in call(pattern, lambda: fs.glob(pattern)))


def size_and_mtime(path: str) -> tuple[int, int]:
    """(bytes, modification time in ns) of the bucket object `path`."""
    info = call(path, lambda: _fs(path).info(path))
    return int(info["size"]), _mtime_ns(info)


# ---- checks before any work ----


def check_writable(path: str, what: str) -> None:
    """Writes and deletes a probe object under `path`: credentials, bucket and permission
    problems surface here, before any data work, as one sentence naming `what`."""
    probe = join(path, f".write_test.{os.uname().nodename}.{os.getpid()}")
    try:
        write_bytes(probe, b"ok")
        remove(probe)
    except StorageError as e:
        raise StorageError(f"{what}: {e}") from None


# ---- whole directories: upload with a marker last, download only marked ones ----


def publish_dir(local: str, remote: str, marker: str = MARKER) -> None:
    """Uploads every file under local directory `local` to `remote`, the marker object last
    (the local file of that name if there is one, e.g. a manifest; else a stamp).

    Readers trust only marked directories, so a publication cut short (a killed process, a
    network failure) is never read as whole: object storage has no atomic rename to give this
    guarantee otherwise. An earlier publication there is removed first, its marker before the
    rest, so a re-publication is unmarked while it is under way.
    """
    fs = _fs(remote)
    remove(join(remote, marker))
    remove(remote)  # an earlier publication's files must not mix with this one's
    for dirpath, _, filenames in os.walk(local):
        for fn in sorted(filenames):
            src = os.path.join(dirpath, fn)
            rel = os.path.relpath(src, local).replace(os.sep, "/")
            if rel != marker:
                dest = join(remote, rel)
                call(dest, lambda s=src, d=dest: fs.put_file(s, d))
    marker_file = os.path.join(local, marker)
    stamp = read_bytes(marker_file) if os.path.isfile(marker_file) else b"complete\n"
    write_bytes(join(remote, marker), stamp)


def is_published(remote: str, marker: str = MARKER) -> bool:
    """Whether `remote` holds a whole publication (its marker exists)."""
    return isfile(join(remote, marker))


def fetch_dir(remote: str, local: str, marker: str = MARKER) -> bool:
    """Downloads a published directory into `local` (replaced), its marker last; False if
    `remote` has no marker (`marker=""`: any directory, e.g. a Hugging Face one). The copy is
    built in a ``.tmp-`` folder beside `local` and renamed into place, so a cut download is
    never mistaken for a whole one either."""
    if marker and not is_published(remote, marker):
        return False
    fs = _fs(remote)
    parent, name = os.path.split(local)
    tmp = os.path.join(parent, f".tmp-{name}-fetch{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    names = sorted(files_under(remote), key=lambda rel: (rel == marker, rel))
    for rel in names:
        dest = os.path.join(tmp, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        call(remote, lambda r=rel, d=dest: fs.get_file(join(remote, r), d))
    shutil.rmtree(local, ignore_errors=True)
    os.rename(tmp, local)
    return True


# ---- a run's workdir in a bucket ----


def _tree_signature(root: str, skip: str = "") -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of the files under local `root` (not under `skip`)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip and os.path.relpath(dirpath, root) == ".":
            dirnames[:] = [d for d in dirnames if d != skip]
        for fn in filenames:
            st = os.stat(os.path.join(dirpath, fn))
            rel = os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/")
            out[rel] = (st.st_size, st.st_mtime_ns)
    return out


class WorkdirMirror:
    """A run's ``--workdir``: itself when local; when a bucket, a local copy kept in step.

    The run writes to ``local`` as to any workdir (orbax's local driver, TensorBoard events,
    ``metrics.jsonl`` appends: none of which object storage can do in place). ``pull`` rebuilds
    the copy from the bucket, which is the truth: every file outside ``checkpoints/`` and each
    checkpoint step published whole (its marker exists). ``push`` sends what changed: each
    finished step orbax has written since (uploaded with its marker last, so a kill -9 during
    the upload leaves a step no reader trusts), the steps orbax deleted (marker first), then
    the other files. A killed run so loses only what it had not pushed, and its restart resumes
    from the newest published step, as a local run resumes from its newest finished one; a
    corrupt newest step falls back to the one before it exactly as locally (both are pulled).
    """

    def __init__(self, workdir: str, kind: str = "workdirs"):
        """`kind`: the folder of local_root() the copy goes to; readers (evaluation, export)
        pass their own, so they never rebuild the copy a training run on this machine uses."""
        self.remote = absolute(workdir) if is_remote(workdir) else ""
        self.local = local_copy_dir(kind, self.remote) if self.remote else workdir
        self._sent: dict[str, tuple[int, int]] = {}  # files outside checkpoints/, as pushed
        self._steps: dict[str, dict] = {}  # step folder -> its files' signature, as pushed

    def pull(self) -> None:
        """Rebuilds the local copy from the bucket (nothing to do for a local workdir)."""
        if not self.remote:
            return
        shutil.rmtree(self.local, ignore_errors=True)
        os.makedirs(self.local)
        fs, found = _fs(self.remote), files_under(self.remote)
        for rel in sorted(found):
            if not rel.startswith("checkpoints/"):
                dest = os.path.join(self.local, *rel.split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                call(self.remote, lambda r=rel, d=dest: fs.get_file(join(self.remote, r), d))
        ckpts = os.path.join(self.local, "checkpoints")
        for rel in sorted(found):
            parts = rel.split("/")
            if len(parts) == 3 and parts[0] == "checkpoints" and parts[2] == MARKER:
                fetch_dir(join(self.remote, "checkpoints", parts[1]), os.path.join(ckpts, parts[1]))
        self._sent = _tree_signature(self.local, skip="checkpoints")
        self._steps = self._local_steps()

    def _local_steps(self) -> dict[str, dict]:
        ckpts = os.path.join(self.local, "checkpoints")
        names = os.listdir(ckpts) if os.path.isdir(ckpts) else []
        # Only finished steps: orbax writes a step under a temporary name, then renames it.
        return {n: _tree_signature(os.path.join(ckpts, n)) for n in names if n.isdigit()}

    def push(self) -> None:
        """Sends what changed in the local copy to the bucket (nothing for a local workdir)."""
        if not self.remote:
            return
        steps = self._local_steps()
        for name in sorted(steps, key=int):
            if self._steps.get(name) != steps[name]:
                local_step = os.path.join(self.local, "checkpoints", name)
                publish_dir(local_step, join(self.remote, "checkpoints", name))
        for name in set(self._steps) - set(steps):
            remove(join(self.remote, "checkpoints", name, MARKER))
            remove(join(self.remote, "checkpoints", name))
        self._steps = steps
        files = _tree_signature(self.local, skip="checkpoints")
        for rel, signature in sorted(files.items()):
            if self._sent.get(rel) != signature:
                dest = join(self.remote, rel)
                src = os.path.join(self.local, *rel.split("/"))
                call(dest, lambda s=src, d=dest: _fs(d).put_file(s, d))
        self._sent = files
