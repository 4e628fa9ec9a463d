"""`cpt release RUN --steps N`: an annealed copy of a finished run, while the run itself stays un-annealed.

An open-ended run (`infinite` without anneal, `constant`) never has to know its length, but the weights one
ships are better after a short decay of the learning rate (Ibrahim et al. 2024). A release is that decay
applied to a copy: RUN is extended (cpt.training.extend, so RUN is only read) by one more task that continues
its last task's data for N optimizer steps (replay, Reptile and the rest as in RUN), with the LR annealing
exponentially from the last step's value to `schedule.min_lr` (`schedule.anneal_at` / `anneal_steps`). What
is kept in `RUN/releases/step-<T>-anneal-<N>/` (or `--out`): the HF checkpoint `checkpoints/final` (the
release), `summary.json` (its loss matrix has one more row: every task's held-out loss after the anneal) and
`metrics.jsonl`; the resumable checkpoints and the buffer copy are deleted. RUN can be extended later as if
no release had been made.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import yaml

from cpt.config import load_config
from cpt.errors import CptError
from cpt.training import checkpoint as ckpt
from cpt.training.rundir import read_marker

ANNEAL_KEYS = ("schedule.anneal_at", "schedule.anneal_steps")


def release(run_dir: str | Path, steps: int, out: str | Path | None = None, overwrite: bool = False, log=print) -> dict:
    """Write the annealed release of the finished run `run_dir` and return its summary (see the module)."""
    from cpt.training.extend import plan_of
    from cpt.training.launch import train

    run_dir = Path(run_dir)
    if steps < 1:
        raise CptError(f"--steps {steps}: a release anneals for at least one step")
    if not (run_dir / "summary.json").is_file():
        raise CptError(f"{run_dir}: not a finished cpt run (no summary.json); resume it first")
    cfg = load_config(run_dir / "config.yaml")
    marker = read_marker(run_dir)
    world = int(marker.get("world") or ckpt.written_by(run_dir / "checkpoints") or 1)
    plan = plan_of(cfg, world, int(marker.get("replay_task_offset", 0)))
    last = cfg.tasks[-1].model_dump(mode="json", by_alias=True, exclude_none=True)
    # new tokens such that the release task takes exactly `steps` steps: B·S − ⌊α·B·S⌋ new rows of seq_len tokens
    rows = plan.rows_per_step * steps - math.floor(cfg.replay.rate * plan.rows_per_step * steps + 1e-9)
    task = {**last, "name": f"{last['name']}-release", "tokens": rows * cfg.training.seq_len}
    out = Path(out) if out else run_dir / "releases" / f"step-{plan.total_steps:08d}-anneal-{steps}"
    more = {"tasks": [task], "schedule": {"anneal_at": plan.total_steps, "anneal_steps": steps}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "release.yaml"
        path.write_text(yaml.safe_dump(more))
        log(f"release: annealing a copy of {run_dir} for {steps} steps on {last['name']}'s data into {out}")
        summary = train(str(path), out, extend=run_dir, overwrite=overwrite, allow=ANNEAL_KEYS)
    for part in [*ckpt.list_checkpoints(out / "checkpoints"), *(out / "checkpoints").glob("task-*"), out / "replay"]:
        shutil.rmtree(part, ignore_errors=True)
    log(f"release: {out / 'checkpoints' / 'final'} (losses after the anneal: {summary['loss_matrix'][-1]})")
    return summary
