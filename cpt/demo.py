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
and an interrupted one resumed, so the demo can be stopped and restarted. With `--seeds N` (N > 1)
every strategy runs for seeds 0..N−1 into OUT/<strategy>-seed<k>, and the report adds an "Across
seeds" section that says which differences between strategies stand out from seed noise; the
default of one seed keeps the layout OUT/<strategy>.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

from cpt.config import validate
from cpt.errors import CptError
from cpt.report import write_report
from cpt.report.render import to_markdown
from cpt.report.seeds import report_blocks
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


def seeded_runs(strategies: list[str], seeds: int) -> list[tuple[str, str, int]]:
    """(run name, strategy, seed) of every demo run: "<strategy>" with seed 0 for one seed, else "<strategy>-seed<k>" for
    k in 0..seeds−1, seed by seed (every strategy of seed 0, then of seed 1, …), so a demo stopped early has every
    strategy at its first seeds."""
    if seeds < 1:
        raise CptError(f"--seeds: at least 1, got {seeds}")
    if seeds == 1:
        return [(name, name, 0) for name in strategies]
    return [(f"{name}-seed{k}", name, k) for k in range(seeds) for name in strategies]


def run_demo(
    out: Path, quick: bool = False, overwrite: bool = False, strategies: list[str] | None = None, seeds: int = 1
) -> dict[str, dict]:
    planned = seeded_runs(strategies or list(STRATEGIES), seeds)
    for lang in LANGS:
        if not (HANDBOOK / f"{lang}.txt.xz").is_file():
            raise CptError(f"{HANDBOOK / (lang + '.txt.xz')}: bundled corpus file missing (rebuild: python scripts/build_corpus.py)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # one failure stops the demo: its result is the comparison of all the strategies, and a failure
    # of one of these fixed bundled runs (disk, memory) would most likely repeat in the next
    runs = [(run, out / run, validate(_seeded(demo_config(name, quick), run, seed), f"demo:{run}")) for run, name, seed in planned]
    summaries, _ = run_all(runs, overwrite=overwrite, what="demo")
    report = write_report([out / run for run, _, _ in planned], out / "report", title="cpt demo: " + " → ".join(LANGS))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    print(printed_results(planned, summaries, {run: cfg.model_dump(mode="json") for run, _, cfg in runs}))
    print(f"\nreport: {report['report.html']}\n        {report['report.md']}")
    return summaries


def _seeded(cfg: dict, run: str, seed: int) -> dict:
    """`cfg` as the run `run` with seed `seed` (unchanged for the one-seed layout: name = strategy, seed 0)."""
    return {**cfg, "name": run, "seed": seed}


COLUMNS = [
    Column("demo_strategy", "strategy"),  # the demo's name for the run; the summary's own "strategy" is sequential or joint
    *METRICS,
    Column("tokens", "tokens new / replay", lambda t: f"{count(t['new'])} / {count(t['replay'])}"),
    WALL,
]


def printed_results(planned: list[tuple[str, str, int]], summaries: dict[str, dict], configs: dict[str, dict]) -> str:
    """What the demo prints at its end: the results table, one row per run; with several seeds each row names its
    strategy and seed, and the claims judged across the seeds follow (the report's "Across seeds" section)."""
    if len({seed for _, _, seed in planned}) < 2:
        return results_table(summaries)
    out = results_table(summaries, {run: f"{name} (seed {seed})" for run, name, seed in planned})
    blocks = report_blocks([{**s, "run": run, "config": configs.get(run)} for run, s in summaries.items()])
    return out + "\n\n" + "\n".join(to_markdown("", blocks).splitlines()[2:]).rstrip()


def results_table(summaries: dict[str, dict], names: dict[str, str] | None = None) -> str:
    """The Markdown table the README quotes; `names`: what the strategy column says for a run (default: its name)."""
    return markdown_table([{**s, "demo_strategy": (names or {}).get(run, run)} for run, s in summaries.items()], COLUMNS)
