"""Corpus sources: stream Documents from the Python standard library or local files.

A Document is a dict ``{"text": str, "source": str, ...}``. Nothing here loads a corpus whole:
text files are read one at a time, JSONL line by line, Parquet in row batches.

Bad input never crashes a run and is never dropped silently. Every oddity (a malformed JSON line,
non-UTF-8 bytes, an empty file, a Parquet file without the text column) is counted per file in a
:class:`Problems` report that ends up in the manifest. A path pattern that matches nothing is a
mistake in the config, so it raises :class:`SourceError` when the source is built, before any
work starts.

The rules for hostile input, the same on the local path and on Beam (both read with `read_file`):

- Only regular files are read. A FIFO, socket or device a glob matches is skipped and counted
  by kind (``fifo``, ``socket``, ``char_device``, ``block_device``); files are opened without
  blocking, so one swapped in later is refused too, never waited on.
- A file is read whole or counted ``unreadable``: a truncated or corrupt ``.gz``, ``.zst``,
  ``.bz2`` or ``.xz`` gives none of its documents, not those before the cut (a compressed JSONL
  file is decompressed once to check it before its first document is taken).
- No document over ``max_document_bytes`` is ever held: a JSONL line is read with that bound
  and a longer one skipped to its end; a text file read as one document likewise; a Parquet
  value or a text piece over it is dropped. Each is counted ``too_large``.
- A NUL byte is never text. A file is ``binary`` (skipped) when it starts with a known magic
  number, or when its first 8 KB hold a NUL and are not UTF-8. Otherwise a document holding a
  NUL anywhere (a raw byte, or a JSON ``\\u0000``) is dropped and counted ``nul_byte``: the
  same at byte 100 as at byte 20,000.
"""

from __future__ import annotations

import bz2
import codecs
import collections
import dataclasses
import errno
import fnmatch
import glob
import gzip
import io
import json
import lzma
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

from jaxlm import storage
from jaxlm.data import files as file_io
from jaxlm.errors import JaxlmError

Document = dict[str, Any]

STDLIB = "stdlib"
TEXT_EXTS = (".txt", ".md", ".rst", ".py")  # documents by the dataset's `split` rule
JSONL_EXTS = (".jsonl", ".json", ".ndjson")
PARQUET_EXTS = (".parquet",)
COMPRESSION_EXTS = (".gz", ".zst", ".bz2", ".xz")
_PARQUET_BATCH_ROWS = 1024
_MAX_EXAMPLES = 3  # examples of a problem kept per file; the count is always exact
MAX_DOCUMENT_BYTES = 8 * 2**20  # the default bound on one document (data.max_document_bytes)


class DataError(JaxlmError, ValueError):
    """Bad data-preparation input; the message is one sentence meant for the user."""


class SourceError(DataError):
    """A data source is misconfigured (bad glob, unknown file type, missing dependency)."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One input file: absolute path, the name documents carry, and what the cache key needs."""

    path: str
    name: str  # relative path for stdlib, the path as resolved for user files
    size: int
    mtime_ns: int


class Problems:
    """Per-file counts of input problems, with a few examples each."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = collections.Counter()
        self._examples: dict[tuple[str, str], list[str]] = collections.defaultdict(list)

    def add(self, file: str, kind: str, example: str = "", count: int = 1) -> None:
        key = (file, kind)
        self._counts[key] += count
        if example and len(self._examples[key]) < _MAX_EXAMPLES:
            self._examples[key].append(example[:200])

    def count(self, kind: str | None = None) -> int:
        """Total problems, or problems of one kind."""
        return sum(n for (_, k), n in self._counts.items() if kind is None or k == kind)

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-ready list of ``{"file", "kind", "count", "examples"}``, sorted by file."""
        return [
            {"file": f, "kind": k, "count": n, "examples": self._examples.get((f, k), [])}
            for (f, k), n in sorted(self._counts.items())
        ]

    def __len__(self) -> int:
        return len(self._counts)


def cache_root(cache_dir: str = "") -> str:
    """Root of prepared-data caches: ``cache_dir``, else ``$JAXLM_CACHE``, else ~/.cache/jaxlm."""
    root = cache_dir or os.environ.get("JAXLM_CACHE", "") or "~/.cache/jaxlm"
    return storage.absolute(root)  # may be a bucket: prepare publishes there (see storage)


