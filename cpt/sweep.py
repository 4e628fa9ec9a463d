"""`cpt sweep SWEEP.yaml`: a grid of ordinary runs (model size × replay rate × alignment × seed …).

A sweep file names a base run config and a grid of dotted keys, one run per combination:

    name: sweep-tiny
    base: tiny.yaml                # a run config (relative to this file), or `bundled` (the demo's
                                   # five languages and settings)
    set:                           # dotted overrides for every run (optional)
      tasks.0.tokens: 2.0e4
    grid:                          # dotted key -> values; the runs are the cartesian product
      model.preset: [tiny, small]
      replay.rate: [0.0, 0.25]
      seed: [0, 1]

Every run is a normal run directory `OUT/runs/<name>` named from its grid values, with its own
replay buffer: a `replay.buffer.dir` of the base config becomes `<dir>/<name>` for each run (runs
that should start from the same kept buffer set `replay.buffer.init`, which each run copies). Calling the
sweep again skips finished runs, resumes interrupted ones (from their latest checkpoint) and
refuses a run directory whose saved config differs from the sweep's (pass --overwrite). After
the runs, `OUT/sweep.csv` and `OUT/sweep.md` hold one row per run, and `OUT/scaling/` the scaling
report (cpt.report.scaling): loss and forgetting against training FLOPs and the verdict.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt import atomic
from cpt.config import RunConfig, apply_override, dump_config, parse_override, read_yaml_mapping, resolve_paths, validate
from cpt.demo import demo_config
from cpt.errors import CptError
from cpt.report.scaling import write_scaling_report
from cpt.runs import METRICS, WALL, Column, count, markdown_table, read_summary, run_all

SWEEP_KEYS = {"name", "base", "set", "grid"}


@dataclass
class SweepRun:
    name: str
    values: dict[str, Any]  # grid key -> value
    config: RunConfig


@dataclass
class Sweep:
    name: str
    path: Path
    grid: dict[str, list]
    runs: list[SweepRun]


def _label(key: str, value: Any) -> str:
    short = key.split(".")[-1]
    text = str(value).replace("/", "-")
    return f"{short}-{text}"


def _base_config(base: Any, sweep_path: Path) -> dict:
    if base == "bundled":
        cfg = demo_config("sequential")
        cfg.pop("name", None)
        return cfg
    if isinstance(base, dict):
        return resolve_paths(copy.deepcopy(base), sweep_path.parent.resolve())
    if not isinstance(base, str):
        raise CptError(f"{sweep_path}: base: expected a run config file, `bundled`, or a mapping")
    path = (sweep_path.parent / base).resolve()
    data = read_yaml_mapping(path, f"base config (named by {sweep_path})", "a mapping of sections at the top level")
    data.pop("name", None)
    return resolve_paths(data, path.parent)


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file and every run config it expands to (nothing is written)."""
    path = Path(path)
    data = read_yaml_mapping(path, "sweep file", "a mapping with base and grid")
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise CptError(f"{path}: {unknown[0]}: unknown key (a sweep has {', '.join(sorted(SWEEP_KEYS))})")
    if "base" not in data:
        raise CptError(f"{path}: base: missing (a run config file, or `bundled`)")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        raise CptError(f"{path}: grid: expected a mapping of dotted keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise CptError(f"{path}: grid.{key}: expected a non-empty list of values")
    overrides = data.get("set") or {}
    if not isinstance(overrides, dict):
        raise CptError(f"{path}: set: expected a mapping of dotted keys to values")
    base = _base_config(data["base"], path)
    for key, value in overrides.items():
        apply_override(base, *_parsed(key, value))
    runs = []
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        cfg = copy.deepcopy(base)
        for key, value in values.items():
            apply_override(cfg, *_parsed(key, value))
        name = "_".join(_label(k, v) for k, v in values.items())
        cfg["name"] = name
        buffer = (cfg.get("replay") or {}).get("buffer") if isinstance(cfg.get("replay"), dict) else None
        if isinstance(buffer, dict) and buffer.get("dir"):
            # one buffer per run: a shared one would hand each run the rows of the runs before it
            # (to start every run from the same kept rows, set replay.buffer.init: they are copied)
            buffer["dir"] = str(Path(buffer["dir"]) / name)
        runs.append(SweepRun(name, values, validate(cfg, f"{path} (run {name})")))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise CptError(f"{path}: grid: two combinations give the same run name; make the values distinct")
    return Sweep(str(data.get("name") or path.stem), path, grid, runs)


def _parsed(key: str, value: Any) -> tuple[list[str], Any, str]:
    parts, _ = parse_override(f"{key}=")
    if isinstance(value, str):  # "2e6" and friends, as on the command line
        _, value = parse_override(f"{key}={value}")
    return parts, value, f"{key}={value}"


def _same_config(saved: Path, config: RunConfig) -> bool:
    """Whether the config a run directory saved is `config`. Compared after validating it with today's defaults, so a
    key that a later cpt added with its default (one that changes nothing) does not make a finished run a mismatch."""
    text = saved.read_text(encoding="utf-8")
    if text == dump_config(config):
        return True
    try:
        return dump_config(validate(read_yaml_mapping(saved, "config file", "a mapping"), str(saved))) == dump_config(config)
    except CptError:  # a key that no longer exists, a value no longer allowed: not the same config
        return False


def run_sweep(path: str | Path, out: str | Path | None = None, overwrite: bool = False, dry_run: bool = False) -> list[dict]:
    """Run every grid point not finished yet; write the table and the scaling report. Returns the rows."""
    sweep = load_sweep(path)
    out = Path(out) if out else Path("runs") / sweep.name
    runs_dir = out / "runs"
    print(f"sweep {sweep.name}: {len(sweep.runs)} run(s) in {runs_dir}", file=sys.stderr)
    for r in sweep.runs:  # refuse mismatches before training anything
        saved = runs_dir / r.name / "config.yaml"
        if saved.is_file() and not overwrite and not _same_config(saved, r.config):
            raise CptError(
                f"{saved}: this run was made with a different config than {sweep.path} now gives; pass --overwrite or use another --out"
            )
    if dry_run:
        for r in sweep.runs:
            state = "finished" if (runs_dir / r.name / "summary.json").is_file() else "to run"
            print(f"{r.name}\t{state}")
        return []
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "sweep.yaml", sweep.path.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    # one bad grid point (a combination that does not fit, say) does not lose the others
    runs = [(r.name, runs_dir / r.name, r.config) for r in sweep.runs]
    _, failed = run_all(runs, overwrite=overwrite, continue_on_error=True, what="sweep")
    rows = collect(sweep, runs_dir)
    write_tables(rows, out, sweep.grid)
    files = write_scaling_report(rows, out / "scaling", title=f"cpt sweep: {sweep.name}")
    print(f"\nsweep finished in {time.perf_counter() - t0:.0f}s: {len(rows)} run(s) with results", file=sys.stderr)
    print(markdown_table(rows, COLUMNS))
    print(f"\ntable: {out / 'sweep.csv'}\n       {out / 'sweep.md'}\nreport: {files['report.html']}")
    if failed:
        raise CptError(f"{len(failed)} run(s) failed: {', '.join(failed)} (the others are in the table)")
    return rows


#: The columns of sweep.md and sweep.csv: what sets the run apart, its size and compute, its metrics
#: (sweep.csv keeps the raw values, headed by the row keys).
COLUMNS = [
    Column("run", "run"),
    Column("preset", "preset"),
    Column("parameters", "parameters", count),
    Column("replay_rate", "replay rate", lambda v: f"{v:g}"),  # 0.25, not 0.250
    Column("alignment", "alignment"),
    Column("seed", "seed"),
    Column("steps", "steps", count),
    Column("tokens_new", "tokens new", count),
    Column("tokens_replay", "tokens replay", count),
    Column("flops", "training FLOPs", lambda v: f"{v:.3g}"),
    *(c for c in METRICS if c.key != "bwt"),  # no BWT: sweep.csv keeps the columns that scripts read
    WALL,
]


def collect(sweep: Sweep, runs_dir: Path) -> list[dict]:
    """One row per finished run of the sweep (unfinished ones are left out)."""
    rows = []
    for r in sweep.runs:
        f = runs_dir / r.name / "summary.json"
        if not f.is_file():
            continue
        s = read_summary(f)
        cfg = r.config
        rows.append(
            {
                "run": r.name,
                "preset": Path(cfg.model.init).name if cfg.model.init else cfg.model.preset,
                "parameters": s.get("parameters"),
                "replay_rate": cfg.replay.rate,
                "alignment": cfg.alignment.method
                if cfg.alignment.method == "none"
                else f"{cfg.alignment.method} k{cfg.alignment.k} β{cfg.alignment.beta}",
                "seed": cfg.seed,
                "steps": s.get("steps"),
                "tokens_new": s["tokens"]["new"],
                "tokens_replay": s["tokens"]["replay"],
                "flops": (s.get("flops") or {}).get("training"),
                "forgetting_score": s.get("forgetting_score"),
                "retained_loss": s.get("retained_loss"),
                "learned_loss": s.get("learned_loss"),
                "avg_final_loss": s.get("avg_final_loss"),
                "wall_seconds": s.get("wall_seconds"),
                **{f"grid:{k}": v for k, v in r.values.items()},
            }
        )
    return rows


def write_tables(rows: list[dict], out: Path, grid: dict) -> None:
    extra = [f"grid:{k}" for k in grid]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[c.key for c in COLUMNS] + extra, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic.write_text(out / "sweep.csv", buf.getvalue())
    atomic.write_text(out / "sweep.md", markdown_table(rows, COLUMNS) + "\n")
