"""Gradient-alignment probe: cosine similarity between gradients of different tasks' batches.

MER is meant to raise the agreement (dot product) between gradients on new and old data. The probe
measures it directly: the gradient of the loss on a small current-task batch, and on a small batch
of each earlier task (and of the replay buffer), then cos(g_current, g_other). It uses
`torch.autograd.grad`, so the training gradients and the optimizer are untouched, and its batches
come from its own readers, so turning it on does not change what the run trains on.
`AlignmentProbe` is the after-step hook (cpt.training.hooks) that runs it every `probe_every` steps
on rank 0 and keeps its own time (`seconds`), which the summary reports as probe_seconds.

Under FSDP2 no rank holds a whole gradient, and every forward is collective, so every rank runs the
probe: each reads the probe batches of one process and keeps its share of them (rows r, r+N, …),
the backward reduce-scatters into each rank's gradient shard, and the cosine is
assembled from per-shard dot products and squared norms summed over the ranks,
cos = Σ⟨g₁,g₂⟩ / √(Σ‖g₁‖² · Σ‖g₂‖²) — the one-process value. Only the replay batch differs, as
in training: each rank draws it from its own buffer shard.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from cpt.data.streams import TaskStream
from cpt.training import distributed
from cpt.training.device import precision
from cpt.training.loss import token_cross_entropy


def batch_gradient(model: torch.nn.Module, rows: torch.Tensor, params: list[torch.Tensor], autocast_dtype=None) -> torch.Tensor:
    """The flattened fp32 gradient of the mean next-token loss on `rows` [n, seq_len+1]."""
    device = params[0].device
    rows = rows.to(device)
    with precision(device, autocast_dtype):
        logits = model(input_ids=rows[:, :-1]).logits
    loss = token_cross_entropy(logits, rows[:, 1:])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])


def gradient_cosines(
    model: torch.nn.Module, current: torch.Tensor, others: dict[str, torch.Tensor], autocast_dtype=None
) -> dict[str, float]:
    """cos(∇L(current), ∇L(other)) for each named batch in `others`."""
    params = [p for p in model.parameters() if p.requires_grad]
    g0 = batch_gradient(model, current, params, autocast_dtype)
    out = {}
    for name, rows in others.items():
        g = batch_gradient(model, rows, params, autocast_dtype)
        out[name] = float(F.cosine_similarity(g0, g, dim=0))
    return out


def _shard_gradient(
    model: torch.nn.Module, rows: torch.Tensor, total_rows: int, params: list[torch.Tensor], world: int, autocast_dtype=None
) -> torch.Tensor:
    """Collective (FSDP2): this rank's flattened fp32 shard of the gradient of the mean next-token loss
    over all ranks' rows, `rows` [n, seq_len+1] being this rank's part of a batch of `total_rows`.

    The backward's reduce-scatter averages over the ranks, so each rank's loss is its rows' summed
    cross-entropy over the batch's tokens, times the world size. A rank without rows still runs
    (every forward is collective) on a dummy row that weighs nothing. The training gradients are
    put back as they were (the loop has cleared them by then)."""
    scale = world / (total_rows * (rows.shape[1] - 1))
    if not len(rows):
        rows, scale = torch.zeros((1, rows.shape[1]), dtype=torch.int64), 0.0
    device = params[0].device
    rows = rows.to(device)
    with precision(device, autocast_dtype):
        logits = model(input_ids=rows[:, :-1]).logits
    loss = token_cross_entropy(logits, rows[:, 1:], reduction="sum") * scale
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    model.set_requires_gradient_sync(True)
    loss.backward()
    local = [p.grad.to_local() if p.grad is not None else torch.zeros_like(p.to_local()) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in local])
    for p, g in zip(params, saved):
        p.grad = g
    return flat


def sharded_gradient_cosines(
    model: torch.nn.Module, current: torch.Tensor, others: dict[str, torch.Tensor], totals: dict[str, int], world: int, autocast_dtype=None
) -> dict[str, float]:
    """Collective (FSDP2): `gradient_cosines` from sharded gradients. Each rank passes its rows of every
    batch (the same names on every rank) and `totals`, each batch's rows over all ranks ("current" too);
    a shard's dot products and squared norms are summed over the ranks in float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    g0 = _shard_gradient(model, current, totals["current"], params, world, autocast_dtype).double()
    sums = [float(g0 @ g0)]
    for name, rows in others.items():
        g = _shard_gradient(model, rows, totals[name], params, world, autocast_dtype).double()
        sums += [float(g0 @ g), float(g @ g)]
    sums = distributed.all_reduce_sum(sums, g0.device)
    eps = 1e-8  # F.cosine_similarity's
    norm0 = max(sums[0] ** 0.5, eps)
    return {name: sums[1 + 2 * i] / (norm0 * max(sums[2 + 2 * i] ** 0.5, eps)) for i, name in enumerate(others)}


