"""Resumable checkpoints: written whole or not at all, every rank writing and verifying only its own part.

A checkpoint is a directory `checkpoints/step-<N>/`:

    state.pt         rank 0: what all ranks share — {"progress": Progress, "model", "optimizer" (None under
                     FSDP2), <hook name>: hook.state_dict() for every hook without `per_rank`} (Reptile's
                     counters and, unsharded, its anchor; the probe's readers)
    rank-<r>.pt      rank r: its own part — {"rng": its RNG state, <hook name>: hook.state_dict() for every
                     hook with `per_rank`} (the batch source: data positions, drawn replay rows, buffer metadata)
    dcp/             FSDP2 only: torch distributed checkpoint, `__<r>_0.distcp` written by rank r, `.metadata` by rank 0:
                     model, optimizer and the Reptile anchor (DTensors, so they reshard on load)
    manifest.json    rank 0, last: {"layout": 2, "step", "world", "files": {name: sha256}, "ranks": [the
                     files rank r wrote, per rank], "bytes": [per rank], "seconds": the write time}

Every rank writes its files into one staging directory (`.tmp-step-<N>-shards`), hashes and fsyncs only
the files it wrote and sends rank 0 their names, digests and sizes (small strings: no rank reads another's
files, no state is gathered). Rank 0 writes the manifest inside the staging directory and renames it into
place, so a crash or a full disk never leaves a half-written directory under the final name. A rank's
failure to write is agreed: every rank raises the same error and the staging directory is deleted.

On resume (`load_latest`) rank 0's list of checkpoints is broadcast and tried newest first; for each, every
rank checks the checksums of its own files only and loads `state.pt` (memory-mapped) and its own
`rank-<r>.pt` (`torch.load(weights_only=True)`: a checkpoint cannot run code), and the verdicts (small
strings) are gathered, so all ranks take the same checkpoint or skip it together. Checkpoints of the earlier
layout (every rank's state gathered into one `state.pt`, no `layout` in the manifest) are refused with a
message; `cpt export` still reads them (`verify` + `load_state`: one process checks every file).

`checkpoint.async`: the state is copied to host memory (FSDP2: DCP's `async_save` stages it) and written by a
background thread while training goes on; the next save, a preemption and the end of the run wait for it,
and the rename discipline is the same (the thread gathers the digests on a gloo group of its own).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cpt import atomic
from cpt.config import CheckpointConfig
from cpt.errors import CptError
from cpt.training import distributed
from cpt.training.device import rng_state, set_rng_state
from cpt.training.parallel import dcp_extra

LAYOUT = 2  # the manifest's "layout": per-rank files (1, implicit: every rank's state gathered into state.pt)
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_STAGING = re.compile(r"^\.tmp-step-(\d{8})-shards$")
# files a rank other than 0 writes: rank-<r>.pt, a hook's <name>-rank<r>.pt, DCP's __<r>_<i>.distcp
_RANK_OWNED = re.compile(r"(?:rank-?(\d+)\.pt|^__(\d+)_\d+\.distcp)$")


@dataclass
class Progress:
    """How far a run got: the one record of the loop's own counters in a checkpoint."""

    step: int = 0
    loss_matrix: list[list[float]] = field(default_factory=list)
    wall_seconds: float = 0.0  # wall time of this run's earlier processes (before a resume)
    train_seconds: float = 0.0  # inside training steps only
    eval_seconds: float = 0.0  # in held-out evaluations (the step-0 one included)
    checkpoint_seconds: float = 0.0  # training held up by resumable checkpoints (their blocking time)
    nan_skipped: int = 0
    trained_tokens: int = 0  # this rank's
    metrics_offset: int = 0  # metrics.jsonl is truncated to it on resume

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> Progress:
        return cls(**{k: state[k] for k in cls.__dataclass_fields__ if k in state})


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def owner_of(name: str) -> int:
    """The rank that writes checkpoint file `name` (a path relative to the checkpoint): rank 0 unless the name says."""
    m = _RANK_OWNED.search(name.rsplit("/", 1)[-1])
    return int(m.group(1) or m.group(2)) if m else 0


