"""Every train line and the summary say how fast the run goes and where its wall time went (issue: efficiency per line)."""

from __future__ import annotations

import json

import pytest

from cpt.config import validate
from cpt.training.launch import train
from tests.conftest import tiny_config


def test_train_lines_and_summary_report_speed_memory_and_time_shares(small_texts, tmp_path):
    cfg = tiny_config(small_texts, replay={"rate": 0.25}, checkpoint={"every": 10})
    out = tmp_path / "run"
    summary = train(validate(cfg), out)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in lines if r["type"] == "train"]
    assert len(trains) > 3
    for r in trains:
        assert r["tokens_per_second_all_ranks"] == pytest.approx(r["tokens_per_second"])  # one process
        assert r["mfu"] is None  # no known peak on CPU
        assert r["peak_memory_mib"] > 50  # the peak RSS of a process that imported torch
        shares = r["time_shares"]
        assert set(shares) == {"train", "eval", "probe", "checkpoint", "replay_wait"}
        assert 0 < shares["train"] < 1 and 0 < shares["eval"] < 1 and sum(shares.values()) <= 1.0001
        assert r["eta_seconds"] >= 0
    assert trains[-1]["eta_seconds"] == 0  # the last line is at the last step
    # the whole sequence's ETA, not the task's: positive at task 0's last line, as long as task 1 is left. (Not compared
    # between lines: it follows the measured speed, which a busy machine changes from line to line.)
    end_of_task_0 = [r for r in trains if r["task_index"] == 0][-1]
    assert end_of_task_0["step"] == summary["task_boundaries"][0] and end_of_task_0["eta_seconds"] > 0
    assert all(r["eta_seconds"] > 0 for r in trains[:-1])
    eff = summary["efficiency"]
    assert eff["seconds"]["checkpoint"] > 0 and eff["seconds"]["wall"] >= eff["seconds"]["train"] > 0
    assert "eta_seconds" not in eff and eff["time_shares"]["train"] > 0
