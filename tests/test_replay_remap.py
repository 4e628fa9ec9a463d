"""Remapping a replay buffer written by W ranks onto W' ranks (`cpt.replay.remap.remap_buffer`).

The new shards hold exactly the rows of the old shards at their checkpoint states (rows stored
after the checkpoint are rolled back first), dealt round-robin in a fixed order within each new
shard's capacity; their counters let every policy go on as before (fifo overwrites its oldest row
next, a partly filled shard fills its free slots in order), and each new shard trains, flushes and
resumes like any other. Refs buffers are copied as offsets without resolving a row."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cpt.errors import CptError
from cpt.replay import ReplayBuffer
from cpt.replay.ownership import shard_capacity
from cpt.replay.remap import remap_buffer

ROW = 4
OWNER = {"run_id": "r1", "run_dir": "/runs/a", "config": "abc"}
CAP = 60


def _rows(ids) -> np.ndarray:
    """Rows whose every token is the item id, so a row's content identifies the item."""
    return np.repeat(np.asarray(ids, dtype=np.int64)[:, None], ROW, axis=1)


def _feed(buf: ReplayBuffer, shard: int, start: int, n: int, tasks: int = 3) -> None:
    """Offer rows with ids shard*100000 + start.. (increasing in stream order), tasks in sequence, in batches of mixed size."""
    i, sizes = 0, (1, 3, 7, 5)
    while i < n:
        k = min(sizes[i % len(sizes)], n - i)
        ids = shard * 100_000 + start + np.arange(i, i + k)
        buf.add(_rows(ids), (i * tasks) // n)
        i += k


def _build(path, world: int, policy: str, cap_total: int | None, lengths=None) -> tuple[list[dict], list[list[tuple[int, int]]]]:
    """A flushed buffer of `world` shards; returns each shard's state and its stored (task, id) in dealing order."""
    lengths = lengths or [90 + 7 * q for q in range(world)]
    states, stored = [], []
    for q in range(world):
        buf = ReplayBuffer(path, ROW, shard_capacity(cap_total, world, q), policy, dtype=np.uint32, seed=5, shard=q, owner=OWNER)
        _feed(buf, q, 0, lengths[q])
        buf.flush()
        states.append(buf.state_dict())
        stored.append(_items(buf, oldest_first=policy == "fifo"))
        buf.close()
    return states, stored


def _items(buf: ReplayBuffer, oldest_first: bool = False) -> list[tuple[int, int]]:
    """(task id, row id) of every stored row, in slot order (or in stream order: ids grow with it)."""
    rows, tasks = buf.read(np.arange(buf.fill))
    assert (rows == rows[:, :1]).all()
    items = list(zip(tasks.tolist(), rows[:, 0].tolist()))
    return sorted(items, key=lambda x: x[1]) if oldest_first else items


def _new_shards(target, world: int, store: str = "rows", resolver=None) -> list[ReplayBuffer]:
    return [ReplayBuffer.open(target, r, store=store, resolver=resolver) for r in range(world)]


@pytest.mark.parametrize("old,new", [(2, 3), (3, 2), (2, 1), (1, 2)])
@pytest.mark.parametrize("policy", ["reservoir", "balanced", "fifo", "all"])
def test_remap_keeps_every_row_and_deals_them_round_robin_within_capacity(tmp_path, policy, old, new):
    cap = None if policy == "all" else CAP
    kind = "reservoir" if policy == "all" else policy
    states, stored = _build(tmp_path / "src", old, kind, cap)
    lines: list[str] = []
    summary = remap_buffer(tmp_path / "src", states, tmp_path / "dst", new, cap, seed=11, log=lines.append)

    everything = [item for shard in stored for item in shard]  # old shard 0's rows, then shard 1's, ...
    shards = _new_shards(tmp_path / "dst", new)
    got = [_items(b) for b in shards]
    assert Counter(x for g in got for x in g) == Counter(everything)  # conservation
    for r, items in enumerate(got):
        assert items == everything[r::new]  # row g went to shard g % new, in dealt order
        assert shards[r].capacity_rows == shard_capacity(cap, new, r)
        assert cap is None or len(items) <= shards[r].capacity_rows
        assert shards[r].policy == kind and shards[r].owner == OWNER and shards[r].seed == 5 and shards[r].dtype == np.uint32
    sizes = [len(g) for g in got]
    assert max(sizes) - min(sizes) <= 1
    assert summary["rows_per_shard"] == sizes and summary["rows"] == len(everything) == sum(sizes)
    assert summary["from_world"] == old and summary["to_world"] == new and summary["bytes"] == len(everything) * ROW * 4
    assert summary["rows_per_task"] == dict(sorted(Counter(t for t, _ in everything).items()))
    assert len(lines) == 1 and lines[0].startswith(f"replay: remapped {len(everything)} sequences from {old} shards to {new} (")

    old_seen = Counter()
    for s in states:
        old_seen.update(dict(s["seen"]))
    offered = sum(s["offered"] for s in states)
    for r, b in enumerate(shards):
        st = b.state_dict()
        assert [t for t, _ in st["seen"]] == [0, 1, 2]  # every task, in first-seen order
        assert sum(c for _, c in st["seen"]) == st["offered"]
        if kind == "fifo":
            assert st["offered"] % b.capacity_rows == 0 and st["offered"] >= offered // new  # the next row goes to slot 0
        else:
            assert st["offered"] == offered // new + (r < offered % new)  # its share of the stream
    if kind != "fifo":
        assert sum((Counter(b.seen_per_task()) for b in shards), Counter()) == old_seen


def test_refs_buffers_are_remapped_as_offsets_and_task_ids_without_a_resolver(tmp_path):
    tokens = {t: np.arange(5000, dtype=np.uint16) for t in range(3)}  # a row's first token is its offset
    rng = np.random.default_rng(0)
    before: Counter = Counter()
    states = []
    for q in range(2):
        buf = ReplayBuffer(tmp_path / "src", ROW, 25, "reservoir", seed=2, shard=q, store="refs", resolver=tokens)
        for step in range(30):
            buf.add(None, step % 3, starts=rng.integers(0, 5000 - ROW, size=3))
        buf.flush()
        states.append(buf.state_dict())
        rows, tasks = buf.read(np.arange(buf.fill))
        before.update(zip(tasks.tolist(), rows[:, 0].tolist()))
        buf.close()

    summary = remap_buffer(tmp_path / "src", states, tmp_path / "dst", 3, 50, seed=1, log=lambda _: None)
    assert summary["bytes"] == 50 * 8  # one int64 offset per row

    after: Counter = Counter()
    for b in _new_shards(tmp_path / "dst", 3, store="refs", resolver=tokens):
        rows, tasks = b.read(np.arange(b.fill))
        for t, row in zip(tasks.tolist(), rows):
            assert (row == tokens[t][row[0] : row[0] + ROW]).all()
        after.update(zip(tasks.tolist(), rows[:, 0].tolist()))
    assert after == before and sum(after.values()) == 50
    with pytest.raises(CptError, match="store: rows"):
        ReplayBuffer.open(tmp_path / "dst", 0, store="rows")


def test_rows_stored_after_the_checkpoint_are_rolled_back_before_the_remap(tmp_path):
    states, stored = _build(tmp_path / "src", 2, "reservoir", CAP)
    checkpoint = Counter(x for s in stored for x in s)
    a = ReplayBuffer.open(tmp_path / "src", 0)  # the run went on: another flush, then more rows and a kill
    _feed(a, 0, 500, 40)
    a.flush()
    _feed(a, 0, 600, 40)
    b = ReplayBuffer.open(tmp_path / "src", 1)  # this rank was killed before it flushed again
    _feed(b, 1, 500, 40)
    later = Counter(_items(a)) + Counter(_items(b))
    assert later != checkpoint
    del a, b

    remap_buffer(tmp_path / "src", states, tmp_path / "dst", 3, CAP, seed=0, log=lambda _: None)
    got = Counter(x for buf in _new_shards(tmp_path / "dst", 3) for x in _items(buf))
    assert got == checkpoint


def test_a_partly_filled_buffer_fills_its_free_slots_in_order_after_the_remap(tmp_path):
    for policy in ("reservoir", "fifo", "balanced"):
        src, dst = tmp_path / f"src-{policy}", tmp_path / f"dst-{policy}"
        states, stored = _build(src, 2, policy, CAP, lengths=[50, 10])  # shard 0 full, shard 1 not
        remap_buffer(src, states, dst, 3, CAP, seed=3, log=lambda _: None)
        for r, buf in enumerate(_new_shards(dst, 3)):
            before = _items(buf)
            assert len(before) < buf.capacity_rows
            if policy != "balanced":
                assert buf.state_dict()["offered"] == buf.fill
            ids = 900_000 + r * 100 + np.arange(5)
            buf.add(_rows(ids), 2)
            assert _items(buf) == before + [(2, int(i)) for i in ids]  # appended, no holes, nothing overwritten


def test_a_full_fifo_shard_overwrites_its_oldest_rows_first_after_the_remap(tmp_path):
    states, stored = _build(tmp_path / "src", 2, "fifo", CAP)
    remap_buffer(tmp_path / "src", states, tmp_path / "dst", 3, CAP, seed=0, log=lambda _: None)
    oldest_first = [x for s in stored for x in s]
    for r, buf in enumerate(_new_shards(tmp_path / "dst", 3)):
        mine = oldest_first[r::3]
        assert buf.fill == buf.capacity_rows == len(mine)
        for k in range(1, 4):  # each new row replaces the oldest one left
            buf.add(_rows([800_000 + 10 * r + k]), 2)
            assert sorted(_items(buf), key=lambda x: x[1]) == mine[k:] + [(2, 800_000 + 10 * r + j) for j in range(1, k + 1)]


def test_remapped_shards_train_flush_reopen_and_resume_from_the_remap_state(tmp_path):
    states, _ = _build(tmp_path / "src", 2, "balanced", CAP)
    remap_buffer(tmp_path / "src", states, tmp_path / "dst", 3, CAP, seed=4, log=lambda _: None)
    for r in range(3):
        buf = ReplayBuffer.open(tmp_path / "dst", r)
        remapped, at_remap = _items(buf), buf.state_dict()
        _feed(buf, 5 + r, 0, 40, tasks=4)  # a new task arrives; rows get overwritten
        slots = buf.sample_slots(16, eligible_tasks={0, 3})
        rows, tasks = buf.read(slots)
        assert set(tasks.tolist()) <= {0, 3} and (rows == rows[:, :1]).all()
        assert set(buf.counts_per_task()) == {0, 1, 2, 3}
        buf.flush()
        flushed, items = buf.state_dict(), _items(buf)
        _feed(buf, 5 + r, 100, 20)  # then killed without a flush
        del buf

        again = ReplayBuffer.open(tmp_path / "dst", r)
        assert again.state_dict() == flushed and _items(again) == items
        again.load_state_dict(at_remap)  # resume from the checkpoint taken right after the remap
        assert _items(again) == remapped and again.state_dict()["offered"] == at_remap["offered"]


def test_the_remap_is_deterministic_and_writes_only_the_target(tmp_path):
    states, _ = _build(tmp_path / "src", 3, "reservoir", CAP)
    remap_buffer(tmp_path / "src", states, tmp_path / "one", 2, CAP, seed=9, log=lambda _: None)
    remap_buffer(tmp_path / "src", states, tmp_path / "two", 2, CAP, seed=9, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "src", "two"]  # no temporary left behind
    for r in range(2):
        a, b = ReplayBuffer.open(tmp_path / "one", r), ReplayBuffer.open(tmp_path / "two", r)
        assert a.state_dict() == b.state_dict() and _items(a) == _items(b)
        assert (a.sample_slots(20) == b.sample_slots(20)).all()
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())


