"""Extend a finished run with new tasks: `cpt train MORE.yaml --extend RUN --out NEW`.

"German arrived; I trained English → French last month." The extended run continues the earlier run's
final state — model, AdamW moments, step counter, replay buffer, Reptile anchor and counters, RNG, data
cursors — as if the new tasks had been in its plan from the start: NEW is set up as a copy of RUN whose
plan has more tasks and is then *resumed* from RUN's last checkpoint, so every part of the state goes
through the one resume path there is (and a run extended on another number of ranks is resharded like any
resume). RUN is only read: its checkpoint files are hard-linked (copied where links are impossible; a
checkpoint is never written in place), its metrics, buffer shards and marker copied.

What MORE.yaml holds: the new `tasks` (appended after RUN's; names must be new). Every other key it sets
must equal RUN's, except how the run executes and reports (`name`, `logging`, `checkpoint`, `prepare` and
the keys a resume may change, `launch.RESUME_KEYS`); anything else is refused with one line naming the key,
since the earlier tasks' rows of the loss matrix were trained with RUN's settings. The buffer goes into NEW's
own directory (a `replay.buffer.dir` of RUN is never written).

The schedule must not depend on the run's length: the learning rate of every step RUN took must be what the
extended plan gives it (checked step by step). `rewarm`, `constant` without a warmup fraction (or with
`schedule.warmup_steps`) and `infinite` with `cooldown_steps` and `anneal: 0` pass; `cosine`, `wsd` and
fractions of the whole run are refused with the step where the rates part.

The loss matrix grows: RUN's rows are kept and their columns for the new tasks are filled by evaluating RUN's
task-end HF checkpoints (`checkpoints/task-<i>-<name>`) on the new tasks' held-out sets with the extended run's
own evaluator — the values a run planned with all tasks up front would have logged. Exactness: RUN then
extend with B gives the loss matrix of one run of RUN's tasks + B (tests/test_extend.py, bit for bit on CPU).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from cpt import atomic
from cpt.config import RunConfig, apply_override, dump_config, load_config, parse_override, read_yaml_mapping, resolve_paths, validate
from cpt.errors import CptError
from cpt.replay import ownership
from cpt.replay.buffer import copy_shard, peek
from cpt.replay.mixing import StepPlan
from cpt.training import checkpoint as ckpt
from cpt.training.rundir import MARKER, prepare_run_dir, read_marker
from cpt.training.schedule import lr_at

# keys an extension may set to other values than the earlier run's: how it runs and reports, not what it trains
FREE_SECTIONS = ("name", "logging", "checkpoint", "prepare")


def _leaves(data, prefix: str = ""):
    """(dotted key, value) of every leaf of a nested mapping (lists are leaves)."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], data


def _get(data: dict, key: str):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _set(data: dict, key: str, value) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
    data[parts[-1]] = value


