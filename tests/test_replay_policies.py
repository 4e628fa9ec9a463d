"""Replay buffer parts: the storage policies on a bare slot table (fifo keeps the newest rows in
stream order, reservoir follows Algorithm R, balanced keeps equal shares, "all" grows), the undo
journal's file format, `eligible`, and the prefetcher's numpy hand-over to the batch source."""

import numpy as np
import pytest
import torch

from cpt.errors import CptError
from cpt.replay.buffer import (
    _UNDO_MAGIC,
    Balanced,
    Fifo,
    KeepAll,
    ReplayBuffer,
    Reservoir,
    SlotTable,
    UndoJournal,
    make_policy,
)
from cpt.replay.mixing import MixedBatchSource, StepPlan
from cpt.replay.prefetch import ReplayPrefetcher

ROW = 3


def _policy(name, cap, seed=0):
    table = SlotTable(cap if cap is not None else 4)
    rng = np.random.Generator(np.random.PCG64(seed))
    return make_policy(name, cap, table, rng), table


def _offer(policy, table, n, task):
    start = table.offer(n, task)
    return start, *policy.place(n, task, start)


def _check_table(table):
    """The table's three views agree: task lists, per-slot task and position, fill."""
    assert sum(len(s) for s in table.task_slots.values()) == table.fill
    assert (table.slot_task[table.fill :] == -1).all() and (table.slot_task[: table.fill] >= 0).all()
    for t, slots in table.task_slots.items():
        assert slots and (table.slot_task[slots] == t).all()
        assert (table.slot_pos[slots] == np.arange(len(slots))).all()


def _batches(seed, count, sizes=(1, 3, 7, 25), tasks=3):
    rng = np.random.default_rng(seed)
    return [(int(rng.choice(sizes)), int(rng.integers(tasks))) for _ in range(count)]


def test_make_policy_picks_the_class_and_refuses_unknown_names():
    assert isinstance(_policy("reservoir", 5)[0], Reservoir)
    assert isinstance(_policy("balanced", 5)[0], Balanced)
    assert isinstance(_policy("fifo", 5)[0], Fifo)
    assert isinstance(_policy("fifo", None)[0], KeepAll)  # capacity "all": the policy does not matter
    with pytest.raises(CptError, match="policy"):
        _policy("lifo", 5)


def test_fifo_places_by_stream_position_and_keeps_the_newest():
    cap = 16
    policy, table = _policy("fifo", cap)
    holder = np.full(cap, -1)  # stream position each slot holds
    for n, task in _batches(1, 300):
        start, src, slots = _offer(policy, table, n, task)
        assert (src == np.arange(max(0, n - cap), n)).all()  # a batch longer than cap keeps its tail
        assert (slots == (start + src) % cap).all() and len(np.unique(slots)) == len(slots)
        holder[slots] = start + src
        _check_table(table)
    assert sorted(holder) == list(range(table.offered - cap, table.offered))


def test_reservoir_fills_in_order_then_follows_algorithm_r():
    cap = 10
    policy, table = _policy("reservoir", cap, seed=3)
    before = dict(policy.rng.bit_generator.state)
    _, src, slots = _offer(policy, table, 7, 0)
    assert (src == np.arange(7)).all() and (slots == np.arange(7)).all()
    assert policy.rng.bit_generator.state == before  # no draws while slots are free
    # a batch crossing the capacity: the first 3 rows take the last free slots, the rest draw
    twin = np.random.Generator(np.random.PCG64(3))
    _, src, slots = _offer(policy, table, 5, 1)
    late = twin.integers(0, np.arange(11, 13))  # uniform in [0, position) for 1-based positions 11, 12
    last = {}  # of rows of the batch landing on one slot, the last one is kept
    for i, s in enumerate([7, 8, 9, *late.tolist()]):
        if s < cap:
            last[s] = i
    assert set(zip(src.tolist(), slots.tolist())) == {(i, s) for s, i in last.items()}
    assert table.fill == cap
    _check_table(table)


def test_reservoir_keeps_each_offered_row_with_probability_cap_over_offered():
    cap, n, seeds = 8, 64, 400
    kept = np.zeros(n)
    for seed in range(seeds):
        policy, table = _policy("reservoir", cap, seed)
        holder = np.full(cap, -1)
        for first in range(0, n, 5):
            start, src, slots = _offer(policy, table, min(5, n - first), 0)
            holder[slots] = start + src
        kept[holder] += 1
    expected = seeds * cap / n
    assert np.abs(kept - expected).max() < 5 * np.sqrt(expected)  # every position equally likely