def test_a_buffer_larger_than_a_copy_chunk_is_copied_in_pieces(tmp_path):
    states, stored = _build(tmp_path / "src", 2, "fifo", CAP)
    remap_buffer(tmp_path / "src", states, tmp_path / "dst", 3, CAP, seed=0, log=lambda _: None, chunk_bytes=5 * ROW * 4)
    everything = [x for s in stored for x in s]
    assert [_items(b) for b in _new_shards(tmp_path / "dst", 3)] == [everything[r::3] for r in range(3)]


def test_an_existing_target_a_mismatched_shard_or_too_small_a_capacity_is_refused(tmp_path):
    states, _ = _build(tmp_path / "src", 2, "reservoir", CAP)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(CptError) as e:
        remap_buffer(tmp_path / "src", states, tmp_path / "full", 3, CAP, seed=0, log=lambda _: None)
    assert "\n" not in str(e.value) and str(tmp_path / "full") in str(e.value)
    with pytest.raises(CptError, match="replay.buffer.capacity"):
        remap_buffer(tmp_path / "src", states, tmp_path / "small", 3, CAP // 2, seed=0, log=lambda _: None)
    with pytest.raises(CptError, match="shards \\[0, 1\\]"):
        remap_buffer(tmp_path / "src", states[:1], tmp_path / "dst", 3, CAP, seed=0, log=lambda _: None)
    assert not (tmp_path / "small").exists() and not (tmp_path / "dst").exists()

    (tmp_path / "empty").mkdir()  # an empty target directory is fine
    assert remap_buffer(tmp_path / "src", states, tmp_path / "empty", 3, CAP, seed=0, log=lambda _: None)["rows"] == CAP

    mixed = tmp_path / "mixed"
    ReplayBuffer(mixed, ROW, 30, "reservoir", dtype=np.uint32, seed=5, shard=0).flush()
    ReplayBuffer(mixed, ROW, 30, "fifo", dtype=np.uint32, seed=5, shard=1).flush()
    mixed_states = [ReplayBuffer.open(mixed, q).state_dict() for q in range(2)]
    with pytest.raises(CptError, match="shard-001.meta.json: policy='fifo'"):
        remap_buffer(mixed, mixed_states, tmp_path / "dst", 3, CAP, seed=0, log=lambda _: None)
    with pytest.raises(CptError, match="states\\[0\\] is the state of shard 1"):
        remap_buffer(mixed, mixed_states[::-1], tmp_path / "dst", 3, CAP, seed=0, log=lambda _: None)


def test_a_kept_everything_shard_larger_than_the_first_allocation_is_sized_to_its_rows(tmp_path):
    states, stored = _build(tmp_path / "src", 1, "reservoir", None, lengths=[2600])
    remap_buffer(tmp_path / "src", states, tmp_path / "dst", 2, None, seed=0, log=lambda _: None)
    shards = _new_shards(tmp_path / "dst", 2)
    assert [_items(b) for b in shards] == [stored[0][0::2], stored[0][1::2]]
    shards[0].add(_rows(np.arange(700_000, 700_100)), 2)  # keeps growing past its rows
    assert shards[0].fill == 1400 and _items(shards[0])[-1] == (2, 700_099)
