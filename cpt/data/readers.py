"""Readers: turn a task's training source into a stream of documents (strings).

A *document* is the unit that gets an EOS token after it and that the validation split is made
of. In a `.txt` file (optionally `.gz` / `.xz`) documents are separated by one or more blank
lines; in `.jsonl` each line is a document (its `text_field`); in `.parquet` and HF `datasets`
directories each row is one. Text that is not valid UTF-8 is skipped document by document and
counted (`ReadStats.skipped_non_utf8`), so one bad byte does not cost a whole corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from cpt.errors import CptError

_BLANK_LINES = re.compile(rb"\r?\n[ \t]*\r?\n(?:[ \t]*\r?\n)*")


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
    for suffix in (".gz", ".xz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(".txt") or name.endswith(".md") or name.endswith(".text"):
        return "txt"
    if name.endswith(".jsonl") or name.endswith(".json"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise CptError(f"{path}: unknown data format; use .txt, .jsonl, .parquet or a datasets directory (or set tasks.N.format)")


def _open_bytes(path: Path) -> bytes:
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            return gzip.decompress(path.read_bytes())
        if name.endswith(".xz"):
            return lzma.decompress(path.read_bytes())
        return path.read_bytes()
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise CptError(f"{path}: cannot read: {err}") from None


def content_fingerprint(path: Path) -> str:
    """sha256 over a file's bytes, or over every file (name + bytes) of a directory."""
    if not path.exists():
        raise CptError(f"{path}: data file not found (tasks.N.path)")
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def iter_documents(path: str | Path, fmt: str = "auto", text_field: str = "text", stats: ReadStats | None = None) -> Iterator[str]:
    """Yield the documents of one source; raises CptError naming the file on bad input."""
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    if not path.exists():
        raise CptError(f"{path}: data file not found")
    fmt = detect_format(path, fmt)
    if fmt == "txt":
        yield from _iter_txt(path, stats)
    elif fmt == "jsonl":
        yield from _iter_jsonl(path, text_field, stats)
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


def _iter_txt(path: Path, stats: ReadStats) -> Iterator[str]:
    data = _open_bytes(path)
    for block in _BLANK_LINES.split(data):
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_non_utf8 += 1
            continue
        yield from _emit(text, stats)


def _iter_jsonl(path: Path, field: str, stats: ReadStats) -> Iterator[str]:
    data = _open_bytes(path)
    for lineno, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_non_utf8 += 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CptError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or field not in obj:
            raise CptError(f"{path}:{lineno}: no {field!r} field (set tasks.N.text_field)")
        if not isinstance(obj[field], str):
            raise CptError(f"{path}:{lineno}: field {field!r} is not a string")
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
