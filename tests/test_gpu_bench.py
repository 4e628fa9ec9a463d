"""benchmarks/gpu.py end to end: `--smoke` (tiny preset, seq 128, CPU, 3 + 3 steps) trains the four
variants through cpt.train and prints a table with tokens/s and MFU for each (~15 s on 2 cores)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
VARIANTS = ("plain", "replay", "reptile", "replay+reptile")


def _table(stdout: str) -> list[dict[str, str]]:
    """The Markdown table's rows as {column: cell}."""
    lines = [x for x in stdout.splitlines() if x.startswith("|")]
    assert lines, f"no Markdown table in the output:\n{stdout}"
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells)))
    return rows


def test_smoke_prints_mfu_for_all_four_variants(tmp_path):
    out_json = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path / "work"), "--json", str(out_json)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    rows = _table(proc.stdout)
    mfu_col = next(c for c in rows[0] if c.startswith("MFU"))
    by_variant = {r["variant"].split(",")[0]: r for r in rows}
    assert set(by_variant) == set(VARIANTS), rows
    for variant, row in by_variant.items():
        assert row["preset"] == "tiny"
        assert row["batch × seq"].endswith("× 128")
        assert row["warm-up + timed steps"] == "3 + 3"
        assert re.fullmatch(r"\d+\.\d%", row[mfu_col]), (variant, row)
        assert float(row["tokens/s"].replace(",", "")) > 0
        if variant != "plain":
            assert re.fullmatch(r"[+-]\d+\.\d\d%", row["step time vs plain"]), (variant, row)
    assert by_variant["reptile"]["variant"] == "reptile, k = 3"  # k capped at the 3 timed steps
    assert "replay+Reptile step-time overhead vs plain (target ≤ 2%): tiny " in proc.stdout
    assert "MFU target (≥ 45% for paper-1b at seq 2048 on one H200): not evaluated" in proc.stdout
    assert sum(line.startswith("[") and "tokens/s" in line for line in proc.stdout.splitlines()) == 4  # a progress line per variant

    data = json.loads(out_json.read_text())
    assert [r["variant"] for r in data["results"]] == list(VARIANTS)
    for r in data["results"]:
        assert r["status"] == "ok", r
        assert r["tokens_per_second"] > 0 and r["mfu"] > 0
        assert r["tokens_per_step"] == 4 * 128
        # MFU is cpt.flops' formula on the run's tokens/s and the (nominal, CPU) peak
        assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_second"] / data["peak_flops"])
        assert r["meta_updates_in_window"] == (1 if "reptile" in r["variant"] else 0)
    # the replay variants replayed from the prefilled buffer
    for variant in ("replay", "replay+reptile"):
        assert "(replay.buffer.init)" in (tmp_path / "work" / "logs" / f"tiny-{variant}.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message; this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--presets", "tiny", "--out", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "--device cuda: no CUDA device is available" in proc.stderr
    assert "Traceback" not in proc.stderr
