"""Disk-backed experience-replay buffer: what is stored, where, and which slots are drawn.

The training loop offers every new training sequence to `ReplayBuffer.add` after each optimizer
step and later draws replay rows with `sample_slots` + `read` (usually through
`cpt.replay.prefetch.ReplayPrefetcher`), restricted to the task ids `eligible()` names. The rows
live in a memory-mapped token file `shard-NNN.tokens` of shape [slots, row_len] (uint16 or
uint32; with store "refs", [slots, 1] int64 offsets, see below); the per-slot task ids and the policy/RNG state live in `shard-NNN.meta.json`, which
`flush()` replaces atomically. Only the small per-slot bookkeeping (`SlotTable`) is held in RAM,
never the rows. Each data-parallel rank owns its own shard (the shard index is part of the file
names): no two processes ever write the same file, and a buffer object is not shared between
processes. Within one process, row writes and reads are serialised by a lock, and when a
prefetcher is attached `add()` first waits until every read submitted before it has completed,
so a prefetched batch sees the buffer as it was when the read was submitted and never contains a
partly written row. Draws with `sample_slots` are *with* replacement. After `flush()`,
`ReplayBuffer.open()` continues with exactly the inserts and draws the original object would
have made (both RNG states are part of the saved state).

Parts: a storage policy (`Reservoir`, `Balanced`, `Fifo`, or `KeepAll` for capacity "all")
chooses the slots of offered rows with `place()`; an `UndoJournal` owns the shard's journal
files; `peek`, `copy_shard` and `remove_shard` see a kept buffer directory from outside.

Exact resume from an older state (undo journals). The tokens file is updated in place, so a
state taken at a checkpoint describes rows that later inserts may overwrite. Every `flush()`
that follows new inserts starts a *journal epoch* named by its mark, the `offered` count at that
moment (saved in the state as "mark"): before `add()` first overwrites, within the epoch, a slot
that already held a row when the epoch began, it appends (slot, old task id, old row) to
`shard-NNN.undo-<mark>.bin` and flushes that file, and only then writes the row. Slots filled
for the first time need no record (the state's fill count rolls them back). `load_state_dict`
of a state taken right after a flush applies the journals of that epoch and every later one,
newest first and within each epoch the first record of each slot, so rows [0, fill) are then
byte for byte what they were when the state was taken; it then makes that state the one on
disk and starts a fresh epoch there. `open()` does the same for the saved state, which also
undoes rows written after the last flush by a process that was killed. A missing journal is a
CptError. `flush(keep_journals=N)` keeps the journals of the newest N epochs only: to resume
from any of the last K checkpoints (each preceded by one flush) keep at least K + 1.
Journals are written with buffered appends and a flush per `add()`, without fsync, so they
protect against a killed process, not against losing the machine's power. A growing ("all")
buffer never overwrites a row and keeps no journal.

What a slot stores (`store`, `replay.buffer.store`). With "rows" (the default) a slot holds the
row's tokens. With "refs" it holds one int64, the row's token offset in its task's training
split (`TaskStream.last_starts`), next to the task id every slot keeps: `read` resolves (task id,
offset) to `tokens_of_task[task][offset : offset + row_len]` through the resolver given at
construction and to `open` (task id → a 1-D token array-like supporting `len()` and contiguous
slicing; the run passes its tasks' memory-mapped training splits). Internally a refs shard is a
shard of rows of width 1 and dtype int64, so policies, draws, undo journals, resume and growth
are the same code and make the same choices; a run gives the same loss matrix with either store,
and with capacity "all" the refs shard takes 8 bytes per row instead of row_len × 2 (or 4). The
rows must stay resolvable: the task token files are the run's own, so a refs buffer cannot serve
as (or start from) another run's `replay.buffer.init`. The metadata records the store, and
reopening a shard with the other one is a CptError.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import weakref
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from cpt import atomic
from cpt.errors import CptError

POLICIES = ("reservoir", "balanced", "fifo")
STORES = ("rows", "refs")  # what a slot holds: the row's tokens, or its task-file offset (see above)
_DTYPES = {"uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32)}
_FORMAT = 1
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)  # Linux; elsewhere reads just fault
_MIN_ALL_ROWS = 1024  # first allocation of a growing ("all") shard; doubled when full
_UNDO_MAGIC = b"CPTUNDO1"
_UNDO_HEADER = len(_UNDO_MAGIC) + 4 * 8  # magic, then int64 mark, fill at mark, row_len, itemsize
_APPLY_CHUNK = 4096  # journal records restored per fancy-indexed write


class _Barrier(Protocol):
    def barrier(self) -> None: ...


def slot_layout(store: str, row_len: int, dtype: np.dtype) -> tuple[int, np.dtype]:
    """(values per slot, their dtype) in a shard's tokens file: the row itself, or one int64 offset."""
    if store == "refs":
        return 1, np.dtype(np.int64)
    return row_len, np.dtype(dtype)


def _meta_slot_bytes(meta: dict) -> int:
    """Bytes per slot of the tokens file a shard's metadata describes (shards before `store`: rows)."""
    width, dt = slot_layout(meta.get("store", "rows"), int(meta["row_len"]), _DTYPES[meta["dtype"]])
    return width * dt.itemsize


def _allocated_bytes(directory: Path, shard: int) -> int:
    """What one shard's files (tokens, metadata, undo journals) occupy on disk (allocated blocks; sparse tails are free)."""
    total = 0
    for p in Path(directory).glob(f"shard-{shard:03d}.*"):
        try:
            st = p.stat()
        except OSError:  # removed meanwhile
            continue
        blocks = getattr(st, "st_blocks", None)  # POSIX; elsewhere the file's length
        total += blocks * 512 if blocks is not None else st.st_size
    return total