def merged_config(earlier: Path, more: Path, overrides: list[str], allow: tuple[str, ...] = ()) -> tuple[RunConfig, RunConfig]:
    """(the earlier run's config, the extended run's): RUN's settings with MORE.yaml's keys over them and its tasks
    appended; a key MORE.yaml may not change is a one-line CptError naming it."""
    from cpt.training.launch import RESUME_KEYS

    before = load_config(earlier / "config.yaml")
    new = read_yaml_mapping(more)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(new, parts, value, text)
    resolve_paths(new, more.parent.resolve())
    tasks = new.pop("tasks", None)
    if not tasks:
        raise CptError(f"{more}: tasks: an extension needs the new tasks to train (a list under `tasks`)")
    base = before.model_dump(mode="json", by_alias=True)
    names = [t["name"] for t in base["tasks"]]
    for t in tasks:
        if isinstance(t, dict) and t.get("name") in names:
            raise CptError(f"tasks: {t.get('name')!r} is already a task of {earlier}; name the new tasks differently")
    data = copy.deepcopy(base)
    for key, value in _leaves(new):
        _set(data, key, value)
    data["tasks"] = base["tasks"] + list(tasks)
    if base["replay"]["buffer"]["dir"] and _get(new, "replay.buffer.dir") in (None, base["replay"]["buffer"]["dir"]):
        data["replay"]["buffer"]["dir"] = None  # the earlier run's buffer is only read: this run keeps its own copy
    if not base["tokenizer"]["path"] and not (base["model"]["init"] and Path(base["model"]["init"], "tokenizer.json").is_file()):
        # a BPE the earlier run trained on its tasks: the extension tokenizes with it (a new BPE would renumber every id)
        data["tokenizer"]["path"] = str((earlier / "checkpoints" / "final").resolve())
    after = validate(data, str(more))
    dumped = after.model_dump(mode="json", by_alias=True)
    for key, value in _leaves({k: v for k, v in dumped.items() if k != "tasks"}):
        if key.split(".")[0] in FREE_SECTIONS or key in RESUME_KEYS or key in ("replay.buffer.dir", "tokenizer.path", *allow):
            continue
        if value != _get(base, key):
            raise CptError(
                f"{key}: {value!r} in {more}, but {earlier} trained with {_get(base, key)!r}; an extension keeps the settings of "
                f"the run it continues (it may change {', '.join(FREE_SECTIONS)} and {', '.join(RESUME_KEYS)})"
            )
    if after.training.strategy == "joint":
        raise CptError("training.strategy: joint retrains on all tasks at once; it has no sequence to extend")
    return before, after


def plan_of(cfg: RunConfig, world: int, offset: int) -> StepPlan:
    from cpt.training.build import plan_for

    return plan_for(cfg, [t.tokens for t in cfg.tasks], world, offset)


def check_schedule(before: RunConfig, after: RunConfig, world: int, offset: int) -> StepPlan:
    """The earlier run's steps must be the extended plan's first steps, each with the same learning rate."""
    a, b = plan_of(before, world, offset), plan_of(after, world, offset)
    n = len(before.tasks)
    if b.task_ends[:n] != a.task_ends:
        raise CptError(f"the extended plan's first {n} task(s) end at steps {b.task_ends[:n]}, the earlier run's at {a.task_ends}")
    sch, lr = after.schedule, after.training.lr
    for s in range(a.total_steps):
        was, now = lr_at(s, a.total_steps, a.task_ends, lr, sch), lr_at(s, b.total_steps, b.task_ends, lr, sch)
        if was != now:
            raise CptError(
                f"schedule.name: {sch.name} is planned over the run's length: step {s} trained at lr {was:.6g} and would train at "
                f"{now:.6g} in the extended plan; a run can be extended only with a schedule that does not depend on its length "
                "(rewarm; constant with schedule.warmup_steps or warmup 0; infinite with schedule.cooldown_steps and anneal 0, "
                "annealing a released copy instead)"
            )
    return a


