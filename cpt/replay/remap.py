"""Redistribute a sharded replay buffer written by W data-parallel ranks over W' ranks.

Each rank owns one shard of the buffer directory (`ReplayBuffer`), so a run resumed on another
number of ranks needs its rows dealt anew. `remap_buffer` does that from the shards' states in the
training checkpoint, writing a new buffer directory that the resumed run opens rank by rank.

What the new buffer holds. Every old shard is first brought back to its checkpoint state
(`ReplayBuffer.open` + `load_state_dict`, which applies the undo journals in place, as a resume on
the same number of ranks does), so rows stored after that checkpoint's flush are not carried over.
The stored rows are then taken in order — old shard 0's slots 0..fill-1, then shard 1's, … (with
policy fifo each old shard oldest first: from slot offered % capacity when it has wrapped) — and
dealt by one running index g to new shard g % W', slot g // W'. The new shards therefore hold the
same multiset of (task id, slot contents) as the old ones, their row counts differ by at most one,
and each new shard's rows keep the old relative order. A buffer of references (store "refs") is
copied as it is stored, offsets and task ids, and never resolved, so no task token files are needed.
Rows are copied in chunks of at most `chunk_bytes`; only the slot tables are held in RAM.

Counters. Each new shard gets counters as if it had seen its share of the stream, so its policy
goes on keeping rows at the rate the old buffer did:

- `seen[t]` = the rows of task t the shard stores, plus a share of the task's rows that were offered
  but not stored (its total `seen` over the old shards minus its stored rows). Those unstored counts
  are dealt like the rows, continuing the same running index (task by task in first-seen order), so
  every task's total seen is kept, no shard has seen fewer rows of a task than it stores, and
  `offered` (the sum of seen) is floor(O / W') plus one for the first O mod W' shards, O being the
  old shards' total. Every new shard lists every task in the order of first appearance over the old
  shards (shard 0's order, then the new tasks of shard 1, …), also tasks it holds no row of.
- reservoir and fifo place by stream position while a shard is not full, so a new shard that is not
  full gets offered == fill: its seen counts are then its stored rows only (the unstored share is
  dropped, which happens only when some old shards were full and the new ones are not).
- fifo overwrites slot offered % capacity next, which must be the oldest row, slot 0: a full fifo
  shard gets the smallest multiple of its capacity not below its seen sum as `offered`, the
  difference being added to the seen count of its last task in first-seen order.
- balanced and "all" (KeepAll) keep the counts above (balanced draws within a task by its seen count).

Randomness. Each new shard starts fresh insert and sample generators from
`np.random.SeedSequence([seed, 0x5EED, W', r, total offered])`, so replay after a remap is
statistically equivalent to, not bit-identical with, a run that kept its number of ranks (which row
a given draw returns depends on which shard holds it). The remap itself is deterministic: the same
states, target world size and seed give byte-identical shards.

The new directory is filled under a hidden temporary sibling and renamed into place when complete
(`atomic.written_whole`), so `target` either does not exist or holds every new shard, each flushed
(metadata and a fresh journal epoch) so that its own metadata is a state it can later resume from.
Nothing but the rollback above changes the old shards. A process killed meanwhile can leave the
hidden temporary behind; deleting it (and an empty `target`) and calling again is always safe.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cpt import atomic
from cpt.errors import CptError
from cpt.replay.buffer import _MIN_ALL_ROWS, ReplayBuffer, _shard_meta_files
from cpt.replay.ownership import shard_capacity

_CHUNK_BYTES = 64 << 20  # rows copied per read: bounded memory however large a shard is
_SETTINGS = ("row_len", "dtype", "store", "policy", "seed")


def _share(total: int, world: int, rank: int) -> int:
    """Rank's part of `total` dealt round-robin from rank 0: floor(total / world), plus one for rank < total mod world."""
    return total // world + (rank < total % world)


def _dealt(lo: int, hi: int, world: int, rank: int) -> int:
    """How many of the running indices lo..hi-1 go to `rank` (those ≡ rank mod world)."""
    return (hi - rank + world - 1) // world - (lo - rank + world - 1) // world


def _release(buf: ReplayBuffer) -> None:
    """Close a shard's files without a flush: the metadata on disk stays as it is."""
    with buf._lock:
        if buf._journal is not None:
            buf._journal.close()
        if hasattr(buf, "_mm"):
            del buf._rows, buf._mm
    buf._close_fd()


def _slot_ranges(buf: ReplayBuffer) -> list[tuple[int, int]]:
    """The shard's stored slots in dealing order, as [start, stop) ranges: slot order, or oldest first for a wrapped fifo."""
    tb, cap = buf._table, buf.capacity_rows
    if buf.policy == "fifo" and cap is not None and tb.offered > cap:
        start = tb.offered % cap
        return [(start, cap), (0, start)]
    return [(0, tb.fill)]


