"""The after-step seam: what acts on the run between optimizer steps.

After every optimizer step the loop calls each hook in order with the 0-based index of the step
just taken (`skipped`: its batch had a NaN/Inf loss and was not applied) and writes the records it
returns to metrics.jsonl. A hook decides itself when to act, and keeps the state it needs to resume
(`state_dict` / `load_state_dict`, saved under its `name` in every checkpoint; None: stateless).
The hooks of a run, in order (cpt.training.build.hooks_for):

    sources   the batch source offers the step's new rows to the buffer and draws ahead (cpt.replay.mixing)
    reptile   a meta-update every k steps and at task ends (cpt.alignment.reptile)
    reset     Adam's moments cleared at task boundaries (optimizer.reset_at_task; below)
    probe     the gradient-alignment cosines every probe_every steps (cpt.alignment.probe)

Adding a method (EWC, distillation, another alignment rule) is one class with these three methods
and one line in `hooks_for`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Protocol

import torch


class AfterStepHook(Protocol):
    name: str

    def after_step(self, step: int, skipped: bool = False) -> list[dict]: ...

    def state_dict(self) -> dict | None: ...

    def load_state_dict(self, state: dict | None) -> None: ...


class OptimizerReset:
    """Clear the optimizer's moments when a task ends (optimizer.reset_at_task)."""

    name = "reset"

    def __init__(self, optimizer: torch.optim.Optimizer, task_ends: list[int]):
        self.optimizer = optimizer
        self.task_ends = set(task_ends)

    def after_step(self, step: int, skipped: bool = False) -> list[dict]:
        if step + 1 in self.task_ends:
            self.optimizer.state = defaultdict(dict)
        return []

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass
