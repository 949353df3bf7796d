"""Small file helpers shared by the data modules, so none of them imports another for these.

`tokenizer`, `hf_tokenizer`, `records`, `manifest` and `prepare` all hash or atomically write
files; keeping those helpers here (importing nothing from jaxlm) keeps the data modules' import
graph one-way. `sources` opens corpus files through :func:`open_regular` (never a FIFO or a
device) and checks zstd files for a cut with :func:`check_zstd_frames`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import uuid
from typing import Any, BinaryIO

from jaxlm import storage


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes (how manifests and checkpoints name a tokenizer or shard)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically: readers see the old file or the new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


class NotRegularFile(OSError):
    """A corpus path names a FIFO, socket or device, which must not be read (a FIFO blocks
    ``open`` forever, ``/dev/zero`` never ends); ``kind`` says which, for the problem report."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path} is a {kind.replace('_', ' ')}, not a regular file")
        self.kind = kind


def special_kind(mode: int) -> str | None:
    """None for a regular file, else what the file is: 'fifo', 'socket', 'char_device',
    'block_device' or 'directory'."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in (
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "char_device"),
        (stat.S_ISBLK, "block_device"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return kind
    return "special_file"


def open_regular(path: str) -> BinaryIO:
    """Opens a regular file for binary reading; raises :class:`NotRegularFile` for anything else.

    The open itself never blocks (``O_NONBLOCK``), so a FIFO swapped in after the corpus was
    listed is refused here rather than hanging the run; the check is on the opened descriptor.
    A bucket object (``s3://``, ``gs://``) is streamed in blocks through jaxlm.storage.
    """
    if storage.is_remote(path):
        return storage.open_file(path, "rb")  # type: ignore[return-value]
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        kind = special_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise NotRegularFile(path, kind)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE = 0x184D2A50  # the magic of a skippable frame, low 4 bits masked
_CUT = "Compressed file ended before the end-of-stream marker was reached"  # as gzip says it


def check_zstd_frames(fh: BinaryIO) -> None:
    """Raises EOFError when a zstd file ends inside a frame, then rewinds ``fh``.

    zstandard's stream reader returns a short read at a cut instead of failing, so a truncated
    file read as complete (or empty). Walking the frame and block headers (RFC 8878) finds the
    cut by seeking, without decompressing. A file that is not zstd is left to the decompressor.
    """
    end = os.fstat(fh.fileno()).st_size

    def take(n: int) -> bytes:
        data = fh.read(n)
        if len(data) < n:
            raise EOFError(_CUT)
        return data

    def skip(n: int) -> None:
        if fh.tell() + n > end:
            raise EOFError(_CUT)
        fh.seek(n, os.SEEK_CUR)

    fh.seek(0)
    while magic_bytes := fh.read(4):
        if len(magic_bytes) < 4:
            raise EOFError(_CUT)
        magic = int.from_bytes(magic_bytes, "little")
        if magic & 0xFFFFFFF0 == _ZSTD_SKIPPABLE:
            skip(int.from_bytes(take(4), "little"))
            continue
        if magic != _ZSTD_MAGIC:
            break
        (descriptor,) = take(1)
        single_segment, checksum = descriptor >> 5 & 1, descriptor >> 2 & 1
        content_size_bytes = (single_segment, 2, 4, 8)[descriptor >> 6]
        skip((1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] + content_size_bytes)
        last = 0
        while not last:
            header = int.from_bytes(take(3), "little")
            last, block_type, size = header & 1, header >> 1 & 3, header >> 3
            skip(1 if block_type == 1 else size)  # an RLE block stores its one byte
        skip(4 * checksum)
    fh.seek(0)


def new_work_dir(parent: str, name: str) -> str:
    """A fresh ``parent/.tmp-<name>-<random>-pid<pid>@<host>``, where ``name`` is prepared
    before one rename publishes it; the owner in the name lets a later run find it stale."""
    path = os.path.join(parent, f".tmp-{name}-{uuid.uuid4().hex[:8]}-pid{os.getpid()}@{_host()}")
    os.makedirs(path)
    return path


def remove_stale_work_dirs(parent: str, name: str) -> list[str]:
    """Removes the :func:`new_work_dir` folders of ``name`` whose process is gone; returns them.

    A run removes its own folder when it fails or is interrupted, but SIGKILL (or SIGTERM,
    which Python does not turn into an exception) leaves it behind. Only this host's folders
    are judged: another host's cannot be told, from here, from one still at work on a shared
    filesystem.
    """
    pattern = re.compile(rf"\.tmp-{re.escape(name)}-[0-9a-f]{{8}}-pid(\d+)@(.+)")
    removed = []
    for entry in sorted(os.listdir(parent)):
        m = pattern.fullmatch(entry)
        if m is None or m.group(2) != _host() or _alive(int(m.group(1))):
            continue
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        removed.append(os.path.join(parent, entry))
    return removed


def _host() -> str:
    return socket.gethostname().replace(os.sep, "_")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process, alive
        return True
    return True
