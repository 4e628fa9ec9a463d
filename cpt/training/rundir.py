"""The run directory: what makes a directory a cpt run, when it may be written, and reading one back.

    RUN_DIR/run.json           the marker: run id, creation time, replay-task offset, the data's fingerprints
    RUN_DIR/config.yaml        the resolved config (a resumed run uses it, not the file it started from)
    RUN_DIR/metrics.jsonl      train / eval / probe / meta_update lines
    RUN_DIR/summary.json       the loss matrix and its metrics (cpt.evaluate)
    RUN_DIR/checkpoints/       step-N/ (resumable), task-<i>-<name>/ and final/ (HF format)
    RUN_DIR/replay/            the replay buffer shard(s), unless replay.buffer.dir is set

`prepare_run_dir` refuses to mix two runs in one directory unless told to resume or overwrite;
`open_run` is how everything that reads a finished or running run (eval, export, downstream) gets
its config and checkpoints.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cpt.config import RunConfig, load_config
from cpt.errors import CptError
from cpt.training.checkpoint import list_checkpoints

MARKER = "run.json"


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, check_only: bool = False) -> None:
    """Refuse to mix two runs in one directory unless told to resume or overwrite."""
    if out.exists() and not out.is_dir():
        raise CptError(f"{out}: exists and is not a directory")
    if resume:
        if not (out / MARKER).is_file():
            raise CptError(f"{out}: not a cpt run directory (no {MARKER}); nothing to resume")
        return
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            what = "another cpt run" if (out / MARKER).is_file() else "other files"
            raise CptError(f"{out}: already holds {what}; pass --resume to continue it or --overwrite to replace it")
        if not (out / MARKER).is_file():
            raise CptError(f"{out}: --overwrite only replaces a cpt run directory, and this one holds other files")
        if check_only:
            return
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    if not check_only:
        out.mkdir(parents=True, exist_ok=True)


def read_marker(out: Path) -> dict:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        raise CptError(f"{out / MARKER}: unreadable; not a cpt run directory") from None


@dataclass
class RunDir:
    """A run directory on disk, read-only: its config and its checkpoints in training order."""

    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def config(self) -> RunConfig:
        if not (self.path / "config.yaml").is_file():
            raise CptError(f"{self.path}: not a cpt run directory (no config.yaml)")
        return load_config(self.path / "config.yaml")

    def hf_checkpoints(self) -> list[str]:
        """Names of the HF checkpoints: task ends in task order, then final, then any other."""
        root = self.checkpoints
        if not root.is_dir():
            return []
        tasks = sorted(
            (p.name for p in root.iterdir() if p.name.startswith("task-") and (p / "config.json").is_file()),
            key=lambda n: int(n.split("-")[1]) if n.split("-")[1].isdigit() else 1 << 30,
        )
        hf = tasks + (["final"] if (root / "final" / "config.json").is_file() else [])
        return hf + sorted(p.name for p in root.iterdir() if (p / "config.json").is_file() and p.name not in hf)

    def resumable(self) -> list[Path]:
        """The resumable `step-N` checkpoint directories, oldest first."""
        return list_checkpoints(self.checkpoints)


def open_run(path: str | Path) -> RunDir:
    """A run directory to read (eval, export, downstream); one line if it is not one."""
    path = Path(path)
    if not path.is_dir() or not ((path / "config.yaml").is_file() or (path / "checkpoints").is_dir()):
        raise CptError(f"{path}: not a cpt run directory (no config.yaml, no checkpoints/)")
    return RunDir(path)
