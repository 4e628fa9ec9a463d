"""Stopping on SIGTERM / SIGINT: finish the step, checkpoint, exit 75 — and every rank agrees when.

The first signal asks the loop to stop after the current step; a second one exits at once. Under
torchrun a signal may reach the ranks at different steps, so the flag travels with the step's loss
all-reduce (`agree`): every rank then sees the same decision at the same step and they checkpoint
together.

One request often arrives twice: torchrun forwards the SIGTERM (or a Ctrl-C's SIGINT) it receives to
its workers, which Slurm (or the terminal) signalled already. A signal within `REPEAT_WINDOW_S` of the
first is taken as the same request, not as "exit now". The time of the first is kept, so the run can say
how long after it the checkpoint was complete: the figure to compare with the grace period
(docs/distributed.md, Preemption).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; resume with --resume
REPEAT_WINDOW_S = 2.0  # a second signal sooner than this after the first is the same request, delivered twice


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: the current step finished and a checkpoint was written."""

    def __init__(self, run_dir: Path, step: int, signum: int, seconds: float | None = None):
        after = f" {seconds:.1f}s after the signal" if seconds is not None else ""
        super().__init__(
            f"{run_dir}: stopped by signal {signum} after step {step}; checkpoint written{after}. Continue with: cpt train --resume {run_dir}"
        )
        self.step = step
        self.seconds = seconds


class StopOnSignal:
    """First SIGTERM/SIGINT: ask the loop to stop after the current step. Second: exit at once."""

    def __init__(self):
        self.signum: int | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signum is not None:
            if now - self.received_at < REPEAT_WINDOW_S:
                return  # the same request, forwarded by torchrun or a job step as well
            print(f"cpt: second signal {signum}: exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum, self.received_at = signum, now
        print(
            f"\ncpt: signal {signum}: finishing the current step and writing a checkpoint "
            f"(send it again, {REPEAT_WINDOW_S:.0f}s or more from now, to exit at once without one)",
            file=sys.stderr,
            flush=True,
        )

    def seconds_since(self) -> float | None:
        """Seconds since the first signal reached this process; None when none did."""
        return None if self.received_at is None else time.monotonic() - self.received_at

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
