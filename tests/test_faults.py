"""Faults: signals, SIGKILL mid-task, corrupted checkpoints, and refusing bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import cpt
from cpt.config import validate
from cpt.errors import CptError
from cpt.training.signals import PREEMPTED_EXIT_CODE
from tests.conftest import tiny_config


def _config(small_texts, tmp_path, **extra):
    cfg = tiny_config(
        small_texts,
        replay={"rate": 0.25, "buffer": {"capacity": 40, "capacity_unit": "sequences"}},
        alignment={"method": "reptile", "k": 6, "beta": 0.5},
        checkpoint={"every": 5, "keep": 3, "task_ends": False},
        **extra,
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(cfg_path, out):
    return subprocess.Popen(
        [sys.executable, "-m", "cpt", "train", str(cfg_path), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_step(out, task_index, min_step, proc, timeout=120):
    """Block until metrics.jsonl shows a train line of `task_index` at or beyond `min_step`."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read()
        path = out / "metrics.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec["type"] == "train" and rec["task_index"] == task_index and rec["step"] >= min_step:
                    return rec["step"]
        time.sleep(0.05)
    raise AssertionError("the run did not reach the step in time")


@pytest.fixture(scope="module")
def reference(small_texts, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    return cpt.train(validate(yaml.safe_load(_config(small_texts, d).read_text())), d / "run")


def test_sigkill_mid_task_then_resume_gives_the_same_summary(small_texts, tmp_path, reference):
    out = tmp_path / "killed"
    proc = _start(_config(small_texts, tmp_path), out)
    first_task_steps = reference["task_boundaries"][0]
    _wait_for_step(out, 1, first_task_steps + 12, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "cpt", "train", "--resume", str(out)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step" in resumed.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["loss_matrix"] == reference["loss_matrix"]
    for key in ("steps", "tokens", "replay_fraction", "meta_updates", "forgetting_score"):
        assert s[key] == reference[key], key


def test_sigterm_writes_a_checkpoint_and_exits_with_the_documented_code(small_texts, tmp_path):
    out = tmp_path / "term"
    proc = _start(_config(small_texts, tmp_path), out)
    _wait_for_step(out, 0, 8, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    assert "cpt train --resume" in err
    from cpt.training import checkpoint

    ckpts = sorted((out / "checkpoints").glob("step-*"))
    state_step = int(ckpts[-1].name.split("-")[1])
    assert state_step >= 8 and f"after step {state_step};" in err  # the step it stopped at
    assert checkpoint.verify(ckpts[-1]) is None
    assert not (out / "summary.json").exists()


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(small_texts, tmp_path, reference):
    out = tmp_path / "corrupt"
    cpt.train(validate(yaml.safe_load(_config(small_texts, tmp_path).read_text())), out)
    (out / "summary.json").unlink()
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    with open(ckpts[-1] / "state.pt", "r+b") as fh:  # truncate the newest one
        fh.truncate(1000)
    lines = []
    from cpt.training import checkpoint

    found = checkpoint.load_latest(out / "checkpoints", lines.append)
    assert found[0] == ckpts[-2]
    assert len(lines) == 1 and "does not match its checksum" in lines[0] and ckpts[-1].name in lines[0]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"replay": {"rate": 1.0}}, "replay.rate"),
        ({"alignment": {"k": 0}}, "alignment.k"),
        ({"alignment": {"beta": 0.0}}, "alignment.beta"),
        ({"alignment": {"beta": 1.5}}, "alignment.beta"),
        ({"tasks": [{"name": "en", "path": "x.txt", "tokens": -5}]}, "tasks.0.tokens"),
    ],
)
def test_out_of_range_values_are_refused(change, message, small_texts):
    cfg = tiny_config(small_texts)
    cfg.update(change)
    with pytest.raises(CptError, match=message.replace(".", r"\.")):
        validate(cfg)


def test_bad_data_is_refused_before_anything_is_written(small_texts, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"Doc {i}." for i in range(40)))
    cases = [
        ({"tasks": [{"name": "en", "path": str(tmp_path / "nope.txt"), "tokens": 1000}]}, "nope.txt: data file"),
        ({"tasks": [{"name": "en", "path": str(short), "tokens": 1000}]}, "less than one global batch"),
    ]
    for change, message in cases:
        cfg = tiny_config(small_texts)
        for key, value in change.items():
            cfg[key] = value if key == "tasks" else {**cfg[key], **value}
        with pytest.raises(CptError, match=message):
            cpt.train(validate(cfg), tmp_path / "never")
    assert not (tmp_path / "never" / "summary.json").exists()


def test_token_ids_outside_the_vocabulary_and_too_long_sequences_are_refused(small_texts, tmp_path):
    """A tokenizer larger than the model's embedding table (e.g. a mismatched model.init)."""
    seq = tmp_path / "seq"
    cpt.train(validate(tiny_config(small_texts, tokenizer={"vocab_size": 300})), seq)
    cfg = tiny_config(small_texts, tokenizer={"vocab_size": 1024})
    cfg["model"] = {"init": str(seq / "checkpoints" / "final")}
    cfg["tokenizer"]["path"] = str(tmp_path / "tok.json")
    from cpt.data.tokenizer import train_bpe
    from tests.conftest import corpus_docs

    train_bpe(corpus_docs("en")[:50], 1024).save(cfg["tokenizer"]["path"])
    with pytest.raises(CptError, match="outside the model's vocabulary"):
        cpt.train(validate(cfg), tmp_path / "bad")
    # and a sequence longer than the checkpoint's positions (the tiny preset has 1024)
    cfg["tokenizer"]["path"] = str(seq / "checkpoints" / "final" / "tokenizer.json")
    cfg["training"]["seq_len"] = 2048
    with pytest.raises(CptError, match="training.seq_len: 2048 exceeds the model's 1024 positions"):
        cpt.train(validate(cfg), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_nan_loss_stops_with_a_message_after_the_allowed_skips(small_texts, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    seq = tmp_path / "seq"
    cpt.train(validate(tiny_config(small_texts, tokenizer={"vocab_size": 300})), seq)
    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(seq / "checkpoints" / "final")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every forward pass now gives a NaN loss
    model.save_pretrained(broken)
    (broken / "tokenizer.json").write_bytes((seq / "checkpoints" / "final" / "tokenizer.json").read_bytes())
    cfg = tiny_config(small_texts, training={"nan_skip": 2})
    cfg["model"] = {"init": str(broken)}
    cfg["tokenizer"] = {"path": str(broken / "tokenizer.json")}
    with pytest.raises(CptError, match=r"step 2: the training loss is nan \(NaN/Inf\); stopping"):
        cpt.train(validate(cfg), tmp_path / "nan")


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MB filesystem (tmpfs), so a checkpoint write hits a genuine 'No space left'."""
    import shutil as sh

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or not sh.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_never_leaves_a_half_written_checkpoint_as_the_latest(small_disk):
    import torch

    from cpt.training import checkpoint

    root = small_disk / "checkpoints"
    small = {"w": torch.zeros(100_000)}  # 0.4 MB: fits
    checkpoint.save_checkpoint(root, 10, small, keep=3)
    big = {"w": torch.zeros(1_000_000)}  # 4 MB: the disk fills up half way
    with pytest.raises(
        CptError, match=r"step-00000020: could not write the checkpoint .*MiB free on that disk\); earlier checkpoints are intact"
    ):
        checkpoint.save_checkpoint(root, 20, big, keep=3)
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step-00000010"]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]  # the partial write is gone
    found = checkpoint.load_latest(root, print)
    assert found[0].name == "step-00000010" and torch.equal(found[1]["w"], small["w"])
