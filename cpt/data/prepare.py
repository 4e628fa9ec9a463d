"""Preparing one task: its sources → token shards with a document index → train / validation views.

The work is cut into *units* (`plan_units`): consecutive source files packed up to `shard_mb` MB,
and a plain `.txt` / `.jsonl` file larger than that cut at document boundaries
(`cpt.data.readers.boundary`), so a 100 GB file is many units. A compressed file, a parquet file
and a datasets directory are one unit each (they cannot be read from the middle). A pre-tokenized
file (Megatron `.idx`/`.bin`, datatrove `.ds`, `.npy` / `.bin` token files) is one unit that is not
tokenized: its tokens stay where they are and only its document index is recorded.

Each unit is tokenized on its own — in this process, in `workers` processes of this machine, or on
another machine (`rank`/`world`: units u with u % world == rank, e.g. one datatrove task each) —
into `shard-NNNNN.bin` (every document's ids, then EOS) and `shard-NNNNN.ends.npy` (int64, the
token offset where each document ends), then `shard-NNNNN.json` (its counts) is written last: a
unit whose json exists is done, so a killed preparation continues with the units not done yet.
Units are independent of each other and of the number of workers: the files are the same however
the work was spread.

When every unit is done, `finalize` numbers the documents across units (file order, then position
in the file: the order of reading every source whole) and applies the fixed validation rule
(`cpt.data.tokens.is_validation`) to those global indices; the training split is then the runs of
consecutive training documents, the validation split the others (`cpt.data.views.TokenView`), and
`meta.json` (the manifest: documents, bytes, train/val tokens, largest id per split, tokenizer,
shards) is written. The whole entry is built in a hidden `.KEY.partial` directory next to it and
renamed into place when complete, so a reader sees a complete entry or none.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cpt import atomic
from cpt.data.readers import Piece, ReadStats, boundary, detect_format, iter_pieces, splittable
from cpt.errors import CptError

PLAN_VERSION = 1
DEFAULT_SHARD_MB = 256.0
PRETOKENIZED = ("megatron", "datatrove", "tokens")


@dataclass
class Unit:
    index: int
    pieces: list[Piece]
    bytes: int
    kind: str = "text"  # or a pre-tokenized format

    def describe(self) -> list:
        return [self.kind, [[str(p.path), p.start, p.end] for p in self.pieces]]


@dataclass
class UnitResult:
    documents: int = 0
    tokens: int = 0
    max_id: int = -1
    bytes: int = 0
    skipped_non_utf8: int = 0
    seconds: float = 0.0
    # where the tokens lie: this entry's shard-NNNNN.bin, or a pre-tokenized file read in place
    file: str | None = None
    dtype: str = ""
    offset: int = 0  # bytes before the first token (an .npy header)
    warnings: list[str] = field(default_factory=list)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def plan_units(files: list[Path], fmt: str, documents: str, shard_bytes: int) -> list[Unit]:
    """Cut a task's files into units of about `shard_bytes` (see the module docstring); cost: a stat per
    file and a short read at each cut of a large file."""
    units: list[Unit] = []
    current: list[Piece] = []
    current_bytes = 0

    def close() -> None:
        nonlocal current, current_bytes
        if current:
            units.append(Unit(len(units), current, current_bytes))
        current, current_bytes = [], 0

    for f in files:
        kind = detect_format(f, fmt)
        size = _size(f)
        if kind in PRETOKENIZED:
            close()
            units.append(Unit(len(units), [Piece(f)], size, kind))
            continue
        if size > shard_bytes and splittable(f, fmt):
            close()
            start = 0
            while start < size:
                end = boundary(f, start + shard_bytes, fmt, documents)
                units.append(Unit(len(units), [Piece(f, start, None if end >= size else end)], min(end, size) - start))
                start = end
            continue
        current.append(Piece(f))
        current_bytes += size
        if current_bytes >= shard_bytes:
            close()
    close()
    return units


# ------------------------------------------------------------------ one unit
def _flat_ids(ids: list[list[int]], eos: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(the documents' ids each followed by EOS, as `dtype`; each document's length incl. EOS)."""
    lens = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
    total = int(lens.sum())
    body = np.fromiter((t for s in ids for t in s), dtype=np.int64, count=total)
    out = np.full(total + len(ids), eos, dtype=np.int64)
    # document d's ids go to positions shifted by the d EOS tokens before it
    out[np.arange(total) + np.repeat(np.arange(len(ids)), lens)] = body
    if out.size and (out.max() > np.iinfo(dtype).max or out.min() < 0):
        raise CptError(f"token id {int(out.max())} does not fit {dtype}")
    return out.astype(dtype), lens + 1