def capacity_rows_from(capacity: str | float, unit: str, row_len: int) -> int | None:
    """Buffer capacity in rows: None for "all", else tokens // (row_len - 1) or sequences, >= 1.

    A row holds seq_len + 1 tokens but trains seq_len of them, hence row_len - 1 per row.
    """
    if isinstance(capacity, str):
        if capacity.strip().lower() == "all":
            return None
        try:
            value: float = float(capacity)
        except ValueError:
            raise CptError(f"replay.buffer.capacity: expected 'all' or a number, got {capacity!r}") from None
    elif isinstance(capacity, bool) or not isinstance(capacity, (int, float)):
        raise CptError(f"replay.buffer.capacity: expected 'all' or a number, got {capacity!r}")
    else:
        value = capacity
    if not math.isfinite(value) or value <= 0:
        raise CptError(f"replay.buffer.capacity: must be 'all' or > 0, got {capacity!r}")
    if unit == "tokens":
        if row_len < 2:
            raise CptError(f"replay buffer: row_len must be >= 2, got {row_len}")
        return max(1, int(value // (row_len - 1)))
    if unit == "sequences":
        return max(1, int(value))
    raise CptError(f"replay.buffer.unit: expected 'tokens' or 'sequences', got {unit!r}")


# -- bookkeeping: which task each slot holds ---------------------------------------------------
class SlotTable:
    """The RAM side of a shard: which task each slot holds, and how many rows were offered.

    Slots [0, fill) hold rows (free slots are filled in order and never vacated). `task_slots`
    lists each task's slots in an order that is part of the saved state (draws index into it);
    `slot_pos[s]` is the index of slot s in its task's list and `slot_task[s]` its task (-1:
    free). `offered` counts every row ever offered, `seen` those of each task, `order` the tasks
    in first-seen order. While `replaced` is a dict, `assign` records in it each slot's task
    before its first reassignment (what the undo journal needs).
    """

    def __init__(self, rows: int = 0) -> None:
        self.fill = 0
        self.offered = 0
        self.seen: dict[int, int] = {}
        self.order: list[int] = []
        self.task_slots: dict[int, list[int]] = {}
        self.slot_task = np.full(rows, -1, dtype=np.int64)
        self.slot_pos = np.zeros(rows, dtype=np.int64)
        self.replaced: dict[int, int] | None = None

    @property
    def rows(self) -> int:
        """Slots the table can describe (the length of the tokens file, in rows)."""
        return len(self.slot_task)

    def resize(self, rows: int) -> None:
        """Grow to `rows` slots (new slots free); never shrinks."""
        grow = rows - len(self.slot_task)
        if grow > 0:
            self.slot_task = np.concatenate([self.slot_task, np.full(grow, -1, np.int64)])
            self.slot_pos = np.concatenate([self.slot_pos, np.zeros(grow, np.int64)])

    def offer(self, n: int, task: int) -> int:
        """Count n rows offered for `task`; returns `offered` before them (their stream start)."""
        if task not in self.seen:
            self.seen[task] = 0
            self.order.append(task)
        start = self.offered
        self.offered += n
        self.seen[task] += n
        return start

    def assign(self, slot: int, task: int) -> None:
        """Make `slot` hold a row of `task` (appended to the end of the task's list)."""
        old = int(self.slot_task[slot])
        if self.replaced is not None:
            self.replaced.setdefault(slot, old)  # the first assignment in a batch saw the row
        if old >= 0:  # swap-remove from the old task's list; order is saved, so reloads match
            lst = self.task_slots[old]
            last = lst.pop()
            if last != slot:
                p = int(self.slot_pos[slot])
                lst[p] = last
                self.slot_pos[last] = p
            if not lst:
                del self.task_slots[old]
        lst = self.task_slots.setdefault(task, [])
        self.slot_pos[slot] = len(lst)
        lst.append(slot)
        self.slot_task[slot] = task

    def counts(self) -> dict[int, int]:
        """Rows stored per task, in first-seen order (0 for a task whose rows were all evicted)."""
        return {t: len(self.task_slots.get(t, ())) for t in self.order}

    def layout(self, task_slots: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """The (slot_task, slot_pos) arrays, of this table's length, that `task_slots` describes."""
        slot_task = np.full(self.rows, -1, dtype=np.int64)
        slot_pos = np.zeros(self.rows, dtype=np.int64)
        for t, sl in task_slots.items():
            idx = np.asarray(sl, dtype=np.int64)
            slot_task[idx] = t
            slot_pos[idx] = np.arange(len(idx))
        return slot_task, slot_pos

    def restore(
        self,
        fill: int,
        offered: int,
        seen: list[tuple[int, int]],
        task_slots: dict[int, list[int]],
        slot_task: np.ndarray,
        slot_pos: np.ndarray,
    ) -> None:
        """Replace the whole table (seen: (task, rows offered) in first-seen order)."""
        self.fill, self.offered = fill, offered
        self.order = [t for t, _ in seen]
        self.seen = dict(seen)
        self.task_slots = task_slots
        self.slot_task, self.slot_pos = slot_task, slot_pos


# -- storage policies: which slots offered rows go to ------------------------------------------
def _dedupe(src: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Within one batch a later row may overwrite an earlier one's slot: keep the last."""
    if len(np.unique(slots)) == len(slots):
        return src, slots
    last = {s: i for i, s in zip(src.tolist(), slots.tolist())}
    return np.fromiter(last.values(), np.int64), np.fromiter(last.keys(), np.int64)


class StoragePolicy:
    """Chooses the slots of offered rows and records them in the table.

    `place(n, task, start)` runs under the buffer's lock after `table.offer(n, task)` returned
    `start`. It assigns every chosen slot to `task`, leaves `table.fill` covering them and
    returns (index in the batch, slot) of the rows to write: int64 arrays, slots distinct (of
    rows of one batch that landed on one slot only the last is kept). Random choices draw from
    `rng`, the buffer's insert generator. The default `place` assigns what `choose` picked.
    """

    def __init__(self, table: SlotTable, capacity: int | None, rng: np.random.Generator) -> None:
        self.table, self.capacity, self.rng = table, capacity, rng

    def place(self, n: int, task: int, start: int) -> tuple[np.ndarray, np.ndarray]:
        src, slots = self.choose(n, start)
        for s in slots.tolist():
            self.table.assign(s, task)
        self.table.fill = max(self.table.fill, int(slots.max()) + 1 if len(slots) else 0)
        return _dedupe(src, slots)

    def choose(self, n: int, start: int) -> tuple[np.ndarray, np.ndarray]:
        """(batch index, slot) of the rows to keep, in batch order; slots may repeat."""
        raise NotImplementedError


class KeepAll(StoragePolicy):
    """Capacity "all": every row gets the next free slot; the table doubles when full (the
    buffer then grows its file to match)."""

    def choose(self, n: int, start: int) -> tuple[np.ndarray, np.ndarray]:
        t = self.table
        if t.fill + n > t.rows:
            t.resize(max(2 * t.rows, t.fill + n))
        src = np.arange(n)
        return src, t.fill + src


class Fifo(StoragePolicy):
    """Ring buffer: the row at stream position p goes to slot p % capacity."""

    def choose(self, n: int, start: int) -> tuple[np.ndarray, np.ndarray]:
        cap = self.capacity
        assert cap is not None
        src = np.arange(max(0, n - cap), n)  # of a batch longer than cap only the tail stays
        return src, (start + src) % cap


class Reservoir(StoragePolicy):
    """Vitter's Algorithm R: uniform over all rows ever offered."""

    def choose(self, n: int, start: int) -> tuple[np.ndarray, np.ndarray]:
        cap = self.capacity
        assert cap is not None
        pos = start + 1 + np.arange(n)  # 1-based stream positions
        j = np.where(pos <= cap, pos - 1, 0)
        late = pos > cap
        if late.any():  # Algorithm R: keep with prob cap/pos, into a uniform slot
            j[late] = self.rng.integers(0, pos[late])
        keep = j < cap
        return np.flatnonzero(keep), j[keep]


class Balanced(StoragePolicy):
    """Equal share per seen task; a task under its share evicts a random slot of the most
    over-represented task, a task at/over its share does Algorithm R among its own slots.

    A task's count never drops below its share (only over-represented tasks are evicted and
    shares only shrink), so a task below its share has stored every row it offered, and
    evicting uniformly from a uniform subset keeps it uniform. Shares are capacity // tasks,
    the remainder going one each to the first-seen tasks.
    """

    def place(self, n: int, task: int, start: int) -> tuple[np.ndarray, np.ndarray]:
        cap, tb = self.capacity, self.table
        assert cap is not None
        t_n, rem = divmod(cap, len(tb.order))
        quota = {t: t_n + (i < rem) for i, t in enumerate(tb.order)}  # first-seen get +1
        n_seen = tb.seen[task] - n
        src: list[int] = []
        slots: list[int] = []
        for i in range(n):  # one row at a time: each choice sees the counts the last one left
            n_seen += 1
            mine = tb.task_slots.get(task, [])
            if tb.fill < cap:  # free slots are filled in order, never vacated later
                slot = tb.fill
                tb.fill += 1
            elif len(mine) < quota[task]:
                victim = max(tb.order, key=lambda t: len(tb.task_slots.get(t, ())) - quota[t])
                vs = tb.task_slots[victim]
                slot = vs[int(self.rng.integers(len(vs)))]
            else:
                j = int(self.rng.integers(n_seen))
                if j >= len(mine):
                    continue
                slot = mine[j]
            tb.assign(slot, task)
            src.append(i)
            slots.append(slot)
        return _dedupe(np.asarray(src, dtype=np.int64), np.asarray(slots, dtype=np.int64))


_POLICY_CLASSES: dict[str, type[StoragePolicy]] = {"reservoir": Reservoir, "balanced": Balanced, "fifo": Fifo}


def make_policy(policy: str, capacity: int | None, table: SlotTable, rng: np.random.Generator) -> StoragePolicy:
    """The storage policy object for a policy name (any name gives KeepAll when capacity is None)."""
    if capacity is None:
        return KeepAll(table, capacity, rng)
    if policy not in _POLICY_CLASSES:
        raise CptError(f"replay.buffer.policy: expected one of {POLICIES}, got {policy!r}")
    return _POLICY_CLASSES[policy](table, capacity, rng)


# -- undo journals: the rows an epoch overwrote ------------------------------------------------
class UndoJournal:
    """The undo journals of one shard, `shard-NNN.undo-<mark>.bin`, one per epoch (see above).

    A journal is a header (b"CPTUNDO1", then little-endian int64 mark, fill at the mark,
    row_len, token itemsize) followed by records (int64 slot, int64 old task id, the old row),
    where a refs buffer's "row" is its one int64 offset (row_len 1, itemsize 8);
    appended in the order written; a torn last record is ignored when read. `marks` lists the
    epochs whose journals are kept, oldest first (the buffer saves it in its metadata). One
    epoch at a time is open for appends; within it each slot below the epoch's fill is recorded
    once, before its first overwrite.
    """

    def __init__(self, directory: Path, shard: int, row_len: int, dtype: np.dtype, slots: int) -> None:
        self.directory, self.shard, self.row_len, self.itemsize = directory, shard, row_len, dtype.itemsize
        self.marks: list[int] = []
        self.rec_dtype = np.dtype([("slot", "<i8"), ("task", "<i8"), ("row", dtype, (row_len,))])
        self._fill = 0  # rows held when the open epoch began: only slots below it need records
        self._journaled = np.zeros(slots, dtype=bool)  # slots already recorded in the open epoch
        self._file: BinaryIO | None = None  # append handle of the open epoch's journal

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def path(self, mark: int) -> Path:
        return self.directory / f"shard-{self.shard:03d}.undo-{mark}.bin"

    def start(self, mark: int, fill: int) -> None:
        """Open epoch `mark` of a buffer holding `fill` rows: its journal is made an empty one
        (atomically) and appended to from now on. Does not touch `marks`."""
        self.close()
        path = self.path(mark)
        head = np.array([mark, fill, self.row_len, self.itemsize], dtype="<i8")
        atomic.write_bytes(path, _UNDO_MAGIC + head.tobytes())
        self._file = open(path, "ab")  # kept open for the epoch
        self._fill = fill
        self._journaled[:] = False

    def record(self, slots: np.ndarray, old_task: dict[int, int], rows: np.ndarray) -> None:
        """Journal, before they are overwritten, the rows (`rows[slot]`, task `old_task[slot]`)
        of `slots` that held a row when the epoch began and are not journaled in it yet; the
        file is flushed before returning."""
        need = slots[slots < self._fill]
        need = need[~self._journaled[need]]
        if len(need) == 0:
            return
        assert self._file is not None
        rec = np.empty(len(need), dtype=self.rec_dtype)
        rec["slot"] = need
        rec["task"] = [old_task[s] for s in need.tolist()]
        rec["row"] = rows[need]
        self._file.write(rec.tobytes())
        self._file.flush()  # journal first, then the row
        self._journaled[need] = True

    def read(self, mark: int, where: str) -> np.ndarray:
        """The records of epoch `mark` (a read-only memmap; empty array if none)."""
        path = self.path(mark)
        try:
            with open(path, "rb") as f:
                head = f.read(_UNDO_HEADER)
            size = path.stat().st_size
        except OSError:
            raise CptError(f"{where}: undo journal {path} is missing; cannot restore the rows of an older state") from None
        ok = len(head) == _UNDO_HEADER and head.startswith(_UNDO_MAGIC)
        vals = np.frombuffer(head[len(_UNDO_MAGIC) :], dtype="<i8") if ok else None
        if vals is None or int(vals[0]) != mark or int(vals[2]) != self.row_len or int(vals[3]) != self.itemsize:
            raise CptError(f"{where}: {path} is not an undo journal of this buffer")
        n = (size - _UNDO_HEADER) // self.rec_dtype.itemsize  # a torn last record: row unwritten
        if n == 0:
            return np.empty(0, dtype=self.rec_dtype)
        return np.memmap(path, dtype=self.rec_dtype, mode="r", offset=_UNDO_HEADER, shape=(n,))

    def undo_to(self, mark: int, slot_task: np.ndarray, rows: np.ndarray, where: str) -> bool:
        """Write into `rows` (all slots of the file) the rows as of the flush at `mark`, from the
        journals of epoch `mark` and every later kept one; True if any row was written.

        `slot_task` is the state's task of each slot below its fill: a record that contradicts
        it means the state is another buffer's, and nothing is written then.
        """
        chain = [m for m in self.marks if m >= mark]
        if not chain or chain[0] != mark:
            raise CptError(
                f"{where}: undo journal {self.path(mark)} is missing (kept "
                f"epochs: {self.marks}); cannot restore the rows of the state with "
                f"{mark} rows offered"
            )
        journals = [self.read(m, where) for m in chain]
        # each slot's row at `mark` is its first record in the oldest epoch that recorded it
        firsts = []
        got = np.full(len(slot_task), -1, dtype=np.int64)
        for rec in journals:
            slots = np.asarray(rec["slot"])
            if len(slots) and (slots.min() < 0 or slots.max() >= len(rows)):
                raise CptError(f"{where}: a journal names slots outside the file")
            _, first = np.unique(slots, return_index=True)
            firsts.append(first)
        for rec, first in zip(reversed(journals), reversed(firsts)):
            slots = np.asarray(rec["slot"])[first]
            keep = slots < len(got)
            got[slots[keep]] = np.asarray(rec["task"])[first][keep]
        bad = (got >= 0) & (got != slot_task)
        if bad.any():
            s = int(np.flatnonzero(bad)[0])
            raise CptError(
                f"{where}: the undo journals do not match the state (slot {s} held "
                f"task {int(got[s])}, the state says {int(slot_task[s])}); the state "
                f"belongs to another run's buffer"
            )
        changed = False
        for rec, first in zip(reversed(journals), reversed(firsts)):
            for i in range(0, len(first), _APPLY_CHUNK):
                part = rec[np.sort(first[i : i + _APPLY_CHUNK])]
                rows[part["slot"]] = part["row"]
                changed = True
        return changed

    def drop_unlisted(self) -> None:
        """Delete this shard's journals that are not in `marks` (pruned, undone or stray)."""
        keep = {self.path(m).name for m in self.marks}
        for p in self.directory.glob(f"shard-{self.shard:03d}.undo-*.bin*"):
            if p.name not in keep:
                p.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the open epoch's file (the buffer is closed until `start` opens another)."""
        if self._file is not None:
            self._file.close()
            self._file = None


# -- the buffer --------------------------------------------------------------------------------
class ReplayBuffer:
    """A fixed-capacity (or, with capacity_rows=None, keep-everything) replay shard on disk.

    Policies: `reservoir` (Vitter's Algorithm R, uniform over all rows ever offered), `balanced`
    (equal slot share per seen task, reservoir within each task) and `fifo` (ring buffer). With
    capacity_rows=None every row is kept and the policy does not matter.
    """

    def __init__(
        self,
        directory: Path,
        row_len: int,
        capacity_rows: int | None,
        policy: str = "reservoir",
        dtype: Any = np.uint16,
        seed: int = 0,
        shard: int = 0,
        *,
        overwrite: bool = False,
        owner: dict | None = None,
        store: str = "rows",
        resolver: Mapping[int, Any] | None = None,
    ) -> None:
        dt = np.dtype(dtype)
        if dt.name not in _DTYPES:
            raise CptError(f"replay buffer: dtype must be uint16 or uint32, got {dt.name}")
        if policy not in POLICIES:
            raise CptError(f"replay.buffer.policy: expected one of {POLICIES}, got {policy!r}")
        if store not in STORES:
            raise CptError(f"replay.buffer.store: expected one of {STORES}, got {store!r}")
        if store == "refs" and resolver is None:
            raise CptError("replay.buffer.store: refs needs the tasks' token arrays to resolve rows (a resolver)")
        if row_len < 1 or (capacity_rows is not None and capacity_rows < 1):
            raise CptError(f"replay buffer: need row_len >= 1 and capacity_rows >= 1 or None, got {row_len}, {capacity_rows}")
        self._configure(Path(directory), shard, row_len, capacity_rows, policy, dt, seed, store)
        self.set_resolver(resolver)
        self.owner = owner
        if self._tokens_path.exists() and not overwrite:
            raise CptError(f"{self._tokens_path}: a replay buffer already exists there; reuse it with ReplayBuffer.open or delete it")
        self.directory.mkdir(parents=True, exist_ok=True)
        rows = capacity_rows if capacity_rows is not None else _MIN_ALL_ROWS
        with open(self._tokens_path, "wb") as f:
            f.truncate(rows * self._slot_bytes)  # sparse: no disk used until written
        self._map(rows)
        self.flush()

    def _configure(
        self, directory: Path, shard: int, row_len: int, capacity: int | None, policy: str, dt: np.dtype, seed: int, store: str
    ) -> None:
        self.directory, self.shard, self.row_len = directory, shard, row_len
        self.policy, self.dtype, self.seed, self.store = policy, dt, seed, store
        # the tokens file holds `_width` values of `_file_dtype` per slot: the row, or one int64 offset
        self._width, self._file_dtype = slot_layout(store, row_len, dt)
        self._slot_bytes = self._width * self._file_dtype.itemsize
        self._resolver: dict[int, Any] | None = None
        self._capacity = capacity
        self._tokens_path = directory / f"shard-{shard:03d}.tokens"
        self._meta_path = directory / f"shard-{shard:03d}.meta.json"
        self._lock = threading.Lock()
        self._prefetcher: _Barrier | None = None
        self._table = SlotTable()
        # _mark: offered at the last flush (the open journal epoch with a finite capacity);
        # _meta_mark: the mark of the state in the metadata file
        self._mark = self._meta_mark = 0
        self._journal = UndoJournal(directory, shard, self._width, self._file_dtype, capacity) if capacity is not None else None
        ins, smp = np.random.SeedSequence([seed, shard]).spawn(2)  # open() loads the saved states
        self._rng_insert = np.random.Generator(np.random.PCG64(ins))
        self._rng_sample = np.random.Generator(np.random.PCG64(smp))
        self._placer = make_policy(policy, capacity, self._table, self._rng_insert)

    def _map(self, rows: int) -> None:
        if not hasattr(self, "_fd"):  # for read-ahead hints; closed with the object
            self._fd = os.open(self._tokens_path, os.O_RDONLY)
            self._close_fd = weakref.finalize(self, os.close, self._fd)
        self._mm = np.memmap(self._tokens_path, dtype=self._file_dtype, mode="r+", shape=(rows, self._width))
        self._rows = self._mm.view(np.ndarray)  # plain view: cheaper indexing, copies on fancy
        self._table.resize(rows)

    @classmethod
    def open(cls, directory: Path, shard: int = 0, *, store: str | None = None, resolver: Mapping[int, Any] | None = None) -> ReplayBuffer:
        """Reopen a flushed buffer (e.g. a kept `replay.buffer.dir`) with its state.

        `store`: the store the caller expects (None: whichever the shard was written with); a shard
        written with the other one is a CptError. `resolver`: the task token arrays a refs shard
        reads its rows from (a refs shard opened without one keeps its state but cannot `read`).
        """
        meta_path = Path(directory) / f"shard-{shard:03d}.meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise CptError(f"{meta_path}: cannot read replay buffer metadata ({e})") from None
        saved = meta.get("store", "rows")  # shards written before `store` hold rows
        if saved not in STORES:
            raise CptError(f"{meta_path}: unknown replay.buffer.store {saved!r}")
        if store is not None and store != saved:
            raise CptError(
                f"replay.buffer.store: {store}, but the buffer in {directory} was written with store: {saved}; "
                f"use store: {saved} to reopen it, or start it again"
            )
        self = cls.__new__(cls)
        self._configure(
            Path(directory), shard, meta["row_len"], meta["capacity_rows"], meta["policy"], _DTYPES[meta["dtype"]], meta["seed"], saved
        )
        self.set_resolver(resolver)
        self.owner = meta.get("owner")
        itemsize = self._slot_bytes
        size = self._tokens_path.stat().st_size if self._tokens_path.exists() else -1
        if size <= 0 or size % itemsize or size // itemsize < (self._capacity or 0):
            what = "int64 row offsets" if saved == "refs" else f"rows of {self.row_len} {self.dtype.name} tokens"
            raise CptError(f"{self._tokens_path}: missing, truncated or not a whole number of {what}")
        self._map(size // itemsize)
        self._table.offered = int(meta["offered"])
        self._mark = self._meta_mark = int(meta.get("mark", self._table.offered))
        if self._journal is not None:
            if "journals" not in meta:  # written before undo journals existed: start one now
                self._journal.start(self._mark, self._table.fill)
                meta["journals"] = [self._mark]
            self._journal.marks = [int(m) for m in meta["journals"]]
        self.load_state_dict(meta)  # also undoes rows written after the last flush
        return self

    def set_resolver(self, resolver: Mapping[int, Any] | None) -> None:
        """The task token arrays (task id → 1-D array-like with len() and slicing) a refs buffer reads rows from."""
        self._resolver = None if resolver is None else dict(resolver)

    def _task_tokens(self, task: int, where: str) -> Any:
        if self._resolver is None:
            raise CptError(f"{where}: a buffer with replay.buffer.store: refs needs the tasks' token arrays to resolve rows")
        try:
            return self._resolver[task]
        except KeyError:
            raise CptError(f"{where}: no token array for task id {task} to resolve its rows (replay.buffer.store: refs)") from None

    # -- introspection -------------------------------------------------------------------
    @property
    def fill(self) -> int:
        return self._table.fill

    @property
    def stored_bytes(self) -> int:
        """Bytes the stored slots take in the tokens file: fill × (row_len × token bytes, or 8 with refs)."""
        return self._table.fill * self._slot_bytes

    @property
    def disk_bytes(self) -> int:
        """What this shard's files (tokens, metadata, journals) occupy on disk now (allocated blocks)."""
        return _allocated_bytes(self.directory, self.shard)

    @property
    def capacity_rows(self) -> int | None:
        return self._capacity

    def counts_per_task(self) -> dict[int, int]:
        return self._table.counts()

    def seen_per_task(self) -> dict[int, int]:
        return dict(self._table.seen)

    def eligible(self, task: int, include_current: bool = False, task_offset: int = 0) -> list[int]:
        """The task ids that training task `task` may replay and that have rows stored, ascending.

        A run stores its task t under id task_offset + t (a reused buffer holds an earlier run's
        tasks under 0..task_offset-1). Eligible are the ids below task_offset + task, and with
        include_current that id too. Every row `read` returns has a stored task id, so
        `np.isin(task_ids, buffer.eligible(...))` tells which of them may be replayed.
        """
        top = task_offset + task + (1 if include_current else 0)
        with self._lock:
            return sorted(t for t in self._table.task_slots if t < top)

    def attach(self, prefetcher: _Barrier | None) -> None:
        """Make add() wait for `prefetcher.barrier()` before it overwrites any slot."""
        if prefetcher is not None and self._prefetcher not in (None, prefetcher):
            raise RuntimeError("a replay buffer serves one prefetcher at a time; close the other")
        self._prefetcher = prefetcher

    def detach(self, prefetcher: _Barrier) -> None:
        if self._prefetcher is prefetcher:
            self._prefetcher = None

    # -- inserts -------------------------------------------------------------------------
    def add(self, rows: np.ndarray | None, task_id: int, starts: np.ndarray | None = None) -> None:
        """Offer rows [n, row_len] of one task; the policy decides which are stored where.

        With store "refs" `starts` (int [n]) are the rows' token offsets in the task's token array
        and are what is stored; `rows` may then be None (when given, its shape is checked and its
        first row compared with the resolved one, which catches a resolver of other tokens).
        """
        where = f"replay buffer {self._tokens_path}"
        if isinstance(task_id, bool) or not isinstance(task_id, (int, np.integer)) or task_id < 0:
            raise CptError(f"{where}: task_id must be an int >= 0, got {task_id!r}")
        if rows is not None:
            rows = np.asarray(rows)
            if rows.dtype.kind not in "iu":
                raise CptError(f"{where}: rows must be integer token ids, got dtype {rows.dtype}")
            if rows.ndim != 2 or rows.shape[1] != self.row_len:
                raise CptError(f"{where}: rows must have shape [n, row_len={self.row_len}], got {rows.shape}")
        if self.store == "refs":
            payload = self._refs_payload(rows, int(task_id), starts, where)
        else:
            if rows is None:
                raise CptError(f"{where}: rows are required (replay.buffer.store: rows)")
            if rows.size and (rows.min() < 0 or rows.max() > np.iinfo(self.dtype).max):
                raise CptError(
                    f"{where}: token ids must lie in [0, {np.iinfo(self.dtype).max}] for {self.dtype.name}, "
                    f"got [{rows.min()}, {rows.max()}]"
                )
            payload = rows
        if len(payload) == 0:
            return
        if self._prefetcher is not None:
            self._prefetcher.barrier()  # reads submitted before this add see the old rows
        with self._lock:
            if self._journal is not None and not self._journal.is_open:
                raise CptError(f"{where}: the buffer is closed")
            self._table.replaced = {} if self._journal is not None else None
            try:
                src, slots = self._place(len(payload), int(task_id))
                if len(src) and self._journal is not None:
                    self._journal.record(slots, self._table.replaced, self._rows)
            finally:
                self._table.replaced = None
            if len(src) == 0:
                return
            if np.all(np.diff(slots) == 1):  # fill phase: one contiguous block write
                self._rows[slots[0] : slots[-1] + 1] = payload[src]
            else:
                self._rows[slots] = payload[src]

    def _refs_payload(self, rows: np.ndarray | None, task: int, starts: np.ndarray | None, where: str) -> np.ndarray:
        """The int64 [n, 1] offsets a refs buffer stores for `starts`, checked against the task's token array."""
        if starts is None:
            raise CptError(f"{where}: replay.buffer.store: refs needs the rows' token offsets (starts)")
        starts = np.asarray(starts).reshape(-1)
        if starts.dtype.kind not in "iu":
            raise CptError(f"{where}: row offsets must be integers, got dtype {starts.dtype}")
        if rows is not None and len(rows) != len(starts):
            raise CptError(f"{where}: {len(rows)} rows but {len(starts)} offsets")
        tokens = self._task_tokens(task, where)
        if len(starts) and (starts.min() < 0 or int(starts.max()) + self.row_len > len(tokens)):
            raise CptError(
                f"{where}: row offsets must lie in [0, {len(tokens) - self.row_len}] for task id {task}, "
                f"got [{starts.min()}, {starts.max()}]"
            )
        if rows is not None and len(rows):
            s = int(starts[0])
            if not np.array_equal(rows[0], np.asarray(tokens[s : s + self.row_len])):
                raise CptError(f"{where}: the row at offset {s} of task id {task}'s tokens is not the row offered; wrong token array")
        return starts.astype(np.int64).reshape(-1, 1)

    def _place(self, n: int, task: int) -> tuple[np.ndarray, np.ndarray]:
        """Count n offered rows and let the policy choose and assign their slots; returns
        (row idx, slot), slots distinct. Grows the file when a growing buffer needs it."""
        start = self._table.offer(n, task)
        src, slots = self._placer.place(n, task, start)
        if self._table.rows > len(self._rows):
            self._grow(self._table.rows)
        return src, slots

    def _grow(self, rows: int) -> None:
        self._mm.flush()
        del self._rows, self._mm
        with open(self._tokens_path, "r+b") as f:
            f.truncate(rows * self._slot_bytes)
        self._map(rows)

    # -- sampling ------------------------------------------------------------------------
    def sample_slots(
        self, n: int, eligible_tasks: Collection[int] | None = None, task_weights: dict[int, float] | None = None
    ) -> np.ndarray:
        """n slot indices drawn with replacement: uniform over eligible stored rows, or, with
        task_weights, a task by weight (eligible tasks with rows; missing weight = 0) and then
        a uniform slot of that task."""
        if n <= 0:
            if n < 0:
                raise ValueError(f"n must be >= 0, got {n}")
            return np.empty(0, dtype=np.int64)
        with self._lock:
            tb = self._table
            if eligible_tasks is None and task_weights is None:
                if tb.fill == 0:
                    raise CptError(f"replay buffer {self._tokens_path}: no rows to replay yet")
                return self._rng_sample.integers(0, tb.fill, size=n)
            tasks = sorted(t for t in tb.task_slots if eligible_tasks is None or t in eligible_tasks)
            if task_weights is not None:
                w = np.array([float(task_weights.get(t, 0.0)) for t in tasks])
                if not np.all(np.isfinite(w)) or np.any(w < 0):
                    raise CptError(f"replay task weights must be finite and >= 0, got {task_weights}")
                tasks = [t for t, x in zip(tasks, w) if x > 0]
                w = w[w > 0]
            if not tasks:
                which = "any task" if eligible_tasks is None else f"tasks {sorted(eligible_tasks)}"
                if task_weights is not None:
                    which += f" with weight > 0 (weights {task_weights})"
                raise CptError(f"replay buffer {self._tokens_path}: no stored rows of {which}; rows per task: {tb.counts()}")
            counts = np.array([len(tb.task_slots[t]) for t in tasks])
            if task_weights is None:
                u = self._rng_sample.integers(0, counts.sum(), size=n)
                starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
                k = np.searchsorted(starts, u, side="right") - 1
                off = u - starts[k]
            else:
                k = self._rng_sample.choice(len(tasks), size=n, p=w / w.sum())
                off = self._rng_sample.integers(0, counts[k])
            return np.array([tb.task_slots[tasks[a]][b] for a, b in zip(k.tolist(), off.tolist())], dtype=np.int64)

    def read(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the rows in `slots` (in that order, [n, row_len] of the token dtype) and their task ids."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if _WILLNEED is not None and len(slots) > 1 and self.store == "rows":
            # Page faults on the memmap read one row at a time (~1 ms each on a cold disk);
            # announcing all rows first lets the kernel fetch them in parallel (~40x faster).
            nbytes = self._slot_bytes
            for s in slots.tolist():
                os.posix_fadvise(self._fd, s * nbytes, nbytes, _WILLNEED)
        with self._lock:
            fill = self._table.fill
            if len(slots) and (slots.min() < 0 or slots.max() >= fill):
                raise IndexError(f"replay slots must lie in [0, {fill}), got [{slots.min()}, {slots.max()}]")
            stored, tasks = self._rows[slots], self._table.slot_task[slots]  # copies (fancy indexing)
        if self.store == "rows":
            return stored, tasks
        # the task token files never change: resolve outside the lock, from the copied offsets
        where = f"replay buffer {self._tokens_path}"
        out = np.empty((len(slots), self.row_len), dtype=self.dtype)
        for i, (task, start) in enumerate(zip(tasks.tolist(), stored[:, 0].tolist())):
            out[i] = self._task_tokens(task, where)[start : start + self.row_len]
        return out, tasks

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (not the rows): config, counters, slot lists, RNG states."""
        with self._lock:
            return self._state()

    def _state(self) -> dict[str, Any]:
        tb = self._table
        return {
            "format": _FORMAT,
            "row_len": self.row_len,
            "dtype": self.dtype.name,
            "store": self.store,
            "capacity_rows": self._capacity,
            "policy": self.policy,
            "seed": self.seed,
            "shard": self.shard,
            "fill": tb.fill,
            "offered": tb.offered,
            "mark": self._mark,  # the journal epoch (offered at the last flush)
            "seen": [[t, tb.seen[t]] for t in tb.order],
            # each task's slots in list order; the order matters for identical future draws
            "task_slots": [[t, list(s)] for t, s in tb.task_slots.items()],
            "rng_insert": self._rng_insert.bit_generator.state,
            "rng_sample": self._rng_sample.bit_generator.state,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Load a state of this buffer; with a finite capacity also restore the rows it saw.

        A state taken right after `flush()` (as the training loop saves it) can be loaded while
        its journal and those of all later epochs are kept: rows [0, fill) are restored, the
        state is written to the metadata file and a fresh journal epoch starts there. A state
        taken after later inserts can only be loaded while the buffer is still exactly there.
        """
        where = f"replay buffer {self._tokens_path}"
        for key, mine in (
            ("row_len", self.row_len),
            ("dtype", self.dtype.name),
            ("capacity_rows", self._capacity),
            ("policy", self.policy),
        ):
            if d.get(key) != mine:
                raise CptError(f"{where}: saved state has {key}={d.get(key)!r}, the buffer has {mine!r}")
        if d.get("store", "rows") != self.store:  # states saved before `store` are of rows
            raise CptError(f"{where}: saved state has store={d.get('store', 'rows')!r}, the buffer has {self.store!r}")
        if d.get("format") != _FORMAT:
            raise CptError(f"{where}: unknown state format {d.get('format')!r}")
        fill, offered = int(d["fill"]), int(d["offered"])
        mark = int(d.get("mark", offered))  # states saved before journals: taken at a flush
        task_slots = {int(t): [int(s) for s in sl] for t, sl in d["task_slots"]}
        if self._prefetcher is not None:
            self._prefetcher.barrier()  # rows may be restored below
        tb, journal = self._table, self._journal
        with self._lock:
            if fill > tb.rows:
                raise CptError(f"{where}: state has {fill} rows but the file holds only {tb.rows}")
            slot_task, slot_pos = tb.layout(task_slots)
            restart = False
            if journal is not None:
                if offered != mark:  # taken between flushes: only "here" is restorable
                    if (mark, offered) != (self._mark, tb.offered):
                        raise CptError(
                            f"{where}: the state was taken {offered - mark} row(s) after a flush "
                            f"and the buffer has moved on ({tb.offered} rows offered); only "
                            f"states taken right after flush() can be restored"
                        )
                else:
                    restart = self._undo_to(mark, slot_task[:fill], where) or mark != self._meta_mark
                    restart = restart or tb.offered != offered
            tb.restore(fill, offered, [(int(t), int(c)) for t, c in d["seen"]], task_slots, slot_task, slot_pos)
            self._rng_insert.bit_generator.state = d["rng_insert"]
            self._rng_sample.bit_generator.state = d["rng_sample"]
            if journal is None:
                self._mark = mark
                return
            if offered != mark:
                return
            self._mark = mark
            journal.marks = [m for m in journal.marks if m <= mark]
            state = self._state() if restart else None
        if state is not None:  # the metadata first, then drop the journals it no longer lists
            self._write_meta(state)
        with self._lock:
            journal.drop_unlisted()
            journal.start(mark, fill)

    def _undo_to(self, mark: int, slot_task: np.ndarray, where: str) -> bool:
        """Restore the rows as of the flush at `mark` from the journals; True if any changed."""
        assert self._journal is not None
        if mark > self._mark:
            raise CptError(
                f"{where}: the state ({mark} rows offered) is newer than the buffer "
                f"on disk ({self._mark}); it belongs to another copy of the buffer"
            )
        changed = self._journal.undo_to(mark, slot_task, self._rows, where)
        if changed:
            self._mm.flush()
        return changed

    def set_owner(self, owner: dict | None) -> None:
        """Record which run writes this buffer (kept in the metadata file, see `peek`)."""
        self.owner = owner
        self.flush()

    def _write_meta(self, state: dict[str, Any]) -> None:
        marks = self._journal.marks if self._journal is not None else []
        meta = {**state, "journals": list(marks), "owner": self.owner}
        atomic.write_json(self._meta_path, meta, indent=None)
        self._meta_mark = int(state["mark"])

    def flush(self, keep_journals: int = 3) -> None:
        """Flush the rows, start a new journal epoch if rows were offered since the last one,
        atomically replace the metadata file and keep the journals of the newest
        `keep_journals` epochs (>= 1; the current one included)."""
        if keep_journals < 1:
            raise ValueError(f"keep_journals must be >= 1, got {keep_journals}")
        journal = self._journal
        with self._lock:
            self._mm.flush()
            offered = self._table.offered
            if journal is None:
                self._mark = offered
            else:
                if not journal.is_open or offered != self._mark:
                    journal.start(offered, self._table.fill)  # before the metadata that names it
                    journal.marks.append(offered)
                    self._mark = offered
                journal.marks = journal.marks[-keep_journals:]
        self._write_meta(self.state_dict())
        if journal is not None:
            with self._lock:
                journal.drop_unlisted()

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._journal is not None:
                self._journal.close()
            del self._rows, self._mm
        self._close_fd()

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer({self._tokens_path}, policy={self.policy}, store={self.store}, fill={self.fill}/"
            f"{self._capacity or 'all'}, tasks={self.counts_per_task()})"
        )


# -- a kept buffer seen from outside: which run owns it, what it holds; copies and removal ---------
def _shard_meta_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("shard-[0-9][0-9][0-9].meta.json"))


def peek(directory: str | Path, all_shards: bool = True) -> dict[str, Any] | None:
    """What a buffer directory holds, read without changing anything; None when it holds no buffer.

    Keys: shards (how many ranks wrote it), owner (the run that writes it, None for buffers written
    before cpt recorded owners), row_len, dtype, policy, store ("rows" or "refs"), capacity_rows (per
    shard), fill (all shards), rows_per_task {task id: rows stored}, tasks (the task ids ever
    offered, sorted), stored_bytes (what the stored slots take in the tokens files: fill × bytes per
    slot) and disk_bytes (what the shards' files — tokens, metadata, journals — occupy on disk).
    `all_shards=False` parses shard 0's metadata only (the owner and settings; fill, rows, tasks and
    bytes are then shard 0's): what every rank checks at start, without reading every other rank's slot lists.
    """
    files = _shard_meta_files(Path(directory))
    if not files:
        return None
    metas = []
    shards = len(files)
    for f in files if all_shards else files[:1]:
        try:
            metas.append(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            raise CptError(f"{f}: not a cpt replay buffer ({e})") from None
    indices = [int(f.name[6:9]) for f in files]  # names only: no metadata read
    if indices != list(range(len(files))):
        raise CptError(f"{directory}: replay buffer shards {indices} are not 0..{len(files) - 1}; the buffer is incomplete")
    rows: dict[int, int] = {}
    tasks: set[int] = set()
    for m in metas:
        for t, slots in m.get("task_slots", []):
            rows[int(t)] = rows.get(int(t), 0) + len(slots)
        tasks.update(int(t) for t, _ in m.get("seen", []))
    first = metas[0]
    return {
        "shards": shards,
        "owner": first.get("owner"),
        "row_len": first.get("row_len"),
        "dtype": first.get("dtype"),
        "policy": first.get("policy"),
        "store": first.get("store", "rows"),
        "capacity_rows": [m.get("capacity_rows") for m in metas],
        "fill": sum(int(m.get("fill", 0)) for m in metas),
        "rows_per_task": dict(sorted(rows.items())),
        "tasks": sorted(tasks),
        "stored_bytes": sum(int(m.get("fill", 0)) * _meta_slot_bytes(m) for m in metas),
        "disk_bytes": sum(_allocated_bytes(Path(directory), i) for i in indices[: len(metas)]),
    }


def remove_shard(directory: str | Path, shard: int) -> None:
    """Delete one shard's files (rows, metadata, undo journals); a missing shard is fine."""
    for p in Path(directory).glob(f"shard-{shard:03d}.*"):
        p.unlink(missing_ok=True)


def copy_shard(source: str | Path, directory: str | Path, shard: int) -> None:
    """Copy one flushed shard of `source` into `directory` (which must not hold it); `source` is only read.

    Only the stored rows [0, fill) are copied (the file keeps its length, sparse beyond them) plus
    the undo journals the metadata lists, so `ReplayBuffer.open` of the copy sees exactly the
    state the source's metadata describes.
    """
    source, directory = Path(source), Path(directory)
    meta_file = source / f"shard-{shard:03d}.meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise CptError(f"{meta_file}: cannot read replay buffer metadata ({e})") from None
    directory.mkdir(parents=True, exist_ok=True)
    tokens = source / f"shard-{shard:03d}.tokens"
    target = directory / tokens.name
    size = tokens.stat().st_size
    used = int(meta["fill"]) * _meta_slot_bytes(meta)
    with open(tokens, "rb") as src, open(target, "wb") as dst:
        left = used
        while left > 0:
            chunk = src.read(min(left, 1 << 24))
            if not chunk:
                raise CptError(f"{tokens}: shorter than its metadata says ({meta['fill']} rows)")
            dst.write(chunk)
            left -= len(chunk)
        dst.truncate(size)
    for mark in meta.get("journals", []):
        journal = source / f"shard-{shard:03d}.undo-{int(mark)}.bin"
        if journal.is_file():
            shutil.copyfile(journal, directory / journal.name)
    atomic.write_json(directory / meta_file.name, meta, indent=None)
