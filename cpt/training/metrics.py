"""What a run writes while it trains: `metrics.jsonl` (and the experiment trackers), and the train-loss meter.

`MetricsLog` appends one JSON object per line, flushed per line so a killed run keeps what it
measured, and forwards every record to the trackers of `logging.trackers` (cpt.training.trackers:
TensorBoard, W&B, MLflow); a resumed run truncates the file to the offset its checkpoint recorded and
the trackers skip what they already hold, so each step appears once. Ranks other than 0 get
`NoMetrics`. `TrainMeter` accumulates the training loss and tokens/s between train lines and
decides when to write one (`should_log`): every `logging.log_every` steps and at each task end.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cpt.training.trackers import open_trackers

if TYPE_CHECKING:
    from cpt.config import RunConfig


class MetricsLog:
    """Append-only JSON lines; flushed per line so a killed run keeps what it measured. Each record also goes to the trackers."""

    def __init__(self, path: Path, trackers: list | None = None):
        self.path = path
        self.fh = open(path, "a", encoding="utf-8")
        self.trackers = trackers or []

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        for tracker in self.trackers:
            tracker.log(record)

    def offset(self) -> int:
        self.fh.flush()
        return self.fh.tell()

    def close(self) -> None:
        """Closes metrics.jsonl. The trackers stay open for the summary (`log_summary`), unless the run is failing or stopping:
        called while an exception propagates (a preemption, an error), they are closed now, marked failed."""
        self.fh.close()
        if sys.exc_info()[0] is not None:
            self._close_trackers(failed=True)

    def log_summary(self, summary: dict, log=print) -> None:
        """The summary's numbers, summary.json and the run's own report (`<run>/report/report.html`, written here, only
        when some tracker is open: the figures a tracker's UI does not draw, e.g. the loss-matrix heatmap) to every
        tracker, which are then closed. A report that cannot be written is said in one line; the run stays finished."""
        run_dir = self.path.parent
        artifacts = [run_dir / "summary.json"]
        if self.trackers:
            from cpt.report import write_report

            try:
                artifacts.append(
                    write_report([run_dir], run_dir / "report", title=f"cpt report: {summary.get('run', run_dir.name)}")["report.html"]
                )
            except Exception as err:  # noqa: BLE001 — a figure failing must not fail a finished run
                log(f"trackers: the run's report was not written ({type(err).__name__}: {err}); summary.json is logged")
        for tracker in self.trackers:
            tracker.log_summary(summary)
            for artifact in artifacts:
                if artifact.is_file():
                    tracker.log_artifact(artifact)
        self._close_trackers(failed=False)

    def _close_trackers(self, failed: bool) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed=failed)


class NoMetrics:
    """What ranks other than 0 write: nothing."""

    def write(self, record: dict) -> None:
        pass

    def offset(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def log_summary(self, summary: dict, log=print) -> None:
        pass


def tracker_names(cfg: RunConfig) -> list[str]:
    """`logging.trackers`, with tensorboard added for the older `logging.tensorboard: true`."""
    names = list(cfg.logging.trackers)
    if cfg.logging.tensorboard and "tensorboard" not in names:
        names.insert(0, "tensorboard")
    return names


def open_metrics(
    run_dir: Path, is_main: bool, cfg: RunConfig, resumed_step: int | None, offset: int | None, run_id: str | None = None
) -> MetricsLog | NoMetrics:
    """Rank 0's log (truncated to a resumed checkpoint's `offset`) and its trackers, given the config; a no-op elsewhere."""
    if not is_main:
        return NoMetrics()
    path = run_dir / "metrics.jsonl"
    if offset is not None:
        with open(path, "r+b") as fh:
            fh.truncate(offset)
    trackers = open_trackers(tracker_names(cfg), run_dir, run_id, cfg.name or run_dir.name, resumed_step)
    for tracker in trackers:
        tracker.log_config(cfg.model_dump(mode="json"))
    return MetricsLog(path, trackers)


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