def _unit_name(index: int) -> str:
    return f"shard-{index:05d}"


def tokenize_unit(unit: Unit, encode, eos: int, dtype: np.dtype, fmt: str, text_field: str, documents: str, out: Path) -> UnitResult:
    """Tokenize one unit into `out/shard-NNNNN.bin` + `.ends.npy` (+ `.json` last: the unit is done)."""
    t0 = time.perf_counter()
    name = _unit_name(unit.index)
    stats = ReadStats()
    res = UnitResult(file=f"{name}.bin", dtype=dtype.name)
    ends: list[np.ndarray] = []
    tops: list[np.ndarray] = []  # each document's largest id: the exact maximum of each split at finalize
    written = 0
    tmp_bin = out / f".{name}.bin.tmp-{os.getpid()}"
    with open(tmp_bin, "wb") as fh:
        batch: list[str] = []

        def flush() -> None:
            nonlocal written
            if not batch:
                return
            flat, lens = _flat_ids(encode(batch), eos, dtype)
            fh.write(flat.tobytes())
            ends.append(written + np.cumsum(lens))
            tops.append(np.maximum.reduceat(flat, np.concatenate([[0], np.cumsum(lens)[:-1]])).astype(np.int64))
            written += int(flat.size)
            if flat.size:
                res.max_id = max(res.max_id, int(flat.max()))
            batch.clear()

        for doc in iter_pieces(unit.pieces, fmt, text_field, stats, documents):
            batch.append(doc)
            if len(batch) >= 512:
                flush()
        flush()
    os.replace(tmp_bin, out / f"{name}.bin")
    atomic.write_bytes(out / f"{name}.ends.npy", _npy_bytes(np.concatenate(ends) if ends else np.zeros(0, np.int64)))
    atomic.write_bytes(out / f"{name}.tops.npy", _npy_bytes(np.concatenate(tops) if tops else np.zeros(0, np.int64)))
    res.documents, res.tokens, res.bytes, res.skipped_non_utf8 = stats.documents, written, stats.bytes, stats.skipped_non_utf8
    res.seconds = round(time.perf_counter() - t0, 3)
    atomic.write_json(out / f"{name}.json", {"unit": unit.describe(), **asdict(res)})
    return res


def index_unit(unit: Unit, eos: int, vocab_size: int, dtype_hint: str | None, out: Path, where: str) -> UnitResult:
    """Record a pre-tokenized file's document index (its tokens are read in place); checks its ids fit the vocabulary."""
    from cpt.data import pretokenized  # why lazy: only tasks with pre-tokenized inputs need it

    t0 = time.perf_counter()
    path = unit.pieces[0].path
    shard = pretokenized.open_shard(path, unit.kind, dtype=dtype_hint, eos_id=eos, where=where)
    top = pretokenized.max_token_id(shard)
    if top >= vocab_size:
        raise CptError(
            f"{where}: {shard.path}: token id {top} is outside the tokenizer's vocabulary ({vocab_size}); "
            "these ids were made with another tokenizer: set tokenizer.path to the one that made them"
        )
    res = UnitResult(
        documents=shard.documents(),
        tokens=len(shard.tokens),
        max_id=top,
        bytes=shard.path.stat().st_size,
        file=str(shard.path.resolve()),
        dtype=shard.tokens.dtype.name,
        offset=int(getattr(shard.tokens, "offset", 0)),
    )
    if res.documents and not pretokenized.ends_with_eos(shard, eos):
        res.warnings.append(
            f"{where}: {shard.path}: documents do not end with the EOS token ({eos}); windows will run from one "
            "document into the next without a separator (Megatron: preprocess with --append-eod)"
        )
    name = _unit_name(unit.index)
    atomic.write_bytes(out / f"{name}.ends.npy", _npy_bytes(np.asarray(shard.doc_ends, dtype=np.int64)))
    res.seconds = round(time.perf_counter() - t0, 3)
    atomic.write_json(out / f"{name}.json", {"unit": unit.describe(), **asdict(res)})
    return res


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def unit_done(out: Path, unit: Unit) -> UnitResult | None:
    """The result of a unit finished earlier (its json names the same pieces), else None."""
    try:
        rec = json.loads((out / f"{_unit_name(unit.index)}.json").read_text())
    except (OSError, ValueError):
        return None
    if rec.pop("unit", None) != json.loads(json.dumps(unit.describe())):
        return None
    return UnitResult(**rec)


