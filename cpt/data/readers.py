"""Readers: turn a task's training source into a stream of documents (strings).

A *document* is the unit that gets an EOS token after it and that the validation split is made
of. In a `.txt` file (optionally `.gz` / `.xz` / `.zst`) documents are separated by one or more blank
lines (`documents: auto` / `blank-lines`), or each non-empty line is one (`documents: lines`); in
`.jsonl` each line is a document (its `text_field`); in `.parquet` and HF `datasets` directories
each row is one.

Sources: a task's `path` is a file, a directory, a glob or a list of these; `expand_sources` turns
it into the list of files read, in a fixed order: a list's entries in the order given, each entry's
files sorted by path (a directory: every file below it whose format is recognised by its suffix,
hidden names skipped; a glob: its matches, `**` recursive). A directory written by
`datasets.save_to_disk` (it holds `dataset_info.json` / `state.json` / `dataset_dict.json`) is one
source, not a directory of shards. A file named twice is read once (its first place). A task's
documents are the files' documents one file after the other, so document indices (and the
validation split made of them) run across files. Text that is not valid UTF-8 is skipped document by document and
counted (`ReadStats.skipped_non_utf8`), so one bad byte does not cost a whole corpus.

Memory: `.txt` and `.jsonl` sources (plain, `.gz`, `.xz`, `.zst`) are read as a stream, in chunks of
`_CHUNK` decompressed bytes, so peak memory is bounded by the largest document plus a chunk, not
by the file; the documents and `ReadStats` counts are exactly those of splitting the whole
decompressed file at once. A read or decompression error can therefore come after some documents
were yielded (a caller writing a cache entry discards the entry).

Fingerprints: `content_fingerprint(path, cache)` hashes every byte the first time it sees a file
and, given a cache directory, keeps the hash in `<cache>/fingerprints/` keyed by the resolved path
and the file's (size, mtime_ns); a later call whose stat matches returns the kept hash without
reading the file, so a warm start costs a stat per file instead of a pass over every byte. The
trade-off: a file rewritten in place with the same size and the same mtime_ns (a tool that resets
the mtime, or a write within the filesystem's timestamp granularity) is not noticed; delete
`<cache>/fingerprints/` (or touch the file) to force a re-hash.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import zstandard

from cpt import atomic
from cpt.errors import CptError

_BLANK_LINES = re.compile(rb"\r?\n[ \t]*\r?\n(?:[ \t]*\r?\n)*")
# what the greedy tail of a _BLANK_LINES match tries next: where this stops short of the buffer's end,
# the tail has failed on bytes already read, so more input cannot lengthen the match
_TAIL_PROBE = re.compile(rb"[ \t]*\r?")
_CHUNK = 1 << 20
_FINGERPRINT_VERSION = 1
_READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error, zstandard.ZstdError)
_COMPRESSED = (".gz", ".xz", ".zst")
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_GLOB_CHARS = re.compile(r"[*?\[]")
DOCUMENT_MODES = ("auto", "blank-lines", "lines")


@dataclass
class ReadStats:
    documents: int = 0
    skipped_non_utf8: int = 0
    skipped_empty: int = 0
    bytes: int = 0


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf"
    name = path.name.lower()
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(".txt") or name.endswith(".md") or name.endswith(".text"):
        return "txt"
    if name.endswith(".jsonl") or name.endswith(".json"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".idx"):
        return "megatron"
    if name.endswith(".ds"):
        return "datatrove"
    if name.endswith(".npy") or name.endswith(".bin"):
        return "tokens"
    raise CptError(
        f"{path}: unknown data format; use .txt, .jsonl, .parquet, a datasets directory, or pre-tokenized .idx/.bin, .ds, .npy "
        "(or set tasks.N.format)"
    )


def data_files(path: Path, fmt: str = "auto") -> list[Path]:
    """Every file whose bytes a source's content depends on: a Megatron `.idx` and its `.bin`, a datatrove `.ds`
    and its `.ds.index`, else the file itself (its fingerprint covers all of them)."""
    kind = detect_format(path, fmt)
    if kind == "megatron":
        return [path, path.with_suffix(".bin")]
    if kind == "datatrove":
        return [path, path.with_name(path.name + ".index")]
    return [path]


def _megatron_data(path: Path) -> bool:
    """A `.bin` next to a `.idx` of the same name is a Megatron dataset's data, read through its `.idx`."""
    return path.name.lower().endswith(".bin") and path.with_suffix(".idx").is_file()


