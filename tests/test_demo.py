"""`cpt demo --quick` end to end, offline: five strategies over five languages and the report."""

import json
import subprocess
import sys

from tests.test_train import SUMMARY_FIELDS

STRATEGIES = ("sequential", "replay", "mer", "reptile", "joint")


def test_quick_demo_writes_runs_and_report(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "cpt", "demo", "--quick", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in STRATEGIES:
        s = json.loads((out / name / "summary.json").read_text())
        assert SUMMARY_FIELDS <= set(s), name
        assert s["tasks"] == ["en", "fr", "de", "ar", "ja"]
        assert len(s["loss_matrix"]) == (1 if name == "joint" else 5)
    assert json.loads((out / "replay" / "summary.json").read_text())["tokens"]["replay"] > 0
    assert json.loads((out / "mer" / "summary.json").read_text())["meta_updates"] > 0
    report = out / "report"
    for name in ("report.md", "report.html", "compare.png", "first_task.png", "matrix_mer.png", "curves_sequential.png"):
        assert (report / name).stat().st_size > 1000, name
    md = (report / "report.md").read_text()
    assert all(f"| {name} |" in md for name in STRATEGIES)
    assert "| strategy | forgetting |" in proc.stdout  # the table is printed at the end
    # a second call skips finished runs
    again = subprocess.run([sys.executable, "-m", "cpt", "demo", "--quick", "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 0 and again.stderr.count("finished earlier; skipped") == 5
