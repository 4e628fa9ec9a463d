"""Task streams order windows with a seeded bijection computed on the fly (no O(windows) permutation)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cpt.data.streams import JointStream, TaskStream, WindowOrder

SEQ = 4  # tokens per window step; rows hold SEQ + 1 tokens


def _tokens(windows: int) -> np.ndarray:
    """A token array holding exactly `windows` windows, each token its own offset (rows tell where they start)."""
    return np.arange(windows * SEQ + 1, dtype=np.int64)


def _epoch(stream: TaskStream) -> list[int]:
    """The window indices of one epoch of this rank's share (the stream must be at an epoch start)."""
    rows = stream.next_rows(stream.windows_per_epoch)
    assert (rows[:, 0] == stream.last_starts).all()  # last_starts are the rows' token offsets
    return (stream.last_starts // SEQ).tolist()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 13, 64, 97, 1000, 1024, 4096, 4097, 7919, 65537])
def test_the_order_is_a_permutation_of_every_size(n):
    for seed, task, epoch in ((0, 0, 0), (3, 1, 7)):
        order = WindowOrder.seeded(n, seed, task, epoch)(np.arange(n))
        assert order.dtype == np.int64
        assert np.array_equal(np.sort(order), np.arange(n))


def test_the_order_differs_across_epochs_seeds_and_tasks():
    base = WindowOrder.seeded(1000, 0, 0, 0)(np.arange(1000))
    for other in ((0, 0, 1), (1, 0, 0), (0, 1, 0)):
        assert not np.array_equal(base, WindowOrder.seeded(1000, *other)(np.arange(1000)))
    assert np.array_equal(base, WindowOrder.seeded(1000, 0, 0, 0)(np.arange(1000)))  # and is reproducible


def test_streams_differ_across_epochs_and_each_epoch_covers_the_task():
    s = TaskStream(_tokens(500), SEQ, seed=5, task_index=2)
    e0, e1 = _epoch(s), _epoch(s)
    assert sorted(e0) == sorted(e1) == list(range(500))
    assert e0 != e1 and s.epoch == 1


@pytest.mark.parametrize("windows", [4, 7, 100, 1001])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_are_disjoint_and_together_cover_each_epoch(windows, world):
    streams = [TaskStream(_tokens(windows), SEQ, 1, 0, rank=r, world=world) for r in range(world)]
    for _ in range(2):  # two epochs
        shares = [_epoch(s) for s in streams]
        for r, share in enumerate(shares):
            assert len(share) == -(-(windows - r) // world)  # ceil((windows - r) / W)
        union = [w for share in shares for w in share]
        assert sorted(union) == list(range(windows))  # disjoint (no repeats) and covering
    # rank r takes global positions r, r + W, ... of the one epoch order
    whole = TaskStream(_tokens(windows), SEQ, 1, 0)
    order = _epoch(whole)
    for r in range(world):
        assert _epoch(TaskStream(_tokens(windows), SEQ, 1, 0, rank=r, world=world)) == order[r::world]


@pytest.mark.parametrize("cut", [3, 10, 37])  # mid-epoch, exactly at the boundary, past it
def test_resume_from_state_dict_continues_exactly(cut):
    ref = TaskStream(_tokens(10), SEQ, 2, 1, rank=1, world=2)  # 5 windows per epoch on this rank
    expected = ref.next_rows(60)
    s = TaskStream(_tokens(10), SEQ, 2, 1, rank=1, world=2)
    first = s.next_rows(cut)
    state = s.state_dict()
    resumed = TaskStream(_tokens(10), SEQ, 2, 1, rank=1, world=2)
    resumed.load_state_dict(state)
    assert np.array_equal(np.concatenate([first, resumed.next_rows(60 - cut)]), expected)
    # in several calls (crossing epochs inside a call or between calls) the rows are the same
    t = TaskStream(_tokens(10), SEQ, 2, 1, rank=1, world=2)
    assert np.array_equal(np.concatenate([t.next_rows(k) for k in (1, 4, 6, 9, 40)]), expected)


def test_rows_are_the_windows_of_the_token_file():
    tokens = _tokens(50)
    s = TaskStream(tokens, SEQ, 0, 0)
    rows = s.next_rows(50)
    assert rows.dtype == np.int64 and rows.shape == (50, SEQ + 1)
    for row, start in zip(rows, s.last_starts):
        assert start % SEQ == 0 and np.array_equal(row, tokens[start : start + SEQ + 1])


class _Huge:
    """A 1-D array-like of ~10**11 zeros that supports only len() and contiguous slicing."""

    def __len__(self) -> int:
        return 10**11

    def __getitem__(self, s: slice) -> np.ndarray:
        assert isinstance(s, slice) and s.step is None and 0 <= s.start < s.stop <= len(self)
        return np.zeros(s.stop - s.start, dtype=np.uint16)


def test_a_huge_task_costs_no_memory_per_window():
    t0 = time.perf_counter()
    s = TaskStream(_Huge(), 64, seed=0, task_index=3, rank=1, world=4)
    rows = s.next_rows(64)
    assert time.perf_counter() - t0 < 1.0  # a permutation of 1.6e9 windows would take minutes and 12 GB
    assert rows.shape == (64, 65) and not rows.any()
    assert s.windows_per_epoch == -(-(s.windows - 1) // 4) and len(set(s.last_starts.tolist())) == 64
    assert (s.last_starts % 64 == 0).all() and s.last_starts.max() + 65 <= 10**11


def test_joint_stream_resumes_exactly():
    def make():
        return JointStream([TaskStream(_tokens(30), SEQ, 0, i) for i in range(2)], [1.0, 3.0], seed=0)

    ref = make().next_rows(100)
    j = make()
    first = j.next_rows(33)
    k = make()
    k.load_state_dict(j.state_dict())
    assert np.array_equal(np.concatenate([first, k.next_rows(67)]), ref)


def _global_rows(make, steps: list[int], world: int) -> np.ndarray:
    """Rows of `steps` (rows per step) read by `world` ranks, each with its own copy of the stream taking its slice
    [lo, hi) of every step (as the batch source does), concatenated in rank order per step."""
    copies = [make() for _ in range(world)]
    out = []
    for n in steps:
        cuts = np.linspace(0, n, world + 1).astype(int)  # any split of the step works
        for r, s in enumerate(copies):
            out.append(s.take(n, int(cuts[r]), int(cuts[r + 1])))
        assert len({json_key(s.state_dict()) for s in copies}) == 1  # every rank's cursor is the same
    return np.concatenate(out)


def json_key(state: dict) -> str:
    import json

    return json.dumps(state, sort_keys=True, default=str)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_the_global_order_does_not_depend_on_the_number_of_ranks(world):
    """What a run resumed on another world size relies on: the rows of each step are the same, whoever reads them."""
    steps = [8, 8, 5, 8, 13, 8, 8, 8]  # 66 rows of a 17-window task: crosses three epoch ends, one inside a step
    one = _global_rows(lambda: TaskStream(_tokens(17), SEQ, 3, 1), steps, 1)
    assert np.array_equal(one, TaskStream(_tokens(17), SEQ, 3, 1).next_rows(66))  # = the one-process order
    assert np.array_equal(_global_rows(lambda: TaskStream(_tokens(17), SEQ, 3, 1), steps, world), one)

    def joint():
        return JointStream([TaskStream(_tokens(30), SEQ, 0, i) for i in range(2)], [1.0, 3.0], seed=0)

    assert np.array_equal(_global_rows(joint, steps, world), _global_rows(joint, steps, 1))

    from cpt.data.mixture import MixtureStream

    def mixture():
        return MixtureStream([TaskStream(_tokens(w), SEQ, 0, 1000 + j) for j, w in enumerate((11, 23, 5))], [0.5, 0.3, 0.2])

    assert np.array_equal(_global_rows(mixture, steps, world), _global_rows(mixture, steps, 1))


def test_a_global_cursor_resumes_mid_epoch_and_refuses_a_bad_slice():
    ref = TaskStream(_tokens(10), SEQ, 2, 1).take(25)
    s = TaskStream(_tokens(10), SEQ, 2, 1)
    first = s.take(7)
    t = TaskStream(_tokens(10), SEQ, 2, 1)
    t.load_state_dict(s.state_dict())
    assert np.array_equal(np.concatenate([first, t.take(18)]), ref) and t.epoch == 2 and t.position == 5
    with pytest.raises(ValueError, match="0 <= lo <= hi <= n"):
        t.take(4, 3, 5)
    with pytest.raises(ValueError, match="global order"):
        TaskStream(_tokens(10), SEQ, 2, 1, rank=1, world=2).take(4)
