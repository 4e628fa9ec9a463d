"""Resumable checkpoints: written whole or not at all, verified before use.

A checkpoint is a directory `checkpoints/step-<N>/` holding `state.pt` — a registry of the run's
stateful parts, `{"progress": Progress, "model": …, "optimizer": …, "rngs": [per rank], <hook
name>: hook.state_dict() …}` (the batch source's state per rank: data positions, drawn replay
rows, buffer metadata; Reptile's anchor and counters; the probe's readers) — and
`manifest.json` with a sha256 per file. Under FSDP2 the model and optimizer shards are in
`dcp/` (torch distributed checkpoint, one file per rank) and each rank's Reptile anchor shard in
`anchor-rank<r>.pt`; the manifest covers them too. It is written under a temporary name and renamed into
place, so a crash or a full disk never leaves a half-written directory under the final name; on
resume a checkpoint whose files do not match their checksums is reported and the previous good
one is used.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cpt import atomic
from cpt.config import CheckpointConfig
from cpt.errors import CptError
from cpt.training import distributed
from cpt.training.device import rng_state, set_rng_state

_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class Progress:
    """How far a run got: the one record of the loop's own counters in a checkpoint."""

    step: int = 0
    loss_matrix: list[list[float]] = field(default_factory=list)
    wall_seconds: float = 0.0  # wall time of this run's earlier processes (before a resume)
    train_seconds: float = 0.0  # inside training steps only
    nan_skipped: int = 0
    trained_tokens: int = 0  # this rank's
    metrics_offset: int = 0  # metrics.jsonl is truncated to it on resume

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> Progress:
        return cls(**{k: state[k] for k in cls.__dataclass_fields__ if k in state})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def staging_dir(root: Path, step: int) -> Path:
    """Where every rank of an FSDP2 run writes its shards before rank 0 renames the checkpoint into place."""
    return root / f".tmp-step-{step:08d}-shards"


def save_checkpoint(root: Path, step: int, state: dict, keep: int, staged: Path | None = None) -> Path:
    """Write `root/step-<step>` atomically, then delete all but the newest `keep`.

    `staged`: a staging directory other ranks already wrote files into (sharded model and optimizer
    state, per-rank anchors); they join the checkpoint and its manifest.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    try:
        # filled under a hidden temporary name (or the ranks' staging directory), every file fsync'ed,
        # then renamed: `final` is the whole checkpoint or the previous one of that step, never a part
        with atomic.written_whole(final, tmp=staged) as tmp:
            torch.save(state, tmp / "state.pt")
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {"step": step, "files": {p.relative_to(tmp).as_posix(): _sha256(p) for p in files}}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))  # inside the temporary: renamed with it
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        free = shutil.disk_usage(root).free
        raise CptError(
            f"{final}: could not write the checkpoint ({reason}; {free / 2**20:.1f} MiB free on that disk); earlier checkpoints are intact"
        ) from None
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def verify(directory: Path) -> str | None:
    """None when every file matches its checksum, else the reason."""
    manifest_file = directory / "manifest.json"
    if not manifest_file.is_file():
        return "no manifest.json (incomplete write)"
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError:
        return "manifest.json is corrupt"
    for name, digest in manifest.get("files", {}).items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum (truncated or corrupted)"
    return None


def _legacy_numpy_globals() -> list:
    """What an int64 numpy array needs to unpickle: the `ready` replay rows of checkpoints written before
    they were stored as tensors. Only the int64 dtype's state is accepted, so no other numpy object loads."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return [
        (reconstruct, "numpy._core.multiarray._reconstruct"),  # written with numpy 2
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # written with numpy 1
        np.ndarray,
        np.dtype,
        type(np.dtype(np.int64)),  # numpy.dtypes.Int64DType: BUILD of any other dtype is refused
    ]


def _load_problem(err: Exception) -> str:
    """One line out of torch.load's several: what the weights-only unpickler refused, or the first line."""
    text = str(err)
    why = "(cpt loads checkpoints with torch.load(weights_only=True), so a checkpoint cannot run code)"
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return f"refused: it holds a pickled {m.group(1)}, not only tensors and plain Python values {why}"
    if "WeightsUnpickler error:" in text:  # torch's detail may be on the lines after the colon
        rest = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines()]
        detail = next((line for line in rest if line), "an object that is not a tensor or a plain Python value")
        return f"refused: {detail} {why}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"cannot be read: {lines[0] if lines else type(err).__name__}"


