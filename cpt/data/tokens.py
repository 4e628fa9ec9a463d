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

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpt import atomic
from cpt.config import TaskConfig
from cpt.data.mixture import concat
from cpt.data.prepare import PLAN_VERSION, Settings, finalize, open_shards, plan_units, run_units, start_partial
from cpt.data.readers import content_fingerprint, data_files, detect_format, expand_sources, naming
from cpt.data.tokenizer import TextTokenizer
from cpt.data.views import TokenView
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
    train: np.ndarray | TokenView  # 1-D, memory-mapped (a TokenView over the entry's shards)
    val: np.ndarray | TokenView
    directory: Path
    meta: dict
    parts: list[TaskTokens] | None = None  # a task of weighted sources (cpt.data.mixture): each source's tokens
    weights: list[float] | None = None


def task_key(task: TaskConfig, cache: Path | None = None, index: int | None = None) -> str:
    """A configured task's content key: its source's (`source_key`), or for `sources` one over every source's key and weight."""
    field = f"tasks.{index}" if index is not None else "tasks.N"
    if task.sources is None:
        return source_key(task.path, task.format, task.text_field, cache, task.documents, f"{field}.path")
    h = hashlib.sha256(b"sources")
    for i, (part, w) in enumerate(zip(task.parts(), task.weights)):
        h.update(
            f"|{source_key(part.path, part.format, part.text_field, cache, part.documents, f'{field}.sources.{i}.path')}:{w!r}".encode()
        )
    return h.hexdigest()[:24]


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
    with naming(where.removesuffix(".path") if where.endswith(".path") else "tasks.N"):  # errors name `where`'s field
        return _source_key(path, fmt, text_field, cache, documents, where)


def _source_key(path: str | Path | list, fmt: str, text_field: str, cache: Path | None, documents: str, where: str) -> str:
    files = expand_sources(path, where)
    h = hashlib.sha256()
    if len(files) == 1 and len(data_files(files[0], fmt)) == 1:
        h.update(content_fingerprint(files[0], cache).encode())
        h.update(f"|{detect_format(files[0], fmt)}|{text_field}".encode())
    else:
        # a pre-tokenized source counts its index and its data file: both are hashed
        listed = [d for f in files for d in data_files(f, fmt)]
        root = Path(os.path.commonpath([os.path.abspath(f) for f in listed])) if len(listed) > 1 else listed[0].parent
        for f in listed:
            name = Path(os.path.abspath(f)).relative_to(root).as_posix()
            h.update(f"{name}|{detect_format(f, fmt) if f in files else 'data'}|{content_fingerprint(f, cache)}\n".encode())
        h.update(f"|{len(files)} files|{text_field}".encode())
    if documents == "lines":
        h.update(b"|documents=lines")
    return h.hexdigest()[:24]


def validation_mask(first: int, n: int, val_fraction: float) -> np.ndarray:
    """`is_validation` of documents first … first + n - 1, vectorised (the same float64 operations, so the same answers)."""
    return ((np.arange(first, first + n, dtype=np.int64) + 1) * _PHI) % 1.0 < val_fraction


def entry_key(source: str, tok: TextTokenizer, val_fraction: float, documents: str = "auto") -> str:
    # "auto" adds nothing, so entries written before the documents setting existed stay valid
    mode = "" if documents in ("auto", "blank-lines") else f"|documents={documents}"
    return hashlib.sha256(f"{CACHE_VERSION}|{source}|{tok.fingerprint}|{val_fraction}{mode}".encode()).hexdigest()[:24]