def _open_old(source: Path, states: list[dict], opened: list[ReplayBuffer]) -> None:
    """Open every old shard at its checkpoint state into `opened`, checking that they form one buffer."""
    first: dict[str, Any] = {}
    for q, state in enumerate(states):
        meta = source / f"shard-{q:03d}.meta.json"
        if not isinstance(state, dict):
            raise CptError(f"replay remap: states[{q}] is not a replay buffer state (got {type(state).__name__})")
        if "shard" in state and state["shard"] != q:
            raise CptError(f"replay remap: states[{q}] is the state of shard {state['shard']}, not of {meta}")
        buf = ReplayBuffer.open(source, q)  # no resolver: a refs shard's offsets are copied, never resolved
        opened.append(buf)
        buf.load_state_dict(state)  # undoes the rows written after the checkpoint's flush
        mine = {k: getattr(buf, k) for k in _SETTINGS}
        mine["dtype"] = buf.dtype.name
        mine["owner"] = buf.owner
        mine["capacity"] = "all" if buf.capacity_rows is None else "finite"
        if q == 0:
            first = mine
            continue
        for key, value in mine.items():
            if value != first[key]:
                raise CptError(f"{meta}: {key}={value!r} but shard 0 has {first[key]!r}; the shards are not of one replay buffer")


