"""cpt.runs: the multi-run driver's skip / resume / train / continue-on-error, and the shared table columns."""

import json
from pathlib import Path

import pytest

import cpt.training.loop
from cpt.demo import results_table
from cpt.errors import CptError
from cpt.runs import METRICS, markdown_table, run_all
from cpt.sweep import COLUMNS as SWEEP_COLUMNS
from cpt.training.loop import MARKER

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def calls(monkeypatch):
    """Replace training with a stub that records its calls and fails for a run named `bad`."""
    made = []

    def train(config, out, *, resume=False, overwrite=False):
        made.append((out.name, config, resume, overwrite))
        if out.name == "bad":
            raise CptError("boom")
        return {"run": out.name}

    monkeypatch.setattr(cpt.training.loop, "train", train)
    return made


def _dirs(tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text(json.dumps({"run": "done", "avg_final_loss": 1.5}))
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / MARKER).write_text("{}")
    return [(name, tmp_path / name, f"config of {name}") for name in ("done", "cut", "new")]


def test_skips_finished_resumes_interrupted_and_trains_the_rest(tmp_path, calls, capsys):
    summaries, failed = run_all(_dirs(tmp_path), what="demo")
    assert calls == [("cut", None, True, False), ("new", "config of new", False, False)]  # resumed with its own saved config
    assert summaries == {"done": {"run": "done", "avg_final_loss": 1.5}, "cut": {"run": "cut"}, "new": {"run": "new"}}
    assert failed == []
    err = capsys.readouterr().err
    assert "== [1/3] done (0s into the demo) ==" in err and err.count("finished earlier; skipped") == 1


def test_overwrite_trains_every_run_from_its_config(tmp_path, calls):
    run_all(_dirs(tmp_path), overwrite=True)
    assert calls == [(n, f"config of {n}", False, True) for n in ("done", "cut", "new")]


def test_an_error_stops_the_runs_unless_told_to_go_on(tmp_path, calls, capsys):
    runs = [(name, tmp_path / name, None) for name in ("a", "bad", "c")]
    with pytest.raises(CptError, match="boom"):
        run_all(runs)
    assert [c[0] for c in calls] == ["a", "bad"]
    calls.clear()
    summaries, failed = run_all(runs, continue_on_error=True)
    assert [c[0] for c in calls] == ["a", "bad", "c"] and list(summaries) == ["a", "c"] and failed == ["bad"]
    assert "cpt: error: bad: boom" in capsys.readouterr().err


def test_a_garbled_summary_is_an_error_naming_the_file(tmp_path, calls):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "summary.json").write_text("{")
    with pytest.raises(CptError, match=r"x/summary.json: not valid JSON"):
        run_all([("x", tmp_path / "x", None)])
    assert calls == []


def test_the_demo_table_is_the_one_the_readme_quotes():
    s = {"forgetting_score": 0.03312, "retained_loss": 6.6, "learned_loss": 6.7, "avg_final_loss": 6.672, "bwt": -0.0381,
         "tokens": {"new": 303104, "replay": 80896}, "wall_seconds": 133.4, "strategy": "sequential"}
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