def test_balanced_keeps_equal_shares_and_everything_of_a_task_below_its_share():
    cap = 30
    policy, table = _policy("balanced", cap, seed=2)
    for _ in range(20):
        _offer(policy, table, 10, 0)
    assert table.counts() == {0: cap}
    _offer(policy, table, 4, 1)  # under its share: all 4 stored, evicting task 0
    assert table.counts() == {0: cap - 4, 1: 4}
    for _ in range(10):
        _offer(policy, table, 10, 1)
        _offer(policy, table, 10, 2)
    assert table.counts() == {0: 10, 1: 10, 2: 10}
    _offer(policy, table, 3, 3)
    assert table.counts()[3] == 3 and table.fill == cap
    for _ in range(10):
        _offer(policy, table, 10, 3)
    assert table.counts() == {0: 8, 1: 8, 2: 7, 3: 7}  # 30 // 4 = 7, the remainder to the first-seen
    _check_table(table)


def test_keep_all_doubles_and_stores_every_row_contiguously():
    policy, table = _policy("reservoir", None)
    sizes = [3, 1, 9, 40, 2]
    for n in sizes:
        fill = table.fill
        _, src, slots = _offer(policy, table, n, 0)
        assert (src == np.arange(n)).all() and (slots == fill + np.arange(n)).all()
    assert table.fill == sum(sizes) and table.rows == 106  # 4 -> 13 (the batch needs more than 8) -> 53 -> 106
    _check_table(table)


@pytest.mark.parametrize("policy", ["reservoir", "balanced", "fifo", "all"])
def test_every_policy_returns_distinct_slots_and_a_consistent_table(policy):
    cap = None if policy == "all" else 20
    p, table = _policy("reservoir" if policy == "all" else policy, cap, seed=5)
    for n, task in _batches(4, 400):
        _, src, slots = _offer(p, table, n, task)
        assert src.dtype == slots.dtype == np.int64 and len(src) == len(slots)
        assert len(np.unique(slots)) == len(slots) and len(np.unique(src)) == len(src) and ((0 <= src) & (src < n)).all()
        assert (table.slot_task[slots] == task).all()
        _check_table(table)
    assert sum(table.seen.values()) == table.offered


@pytest.mark.parametrize("policy,cap", [("reservoir", 20), ("balanced", 20), ("fifo", 20), ("reservoir", None)])
def test_a_reopened_buffer_places_rows_like_an_uninterrupted_one(tmp_path, policy, cap):
    a = ReplayBuffer(tmp_path / "a", ROW, cap, policy, seed=9)
    twin = ReplayBuffer(tmp_path / "b", ROW, cap, policy, seed=9)
    for i, (n, task) in enumerate(_batches(6, 200)):
        rows = np.full((n, ROW), i)
        a.add(rows, task)
        twin.add(rows, task)
        if i % 37 == 36:
            a.flush()
            twin.flush()  # the mark (offered at the last flush) is part of the state
            a = ReplayBuffer.open(tmp_path / "a", 0)
        ra, ta = a.read(np.arange(a.fill))
        rb, tb = twin.read(np.arange(twin.fill))
        assert (ra == rb).all() and (ta == tb).all()
    assert a.state_dict() == twin.state_dict()


def test_eligible_lists_stored_tasks_below_the_current_one(tmp_path):
    buf = ReplayBuffer(tmp_path, ROW, 6, "fifo")
    for t in (0, 1, 2, 3):
        buf.add(np.full((2, ROW), t), t)  # fifo of 6: task 0's rows are evicted
    assert buf.counts_per_task() == {0: 0, 1: 2, 2: 2, 3: 2}
    assert buf.eligible(0) == []
    assert buf.eligible(3) == [1, 2]
    assert buf.eligible(3, include_current=True) == [1, 2, 3]
    assert buf.eligible(1, task_offset=2) == [1, 2]  # run task 1 is stored as id 3
    assert buf.eligible(9) == [1, 2, 3]
    _, task_ids = buf.read(buf.sample_slots(50))
    for include in (False, True):  # the probe's membership test equals the bound on the id
        mask = np.isin(task_ids, buf.eligible(3, include))
        assert (mask == (task_ids <= 3 if include else task_ids < 3)).all()


class _Rows:
    def __init__(self, task):
        self.task = task

    def take(self, n, lo=0, hi=None):
        return np.full(((n if hi is None else hi) - lo, ROW), self.task, dtype=np.int64)