def load_state(path: Path, mmap: bool = False):
    """`torch.load(path, weights_only=True)` on CPU: tensors and plain Python values only, so a state file
    from an untrusted run directory cannot run code. Anything else is a one-line CptError naming the file."""
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # UnpicklingError, RuntimeError (not a zip), OSError, ...: the file is the problem
        raise CptError(f"{path}: {_load_problem(err)}") from None


def load_latest(root: Path, log=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies and loads safely; bad ones are reported in one line each and skipped."""
    for directory in reversed(list_checkpoints(root)):
        problem = verify(directory)
        if problem:
            log(f"warning: skipping checkpoint {directory}: {problem}")
            continue
        try:
            return directory, load_state(directory / "state.pt")
        except CptError as err:
            log(f"warning: skipping checkpoint {directory}: {err}")
    return None


class Checkpointer:
    """When a run saves (every `checkpoint.every` steps and at every task end) and what a checkpoint holds.

    The state is a registry of the run's stateful parts: {"progress": Progress, "model", "optimizer"
    (None under FSDP2: their shards are in dcp/), "rngs": [one per rank], <hook name>: the hook's
    state_dict() (a list, one per rank, for hooks with `per_rank`)}. A hook with `save_shard` /
    `load_shard` also writes a per-rank file under FSDP2 (Reptile's anchor shard).
    """

    def __init__(self, root: Path, cfg: CheckpointConfig, parallel, optimizer: torch.optim.Optimizer, rank: int, world: int):
        self.root, self.every, self.keep = root, cfg.every, cfg.keep
        self.parallel, self.optimizer = parallel, optimizer
        self.rank, self.world = rank, world

    def should_save(self, step: int, task_end: bool) -> bool:
        return task_end or bool(self.every and step % self.every == 0)

    def state_dict(self, progress: Progress, hooks: list) -> dict:
        """Collective: every rank takes part (per-rank parts are gathered)."""
        state = {
            "progress": progress.state_dict(),
            "model": self.parallel.model_state(),
            "optimizer": self.parallel.optimizer_state(self.optimizer),
            "rngs": distributed.gather_to_all(rng_state()),
        }
        for hook in hooks:
            part = hook.state_dict()
            state[hook.name] = distributed.gather_to_all(part) if getattr(hook, "per_rank", False) else part
        return state

    def save(self, progress: Progress, hooks: list, buffer=None) -> None:
        """Collective: write `step-<progress.step>` (rank 0 renames it into place once every rank wrote its files)."""
        if buffer is not None:
            # the buffer keeps an undo journal per checkpoint so any kept checkpoint can be restored
            buffer.flush(keep_journals=self.keep + 1)
        staged = None
        if self.parallel.sharded:
            staged = staging_dir(self.root, progress.step)
            if self.rank == 0:
                shutil.rmtree(staged, ignore_errors=True)
                staged.mkdir(parents=True)
            distributed.barrier()
            self.parallel.save_shards(self.optimizer, staged)  # collective
            for hook in hooks:
                if hasattr(hook, "save_shard"):
                    hook.save_shard(staged, self.rank)
            distributed.barrier()
        state = self.state_dict(progress, hooks)
        if self.rank == 0:
            save_checkpoint(self.root, progress.step, state, self.keep, staged=staged)
        distributed.barrier()

    def load(self, state: dict, directory: Path, hooks: list) -> Progress:
        """Restore every part from `state` (read from `directory`); returns the progress to continue from."""
        if len(state["rngs"]) != self.world:
            raise CptError(
                f"{directory.parent.parent}: the checkpoint was written by {len(state['rngs'])} process(es); "
                f"resume with the same number (now {self.world})"
            )
        self.parallel.load(self.optimizer, state, directory)
        for hook in hooks:
            part = state.get(hook.name)
            part = part[self.rank] if getattr(hook, "per_rank", False) and part is not None else part
            if hasattr(hook, "load_shard") and self.parallel.sharded:
                hook.load_shard(part, directory, self.rank, load_state)
            else:
                hook.load_state_dict(part)
        set_rng_state(state["rngs"][self.rank])
        return Progress.from_state(state["progress"])
