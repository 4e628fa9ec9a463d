"""Experiment trackers (`logging.trackers`): TensorBoard, Weights & Biases, MLflow behind one small interface.

Each tracker gets what metrics.jsonl gets — the resolved config once (`log_config`, flattened to dotted
keys as hyper-parameters), every record (`log`: train lines, held-out evaluations as one series per
task `eval/<task>`, the loss matrix cell by cell at each task end `loss_matrix/<row>/<task>`, probe,
meta_update and merge events), the summary's numbers at the end (`log_summary`) and summary.json
(`log_artifact`). Only rank 0 opens them (cpt.training.metrics.open_metrics).

A resumed run re-logs the steps after its checkpoint, which the tracker may already hold from the run
that was killed. TensorBoard drops its own later events (`purge_step`); W&B and MLflow keep the last
step they were sent in `<run>/trackers.json` and, on a resume, skip every record at or before it, so a
series never gets a point twice and W&B's steps keep increasing. W&B's run id is the cpt run id
(run.json) with `resume="allow"`; MLflow's run id is kept in trackers.json: a resume continues the same
tracker run. The packages are optional extras, imported only when asked for.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
import time
from pathlib import Path
from typing import Protocol

from cpt import atomic
from cpt.errors import CptError

STATE = "trackers.json"  # in the run directory: each tracker's last logged step and MLflow's run id


class Tracker(Protocol):
    """What metrics.jsonl's writer forwards to an experiment tracker."""

    def log_config(self, config: dict) -> None: ...

    def log(self, record: dict) -> None: ...

    def log_summary(self, summary: dict) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def close(self, failed: bool = False) -> None: ...


# ------------------------------------------------------------------ what a record becomes
def flatten(value, prefix: str = "") -> dict:
    """Nested dicts and lists as one level of dotted keys (`tasks.0.name`), the hyper-parameters' shape."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out: dict = {}
    for key, v in items:
        out.update(flatten(v, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def metrics_of(record: dict, row_names: dict[int, str]) -> dict[str, float]:
    """The scalar series of one metrics.jsonl record; `row_names` (task index → name) names the loss-matrix rows."""
    kind = record.get("type")
    out: dict[str, float | None] = {}
    if kind == "train":
        row_names[record["task_index"]] = record["task"]
        for key in ("loss", "lr", "tokens_per_second", "replay_wait_seconds"):
            out[f"train/{key}"] = _number(record.get(key))
    elif kind == "eval":
        for name, value in record["losses"].items():
            out[f"eval/{name}"] = _number(value)
        for name, value in record.get("replay_sources", {}).items():  # replay.sources: not tasks, kept apart
            out[f"eval_replay_source/{name}"] = _number(value)
        if record.get("task_end"):
            row = row_names.get(record["task_index"], str(record["task_index"]))
            for name, value in record["losses"].items():
                out[f"loss_matrix/{row}/{name}"] = _number(value)
    elif kind == "probe":
        for name, value in record["cosine"].items():
            out[f"probe/{name}"] = _number(value)
    elif kind in ("meta_update", "merge"):
        out[f"{kind}/count"] = _number(record.get("count"))
    return {k: v for k, v in out.items() if v is not None}


def summary_metrics(summary: dict) -> dict[str, float]:
    """The summary's numbers (nested dicts flattened, lists left out: the loss matrix is logged cell by cell)."""

    def walk(value, prefix):
        if isinstance(value, dict):
            for key, v in value.items():
                yield from walk(v, f"{prefix}/{key}")
        elif (number := _number(value)) is not None:
            yield prefix, number

    return dict(walk({k: v for k, v in summary.items() if k != "loss_matrix"}, "summary"))


