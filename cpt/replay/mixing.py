"""How many replayed sequences each step holds, and the batch source that mixes them in.

Exact replay rate: with B sequences per step (the global batch, all ranks together) and rate α,
step s of a task (0-based) replays r_s = floor(α·B·(s+1)) − floor(α·B·s) sequences, i.e. ⌊α·B⌋
or ⌈α·B⌉, spread like a Bresenham line so that after S steps exactly floor(α·B·S) of the task's
B·S sequences were replayed: the realised fraction is α up to 1/(B·S). The batch never grows:
replayed rows replace new ones, and a task runs until its budget of NEW tokens is met (so replay
adds compute).

Under torchrun the step's r_s replayed rows are split over the W ranks (⌊r_s/W⌋ each, one more
for r_s mod W of them, rotating with the step), each rank drawing its share from its own buffer
shard; the step's B − r_s new rows are the next rows of the task stream's global order, rank q
taking the run of them after the new rows of ranks 0..q−1 (`TaskStream.take`). So the sequence of
new rows, the replay counts and the statistics are the same on any number of ranks; which
replayed rows are drawn depends on the shards (statistically the same, not bit-identical, after
a change of world size). If any rank's shard has no eligible row for a step (nothing stored yet,
or every earlier row evicted), all ranks agree (one small all-reduce on a gloo group, only for
steps that replay) to train that step on new rows only.

`MixedBatchSource` is the loop's batch seam: `next_batch(step)` returns this rank's rows (new rows
from the task stream, replayed rows from the buffer), and `after_step()` (the first after-step
hook, cpt.training.hooks) offers the new rows to the buffer — with `replay.buffer.store: refs`
together with their token offsets in the task file (`TaskStream.last_starts`), which is what such
a buffer stores. Replay slots for step s+2 are drawn (in the main thread, deterministically) right
after step s's rows were stored, and read by the prefetch thread while step s+1 computes.

Its checkpointed state has two parts: what every rank shares (`shared`: the streams' global
cursors, the statistics and the steps whose replay was called off — in `state.pt`, written once)
and what is this rank's own (its drawn-ahead replay rows and buffer shard's metadata — in its
`rank-<r>.pt`). A run resumed on another number of ranks reads only the shared part; its buffer
shards are remapped first (`cpt.replay.remap`) and the drawn-ahead rows drawn again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from cpt.errors import CptError


def replay_count(step_in_task: int, rows_per_step: int, rate: float) -> int:
    if rate <= 0:
        return 0
    x = rate * rows_per_step
    # the small epsilon keeps α·B·s that are integers in exact arithmetic from rounding down
    return math.floor(x * (step_in_task + 1) + 1e-9) - math.floor(x * step_in_task + 1e-9)


def steps_for_budget(tokens: int, seq_len: int, rows_per_step: int, rate: float) -> int:
    """Optimizer steps until the NEW rows trained reach `tokens` (each row trains seq_len tokens)."""
    need_rows = math.ceil(tokens / seq_len)
    if rate <= 0:
        return max(1, math.ceil(need_rows / rows_per_step))
    # new rows after S steps = B·S − floor(α·B·S); solve approximately, then step to the exact S
    s = max(1, math.floor(need_rows / (rows_per_step * (1 - rate))) - 2)
    while rows_per_step * s - math.floor(rate * rows_per_step * s + 1e-9) < need_rows:
        s += 1
    while s > 1 and rows_per_step * (s - 1) - math.floor(rate * rows_per_step * (s - 1) + 1e-9) >= need_rows:
        s -= 1
    return s


@dataclass
class StepPlan:
    """Which task each global step trains and how many of its rows are replayed."""

    task_of_step: list[int]
    step_in_task: list[int]
    replay_rows: list[int]
    task_ends: list[int]
    rows_per_step: int
    rate: float = 0.0

    def replay_at(self, step: int) -> int:
        """Replayed rows planned at `step`; past the plan's end, those of the first steps of one more task (what an
        extension of the run would replay there: a later task always replays)."""
        if step < self.total_steps:
            return self.replay_rows[step]
        return replay_count(step - self.total_steps, self.rows_per_step, self.rate)

    def task_at(self, step: int) -> int:
        """The task `step` trains; past the plan's end, the next task's index."""
        return self.task_of_step[step] if step < self.total_steps else len(self.task_ends)

    @classmethod
    def build(cls, budgets: list[int], seq_len: int, rows_per_step: int, rate: float, replay_first_task: bool) -> StepPlan:
        task_of, in_task, replay, ends = [], [], [], []
        for t, tokens in enumerate(budgets):
            r = rate if (t > 0 or replay_first_task) else 0.0
            n = steps_for_budget(tokens, seq_len, rows_per_step, r)
            for s in range(n):
                task_of.append(t)
                in_task.append(s)
                replay.append(replay_count(s, rows_per_step, r))
            ends.append(len(task_of))
        return cls(task_of, in_task, replay, ends, rows_per_step, rate)

    @property
    def total_steps(self) -> int:
        return len(self.task_of_step)


def replay_shortfall(plan: StepPlan, new_rows: int, replay_rows: int, task: int, rate: float) -> str | None:
    """A warning when task `task` replayed less than planned: its realised fraction is below α by more
    than 1/(B·S) (B rows per step, S steps), the rounding the exact plan allows. None otherwise.

    It happens when the buffer held no eligible rows for some steps (nothing stored yet, or every
    earlier row evicted); those rows were then new ones, so the batch kept its size.
    """
    start = plan.task_ends[task - 1] if task else 0
    steps = plan.task_ends[task] - start
    planned = sum(plan.replay_rows[start : plan.task_ends[task]])
    if planned == 0 or new_rows + replay_rows == 0:
        return None
    realised = replay_rows / (new_rows + replay_rows)
    if realised >= rate - 1 / (plan.rows_per_step * steps):
        return None
    return (
        f"replay fraction {realised:.3f} below replay.rate {rate:g} ({replay_rows} of {planned} planned rows replayed in "
        f"{steps} steps): the buffer held no eligible rows for some steps, which trained on new rows instead"
    )


@dataclass
class ReplayStats:
    new_rows: list[int] = field(default_factory=list)  # per task
    replay_rows: list[int] = field(default_factory=list)

    def fraction(self) -> list[float]:
        return [r / (n + r) if n + r else 0.0 for n, r in zip(self.new_rows, self.replay_rows)]


def replay_split(total: int, world: int, step: int) -> np.ndarray:
    """The step's `total` replayed rows over `world` ranks: ⌊total/W⌋ each, one more for total mod W ranks,
    starting at rank step mod W (so no rank always carries the extra rows). int64 [world]."""
    base, extra = divmod(total, world)
    return base + (((np.arange(world) - step) % world) < extra).astype(np.int64)


class _SharedState:
    """The part of the batch source every rank holds alike, checkpointed once in `state.pt` (hook name "data")."""

    name = "data"
    per_rank = False

    def __init__(self, source: MixedBatchSource) -> None:
        self.source = source

    def after_step(self, step: int, skipped: bool = False) -> list[dict]:
        return []

    def state_dict(self) -> dict:
        src = self.source
        return {
            "streams": [s.state_dict() for s in src.streams],
            "stats": {"new_rows": [int(n) for n in src.stats.new_rows], "replay_rows": [int(n) for n in src.stats.replay_rows]},
            "called_off": sorted(int(s) for s in src.called_off),
            "world": src.world,
        }

    def load_state_dict(self, state: dict | None) -> None:
        src = self.source
        if state is None:  # a checkpoint of a cpt whose per-rank state held the cursors (one process only)
            return
        for s, st in zip(src.streams, state["streams"]):
            s.load_state_dict(st)
        pad = [0] * (len(src.plan.task_ends) - len(state["stats"]["new_rows"]))  # an extended run has more tasks
        src.stats = ReplayStats([int(n) for n in state["stats"]["new_rows"]] + pad, [int(n) for n in state["stats"]["replay_rows"]] + pad)
        src.called_off = {int(s) for s in state["called_off"]}
        src.loaded_shared = True


class MixedBatchSource:
    """New rows from the task streams, a planned number of replayed rows from the buffer (see the module)."""

    LOOKAHEAD = 2
    name = "sources"  # as an after-step hook and a checkpointed part (one state per rank)
    per_rank = True  # each rank's drawn rows and buffer shard: a checkpoint keeps one state per rank

    def __init__(
        self,
        streams,
        plan: StepPlan,
        buffer=None,
        prefetcher=None,
        include_current: bool = False,
        task_weights: dict[int, float] | None = None,
        task_offset: int = 0,
        rank: int = 0,
        world: int = 1,
        agree=None,
    ):
        self.streams = streams  # one stream per task (or one JointStream per "task" for joint), read globally
        self.plan = plan  # rows_per_step: the global batch
        self.buffer = buffer
        self.prefetcher = prefetcher
        self.include_current = include_current
        self.task_weights = task_weights
        # a reused buffer (replay.buffer.dir) holds an earlier run's tasks under ids 0..offset-1;
        # this run's task t is stored as offset + t, and every earlier id is replayable
        self.task_offset = task_offset
        self.rank, self.world = rank, world
        if plan.rows_per_step % world:
            raise ValueError(f"a global batch of {plan.rows_per_step} rows does not split over {world} ranks")
        self.rows_per_rank = plan.rows_per_step // world
        # agree(ok) -> whether every rank could draw (an all-reduce); None in one process
        self.agree = agree
        self.pending: dict[int, np.ndarray] = {}  # step -> slots drawn and submitted to the prefetcher
        self.ready: dict[int, np.ndarray] = {}  # step -> rows drawn and read
        self.called_off: set[int] = set()  # steps whose replay some rank could not draw: all rows new
        self.stats = ReplayStats([0] * len(plan.task_ends), [0] * len(plan.task_ends))  # global row counts
        self.shared = _SharedState(self)
        self.loaded_shared = False
        self._new_rows: np.ndarray | None = None
        self._new_starts: np.ndarray | None = None  # the new rows' token offsets (a refs buffer stores these)
        self._counts = (0, 0)
        self._task: int = 0
        self.wait_seconds = 0.0

    def eligible_tasks(self, task: int) -> list[int]:
        """The buffer's task ids replayable while training task `task` (the probe draws from the same)."""
        return self._eligible(task)

    def _eligible(self, task: int) -> list[int]:
        """Stored task ids that task `task` replays (ReplayBuffer.eligible; none without a buffer)."""
        if self.buffer is None:
            return []
        return self.buffer.eligible(task, self.include_current, self.task_offset)

    def replay_counts(self, step: int) -> np.ndarray:
        """Replayed rows per rank at `step` (zeros where the replay was called off)."""
        total = 0 if step in self.called_off else self.plan.replay_at(step)
        return replay_split(total, self.world, step)

    def _draw(self, step: int) -> None:
        """Choose replay slots for `step` from this rank's shard as it is now, and start reading them.

        The rows are the buffer's contents at draw time on both paths (prefetched or not), so a
        run is the same with prefetch on or off, and a checkpoint stores drawn rows, not slots.
        Every rank draws the same steps (the plan's), so the agreement below pairs up.

        The look-ahead runs past the plan's end too, for the first steps of one more task: those rows are in the
        run's last checkpoint, so a run extended with more tasks (`--extend`) replays exactly what a run planned
        with them from the start drew at that point (the buffer as it was then, the same generator state).
        """
        if step >= self.plan.total_steps + self.LOOKAHEAD or step in self.pending or step in self.ready or self.buffer is None:
            return
        if self.plan.replay_at(step) == 0:
            return
        task = self.plan.task_at(step)
        eligible = self._eligible(task)
        ok = bool(eligible)
        if self.agree is not None:
            ok = self.agree(ok)
        if not ok:  # nothing eligible yet on some rank: every rank trains new rows only
            self.called_off.add(step)
            self.ready[step] = np.zeros((0, 0), dtype=np.int64)
            return
        n = int(self.replay_counts(step)[self.rank])
        if n == 0:
            self.ready[step] = np.zeros((0, 0), dtype=np.int64)
            return
        weights = None
        if self.task_weights:
            weights = {t: self.task_weights.get(t, 0.0) for t in eligible}
            if sum(weights.values()) <= 0:
                weights = None
        slots = np.asarray(self.buffer.sample_slots(n, eligible_tasks=eligible, task_weights=weights), dtype=np.int64)
        if self.prefetcher is not None:
            self.pending[step] = slots
            self.prefetcher.submit(step, slots)
        else:
            self.ready[step] = np.asarray(self.buffer.read(slots)[0], dtype=np.int64)

    def _collect(self, step: int) -> np.ndarray | None:
        if step in self.ready:
            return self.ready.pop(step)
        if step in self.pending:
            self.pending.pop(step)
            waited = self.prefetcher.wait_seconds  # the prefetcher times the wait; accumulated here across resumes
            rows, _ = self.prefetcher.get_arrays(step)
            self.wait_seconds += self.prefetcher.wait_seconds - waited
            return rows.astype(np.int64, copy=False)
        return None

    def start(self, step: int) -> None:
        """Draw the first look-ahead steps (at the run's start or after a resume)."""
        for s in range(step, step + self.LOOKAHEAD):
            self._draw(s)

    def next_batch(self, step: int) -> tuple[torch.Tensor, int, int]:
        """This rank's rows for `step`: (rows [B/W, seq_len+1] int32, new count, replay count).

        int32 halves the host-to-device copy (token ids fit: a vocabulary is far below 2^31); where
        CUDA is available the tensor is in pinned memory, so `.to(device, non_blocking=True)` is
        an asynchronous copy (torch's caching host allocator keeps a pinned block until the copy that
        reads it is done). The new rows the buffer stores stay the stream's int64 arrays.
        """
        task = self.plan.task_of_step[step]
        self._task = task
        self._draw(step)  # no-op when drawn ahead
        replay = self._collect(step)
        counts = self.replay_counts(step)
        n_replay = int(counts[self.rank])
        if n_replay and (replay is None or len(replay) != n_replay):
            raise RuntimeError(
                f"step {step}: {n_replay} replay rows planned on rank {self.rank}, {0 if replay is None else len(replay)} drawn"
            )
        news = self.rows_per_rank - counts
        lo = int(news[: self.rank].sum())
        n_new = int(news[self.rank])
        stream = self.streams[task]
        new = stream.take(int(news.sum()), lo, lo + n_new)
        self._new_rows = new
        self._new_starts = getattr(stream, "last_starts", None)
        self.stats.new_rows[task] += int(news.sum())
        self.stats.replay_rows[task] += int(counts.sum())
        self._counts = (int(news.sum()), int(counts.sum()))
        out = torch.empty((self.rows_per_rank, new.shape[1]), dtype=torch.int32, pin_memory=torch.cuda.is_available())
        out[:n_new] = torch.from_numpy(new)
        if n_replay:
            out[n_new:] = torch.from_numpy(replay)
        return out, n_new, n_replay

    def after_step(self, step: int, skipped: bool = False) -> list[dict]:
        """The after-step hook (cpt.training.hooks): offer the step's new rows to the buffer, then draw
        replay for step + LOOKAHEAD. A skipped batch (NaN/Inf loss) is neither stored nor counted."""
        if skipped:
            n_new, n_replay = self._counts
            self.stats.new_rows[self._task] -= n_new
            self.stats.replay_rows[self._task] -= n_replay
        elif self.buffer is not None and self._new_rows is not None and len(self._new_rows):
            if getattr(self.buffer, "store", "rows") == "refs":
                self.buffer.add(self._new_rows, self.task_offset + self._task, starts=self._new_starts)
            else:
                self.buffer.add(self._new_rows, self.task_offset + self._task)
        self._new_rows = self._new_starts = None
        self._draw(step + self.LOOKAHEAD)
        return []

    def state_dict(self) -> dict:
        """This rank's part (the shared part is `shared.state_dict()`). Tensors and plain Python values only
        (no numpy objects): a checkpoint is read back with `torch.load(weights_only=True)`, which refuses anything else."""
        for step in list(self.pending):  # finish outstanding reads: the checkpoint holds rows
            self.ready[step] = self._collect(step)
        return {
            # drawn rows as int64 tensors (a copy: the checkpoint must not alias rows still to be trained)
            "ready": {int(k): torch.tensor(np.asarray(v, dtype=np.int64)) for k, v in self.ready.items()},
            "buffer": self.buffer.state_dict() if self.buffer is not None else None,
            "wait_seconds": float(self.wait_seconds),
        }

    def load_state_dict(self, state: dict) -> None:
        if not self.loaded_shared:
            # a checkpoint written before the shared part existed: one process, whose cursors were its own
            if self.world > 1:
                raise CptError(
                    "this checkpoint was written by a cpt whose ranks each kept their own data cursor; this version reads one "
                    "global order and cannot continue it exactly: resume it with the cpt that wrote it, or start the run again"
                )
            for s, st in zip(self.streams, state["streams"]):
                s.load_state_dict(st)
            self.stats = ReplayStats([int(n) for n in state["stats"]["new_rows"]], [int(n) for n in state["stats"]["replay_rows"]])
        self.wait_seconds = float(state.get("wait_seconds", 0.0))
        if self.buffer is not None and state.get("buffer") is not None:
            self.buffer.load_state_dict(state["buffer"])
        self.pending = {}
        # tensors since checkpoints load with weights_only=True; numpy arrays in checkpoints written before
        self.ready = {
            int(k): (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).astype(np.int64, copy=True)
            for k, v in state["ready"].items()
        }

    def load_resharded(self) -> None:
        """Resumed on another number of ranks: the shared part is loaded, the (remapped) shard opened as it is;
        the look-ahead replay is drawn again from it by `start`."""
        self.pending, self.ready = {}, {}