class AlignmentProbe:
    """Every `every` steps: the current task's gradient against each earlier task's and the buffer's.

    On rank 0 alone (one process, DDP: its rows, its replica), or on every rank of an FSDP2 model,
    each with its share of the rows (`sharded_gradient_cosines`); rank 0 returns the record."""

    name = "probe"

    def __init__(
        self,
        model,
        tasks,
        seq_len: int,
        seed: int,
        rank: int,
        world: int,
        every: int,
        batch_size: int,
        task_of_step: list[int],
        autocast_dtype,
        is_main: bool,
        buffer=None,
        eligible=None,
    ):
        self.model = model
        self.names = [t.name for t in tasks]
        self.sharded = isinstance(model, FSDPModule)
        self.rank, self.world = rank, world
        self.per_rank = self.sharded  # every rank draws replay rows from its own shard: its state is its own
        # its own readers (another seed): turning the probe on does not change what the run trains on. Under
        # FSDP2 every rank reads one process's batches (rank 0 of 1) and keeps its rows of them
        at, of = (0, 1) if self.sharded else (rank, world)
        self.streams = [TaskStream(t.train, seq_len, seed + 1_000_003, i, at, of, t.name) for i, t in enumerate(tasks)]
        self.rng = np.random.default_rng([seed, 31337])
        self.every, self.batch_size = every, batch_size
        self.task_of_step = task_of_step
        self.autocast_dtype = autocast_dtype
        self.is_main = is_main
        self.buffer = buffer
        self.eligible = eligible  # task -> the buffer's task ids replayable during it
        self.seconds = 0.0

    def after_step(self, step: int, skipped: bool = False) -> list[dict]:
        done = step + 1
        if done % self.every or not (self.is_main or self.sharded):
            return []
        t0 = time.perf_counter()
        task = self.task_of_step[step]
        n = self.batch_size
        mine = slice(self.rank, None, self.world) if self.sharded else slice(None)  # this rank's rows of each batch
        current = torch.from_numpy(self.streams[task].next_rows(n)[mine])
        others = {self.names[j]: torch.from_numpy(self.streams[j].next_rows(n)[mine]) for j in range(task)}
        replay = self._replay_rows(task, len(range(n)[mine]))
        records = []
        if self.sharded:
            totals = dict.fromkeys(["current", *others], n)
            if self.buffer is not None:  # every rank has a shard: whether to probe the replay batch is agreed
                device = next(self.model.parameters()).device  # NCCL reduces device tensors only
                totals["replay"] = int(distributed.all_reduce_sum([float(len(replay) if replay is not None else 0)], device)[0])
                if totals["replay"]:
                    others["replay"] = replay if replay is not None else torch.zeros((0, current.shape[1]), dtype=torch.int64)
            if others:
                cos = sharded_gradient_cosines(self.model, current, others, totals, self.world, self.autocast_dtype)
                if self.is_main:
                    records.append({"type": "probe", "step": done, "task": self.names[task], "cosine": cos})
        else:
            if replay is not None and len(replay):
                others["replay"] = replay
            if others:
                cos = gradient_cosines(self.model, current, others, self.autocast_dtype)
                records.append({"type": "probe", "step": done, "task": self.names[task], "cosine": cos})
        self.seconds += time.perf_counter() - t0
        return records

    def _replay_rows(self, task: int, n: int) -> torch.Tensor | None:
        """Up to `n` rows of this rank's buffer replayable during `task`; None without a buffer or rows in it."""
        if self.buffer is None or not self.buffer.fill:
            return None
        ids = self.rng.integers(0, self.buffer.fill, size=4 * self.batch_size)
        rows, task_ids = self.buffer.read(ids)
        ok = np.isin(task_ids, self.eligible(task))
        return torch.from_numpy(np.asarray(rows[ok][:n], dtype=np.int64))

    def state_dict(self) -> dict:
        return {"streams": [s.state_dict() for s in self.streams], "rng": self.rng.bit_generator.state, "seconds": self.seconds}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
        self.rng.bit_generator.state = state["rng"]
        self.seconds = float(state.get("seconds", 0.0))