@contextlib.contextmanager
def _entry_lock(directory: Path):
    """One process of this machine (or of a filesystem with working flock) builds an entry; the others wait, then find it."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # pragma: no cover - a filesystem without locks: the atomic rename still keeps entries whole
            pass
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)


def prepare_task(
    name: str,
    path: str | Path | list,
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
    dtype: str | None = None,
    settings: Settings | None = None,
) -> TaskTokens | None:
    """Tokenize one task's sources (a file, directory, glob or list: `expand_sources`) into the cache (once) and memory-map it.

    `key_of_source` is `source_key(path, fmt, text_field, documents=documents)` when the caller has
    already hashed the source (hashing reads every byte, so a run hashes each file once); it covers
    the `documents` mode, which is also hashed into the entry's key here so a caller's key made
    without it cannot bring back an entry split the other way. `where` names the task in errors
    (`tasks.0 (fr)`); by default `task 'fr'`. `dtype`: the token type of raw `.bin` token files.
    `settings` (`cpt.data.prepare.Settings`): workers, shard size, and a `rank`/`world` share of the
    units for preparing on several machines — with world > 1 only this share is made and None is
    returned (the last `prepare_task` with world 1 finds the units done and finishes the entry).
    """
    settings = settings or Settings()
    where = where or f"task {name!r}"
    # the config field the errors name: `tasks.0`, `tasks.1.sources.2`, `replay.sources.0` (as the caller says)
    field = where.split(" ")[0] if where.startswith(("tasks.", "replay.sources.")) else "tasks.N"
    files = expand_sources(path, f"{field}.path")
    source = key_of_source or source_key(path, fmt, text_field, documents=documents, where=f"{field}.path")
    directory = cache / "tokens" / entry_key(source, tok, val_fraction, documents)
    if not (directory / "meta.json").is_file():
        with naming(field):
            if settings.world > 1:
                _build(name, files, tok, directory, fmt, text_field, val_fraction, log, documents, where, field, dtype, settings)
                return None
            with _entry_lock(directory):
                if not (directory / "meta.json").is_file():
                    _build(name, files, tok, directory, fmt, text_field, val_fraction, log, documents, where, field, dtype, settings)
    return open_entry(name, directory, tok)


def _build(name, files, tok, directory, fmt, text_field, val_fraction, log, documents, where, field, dtype_hint, settings) -> None:
    t0 = time.perf_counter()
    dtype = token_dtype(tok.vocab_size)
    units = plan_units(files, fmt, documents, max(1, int(settings.shard_mb * 1e6)))
    partial = directory.parent / f".{directory.name}.partial"
    plan = {"version": PLAN_VERSION, "units": [u.describe() for u in units], "dtype": dtype.name, "tokenizer": tok.fingerprint}
    start_partial(partial, plan, log)
    results = run_units(units, partial, tok, dtype, fmt, text_field, documents, dtype_hint, settings, name, f"{field}.path")
    if settings.world > 1:
        log(f"prepared {name}: share {settings.rank} of {settings.world} ({len(results)} shard(s))")
        return
    for r in results.values():
        for w in r.warnings:
            log(f"warning: {w}")
    shown = str(files[0]) if len(files) == 1 else f"{len(files)} files ({files[0]}, …)"
    documents_total = sum(r.documents for r in results.values())
    if documents_total == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise CptError(f"{where}: {shown}: no documents (empty file, or every document skipped)")
    meta = finalize(
        partial,
        units,
        results,
        val_fraction,
        {
            "source": str(files[0]) if len(files) == 1 else [str(f) for f in files],
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "tokenizer": tok.fingerprint,
            "val_fraction": val_fraction,
        },
    )
    if meta["val_tokens"] == 0 or meta["train_tokens"] == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise CptError(_too_few_message(where, field, shown, files, fmt, documents, documents_total, val_fraction))
    seconds = time.perf_counter() - t0
    meta["seconds"] = round(seconds, 3)
    atomic.write_json(partial / "meta.json", meta)
    atomic.replace_dir(partial, directory, replace=False)
    mbs = meta["bytes"] / 1e6 / max(seconds, 1e-9)
    skipped = f", skipped {meta['skipped_non_utf8']} non-UTF-8 document(s)" if meta["skipped_non_utf8"] else ""
    log(
        f"tokenized {name}: {documents_total} docs, {meta['bytes'] / 1e6:.2f} MB → "
        f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens in {seconds:.1f}s ({mbs:.1f} MB/s, "
        f"{len(units)} shard(s)){skipped}"
    )


def open_entry(name: str, directory: Path, tok: TextTokenizer | None = None) -> TaskTokens:
    """Memory-map a prepared entry: its shards and train / validation views (or the train.bin / val.bin of an older entry)."""
    meta = json.loads((directory / "meta.json").read_text())
    if tok is not None and meta["vocab_size"] != tok.vocab_size:  # pragma: no cover - the key includes the tokenizer
        raise CptError(f"{directory}: cached tokens were made with another tokenizer; delete the directory")
    if meta.get("layout") == "shards":
        shards = open_shards(directory, meta)
        return TaskTokens(name, TokenView.load(shards, directory / "train"), TokenView.load(shards, directory / "val"), directory, meta)
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(directory / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(directory / "val.bin", dtype=dtype, mode="r")
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
    task: TaskConfig,
    tok: TextTokenizer,
    cache: Path,
    log=None,
    key_of_source: str | None = None,
    index: int | None = None,
    settings: Settings | None = None,
    field: str | None = None,
) -> TaskTokens | None:
    """`prepare_task` for one configured task (`tasks.<index>` of a run config, or `field` — `replay.sources.0` for a
    replay source as a task — named so in errors); a task of `sources` prepares each source and returns their mixture
    (None for a `settings.world` > 1 share)."""
    extra = {"log": log} if log is not None else {}
    label = field or (f"tasks.{index}" if index is not None else "tasks.N")
    named = index is not None or field is not None

    def one(part: TaskConfig, where: str | None, key: str | None) -> TaskTokens | None:
        return prepare_task(
            part.name,
            part.path,
            tok,
            cache,
            fmt=part.format,
            text_field=part.text_field,
            val_fraction=part.val_fraction,
            key_of_source=key,
            documents=part.documents,
            where=where,
            dtype=part.dtype,
            settings=settings,
            **extra,
        )

    if task.sources is None:
        return one(task, f"{label} ({task.name})" if named else None, key_of_source)
    parts = [
        one(
            part,
            f"{label}.sources.{i} ({task.name})",
            source_key(part.path, part.format, part.text_field, cache, part.documents, f"{label}.sources.{i}.path"),
        )
        for i, part in enumerate(task.parts())
    ]
    if any(p is None for p in parts):
        return None
    meta = {
        "sources": [p.meta.get("source") for p in parts],
        "weights": task.weights,
        "documents": sum(p.meta["documents"] for p in parts),
        "train_tokens": sum(p.meta["train_tokens"] for p in parts),
        "val_tokens": sum(p.meta["val_tokens"] for p in parts),
        "max_train_id": max(p.meta.get("max_train_id", -1) for p in parts),
        "max_val_id": max(p.meta.get("max_val_id", -1) for p in parts),
        "layout": "shards",
    }
    return TaskTokens(
        task.name, concat([p.train for p in parts]), concat([p.val for p in parts]), parts[0].directory, meta, parts, task.weights
    )


def check_token_range(task: TaskTokens, vocab_size: int) -> None:
    """Ids beyond the model's embedding table would crash deep inside the model; say so up front.

    Uses the maxima the entry's meta.json records (`max_train_id`, `max_val_id`); scans a split only
    for an entry written before they were stored."""
    for split, arr in (("train", task.train), ("val", task.val)):
        top = task.meta.get(f"max_{split}_id")
        if not isinstance(top, int):
            top = int(np.max(np.asarray(arr))) if len(arr) else 0
        if top >= vocab_size:
            shown = f"{task.directory} ({split} split)" if task.meta.get("layout") == "shards" else task.directory / f"{split}.bin"
            raise CptError(
                f"task {task.name!r}: token id {top} in {shown} is outside the model's vocabulary ({vocab_size}); use the model's own tokenizer"
            )
