"""Shared by the benchmarks: a one-config cpt run on bundled text whose step time is measured.

Each benchmark compares cpt runs that differ in one setting (replay on/off, Reptile on/off) on
the same model, data and number of steps; the step time comes from cpt's own `train_seconds`
(time inside optimizer steps, evaluation excluded), so it measures the real loop.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cpt  # noqa: E402
from cpt.config import validate  # noqa: E402

HANDBOOK = ROOT / "cpt" / "corpus" / "handbook"


def base_config(preset: str, seq_len: int, batch_size: int, tokens_per_task: int) -> dict:
    return {
        "seed": 0,
        "tokenizer": {"path": str(HANDBOOK / "tokenizer.json")},
        "tasks": [
            {"name": "en", "path": str(HANDBOOK / "en.txt.xz"), "tokens": tokens_per_task},
            {"name": "fr", "path": str(HANDBOOK / "fr.txt.xz"), "tokens": tokens_per_task},
        ],
        "model": {"preset": preset},
        "training": {"seq_len": seq_len, "batch_size": batch_size, "eval_tokens": seq_len * 4},
        "schedule": {"name": "constant"},
        "checkpoint": {"task_ends": False},
        "logging": {"progress": False, "log_every": 50},
    }


def step_seconds(cfg: dict, label: str, workdir: Path) -> tuple[float, dict]:
    """Seconds per optimizer step in the second task (where replay / Reptile act), and the summary."""
    run = workdir / label
    summary = cpt.train(validate(copy.deepcopy(cfg)), run, overwrite=True)
    import json

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    second = [x for x in lines if x["type"] == "train" and x["task_index"] == 1]
    # each logging window's tokens/s → its seconds per step; the mean over the second task's
    # windows (not the median) so the rare meta-update steps are counted
    tokens_per_step = cfg["training"]["batch_size"] * cfg["training"]["seq_len"]
    per_step = [tokens_per_step / x["tokens_per_second"] for x in second[1:]]  # skip the task switch
    return sum(per_step) / len(per_step), summary


def add_run_args(ap) -> None:
    """The model/data arguments every step-time benchmark shares."""
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=float, default=1.5e5, help="new tokens per task (2 tasks)")
    ap.add_argument("--repeats", type=int, default=3)


def workdir() -> Path:
    os.environ.setdefault("CPT_CACHE", str(Path(tempfile.gettempdir()) / "cpt-bench-cache"))
    return Path(tempfile.mkdtemp(prefix="cpt-bench-"))