def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def staging_dir(root: Path, step: int) -> Path:
    """Where every rank writes its files before rank 0 renames the checkpoint into place."""
    return root / f".tmp-step-{step:08d}-shards"


def own_files(staged: Path, rank: int) -> dict[str, list]:
    """{name: [sha256, bytes]} of the files `rank` wrote into `staged`, each fsync'ed: the only files it reads."""
    out = {}
    for dirpath, _dirs, names in os.walk(staged):
        for name in names:
            p = Path(dirpath) / name
            rel = p.relative_to(staged).as_posix()
            if rel != "manifest.json" and owner_of(rel) == rank:
                out[rel] = [_sha256(p, fsync=True), p.stat().st_size]
    return out


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]


def _write_error(final: Path, reason: str) -> CptError:
    free = shutil.disk_usage(final.parent).free if final.parent.exists() else 0
    return CptError(
        f"{final}: could not write the checkpoint ({reason}; {free / 2**20:.1f} MiB free on that disk); earlier checkpoints are intact"
    )


def publish(root: Path, step: int, staged: Path, parts: list[dict[str, list]], keep: int, seconds: float) -> Path:
    """Rank 0: the manifest from every rank's {name: [sha256, bytes]}, then the rename into place and the pruning.

    Every rank fsync'ed its own files; here only the directories are (the rename is atomic either way).
    """
    final = root / f"step-{step:08d}"
    files = {name: digest for part in parts for name, (digest, _size) in part.items()}
    manifest = {
        "layout": LAYOUT,
        "step": step,
        "world": len(parts),
        "files": dict(sorted(files.items())),
        "ranks": [sorted(part) for part in parts],
        "bytes": [sum(size for _digest, size in part.values()) for part in parts],
        "seconds": round(seconds, 3),
    }
    with atomic.written_whole(final, tmp=staged, fsync=False) as tmp:
        with open(tmp / "manifest.json", "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        for dirpath, _dirs, _names in os.walk(tmp):
            atomic.fsync_dir(Path(dirpath))
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.iterdir():  # staging directories a killed process left behind
        if _STAGING.match(stale.name) and stale != staged:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def save_checkpoint(root: Path, step: int, state: dict, keep: int) -> Path:
    """One process: write `root/step-<step>` holding `state.pt` atomically, then keep only the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    staged = staging_dir(root, step)
    shutil.rmtree(staged, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        staged.mkdir()
        torch.save(state, staged / "state.pt")
        return publish(root, step, staged, [own_files(staged, 0)], keep, time.perf_counter() - t0)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(staged, ignore_errors=True)
        raise _write_error(root / f"step-{step:08d}", _reason(err)) from None


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def written_by(root: Path) -> int | None:
    """How many ranks wrote the newest checkpoint under `root` (its manifest; not verified), None without one."""
    for directory in reversed(list_checkpoints(root)):
        manifest, problem = _read_manifest(directory)
        if manifest is not None and not problem:
            return int(manifest.get("world", 1))
    return None


def _read_manifest(directory: Path) -> tuple[dict | None, str | None]:
    manifest_file = directory / "manifest.json"
    if not manifest_file.is_file():
        return None, "no manifest.json (incomplete write)"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "manifest.json is corrupt"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, "manifest.json is corrupt"
    return manifest, None


def _check_files(directory: Path, names, digests: dict) -> str | None:
    for name in names:
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digests.get(name):
            return f"{name} does not match its checksum (truncated or corrupted)"
    return None


def verify(directory: Path) -> str | None:
    """None when every file of the checkpoint matches its checksum, else the reason (one process reads them all: `cpt export`)."""
    manifest, problem = _read_manifest(directory)
    return problem or _check_files(directory, manifest["files"], manifest["files"])


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


class Found(NamedTuple):
    """The checkpoint a resume continues from: its directory, the shared `state.pt` and this rank's `rank-<r>.pt`
    (None when the checkpoint was written by another number of ranks: `world` says by how many)."""

    directory: Path
    state: dict
    own: dict | None
    seconds: float = 0.0  # verifying and loading it, on this rank
    world: int = 1  # the number of ranks that wrote it

    @property
    def resharded(self) -> bool:
        return self.own is None


def checked_by(rank: int, world: int, written_by: int) -> list[int]:
    """The writers whose files rank `rank` of `world` verifies on resume: its own, or on another world size the
    writers q ≡ rank (mod world), so every file is checked once and no rank reads more than its share."""
    if world == written_by:
        return [rank]
    return list(range(rank, written_by, world))


def _try(directory: Path, rank: int, world: int) -> tuple[str, str | None, tuple | None]:
    """This rank's verdict on one checkpoint: ("ok" | "skip" | "fatal", reason, (state, own))."""
    manifest, problem = _read_manifest(directory)
    if problem:
        return "skip", problem, None
    if manifest.get("layout") != LAYOUT:
        return (
            "fatal",
            f"{directory}: written by an earlier cpt, whose checkpoints gathered every rank's state into state.pt; "
            f"this version cannot resume it (`cpt export {directory.parent.parent} --checkpoint {directory.name}` still "
            "exports its weights, which a new run can start from with model.init)",
            None,
        )
    written_by = int(manifest.get("world", 1))
    ranks = manifest.get("ranks") or []
    mine = [name for q in checked_by(rank, world, written_by) if q < len(ranks) for name in ranks[q]]
    problem = _check_files(directory, mine, manifest["files"])
    if problem:
        return "skip", problem, None
    try:
        state = load_state(directory / "state.pt", mmap=True)
        own = None
        if written_by == world:
            own = load_state(directory / rank_file(rank), mmap=True) if rank_file(rank) in manifest["files"] else {}
    except CptError as err:
        return "skip", str(err), None
    if own is None and "data" not in state:
        return (
            "fatal",
            f"{directory.parent.parent}: the checkpoint was written by {written_by} process(es) with a cpt that kept each rank's "
            f"data cursor apart; resume with {written_by} (now {world})",
            None,
        )
    return "ok", None, (state, own, written_by)


def load_latest(root: Path, log=print, rank: int = 0, world: int = 1, group=None) -> Found | None:
    """The newest checkpoint whose files verify and load safely on every rank; bad ones are reported in one line each and skipped.

    Collective under torchrun: rank 0's list of checkpoints is broadcast, each rank checks only its own files,
    and the verdicts are gathered, so every rank returns the same checkpoint (or None).
    """
    mine = rank == 0 or not distributed.active()  # without a process group this process lists them itself
    names = distributed.broadcast_object([p.name for p in list_checkpoints(root)] if mine else None)
    for name in reversed(names):
        t0 = time.perf_counter()
        directory = root / name
        kind, reason, loaded = _try(directory, rank, world)
        verdicts = distributed.gather_objects((kind, reason), group)
        fatal = [r for k, r in verdicts if k == "fatal"]
        if fatal:
            raise CptError(fatal[0])
        bad = [(r, why) for r, (k, why) in enumerate(verdicts) if k == "skip"]
        if bad:
            r, why = bad[0]
            log(f"warning: skipping checkpoint {directory}: {f'rank {r}: ' if world > 1 else ''}{why}")
            continue
        state, own, written_by = loaded
        return Found(directory, state, own, time.perf_counter() - t0, written_by)
    return None


def _host_copy(obj, memo: dict):
    """`obj` with every tensor copied to host memory (storages shared between tensors stay shared): a snapshot
    a background thread can write while training changes the originals."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.numel() == 0 or t.layout != torch.strided:
            return t.to("cpu", copy=True)
        storage = t.untyped_storage()
        key = (storage.device, storage.data_ptr())
        if key not in memo:
            memo[key] = storage.cpu() if storage.device.type != "cpu" else storage.clone()
        return torch.empty(0, dtype=t.dtype).set_(memo[key], t.storage_offset(), t.size(), t.stride())
    if isinstance(obj, dict):
        return {k: _host_copy(v, memo) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_host_copy(v, memo) for v in obj)
    return obj


class Checkpointer:
    """When a run saves (every `checkpoint.every` steps and at every task end), what each rank writes, and how long it took.

    The shared state (rank 0's `state.pt`) and each rank's own part (`rank-<r>.pt`) are described in the
    module docstring; a hook with `per_rank` goes into the rank files, the others into `state.pt`, and a hook
    with `save_shard` / `load_shard` also writes a file of its own per rank under FSDP2 (Reptile's anchor shard).
    """

    def __init__(self, root: Path, cfg: CheckpointConfig, parallel, optimizer: torch.optim.Optimizer, rank: int, world: int, log=print):
        self.root, self.every, self.keep = root, cfg.every, cfg.keep
        self.parallel, self.optimizer = parallel, optimizer
        self.rank, self.world, self.log = rank, world, log
        self.asynchronous = cfg.async_
        # the background writer's collectives must not interleave with training's on the default group
        self.group = distributed.cpu_group() if self.asynchronous else None  # collective
        self.writes: list[dict] = []  # rank 0: one record per checkpoint written by this process
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None

    def should_save(self, step: int, task_end: bool) -> bool:
        return task_end or bool(self.every and step % self.every == 0)

    def _parts(self, progress: Progress, hooks: list) -> tuple[dict | None, dict]:
        """(the shared state on rank 0, else None; this rank's own part)."""
        own = {"rng": rng_state()}
        shared = None
        if self.rank == 0:
            shared = {
                "progress": progress.state_dict(),
                "model": self.parallel.model_state(),
                "optimizer": self.parallel.optimizer_state(self.optimizer),
            }
        for hook in hooks:
            if getattr(hook, "per_rank", False):
                own[hook.name] = hook.state_dict()
            elif shared is not None:
                shared[hook.name] = hook.state_dict()
        return shared, own

    def save(self, progress: Progress, hooks: list, buffer=None, wait: bool = False) -> None:
        """Collective: write `step-<progress.step>`; with `checkpoint.async` (and not `wait`) the files are written
        in the background and this returns once the state is copied. A previous background write is waited for first.

        Timed from after that wait: the write time (until the rename) is what a preemption needs; the blocking time
        (the wait included) is what training lost."""
        t_wait = time.perf_counter()
        self.wait()
        t0 = time.perf_counter()
        if buffer is not None:
            # the buffer keeps an undo journal per checkpoint so any kept checkpoint can be restored
            # (keep + 1: the kept ones and the one being written)
            buffer.flush(keep_journals=self.keep + 1)
        step = progress.step
        staged = staging_dir(self.root, step)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir()
        distributed.barrier()
        shared, own = self._parts(progress, hooks)
        if not self.asynchronous or wait:
            self._complete(step, staged, shared, own, t0, None, hooks=hooks)
            return
        shared, own = _host_copy(shared, {}), _host_copy(own, {})
        shards = None
        if self.parallel.sharded:
            shards = distributed.save_sharded(
                self.parallel.model, self.optimizer, staged / "dcp", group=self.group, asynchronous=True, extra=dcp_extra(hooks)
            )
        blocking = time.perf_counter() - t_wait
        self._pending = threading.Thread(
            target=self._background, args=(step, staged, shared, own, t0, blocking, shards), name="cpt-checkpoint", daemon=True
        )
        self._pending.start()

    def _background(self, *args) -> None:
        try:
            self._complete(*args)
        except BaseException as err:  # re-raised in the main thread by wait()
            self._error = err

    def _complete(self, step, staged, shared, own, t0, blocking, shards=None, hooks=None) -> None:
        """Write this rank's files, hash them, agree with every rank, and (rank 0) publish the checkpoint."""
        final = self.root / f"step-{step:08d}"
        part, problem = {}, None
        try:  # any failure is reported to every rank below, so none is left waiting
            if hooks is not None:  # synchronous: the shards are written here
                if self.parallel.sharded:
                    distributed.save_sharded(self.parallel.model, self.optimizer, staged / "dcp", group=self.group, extra=dcp_extra(hooks))
            if shards is not None:
                shards.result()
            if shared is not None:
                torch.save(shared, staged / "state.pt")
            torch.save(own, staged / rank_file(self.rank))
            part = own_files(staged, self.rank)
        except Exception as err:
            problem = _reason(err)
        parts = distributed.gather_objects((part, problem), self.group)
        failed = [(r, why) for r, (_part, why) in enumerate(parts) if why]
        if self.rank == 0 and not failed:
            try:
                publish(self.root, step, staged, [p for p, _why in parts], self.keep, time.perf_counter() - t0)
            except OSError as err:
                failed = [(0, _reason(err))]
        failed = distributed.gather_objects(failed if self.rank == 0 else None, self.group)[0]
        if failed:
            if self.rank == 0:
                shutil.rmtree(staged, ignore_errors=True)
            r, why = failed[0]
            raise _write_error(final, f"rank {r}: {why}" if self.world > 1 else why)
        if self.rank == 0:
            self._record(final.name, [p for p, _why in parts], time.perf_counter() - t0, blocking)

    def _record(self, name: str, parts: list[dict], seconds: float, blocking: float | None) -> None:
        per_rank = [sum(size for _digest, size in part.values()) for part in parts]
        self.writes.append({"seconds": seconds, "blocking_seconds": seconds if blocking is None else blocking, "bytes": sum(per_rank)})
        line = f"checkpoint {name}: {sum(per_rank) / 2**20:.1f} MiB written in {seconds:.2f}s"
        if len(per_rank) > 1:
            line += f" ({max(per_rank) / 2**20:.1f} MiB by the busiest rank)"
        if blocking is not None:
            line += f"; training held up {blocking:.2f}s (checkpoint.async: the copy, and any wait for the previous write)"
        self.log(line)

    def wait(self) -> None:
        """Block until a background write finished; its error, if any, is raised here (on every rank alike)."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        """`wait` on the way out of a failed run: a write error is logged, not raised over the run's own error."""
        try:
            self.wait()
        except Exception as err:
            self.log(f"warning: the last checkpoint was not written: {err}")

    def summary(self) -> dict:
        """The write times of this process's checkpoints (rank 0), to size a preemption grace period with."""
        secs = [w["seconds"] for w in self.writes]
        blocking = [w["blocking_seconds"] for w in self.writes]
        return {
            "written": len(secs),
            "async": self.asynchronous,
            "write_seconds": {"last": secs[-1], "median": statistics.median(secs), "max": max(secs)} if secs else None,
            "blocking_seconds": {"last": blocking[-1], "median": statistics.median(blocking)} if secs else None,
            "bytes": self.writes[-1]["bytes"] if secs else None,
        }

    def load(self, found: Found, hooks: list) -> Progress:
        """Restore every part from a checkpoint `load_latest` chose; returns the progress to continue from.

        Written by another number of ranks (`found.resharded`): model, optimizer and the Reptile anchor are
        resharded (`parallel.load`), the shared parts load as always, and each hook with a per-rank state
        continues without it (`load_resharded`: the batch source's cursors are in the shared part, its buffer
        shard was remapped); this rank's torch RNG is seeded from (step, rank)."""
        state, own, directory = found.state, found.own, found.directory
        if own == {}:
            raise CptError(f"{directory}: it holds no {rank_file(self.rank)}; not a resumable checkpoint of this cpt")
        progress = Progress.from_state(state["progress"])
        self.parallel.load(self.optimizer, state, directory, hooks)
        for hook in hooks:
            per_rank = getattr(hook, "per_rank", False)
            if per_rank and found.resharded:
                if hasattr(hook, "load_resharded"):
                    hook.load_resharded()
                continue
            part = own.get(hook.name) if per_rank else state.get(hook.name)
            if hasattr(hook, "load_shard") and self.parallel.sharded and (directory / f"anchor-rank{self.rank}.pt").is_file():
                hook.load_shard(part, directory, self.rank, load_state)  # an FSDP2 checkpoint of an earlier cpt
            else:
                hook.load_state_dict(part)
        if found.resharded:
            torch.manual_seed(int(np.random.SeedSequence([progress.step, self.rank, 0xC0FFEE]).generate_state(1)[0]))
        else:
            set_rng_state(own["rng"])
        return progress