def stdlib_files() -> list[SourceFile]:
    """Every ``*.py`` under the interpreter's standard library, minus site-packages, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                st = os.stat(path)
                rel = os.path.relpath(path, root)
                out.append(SourceFile(path, rel, st.st_size, st.st_mtime_ns))
    return sorted(out, key=lambda f: f.name)


def _kind(path: str) -> str | None:
    """'text', 'jsonl', 'parquet' or None, looking through one compression suffix."""
    p = path.lower()
    for ext in COMPRESSION_EXTS:
        if p.endswith(ext):
            p = p[: -len(ext)]
            break
    if p.endswith(TEXT_EXTS):
        return "text"
    if p.endswith(JSONL_EXTS):
        return "jsonl"
    if p.endswith(PARQUET_EXTS) and p == path.lower():
        return "parquet"
    return None


def _match_parts(pattern: list[str], parts: list[str]) -> bool:
    """Glob matching of path components, where a ``**`` component matches zero or more."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match_parts(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and (
        fnmatch.fnmatchcase(parts[0], pattern[0]) and _match_parts(pattern[1:], parts[1:])
    )


def _walk(root: str, problems: Problems) -> Iterator[str]:
    """Every file under ``root``, following directory symlinks but entering each real directory
    once: a symlink cycle is cut (and counted) instead of being walked ~40 levels deep, which
    ``glob('**')`` does, once per cycle, multiplying."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            problems.add(dirpath, "symlink_cycle")
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        yield from (os.path.join(dirpath, fn) for fn in sorted(filenames))


def _expand(pattern: str, problems: Problems) -> list[str]:
    """The files a pattern names: a glob (``**`` walked by :func:`_walk`), or a directory."""
    if "**" in pattern:
        parts = pattern.split(os.sep)
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        root = os.sep.join(parts[:fixed]) or "."
        if parts[0] == "" and fixed == 1:
            root = os.sep
        return [
            path
            for path in _walk(root, problems)
            if _match_parts(parts[fixed:], os.path.relpath(path, root).split(os.sep))
        ]
    files = []
    for m in sorted(glob.glob(pattern)):
        if os.path.isdir(m):
            for dirpath, dirnames, filenames in os.walk(m):  # links to dirs are not followed
                dirnames.sort()
                files += [os.path.join(dirpath, fn) for fn in sorted(filenames)]
        else:
            files.append(m)
    return files


def resolve_files(paths: str, problems: Problems | None = None) -> list[SourceFile]:
    """Expand a comma-separated list of globs/dirs (or ``'stdlib'``) into sorted input files.

    A file that cannot be opened (a symlink loop, a dangling link), one that is not a regular
    file (a FIFO, a socket, a device) and a directory reached again through a symlink cycle are
    skipped and counted in ``problems``, by kind.

    Raises:
      SourceError: a pattern matches no readable corpus file. Checked for every pattern before
        anything is read, so a typo fails in milliseconds, not after hours of work.
    """
    problems = problems if problems is not None else Problems()
    patterns = [p.strip() for p in paths.split(",") if p.strip()]
    if not patterns:
        raise SourceError("The data source 'paths' is empty; give a glob, a directory or 'stdlib'.")
    found: dict[str, SourceFile] = {}
    for pattern in patterns:
        if pattern == STDLIB:
            files = stdlib_files()
            for f in files:
                found[f.path] = f
            continue
        if storage.is_remote(pattern):  # a bucket: its objects are regular files
            files = [
                SourceFile(path, path, *storage.size_and_mtime(path))
                for path in storage.glob(pattern)
                if _kind(path) is not None
            ]
        else:
            files = _local_files(pattern, problems)
        if not files:
            raise SourceError(
                f"The data path pattern {pattern!r} matches no .txt/.md/.rst/.py/.jsonl/.parquet "
                "files (optionally .gz/.zst/.bz2/.xz); check the path or the glob."
            )
        for f in files:
            found[f.path] = f
    return sorted(found.values(), key=lambda f: f.path)


def _local_files(pattern: str, problems: Problems) -> list[SourceFile]:
    """The corpus files a local pattern names; unreadable and special files go to `problems`."""
    files = []
    for path in _expand(os.path.expanduser(pattern), problems):
        if _kind(path) is None:
            continue
        try:
            st = os.stat(path)
        except OSError as e:
            kind = "symlink_loop" if e.errno == errno.ELOOP else "unreadable"
            problems.add(path, kind, e.strerror or "")
            continue
        special = file_io.special_kind(st.st_mode)
        if special is not None:  # reading a FIFO blocks forever, a device never ends
            problems.add(path, special, "not a regular file; skipped")
            continue
        files.append(SourceFile(os.path.abspath(path), path, st.st_size, st.st_mtime_ns))
    return files


def _open_binary(path: str) -> BinaryIO:
    """Open a regular file, decompressing by suffix; zstandard is imported only when needed.
    A cut ``.zst`` raises EOFError here, as a cut ``.gz`` does when read to its end."""
    low = path.lower()
    if low.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise SourceError(f"Reading {path} needs zstandard: pip install zstandard.") from e
    fh = file_io.open_regular(path)
    try:
        if low.endswith(".gz"):
            return gzip.GzipFile(fileobj=fh, mode="rb")  # type: ignore[return-value]
        if low.endswith(".bz2"):
            return bz2.BZ2File(fh, "rb")  # type: ignore[return-value]
        if low.endswith(".xz"):
            return lzma.LZMAFile(fh, "rb")  # type: ignore[return-value]
        if low.endswith(".zst"):
            file_io.check_zstd_frames(fh)
            # The zstd reader cannot iterate lines itself; buffering gives it readline().
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh, closefd=True))
    except BaseException:
        fh.close()
        raise
    return fh


# Magic numbers of common binary formats; a NUL byte catches most of the rest (UTF-16 text too,
# which is not a corpus format jaxlm reads).
_BINARY_MAGIC = (
    b"\x7fELF",  # executables and shared libraries
    b"\x89PNG",
    b"GIF8",
    b"\xff\xd8\xff",  # JPEG
    b"%PDF",
    b"PK\x03\x04",  # zip, jar, docx, whl
    b"\x1f\x8b",  # gzip under a text name
    b"(\xb5/\xfd",  # zstd
    b"7z\xbc\xaf",
    b"MZ",  # Windows executables
)
_SNIFF_BYTES = 8192


def looks_binary(head: bytes) -> bool:
    """Whether a file's first bytes say it is not text: a known magic number, or a NUL byte in
    bytes that are not UTF-8. A NUL in UTF-8 text is a stray byte, dropped with its document
    wherever it is (see the module docstring), so the verdict does not hang on its position."""
    if head.startswith(_BINARY_MAGIC):
        return True
    head = head[:_SNIFF_BYTES]
    if b"\x00" not in head:
        return False
    try:  # final=False: a character cut by the end of the sniffed bytes is not an error
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return True
    return False


def clean_text(raw: bytes, name: str, problems: Problems, where: str = "") -> str:
    """Decode UTF-8 (replacing and counting bad bytes), strip a BOM, and normalise CRLF/CR to LF."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8", errors="replace")
        problems.add(name, "non_utf8", f"{where}byte {e.start}: {raw[e.start : e.start + 8]!r}")
    return normalize_newlines(text)


