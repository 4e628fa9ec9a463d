"""`cpt sweep`: a 2×2 grid runs, a second call skips finished runs and resumes an interrupted one,
and the table, plot and verdict are written."""

import csv
import json
import subprocess
import sys

import pytest
import yaml

from cpt.errors import CptError
from cpt.report.scaling import group, verdict
from cpt.sweep import load_sweep, run_sweep
from tests.conftest import tiny_config


def _sweep_file(tmp_path, small_texts, grid, **set_):
    base = tiny_config(small_texts, checkpoint={"task_ends": False})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": "base.yaml", "set": set_, "grid": grid}))
    return path


def test_grid_expands_to_named_validated_runs(small_texts, tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, small_texts, {"model.preset": ["tiny", "small"], "replay.rate": [0, 0.25], "seed": [0, 1, 2]}))
    assert len(sweep.runs) == 12
    r = sweep.runs[-1]
    assert r.name == "preset-small_rate-0.25_seed-2"
    assert (r.config.model.preset, r.config.replay.rate, r.config.seed) == ("small", 0.25, 2)


@pytest.mark.parametrize(
    "grid,message",
    [({"replay.rate": [2.0]}, "replay.rate"), ({"replay.rate": []}, "grid.replay.rate"), ({"model.preset": ["huge"]}, "model.preset")],
)
def test_bad_grids_are_refused_naming_the_field(small_texts, tmp_path, grid, message):
    with pytest.raises(CptError, match=message):
        load_sweep(_sweep_file(tmp_path, small_texts, grid))


def test_two_by_two_sweep_runs_skips_and_resumes_and_reports(small_texts, tmp_path):
    fast = {"tasks.0.tokens": 6000, "tasks.1.tokens": 6000, "training.eval_tokens": 1024}
    path = _sweep_file(tmp_path, small_texts, {"model.preset": ["tiny", "small"], "replay.rate": [0.0, 0.25]}, **fast)
    out = tmp_path / "out"
    rows = run_sweep(path, out)
    assert len(rows) == 4
    table = list(csv.DictReader((out / "sweep.csv").open()))
    assert {r["run"] for r in table} == {"preset-tiny_rate-0.0", "preset-tiny_rate-0.25", "preset-small_rate-0.0", "preset-small_rate-0.25"}
    for r in table:  # compute grows with model size and with replay
        assert float(r["flops"]) > 0 and r["avg_final_loss"]
    by = {(r["preset"], float(r["replay_rate"])): float(r["flops"]) for r in table}
    assert by[("small", 0.0)] > by[("tiny", 0.0)] and by[("tiny", 0.25)] > by[("tiny", 0.0)]
    assert "| run |" in (out / "sweep.md").read_text()
    report = (out / "scaling" / "report.md").read_text()
    assert (out / "scaling" / "scaling.png").stat().st_size > 10_000
    assert "Verdict" in report and "the paper predicts replay" in report  # one comparison, from no replay

    # a second call trains nothing; a run without its summary (interrupted at the end) is resumed
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    (out / "runs" / "preset-small_rate-0.25" / "summary.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "cpt", "sweep", str(path), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("finished earlier; skipped") == 3
    assert "resumed at step" in proc.stderr
    for p, t in stamp.items():
        if "small_rate-0.25" not in str(p):
            assert p.stat().st_mtime_ns == t
    assert json.loads((out / "runs" / "preset-small_rate-0.25" / "summary.json").read_text())["avg_final_loss"] > 0

    # the same directory with a changed sweep is refused before anything runs
    changed = _sweep_file(
        tmp_path, small_texts, {"model.preset": ["tiny", "small"], "replay.rate": [0.0, 0.25]}, **fast, **{"training.lr": 1e-3}
    )
    with pytest.raises(CptError, match="different config"):
        run_sweep(changed, out)


def test_a_saved_config_from_before_a_new_defaulted_key_is_the_same_config(small_texts, tmp_path):
    """A sweep directory made by an older cpt (its config.yaml lacks keys added since, at their defaults) is not a
    mismatch; a changed value or a key cpt no longer knows is."""
    from cpt.config import dump_config, validate
    from cpt.sweep import _same_config

    cfg = validate(tiny_config(small_texts, replay={"rate": 0.25}))
    older = yaml.safe_load(dump_config(cfg))
    del older["merge"], older["replay"]["sources"]  # what a config.yaml written before merge and replay sources holds
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(older, sort_keys=False))
    assert saved.read_text() != dump_config(cfg) and _same_config(saved, cfg)
    saved.write_text(yaml.safe_dump({**older, "training": {**older["training"], "lr": 1e-4}}, sort_keys=False))
    assert not _same_config(saved, cfg)
    saved.write_text(yaml.safe_dump({**older, "retired_section": {}}, sort_keys=False))
    assert not _same_config(saved, cfg)


def test_verdict_follows_the_gains_per_doubling_of_compute():
    def row(preset, params, rate, flops, loss, seed=0):
        return {
            "alignment": "none",
            "replay_rate": rate,
            "preset": preset,
            "parameters": params,
            "flops": flops,
            "avg_final_loss": loss,
            "forgetting_score": 0.0,
            "seed": seed,
        }

    # from rate 0: replay doubles compute for -0.5 loss, the bigger model quadruples it for -0.4 → replay
    # from rate 0.25: replay (x2) gives -0.05, the bigger model (x2) gives -0.3 → model size
    rows = [
        row("s", 1, 0.0, 1e12, 5.0),
        row("s", 1, 0.25, 2e12, 4.5),
        row("s", 1, 0.5, 4e12, 4.45),
        row("m", 4, 0.0, 4e12, 4.6),
        row("m", 4, 0.25, 4e12 * 1.0 + 1, 4.2),
    ]
    comparisons, lines = verdict(group(rows))
    by_rate = {c["rate"]: c for c in comparisons}
    assert by_rate[0.0]["winner"] == "replay"
    assert by_rate[0.0]["gain_replay"] == pytest.approx(0.5) and by_rate[0.0]["gain_size"] == pytest.approx(0.2)
    assert by_rate[0.25]["winner"] == "model size"
    assert all(line.endswith("agrees.") for line in lines)
