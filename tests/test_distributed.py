"""Data-parallel runs under torchrun (gloo on CPU): same results as one process at the same global batch."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")


def _config(small_texts, tmp_path, batch_size):
    cfg = tiny_config(
        small_texts,
        training={"batch_size": batch_size},
        replay={"rate": 0.25},
        alignment={"method": "reptile", "k": 5, "beta": 0.7},
        checkpoint={"task_ends": False},
    )
    path = tmp_path / f"b{batch_size}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_ranks_match_one_process_at_the_same_global_batch(small_texts, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "cpt", "train", str(_config(small_texts, tmp_path, 4)), "--out", str(two)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "cpt", "train", str(_config(small_texts, tmp_path, 8)), "--out", str(one)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((one / "summary.json").read_text())
    b = json.loads((two / "summary.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    np.testing.assert_allclose(b["loss_matrix"], a["loss_matrix"], rtol=1e-3)
    assert b["tokens"] == a["tokens"] and b["steps"] == a["steps"] and b["meta_updates"] == a["meta_updates"]
    # one summary, one metrics file: only rank 0 writes
    assert len(list(two.rglob("summary.json"))) == 1
    # each rank owns a buffer shard holding the sequences it trained on: disjoint data
    from cpt.replay.buffer import ReplayBuffer

    rows = []
    for shard in (0, 1):
        buf = ReplayBuffer.open(two / "replay", shard)
        r, _ = buf.read(np.arange(buf.fill))
        rows.append({tuple(x) for x in r.tolist()})
        buf.close()
    assert rows[0] and rows[1] and not rows[0] & rows[1]


def _reptile_worker(rank, port, out):
    from torch.nn.parallel import DistributedDataParallel

    from cpt.alignment.reptile import Reptile, optimizer_params

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    reptile = Reptile(optimizer_params(opt), k=3, beta=0.5)
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for _ in range(6):
        ddp(torch.randn(16, 8, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        reptile.after_step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save({"params": gathered, "meta_updates": reptile.meta_updates}, out)
    dist.destroy_process_group()


def test_reptile_meta_update_leaves_identical_parameters_on_both_ranks(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "params.pt"
    mp.spawn(_reptile_worker, args=(port, str(out)), nprocs=2, join=True)
    result = torch.load(out)
    assert result["meta_updates"] == 2
    assert torch.equal(result["params"][0], result["params"][1])