def _link_tree(src: Path, dst: Path) -> None:
    """`dst` a copy of `src` made of hard links (files are never written in place), copies where links fail."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def prepare_extension(
    earlier: Path, more: Path, out: Path, overrides: list[str], overwrite: bool, log, launch: str = "", allow: tuple[str, ...] = ()
) -> RunConfig:
    """Check that `earlier` can be extended and set `out` up as its copy with the extended plan (rank 0's work);
    returns the extended config. Nothing in `earlier` is written."""
    earlier = Path(earlier)
    if not (earlier / MARKER).is_file():
        raise CptError(f"--extend {earlier}: not a cpt run directory (no {MARKER})")
    if not (earlier / "summary.json").is_file():
        raise CptError(f"--extend {earlier}: the run has not finished (no summary.json); resume it first (cpt train --resume {earlier})")
    if out.resolve() == earlier.resolve():
        raise CptError(f"--out {out}: the earlier run's own directory; the extension goes into a new one")
    before, after = merged_config(earlier, Path(more), overrides, allow)
    marker = read_marker(earlier)
    world = int(marker.get("world") or ckpt.written_by(earlier / "checkpoints") or 1)
    offset = int(marker.get("replay_task_offset", 0))
    plan = check_schedule(before, after, world, offset)
    final = [c for c in ckpt.list_checkpoints(earlier / "checkpoints") if int(c.name[5:]) == plan.total_steps]
    if not final or not (final[-1] / "manifest.json").is_file():  # its files are verified by the resume that follows
        raise CptError(
            f"--extend {earlier}: no resumable checkpoint at its last step {plan.total_steps} (checkpoint.task_ends: false?); "
            "it cannot be continued exactly"
        )
    heads = [earlier / "checkpoints" / f"task-{i}-{t.name}" for i, t in enumerate(before.tasks)]
    missing = [h.name for h in heads if not (h / "config.json").is_file()]
    if missing:
        raise CptError(
            f"--extend {earlier}: its task-end checkpoints {missing} are missing (checkpoint.task_ends: false?), so its rows of the "
            "loss matrix cannot be evaluated on the new tasks"
        )
    prepare_run_dir(out, resume=False, overwrite=overwrite)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    _link_tree(final[-1], out / "checkpoints" / final[-1].name)
    if (earlier / "metrics.jsonl").is_file():
        shutil.copyfile(earlier / "metrics.jsonl", out / "metrics.jsonl")
    run_id = uuid.uuid4().hex
    if after.replay.rate > 0:
        source = ownership.buffer_dir(before, earlier)
        info = peek(source)
        if info is None:
            raise CptError(f"--extend {earlier}: its replay buffer {source} is gone")
        target = ownership.buffer_dir(after, out)
        for shard in range(info["shards"]):
            copy_shard(source, target, shard)
            meta = target / f"shard-{shard:03d}.meta.json"
            data = json.loads(meta.read_text())
            data["owner"] = ownership.owner_record(run_id, out, after)
            atomic.write_json(meta, data, indent=None)
    atomic.write_text(out / "config.yaml", dump_config(after))
    new_marker = {
        **marker,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "world": world,
        "extended_from": {
            "run": str(earlier.resolve()),
            "run_id": marker.get("run_id"),
            "checkpoint": final[-1].name,
            "tasks": len(before.tasks),
        },
    }
    new_marker["extended_from"]["launch"] = launch
    atomic.write_json(out / MARKER, new_marker, indent=1)  # last: the other ranks wait for it
    log(
        f"extending {earlier} ({', '.join(t.name for t in before.tasks)}; {plan.total_steps} steps) with "
        f"{', '.join(t.name for t in after.tasks[len(before.tasks) :])} into {out}"
    )
    return after


def fill_columns(run, earlier: Path, n_before: int) -> list[list[float]]:
    """Collective: the new tasks' held-out losses of each of the earlier run's task-end checkpoints, evaluated with the
    extended run's evaluator (its model's weights replaced by each checkpoint's; the resume loads the real ones after)."""
    from safetensors.torch import load_file

    from cpt.training import distributed

    rows = []
    for i, task in enumerate(run.cfg.tasks[:n_before]):
        head = earlier / "checkpoints" / f"task-{i}-{task.name}"
        state = {}
        for f in sorted(head.glob("*.safetensors")):
            state.update(load_file(f))
        if not state:
            raise CptError(f"{head}: no safetensors weights to evaluate")
        tied = bool(getattr(run.model.config, "tie_word_embeddings", False))
        if run.parallel.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(run.model, state, options=StateDictOptions(full_state_dict=True, strict=not tied))
        else:
            missing, unexpected = run.model.load_state_dict(state, strict=False)
            if unexpected or [m for m in missing if not (tied and m == "lm_head.weight")]:
                raise CptError(f"{head}: its weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        with torch.no_grad():
            losses = run.evaluator.evaluate_all()
        rows.append([losses[t.name] for t in run.tasks[n_before:]])
        distributed.barrier()
    return rows


def wait_for_extension(out: Path, launch: str, timeout_s: float, poll_s: float = 0.5) -> None:
    """Ranks other than 0 (no process group yet): wait until rank 0 has set `out` up for this launch."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if json.loads((out / MARKER).read_text()).get("extended_from", {}).get("launch") == launch:
                return
        except (OSError, ValueError):
            pass
        time.sleep(poll_s)
    raise CptError(f"{out}: rank 0 did not set up the extension within {timeout_s:.0f}s (training.dist_timeout_s)")