# ------------------------------------------------------------------ workers
_WORKER: dict = {}


def _worker_init(tokenizer_json: str, threads: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # before the tokenizer's thread pool starts
    from tokenizers import Tokenizer

    _WORKER["tok"] = Tokenizer.from_str(tokenizer_json)


def _worker_run(args) -> tuple[int, UnitResult]:
    unit, eos, dtype, fmt, text_field, documents, out = args
    tok = _WORKER["tok"]
    encode = _encoder(tok)
    return unit.index, tokenize_unit(unit, encode, eos, np.dtype(dtype), fmt, text_field, documents, Path(out))


def _encoder(tok):
    """ids of a batch of texts; `encode_batch_fast` (no offsets) where the tokenizers version has it: the same ids, faster."""
    fast = getattr(tok, "encode_batch_fast", None)
    if fast is not None:
        return lambda texts: [e.ids for e in fast(texts, add_special_tokens=False)]
    return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def resolve_workers(workers: int | str | None, todo: int) -> int:
    """Processes for `todo` shards. `auto`: one per core, but at least two shards per worker — a worker gets its
    share of the cores, so with fewer shards the cores would idle (measured: benchmarks/prepare.py, README)."""
    if workers in (None, "auto", 0):
        return max(1, min(os.cpu_count() or 1, todo // 2))
    return max(1, min(int(workers), todo))


@dataclass
class Settings:
    """How the work is spread; none of it changes the files written."""

    workers: int | str | None = "auto"
    shard_mb: float = DEFAULT_SHARD_MB
    rank: int = 0
    world: int = 1
    progress: bool = True


def run_units(
    units: list[Unit],
    out: Path,
    tok,
    dtype: np.dtype,
    fmt: str,
    text_field: str,
    documents: str,
    dtype_hint: str | None,
    settings: Settings,
    name: str,
    where: str,
) -> dict[int, UnitResult]:
    """Make every unit of this rank's share that is not done yet; returns the results of all done units of the share."""
    mine = [u for u in units if u.index % settings.world == settings.rank]
    done: dict[int, UnitResult] = {}
    todo: list[Unit] = []
    for u in mine:
        r = unit_done(out, u)
        if r is None:
            todo.append(u)
        else:
            done[u.index] = r
    pre = [u for u in todo if u.kind != "text"]
    text = [u for u in todo if u.kind == "text"]
    for u in pre:
        done[u.index] = index_unit(u, tok.eos_id, tok.vocab_size, dtype_hint, out, where)
    if not text:
        return done
    workers = resolve_workers(settings.workers, len(text))
    total = sum(u.bytes for u in text)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"tokenizing {name}",
        disable=not settings.progress or None,
        file=sys.stderr,
        leave=False,
    )
    try:
        if workers == 1:
            encode = _encoder(tok.tokenizer)
            for u in text:
                done[u.index] = tokenize_unit(u, encode, tok.eos_id, dtype, fmt, text_field, documents, out)
                bar.update(u.bytes)
        else:
            try:
                _in_pool(text, workers, tok, dtype, fmt, text_field, documents, out, done, bar)
            except cf.process.BrokenProcessPool as err:
                # e.g. the Python API called from a script without `if __name__ == "__main__":` (spawn re-imports it)
                print(f"warning: tokenizing {name} in worker processes failed ({err}); going on in this process", file=sys.stderr)
                encode = _encoder(tok.tokenizer)
                for u in text:
                    if u.index not in done:
                        done[u.index] = tokenize_unit(u, encode, tok.eos_id, dtype, fmt, text_field, documents, out)
                        bar.update(u.bytes)
    finally:
        bar.close()
    return done


def _in_pool(text, workers, tok, dtype, fmt, text_field, documents, out, done, bar) -> None:
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # a fork after the tokenizer's threads started can deadlock
    initargs = (tok.tokenizer.to_str(), threads)
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=initargs) as pool:
        jobs = {pool.submit(_worker_run, (u, tok.eos_id, dtype.name, fmt, text_field, documents, str(out))): u for u in text}
        for job in cf.as_completed(jobs):
            index, res = job.result()
            done[index] = res
            bar.update(jobs[job].bytes)


# ------------------------------------------------------------------ the entry
def start_partial(partial: Path, plan: dict, log) -> None:
    """Make (or continue) the partial entry for `plan`; one made for another plan is discarded."""
    plan_file = partial / "plan.json"
    if partial.is_dir():
        try:
            same = json.loads(plan_file.read_text()) == json.loads(json.dumps(plan))
        except (OSError, ValueError):
            same = False
        if same:
            finished = len(list(partial.glob("shard-*.json")))
            if finished:
                log(f"continuing an interrupted preparation: {finished} of {len(plan['units'])} shard(s) already done ({partial})")
            return
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    atomic.write_json(plan_file, plan)


def finalize(partial: Path, units: list[Unit], results: dict[int, UnitResult], val_fraction: float, meta: dict) -> dict:
    """Number the documents across units, split train / validation, write the views and meta.json (see the module docstring)."""
    from cpt.data.tokens import validation_mask
    from cpt.data.views import TokenView

    for stale in partial.glob(".*"):  # a killed unit's unfinished temporary (every unit is done by now)
        stale.unlink(missing_ok=True)
    train_segments: list[np.ndarray] = []
    val_segments: list[np.ndarray] = []
    counts = {"train": 0, "val": 0}
    tops = {"train": -1, "val": -1}
    first = 0
    for u in units:
        ends = np.load(partial / f"{_unit_name(u.index)}.ends.npy", mmap_mode="r")
        n = len(ends)
        if n == 0:
            continue
        flags = validation_mask(first, n, val_fraction)
        starts = np.concatenate([[0], np.asarray(ends[:-1])])
        # runs of equal flags: one segment each
        cut = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
        run_lo = np.concatenate([[0], cut])
        run_hi = np.concatenate([cut, [n]])
        # one (unit, start, end) row per run, vectorised: at 100M documents there are ~10M runs
        segs = np.stack([np.full(len(run_lo), u.index, np.int64), starts[run_lo], np.asarray(ends)[run_hi - 1]], axis=1).astype(np.int64)
        is_val = flags[run_lo]
        val_segments.append(segs[is_val])
        train_segments.append(segs[~is_val])
        lens = np.asarray(ends) - starts
        counts["val"] += int(lens[flags].sum())
        counts["train"] += int(lens[~flags].sum())
        doc_tops = partial / f"{_unit_name(u.index)}.tops.npy"
        if doc_tops.is_file():  # tokenized here: each document's largest id is known
            top = np.load(doc_tops, mmap_mode="r")
            for split, m in (("val", flags), ("train", ~flags)):
                if m.any():
                    tops[split] = max(tops[split], int(np.asarray(top)[m].max()))
        else:  # a pre-tokenized file: its largest id bounds both splits
            for split, m in (("val", flags), ("train", ~flags)):
                if m.any():
                    tops[split] = max(tops[split], results[u.index].max_id)
        first += n
    for split in ("train", "val"):
        segs = train_segments if split == "train" else val_segments
        TokenView.save(partial / split, np.concatenate(segs) if segs else np.zeros((0, 3), np.int64))
    shards = [
        {
            "file": results[u.index].file,
            "dtype": results[u.index].dtype,
            "offset": results[u.index].offset,
            "tokens": results[u.index].tokens,
        }
        for u in units
    ]
    meta = {
        **meta,
        "layout": "shards",
        "documents": sum(r.documents for r in results.values()),
        "skipped_non_utf8": sum(r.skipped_non_utf8 for r in results.values()),
        "bytes": sum(r.bytes for r in results.values()),
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "max_train_id": tops["train"],
        "max_val_id": tops["val"],
        "shards": shards,
        "tokenize_seconds": round(sum(r.seconds for r in results.values()), 3),
    }
    atomic.write_json(partial / "meta.json", meta)
    return meta


def open_shards(directory: Path, meta: dict) -> list[np.ndarray]:
    """Memory maps of an entry's token shards (this entry's files or pre-tokenized files where they lie)."""
    out = []
    for s in meta["shards"]:
        path = Path(s["file"])
        path = path if path.is_absolute() else directory / path
        if not path.is_file():
            raise CptError(f"{directory}: token shard {path} is missing; delete {directory} to prepare the task again")
        if s["tokens"] == 0:
            out.append(np.zeros(0, dtype=np.dtype(s["dtype"])))
            continue
        out.append(np.memmap(path, dtype=np.dtype(s["dtype"]), mode="r", offset=int(s["offset"]), shape=(int(s["tokens"]),)))
    return out
