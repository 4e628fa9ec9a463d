"""Replay buffer: insert policies are statistically what they claim, sampling honours eligibility
and weights, state survives flush/open bit-exactly, an older flushed state brings back its rows
through the undo journals (also after a killed writer), and prefetched rows are never torn or newer
than at submit time."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import cpt.replay.buffer
from cpt.errors import CptError
from cpt.replay import ReplayBuffer, ReplayPrefetcher, capacity_rows_from

ROW = 4


def _rows(ids, row_len=ROW):
    """Rows whose every token is the item id, so a row's content identifies the item."""
    return np.repeat(np.asarray(ids, dtype=np.int64)[:, None], row_len, axis=1)


def _chi2_p(counts) -> float:
    """p-value of a chi-square test that `counts` are uniform (scipy-free)."""
    counts = np.asarray(counts, dtype=np.float64)
    expected = counts.sum() / len(counts)
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(counts) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(stat / 2, dtype=torch.float64)))


def _stored_ids(buf: ReplayBuffer, task=None) -> np.ndarray:
    rows, tids = buf.read(np.arange(buf.fill))
    assert (rows == rows[:, :1]).all()
    return rows[:, 0] if task is None else rows[tids == task, 0]


def _stream_inclusion(tmp_path, policy, n_items=2000, cap=100, seeds=150, buckets=10):
    counts = np.zeros(buckets, dtype=np.int64)
    for seed in range(seeds):
        buf = ReplayBuffer(tmp_path / f"{policy}{seed}", ROW, cap, policy, seed=seed)
        rng = np.random.default_rng(seed)
        i = 0
        while i < n_items:  # mixed batch sizes also exercise in-batch slot collisions
            n = int(rng.choice([1, 7, 64, 500]))
            buf.add(_rows(np.arange(i, min(i + n, n_items))), 0)
            i += n
        ids = _stored_ids(buf)
        assert len(ids) == cap and len(np.unique(ids)) == cap
        counts += np.bincount(ids * buckets // n_items, minlength=buckets)
    return counts


def test_reservoir_inclusion_is_uniform_and_the_test_can_fail(tmp_path):
    assert _chi2_p(_stream_inclusion(tmp_path, "reservoir")) > 1e-3
    assert _chi2_p(_stream_inclusion(tmp_path, "fifo", seeds=5)) < 1e-6  # power check


def test_balanced_equal_shares_and_uniform_within_task(tmp_path):
    sizes = {0: 1000, 1: 300, 2: 2000}
    within = {t: np.zeros(10, dtype=np.int64) for t in sizes}
    for seed in range(60):
        buf = ReplayBuffer(tmp_path / f"b{seed}", ROW, 90, "balanced", seed=seed)
        for t, n in sizes.items():
            for i in range(0, n, 50):
                buf.add(_rows(np.arange(i, min(i + 50, n))), t)
        counts = buf.counts_per_task()
        assert all(abs(c - 30) <= 1 for c in counts.values()), counts
        assert buf.seen_per_task() == sizes
        for t, n in sizes.items():
            ids = _stored_ids(buf, t)
            assert len(np.unique(ids)) == len(ids)
            within[t] += np.bincount(ids * 10 // n, minlength=10)
    for t in sizes:
        assert _chi2_p(within[t]) > 1e-3, (t, within[t])


def test_balanced_remainder_goes_to_first_seen_tasks_and_converges(tmp_path):
    buf = ReplayBuffer(tmp_path, ROW, 11, "balanced")
    buf.add(_rows(np.arange(50)), 7)  # task 7 fills everything first
    buf.add(_rows(np.arange(50)), 3)
    buf.add(_rows(np.arange(50)), 5)
    assert buf.counts_per_task() == {7: 4, 3: 4, 5: 3}


def test_fifo_keeps_the_last_capacity_rows(tmp_path):
    buf = ReplayBuffer(tmp_path, ROW, 64, "fifo")
    for i in range(0, 1000, 37):
        buf.add(_rows(np.arange(i, min(i + 37, 1000))), i % 3)
    assert sorted(_stored_ids(buf)) == list(range(1000 - 64, 1000))
    buf.add(_rows(np.arange(1000, 1200)), 0)  # one batch longer than the capacity
    assert sorted(_stored_ids(buf)) == list(range(1200 - 64, 1200))


def test_all_capacity_grows_and_keeps_every_row(tmp_path):
    buf = ReplayBuffer(tmp_path, 6, None, dtype=np.uint32)
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 2**32, size=(n, 6)) for n in (1, 1000, 30, 2500)]
    for t, c in enumerate(chunks):
        buf.add(c, t)
    everything = np.concatenate(chunks)
    assert buf.fill == len(everything) and buf.capacity_rows is None
    assert (tmp_path / "shard-000.tokens").stat().st_size >= everything.nbytes // 2
    rows, tids = buf.read(np.arange(buf.fill))
    assert rows.dtype == np.uint32 and (rows == everything).all()
    assert (tids == np.repeat(np.arange(4), [1, 1000, 30, 2500])).all()
    buf.flush()
    again = ReplayBuffer.open(tmp_path, 0)
    assert (again.read(np.arange(again.fill))[0] == everything).all()


