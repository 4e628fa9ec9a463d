"""`replay.buffer.store: refs`: slots hold a row's offset into its task's token file instead of the row.

The buffer makes the same choices and reads the same rows as one of rows (so a run's loss matrix is
identical), resumes exactly, takes 8 bytes per slot, refuses `replay.buffer.init` and refuses to be
reopened as the other store."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import cpt
from cpt.config import validate
from cpt.data.streams import TaskStream
from cpt.errors import CptError
from cpt.replay import ReplayBuffer, ReplayPrefetcher
from cpt.replay.buffer import copy_shard, peek
from tests.conftest import tiny_config

SEQ = 7
ROW = SEQ + 1


def _task_tokens(n_tasks: int = 3, length: int = 4000) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {t: rng.integers(0, 60000, size=length).astype(np.uint16) for t in range(n_tasks)}


def _pair(tmp_path, capacity, policy, tokens):
    rows = ReplayBuffer(tmp_path / "rows", ROW, capacity, policy, seed=3)
    refs = ReplayBuffer(tmp_path / "refs", ROW, capacity, policy, seed=3, store="refs", resolver=tokens)
    return rows, refs


def _feed(buffers, streams, steps, task_of=lambda step: step % 3, sizes=(1, 3, 6, 2)):
    for step in range(steps):
        task = task_of(step)
        new = streams[task].next_rows(sizes[step % len(sizes)])
        for b in buffers:
            if b.store == "refs":
                b.add(new, task, starts=streams[task].last_starts)
            else:
                b.add(new, task)


def _same(a: ReplayBuffer, b: ReplayBuffer, draws: int = 20) -> None:
    """Both buffers draw the same slots and read the same rows (and task ids)."""
    for i in range(draws):
        kw = [{}, {"eligible_tasks": {0, 2}}, {"task_weights": {1: 2.0, 2: 1.0}}][i % 3]
        sa, sb = a.sample_slots(5, **kw), b.sample_slots(5, **kw)
        assert (sa == sb).all()
        (ra, ta), (rb, tb) = a.read(sa), b.read(sb)
        assert ra.dtype == rb.dtype and (ra == rb).all() and (ta == tb).all()
    all_a, all_b = a.read(np.arange(a.fill)), b.read(np.arange(b.fill))
    assert (all_a[0] == all_b[0]).all() and (all_a[1] == all_b[1]).all()


def _without_store(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "store"}


# ------------------------------------------------------------- the buffer alone
@pytest.mark.parametrize("capacity,policy", [(None, "reservoir"), (25, "reservoir"), (25, "balanced"), (25, "fifo")])
def test_refs_make_the_same_choices_and_read_the_same_rows_as_rows(tmp_path, capacity, policy):
    tokens = _task_tokens()
    streams = {t: TaskStream(tok, SEQ, 1, t) for t, tok in tokens.items()}
    rows, refs = _pair(tmp_path, capacity, policy, tokens)
    _feed([rows, refs], streams, 60)
    assert rows.fill == refs.fill > 0 and rows.counts_per_task() == refs.counts_per_task()
    assert _without_store(rows.state_dict()) == _without_store(refs.state_dict())
    _same(rows, refs)
    # through the prefetcher, and after close / open with the resolver
    with ReplayPrefetcher(refs) as pf:
        pf.submit(0, np.arange(refs.fill))
        got, tids = pf.get_arrays(0)
    assert (got == rows.read(np.arange(rows.fill))[0]).all() and got.dtype == np.int64
    refs.close()
    again = ReplayBuffer.open(tmp_path / "refs", store="refs", resolver=tokens)
    _same(rows, again)


def test_refs_resume_from_an_older_flush_through_the_journals(tmp_path):
    tokens = _task_tokens()
    streams = {t: TaskStream(tok, SEQ, 2, t) for t, tok in tokens.items()}
    a = ReplayBuffer(tmp_path / "a", ROW, 20, "reservoir", seed=5, store="refs", resolver=tokens)
    _feed([a], streams, 12)
    a.flush()  # the checkpoint to resume from
    snap = json.loads(json.dumps(a.state_dict()))
    stream_state = {t: s.state_dict() for t, s in streams.items()}
    shutil.copytree(tmp_path / "a", tmp_path / "twin")  # what an uninterrupted run continues from
    snap_rows = a.read(np.arange(a.fill))[0]
    _feed([a], streams, 30)  # overwrites most slots
    a.flush()
    _feed([a], streams, 10)
    assert not (a.read(np.arange(snap["fill"]))[0] == snap_rows).all()
    a.close()
    b = ReplayBuffer.open(tmp_path / "a", store="refs", resolver=tokens)
    b.load_state_dict(snap)  # the journals restore the offsets of the older state
    assert (b.read(np.arange(b.fill))[0] == snap_rows).all() and b.state_dict() == snap
    twin = ReplayBuffer.open(tmp_path / "twin", store="refs", resolver=tokens)
    for s, st in zip(streams.values(), stream_state.values()):
        s.load_state_dict(st)
    twin_streams = {t: TaskStream(tok, SEQ, 2, t) for t, tok in tokens.items()}
    for s, st in zip(twin_streams.values(), stream_state.values()):
        s.load_state_dict(st)
    for step in range(40):
        _feed([b], streams, 1, task_of=lambda _, task=step % 3: task)
        _feed([twin], twin_streams, 1, task_of=lambda _, task=step % 3: task)
        _same(b, twin, draws=2)
    assert b.state_dict() == twin.state_dict()


def test_reopening_with_the_other_store_is_an_error(tmp_path):
    tokens = _task_tokens(1)
    ReplayBuffer(tmp_path / "refs", ROW, None, store="refs", resolver=tokens).close()
    ReplayBuffer(tmp_path / "rows", ROW, None).close()
    with pytest.raises(CptError, match=r"replay.buffer.store: rows, but the buffer in .* was written with store: refs"):
        ReplayBuffer.open(tmp_path / "refs", store="rows")
    with pytest.raises(CptError, match=r"replay.buffer.store: refs, but the buffer in .* was written with store: rows"):
        ReplayBuffer.open(tmp_path / "rows", store="refs", resolver=tokens)
    b = ReplayBuffer.open(tmp_path / "refs")  # no expectation: the shard's own store
    assert b.store == "refs"
    rows = ReplayBuffer.open(tmp_path / "rows")
    with pytest.raises(CptError, match="saved state has store='refs'"):
        rows.load_state_dict(b.state_dict())


def test_refs_check_their_offsets_and_need_a_resolver(tmp_path):
    tokens = _task_tokens(1, length=100)
    with pytest.raises(CptError, match="refs needs the tasks' token arrays"):
        ReplayBuffer(tmp_path / "x", ROW, 10, store="refs")
    b = ReplayBuffer(tmp_path / "b", ROW, 10, store="refs", resolver=tokens)
    row = tokens[0][5 : 5 + ROW][None, :]
    with pytest.raises(CptError, match="needs the rows' token offsets"):
        b.add(row, 0)
    with pytest.raises(CptError, match=r"row offsets must lie in \[0, 92\]"):
        b.add(None, 0, starts=np.array([93]))
    with pytest.raises(CptError, match="no token array for task id 1"):
        b.add(None, 1, starts=np.array([0]))
    with pytest.raises(CptError, match="is not the row offered; wrong token array"):
        b.add(row, 0, starts=np.array([6]))
    b.add(row, 0, starts=np.array([5]))
    b.add(None, 0, starts=np.array([92]))
    got, tids = b.read(np.array([1, 0]))
    assert (got[1] == row[0]).all() and (got[0] == tokens[0][92:]).all() and (tids == 0).all()
    b.close()
    blind = ReplayBuffer.open(tmp_path / "b")  # a refs shard opened without its tasks keeps its state
    assert blind.fill == 2
    with pytest.raises(CptError, match="needs the tasks' token arrays to resolve rows"):
        blind.read(np.array([0]))


def test_a_refs_shard_takes_8_bytes_per_slot_and_peek_says_so(tmp_path):
    tokens = _task_tokens()
    streams = {t: TaskStream(tok, SEQ, 1, t) for t, tok in tokens.items()}
    rows, refs = _pair(tmp_path, None, "reservoir", tokens)
    _feed([rows, refs], streams, 300)
    rows.flush()
    refs.flush()
    a, b = peek(tmp_path / "rows"), peek(tmp_path / "refs")
    assert (a["store"], b["store"]) == ("rows", "refs") and a["fill"] == b["fill"] == rows.fill
    assert a["stored_bytes"] == rows.fill * ROW * 2 == rows.stored_bytes
    assert b["stored_bytes"] == refs.fill * 8 == refs.stored_bytes
    assert a["stored_bytes"] / b["stored_bytes"] == ROW * 2 / 8
    assert b["disk_bytes"] < a["disk_bytes"]
    # a refs shard copies with its slots (8 bytes each), for tools that copy shards
    copy_shard(tmp_path / "refs", tmp_path / "copy", 0)
    _same(refs, ReplayBuffer.open(tmp_path / "copy", store="refs", resolver=tokens), draws=3)


# ------------------------------------------------------------- whole runs
def _run(small_texts, out, store, capacity="all", **sections):
    replay = {"rate": 0.25, "buffer": {"store": store, "capacity": capacity}}
    cfg = validate(tiny_config(small_texts, replay=replay, **sections))
    return cpt.train(cfg, out)


@pytest.fixture(scope="module")
def runs(small_texts, tmp_path_factory):
    """Rows and refs runs at capacity all and at a finite reservoir (a quarter of what the run stores)."""
    base = tmp_path_factory.mktemp("refs-runs")
    ckpt = {"checkpoint": {"every": 10, "keep": 50, "task_ends": False}}
    out = {}
    for capacity in ("all", 6000):
        for store in ("rows", "refs"):
            d = base / f"{store}-{capacity}"
            out[store, capacity] = (d, _run(small_texts, d, store, capacity, **ckpt))
    return out


@pytest.mark.parametrize("capacity", ["all", 6000])
def test_a_refs_run_has_the_loss_matrix_of_a_rows_run(runs, capacity):
    (_, rows), (d, refs) = runs["rows", capacity], runs["refs", capacity]
    assert refs["tokens"]["replay"] > 0 and refs["tokens"] == rows["tokens"]
    assert refs["loss_matrix"] == rows["loss_matrix"]  # exactly
    assert peek(d / "replay")["store"] == "refs"


def test_a_refs_run_buffer_takes_a_row_len_fraction_of_the_disk(runs):
    (rows_dir, _), (refs_dir, _) = runs["rows", "all"], runs["refs", "all"]
    a, b = peek(rows_dir / "replay"), peek(refs_dir / "replay")
    assert a["fill"] == b["fill"] > 0
    row_len = 64 + 1  # tiny_config's seq_len + 1, uint16 tokens (vocab 512)
    assert a["stored_bytes"] == a["fill"] * row_len * 2 and b["stored_bytes"] == b["fill"] * 8
    assert a["stored_bytes"] / b["stored_bytes"] == row_len * 2 / 8
    assert b["disk_bytes"] * 3 < a["disk_bytes"]  # files round up to blocks and carry metadata: not the full 16x here


@pytest.mark.parametrize("capacity", ["all", 6000])
def test_a_refs_run_resumed_mid_run_gives_the_same_loss_matrix(runs, tmp_path, capacity):
    d, original = runs["refs", capacity]
    copy = tmp_path / "resumed"
    shutil.copytree(d, copy)
    ckpts = sorted((copy / "checkpoints").glob("step-*"))
    mid = ckpts[len(ckpts) // 2 + 1]  # inside the second task, with replay under way
    for later in ckpts[ckpts.index(mid) + 1 :]:
        shutil.rmtree(later)
    (copy / "summary.json").unlink()
    resumed = cpt.train(None, copy, resume=True)
    assert resumed["loss_matrix"] == original["loss_matrix"]
    assert resumed["tokens"] == original["tokens"] and resumed["steps"] == original["steps"]


def test_refs_with_buffer_init_is_refused(runs, small_texts, tmp_path):
    from cpt.replay import ownership

    source = runs["rows", "all"][0] / "replay"
    cfg = validate(tiny_config(small_texts, replay={"rate": 0.25, "buffer": {"store": "refs", "init": str(source)}}))
    with pytest.raises(CptError, match=r"^replay.buffer.store: refs cannot start from replay.buffer.init") as e:
        cpt.train(cfg, tmp_path / "b")
    assert "\n" not in str(e.value) and not (tmp_path / "b").exists()  # refused before anything is written
    # nor may a rows run start from a refs buffer: its offsets point into another run's token files
    refs_source = runs["refs", "all"][0] / "replay"
    cfg = validate(tiny_config(small_texts, replay={"rate": 0.25, "buffer": {"init": str(refs_source)}}))
    with pytest.raises(CptError, match=r"replay.buffer.init: .* stores references"):
        ownership.check_buffers(cfg, tmp_path / "c", "id", resume=False, world=1, dtype="uint16")
