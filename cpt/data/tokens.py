"""Token files: each task's text tokenized once into memory-mapped train / validation arrays.

Layout of one cache entry (`<cache>/tokens/<key>/`): `train.bin` and `val.bin` are flat arrays of
token ids (uint16 when the vocabulary fits, else uint32) with the EOS id after every document,
and `meta.json` records counts and dtype. An entry is written whole (`cpt.atomic.written_whole`): it
is complete or absent, never a part. The key hashes the source's bytes, the tokenizer and
the split settings, so a second run (or a second strategy over the same tasks) re-uses it.
`meta.json` also records the largest token id of each split (`max_train_id`, `max_val_id`, EOS
included), so `check_token_range` on a warm start reads no token file; entries written before
these fields existed are scanned instead.

Memory: documents are streamed from the reader and tokenized `batch_docs` (512) at a time, so
preparing a task holds one batch of documents and ids, never the whole source or all its ids.

The validation split is fixed and made of whole documents: document i is held out when the
fractional part of (i + 1)·φ (golden ratio) is below `val_fraction`. That spreads held-out
documents evenly through the file, does not depend on the tokenizer, and never changes when
other settings do. Held-out documents are never trained on (nor used to train a tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpt import atomic
from cpt.config import TaskConfig
from cpt.data.readers import ReadStats, content_fingerprint, detect_format, expand_sources, iter_documents
from cpt.data.tokenizer import TextTokenizer
from cpt.errors import CptError

_PHI = (math.sqrt(5) - 1) / 2
CACHE_VERSION = "1"


def is_validation(doc_index: int, val_fraction: float) -> bool:
    return ((doc_index + 1) * _PHI) % 1.0 < val_fraction


def split_documents(docs: Iterator[str], val_fraction: float, want: str) -> Iterator[str]:
    """Only the `train` or only the `val` documents of a stream."""
    for i, doc in enumerate(docs):
        if is_validation(i, val_fraction) == (want == "val"):
            yield doc


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


@dataclass
class TaskTokens:
    name: str
    train: np.ndarray  # memmap, 1-D
    val: np.ndarray  # memmap, 1-D
    directory: Path
    meta: dict


def source_key(
    path: str | Path | list, fmt: str, text_field: str, cache: Path | None = None, documents: str = "auto", where: str = "tasks.N.path"
) -> str:
    """A task source's content key; with `cache` (the cache directory) the content hash is kept across
    runs by (path, size, mtime_ns), so a warm start does not re-read the bytes (`content_fingerprint`).

    One file (or one datasets directory) read as blank-line blocks keeps the key it always had
    (sha256 of its fingerprint + `|format|text_field`), so existing caches stay valid. Several files
    hash each file's name (relative to their common folder), format and fingerprint in reading order,
    so renaming, reordering, adding or removing a shard changes the key. `documents: lines` is part
    of the key (it splits the same bytes into other documents); `auto` and `blank-lines` read alike."""
    files = expand_sources(path, where)
    h = hashlib.sha256()
    if len(files) == 1:
        h.update(content_fingerprint(files[0], cache).encode())
        h.update(f"|{detect_format(files[0], fmt)}|{text_field}".encode())
    else:
        root = Path(os.path.commonpath([os.path.abspath(f) for f in files]))
        for f in files:
            name = Path(os.path.abspath(f)).relative_to(root).as_posix()
            h.update(f"{name}|{detect_format(f, fmt)}|{content_fingerprint(f, cache)}\n".encode())
        h.update(f"|{len(files)} files|{text_field}".encode())
    if documents == "lines":
        h.update(b"|documents=lines")
    return h.hexdigest()[:24]


def _write_tokens(docs: Iterator[str], tok: TextTokenizer, out: Path, dtype: np.dtype, batch_docs: int = 512) -> tuple[int, int]:
    """Tokenize in batches (the Rust tokenizer parallelises each batch) and append with EOS; returns
    (tokens written, largest id written or -1 when none)."""
    count = 0
    top = -1
    eos = tok.eos_id
    with open(out, "wb") as fh:
        batch: list[str] = []

        def flush() -> int:
            nonlocal top
            if not batch:
                return 0
            ids = tok.encode_batch(batch)
            flat = np.fromiter((t for seq in ids for t in (*seq, eos)), dtype=np.int64, count=sum(len(s) + 1 for s in ids))
            if flat.size and (flat.max() >= np.iinfo(dtype).max + 1 or flat.min() < 0):
                raise CptError(f"{out}: token id {int(flat.max())} does not fit {dtype}")
            fh.write(flat.astype(dtype).tobytes())
            if flat.size:
                top = max(top, int(flat.max()))
            batch.clear()
            return int(flat.size)

        for doc in docs:
            batch.append(doc)
            if len(batch) >= batch_docs:
                count += flush()
        count += flush()
    return count, top


def prepare_task(
    name: str,
    path: str | Path,
    tok: TextTokenizer,
    cache: Path,
    *,
    fmt: str = "auto",
    text_field: str = "text",
    val_fraction: float = 0.05,
    log=print,
    key_of_source: str | None = None,
    documents: str = "auto",
    where: str | None = None,
) -> TaskTokens:
    """Tokenize one task's sources (a file, directory, glob or list: `expand_sources`) into the cache (once) and memory-map it.

    `key_of_source` is `source_key(path, fmt, text_field, documents=documents)` when the caller has
    already hashed the source (hashing reads every byte, so a run hashes each file once); it covers
    the `documents` mode, which is also hashed into the entry's key here so a caller's key made
    without it cannot bring back an entry split the other way. `where` names the task in errors
    (`tasks.0 (fr)`); by default `task 'fr'`.
    """
    where = where or f"task {name!r}"
    field = where.split(" ")[0] if where.startswith("tasks.") else "tasks.N"
    files = expand_sources(path, f"{field}.path")
    source = key_of_source or source_key(path, fmt, text_field, documents=documents, where=f"{field}.path")
    # "auto" adds nothing, so entries written before the documents setting existed stay valid
    mode = "" if documents in ("auto", "blank-lines") else f"|documents={documents}"
    key = hashlib.sha256(f"{CACHE_VERSION}|{source}|{tok.fingerprint}|{val_fraction}{mode}".encode()).hexdigest()[:24]
    directory = cache / "tokens" / key
    if not (directory / "meta.json").is_file():
        dtype = token_dtype(tok.vocab_size)
        t0 = time.perf_counter()
        stats = ReadStats()
        counts = {}
        tops = {}
        val_stats = ReadStats()
        # written whole (a failure or a kill leaves no entry); replace=False: when another process
        # finished the same entry first, its entry is kept and ours discarded
        with atomic.written_whole(directory, replace=False) as tmp:
            counts["train"], tops["train"] = _write_tokens(
                split_documents(iter_documents(files, fmt, text_field, stats, documents), val_fraction, "train"),
                tok,
                tmp / "train.bin",
                dtype,
            )
            counts["val"], tops["val"] = _write_tokens(
                split_documents(iter_documents(files, fmt, text_field, val_stats, documents), val_fraction, "val"),
                tok,
                tmp / "val.bin",
                dtype,
            )
            seconds = time.perf_counter() - t0
            shown = str(files[0]) if len(files) == 1 else f"{len(files)} files ({files[0]}, …)"
            if stats.documents == 0:
                raise CptError(f"{where}: {shown}: no documents (empty file, or every document skipped)")
            if counts["val"] == 0 or counts["train"] == 0:
                raise CptError(_too_few_message(where, field, shown, files, fmt, documents, stats.documents, val_fraction))
            meta = {
                "source": str(path) if len(files) == 1 else [str(f) for f in files],
                "documents": stats.documents,
                "skipped_non_utf8": stats.skipped_non_utf8,
                "bytes": stats.bytes,
                "train_tokens": counts["train"],
                "val_tokens": counts["val"],
                "max_train_id": tops["train"],
                "max_val_id": tops["val"],
                "dtype": dtype.name,
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "tokenizer": tok.fingerprint,
                "val_fraction": val_fraction,
                "seconds": round(seconds, 3),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        mbs = stats.bytes / 1e6 / max(seconds, 1e-9)
        skipped = f", skipped {stats.skipped_non_utf8} non-UTF-8 document(s)" if stats.skipped_non_utf8 else ""
        log(
            f"tokenized {name}: {stats.documents} docs, {stats.bytes / 1e6:.2f} MB → "
            f"{counts['train']:,} train + {counts['val']:,} val tokens in {seconds:.1f}s ({mbs:.1f} MB/s){skipped}"
        )
    meta = json.loads((directory / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(directory / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(directory / "val.bin", dtype=dtype, mode="r")
    if meta["vocab_size"] != tok.vocab_size:  # pragma: no cover - the key includes the tokenizer
        raise CptError(f"{directory}: cached tokens were made with another tokenizer; delete the directory")
    return TaskTokens(name, train, val, directory, meta)


def _too_few_message(where: str, field: str, shown: str, files: list[Path], fmt: str, documents: str, n: int, val_fraction: float) -> str:
    """Say what a document is (and the setting that changes it) when too few of them hold out a validation split."""
    head = f"{where}: {shown} holds {n} document(s), too few to hold out a validation split ({field}.val_fraction={val_fraction})"
    if all(detect_format(f, fmt) == "txt" for f in files) and documents != "lines":
        return (
            f"{head} — in a .txt file a document is a block separated by a blank line; if every line is a document, "
            f"set {field}.documents: lines (or add documents / raise {field}.val_fraction)"
        )
    return f"{head}; add documents or raise {field}.val_fraction"


def prepare_for(
    task: TaskConfig, tok: TextTokenizer, cache: Path, log=None, key_of_source: str | None = None, index: int | None = None
) -> TaskTokens:
    """`prepare_task` for one configured task (`tasks.<index>` of a run config, named so in errors)."""
    extra = {"log": log} if log is not None else {}
    return prepare_task(
        task.name,
        task.path,
        tok,
        cache,
        fmt=task.format,
        text_field=task.text_field,
        val_fraction=task.val_fraction,
        key_of_source=key_of_source,
        documents=task.documents,
        where=f"tasks.{index} ({task.name})" if index is not None else None,
        **extra,
    )


def check_token_range(task: TaskTokens, vocab_size: int) -> None:
    """Ids beyond the model's embedding table would crash deep inside the model; say so up front.

    Uses the maxima `prepare_task` stored in meta.json; scans the token file only for an entry
    written before they were stored."""
    for split, arr in (("train", task.train), ("val", task.val)):
        top = task.meta.get(f"max_{split}_id")
        if not isinstance(top, int):
            top = int(arr.max()) if arr.size else 0
        if top >= vocab_size:
            raise CptError(
                f"task {task.name!r}: token id {top} in {task.directory / (split + '.bin')} is outside the "
                f"model's vocabulary ({vocab_size}); use the model's own tokenizer"
            )
