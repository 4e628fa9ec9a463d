"""End to end: a 2-task run of the tiny preset on real text, its files, and its checkpoints."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import cpt
from cpt.config import validate
from cpt.errors import CptError
from cpt.evaluate import eval_windows, heldout_loss
from cpt.training.evaluator import evaluate_checkpoint
from tests.conftest import tiny_config

SUMMARY_FIELDS = {
    "tasks",
    "loss_matrix",
    "forgetting_score",
    "retained_loss",
    "learned_loss",
    "avg_final_loss",
    "bwt",
    "tokens",
    "steps",
    "wall_seconds",
    "tokens_per_second",
    "replay_fraction",
    "meta_updates",
    "flops",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_texts):
    out = tmp_path_factory.mktemp("runs") / "seq"
    cfg = validate(tiny_config(small_texts, training={"eval_every": 20}, checkpoint={"keep": 50, "every": 10}))
    cpt.train(cfg, out)
    return out


def test_run_writes_every_file(run_dir):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "run.json"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0
    for name in ("final", "task-0-en", "task-1-fr"):
        assert (run_dir / "checkpoints" / name / "model.safetensors").is_file()
        assert (run_dir / "checkpoints" / name / "tokenizer.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["tasks"] == ["en", "fr"]
    L = summary["loss_matrix"]
    assert len(L) == 2 and all(len(r) == 2 for r in L)
    # training French lowers French loss: the run learned something
    assert L[1][1] < L[0][1]
    assert summary["tokens"]["new"] >= 24_000 and summary["tokens"]["replay"] == 0
    # compute accounting: FLOPs per token (cpt.flops) × every token trained on
    assert summary["flops"]["training"] == summary["flops"]["per_token"] * summary["tokens"]["new"] > 0
    # the resolved config is the one that ran, and it validates again
    validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if x["type"] == "eval"]
    assert evals[0]["step"] == 0 and sum(x["task_end"] for x in evals) == 2
    assert any(x["type"] == "train" for x in lines)


def test_saved_hf_checkpoint_reloads_with_the_same_loss(run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = json.loads((run_dir / "summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final")
    AutoTokenizer.from_pretrained(run_dir / "checkpoints" / "final")  # the tokenizer travels with it
    losses = evaluate_checkpoint(run_dir, "final")
    assert losses["en"] == pytest.approx(summary["loss_matrix"][-1][0], rel=1e-5)
    assert losses["fr"] == pytest.approx(summary["loss_matrix"][-1][1], rel=1e-5)
    assert model.config.model_type == "llama"


def test_resume_from_a_mid_task_checkpoint_gives_the_same_summary(run_dir, tmp_path):
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    ckpts = sorted((copy / "checkpoints").glob("step-*"))
    mid = ckpts[len(ckpts) // 2 + 1]  # inside the second task
    for later in ckpts[ckpts.index(mid) + 1 :]:
        shutil.rmtree(later)
    (copy / "summary.json").unlink()
    resumed = cpt.train(None, copy, resume=True)
    original = json.loads((run_dir / "summary.json").read_text())
    assert resumed["loss_matrix"] == original["loss_matrix"]
    assert resumed["steps"] == original["steps"] and resumed["tokens"] == original["tokens"]


def test_joint_run_has_one_row(small_texts, tmp_path):
    cfg = validate(tiny_config(small_texts, training={"strategy": "joint"}))
    s = cpt.train(cfg, tmp_path / "joint")
    assert len(s["loss_matrix"]) == 1 and len(s["loss_matrix"][0]) == 2
    assert s["forgetting_score"] is None and s["task_boundaries"] == [s["steps"]]
    assert s["tokens"]["new"] >= 24_000


def test_a_run_directory_is_not_overwritten_by_accident(run_dir, small_texts):
    before = (run_dir / "summary.json").read_bytes()
    with pytest.raises(CptError, match="already holds another cpt run"):
        cpt.train(validate(tiny_config(small_texts)), run_dir)
    assert (run_dir / "summary.json").read_bytes() == before


def test_cli_train_and_python_m(small_texts, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(small_texts)))
    proc = subprocess.run(
        [sys.executable, "-m", "cpt", "train", str(cfg), "tasks.0.tokens=4e3", "tasks.1.tokens=4e3", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["tokens"]["new"] < 12_000  # the override took effect
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["tasks"][0]["tokens"] == 4000


def test_heldout_loss_matches_hf_loss(run_dir):
    """Our mean token cross-entropy is the one HF computes with labels (same shift, same mean)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final")
    rows = torch.randint(0, model.config.vocab_size, (3, 33)).numpy()
    total, count = heldout_loss(model, rows, 2, torch.device("cpu"))
    with torch.no_grad():
        hf = model(input_ids=torch.from_numpy(rows), labels=torch.from_numpy(rows)).loss
    assert total / count == pytest.approx(float(hf), rel=1e-5)
    assert eval_windows(rows.reshape(-1), 32, 64).shape[1] == 33


def test_cli_eval_and_report(run_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cpt", "eval", str(run_dir), "--checkpoint", "task-0-en"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    losses = json.loads((run_dir / "eval-task-0-en.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert losses["en"] == pytest.approx(summary["loss_matrix"][0][0], rel=1e-5)  # row 0 = after task 0
    bad = subprocess.run([sys.executable, "-m", "cpt", "eval", str(run_dir), "--checkpoint", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no such HF checkpoint" in bad.stderr and "task-1-fr" in bad.stderr
    rep = subprocess.run(
        [sys.executable, "-m", "cpt", "report", str(run_dir), "--out", str(tmp_path / "rep")], capture_output=True, text=True
    )
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "rep" / "report.html").stat().st_size > 10_000
    assert subprocess.run([sys.executable, "-m", "cpt", "--help"], capture_output=True, text=True).stdout.count("cpt demo") == 1


def test_activation_checkpointing_recomputes_layers_and_trains_the_same(small_texts, tmp_path):
    """Each decoder layer runs twice per step (forward + recompute in backward); the losses do not change."""
    from cpt.training.loop import Run

    calls = []
    summaries = []
    for on in (False, True):
        cfg = validate(tiny_config(small_texts, training={"activation_checkpointing": on}, checkpoint={"task_ends": False}))
        run = Run(cfg, tmp_path / f"ac-{on}")
        (tmp_path / f"ac-{on}").mkdir()
        n = []
        mlp = run.model.model.layers[0].mlp  # runs inside the checkpointed layer forward

        def counted(*args, forward=mlp.forward, n=n, **kwargs):
            n.append(1)
            return forward(*args, **kwargs)

        mlp.forward = counted
        summaries.append(run.run())
        calls.append(len(n))
    flat = [[v for row in s["loss_matrix"] for v in row] for s in summaries]
    assert flat[1] == pytest.approx(flat[0], rel=1e-5)
    steps = summaries[0]["steps"]
    assert calls[1] - calls[0] == steps  # one recompute of the layer per training step