def test_the_batch_source_replays_what_the_buffer_calls_eligible(tmp_path):
    plan = StepPlan.build([3 * 4 * 6] * 3, seq_len=3, rows_per_step=4, rate=0.5, replay_first_task=False)
    buf = ReplayBuffer(tmp_path, ROW, 30, "reservoir", seed=1)
    src = MixedBatchSource([_Rows(t) for t in range(3)], plan, buf, None, include_current=False, task_offset=0)
    assert src._eligible(0) == []
    assert MixedBatchSource([], plan, None)._eligible(2) == []  # no buffer: nothing to replay
    src.start(0)
    for step in range(plan.total_steps):
        task = plan.task_of_step[step]
        assert src._eligible(task) == buf.eligible(task)
        rows, n_new, n_rep = src.next_batch(step)
        assert set(rows[n_new:, 0].tolist()) <= set(range(task))
        src.after_step(step)


def test_prefetched_rows_are_numpy_int64_and_the_wait_is_timed_once(tmp_path):
    buf = ReplayBuffer(tmp_path, ROW, 50, "reservoir", dtype=np.uint32)
    buf.add(np.arange(40 * ROW).reshape(40, ROW) + 2**31, 0)
    plan = StepPlan.build([3 * 4 * 10] * 2, seq_len=3, rows_per_step=4, rate=0.5, replay_first_task=True)
    with ReplayPrefetcher(buf) as pf:
        pf.submit(0, np.array([3, 1, 3]))
        rows, tids = pf.get_arrays(0)
        assert isinstance(rows, np.ndarray) and rows.dtype == np.int64 and tids.dtype == np.int64
        want, want_t = buf.read(np.array([3, 1, 3]))
        assert (rows == want).all() and (tids == want_t).all() and rows.max() >= 2**31
        src = MixedBatchSource([_Rows(0), _Rows(1)], plan, buf, pf, include_current=True)
        src.wait_seconds = 1.5  # as restored from a checkpoint
        before = pf.wait_seconds
        src.start(0)
        for step in range(plan.total_steps):
            batch, n_new, n_rep = src.next_batch(step)
            assert batch.dtype == torch.int32 and n_rep == 2  # the batch tensor is int32 (token ids < 2^31)
            src.after_step(step)
        assert src.wait_seconds == pytest.approx(1.5 + pf.wait_seconds - before, abs=1e-9)


def test_undo_journal_file_format_and_round_trip(tmp_path):
    j = UndoJournal(tmp_path, 2, ROW, np.dtype(np.uint16), slots=8)
    assert not j.is_open
    j.start(17, fill=5)
    path = tmp_path / "shard-002.undo-17.bin"
    header = _UNDO_MAGIC + np.array([17, 5, ROW, 2], dtype="<i8").tobytes()
    assert j.path(17) == path and path.read_bytes() == header
    rows = np.arange(8 * ROW, dtype=np.uint16).reshape(8, ROW)
    j.record(np.array([6, 1, 4]), {6: 9, 1: 3, 4: 0}, rows)  # slot 6 is above the fill: not recorded
    j.record(np.array([1, 2]), {1: 7, 2: 8}, rows)  # slot 1 is already recorded in this epoch
    rec = np.dtype([("slot", "<i8"), ("task", "<i8"), ("row", "<u2", (ROW,))])
    want = np.array([(1, 3, rows[1]), (4, 0, rows[4]), (2, 8, rows[2])], dtype=rec)
    assert path.read_bytes() == header + want.tobytes()
    got = j.read(17, "here")
    assert got.tobytes() == want.tobytes()
    with open(path, "ab") as f:  # a torn last record is ignored
        f.write(b"\x01\x02\x03")
    assert len(j.read(17, "here")) == 3
    # undo: the rows are overwritten, then restored from the journal
    changed = rows.copy()
    changed[[1, 2, 4]] = 999
    slot_task = np.array([0, 3, 8, 0, 0])
    with pytest.raises(CptError, match="undo journal .*undo-17.bin is missing"):
        j.undo_to(17, slot_task, changed, "here")  # only epochs listed in `marks` are used
    j.marks = [17]
    assert j.undo_to(17, slot_task, changed, "here")
    assert (changed == rows).all()
    with pytest.raises(CptError, match="do not match the state"):
        j.undo_to(17, np.array([0, 4, 8, 0, 0]), changed, "here")
    (tmp_path / "shard-002.undo-3.bin").write_bytes(b"stray")
    (tmp_path / "shard-001.undo-3.bin").write_bytes(b"another shard")
    j.drop_unlisted()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-001.undo-3.bin", "shard-002.undo-17.bin"]
    j.close()
    assert not j.is_open
    with pytest.raises(CptError, match="undo journal .*undo-5.bin is missing"):
        j.undo_to(5, slot_task, changed, "here")