def _counters(policy: str, cap: int | None, stored: dict[int, int], unstored: dict[int, int], order: list[int]) -> tuple[int, list]:
    """(offered, [(task, seen)] in first-seen order) of one new shard, from its stored and its share of unstored rows."""
    seen = {t: stored.get(t, 0) + unstored.get(t, 0) for t in order}
    full = cap is not None and sum(stored.values()) >= cap
    if cap is not None and not full and policy in ("reservoir", "fifo"):
        seen = {t: stored.get(t, 0) for t in order}  # these place by stream position while filling: offered == fill
    offered = sum(seen.values())
    if cap is not None and full and policy == "fifo" and order:
        want = -(-offered // cap) * cap  # the next insert goes to slot 0, the oldest row
        seen[order[-1]] += want - offered
        offered = want
    return offered, [(t, seen[t]) for t in order]


def remap_buffer(
    source: Path,
    states: list[dict],
    target: Path,
    world: int,
    capacity_total: int | None,
    seed: int,
    log: Callable[[str], Any] = print,
    *,
    chunk_bytes: int = _CHUNK_BYTES,
) -> dict:
    """Write the buffer in `source` (len(states) shards, each at its checkpoint state `states[q]`)
    as `world` new shards in `target` (see the module docstring for what they hold).

    `capacity_total`: the new global capacity in rows (None: "all"); new shard r gets
    `shard_capacity(capacity_total, world, r)` slots and must fit its rows. `seed`: seeds the new
    shards' generators (the shards keep the old buffer's own `seed` setting). Returns a summary:
    from_world, to_world, rows, rows_per_shard, rows_per_task, bytes (copied), seconds.
    """
    t0 = time.perf_counter()
    source, target = Path(source), Path(target)
    if isinstance(world, bool) or not isinstance(world, (int, np.integer)) or world < 1:
        raise CptError(f"replay remap: world must be an int >= 1, got {world!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CptError(f"replay remap: seed must be an int >= 0, got {seed!r}")
    if capacity_total is not None and (
        isinstance(capacity_total, bool) or not isinstance(capacity_total, (int, np.integer)) or capacity_total < 1
    ):
        raise CptError(f"replay.buffer.capacity: expected rows >= 1 or None (all) for the remap, got {capacity_total!r}")
    world, seed = int(world), int(seed)
    capacity_total = None if capacity_total is None else int(capacity_total)
    if not states:
        raise CptError("replay remap: no shard states given (states is empty)")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CptError(f"{target}: already exists and is not empty; remap the replay buffer into a new directory")
    old_world = len(states)
    indices = [int(f.name[6:9]) for f in _shard_meta_files(source)]
    if indices != list(range(old_world)):
        raise CptError(
            f"{source}: holds replay buffer shards {indices}, but {old_world} shard state(s) were given (shards 0..{old_world - 1})"
        )

    olds: list[ReplayBuffer] = []
    news: list[ReplayBuffer] = []
    try:
        _open_old(source, states, olds)
        ref = olds[0]
        order: list[int] = []
        seen_total: dict[int, int] = {}
        ranges = [_slot_ranges(b) for b in olds]
        for b in olds:
            for t in b._table.order:
                if t not in seen_total:
                    order.append(t)
                    seen_total[t] = 0
                seen_total[t] += b._table.seen[t]
        tasks = np.concatenate([np.zeros(0, np.int64)] + [b._table.slot_task[lo:hi] for b, rs in zip(olds, ranges) for lo, hi in rs])
        n_rows, total_offered = len(tasks), sum(b._table.offered for b in olds)
        stored_total = {t: int(c) for t, c in zip(*np.unique(tasks, return_counts=True))}
        for t, c in stored_total.items():
            if c > seen_total.get(t, 0):
                raise CptError(
                    f"replay remap: the states store {c} rows of task id {t} but count {seen_total.get(t, 0)} seen; not states of this buffer"
                )
        caps = [shard_capacity(capacity_total, world, r) for r in range(world)]
        for r, cap in enumerate(caps):
            if cap is not None and _share(n_rows, world, r) > cap:
                raise CptError(
                    f"replay.buffer.capacity: {capacity_total} sequences over {world} ranks leave shard {r} {cap} slots, but it "
                    f"receives {_share(n_rows, world, r)} of the buffer's {n_rows} sequences; use a capacity of at least {n_rows}"
                )

        plans = []
        for r in range(world):
            mine = tasks[r::world]
            stored = {t: int(c) for t, c in zip(*np.unique(mine, return_counts=True))}
            unstored, pos = {}, n_rows  # unstored counts continue the rows' running index
            for t in order:
                left = seen_total[t] - stored_total.get(t, 0)
                unstored[t] = _dealt(pos, pos + left, world, r)
                pos += left
            offered, seen = _counters(ref.policy, caps[r], stored, unstored, order)
            task_slots = {t: np.flatnonzero(mine == t).tolist() for t in order if stored.get(t)}
            plans.append((len(mine), offered, seen, task_slots))

        slot_bytes = ref._slot_bytes
        per_chunk = max(1, chunk_bytes // slot_bytes)
        with atomic.written_whole(target, replace=False) as tmp:
            for r in range(world):
                refs = {} if ref.store == "refs" else None  # an empty resolver: rows are copied, never resolved
                buf = ReplayBuffer(
                    tmp, ref.row_len, caps[r], ref.policy, ref.dtype, ref.seed, r, owner=ref.owner, store=ref.store, resolver=refs
                )
                news.append(buf)
                if caps[r] is None and plans[r][0] > _MIN_ALL_ROWS:
                    buf._grow(plans[r][0])
            g = 0
            # plain reads and writes, not the memmaps: mapped pages would stay in this process's RSS (2× the buffer)
            outs = [os.open(buf._tokens_path, os.O_WRONLY) for buf in news]
            try:
                for b, rs in zip(olds, ranges):
                    with open(b._tokens_path, "rb", buffering=0) as src:
                        for lo, hi in rs:
                            for a in range(lo, hi, per_chunk):
                                n = min(hi, a + per_chunk) - a
                                src.seek(a * slot_bytes)
                                block = np.frombuffer(src.read(n * slot_bytes), dtype=b._file_dtype).reshape(n, b._width)
                                for r, fd in enumerate(outs):
                                    off = (r - g) % world
                                    part = block[off::world]
                                    if len(part):
                                        os.pwrite(fd, np.ascontiguousarray(part).tobytes(), (g + off) // world * slot_bytes)
                                g += n
            finally:
                for fd in outs:
                    os.close(fd)
            for r, (buf, (fill, offered, seen, task_slots)) in enumerate(zip(news, plans)):
                tb = buf._table
                tb.restore(fill, offered, seen, task_slots, *tb.layout(task_slots))
                ins, smp = np.random.SeedSequence([seed, 0x5EED, world, r, total_offered]).spawn(2)
                buf._rng_insert.bit_generator.state = np.random.PCG64(ins).state
                buf._rng_sample.bit_generator.state = np.random.PCG64(smp).state
                buf.flush(keep_journals=1)  # the remapped state, with a fresh journal epoch to resume it from
                _release(buf)
            news.clear()
    finally:
        for buf in news + olds:
            _release(buf)

    rows_per_shard = [p[0] for p in plans]
    copied = n_rows * slot_bytes
    seconds = time.perf_counter() - t0
    log(
        f"replay: remapped {n_rows} sequences from {old_world} shards to {world} ({copied / 2**20:.1f} MiB in {seconds:.1f}s) into {target}"
    )
    return {
        "from_world": old_world,
        "to_world": world,
        "rows": n_rows,
        "rows_per_shard": rows_per_shard,
        "rows_per_task": dict(sorted(stored_total.items())),
        "bytes": copied,
        "seconds": seconds,
    }
