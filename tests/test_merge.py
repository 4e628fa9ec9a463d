"""The task-end weight merge (merge.enabled): its exact value, its runs, their resume, and its config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import cpt
from cpt.alignment.merge import TaskEndMerge
from cpt.alignment.reptile import optimizer_params
from cpt.config import validate
from cpt.errors import CptError
from cpt.training.distributed import saved_keys
from cpt.training.evaluator import evaluate_checkpoint
from tests.conftest import free_port, tiny_config


def toy():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def train_to(model, opt, hook, start: int, stop: int) -> list[torch.Tensor]:
    """Steps start..stop-1 with the hook after each; returns the weights just before the last step's hook ran."""
    g = torch.Generator().manual_seed(start)
    trained = []
    for step in range(start, stop):
        model(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        trained = [p.detach().clone() for p in model.parameters()]
        hook.after_step(step)
    return trained


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_half_merge_toward_previous_is_the_mean_of_the_task_ends():
    model = toy()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    initial = weights(model)
    hook = TaskEndMerge(optimizer_params(opt), 0.5, "previous", task_ends=[3, 6])
    trained = train_to(model, opt, hook, 0, 3)
    merged = weights(model)
    for m, p0, p1 in zip(merged, initial, trained):
        assert not torch.allclose(p1, p0)
        assert torch.allclose(m, (p0 + p1) / 2, atol=1e-7, rtol=0)
    assert hook.merges == 1
    trained = train_to(model, opt, hook, 3, 6)
    for m2, m1, p2 in zip(weights(model), merged, trained):  # the second task end merges toward the first's merged weights
        assert torch.allclose(m2, (m1 + p2) / 2, atol=1e-7, rtol=0)
    assert hook.merges == 2


def test_merge_toward_initial_keeps_the_step_zero_model():
    model = toy()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    initial = weights(model)
    hook = TaskEndMerge(optimizer_params(opt), 0.25, "initial", task_ends=[3, 6])
    train_to(model, opt, hook, 0, 3)
    trained = train_to(model, opt, hook, 3, 6)
    for m, p0, p2 in zip(weights(model), initial, trained):
        assert torch.allclose(m, 0.75 * p0 + 0.25 * p2, atol=1e-7, rtol=0)
    for r, p0 in zip(hook.reference, initial):
        assert torch.equal(r, p0)


def test_merge_survives_the_next_optimizer_step_under_mixed_precision():
    """The merge edits the fp32 weights the optimizer owns, so autocast's bf16 copies cannot undo it."""
    model = toy()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    hook = TaskEndMerge(optimizer_params(opt), 0.5, "previous", task_ends=[1])
    x = torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    hook.after_step(0)
    merged = weights(model)
    for group in opt.param_groups:
        group["lr"] = 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().pow(2).mean().backward()
    opt.step()
    for p, q in zip(model.parameters(), merged):
        assert torch.equal(p.detach(), q)


CHECKPOINTS = {"every": 10, "keep": 50, "task_ends": False}


def run(small_texts, out, **sections):
    sections["checkpoint"] = {**CHECKPOINTS, **sections.get("checkpoint", {})}
    return cpt.train(validate(tiny_config(small_texts, **sections)), out)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, small_texts):
    return run(small_texts, tmp_path_factory.mktemp("merge") / "sequential")


@pytest.fixture(scope="module")
def merged(tmp_path_factory, small_texts):
    out = tmp_path_factory.mktemp("merge") / "half"
    return out, run(small_texts, out, merge={"enabled": True, "lam": 0.5}, checkpoint={"task_ends": True})


def test_lambda_one_is_the_run_without_merge(sequential, small_texts, tmp_path):
    same = run(small_texts, tmp_path / "lam1", merge={"enabled": True, "lam": 1.0})
    assert same["loss_matrix"] == sequential["loss_matrix"]
    assert same["merge"] == {"lam": 1.0, "toward": "previous", "merges": 2}
    assert sequential["merge"] is None


def test_merged_run_differs_from_sequential_and_reports_its_forgetting(sequential, merged):
    out, s = merged
    assert s["loss_matrix"] != sequential["loss_matrix"]
    assert isinstance(s["forgetting_score"], float) and s["forgetting_score"] != sequential["forgetting_score"]
    assert s["merge"] == {"lam": 0.5, "toward": "previous", "merges": 2}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    merges = [x for x in lines if x["type"] == "merge"]
    assert [(m["step"], m["task"]) for m in merges] == list(zip(s["task_boundaries"], ["en", "fr"]))
    for m in merges:  # each task end merges before the evaluation that gives its loss-matrix row
        end_eval = next(i for i, x in enumerate(lines) if x["type"] == "eval" and x["step"] == m["step"] and x["task_end"])
        assert lines.index(m) < end_eval


