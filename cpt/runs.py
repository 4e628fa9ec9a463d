"""Several runs one after another (`cpt demo`, `cpt sweep`), and the columns their results tables share.

`run_all(runs)` takes (name, run directory, config) triples and, in order, for each run:

- `summary.json` present: finished earlier; skipped, and its summary read back;
- the run marker present but no summary: interrupted; resumed from its latest checkpoint with the
  config saved in its directory (the given one is not used);
- otherwise: trained from the given config (into a fresh directory, or over an old one with
  `overwrite`, which also re-trains finished and interrupted runs).

It returns ({name: summary} of the runs that have one, [names of the runs that failed]). A
CptError in one run stops the loop, unless `continue_on_error`: then it is printed, the run is
named in the failures and the next run starts; the caller writes its table and report from the
runs that finished and then reports the failures. Progress goes to stderr, one line per run.

The columns: a `Column` says which row key a table shows, under which header and how a value is
written (None is a dash everywhere). `METRICS` are the loss-matrix metrics (lower is better) in
the order every table shows them, and `WALL` the run's wall time; the demo's table, `sweep.md`
and the `cpt report` summary table take them from here. The report bolds the best value, so it
hands its renderer the numbers (which it writes with the same 3 decimals) and uses each metric's
`long` header, the name its "How to read this" text gives the metric. `main_metric` picks the
metric those tables show for each lm-eval benchmark of a run's downstream scores (`cpt report` and
`cpt eval --lm-eval` both; it is here so that the report does not import cpt.downstream, and torch).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt.config import RunConfig
from cpt.errors import CptError


def decimals(v: float) -> str:
    return f"{v:.3f}"


def count(v: float) -> str:
    return f"{int(v):,}"


def seconds(v: float) -> str:
    return f"{v:.0f}"


@dataclass(frozen=True)
class Column:
    key: str  # in the row (a run's summary, or a sweep row)
    header: str  # in the demo's table and sweep.md; sweep.csv heads its columns with `key`
    show: Callable[[Any], str] = str
    long: str = ""  # the report's header (set for METRICS)

    def cell(self, row: dict) -> str:
        v = row.get(self.key)
        return "—" if v is None else self.show(v)


METRICS = [
    Column("forgetting_score", "forgetting", decimals, "forgetting"),
    Column("retained_loss", "retained", decimals, "retained loss"),
    Column("learned_loss", "learned", decimals, "learned loss"),
    Column("avg_final_loss", "avg final", decimals, "avg final loss"),
    Column("bwt", "BWT", decimals, "BWT"),
]
WALL = Column("wall_seconds", "wall s", seconds)

#: per benchmark, the metric a table shows first (the first of these the results have)
MAIN_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "bleu", "word_perplexity")
#: what each score entry records besides metrics: examples scored, few-shot examples used
NOT_METRICS = ("samples", "num_fewshot")


def main_metric(scores: dict[str, float]) -> str | None:
    """The metric shown for one benchmark's downstream scores (summary.json `downstream`, written by cpt.downstream)."""
    for m in MAIN_METRICS:
        if m in scores:
            return m
    return next((k for k in scores if not k.endswith("_stderr") and k not in NOT_METRICS), None)


def markdown_table(rows: list[dict], columns: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.cell(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def read_summary(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CptError(f"{path}: not valid JSON (delete the run directory to re-run it)") from None


def run_all(
    runs: Sequence[tuple[str, Path, RunConfig]], *, overwrite: bool = False, continue_on_error: bool = False, what: str = "runs"
) -> tuple[dict[str, dict], list[str]]:
    """Skip, resume or train each run in order (see the module docstring); `what` names the batch
    in the progress lines ("demo", "sweep")."""
    # why lazy: the training loop imports torch; `cpt report`, which reads the columns above, must not
    from cpt.training.launch import MARKER, train

    summaries: dict[str, dict] = {}
    failed: list[str] = []
    t0 = time.perf_counter()
    for i, (name, run_dir, config) in enumerate(runs, 1):
        print(f"== [{i}/{len(runs)}] {name} ({time.perf_counter() - t0:.0f}s into the {what}) ==", file=sys.stderr, flush=True)
        try:
            if (run_dir / "summary.json").is_file() and not overwrite:
                print(f"{run_dir}: finished earlier; skipped (--overwrite re-runs it)", file=sys.stderr)
                summaries[name] = read_summary(run_dir / "summary.json")
                continue
            resume = (run_dir / MARKER).is_file() and not overwrite
            summaries[name] = train(None if resume else config, run_dir, resume=resume, overwrite=overwrite)
        except CptError as err:
            if not continue_on_error:
                raise
            print(f"cpt: error: {name}: {err}", file=sys.stderr)  # one bad run does not lose the others
            failed.append(name)
    return summaries, failed
