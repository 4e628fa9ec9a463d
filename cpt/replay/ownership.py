"""Which run a replay buffer belongs to, and what a run may do with a buffer it finds on disk.

A buffer directory outside the run directory (`replay.buffer.dir`) outlives `--overwrite`, reruns
and the runs of a sweep. Rows left there by another run would be replayed as "earlier tasks" — a
different loss matrix with no error — so every shard's metadata names its owner: the run id (in
`run.json`), the run directory and a fingerprint of the config. The rules, checked before anything
is written:

- a new run (or `--overwrite`, or a restart from scratch) may clear a buffer only when it was left
  by a run in the same run directory; a buffer of any other run is refused with one line;
- a resumed run opens only the buffer its own run id owns;
- starting from another run's rows is explicit: `replay.buffer.init: DIR` copies DIR's shards into
  this run's buffer (DIR is only read) and this run's task ids start after DIR's;
- shards map one to one onto ranks: a kept buffer written by another number of ranks is refused;
- a buffer of references (`replay.buffer.store: refs`) points into its own run's token files, so it
  neither starts from `init` nor serves as another run's `init`.

Capacity is global like every other budget: shard r of W holds ⌊C/W⌋ rows, plus one for r < C mod W.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cpt.config import RunConfig, dump_config
from cpt.errors import CptError
from cpt.replay.buffer import capacity_rows_from, peek


def buffer_dir(cfg: RunConfig, out: Path) -> Path:
    return Path(cfg.replay.buffer.dir) if cfg.replay.buffer.dir else out / "replay"


def config_fingerprint(cfg: RunConfig) -> str:
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]


def owner_record(run_id: str, out: Path, cfg: RunConfig) -> dict:
    return {"run_id": run_id, "run_dir": str(out.resolve()), "config": config_fingerprint(cfg)}


def global_capacity_rows(cfg: RunConfig) -> int | None:
    bc = cfg.replay.buffer
    return capacity_rows_from(bc.capacity, bc.capacity_unit, cfg.training.seq_len + 1)


def shard_capacity(total: int | None, world: int, rank: int) -> int | None:
    """This rank's share of a global capacity in rows (None: keep everything); at least one row."""
    if total is None:
        return None
    share, rest = divmod(total, world)
    return max(1, share + (rank < rest))


def describe(info: dict) -> str:
    owner = info.get("owner") or {}
    who = f"run {owner.get('run_dir')}" if owner else "a run of an older cpt (no owner recorded)"
    store = info.get("store", "rows")
    size = f"{info.get('disk_bytes', 0) / 2**20:.1f} MiB on disk, store {store}"
    return f"{info['fill']} sequences of task ids {info['rows_per_task'] or '{}'} in {info['shards']} shard(s) ({size}), written by {who}"


def check_store(cfg: RunConfig) -> None:
    """`replay.buffer.store: refs` resolves rows in this run's own task files: refused with `replay.buffer.init`."""
    bc = cfg.replay.buffer
    if bc.store == "refs" and bc.init:
        raise CptError(
            "replay.buffer.store: refs cannot start from replay.buffer.init (the rows of another run's tasks cannot be "
            "resolved in this run's token files); use store: rows"
        )


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def init_task_offset(cfg: RunConfig) -> int:
    """How many task ids the buffer at replay.buffer.init holds: this run's task ids start after them."""
    check_store(cfg)
    if cfg.replay.rate <= 0 or not cfg.replay.buffer.init:
        return 0
    info = peek(cfg.replay.buffer.init)
    if info is None:
        raise CptError(f"replay.buffer.init: {cfg.replay.buffer.init} holds no cpt replay buffer (no shard-000.meta.json)")
    return max(info["tasks"], default=-1) + 1


def check_buffers(cfg: RunConfig, out: Path, run_id: str | None, resume: bool, world: int, dtype: str, log=print) -> None:
    """Apply the rules above before the run writes anything (one-line CptError otherwise).

    `run_id`: this run's id (a resumed run's from run.json; None for runs made before ids existed).
    `dtype`: the token dtype of this run's tokenizer (uint16 / uint32).
    """
    rp = cfg.replay
    check_store(cfg)
    if rp.rate <= 0:
        return
    directory = buffer_dir(cfg, out)
    mine = peek(directory, all_shards=False)  # every rank checks: shard 0's owner is the buffer's
    if resume:
        owner = (mine or {}).get("owner") or {}
        if mine is not None and run_id is not None and owner.get("run_id") not in (None, run_id):
            raise CptError(
                f"replay.buffer.dir: {directory} now holds the buffer of another run ({describe(peek(directory))}); "
                f"this run's buffer is gone and {out} cannot resume exactly"
            )
        return
    if mine is not None:
        owner = mine.get("owner") or {}
        inside = out.resolve() in directory.resolve().parents  # the default <run>/replay goes with the run directory
        if not inside and not (owner.get("run_dir") and _same_dir(Path(owner["run_dir"]), out)):
            raise CptError(
                f"replay.buffer.dir: {directory} holds another run's buffer ({describe(peek(directory))}); choose another dir, "
                f"delete that one, or start from a copy of its rows with replay.buffer.init: {directory}"
            )
        log(f"replay: clearing the buffer left in {directory} by an earlier run in {out} ({mine['shards']} shard(s))")
    if not rp.buffer.init:
        return
    source = Path(rp.buffer.init)
    if _same_dir(source, directory):
        raise CptError(f"replay.buffer.init: {source} is this run's own replay.buffer.dir; copy from another directory")
    info = peek(source)
    if info is None:
        raise CptError(f"replay.buffer.init: {source} holds no cpt replay buffer (no shard-000.meta.json)")
    if info["store"] != "rows":
        raise CptError(
            f"replay.buffer.init: {source} stores references into its own run's token files (replay.buffer.store: "
            f"{info['store']}), not rows; only a buffer of rows can start another run"
        )
    row_len = cfg.training.seq_len + 1
    if info["row_len"] != row_len:
        raise CptError(f"replay.buffer.init: {source} holds rows of {info['row_len']} tokens; training.seq_len + 1 = {row_len}")
    if info["dtype"] != dtype:
        raise CptError(f"replay.buffer.init: {source} stores {info['dtype']} token ids; this run's tokenizer needs {dtype}")
    if info["policy"] != rp.buffer.policy:
        raise CptError(f"replay.buffer.policy: {rp.buffer.policy} but the buffer at replay.buffer.init uses {info['policy']}")
    total = global_capacity_rows(cfg)
    want = [shard_capacity(total, world, r) for r in range(world)]
    if info["shards"] == world and info["capacity_rows"] != want:
        raise CptError(
            f"replay.buffer.capacity: this run's shards hold {want} sequences but the buffer at replay.buffer.init "
            f"holds {info['capacity_rows']}; use the same capacity"
        )
    caps = info["capacity_rows"]
    theirs = None if any(c is None for c in caps) else sum(caps)
    # what this run's capacity would have given the source's ranks (each shard has room for one row at least)
    same = None if total is None else sum(shard_capacity(total, info["shards"], r) for r in range(info["shards"]))
    if info["shards"] != world and theirs != same:
        raise CptError(
            f"replay.buffer.capacity: this run's buffer has room for {'all sequences' if total is None else f'{total:,} sequences'} "
            f"but the buffer at replay.buffer.init for {'all' if theirs is None else f'{theirs:,}'}; use the same capacity"
        )
    dealt = "" if info["shards"] == world else f"; its {info['shards']} shard(s) are dealt anew to this run's {world} rank(s)"
    log(f"replay: starting from a copy of {source}: {describe(info)}{dealt}")
