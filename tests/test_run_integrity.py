"""Defects that would silently change what a run trains on or reports: each test fails without its fix."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

import cpt
from cpt.config import validate
from cpt.errors import CptError
from tests.conftest import free_port, tiny_config


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------- 1. a kept buffer and its owner
def test_a_kept_buffer_of_another_run_is_refused_and_overwrite_clears_its_own(small_texts, tmp_path):
    buf = tmp_path / "kept"
    cfg = tiny_config(small_texts, replay={"rate": 0.25, "buffer": {"dir": str(buf)}}, checkpoint={"task_ends": False})
    first = cpt.train(validate(cfg), tmp_path / "a")
    assert first["replay_fraction"][0] == 0.0  # nothing earlier than the first task
    # another run pointed at the same directory would replay a's rows as "earlier tasks": refused, nothing written
    with pytest.raises(CptError, match=r"replay.buffer.dir: .*kept holds another run's buffer .*replay.buffer.init"):
        cpt.train(validate(cfg), tmp_path / "b")
    assert not (tmp_path / "b").exists()
    # as if a earlier ran on 2 ranks: a second shard that a start on 1 rank would leave behind as stale rows
    for f in buf.glob("shard-000.*"):
        shutil.copyfile(f, buf / f.name.replace("shard-000", "shard-001"))
    # the same run again with --overwrite starts from an empty buffer: same loss matrix, task 0 replays nothing
    again = cpt.train(validate(cfg), tmp_path / "a", overwrite=True)
    assert not list(buf.glob("shard-001.*"))  # the other rank's shard is gone too
    assert again["replay_fraction"][0] == 0.0 and again["loss_matrix"] == first["loss_matrix"]
    meta = json.loads((buf / "shard-000.meta.json").read_text())
    assert meta["owner"]["run_dir"] == str((tmp_path / "a").resolve())
    assert meta["fill"] * 64 == again["tokens"]["new"]  # only this run's rows


def test_a_sweep_gives_each_run_its_own_buffer(small_texts, tmp_path):
    from cpt.sweep import load_sweep

    base = tiny_config(small_texts, replay={"rate": 0.25, "buffer": {"dir": str(tmp_path / "buf")}})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"seed": [0, 1]}}))
    runs = load_sweep(tmp_path / "s.yaml").runs
    dirs = [r.config.replay.buffer.dir for r in runs]
    assert dirs == [str(tmp_path / "buf" / r.name) for r in runs] and len(set(dirs)) == 2


def _rows_by_task(replay_dir) -> dict[int, list[bytes]]:
    """Every stored row of a buffer directory, by task id, over all its shards (sorted: a multiset)."""
    from cpt.replay.buffer import ReplayBuffer

    out: dict[int, list[bytes]] = {}
    for meta_file in sorted(replay_dir.glob("shard-*.meta.json")):
        shard = int(meta_file.name[6:9])
        buf = ReplayBuffer.open(replay_dir, shard)
        for t, slots in json.loads(meta_file.read_text())["task_slots"]:
            rows = buf.read(np.asarray(sorted(slots), dtype=np.int64))[0]
            out.setdefault(int(t), []).extend(r.tobytes() for r in rows)
        buf.close()
    return {t: sorted(rows) for t, rows in sorted(out.items())}


def _hashes(directory) -> dict[str, str]:
    import hashlib

    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.rglob("*")) if f.is_file()}


def test_buffer_init_from_another_world_size_deals_its_rows_anew(small_texts, tmp_path):
    """A buffer written by 1 rank starts a 2-rank run, whose 2-shard buffer starts a 1-process run: each time every
    stored row is carried over (the same multiset per task id), split over the new ranks, the source only read."""
    cfg = tiny_config(small_texts, replay={"rate": 0.25}, checkpoint={"task_ends": False})
    cpt.train(validate(cfg), tmp_path / "a")
    source = tmp_path / "a" / "replay"
    before, rows_a = _hashes(source), _rows_by_task(source)
    assert sorted(rows_a) == [0, 1] and all(rows_a.values())
    # 2 ranks from a's 1 shard: tasks 2, 3 after a's 0, 1
    two = dict(cfg, replay={"rate": 0.25, "buffer": {"init": str(source)}}, training={**cfg["training"], "batch_size": 2})
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(two))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    proc = subprocess.run(
        [*cmd, "-m", "cpt", "train", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "b")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "its 1 shard(s) are dealt anew to this run's 2 rank(s)" in proc.stderr
    assert _hashes(source) == before  # only read
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert b["world_size"] == 2 and b["replay_fraction"][0] == pytest.approx(0.25)  # task 0 replays a's rows
    rows_b = _rows_by_task(tmp_path / "b" / "replay")
    assert {t: rows_b[t] for t in (0, 1)} == rows_a  # every row of a, once
    fills = [json.loads((tmp_path / "b" / "replay" / f"shard-00{r}.meta.json").read_text())["fill"] for r in (0, 1)]
    assert abs(fills[0] - fills[1]) <= 1
    assert not list((tmp_path / "b").glob(".replay-init*"))  # the dealt copy is gone
    # 1 process from b's 2 shards
    one = dict(cfg, replay={"rate": 0.25, "buffer": {"init": str(tmp_path / "b" / "replay")}})
    c = cpt.train(validate(one), tmp_path / "c")
    assert c["replay_fraction"][0] == pytest.approx(0.25)
    rows_c = _rows_by_task(tmp_path / "c" / "replay")
    assert {t: rows_c[t] for t in (0, 1, 2, 3)} == rows_b
    # another capacity than the buffer's is refused in one line
    from cpt.replay import ownership

    capped = dict(cfg, replay={"rate": 0.25, "buffer": {"init": str(source), "capacity": 100, "capacity_unit": "sequences"}})
    with pytest.raises(
        CptError, match=r"^replay.buffer.capacity: this run's buffer has room for 100 sequences but the buffer at .* for all"
    ):
        ownership.check_buffers(validate(capped), tmp_path / "d", "id", resume=False, world=2, dtype="uint16")


# ------------------------------------------------------------- 2 + 3. capacity is global; compile under DDP
def test_buffer_capacity_is_global_and_compile_takes_effect_under_ddp(small_texts, tmp_path):
    cfg = tiny_config(
        small_texts,
        training={"batch_size": 2, "compile": True},
        replay={"rate": 0.25, "buffer": {"capacity": 40, "capacity_unit": "sequences"}},
        checkpoint={"task_ends": False},
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "cpt", "train", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    shards = [json.loads((out / "replay" / f"shard-00{r}.meta.json").read_text()) for r in (0, 1)]
    assert [m["capacity_rows"] for m in shards] == [20, 20]  # 40 in all, not 40 per rank
    assert s["replay_buffer"]["capacity_sequences"] == 40 and s["replay_buffer"]["fill_sequences"] == 40
    assert s["compile"]["graphs"] > 0 and "model.model" in s["compile"]["modules"][0]
    assert "compile: model.model" in proc.stderr and "under DDP" in proc.stderr


# ------------------------------------------------------------- 4. model.init needs its tokenizer
def test_model_init_without_a_tokenizer_is_an_error(small_texts, tmp_path):
    from transformers import AutoModelForCausalLM

    seq = tmp_path / "seq"
    cpt.train(validate(tiny_config(small_texts, checkpoint={"task_ends": False})), seq)
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(seq / "checkpoints" / "final").save_pretrained(bare)  # weights only
    cfg = tiny_config(small_texts, tokenizer={"vocab_size": 300})  # a new BPE's ids fit the 512-row table: no other error
    cfg["model"] = {"init": str(bare)}
    (tmp_path / "init.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "cpt", "train", str(tmp_path / "init.yaml"), "--out", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"cpt: error: model.init: {bare} holds no tokenizer")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------- 5. a restart from scratch empties the buffer
def test_restart_without_a_checkpoint_starts_from_an_empty_buffer(small_texts, tmp_path):
    cfg = validate(tiny_config(small_texts, replay={"rate": 0.25}, checkpoint={"task_ends": False}))
    fresh = cpt.train(cfg, tmp_path / "fresh")
    run = tmp_path / "run"
    cpt.train(cfg, run)
    # as if killed before its first checkpoint: the buffer holds rows, no checkpoint verifies
    shutil.rmtree(run / "checkpoints")
    (run / "summary.json").unlink()
    again = cpt.train(None, run, resume=True)
    assert again["loss_matrix"] == fresh["loss_matrix"]
    assert json.loads((run / "replay" / "shard-000.meta.json").read_text())["fill"] * 64 == fresh["tokens"]["new"]


# ------------------------------------------------------------- 9. Reptile meta-updates at task ends
@pytest.mark.parametrize("at_task_end", [True, False])
def test_reptile_meta_updates_at_every_task_end(small_texts, tmp_path, at_task_end):
    cfg = tiny_config(
        small_texts, alignment={"method": "reptile", "k": 7, "beta": 0.5, "task_end_update": at_task_end}, checkpoint={"task_ends": False}
    )
    s = cpt.train(validate(cfg), tmp_path / "r")
    ends = s["task_boundaries"]
    assert all(e % 7 for e in ends)  # k does not line up with the task lengths
    updates = [m["step"] for m in _metrics(tmp_path / "r") if m["type"] == "meta_update"]
    if at_task_end:
        assert set(ends) <= set(updates)
        # k counts from each task's start: the first update of task 1 is 7 steps after task 0 ended
        assert min(u for u in updates if u > ends[0]) == ends[0] + 7
    else:
        assert not set(ends) & set(updates)
        assert updates == list(range(7, s["steps"] + 1, 7))


# ------------------------------------------------------------- 10. FIFO without the current task; short replay
def test_fifo_that_would_stop_replaying_is_refused():
    cfg = tiny_config({"en": "en.txt", "fr": "fr.txt"}, replay={"rate": 0.25, "buffer": {"policy": "fifo", "capacity": 1000}})
    with pytest.raises(CptError, match=r"replay.buffer.policy: fifo with a finite capacity and include_current: false stops replaying"):
        validate(cfg)
    cfg["replay"]["include_current"] = True
    validate(cfg)


def test_a_replay_fraction_below_the_rate_is_a_warning_in_the_summary(small_texts, tmp_path, capsys):
    # include_current: the first task's first steps find nothing stored yet, so they train on new rows only
    cfg = tiny_config(small_texts, replay={"rate": 0.5, "include_current": True}, checkpoint={"task_ends": False})
    s = cpt.train(validate(cfg), tmp_path / "r")
    assert s["replay_fraction"][0] < 0.5 - 1 / (4 * (s["task_boundaries"][0]))
    assert list(s["replay_warnings"]) == ["en"] and "below replay.rate 0.5" in s["replay_warnings"]["en"]
    assert "warning: task en: replay fraction" in capsys.readouterr().err


# ------------------------------------------------------------- smaller ones
def test_resume_refuses_changed_data(small_texts, tmp_path):
    texts = {k: tmp_path / f"{k}.txt" for k in ("en", "fr")}
    for k, p in texts.items():
        shutil.copy(small_texts[k], p)
    cfg = tiny_config(texts, checkpoint={"every": 5, "task_ends": False})
    run = tmp_path / "run"
    cpt.train(validate(cfg), run)
    (run / "summary.json").unlink()
    texts["fr"].write_text(texts["fr"].read_text() + "\n\nOne more paragraph appended later.\n")
    with pytest.raises(CptError, match=r"tasks.1 \(fr\): .*fr.txt changed since .* started"):
        cpt.train(None, run, resume=True)


def test_batches_skipped_for_nan_are_not_stored_nor_counted(small_texts, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    seq = tmp_path / "seq"
    cpt.train(validate(tiny_config(small_texts, checkpoint={"task_ends": False})), seq)
    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(seq / "checkpoints" / "final")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every batch now has a NaN loss
    model.save_pretrained(broken)
    cfg = tiny_config(small_texts, training={"nan_skip": 10_000}, replay={"rate": 0.25}, checkpoint={"task_ends": False})
    cfg["model"] = {"init": str(broken)}
    cfg["tokenizer"] = {"path": str(seq / "checkpoints" / "final" / "tokenizer.json")}
    s = cpt.train(validate(cfg), tmp_path / "nan")
    assert s["nan_skipped"] == s["steps"]
    assert s["tokens"] == {"new": 0, "replay": 0}
    assert s["replay_buffer"]["fill_sequences"] == 0


def test_tensorboard_has_each_step_once_after_a_resume(small_texts, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(
        small_texts,
        logging={"tensorboard": True, "log_every": 1, "progress": False},
        checkpoint={"every": 4, "task_ends": False, "keep": 10},
    )
    run = tmp_path / "run"
    cpt.train(validate(cfg), run)
    # go back to an earlier checkpoint, as after a kill: the steps after it are trained and logged again
    from cpt.training import checkpoint as ckpt

    kept = ckpt.list_checkpoints(run / "checkpoints")
    for later in kept[2:]:
        shutil.rmtree(later)
    (run / "summary.json").unlink()
    cpt.train(None, run, resume=True)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    train_lines = [m["step"] for m in _metrics(run) if m["type"] == "train"]
    assert steps == sorted(set(steps)) == train_lines
    assert np.allclose([e.value for e in acc.Scalars("train/loss")], [m["loss"] for m in _metrics(run) if m["type"] == "train"])