class _Range(io.RawIOBase):
    """Bytes [start, end) of a plain file as a file object (a part of one large source, `Piece`)."""

    def __init__(self, path: Path, start: int, end: int | None) -> None:
        self._fh = open(path, "rb")
        self._fh.seek(start)
        self._left = None if end is None else max(0, end - start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)
        if self._left is not None:
            view = view[: self._left]
        n = self._fh.readinto(view)
        if self._left is not None:
            self._left -= n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def _open_stream(path: Path, start: int = 0, end: int | None = None):
    """The (decompressed) bytes of a `.txt` / `.jsonl` source as a binary file object; bytes [start, end) of a plain file."""
    name = path.name.lower()
    try:
        if start or end is not None:
            if name.endswith(_COMPRESSED):  # pragma: no cover - plan_units never splits a compressed file
                raise CptError(f"{path}: a compressed file cannot be read from the middle")
            return io.BufferedReader(_Range(path, start, end), _CHUNK)
        if name.endswith(".gz"):
            return gzip.open(path, "rb")
        if name.endswith(".xz"):
            return lzma.open(path, "rb")
        if name.endswith(".zst"):
            # buffered: zstandard's reader has no readline, which the line readers need
            return io.BufferedReader(zstandard.open(path, "rb"))
        return open(path, "rb")
    except _READ_ERRORS as err:
        raise CptError(f"{path}: cannot read: {err}") from None


