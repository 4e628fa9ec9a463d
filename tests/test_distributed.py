"""Data-parallel runs under torchrun (gloo on CPU): same results as one process at the same global batch."""

import json
import shutil
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


def _config(small_texts, tmp_path, batch_size, **sections):
    cfg = tiny_config(
        small_texts,
        **sections,
        training={"batch_size": batch_size},
        replay={"rate": 0.25},
        alignment={"method": "reptile", "k": 5, "beta": 0.7},
        checkpoint={"task_ends": False},
    )
    path = tmp_path / f"b{batch_size}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torchrun(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "cpt", "train", *map(str, args)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def one_process(small_texts, tmp_path_factory):
    """The reference: one process at global batch 8."""
    d = tmp_path_factory.mktemp("one")
    proc = subprocess.run(
        [sys.executable, "-m", "cpt", "train", str(_config(small_texts, d, 8)), "--out", str(d / "run")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((d / "run" / "summary.json").read_text())


def test_two_ranks_match_one_process_at_the_same_global_batch(small_texts, tmp_path, one_process):
    two = tmp_path / "two"
    _torchrun(_config(small_texts, tmp_path, 4), "--out", two)
    a = one_process
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


def test_fsdp2_matches_one_process_and_resumes_from_its_sharded_checkpoint(small_texts, tmp_path, one_process):
    """FSDP2 (fully_shard, gloo): same losses as one process; DCP checkpoints resume to the identical run."""
    cfg = _config(small_texts, tmp_path, 4)
    out = tmp_path / "fsdp"
    _torchrun(cfg, "training.parallel=fsdp", "checkpoint.every=5", "checkpoint.keep=50", "--out", out)
    s = json.loads((out / "summary.json").read_text())
    np.testing.assert_allclose(s["loss_matrix"], one_process["loss_matrix"], rtol=1e-3)
    assert s["meta_updates"] == one_process["meta_updates"] and s["tokens"] == one_process["tokens"]
    # every rank wrote its own shards; the HF checkpoint holds the whole model and loads as a plain Llama
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    mid = ckpts[len(ckpts) // 2]
    assert {p.name for p in (mid / "dcp").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    from cpt.training.distributed import saved_keys

    assert saved_keys(mid / "dcp") == {"model", "optimizer", "reptile"}  # the Reptile anchor reshards with the weights
    from transformers import AutoModelForCausalLM

    from cpt.model import count_parameters

    final = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "final")
    assert type(final).__name__ == "LlamaForCausalLM" and count_parameters(final) == s["parameters"]
    # `cpt export` of the last sharded step (one process reads every rank's shards) = the gathered final weights
    from cpt.hf_io import export_checkpoint

    exported = AutoModelForCausalLM.from_pretrained(export_checkpoint(out, tmp_path / "exported", ckpts[-1].name, log=lambda m: None))
    want = final.state_dict()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    # interrupt it after `mid`: later checkpoints and the outputs of the end are gone; resume on 2 ranks
    for later in ckpts[ckpts.index(mid) + 1 :]:
        shutil.rmtree(later)
    (out / "summary.json").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "cpt", "train", "--resume", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed at step {int(mid.name.split('-')[1])}" in proc.stderr
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["loss_matrix"] == s["loss_matrix"]
    assert resumed["meta_updates"] == s["meta_updates"]
