"""A run resumes on another number of ranks, and from DDP to FSDP2, to the run it would have been.

What is exact by design: the global batch (kept), the sequence of new rows of every step (one global
order, each rank taking its slice), the plan, the step counter, the loss matrix's evaluation windows.
The weights differ only by float reduction order (gradients summed over other ranks), so the loss
matrix matches within 1e-3. Replay is statistically equivalent only: the buffer's rows are remapped to
the new shards (all kept) and the draws that follow come from fresh generators.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.conftest import free_port, tiny_config


def _config(small_texts, tmp_path, name: str, **sections) -> str:
    cfg = tiny_config(
        small_texts,
        training={"batch_size": 4},
        alignment={"method": "reptile", "k": 5, "beta": 0.7},
        checkpoint={"every": 5, "keep": 50, "task_ends": False},
        **sections,
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _launch(ranks: int, *args) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, "-m", "cpt", "train", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}"]
        cmd += ["-m", "cpt", "train", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def _cut(run, tmp_path, name: str, at: int | None = None, written_by: int | None = None):
    """A copy of `run` interrupted after a checkpoint (the middle one, or the first at or after step `at` written by
    `written_by` ranks): later checkpoints and the end's outputs removed."""
    copy = tmp_path / name
    shutil.copytree(run, copy)
    ckpts = sorted((copy / "checkpoints").glob("step-*"))
    if at is None:
        keep = ckpts[len(ckpts) // 2]
    else:
        keep = next(c for c in ckpts if int(c.name[5:]) >= at and json.loads((c / "manifest.json").read_text())["world"] == written_by)
    for later in ckpts[ckpts.index(keep) + 1 :]:
        shutil.rmtree(later)
    (copy / "summary.json").unlink()
    return copy, int(keep.name[5:])


@pytest.fixture(scope="module")
def two_ranks(small_texts, tmp_path_factory):
    """The uninterrupted reference: 2 DDP ranks, global batch 8, Reptile."""
    d = tmp_path_factory.mktemp("two")
    _launch(2, _config(small_texts, d, "two"), "--out", d / "run")
    return d / "run"


def _close(a: dict, b: dict) -> None:
    np.testing.assert_allclose(a["loss_matrix"], b["loss_matrix"], atol=1e-3)
    assert a["tokens"] == b["tokens"] and a["meta_updates"] == b["meta_updates"]


def test_two_to_four_and_back_to_two_ranks(two_ranks, tmp_path):
    ref = _summary(two_ranks)
    run, step = _cut(two_ranks, tmp_path, "up")
    proc = _launch(4, "--resume", run)
    assert f"resuming step-{step:08d}, written by 2 rank(s), on 4" in proc.stderr
    assert "the global batch stays 8 sequences — 2 per micro-batch × 1 micro-batch(es) per rank (was 4 × 1)" in proc.stderr
    four = _summary(run)
    assert four["world_size"] == 4
    _close(four, ref)
    # the checkpoints after the resume were written by 4 ranks; interrupt there and continue on 2
    back, step2 = _cut(run, tmp_path, "down", at=step + 1, written_by=4)
    proc = _launch(2, "--resume", back)
    assert f"resuming step-{step2:08d}, written by 4 rank(s), on 2" in proc.stderr
    _close(_summary(back), ref)


def test_two_ranks_to_one_process(two_ranks, tmp_path):
    run, step = _cut(two_ranks, tmp_path, "one")
    proc = _launch(1, "--resume", run)
    assert f"resuming step-{step:08d}, written by 2 rank(s), on 1" in proc.stderr
    assert "4 per micro-batch × 2 micro-batch(es) per rank (was 4 × 1)" in proc.stderr
    _close(_summary(run), _summary(two_ranks))


def test_ddp_to_fsdp2(two_ranks, tmp_path):
    run, step = _cut(two_ranks, tmp_path, "fsdp")
    proc = _launch(2, "--resume", run, "training.parallel=fsdp")
    assert f"resumed at step {step}" in proc.stderr
    s = _summary(run)
    _close(s, _summary(two_ranks))
    later = [c for c in sorted((run / "checkpoints").glob("step-*")) if int(c.name[5:]) > step]
    assert later and all((c / "dcp" / ".metadata").is_file() for c in later)  # it continued as FSDP2
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["parallel"] == "ddp"  # the saved config is the run's


def test_replay_buffer_is_remapped_to_the_new_world_size(small_texts, tmp_path):
    """Replay on 2 ranks resumed on 1: every stored row kept in the one remapped shard, the exact replay fraction and
    the same new rows; the loss matrix only statistically the same (other replayed rows after the resume)."""
    cfg = _config(small_texts, tmp_path, "replay", replay={"rate": 0.25})
    ref_run = tmp_path / "ref"
    _launch(2, cfg, "--out", ref_run)
    ref = _summary(ref_run)
    run, step = _cut(ref_run, tmp_path, "replay-one")
    before = _rows_at(run, step)
    proc = _launch(1, "--resume", run)
    assert f"replay: remapped {sum(before.values())} sequences from 2 shards to 1" in proc.stderr
    record = json.loads((run / "replay" / "remap.json").read_text())
    assert record == {"checkpoint": f"step-{step:08d}", "world": 1, "from_world": 2}
    s = _summary(run)
    assert s["replay_fraction"] == ref["replay_fraction"] and s["tokens"] == ref["tokens"]
    np.testing.assert_allclose(s["loss_matrix"], ref["loss_matrix"], atol=0.1)
    assert sorted(p.name for p in (run / "replay").glob("shard-*.tokens")) == ["shard-000.tokens"]


def _rows_at(run, step: int) -> dict[int, int]:
    """Rows per task id in the buffer shards as of checkpoint `step` (their states in the rank files)."""
    import torch

    counts: dict[int, int] = {}
    for f in sorted((run / "checkpoints" / f"step-{step:08d}").glob("rank-*.pt")):
        state = torch.load(f, weights_only=True)["sources"]["buffer"]
        for t, slots in state["task_slots"]:
            counts[int(t)] = counts.get(int(t), 0) + len(slots)
    return counts