def test_sampling_respects_eligibility_and_weights(tmp_path):
    buf = ReplayBuffer(tmp_path, ROW, None)
    for t, n in ((0, 100), (1, 300), (2, 600)):
        buf.add(_rows(np.arange(n)), t)
    _, tids = buf.read(buf.sample_slots(5000, eligible_tasks={0, 2}))
    assert set(tids.tolist()) == {0, 2}
    assert abs((tids == 0).mean() - 100 / 700) < 0.03  # uniform over eligible rows
    _, tids = buf.read(buf.sample_slots(20000, task_weights={0: 0.7, 1: 0.3, 2: 0.0}))
    assert abs((tids == 0).mean() - 0.7) < 0.02 and (tids != 2).all()
    _, tids = buf.read(buf.sample_slots(5000, eligible_tasks=[1], task_weights={0: 1, 1: 1}))
    assert (tids == 1).all()
    slots = buf.sample_slots(20000)
    assert _chi2_p(np.bincount(slots * 10 // buf.fill, minlength=10)) > 1e-3
    with pytest.raises(CptError, match="no stored rows of tasks \\[5\\]"):
        buf.sample_slots(1, eligible_tasks={5})
    with pytest.raises(CptError, match="weight > 0"):
        buf.sample_slots(1, task_weights={0: 0.0})


@pytest.mark.parametrize("policy,cap", [("reservoir", 50), ("balanced", 50), ("fifo", 50), ("reservoir", None)])
def test_flush_open_continues_identically(tmp_path, policy, cap):
    a = ReplayBuffer(tmp_path / "a", ROW, cap, policy, seed=3)
    twin = ReplayBuffer(tmp_path / "b", ROW, cap, policy, seed=3)
    for b in (a, twin):
        for t in range(3):
            b.add(_rows(np.arange(100 * t, 100 * t + 80)), t)
        b.sample_slots(7)  # advance the sampling RNG too
    a.flush()
    state = json.loads(json.dumps(a.state_dict()))  # the state is plain JSON
    a = ReplayBuffer.open(tmp_path / "a", 0)
    assert a.state_dict() == state
    rng = np.random.default_rng(0)
    for step in range(100):
        rows, task = _rows(rng.integers(0, 60000, size=int(rng.integers(1, 9)))), step % 4
        a.add(rows, task)
        twin.add(rows, task)
        kw = [{}, {"eligible_tasks": {0, 3}}, {"task_weights": {1: 2.0, 3: 1.0}}][step % 3]
        sa, sb = a.sample_slots(4, **kw), twin.sample_slots(4, **kw)
        assert (sa == sb).all()
        assert (a.read(sa)[0] == twin.read(sb)[0]).all()
    assert a.counts_per_task() == twin.counts_per_task()
    assert a.seen_per_task() == twin.seen_per_task()


def test_open_refuses_mismatched_state_and_existing_files(tmp_path):
    buf = ReplayBuffer(tmp_path, ROW, 10)
    with pytest.raises(CptError, match="already exists"):
        ReplayBuffer(tmp_path, ROW, 10)
    other = ReplayBuffer(tmp_path / "x", ROW + 1, 10)
    with pytest.raises(CptError, match="row_len"):
        buf.load_state_dict(other.state_dict())
    with pytest.raises(CptError, match="metadata"):
        ReplayBuffer.open(tmp_path, shard=1)
    old_state = buf.state_dict()
    buf.add(_rows(np.arange(5)), 0)
    buf.flush()
    reopened = ReplayBuffer.open(tmp_path, 0)
    reopened.load_state_dict(old_state)
    assert reopened.fill == 0


def _feed(buf: ReplayBuffer, rng: np.random.Generator, batches: int, first_id: int) -> int:
    """Offer `batches` batches of fresh ids (mixed sizes, three tasks); returns the next id."""
    for _ in range(batches):
        n = int(rng.choice([1, 3, 7, 25]))  # 25 > capacity: in-batch collisions, fifo tail
        buf.add(_rows(np.arange(first_id, first_id + n) % 60000), int(rng.integers(3)))
        first_id += n
    return first_id


# Adds rows to a reopened buffer, then SIGKILLs itself (no close, no flush). It loads buffer.py
# by path so that it starts in a fraction of a second (cpt.replay imports torch).
_KILLED_WRITER = """
import importlib.util, os, signal, sys
import numpy as np
spec = importlib.util.spec_from_file_location("cpt_buffer_child", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
buf = mod.ReplayBuffer.open(sys.argv[2], 0)
rng = np.random.default_rng(0)
for _ in range(20):
    ids = rng.integers(0, 60000, size=int(rng.choice([1, 3, 7, 25])))
    buf.add(np.repeat(ids[:, None], buf.row_len, axis=1), int(rng.integers(3)))
os.kill(os.getpid(), signal.SIGKILL)
"""


def _tokens(directory, nbytes=None) -> bytes:
    raw = (directory / "shard-000.tokens").read_bytes()
    return raw if nbytes is None else raw[:nbytes]


@pytest.mark.parametrize("policy", ["reservoir", "balanced", "fifo"])
def test_resume_from_an_older_flush_restores_rows_and_continues_identically(tmp_path, policy):
    d, twin_dir = tmp_path / "buf", tmp_path / "twin"
    rng = np.random.default_rng(7)
    a = ReplayBuffer(d, ROW, 20, policy, seed=5)
    nxt = _feed(a, rng, 12, 0)
    a.sample_slots(3)
    a.flush()  # the checkpoint we will resume from
    snap = json.loads(json.dumps(a.state_dict()))
    nbytes = snap["fill"] * ROW * 2
    snap_rows = _tokens(d, nbytes)
    shutil.copytree(d, twin_dir)  # what an uninterrupted run would continue from
    nxt = _feed(a, rng, 30, nxt)  # overwrites most slots
    a.flush()  # two newer checkpoints, then a kill mid-epoch
    nxt = _feed(a, rng, 30, nxt)
    a.close()
    last = a.state_dict()
    last_rows = _tokens(d, last["fill"] * ROW * 2)
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, cpt.replay.buffer.__file__, str(d)], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert _tokens(d, nbytes) != snap_rows and _tokens(d, len(last_rows)) != last_rows

    b = ReplayBuffer.open(d, 0)  # undoes the rows written after the last flush
    assert _tokens(d, len(last_rows)) == last_rows and b.state_dict() == last
    b.load_state_dict(snap)  # the newest checkpoint was corrupt: resume from the older one
    assert _tokens(d, nbytes) == snap_rows
    assert b.state_dict() == snap
    assert json.loads((d / "shard-000.meta.json").read_text())["offered"] == snap["offered"]
    assert sorted(p.name for p in d.glob("*.undo-*")) == [f"shard-000.undo-{snap['mark']}.bin"]
    twin = ReplayBuffer.open(twin_dir, 0)
    feed = np.random.default_rng(11)
    for step in range(50):
        rows = _rows(feed.integers(0, 60000, size=int(feed.integers(1, 9))))
        b.add(rows, step % 4)
        twin.add(rows, step % 4)
        kw = [{}, {"eligible_tasks": {0, 3}}, {"task_weights": {1: 2.0, 3: 1.0}}][step % 3]
        sa, sb = b.sample_slots(4, **kw), twin.sample_slots(4, **kw)
        assert (sa == sb).all()
        (ra, ta), (rb, tb) = b.read(sa), twin.read(sb)
        assert (ra == rb).all() and (ta == tb).all()
    assert b.state_dict() == twin.state_dict()
    assert _tokens(d, b.fill * ROW * 2) == _tokens(twin_dir, b.fill * ROW * 2)


def test_a_missing_undo_journal_is_an_error_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    a = ReplayBuffer(tmp_path, ROW, 20, "reservoir")
    nxt = _feed(a, rng, 10, 0)
    a.flush()
    snap = a.state_dict()
    journal = tmp_path / f"shard-000.undo-{snap['mark']}.bin"
    nxt = _feed(a, rng, 10, nxt)
    a.flush()
    os.remove(journal)
    before = _tokens(tmp_path)
    with pytest.raises(CptError, match=rf"shard-000\.tokens: undo journal .*{journal.name} is missing"):
        ReplayBuffer.open(tmp_path, 0).load_state_dict(snap)
    assert _tokens(tmp_path) == before  # nothing was half restored
    for _ in range(5):  # journals of older epochs are pruned: only the newest kept
        nxt = _feed(a, rng, 3, nxt)
        a.flush(keep_journals=2)
    assert len(list(tmp_path.glob("*.undo-*"))) == 2
    old = a.state_dict()
    nxt = _feed(a, rng, 3, nxt)
    a.flush(keep_journals=1)
    with pytest.raises(CptError, match=rf"undo journal .*undo-{old['mark']}\.bin is missing"):
        a.load_state_dict(old)
    nxt = _feed(a, rng, 3, nxt)  # a state taken between flushes is only valid where it was taken
    mid = a.state_dict()
    a.load_state_dict(mid)
    _feed(a, rng, 3, nxt)
    with pytest.raises(CptError, match="right after flush"):
        a.load_state_dict(mid)


def test_all_capacity_rolls_back_by_fill_without_journals(tmp_path):
    a = ReplayBuffer(tmp_path, ROW, None)
    a.add(_rows(np.arange(30)), 0)
    a.flush()
    snap = a.state_dict()
    a.add(_rows(np.arange(30, 2000)), 1)
    a.flush()
    b = ReplayBuffer.open(tmp_path, 0)
    b.load_state_dict(snap)
    assert b.fill == 30 and (b.read(np.arange(30))[0][:, 0] == np.arange(30)).all()
    assert not list(tmp_path.glob("*.undo-*"))


def test_prefetch_never_returns_torn_or_newer_rows(tmp_path):
    cap, row_len = 16, 512
    buf = ReplayBuffer(tmp_path, row_len, cap, "fifo", dtype=np.uint32)
    shadow = np.zeros(cap, dtype=np.int64)  # value each slot holds, per the FIFO rule
    offered = 0

    def write(w, n):
        nonlocal offered
        buf.add(np.full((n, row_len), w), task_id=w % 3)
        for _ in range(n):
            shadow[offered % cap] = w
            offered += 1

    write(0, cap)
    rng = np.random.default_rng(1)
    expected = {}
    with ReplayPrefetcher(buf) as pf:
        for w in range(1, 400):
            slots = buf.sample_slots(8)
            expected[w] = shadow[slots].copy()
            pf.submit(w, slots)
            write(w, int(rng.integers(1, cap + 1)))  # overwrites slots the read may still need
            if w >= 3:
                rows, tids = pf.get(w - 2)
                assert rows.dtype == torch.long and tids.shape == (8,)
                assert (rows == rows[:, :1]).all(), "torn row"
                assert (rows[:, 0].numpy() == expected.pop(w - 2)).all(), "newer row"
        pf.barrier()
        assert pf.reads == 399
        assert isinstance(pf.wait_seconds, float) and pf.wait_seconds >= 0
        pf.submit(10_000, np.array([cap]))  # out of range: the read fails in the thread
        with pytest.raises(IndexError):
            pf.get(10_000)
        with pytest.raises(KeyError):
            pf.get(123_456)
    assert buf._prefetcher is None


def test_direct_reads_from_another_thread_see_whole_rows(tmp_path):
    # numpy holds the GIL for most of a row copy, so only long rows (1 MiB) make a torn read
    # likely enough that removing the lock fails this test (it did 4 of 4 times in 0.3 s)
    row_len = 1 << 18
    buf = ReplayBuffer(tmp_path, row_len, 32, "reservoir", dtype=np.uint32)
    buf.add(np.zeros((32, row_len), dtype=np.int64), 0)
    stop, bad = threading.Event(), []

    def reader():
        rng = np.random.default_rng(0)
        while not stop.is_set():
            rows, _ = buf.read(rng.integers(0, 32, size=4))
            bad.extend(int(r[0]) for r in rows if not (r == r[0]).all())

    th = threading.Thread(target=reader)
    th.start()
    for w in range(1, 120):
        buf.add(np.full((8, row_len), w), 0)
    stop.set()
    th.join()
    assert not bad


def test_bad_input_names_the_problem(tmp_path):
    buf = ReplayBuffer(tmp_path, ROW, 10)
    with pytest.raises(CptError, match=r"shape \[n, row_len=4\].*\(3, 5\)"):
        buf.add(np.zeros((3, 5), dtype=np.int64), 0)
    with pytest.raises(CptError, match=r"\[0, 65535\] for uint16.*65536"):
        buf.add(np.full((2, ROW), 65536), 0)
    with pytest.raises(CptError, match="integer token ids"):
        buf.add(np.zeros((2, ROW), dtype=np.float32), 0)
    with pytest.raises(CptError, match="task_id"):
        buf.add(np.zeros((2, ROW), dtype=np.int64), -1)
    with pytest.raises(CptError, match="no rows to replay"):
        buf.sample_slots(1)
    with pytest.raises(CptError, match="policy"):
        ReplayBuffer(tmp_path / "p", ROW, 10, "lifo")
    with pytest.raises(CptError, match="dtype"):
        ReplayBuffer(tmp_path / "d", ROW, 10, dtype=np.int32)
    assert buf.fill == 0


def test_capacity_rows_from():
    assert capacity_rows_from("all", "tokens", 2049) is None
    assert capacity_rows_from(1e9, "tokens", 2049) == 488_281
    assert capacity_rows_from("4096", "tokens", 2049) == 2
    assert capacity_rows_from(10, "tokens", 2049) == 1
    assert capacity_rows_from(500, "sequences", 2049) == 500
    for bad, unit in (("lots", "tokens"), (0, "tokens"), (-5, "sequences"), (10, "bytes")):
        with pytest.raises(CptError, match="replay.buffer"):
            capacity_rows_from(bad, unit, 2049)