def test_task_checkpoint_holds_the_weights_its_row_evaluated(merged):
    out, s = merged
    losses = evaluate_checkpoint(out, "task-0-en")
    assert [losses[t] for t in s["tasks"]] == pytest.approx(s["loss_matrix"][0], abs=1e-5)


def test_rows_evaluate_the_merged_weights(small_texts, tmp_path, sequential):
    """Merging nearly all the way back to the step-0 model at each task end: every row is (almost) the untrained model's losses."""
    out = tmp_path / "initial"
    s = run(small_texts, out, merge={"enabled": True, "lam": 0.001, "toward": "initial"})
    step0 = next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if json.loads(x)["type"] == "eval")
    untrained = [step0["losses"][t] for t in s["tasks"]]
    for i, (row, seq_row) in enumerate(zip(s["loss_matrix"], sequential["loss_matrix"])):
        assert row == pytest.approx(untrained, abs=0.02)
        assert untrained[i] - seq_row[i] > 0.3  # what sequential training moved far from


def test_resume_after_a_task_end_continues_to_the_same_loss_matrix(merged, tmp_path):
    out, original = merged
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    first_end = original["task_boundaries"][0]
    ckpts = sorted((copy / "checkpoints").glob("step-*"))
    keep = next(c for c in ckpts if int(c.name.split("-")[1]) > first_end)  # inside the second task
    state = torch.load(keep / "state.pt", weights_only=True)
    assert state["merge"]["merges"] == 1
    for later in ckpts[ckpts.index(keep) + 1 :]:
        shutil.rmtree(later)
    (copy / "summary.json").unlink()
    resumed = cpt.train(None, copy, resume=True)
    assert resumed["loss_matrix"] == original["loss_matrix"]
    assert resumed["merge"] == original["merge"]


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"merge": {"enabled": True}, "training": {"strategy": "joint"}}, r"merge\.enabled: joint training"),
        ({"merge": {"enabled": True}, "alignment": {"method": "reptile"}}, r"merge\.enabled: not with alignment\.method reptile"),
        ({"merge": {"lam": 0}}, r"merge\.lam: .*greater than 0"),
        ({"merge": {"lam": 1.5}}, r"merge\.lam: .*less than or equal to 1"),
        ({"merge": {"toward": "final"}}, r"merge\.toward: "),
    ],
)
def test_config_refuses_merges_that_make_no_sense(small_texts, sections, message):
    with pytest.raises(CptError, match=message) as err:
        validate(tiny_config(small_texts, **sections))
    assert "\n" not in str(err.value)


def _torchrun(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "cpt", "train"]
    proc = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available in this build")
def test_fsdp2_reference_travels_sharded_and_resumes_on_two_ranks_and_on_one(small_texts, tmp_path):
    """Under FSDP2 each rank merges its own shards; the reference is in the DCP checkpoint and reshards like the weights."""
    merge = {"enabled": True, "lam": 0.5}
    reference = run(small_texts, tmp_path / "one", merge=merge, training={"batch_size": 8})  # the same global batch
    cfg = tiny_config(small_texts, merge=merge, training={"batch_size": 4, "parallel": "fsdp"}, checkpoint=dict(CHECKPOINTS))
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "fsdp"
    _torchrun(tmp_path / "fsdp.yaml", "--out", out)
    s = json.loads((out / "summary.json").read_text())
    np.testing.assert_allclose(s["loss_matrix"], reference["loss_matrix"], atol=1e-3)
    assert s["merge"] == reference["merge"]
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    keep = next(c for c in ckpts if int(c.name.split("-")[1]) > s["task_boundaries"][0])
    assert saved_keys(keep / "dcp") == {"model", "optimizer", "merge"}
    for name, resume in (("two", _torchrun), ("one", lambda *a: cpt.train(None, a[-1], resume=True))):
        cut = tmp_path / f"cut-{name}"
        shutil.copytree(out, cut)
        for later in ckpts[ckpts.index(keep) + 1 :]:
            shutil.rmtree(cut / "checkpoints" / later.name)
        (cut / "summary.json").unlink()
        resume("--resume", cut)
        resumed = json.loads((cut / "summary.json").read_text())
        if name == "two":
            assert resumed["loss_matrix"] == s["loss_matrix"]
        else:  # gradients summed in another order only
            np.testing.assert_allclose(resumed["loss_matrix"], s["loss_matrix"], atol=1e-3)
        assert resumed["merge"] == s["merge"]
