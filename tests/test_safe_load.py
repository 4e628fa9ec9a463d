"""Checkpoints load with torch.load(weights_only=True): a run directory from elsewhere cannot run code.

A real run (replay, Reptile, the gradient probe, periodic checkpoints) writes only tensors and plain
values, resumes exactly from them, and a tampered `state.pt` whose pickle would run code (create a
marker file) is refused by resume and by `cpt export` without the code running.
"""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

import cpt
from cpt.cli import main
from cpt.config import validate
from cpt.errors import CptError
from cpt.training import checkpoint
from tests.conftest import tiny_config


class _Payload:
    """Unpickling this calls open(marker, "w"): it creates the marker file, the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _fix_manifest(step_dir, name="state.pt"):
    """Re-sign a file in the manifest, as an attacker would, so the checkpoint verifies."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((step_dir / name).read_bytes()).hexdigest()
    (step_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    assert checkpoint.verify(step_dir) is None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_texts):
    out = tmp_path_factory.mktemp("safe") / "run"
    cfg = tiny_config(
        small_texts,
        replay={"rate": 0.25, "buffer": {"capacity": 40, "capacity_unit": "sequences"}},
        alignment={"method": "reptile", "k": 6, "beta": 0.5, "probe_every": 7},
        checkpoint={"every": 10, "keep": 50},
    )
    cpt.train(validate(cfg), out)
    return out


def _mid_second_task(run_dir):
    """A step checkpoint inside the second task: replay rows are drawn ahead and stored in it."""
    summary = json.loads((run_dir / "summary.json").read_text())
    end_of_first = summary["task_boundaries"][0]
    steps = [p for p in checkpoint.list_checkpoints(run_dir / "checkpoints") if int(p.name[5:]) > end_of_first + 5]
    return steps[0]


def _resume_from(run_dir, tmp_path, capsys, step_name, tamper=None):
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    ckpts = checkpoint.list_checkpoints(copy / "checkpoints")
    mid = copy / "checkpoints" / step_name
    for later in ckpts[ckpts.index(mid) + 1 :]:
        shutil.rmtree(later)
    (copy / "summary.json").unlink()
    if tamper is not None:
        tamper(mid)
    capsys.readouterr()
    summary = cpt.train(None, copy, resume=True)
    err = capsys.readouterr().err
    assert f"resumed at step {int(step_name[5:])}/" in err and "warning" not in err, err[-2000:]
    return summary


def _same_run(resumed, original):
    assert resumed["loss_matrix"] == original["loss_matrix"]
    for key in ("steps", "tokens", "replay_fraction", "meta_updates", "forgetting_score"):
        assert resumed[key] == original[key], key


def test_every_checkpoint_of_a_real_run_is_plain_tensors_and_values(run_dir):
    ckpts = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert len(ckpts) > 5
    for step_dir in ckpts:
        # torch's own weights-only set, without cpt's allowance for older checkpoints' numpy rows
        for name in ("state.pt", "rank-0.pt"):
            assert torch.serialization.get_unsafe_globals_in_checkpoint(step_dir / name) == [], step_dir / name
        state = torch.load(step_dir / "state.pt", map_location="cpu", weights_only=True)
        assert state["reptile"]["anchor"] and state["probe"]["rng"]["bit_generator"] == "PCG64"
    ready = checkpoint.load_state(_mid_second_task(run_dir) / "rank-0.pt")["sources"]["ready"]
    assert ready and all(isinstance(v, torch.Tensor) and v.dtype == torch.int64 for v in ready.values())


def test_a_run_resumes_exactly_from_a_weights_only_checkpoint(run_dir, tmp_path, capsys):
    original = json.loads((run_dir / "summary.json").read_text())
    _same_run(_resume_from(run_dir, tmp_path, capsys, _mid_second_task(run_dir).name), original)


def test_a_checkpoint_written_before_ready_rows_were_tensors_still_resumes_exactly(run_dir, tmp_path, capsys):
    """Older cpt stored the drawn replay rows as int64 numpy arrays; those runs must still resume."""

    def as_numpy(step_dir):
        own = torch.load(step_dir / "rank-0.pt", map_location="cpu", weights_only=True)
        own["sources"]["ready"] = {k: v.numpy() for k, v in own["sources"]["ready"].items()}
        torch.save(own, step_dir / "rank-0.pt")
        _fix_manifest(step_dir, "rank-0.pt")
        assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(step_dir / "rank-0.pt")

    original = json.loads((run_dir / "summary.json").read_text())
    _same_run(_resume_from(run_dir, tmp_path, capsys, _mid_second_task(run_dir).name, tamper=as_numpy), original)


def _poison(step_dir, marker):
    state = torch.load(step_dir / "state.pt", map_location="cpu", weights_only=True)
    state["progress"]["payload"] = _Payload(marker)
    torch.save(state, step_dir / "state.pt")
    _fix_manifest(step_dir)


def test_the_payload_is_real(tmp_path):
    """The poisoned file does run code when loaded the unsafe way: the refusals below mean something."""
    marker = tmp_path / "ran"
    torch.save({"x": _Payload(marker)}, tmp_path / "state.pt")
    torch.load(tmp_path / "state.pt", weights_only=False)
    assert marker.exists()


def test_resume_refuses_a_checkpoint_that_would_run_code_and_uses_the_previous(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    ckpts = checkpoint.list_checkpoints(copy / "checkpoints")
    marker = tmp_path / "code-ran"
    _poison(ckpts[-1], marker)
    lines = []
    found = checkpoint.load_latest(copy / "checkpoints", lines.append)
    assert not marker.exists()
    assert found[0] == ckpts[-2]
    assert len(lines) == 1 and ckpts[-1].name in lines[0] and "state.pt" in lines[0]
    assert "refused: it holds a pickled io.open" in lines[0] and "\n" not in lines[0]
    with pytest.raises(CptError, match=r"state\.pt: refused"):
        checkpoint.load_state(ckpts[-1] / "state.pt")
    assert not marker.exists()


def test_export_refuses_a_checkpoint_that_would_run_code(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    step_dir = checkpoint.list_checkpoints(copy / "checkpoints")[-1]
    marker = tmp_path / "code-ran"
    _poison(step_dir, marker)
    out = tmp_path / "hf"
    capsys.readouterr()
    assert main(["export", str(copy), "--checkpoint", step_dir.name, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(step_dir / "state.pt") in err[0] and "refused" in err[0], err
    assert not marker.exists()
    assert not out.exists() and not list(tmp_path.glob(".hf*"))
    # the same step, unpoisoned, exports (weights_only=True reads a real checkpoint)
    clean = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]
    assert main(["export", str(run_dir), "--checkpoint", clean.name, "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()


def test_a_state_file_that_is_not_a_checkpoint_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "state.pt"
    bad.write_bytes(b"not a zip and not a pickle")
    with pytest.raises(CptError) as info:
        checkpoint.load_state(bad)
    assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value)
    arr = tmp_path / "objects.pt"  # numpy objects other than int64 arrays stay refused
    torch.save({"x": np.array([1.5, 2.5])}, arr)
    with pytest.raises(CptError, match="refused"):
        checkpoint.load_state(arr)
