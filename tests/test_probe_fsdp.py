"""The gradient-alignment probe under FSDP2: cosines from sharded gradients equal one process's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from tests.conftest import free_port, tiny_config

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")


def _cosine_worker(rank, port, n, out):
    """One process's cosines on the whole batches, then the same model sharded over 2 ranks, each with its rows."""
    from cpt.alignment.probe import gradient_cosines, sharded_gradient_cosines
    from cpt.model import build_model
    from cpt.training import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = build_model("tiny", 509, 0, 64, seed=3)
    g = torch.Generator().manual_seed(9)
    current, en = (torch.randint(0, 509, (n, 65), generator=g) for _ in range(2))
    replay = torch.randint(0, 509, (2, 65), generator=g)  # all on rank 0: rank 1's buffer shard had no eligible row
    want = gradient_cosines(model, current, {"en": en, "replay": replay})
    distributed.shard_model(model, mixed_bf16=False)
    mine = {"en": en[rank::2], "replay": replay if rank == 0 else replay[:0]}
    got = sharded_gradient_cosines(model, current[rank::2], mine, {"current": n, "en": n, "replay": 2}, world=2)
    cleared = all(p.grad is None for p in model.parameters())
    results = distributed.gather_to_all({"want": want, "got": got, "cleared": cleared})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.parametrize("n", [3, 1])  # uneven rows per rank; a rank without any rows of a batch
def test_sharded_cosines_equal_the_whole_gradients_cosines(tmp_path, n):
    out = tmp_path / "cos.json"
    mp.spawn(_cosine_worker, args=(free_port(), n, str(out)), nprocs=2, join=True)
    results = json.loads(out.read_text())
    for r in results:
        assert r["got"].keys() == r["want"].keys() == {"en", "replay"}
        for name, value in r["want"].items():
            assert abs(r["got"][name] - value) < 1e-5, (name, r["got"][name], value)
        assert r["cleared"]  # the training gradients are left as the probe found them
    assert results[0]["got"] == results[1]["got"]


def _config(small_texts, tmp_path, name, batch_size, **sections):
    cfg = tiny_config(
        small_texts,
        training={"batch_size": batch_size},
        alignment={"probe_every": 3, "probe_batch_size": 4},
        checkpoint={"task_ends": False},
        **sections,
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cfg_path, out, torchrun: bool, *overrides):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun else [sys.executable]
    proc = subprocess.run([*launch, "-m", "cpt", "train", str(cfg_path), *overrides, "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "probe"]


def test_probe_under_fsdp_equals_one_process_at_the_same_global_batch(small_texts, tmp_path):
    one = _train(_config(small_texts, tmp_path, "one", 8), tmp_path / "one", False)
    fsdp = _train(_config(small_texts, tmp_path, "fsdp", 4), tmp_path / "fsdp", True, "training.parallel=fsdp")
    assert one and [(r["step"], r["task"]) for r in fsdp] == [(r["step"], r["task"]) for r in one]
    for a, b in zip(one, fsdp):
        assert a["cosine"].keys() == b["cosine"].keys() == {"en"}
        assert abs(a["cosine"]["en"] - b["cosine"]["en"]) < 1e-4, (a, b)


def test_probe_under_fsdp_measures_the_replay_batch_from_every_ranks_shard(small_texts, tmp_path):
    cfg = _config(small_texts, tmp_path, "replay", 4, replay={"rate": 0.25})
    probes = _train(cfg, tmp_path / "replay", True, "training.parallel=fsdp")
    second = [r for r in probes if r["task"] == "fr"]
    assert second and all(r["cosine"].keys() == {"en", "replay"} for r in second)
    assert all(-1 <= v <= 1 for r in probes for v in r["cosine"].values())