def _chunks(path: Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    with _open_stream(path, start, end) as fh:
        while True:
            try:
                chunk = fh.read(_CHUNK)  # read at call time: a test shrinks it to put boundaries everywhere
            except _READ_ERRORS as err:
                raise CptError(f"{path}: cannot read: {err}") from None
            if not chunk:
                return
            yield chunk


def _lines(path: Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The file's lines (of bytes [start, end)), each ending in b"\\n" (but perhaps the last)."""
    with _open_stream(path, start, end) as fh:
        while True:
            try:
                line = fh.readline()
            except _READ_ERRORS as err:
                raise CptError(f"{path}: cannot read: {err}") from None
            if not line:
                return
            yield line


def split_blocks(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """`_BLANK_LINES.split(b"".join(chunks))`, block for block, holding only the unfinished block in memory.

    A match is final once the probe for its greedy tail stops before the end of the buffer (it failed
    on bytes already read). Every match attempt that ran into the end of the buffer started inside
    the buffer's trailing run of [ \\t\\r\\n] (a prefix of the pattern is whitespace only), so the
    next search resumes there rather than rescanning a long unfinished document.
    """
    buf = bytearray()
    scan = 0
    for chunk in chunks:
        buf += chunk
        start = 0
        for m in _BLANK_LINES.finditer(buf, scan):
            if _TAIL_PROBE.match(buf, m.end()).end() >= len(buf):
                break  # the separator may go on in the next chunk
            yield bytes(buf[start : m.start()])
            start = m.end()
        del buf[:start]
        scan = len(buf)
        while scan > 0 and buf[scan - 1] in b" \t\r\n":
            scan -= 1
    yield from _BLANK_LINES.split(bytes(buf))


def is_hf_dir(path: Path) -> bool:
    """A directory written by `datasets.save_to_disk` (one source), as opposed to a directory of shards."""
    return path.is_dir() and any((path / marker).is_file() for marker in _HF_MARKERS)


def _recognised(path: Path) -> bool:
    try:
        detect_format(path)
    except CptError:
        return False
    return not _megatron_data(path)


def _expand_one(entry: Path, where: str) -> list[Path]:
    text = str(entry)
    if _GLOB_CHARS.search(text):
        matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
        files = [f for m in matches for f in ([m] if m.is_file() or is_hf_dir(m) else _dir_files(m) if m.is_dir() else [])]
        if not files:
            raise CptError(f"{where}: no files match {text}")
        return files
    if not entry.exists() and entry.with_name(entry.name + ".idx").is_file():
        return [entry.with_name(entry.name + ".idx")]  # a Megatron dataset named by its prefix
    if not entry.exists():
        raise CptError(f"{where}: {entry}: data file or directory not found")
    if _megatron_data(entry):
        return [entry.with_suffix(".idx")]
    if entry.is_file() or is_hf_dir(entry):
        return [entry]
    files = _dir_files(entry)
    if not files:
        raise CptError(f"{where}: {entry}: directory holds no .txt / .jsonl / .parquet file (plain, .gz, .xz or .zst)")
    return files


def _dir_files(directory: Path) -> list[Path]:
    # sorted by the path below the directory, so shard order is the names' order on every machine
    found = []
    for f in directory.rglob("*"):
        rel = f.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file() or not _recognised(f):
            continue
        found.append((rel.as_posix(), f))
    return [f for _, f in sorted(found)]


def expand_sources(path: str | Path | list, where: str = "tasks.N.path") -> list[Path]:
    """The files a task's `path` names (a file, a directory, a glob, or a list of these), in reading
    order (see the module docstring); a missing file or an empty glob is a CptError naming `where`."""
    entries = list(path) if isinstance(path, (list, tuple)) else [path]
    if not entries:
        raise CptError(f"{where}: an empty list of sources")
    out: list[Path] = []
    seen: set[str] = set()
    for entry in entries:
        for f in _expand_one(Path(entry), where):
            key = os.path.abspath(f)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def _stat_key(f: Path) -> list[int]:
    st = f.stat()
    return [st.st_size, st.st_mtime_ns]


def _hash_files(path: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def content_fingerprint(path: Path, cache: Path | None = None) -> str:
    """sha256 over a file's name and bytes, or over every file (relative name + bytes) of a directory.

    With `cache` (a cache directory) the hash is kept in `<cache>/fingerprints/<hash of the resolved
    path>.json` with the (size, mtime_ns) of every file it covers, and returned from there while
    they all still match (see the module docstring for the trade-off); the value is the same as
    without a cache. The stats are taken before hashing and checked again after, so a file that
    changed while it was being hashed is not recorded.
    """
    path = Path(path)
    if not path.exists():
        raise CptError(f"{path}: data file not found (tasks.N.path)")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if cache is None:
        return _hash_files(path, files)
    resolved = str(path.resolve())
    # a directory's hash runs over all its files at once, so its entry holds every file's stat
    stats = [[str(f.relative_to(path)) if path.is_dir() else f.name, *_stat_key(f)] for f in files]
    entry_file = Path(cache) / "fingerprints" / f"{hashlib.sha256(resolved.encode()).hexdigest()[:32]}.json"
    try:
        entry = json.loads(entry_file.read_text(encoding="utf-8"))
        if entry.get("version") == _FINGERPRINT_VERSION and entry.get("path") == resolved and entry.get("files") == stats:
            return entry["fingerprint"]
    except (OSError, ValueError, AttributeError, KeyError):
        pass  # absent or unreadable: hash again and rewrite it
    fingerprint = _hash_files(path, files)
    if [[name, *_stat_key(f)] for (name, *_), f in zip(stats, files)] == stats:
        try:
            entry_file.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(entry_file, {"version": _FINGERPRINT_VERSION, "path": resolved, "files": stats, "fingerprint": fingerprint})
        except OSError:
            pass  # a read-only cache only costs the next run another pass over the bytes
    return fingerprint


def iter_documents(
    path: str | Path | list,
    fmt: str = "auto",
    text_field: str = "text",
    stats: ReadStats | None = None,
    documents: str = "auto",
    where: str = "tasks.N.path",
) -> Iterator[str]:
    """Yield the documents of a task's sources (`expand_sources`), file after file; raises CptError naming the file on bad input."""
    field = where.removesuffix(".path") if where.endswith(".path") else "tasks.N"
    if documents not in DOCUMENT_MODES:
        raise CptError(f"{field}.documents: {documents!r} is not one of {', '.join(DOCUMENT_MODES)}")
    stats = stats if stats is not None else ReadStats()
    with naming(field):
        for f in expand_sources(path, where):
            yield from _iter_file(f, fmt, text_field, stats, documents)


@contextlib.contextmanager
def naming(field: str):
    """The readers' errors say `tasks.N.text_field` (they do not know whose file they read): inside this, they name
    the caller's field instead (`tasks.2.text_field`, `tasks.0.sources.1.format`, `replay.sources.0.text_field`)."""
    try:
        yield
    except CptError as err:
        if field == "tasks.N" or "tasks.N." not in str(err):
            raise
        raise CptError(str(err).replace("tasks.N.", f"{field}.")) from None


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of one source file (end None: to its end); a whole file is Piece(path)."""

    path: Path
    start: int = 0
    end: int | None = None


def iter_pieces(pieces: list[Piece], fmt: str, text_field: str, stats: ReadStats, documents: str = "auto") -> Iterator[str]:
    """The documents of `pieces`, one after the other. Pieces cut at `boundary` offsets yield exactly the
    documents of reading their files whole (the unit of parallel, resumable preparation)."""
    for p in pieces:
        yield from _iter_file(p.path, fmt, text_field, stats, documents, p.start, p.end)


def splittable(path: Path, fmt: str = "auto") -> bool:
    """A plain (uncompressed) .txt / .jsonl file can be read from the middle, at a document boundary."""
    return path.is_file() and not path.name.lower().endswith(_COMPRESSED) and detect_format(path, fmt) in ("txt", "jsonl")


_WHITESPACE = b" \t\r\n"


def boundary(path: Path, offset: int, fmt: str = "auto", documents: str = "auto") -> int:
    """The first document boundary at or after byte `offset` of a `splittable` file (its size when none).

    Reading [0, b) and [b, size) then gives the documents of reading the whole file, in order:
    - lines (.jsonl, `documents: lines`): b follows a b"\\n";
    - blank-line blocks (.txt): b is the end of a `_BLANK_LINES` match that starts right after a byte that
      is not whitespace. No match of the whole-file split can span such a start (matches are whitespace
      only), so the whole-file split tries a match exactly there and finds this one (greedy, and read to
      where its tail probe stops, as `split_blocks` does).
    """
    size = path.stat().st_size
    if offset <= 0:
        return 0
    lines = detect_format(path, fmt) == "jsonl" or documents == "lines"
    with open(path, "rb") as fh:
        pos = offset - 1  # a line that ends at offset - 1 makes offset itself a boundary
        window = _CHUNK
        while pos < size:
            fh.seek(pos)
            buf = fh.read(window)
            if lines:
                i = buf.find(b"\n")
                if i >= 0:
                    return pos + i + 1
                pos += len(buf)
                continue
            for m in _BLANK_LINES.finditer(buf, 1):
                if buf[m.start() - 1] in _WHITESPACE:
                    continue
                if _TAIL_PROBE.match(buf, m.end()).end() >= len(buf) and pos + len(buf) < size:
                    break  # the separator may go on past this window: read again from here, further
                return pos + m.end()
            else:
                # no usable match: go on from the window's trailing whitespace run (a match may start there)
                keep = len(buf)
                while keep > 1 and buf[keep - 1] in _WHITESPACE:
                    keep -= 1
                if pos + len(buf) >= size:
                    return size
                pos += keep - 1 if keep > 1 else max(1, len(buf) - 1)
                continue
            window *= 2  # a separator cut by the window's end: a longer read from the same place
    return size


def _iter_file(
    path: Path, fmt: str, text_field: str, stats: ReadStats, documents: str, start: int = 0, end: int | None = None
) -> Iterator[str]:
    fmt = detect_format(path, fmt)
    if fmt in ("megatron", "datatrove", "tokens"):
        raise CptError(f"{path}: pre-tokenized ({fmt}) data has no text to read; set tokenizer.path to the tokenizer that made its ids")
    if fmt == "txt" and documents == "lines":
        yield from _iter_txt_lines(path, stats, start, end)
    elif fmt == "txt":
        yield from _iter_txt(path, stats, start, end)
    elif fmt == "jsonl":
        yield from _iter_jsonl(path, text_field, stats, start, end)
    elif fmt == "parquet":
        yield from _iter_parquet(path, text_field, stats)
    elif fmt == "hf":
        yield from _iter_hf(path, text_field, stats)
    else:  # pragma: no cover - guarded by the config schema
        raise CptError(f"{path}: unknown format {fmt!r}")


def _emit(text: str, stats: ReadStats) -> Iterator[str]:
    text = text.strip()
    if not text:
        stats.skipped_empty += 1
        return
    stats.documents += 1
    stats.bytes += len(text.encode("utf-8"))
    yield text


def _iter_txt(path: Path, stats: ReadStats, start: int = 0, end: int | None = None) -> Iterator[str]:
    for block in split_blocks(_chunks(path, start, end)):
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_non_utf8 += 1
            continue
        yield from _emit(text, stats)


def _text_lines(path: Path, stats: ReadStats, start: int = 0, end: int | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line that is valid UTF-8 (the others are counted in `stats`).

    bytes.splitlines also breaks at a lone \r; a \r ends a line of the file only before \n or at
    the end, so splitting each \n-terminated line numbers the lines as splitting the whole file did.
    Line numbers count from `start` (a part of a file begins at a line start: `boundary`).
    """
    raw_lines = (part for line in _lines(path, start, end) for part in line.splitlines())
    for lineno, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_non_utf8 += 1


def _iter_txt_lines(path: Path, stats: ReadStats, start: int = 0, end: int | None = None) -> Iterator[str]:
    # blank lines are spacing between documents here, not empty documents, so they are not counted
    for _, text in _text_lines(path, stats, start, end):
        yield from _emit(text, stats)


def _iter_jsonl(path: Path, field: str, stats: ReadStats, start: int = 0, end: int | None = None) -> Iterator[str]:
    for lineno, line in _text_lines(path, stats, start, end):
        where = f"{path}:{lineno}" if not start else f"{path}: line {lineno} of the part from byte {start}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CptError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or field not in obj:
            raise CptError(f"{where}: no {field!r} field (set tasks.N.text_field)")
        if not isinstance(obj[field], str):
            raise CptError(f"{where}: field {field!r} is not a string")
        yield from _emit(obj[field], stats)


def _iter_parquet(path: Path, field: str, stats: ReadStats) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for broken files
        raise CptError(f"{path}: not a readable parquet file: {err}") from None
    if field not in pf.schema_arrow.names:
        raise CptError(f"{path}: no column {field!r}; columns are {pf.schema_arrow.names} (set tasks.N.text_field)")
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is None:
                stats.skipped_empty += 1
                continue
            yield from _emit(str(text), stats)


def _iter_hf(path: Path, field: str, stats: ReadStats) -> Iterator[str]:
    try:
        import datasets  # why lazy: optional dependency (cpt[datasets]), needed only for a save_to_disk directory
    except ImportError:  # pragma: no cover
        raise CptError(f"{path}: reading a datasets directory needs `datasets` (pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise CptError(f"{path}: not a directory written by save_to_disk: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise CptError(f"{path}: a DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    if field not in ds.column_names:
        raise CptError(f"{path}: no column {field!r}; columns are {ds.column_names} (set tasks.N.text_field)")
    for batch in ds.select_columns([field]).iter(batch_size=4096):
        for text in batch[field]:
            if text is None:
                stats.skipped_empty += 1
                continue
            yield from _emit(str(text), stats)