def normalize_newlines(text: str) -> str:
    """Strip a leading BOM and turn CRLF and lone CR into LF."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


class Source:
    """A stream of Documents from one dataset's ``paths``, file by file in sorted order.

    Files are resolved (and bad patterns rejected) in the constructor. Every host reads every
    file: the order of documents in the corpus (what keep-first dedup keeps) is this order.

    Args:
      paths: comma-separated globs or directories, or ``'stdlib'``.
      text_field: JSONL key / Parquet column holding the text.
      split: how a text file becomes documents (see `check_split`): 'file' (one document),
        'paragraphs' (one per blank-line-separated paragraph), or a number N (pieces of at most
        N characters, cut at paragraph, else line, boundaries; shorter files stay whole).
      max_document_bytes: the largest document read (see the module docstring); a larger one is
        skipped while reading and counted ``too_large``.
    """

    def __init__(
        self,
        paths: str,
        *,
        text_field: str = "text",
        split: str = "file",
        max_document_bytes: int = MAX_DOCUMENT_BYTES,
    ) -> None:
        self.paths = paths
        self.text_field = text_field
        self.split = check_split(split)
        self.max_document_bytes = int(max_document_bytes)
        self.problems = Problems()  # resolving the paths counts problems too (symlink loops)
        self.files = resolve_files(paths, self.problems)
        self.documents = 0
        if any(_kind(f.path) == "parquet" for f in self.files):
            _require_pyarrow()

    @property
    def is_stdlib(self) -> bool:
        return STDLIB in [p.strip() for p in self.paths.split(",")]

    def fingerprint(self) -> list[Any]:
        """What the cache key needs: every file's name, size and mtime, and Python."""
        fp: list[Any] = [[f.path, f.size, f.mtime_ns] for f in self.files]
        if self.is_stdlib:
            fp.append(sys.version)
        return fp

    def __iter__(self) -> Iterator[Document]:
        for f in self.files:
            for doc in read_file(
                f, self.problems, self.text_field, self.split, self.max_document_bytes
            ):
                self.documents += 1
                yield doc


