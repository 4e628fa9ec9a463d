"""Replay in the loop: the exact rate per batch and per task, and which tasks are replayed."""

import json

import numpy as np
import pytest

import cpt
from cpt.config import validate
from cpt.replay.mixing import MixedBatchSource, StepPlan, replay_count, steps_for_budget
from tests.conftest import tiny_config


@pytest.mark.parametrize("rate,B", [(0.25, 8), (0.3, 8), (0.1, 4), (0.5, 6), (0.33, 16)])
def test_every_batch_holds_floor_or_ceil_and_the_task_realises_alpha(rate, B):
    counts = [replay_count(s, B, rate) for s in range(1000)]
    assert set(counts) <= {int(np.floor(rate * B)), int(np.ceil(rate * B))}
    for S in (1, 7, 100, 1000):  # after any number of steps the total is floor(α·B·S)
        assert sum(counts[:S]) == int(np.floor(rate * B * S + 1e-9))
    assert sum(counts) / (B * 1000) == pytest.approx(rate, abs=1 / (B * 1000))


def test_budget_counts_new_tokens_only():
    # 8 rows of 128 tokens per step, a quarter replayed: 6 new rows per step
    s = steps_for_budget(tokens=6 * 128 * 50, seq_len=128, rows_per_step=8, rate=0.25)
    assert s == 50
    assert steps_for_budget(tokens=8 * 128 * 50, seq_len=128, rows_per_step=8, rate=0.0) == 50


class RowsOfTask:
    """A stand-in stream whose rows carry their task id in every token (for checking the mix)."""

    def __init__(self, task, row_len=9):
        self.task, self.row_len = task, row_len

    def take(self, n, lo=0, hi=None):
        return np.full(((n if hi is None else hi) - lo, self.row_len), self.task, dtype=np.int64)

    def state_dict(self):
        return {}


@pytest.mark.parametrize("include_current", [False, True])
def test_replayed_rows_come_only_from_eligible_tasks(tmp_path, include_current):
    from cpt.replay.buffer import ReplayBuffer
    from cpt.replay.prefetch import ReplayPrefetcher

    plan = StepPlan.build([8 * 8 * 20] * 3, seq_len=8, rows_per_step=8, rate=0.25, replay_first_task=include_current)
    buf = ReplayBuffer(tmp_path, row_len=9, capacity_rows=50, policy="reservoir", seed=1)
    pre = ReplayPrefetcher(buf)
    buf.attach(pre)
    src = MixedBatchSource([RowsOfTask(t) for t in range(3)], plan, buf, pre, include_current=include_current)
    src.start(0)
    seen_replay = {0: set(), 1: set(), 2: set()}
    for step in range(plan.total_steps):
        rows, n_new, n_rep = src.next_batch(step)
        task = plan.task_of_step[step]
        assert rows.shape == (8, 9) and n_new + n_rep == 8  # the batch never grows
        assert (rows[:n_new] == task).all()
        seen_replay[task] |= set(rows[n_new:, 0].tolist())
        src.after_step(step)
    pre.close()
    if include_current:
        assert seen_replay[0] == {0} and seen_replay[2] <= {0, 1, 2} and 2 in seen_replay[2]
    else:
        assert seen_replay[0] == set()  # nothing to replay during the first task
        assert seen_replay[1] == {0} and seen_replay[2] == {0, 1}
    fr = src.stats.fraction()
    assert fr[0] == (0.0 if not include_current else pytest.approx(0.25, abs=0.02))
    assert fr[1] == pytest.approx(0.25, abs=1 / (8 * 20)) and fr[2] == pytest.approx(0.25, abs=1 / (8 * 20))


def test_run_reports_the_realised_replay_fraction(small_texts, tmp_path):
    cfg = validate(tiny_config(small_texts, replay={"rate": 0.3}, checkpoint={"task_ends": False}))
    s = cpt.train(cfg, tmp_path / "r")
    assert s["replay_fraction"][0] == 0.0
    assert s["replay_fraction"][1] == pytest.approx(0.3, abs=0.02)
    assert s["tokens"]["replay"] > 0 and s["tokens"]["new"] >= 24_000
    # the buffer shard of rank 0 is on disk, holding every new sequence of both tasks (capacity `all`)
    meta = json.loads((tmp_path / "r" / "replay" / "shard-000.meta.json").read_text())
    assert meta["fill"] * 64 == s["tokens"]["new"]
    assert sorted(t for t, _ in meta["seen"]) == [0, 1]


def test_a_kept_buffer_is_replayed_by_a_later_run(small_texts, tmp_path):
    """Continue a finished sequence with a new task: the new run replays a copy of the old run's tasks."""
    buf = tmp_path / "kept-buffer"
    first = tiny_config(small_texts, replay={"rate": 0.25, "buffer": {"dir": str(buf)}}, checkpoint={"task_ends": False})
    cpt.train(validate(first), tmp_path / "first")
    before = {p.name: p.read_bytes() for p in buf.iterdir()}
    second = tiny_config(small_texts, replay={"rate": 0.25, "buffer": {"init": str(buf)}}, checkpoint={"task_ends": False})
    second["tasks"] = [{"name": "de", "path": str(small_texts["de"]), "tokens": 12_000}]
    s = cpt.train(validate(second), tmp_path / "second")
    assert s["replay_task_offset"] == 2 and s["replay_fraction"] == [pytest.approx(0.25, abs=0.02)]
    meta = json.loads((tmp_path / "second" / "replay" / "shard-000.meta.json").read_text())
    assert sorted(t for t, _ in meta["seen"]) == [0, 1, 2]  # en, fr from the first run; de as task 2
    assert {p.name: p.read_bytes() for p in buf.iterdir()} == before  # the kept buffer was only read


def test_a_steps_replay_is_split_over_the_ranks_and_rotates():
    from cpt.replay.mixing import replay_split

    for total in range(0, 11):
        for world in (1, 2, 3, 4):
            per = [replay_split(total, world, step) for step in range(world)]
            assert all(p.sum() == total and p.max() - p.min() <= (1 if total % world else 0) for p in per)
            # the extra rows move round the ranks with the step: over `world` steps every rank replays as many
            assert len(set(np.sum(per, axis=0).tolist())) == 1


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_train_the_new_rows_one_process_trains(world):
    """Without replay the global batch of every step holds the same new rows on any number of ranks."""
    from cpt.data.streams import TaskStream
    from cpt.replay.mixing import MixedBatchSource, StepPlan

    tokens = np.arange(2000, dtype=np.int64)
    plan = StepPlan.build([16 * 8 * 5, 16 * 8 * 3], seq_len=16, rows_per_step=8, rate=0.0, replay_first_task=False)

    def rows(world):
        sources = [MixedBatchSource([TaskStream(tokens, 16, 1, t) for t in range(2)], plan, rank=r, world=world) for r in range(world)]
        out = []
        for step in range(plan.total_steps):
            out.append(np.concatenate([s.next_batch(step)[0].numpy() for s in sources]))
        return np.stack(out)

    assert np.array_equal(rows(world), rows(1))
