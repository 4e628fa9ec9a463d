"""Starting a run: validate, prepare the run directory, then train, resume or restart from scratch.

`train(config, out)` is the Python API behind `cpt train` (and `cpt.train`). The order matters for
users: the config is validated, the data prepared and the model built before the run directory is
touched, so bad input fails with one line and nothing written. A new run gets an id and a marker
(`run.json`) recording each task's source content hash and the tokenizer's fingerprint; `--resume`
uses the run's own saved config, refuses data that changed, and loads the newest checkpoint that
verifies on every rank (each rank checking its own files, `checkpoint.load_latest`) — or, when none does,
starts again from step 0 with the replay buffer as it was then.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from transformers.utils import logging as hf_logging

from cpt import atomic
from cpt.config import RunConfig, dump_config, load_config
from cpt.data.tokens import token_dtype
from cpt.errors import CptError
from cpt.replay import ownership
from cpt.training import checkpoint as ckpt
from cpt.training import distributed
from cpt.training.loop import Run
from cpt.training.rundir import MARKER, prepare_run_dir, read_marker

__all__ = ["MARKER", "train"]


def train(
    config: RunConfig | str | Path | None,
    out: str | Path,
    *,
    overrides: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Run (or resume) a continual pre-training run; returns the summary (also in out/summary.json)."""
    out = Path(out)
    hf_logging.disable_progress_bar()  # save_pretrained draws a bar per checkpoint; ours are enough
    if not resume:  # validate before touching the run directory
        if isinstance(config, RunConfig):
            cfg = config
        elif config is None:
            raise CptError("a config file is required (or --resume RUN_DIR)")
        else:
            cfg = load_config(config, overrides)
    prepare_run_dir(out, resume, overwrite, check_only=True)
    marker: dict = {}
    if resume:
        # the run's own saved config wins: a resumed run must be the same run
        cfg = load_config(out / "config.yaml")
        marker = read_marker(out)
        offset = marker.get("replay_task_offset", 0)
    else:
        offset = ownership.init_task_offset(cfg)
    run = Run(cfg, out, resume=resume, replay_task_offset=offset)  # data and model first: bad input fails before any write
    if resume:
        _check_same_data(run, marker, out)
        run.run_id = marker.get("run_id")
    else:
        run.run_id = distributed.broadcast_object(uuid.uuid4().hex)  # every rank's shards name the same owner
    ownership.check_buffers(cfg, out, run.run_id, resume, run.world, token_dtype(run.tokenizer.vocab_size).name, run.log)
    if not run.is_main:
        distributed.barrier()  # rank 0 prepares the run directory
        return _run_and_close(run, out, resume)
    prepare_run_dir(out, resume, overwrite)
    if not resume:
        atomic.write_text(out / "config.yaml", dump_config(cfg))
        marker = {
            "cpt": 1,
            "run_id": run.run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "replay_task_offset": offset,
            # what a resume must find again: each task's source content and the tokenizer
            "sources": {t.name: key for t, key in zip(cfg.tasks, run.source_keys)},
            "tokenizer": run.tokenizer.fingerprint,
        }
        atomic.write_json(out / MARKER, marker, indent=1)
    distributed.barrier()
    return _run_and_close(run, out, resume)


def _check_same_data(run: Run, marker: dict, out: Path) -> None:
    """A resumed run must train on the data it started with (runs made before fingerprints were kept are not checked)."""
    sources = marker.get("sources") or {}
    for i, (t, key) in enumerate(zip(run.cfg.tasks, run.source_keys)):
        if t.name in sources and sources[t.name] != key:
            raise CptError(
                f"tasks.{i} ({t.name}): {t.path or [src.path for src in t.sources]} changed since {out} started (its content hash differs); restore the original data or start a new run"
            )
    if marker.get("tokenizer") and marker["tokenizer"] != run.tokenizer.fingerprint:
        raise CptError(f"tokenizer: {run.tokenizer.source} is not the tokenizer {out} started with; restore it or start a new run")


def _run_and_close(run: Run, out: Path, resume: bool) -> dict:
    found = None
    if resume:
        # collective: rank 0's list, each rank verifies its own files, all take the same checkpoint
        found = ckpt.load_latest(out / "checkpoints", run.log, run.rank, run.world, run.checkpointer.group)
        if found is None:
            if (out / "summary.json").is_file():
                raise CptError(f"{out}: the run already finished (summary.json exists)")
            run.log(f"{out}: no usable checkpoint; starting the run from the beginning (the replay buffer as at step 0)")
            if run.is_main:
                (out / "metrics.jsonl").unlink(missing_ok=True)
            run.resume = False  # the buffer too starts as it was at step 0, not as the killed run left it
    try:
        return run.run(found)
    finally:
        run.parallel.close()
        distributed.shutdown()