def read_file(
    f: SourceFile,
    problems: Problems,
    text_field: str = "text",
    split: str = "file",
    max_bytes: int = MAX_DOCUMENT_BYTES,
) -> Iterator[Document]:
    """The Documents of one input file, in file order; every problem is counted in ``problems``
    (a damaged or binary file costs that file, never the run). The rules for hostile input
    (special files, truncation, NUL bytes, huge documents) are the module docstring's.

    Args:
      f: the file (from :func:`resolve_files`).
      problems: where problems are counted, under ``f.name``.
      text_field: JSONL key / Parquet column holding the text.
      split: how a text file becomes documents (see :func:`check_split`).
      max_bytes: the largest document, in UTF-8 bytes; a larger one is counted ``too_large``.
    """
    kind = _kind(f.path)
    out = _Out(f.name, problems, max_bytes)
    try:
        if kind == "parquet":
            yield from _parquet(f, out, text_field)
            return
        with _open_binary(f.path) as fh:
            head = fh.read(_SNIFF_BYTES)
            if kind == "jsonl" and f.path.lower().endswith(COMPRESSION_EXTS):
                # Decompress to nowhere first: a cut or corrupt file fails here, before any of
                # its documents is taken (one 1 MB block held at a time).
                while fh.read(1 << 20):
                    pass
        if looks_binary(head):
            problems.add(f.name, "binary", repr(head[:8]))
        elif kind == "jsonl":
            yield from _jsonl(f, out, text_field)
        else:
            yield from _text(f, out, split)
    except SourceError:
        raise
    except file_io.NotRegularFile as e:  # replaced by a FIFO or a device after it was listed
        problems.add(f.name, e.kind, "not a regular file; skipped")
    except _read_errors() as e:
        # A truncated .gz or a corrupt file costs that file (counted), never the run.
        problems.add(f.name, "unreadable", f"{type(e).__name__}: {e}")


@dataclasses.dataclass
class _Out:
    """Where one file's documents pass their last checks: its name, problems and size bound."""

    name: str
    problems: Problems
    max_bytes: int

    def emit(self, text: str, source: str) -> Iterator[Document]:
        """The document, unless it is empty, holds a NUL or is over the bound (each counted)."""
        if not text.strip():
            self.problems.add(self.name, "empty_document", source)
        elif "\x00" in text:
            self.problems.add(self.name, "nul_byte", f"{source}: character {text.index(chr(0))}")
        elif len(text) > self.max_bytes // 4 and _utf8_len(text) > self.max_bytes:
            self.problems.add(self.name, "too_large", f"{source}: over {self.max_bytes:,} bytes")
        else:
            yield {"text": text, "source": source}

    def too_large(self, where: str) -> None:
        self.problems.add(self.name, "too_large", f"{where}over {self.max_bytes:,} bytes")


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _text(f: SourceFile, out: _Out, split: str) -> Iterator[Document]:
    with _open_binary(f.path) as fh:
        # A file read as one document is read with the bound; one cut into pieces is read
        # whole (a long book is such a file) and each piece checked in `emit`.
        raw = fh.read(out.max_bytes + 1) if split == "file" else fh.read()
    if len(raw) > out.max_bytes and split == "file":
        out.too_large("")
        return
    if not raw.strip():
        out.problems.add(f.name, "empty_file")
        return
    text = clean_text(raw, f.name, out.problems)
    if split == "file":
        yield from out.emit(text, f.name)
    elif split == "paragraphs":
        for i, para in enumerate(text.split("\n\n")):
            if para.strip():
                yield from out.emit(para.strip("\n"), f"{f.name}#{i}")
    else:
        for i, piece in enumerate(split_text(text, int(split))):
            yield from out.emit(piece, f"{f.name}#{i}")


