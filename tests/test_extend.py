"""`cpt train MORE.yaml --extend RUN --out NEW`: a finished run continued with new tasks is the run that had
planned them from the start (for schedules that do not depend on the run's length), and RUN is only read."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import yaml

from cpt.config import validate
from cpt.errors import CptError
from cpt.training.launch import train
from tests.conftest import tiny_config

SCHEDULES = {
    "rewarm": {"name": "rewarm", "warmup": 0.1},
    "constant": {"name": "constant", "warmup_steps": 3},
    "infinite": {"name": "infinite", "warmup_steps": 2, "cooldown_steps": 4, "anneal": 0.0, "cooldown": 0.0},
}


def _config(small_texts, schedule: dict, langs=("en", "fr"), **sections) -> dict:
    cfg = tiny_config(
        small_texts,
        replay={"rate": 0.25},
        alignment={"method": "reptile", "k": 5, "beta": 0.7},
        checkpoint={"every": 10, "keep": 50},
        schedule=schedule,
        **sections,
    )
    cfg["tasks"] = [{"name": lang, "path": str(small_texts[lang]), "tokens": 8_000} for lang in langs]
    return cfg


def _more(tmp_path, small_texts, file: str = "more.yaml", **extra) -> str:
    path = tmp_path / file
    path.write_text(yaml.safe_dump({"tasks": [{"name": "de", "path": str(small_texts["de"]), "tokens": 8_000}], **extra}))
    return str(path)


def _digest(run) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier(small_texts, tmp_path_factory):
    """en → fr, finished, once per schedule."""
    d = tmp_path_factory.mktemp("earlier")
    runs = {}
    for name, schedule in SCHEDULES.items():
        runs[name] = d / name
        train(validate(_config(small_texts, schedule)), runs[name])
    return runs


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_extending_equals_planning_every_task_up_front(earlier, small_texts, tmp_path, schedule):
    run = earlier[schedule]
    before = _digest(run)
    ext = tmp_path / "ext"
    extended = train(_more(tmp_path, small_texts), ext, extend=run)
    assert _digest(run) == before  # the earlier run's directory is byte for byte what it was
    # the same three tasks planned up front, with the tokenizer the earlier run trained
    up_cfg = _config(small_texts, SCHEDULES[schedule], ("en", "fr", "de"), tokenizer={"path": str(run / "checkpoints" / "final")})
    up = train(validate(up_cfg), tmp_path / "up")
    assert extended["loss_matrix"] == up["loss_matrix"] and len(up["loss_matrix"]) == 3
    for key in ("tokens", "replay_fraction", "meta_updates", "steps", "task_boundaries", "forgetting_score"):
        assert extended[key] == up[key], key
    assert extended["extended_from"]["run"] == str(run.resolve()) and extended["extended_from"]["tasks"] == 2
    assert yaml.safe_load((ext / "config.yaml").read_text())["tasks"][2]["name"] == "de"


def test_an_extended_run_resumes_to_the_uninterrupted_one(earlier, small_texts, tmp_path):
    ext = tmp_path / "ext"
    whole = train(_more(tmp_path, small_texts), ext, extend=earlier["rewarm"])
    start = json.loads((earlier["rewarm"] / "summary.json").read_text())["steps"]
    cut = tmp_path / "cut"
    shutil.copytree(ext, cut)
    ckpts = sorted((cut / "checkpoints").glob("step-*"))
    keep = next(c for c in ckpts if int(c.name[5:]) > start)  # one the extended run wrote itself
    for later in ckpts[ckpts.index(keep) + 1 :]:
        shutil.rmtree(later)
    (cut / "summary.json").unlink()
    resumed = train(None, cut, resume=True)
    assert resumed["loss_matrix"] == whole["loss_matrix"] and resumed["tokens"] == whole["tokens"]


def test_what_an_extension_cannot_change_is_refused_in_one_line(earlier, small_texts, tmp_path):
    run = earlier["rewarm"]
    cases = [
        (_more(tmp_path, small_texts, "lr.yaml", training={"lr": 1e-3}), "training.lr: 0.001 in"),
        (_more(tmp_path, small_texts, "rate.yaml", replay={"rate": 0.5}), "replay.rate: 0.5 in"),
    ]
    for more, message in cases:
        with pytest.raises(CptError, match=message) as err:
            train(more, tmp_path / "x", extend=run)
        assert "\n" not in str(err.value) and not (tmp_path / "x").exists()
    dup = tmp_path / "dup.yaml"
    dup.write_text(yaml.safe_dump({"tasks": [{"name": "fr", "path": str(small_texts["de"]), "tokens": 8_000}]}))
    with pytest.raises(CptError, match="'fr' is already a task of"):
        train(str(dup), tmp_path / "x", extend=run)
    with pytest.raises(CptError, match="the earlier run's own directory"):
        train(_more(tmp_path, small_texts), run, extend=run)


def test_a_schedule_planned_over_the_run_cannot_be_extended(small_texts, tmp_path):
    run = tmp_path / "cosine"
    train(validate(_config(small_texts, {"name": "cosine"})), run)
    with pytest.raises(CptError, match=r"schedule.name: cosine is planned over the run's length: step \d+ trained at lr"):
        train(_more(tmp_path, small_texts), tmp_path / "x", extend=run)
    (run / "summary.json").unlink()
    with pytest.raises(CptError, match="has not finished"):
        train(_more(tmp_path, small_texts), tmp_path / "y", extend=run)


def test_a_release_anneals_a_copy_and_leaves_the_run_open(earlier, small_texts, tmp_path):
    """`cpt release RUN --steps N`: N more steps on the last task's data with the LR decaying to min_lr, in a copy."""
    from cpt.cli import main

    run = earlier["infinite"]
    before = _digest(run)
    out = tmp_path / "release"
    assert main(["release", str(run), "--steps", "6", "--out", str(out)]) == 0
    assert _digest(run) == before  # the run stays as it was, so it can still be extended un-annealed
    s = json.loads((out / "summary.json").read_text())
    ran = json.loads((run / "summary.json").read_text())
    assert s["steps"] == ran["steps"] + 6 and len(s["loss_matrix"]) == 3 and s["tasks"][-1] == "fr-release"
    lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert lrs[-1] == pytest.approx(cfg["schedule"]["min_lr"])  # the last logged step is the anneal's last
    assert (out / "checkpoints" / "final" / "config.json").is_file()
    assert not list((out / "checkpoints").glob("step-*")) and not (out / "replay").exists()
