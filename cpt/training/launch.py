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

import sys
import time
import uuid
from pathlib import Path

from transformers.utils import logging as hf_logging

from cpt import atomic
from cpt.config import RunConfig, dump_config, load_config
from cpt.data.tokens import token_dtype
from cpt.errors import CptError
from cpt.replay import ownership
from cpt.replay import sources as replay_sources
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
    extend: str | Path | None = None,
    allow: tuple[str, ...] = (),
) -> dict:
    """Run (or resume) a continual pre-training run; returns the summary (also in out/summary.json).

    `extend`: a finished run that `config` (its new tasks) continues into `out` (cpt.training.extend)."""
    out = Path(out)
    if extend is not None:
        _set_up_extension(config, Path(extend), out, overrides or [], overwrite, allow)
        resume, overrides = True, [o for o in overrides or [] if o.split("=", 1)[0] in RESUME_KEYS]
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
        cfg = load_config(out / "config.yaml", resume_overrides(overrides or []))
        marker = read_marker(out)
        offset = marker.get("replay_task_offset", 0)
        cfg = keep_global_batch(cfg, started_on(out, marker), distributed.world_info()[1], _log_main)
    else:
        offset = replay_sources.task_offset(cfg)  # replay.buffer.init's task ids, then one per replay source
    run = Run(cfg, out, resume=resume, replay_task_offset=offset)  # data and model first: bad input fails before any write
    if resume:
        _check_same_data(run, marker, out)
        run.run_id = marker.get("run_id")
        if marker.get("extended_from"):
            marker = _fill_extension(run, out, marker)
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
            "world": run.world,  # the global batch is batch × accum × this; a resume on other ranks keeps it
            # what a resume must find again: each task's source content and the tokenizer
            "sources": {t.name: key for t, key in zip(cfg.tasks, run.source_keys)},
            "replay_sources": {s.name: key for (_, s), key in zip(replay_sources.proxies(cfg), run.replay_source_keys)},
            "tokenizer": run.tokenizer.fingerprint,
        }
        atomic.write_json(out / MARKER, marker, indent=1)
    distributed.barrier()
    return _run_and_close(run, out, resume)


# what a resume may change: how the run executes, never what it trains (the saved config.yaml stays as it is)
RESUME_KEYS = ("training.parallel", "training.compile", "training.fsdp_init", "training.dist_timeout_s", "checkpoint.async")


def resume_overrides(overrides: list[str]) -> list[str]:
    for item in overrides:
        key = item.split("=", 1)[0]
        if key not in RESUME_KEYS:
            raise CptError(
                f"--resume continues the run with its saved config; {key} cannot change (a resume may set only {', '.join(RESUME_KEYS)})"
            )
    return overrides


def _set_up_extension(config, earlier: Path, out: Path, overrides: list[str], overwrite: bool, allow: tuple[str, ...] = ()) -> None:
    """Rank 0 sets `out` up as the continuation of `earlier` (cpt.training.extend); the other ranks wait for it."""
    from cpt.training import extend
    from cpt.training.build import launch_id

    if config is None:
        raise CptError("--extend needs the config of the new tasks: cpt train MORE.yaml --extend RUN_DIR --out NEW_DIR")
    if isinstance(config, RunConfig):
        raise CptError("--extend reads the new tasks from a config file")
    launch = launch_id().split("|")[0]  # torchrun's run id (or the master's address): the same on every node
    rank = distributed.world_info()[0]
    if rank == 0:
        extend.prepare_extension(earlier, Path(config), out, overrides, overwrite, _log_main, launch, allow)
    else:
        timeout = load_config(earlier / "config.yaml").training.dist_timeout_s
        extend.wait_for_extension(out, launch, timeout)


def _fill_extension(run: Run, out: Path, marker: dict) -> dict:
    """The earlier run's loss-matrix rows get their columns for the new tasks (evaluated once, kept in run.json)."""
    from cpt.training import extend

    info = marker["extended_from"]
    if info.get("filled") is None:
        filled = extend.fill_columns(run, Path(info["run"]), info["tasks"])  # collective
        marker = {
            **marker,
            "extended_from": {**info, "filled": filled},
            "sources": {t.name: key for t, key in zip(run.cfg.tasks, run.source_keys)},
        }
        if run.is_main:
            atomic.write_json(out / MARKER, marker, indent=1)
            run.log(f"extension: the earlier {info['tasks']} row(s) of the loss matrix evaluated on the new tasks")
    run.fill_rows = marker["extended_from"]["filled"]
    run.extended_from = {k: v for k, v in marker["extended_from"].items() if k not in ("filled", "launch")}
    return marker


def _log_main(msg: str) -> None:
    if distributed.world_info()[0] == 0:
        print(msg, file=sys.stderr, flush=True)


def started_on(out: Path, marker: dict) -> int | None:
    """How many ranks the run started on (its marker; for runs made before it was kept, the newest checkpoint's writers)."""
    if marker.get("world"):
        return int(marker["world"])
    return ckpt.written_by(out / "checkpoints")


def keep_global_batch(cfg: RunConfig, started: int | None, world: int, log=print) -> RunConfig:
    """The config a resume on `world` ranks trains with: the global batch the run started with (training.batch_size ×
    grad_accum × `started`) split over `world` ranks — the micro-batch kept where it divides the rows per rank, else the
    largest micro-batch below it that does, the accumulation making up the rest. The saved config.yaml is unchanged."""
    tr = cfg.training
    if not started or started == world:
        return cfg
    total = tr.batch_size * tr.grad_accum * started
    if total % world:
        raise CptError(
            f"training: the run's global batch is {total} sequences ({tr.batch_size} × {tr.grad_accum} × {started} ranks), "
            f"which {world} ranks cannot share evenly; resume on a number of ranks that divides {total}"
        )
    per_rank = total // world
    micro = max(m for m in range(1, min(tr.batch_size, per_rank) + 1) if per_rank % m == 0)
    accum = per_rank // micro
    log(
        f"resuming on {world} rank(s) (started on {started}): the global batch stays {total} sequences — "
        f"{micro} per micro-batch × {accum} micro-batch(es) per rank (was {tr.batch_size} × {tr.grad_accum})"
    )
    return cfg.model_copy(update={"training": tr.model_copy(update={"batch_size": micro, "grad_accum": accum})})


def _check_same_data(run: Run, marker: dict, out: Path) -> None:
    """A resumed run must train on the data it started with (runs made before fingerprints were kept are not checked)."""
    sources = marker.get("sources") or {}
    for i, (t, key) in enumerate(zip(run.cfg.tasks, run.source_keys)):
        if t.name in sources and sources[t.name] != key:
            raise CptError(
                f"tasks.{i} ({t.name}): {t.path or [src.path for src in t.sources]} changed since {out} started (its content hash differs); restore the original data or start a new run"
            )
    kept = marker.get("replay_sources") or {}
    for (k, s), key in zip(replay_sources.proxies(run.cfg), run.replay_source_keys):
        if s.name in kept and kept[s.name] != key:
            raise CptError(
                f"replay.sources.{k} ({s.name}): {s.path} changed since {out} started (its content hash differs); restore the original data or start a new run"
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
