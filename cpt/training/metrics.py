"""What a run writes while it trains: `metrics.jsonl` (and TensorBoard), and the train-loss meter.

`MetricsLog` appends one JSON object per line, flushed per line so a killed run keeps what it
measured; a resumed run truncates the file to the offset its checkpoint recorded and TensorBoard
drops the events after the checkpoint's step, so each step appears once. Ranks other than 0 get
`NoMetrics`. `TrainMeter` accumulates the training loss and tokens/s between train lines and
decides when to write one (`should_log`): every `logging.log_every` steps and at each task end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cpt.errors import CptError


class MetricsLog:
    """Append-only JSON lines; flushed per line so a killed run keeps what it measured."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, resumed_step: int | None = None):
        self.path = path
        self.fh = open(path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # why lazy: needs the optional tensorboard (cpt[tensorboard])
            except ImportError:
                raise CptError("logging.tensorboard: needs the tensorboard package (pip install tensorboard)") from None
            # a resumed run re-logs the steps after its checkpoint: TensorBoard drops the events the killed
            # run wrote after it (steps > the checkpoint's), as metrics.jsonl is truncated to its offset
            self.tb = SummaryWriter(str(tensorboard_dir), purge_step=None if resumed_step is None else resumed_step + 1)

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            if record["type"] == "train":
                self.tb.add_scalar("train/loss", record["loss"], step)
                self.tb.add_scalar("train/lr", record["lr"], step)
            elif record["type"] == "eval":
                for name, value in record["losses"].items():
                    self.tb.add_scalar(f"val/{name}", value, step)
                for name, value in record.get("replay_sources", {}).items():  # replay.sources: not tasks, kept apart
                    self.tb.add_scalar(f"val_replay_source/{name}", value, step)
            elif record["type"] == "probe":
                for name, value in record["cosine"].items():
                    self.tb.add_scalar(f"probe/{name}", value, step)

    def offset(self) -> int:
        self.fh.flush()
        return self.fh.tell()

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


class NoMetrics:
    """What ranks other than 0 write: nothing."""

    def write(self, record: dict) -> None:
        pass

    def offset(self) -> int:
        return 0

    def close(self) -> None:
        pass


def open_metrics(run_dir: Path, is_main: bool, tensorboard: bool, resumed_step: int | None, offset: int | None) -> MetricsLog | NoMetrics:
    """Rank 0's log (truncated to a resumed checkpoint's `offset`); a no-op elsewhere."""
    if not is_main:
        return NoMetrics()
    path = run_dir / "metrics.jsonl"
    if offset is not None:
        with open(path, "r+b") as fh:
            fh.truncate(offset)
    return MetricsLog(path, run_dir / "tensorboard" if tensorboard else None, resumed_step)


class TrainMeter:
    """Mean training loss and tokens/s since the last train line; tokens/s counts time inside training steps only."""

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.reset()

    def reset(self) -> None:
        self.loss, self.n, self.tokens, self.seconds = 0.0, 0, 0, 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        if math.isfinite(loss):  # a skipped (NaN) batch does not enter the mean
            self.loss += loss
            self.n += 1
        self.tokens += tokens
        self.seconds += seconds

    def should_log(self, step: int, task_end: bool) -> bool:
        return step % self.log_every == 0 or task_end

    def line(self) -> tuple[float, float]:
        """(mean loss, tokens/s) of the window; then a new window starts."""
        mean, tps = self.loss / max(self.n, 1), self.tokens / max(self.seconds, 1e-9)
        self.reset()
        return mean, tps
