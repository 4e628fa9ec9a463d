"""Gradient-alignment probe: cosine similarity between gradients of different tasks' batches.

MER is meant to raise the agreement (dot product) between gradients on new and old data. The probe
measures it directly: the gradient of the loss on a small current-task batch, and on a small batch
of each earlier task (and of the replay buffer), then cos(g_current, g_other). It uses
`torch.autograd.grad`, so the training gradients and the optimizer are untouched, and its batches
come from its own readers, so turning it on does not change what the run trains on.
`AlignmentProbe` is the after-step hook (cpt.training.hooks) that runs it every `probe_every` steps
on rank 0 and keeps its own time (`seconds`), which the summary reports as probe_seconds.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from cpt.data.streams import TaskStream
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


class AlignmentProbe:
    """Every `every` steps (rank 0): the current task's gradient against each earlier task's and the buffer's."""

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
        # its own readers (another seed): turning the probe on does not change what the run trains on
        self.streams = [TaskStream(t.train, seq_len, seed + 1_000_003, i, rank, world, t.name) for i, t in enumerate(tasks)]
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
        if done % self.every or not self.is_main:
            return []
        t0 = time.perf_counter()
        task = self.task_of_step[step]
        n = self.batch_size
        current = torch.from_numpy(self.streams[task].next_rows(n))
        others = {self.names[j]: torch.from_numpy(self.streams[j].next_rows(n)) for j in range(task)}
        if self.buffer is not None and self.buffer.fill:
            ids = self.rng.integers(0, self.buffer.fill, size=4 * n)
            rows, task_ids = self.buffer.read(ids)
            ok = np.isin(task_ids, self.eligible(task))
            if ok.sum() >= 1:
                others["replay"] = torch.from_numpy(np.asarray(rows[ok][:n], dtype=np.int64))
        records = []
        if others:
            cos = gradient_cosines(self.model, current, others, self.autocast_dtype)
            records.append({"type": "probe", "step": done, "task": self.names[task], "cosine": cos})
        self.seconds += time.perf_counter() - t0
        return records

    def state_dict(self) -> dict:
        return {"streams": [s.state_dict() for s in self.streams], "rng": self.rng.bit_generator.state, "seconds": self.seconds}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
        self.rng.bit_generator.state = state["rng"]
        self.seconds = float(state.get("seconds", 0.0))
