"""`cpt demo`: the paper's experiment in miniature on the bundled corpus, then a comparison report.

Five languages in the paper's order (English → French → German → Arabic → Japanese) from the
Debian Administrator's Handbook, the committed 8k BPE, one model preset, and five strategies with
equal budgets of new tokens per task:

    sequential  tasks in order, nothing kept
    replay      25% of every batch replayed from a buffer of earlier tasks
    mer         replay + Reptile meta-updates (the paper's efficient MER)
    reptile     Reptile alone (no replay)
    joint       all five languages shuffled together (the retrain-on-everything reference)

Each strategy is an ordinary run directory under OUT; a finished one is skipped on a second call
and an interrupted one resumed, so the demo can be stopped and restarted.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

from cpt.config import validate
from cpt.errors import CptError
from cpt.report import write_report
from cpt.runs import METRICS, WALL, Column, count, markdown_table, run_all

HANDBOOK = Path(__file__).resolve().parent / "corpus" / "handbook"
LANGS = ("en", "fr", "de", "ar", "ja")

# The Reptile setting used by `mer` and `reptile`; chosen by the sweep in docs/alignment.md.
REPTILE = {"method": "reptile", "k": 20, "beta": 0.7}

FULL = {
    "tokens": 60_000,
    "model": {"preset": "demo"},
    "training": {"seq_len": 128, "batch_size": 8, "lr": 2e-3, "eval_every": 50, "eval_tokens": 4096, "eval_batch_size": 32},
    "schedule": {"name": "cosine", "warmup": 0.02, "min_lr": 2e-4},
}
QUICK = {
    "tokens": 16_000,
    "model": {"preset": "tiny"},
    "training": {"seq_len": 64, "batch_size": 8, "lr": 3e-3, "eval_every": 10, "eval_tokens": 2048, "eval_batch_size": 32},
    "schedule": {"name": "cosine", "warmup": 0.02, "min_lr": 3e-4},
}

STRATEGIES: dict[str, dict] = {
    "sequential": {},
    "replay": {"replay": {"rate": 0.25}},
    "mer": {"replay": {"rate": 0.25}, "alignment": dict(REPTILE, probe_every=20)},
    "reptile": {"alignment": dict(REPTILE)},
    "joint": {"training": {"strategy": "joint"}},
}


def demo_config(strategy: str, quick: bool = False) -> dict:
    """The full run config of one demo strategy (a plain dict, as a YAML file would give)."""
    scale = QUICK if quick else FULL
    cfg = {
        "name": strategy,
        "seed": 0,
        "tokenizer": {"path": str(HANDBOOK / "tokenizer.json")},
        "tasks": [{"name": lang, "path": str(HANDBOOK / f"{lang}.txt.xz"), "tokens": scale["tokens"]} for lang in LANGS],
        "model": copy.deepcopy(scale["model"]),
        "training": copy.deepcopy(scale["training"]),
        "schedule": copy.deepcopy(scale["schedule"]),
        "checkpoint": {"task_ends": False},
        "logging": {"log_every": 10},
    }
    for section, values in STRATEGIES[strategy].items():
        cfg.setdefault(section, {}).update(copy.deepcopy(values))
    if quick and "alignment" in cfg:
        cfg["alignment"]["k"] = 5
        cfg["alignment"].pop("probe_every", None)
    return cfg


def run_demo(out: Path, quick: bool = False, overwrite: bool = False, strategies: list[str] | None = None) -> dict[str, dict]:
    for lang in LANGS:
        if not (HANDBOOK / f"{lang}.txt.xz").is_file():
            raise CptError(f"{HANDBOOK / (lang + '.txt.xz')}: bundled corpus file missing (rebuild: python scripts/build_corpus.py)")
    names = strategies or list(STRATEGIES)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # one failure stops the demo: its result is the comparison of all the strategies, and a failure
    # of one of these fixed bundled runs (disk, memory) would most likely repeat in the next
    runs = [(name, out / name, validate(demo_config(name, quick), f"demo:{name}")) for name in names]
    summaries, _ = run_all(runs, overwrite=overwrite, what="demo")
    report = write_report([out / n for n in names], out / "report", title="cpt demo: " + " → ".join(LANGS))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    print(results_table(summaries))
    print(f"\nreport: {report['report.html']}\n        {report['report.md']}")
    return summaries


COLUMNS = [
    Column("demo_strategy", "strategy"),  # the demo's name for the run; the summary's own "strategy" is sequential or joint
    *METRICS,
    Column("tokens", "tokens new / replay", lambda t: f"{count(t['new'])} / {count(t['replay'])}"),
    WALL,
]


def results_table(summaries: dict[str, dict]) -> str:
    """The Markdown table the README quotes."""
    return markdown_table([{**s, "demo_strategy": name} for name, s in summaries.items()], COLUMNS)