def _import(module: str, extra: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise CptError(f"logging.trackers: {extra} needs the {package} package (pip install 'cpt[{extra}]')") from None


class _State:
    """`<run>/trackers.json`: per tracker its last logged step (and MLflow's run id), rewritten when a step advances."""

    def __init__(self, run_dir: Path, name: str):
        self.path, self.name = run_dir / STATE, name
        self.data = self._read().get(name, {})

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def save(self, **values) -> None:
        self.data.update(values)
        everything = self._read()
        everything[self.name] = self.data
        atomic.write_json(self.path, everything, indent=1)


class _Stepped:
    """Skips, on a resume, the records at or before the last step the tracker was sent (it holds them already)."""

    def __init__(self, state: _State, resumed: bool):
        self.state = state
        self.cutoff = state.data.get("last_step", -1) if resumed else -1
        self.last_step = self.cutoff
        self.row_names: dict[int, str] = {}

    def log(self, record: dict) -> None:
        step = int(record.get("step", 0))
        if record.get("type") == "train":  # the row names, even from a skipped line
            self.row_names[record["task_index"]] = record["task"]
        if step <= self.cutoff:
            return
        metrics = metrics_of(record, self.row_names)
        if metrics:
            self.send(metrics, step)
        if step > self.last_step:
            self.last_step = step
            self.state.save(last_step=step)

    def send(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError


# ------------------------------------------------------------------ TensorBoard
class TensorBoardTracker:
    """`<run>/tensorboard`: scalars per record, the config as hyper-parameters (the HParams tab), the summary's numbers."""

    def __init__(self, run_dir: Path, resumed_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter  # why lazy: needs the optional tensorboard (cpt[tensorboard])
        except ImportError:
            raise CptError("logging.trackers: tensorboard needs the tensorboard package (pip install 'cpt[tensorboard]')") from None
        # a resumed run re-logs the steps after its checkpoint: TensorBoard drops the events the killed
        # run wrote after it (steps > the checkpoint's), as metrics.jsonl is truncated to its offset
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=None if resumed_step is None else resumed_step + 1)
        self.resumed = resumed_step is not None
        self.row_names: dict[int, str] = {}
        self.step = 0

    def log_config(self, config: dict) -> None:
        if self.resumed:  # written once, by the run's first start
            return
        from torch.utils.tensorboard.summary import hparams

        params = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flatten(config).items()}
        metric_names = {name: 0.0 for name in ("summary/avg_final_loss", "summary/forgetting_score")}  # the columns HParams shows
        for summary in hparams(params, metric_names):
            self.tb.file_writer.add_summary(summary)

    def log(self, record: dict) -> None:
        self.step = max(self.step, int(record.get("step", 0)))
        for key, value in metrics_of(record, self.row_names).items():
            self.tb.add_scalar(key, value, record.get("step", 0))

    def log_summary(self, summary: dict) -> None:
        step = summary.get("steps", self.step)
        for key, value in summary_metrics(summary).items():
            self.tb.add_scalar(key, value, step)

    def log_artifact(self, path: Path) -> None:
        """TensorBoard keeps no files; summary.json sits next to its events in the run directory."""

    def close(self, failed: bool = False) -> None:
        self.tb.close()


# ------------------------------------------------------------------ Weights & Biases
def wandb_mode() -> str:
    """WANDB_MODE when set; otherwise online with an API key (WANDB_API_KEY or `wandb login`'s netrc entry), else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).split("/")[0]
    try:
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class WandbTracker(_Stepped):
    """A W&B run with the cpt run id (`resume="allow"`: a resumed cpt run continues it); files under `<run>/wandb`.

    Project: WANDB_PROJECT or "cpt". Offline unless an API key is configured (`wandb sync <run>/wandb/offline-run-*`
    uploads it later)."""

    def __init__(self, run_dir: Path, run_id: str | None, name: str, resumed: bool):
        wandb = _import("wandb", "wandb", "wandb")
        super().__init__(_State(run_dir, "wandb"), resumed)
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "cpt"),
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=wandb_mode(),
            settings=settings,
        )
        self.cutoff = self.last_step = max(self.cutoff, (self.run.step or 0) - 1) if resumed else self.cutoff

    def log_config(self, config: dict) -> None:
        self.run.config.update(flatten(config), allow_val_change=True)

    def send(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_summary(self, summary: dict) -> None:
        self.run.summary.update(summary_metrics(summary))

    def log_artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# ------------------------------------------------------------------ MLflow
_MLFLOW_KEY = re.compile(r"[^\w\-. /:]")  # what MLflow accepts in metric and parameter names


class MlflowTracker(_Stepped):
    """An MLflow run in `file:<run>/mlruns` (or MLFLOW_TRACKING_URI), experiment MLFLOW_EXPERIMENT_NAME or "cpt".

    Its run id is kept in `<run>/trackers.json`, so a resumed cpt run logs into the same MLflow run. The file store needs
    no server and no database package (mlflow-skinny has none); MLflow 3 asks for MLFLOW_ALLOW_FILE_STORE=true to use it,
    which this sets when unset."""

    def __init__(self, run_dir: Path, name: str, resumed: bool):
        tracking = _import("mlflow.tracking", "mlflow", "mlflow-skinny")
        entities = _import("mlflow.entities", "mlflow", "mlflow-skinny")
        super().__init__(_State(run_dir, "mlflow"), resumed)
        self.Metric, self.Param = entities.Metric, entities.Param
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if self.uri.startswith("file:"):  # MLflow 3 refuses its file store (in "maintenance mode") unless this is set
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = tracking.MlflowClient(self.uri)
        run_id = self.state.data.get("run_id") if resumed else None
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "cpt")
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
            run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            self.state.save(run_id=run_id, tracking_uri=self.uri)
        self.run_id = run_id

    @staticmethod
    def _key(key: str) -> str:
        return _MLFLOW_KEY.sub("_", key)

    def log_config(self, config: dict) -> None:
        if self.cutoff >= 0:  # a resume: the run holds its (immutable) parameters already
            return
        params = [self.Param(self._key(k), str(v)[:500]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def send(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [self.Metric(self._key(k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_summary(self, summary: dict) -> None:
        if self.state.data.get("summary_logged"):  # a finished run resumed from an earlier checkpoint: no second final point
            return
        self.send(summary_metrics(summary), int(summary.get("steps", max(self.last_step, 0))))
        self.state.save(summary_logged=True)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "KILLED" if failed else "FINISHED")


def open_trackers(names: list[str], run_dir: Path, run_id: str | None, run_name: str, resumed_step: int | None) -> list:
    """The trackers `logging.trackers` names, in that order; each opened for rank 0 of a new or a resumed run."""
    resumed = resumed_step is not None
    out = []
    try:
        for name in dict.fromkeys(names):
            if name == "tensorboard":
                out.append(TensorBoardTracker(run_dir, resumed_step))
            elif name == "wandb":
                out.append(WandbTracker(run_dir, run_id, run_name, resumed))
            elif name == "mlflow":
                out.append(MlflowTracker(run_dir, run_name, resumed))
            else:
                raise CptError(f"logging.trackers: unknown tracker {name!r} (tensorboard, wandb, mlflow)")
    except BaseException:
        for tracker in out:  # the ones already open are not left running
            tracker.close(failed=True)
        raise
    return out