def _lines(fh: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """The lines of ``fh``, holding at most ``limit + 1`` bytes of one at a time: a line of more
    than ``limit`` bytes before its newline is read past in 1 MB steps and given as None."""
    while line := fh.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := fh.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield line


def _jsonl(f: SourceFile, out: _Out, text_field: str) -> Iterator[Document]:
    n_lines = 0
    with _open_binary(f.path) as fh:
        for lineno, raw in enumerate(_lines(fh, out.max_bytes), 1):
            where = f"line {lineno}: "
            if raw is None:
                n_lines += 1
                out.too_large(where)
                continue
            if not raw.strip():
                continue
            n_lines += 1
            if b"\x00" in raw:  # JSON cannot hold a raw NUL; it is the same stray byte as in text
                out.problems.add(f.name, "nul_byte", f"{where}byte {raw.index(0)}")
                continue
            line = clean_text(raw, f.name, out.problems, where)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                out.problems.add(f.name, "malformed_json", f"{where}{e.msg}")
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                fields = ", ".join(map(str, obj)) if isinstance(obj, dict) else ""
                has = fields or f"no fields (a JSON {type(obj).__name__})"
                out.problems.add(
                    f.name, "missing_field", f"{where}no string {text_field!r}; has {has}"
                )
                continue
            yield from out.emit(normalize_newlines(text), f"{f.name}:{lineno}")
    if n_lines == 0:
        out.problems.add(f.name, "empty_file")


def _parquet(f: SourceFile, out: _Out, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    with file_io.open_regular(f.path) as fh:
        pf = pq.ParquetFile(fh)
        if text_field not in pf.schema_arrow.names:
            cols = ", ".join(pf.schema_arrow.names)
            out.problems.add(f.name, "missing_column", f"no {text_field!r}; has {cols}")
            return
        if pf.metadata.num_rows == 0:
            out.problems.add(f.name, "empty_file")
            return
        row = 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                if isinstance(value, bytes):
                    value = clean_text(value, f.name, out.problems, f"row {row}: ")
                if not isinstance(value, str):
                    kind = type(value).__name__
                    out.problems.add(f.name, "missing_field", f"row {row}: {kind}")
                else:
                    yield from out.emit(normalize_newlines(value), f"{f.name}#{row}")
                row += 1


def check_split(split: str) -> str:
    """`split` if it is 'file', 'paragraphs' or a positive whole number, else SourceError."""
    split = str(split).strip()
    if split in ("file", "paragraphs") or (split.isdigit() and int(split) > 0):
        return split
    raise SourceError(
        f"split={split!r} must be 'file', 'paragraphs' or a number of characters per document "
        "(e.g. '8000')."
    )


def split_text(text: str, max_chars: int) -> Iterator[str]:
    """Pieces of `text` of at most `max_chars`, cut after a blank line where one falls in the
    window, else after a newline, else mid-line; so a single long book or dump becomes many
    documents (a held-out split, shuffling) without cutting through paragraphs."""
    start, n = 0, len(text)
    while start < n:
        end = start + max_chars
        if end >= n:
            cut = n
        else:
            cut = text.rfind("\n\n", start, end) + 2
            if cut <= start + 1:
                cut = text.rfind("\n", start, end) + 1
            if cut <= start:
                cut = end
        piece = text[start:cut].strip("\n")
        if piece.strip():
            yield piece
        start = cut


def _read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this file is damaged" (pyarrow's ArrowInvalid is a ValueError)."""
    errors: list[type[BaseException]] = [OSError, EOFError, ValueError, zlib.error, lzma.LZMAError]
    if "zstandard" in sys.modules:
        errors.append(sys.modules["zstandard"].ZstdError)
    return tuple(errors)


def _require_pyarrow() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise SourceError("Reading .parquet files needs pyarrow: pip install pyarrow.") from e
