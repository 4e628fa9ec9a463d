"""cpt.runs: the multi-run driver's skip / resume / train / continue-on-error, and the shared table columns."""

import json
from pathlib import Path

import pytest

from cpt.config import validate
from cpt.demo import results_table
from cpt.errors import CptError
from cpt.runs import METRICS, markdown_table, run_all
from cpt.sweep import COLUMNS as SWEEP_COLUMNS
from cpt.training.rundir import MARKER
from tests.conftest import tiny_config

README = Path(__file__).resolve().parents[1] / "README.md"


def _config(small_texts, **extra):
    cfg = tiny_config(small_texts, checkpoint={"every": 4, "task_ends": False}, **extra)
    for t in cfg["tasks"]:
        t["tokens"] = 3_000
    return validate(cfg)


def _dirs(tmp_path, small_texts):
    """Three real runs: `done` finished, `cut` interrupted after a checkpoint, `new` not started."""
    cfg = _config(small_texts)
    run_all([("done", tmp_path / "done", cfg), ("cut", tmp_path / "cut", cfg)])
    (tmp_path / "cut" / "summary.json").unlink()  # as if killed after its last checkpoint
    return [(name, tmp_path / name, cfg) for name in ("done", "cut", "new")]


def test_skips_finished_resumes_interrupted_and_trains_the_rest(tmp_path, small_texts, capsys):
    runs = _dirs(tmp_path, small_texts)
    done_before = (tmp_path / "done" / "summary.json").read_bytes()
    capsys.readouterr()
    summaries, failed = run_all(runs, what="demo")
    err = capsys.readouterr().err
    assert failed == [] and list(summaries) == ["done", "cut", "new"]
    assert (tmp_path / "done" / "summary.json").read_bytes() == done_before  # skipped, not re-trained
    assert err.count("finished earlier; skipped") == 1 and "resumed at step" in err  # cut continued from its checkpoint
    assert summaries["cut"]["loss_matrix"] == summaries["new"]["loss_matrix"] == summaries["done"]["loss_matrix"]
    assert "== [1/3] done (0s into the demo) ==" in err


def test_overwrite_trains_every_run_from_its_config(tmp_path, small_texts, capsys):
    runs = _dirs(tmp_path, small_texts)
    ids = {n: json.loads((d / MARKER).read_text())["run_id"] for n, d, _ in runs[:2]}
    capsys.readouterr()
    run_all(runs, overwrite=True)
    assert "skipped" not in capsys.readouterr().err
    assert all(json.loads((d / MARKER).read_text())["run_id"] != ids[n] for n, d, _ in runs[:2])  # new runs, not resumed


def test_an_error_stops_the_runs_unless_told_to_go_on(tmp_path, small_texts, capsys):
    good = _config(small_texts)
    bad = _config({**small_texts, "fr": tmp_path / "missing.txt"})  # fails when its data is read, before anything is written
    runs = [("a", tmp_path / "a", good), ("bad", tmp_path / "bad", bad), ("c", tmp_path / "c", good)]
    with pytest.raises(CptError, match="missing.txt"):
        run_all(runs)
    assert not (tmp_path / "c").exists()
    summaries, failed = run_all(runs, continue_on_error=True)
    assert list(summaries) == ["a", "c"] and failed == ["bad"]
    assert "cpt: error: bad: " in capsys.readouterr().err


def test_a_garbled_summary_is_an_error_naming_the_file(tmp_path, small_texts):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "summary.json").write_text("{")
    with pytest.raises(CptError, match=r"x/summary.json: not valid JSON"):
        run_all([("x", tmp_path / "x", _config(small_texts))])
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["summary.json"]  # nothing trained there


def test_the_demo_table_is_the_one_the_readme_quotes():
    s = {
        "forgetting_score": 0.03312,
        "retained_loss": 6.6,
        "learned_loss": 6.7,
        "avg_final_loss": 6.672,
        "bwt": -0.0381,
        "tokens": {"new": 303104, "replay": 80896},
        "wall_seconds": 133.4,
        "strategy": "sequential",
    }
    joint = dict(s, forgetting_score=None, bwt=None)
    lines = results_table({"replay": s, "joint": joint}).splitlines()
    readme = README.read_text().splitlines()
    i = readme.index(lines[0])  # the header, word for word
    assert readme[i + 1] == lines[1]
    assert lines[2] == "| replay | 0.033 | 6.600 | 6.700 | 6.672 | -0.038 | 303,104 / 80,896 | 133 |"
    assert lines[3].startswith("| joint | — | 6.600 |") and "| 6.672 | — |" in lines[3]


def test_a_metric_reads_the_same_in_every_table():
    row = {"forgetting_score": 0.12345, "avg_final_loss": None, "tokens": {"new": 0, "replay": 0}}
    demo = results_table({"x": row}).splitlines()
    sweep = markdown_table([row], SWEEP_COLUMNS).splitlines()

    def cell(lines, header):
        return lines[2].split(" | ")[lines[0].split(" | ").index(header)]

    for c in METRICS:
        if c in SWEEP_COLUMNS:
            assert cell(demo, c.header) == cell(sweep, c.header)
    assert cell(demo, "forgetting") == "0.123" and cell(sweep, "avg final") == "—"
