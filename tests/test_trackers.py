"""logging.trackers: TensorBoard, W&B (offline) and MLflow (file store) get the config, the series and the summary, read back
from what each wrote on disk; a resumed run gives no step twice."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

import cpt
from cpt.config import validate
from cpt.errors import CptError
from tests.conftest import tiny_config


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (`run-<id>.wandb`: a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def _wandb_run(run: Path) -> tuple[dict, dict[str, list[tuple[int, float]]], dict]:
    """(config, series key → [(step, value)], summary) over every offline W&B run file of the cpt run, in order."""
    config, series, summary = {}, {}, {}
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind in ("run", "config"):
                items = record.run.config.update if kind == "run" else record.config.update
                config.update({u.key: json.loads(u.value_json) for u in items})
            elif kind == "history":
                row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                for key, value in row.items():
                    if not key.startswith("_"):
                        series.setdefault(key, []).append((row["_step"], value))
            elif kind == "summary":
                summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in record.summary.update})
    return config, series, summary


def _tensorboard(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    start = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in start.session_start_info.hparams.items()}
    return hparams, series


def _mlflow(run: Path):
    from mlflow.tracking import MlflowClient

    state = json.loads((run / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(state["tracking_uri"])
    info = client.get_run(state["run_id"])
    keys = info.data.metrics.keys()
    series = {k: [(m.step, m.value) for m in sorted(client.get_metric_history(state["run_id"], k), key=lambda m: m.step)] for k in keys}
    return client, info, series


def test_every_tracker_holds_the_config_series_and_summary_and_a_resume_adds_no_step_twice(small_texts, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(
        small_texts,
        training={"eval_every": 8},
        logging={"trackers": ["tensorboard", "wandb", "mlflow"], "log_every": 2, "progress": False},
        checkpoint={"every": 8, "task_ends": False, "keep": 20},
    )
    run = tmp_path / "run"
    summary = cpt.train(validate(cfg), run)
    records = _metrics(run)
    train = [(m["step"], m["loss"]) for m in records if m["type"] == "train"]
    evals = {t: [(m["step"], m["losses"][t]) for m in records if m["type"] == "eval"] for t in ("en", "fr")}
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    assert len(train) > 10 and len(evals["en"]) > 3

    def same(points, expected):
        assert [s for s, _ in points] == [s for s, _ in expected]  # the same steps, each once
        assert [v for _, v in points] == pytest.approx([v for _, v in expected], rel=1e-6)

    def check(series):
        same(series["train/loss"], train)
        for task in ("en", "fr"):
            same(series[f"eval/{task}"], evals[task])  # one series per task, step 0 included
        same(series["loss_matrix/en/fr"], [(summary["task_boundaries"][0], summary["loss_matrix"][0][1])])
        same(series["loss_matrix/fr/en"], [(summary["steps"], summary["loss_matrix"][1][0])])

    def check_all():
        # W&B (offline): the run id is cpt's, the config flattened, the series at their steps, the final numbers in the summary
        wb_config, wb_series, wb_summary = _wandb_run(run)
        assert {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")} == {run_id}
        assert wb_config["training.lr"] == 3e-3 and wb_config["tasks.1.name"] == "fr"
        check(wb_series)
        assert wb_summary["summary/avg_final_loss"] == pytest.approx(summary["avg_final_loss"])
        assert wb_summary["summary/forgetting_score"] == pytest.approx(summary["forgetting_score"])
        assert json.loads(next((run / "wandb").glob("offline-run-*/files/summary.json")).read_text())["steps"] == summary["steps"]
        # the run's own report as an artifact: the loss-matrix heatmap inlined, as `cpt report RUN` writes it
        report = next((run / "wandb").glob("offline-run-*/files/report.html")).read_text()
        assert "data:image/png;base64," in report and summary["run"] in report
        # MLflow (file:<run>/mlruns): parameters, the series, the final metrics, summary.json as an artifact
        client, info, ml_series = _mlflow(run)
        assert info.data.params["training.lr"] == "0.003" and info.data.params["tasks.0.name"] == "en"
        assert info.info.status == "FINISHED"
        check(ml_series)
        same(ml_series["summary/avg_final_loss"], [(summary["steps"], summary["avg_final_loss"])])
        assert {"summary.json", "report.html"} <= {a.path for a in client.list_artifacts(info.info.run_id)}
        # TensorBoard: hyper-parameters, the series, the final metrics
        hparams, tb_series = _tensorboard(run)
        assert hparams["training.lr"] == pytest.approx(3e-3) and hparams["tasks.1.name"] == "fr"
        check(tb_series)
        same(tb_series["summary/avg_final_loss"], [(summary["steps"], summary["avg_final_loss"])])
        return wb_series

    check_all()
    # go back to an earlier checkpoint, as after a kill: the steps after it are trained and logged again
    from cpt.training import checkpoint as ckpt

    kept = ckpt.list_checkpoints(run / "checkpoints")
    assert kept[6].name == "step-00000048"  # just after the task boundary: the resume trains and evaluates again from there
    for later in kept[7:]:
        shutil.rmtree(later)
    (run / "summary.json").unlink()
    again = cpt.train(None, run, resume=True)
    assert again["loss_matrix"] == summary["loss_matrix"]
    assert [(m["step"], m["loss"]) for m in _metrics(run) if m["type"] == "train"] == train
    wb_series = check_all()  # the same series as before: no step twice, none lost, in every tracker
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2  # the resume continued W&B run `run_id` (a second offline file)
    assert all(len({s for s, _ in v}) == len(v) for v in wb_series.values())


def test_a_tracker_whose_package_is_missing_fails_in_one_line_naming_the_extra(small_texts, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    cfg = tiny_config(small_texts, logging={"trackers": ["wandb"], "progress": False})
    with pytest.raises(CptError, match=r"^logging.trackers: wandb needs the wandb package \(pip install 'cpt\[wandb\]'\)$"):
        cpt.train(validate(cfg), tmp_path / "run")


def test_logging_tensorboard_still_turns_tensorboard_on(small_texts):
    from cpt.training.metrics import tracker_names

    assert tracker_names(validate(tiny_config(small_texts, logging={"tensorboard": True}))) == ["tensorboard"]
    assert tracker_names(validate(tiny_config(small_texts, logging={"tensorboard": True, "trackers": ["mlflow", "tensorboard"]}))) == [
        "mlflow",
        "tensorboard",
    ]
    with pytest.raises(CptError, match="logging.trackers"):
        validate(tiny_config(small_texts, logging={"trackers": ["comet"]}))
