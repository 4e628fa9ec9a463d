"""Stopping on SIGTERM / SIGINT: finish the step, checkpoint, exit 75 — and every rank agrees when.

The first signal asks the loop to stop after the current step; a second one exits at once. Under
torchrun a signal may reach the ranks at different steps, so the flag travels with the step's loss
all-reduce (`agree`): every rank then sees the same decision at the same step and they checkpoint
together.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import torch

from cpt.training import distributed

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; resume with --resume


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: the current step finished and a checkpoint was written."""

    def __init__(self, run_dir: Path, step: int, signum: int):
        super().__init__(
            f"{run_dir}: stopped by signal {signum} after step {step}; checkpoint written. Continue with: cpt train --resume {run_dir}"
        )
        self.step = step


class StopOnSignal:
    """First SIGTERM/SIGINT: ask the loop to stop after the current step. Second: exit at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            print(f"cpt: second signal {signum}: exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"\ncpt: signal {signum}: finishing the current step and writing a checkpoint (send again to exit now)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def agree(loss: float, stop: bool, world: int, device: torch.device) -> tuple[float, bool]:
    """(the global mean loss, whether any rank was signalled): one all-reduce, so every rank takes the same NaN and stop decisions."""
    if world <= 1:
        return loss, stop
    total, flag = distributed.all_reduce_sum([loss, float(stop)], device)
    return total / world, flag > 0
