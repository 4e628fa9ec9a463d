"""Checkpoints at scale, on 2 gloo ranks under torchrun: each rank writes, hashes and reads back only its own part.

What a user would notice: every rank's state in its own `rank-<r>.pt`; a resume that reads no other rank's
file yet continues to the identical loss matrix (DDP and FSDP2); a corrupted rank file that makes both ranks
fall back to the previous checkpoint together; `checkpoint.async` giving the same run as synchronous saves,
even when the writer lags steps behind and a preemption signal arrives twice (as Slurm + torchrun deliver
it); the write time in the log and in summary.json. Which files each rank opens is recorded by an audit hook
(`sitecustomize.py` put on the children's PYTHONPATH); the same file can slow the background writer down.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")

# put first on a child's PYTHONPATH: CPT_TEST_OPEN_LOG records every file under checkpoints/ a rank opens (with
# r/w); CPT_TEST_SLOW_SAVE=S makes every torch.save of cpt's background writer S seconds slower, and every one of
# another background thread (DCP's writer: one call per tensor) S/40
SITECUSTOMIZE = r"""
import os, sys
if "RANK" in os.environ and os.environ.get("CPT_TEST_OPEN_LOG"):
    _fh = open(os.path.join(os.environ["CPT_TEST_OPEN_LOG"], f"rank-{os.environ['RANK']}-{os.getpid()}.txt"), "a", buffering=1)
    def _hook(event, args):
        if event == "open" and isinstance(args[0], str) and "checkpoints" in args[0]:
            mode, flags = args[1], args[2]
            write = any(c in mode for c in "wax+") if mode is not None else bool(flags & (os.O_WRONLY | os.O_RDWR))
            _fh.write(("w" if write else "r") + "\t" + args[0] + "\n")
    sys.addaudithook(_hook)
if "RANK" in os.environ and os.environ.get("CPT_TEST_SLOW_SAVE"):
    import threading, time, torch
    _save, _delay = torch.save, float(os.environ["CPT_TEST_SLOW_SAVE"])
    def _slow_save(*args, **kwargs):
        thread = threading.current_thread()
        if thread is not threading.main_thread():
            time.sleep(_delay if thread.name == "cpt-checkpoint" else _delay / 40)
        return _save(*args, **kwargs)
    torch.save = _slow_save
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("site")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


@pytest.fixture(scope="module")
def config(small_texts, tmp_path_factory) -> Path:
    cfg = tiny_config(
        small_texts,
        training={"batch_size": 4},
        replay={"rate": 0.25},
        alignment={"method": "reptile", "k": 5, "beta": 0.7},
        checkpoint={"task_ends": False, "every": 5, "keep": 50},
    )
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(site: Path, open_log: Path | None = None, slow: float | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    if open_log is not None:
        open_log.mkdir(parents=True, exist_ok=True)
        env["CPT_TEST_OPEN_LOG"] = str(open_log)
    if slow is not None:
        env["CPT_TEST_SLOW_SAVE"] = str(slow)
    return env


def _torchrun(*args, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "cpt", "train", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _opened(log_dir: Path) -> dict[int, list[tuple[str, str]]]:
    """rank -> [(r/w, path relative to its checkpoint step directory or checkpoints/)] in the order opened."""
    out: dict[int, list] = {0: [], 1: []}
    for f in log_dir.glob("rank-*.txt"):
        rank = int(f.name.split("-")[1])
        for line in f.read_text().splitlines():
            how, path = line.split("\t", 1)
            if "/checkpoints/" in path:
                out[rank].append((how, path.split("/checkpoints/", 1)[1]))
    return out


def _children(pid: int) -> list[int]:
    """The processes `pid` started (torchrun's ranks), from Linux's /proc."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _steps(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*"))


def _cut_after(run: Path, keep: Path) -> None:
    """An interrupted run: the checkpoints after `keep` and the end's outputs are gone."""
    for later in _steps(run)[_steps(run).index(keep) + 1 :]:
        shutil.rmtree(later)
    (run / "summary.json").unlink()


@pytest.fixture(scope="module")
def runs(config, site, tmp_path_factory) -> dict:
    """Uninterrupted synchronous runs, DDP and FSDP2, with every file each rank opened."""
    base = tmp_path_factory.mktemp("ref")
    out = {}
    for kind, extra in (("ddp", []), ("fsdp", ["training.parallel=fsdp"])):
        run = base / kind
        proc = _torchrun(config, *extra, "--out", run, env=_env(site, base / f"{kind}-opened"))
        out[kind] = {"run": run, "stderr": proc.stderr, "opened": _opened(base / f"{kind}-opened"), "summary": _summary(run)}
    return out


def test_each_rank_writes_and_hashes_only_its_own_files(runs):
    for kind, r in runs.items():
        steps = _steps(r["run"])
        assert len(steps) == r["summary"]["checkpoints"]["written"] > 5, kind
        for step_dir in steps:
            names = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()}
            want = {"manifest.json", "state.pt", "rank-0.pt", "rank-1.pt"}
            if kind == "fsdp":
                want |= {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"}
            assert names == want, (kind, step_dir.name)
            manifest = json.loads((step_dir / "manifest.json").read_text())
            assert manifest["world"] == 2 and set(manifest["files"]) == want - {"manifest.json"}
            by_rank = [{"rank-0.pt", "state.pt"}, {"rank-1.pt"}]
            if kind == "fsdp":
                by_rank = [
                    by_rank[0] | {"dcp/.metadata", "dcp/__0_0.distcp"},
                    by_rank[1] | {"dcp/__1_0.distcp"},
                ]
            assert [set(names) for names in manifest["ranks"]] == by_rank
        # the shared state holds no rank's state but the one global data cursor; each rank file its drawn rows, buffer and RNG
        mid = steps[len(steps) // 2]
        shared = torch.load(mid / "state.pt", weights_only=True)
        assert "rngs" not in shared and "sources" not in shared and shared["progress"]["step"] == int(mid.name[5:])
        assert set(shared["data"]) == {"streams", "stats", "called_off", "world"}
        own = [torch.load(mid / f"rank-{i}.pt", weights_only=True) for i in (0, 1)]
        assert all(set(o) >= {"rng", "sources"} for o in own)
        assert [o["sources"]["buffer"]["shard"] for o in own] == [0, 1]  # each rank's replay-buffer shard
        assert not torch.equal(own[0]["sources"]["ready"][int(mid.name[5:])], own[1]["sources"]["ready"][int(mid.name[5:])])
        # while training, no rank opened a file another rank wrote (it hashes what it wrote itself)
        for rank, files in r["opened"].items():
            other = 1 - rank
            theirs = {f"rank-{other}.pt", f"dcp/__{other}_0.distcp"} | ({"state.pt", "dcp/.metadata"} if rank else set())
            touched = {p.split("/", 1)[1] for _how, p in files if p.startswith((".tmp-step-", "step-")) and "/" in p}
            assert files and not touched & theirs, (kind, rank, sorted(touched & theirs))


def test_the_write_time_is_in_the_log_and_the_summary(runs):
    for kind, r in runs.items():
        c = r["summary"]["checkpoints"]
        assert c["async"] is False and c["written"] == len(_steps(r["run"]))
        assert 0 < c["write_seconds"]["median"] <= c["write_seconds"]["max"] and c["write_seconds"]["last"] > 0
        last = _steps(r["run"])[-1]
        assert c["bytes"] == sum(p.stat().st_size for p in last.rglob("*") if p.is_file() and p.name != "manifest.json")
        lines = [x for x in r["stderr"].splitlines() if x.startswith("checkpoint step-")]
        assert len(lines) == c["written"], kind
        assert re.fullmatch(r"checkpoint step-00000005: [\d.]+ MiB written in [\d.]+s \([\d.]+ MiB by the busiest rank\)", lines[0])
        assert lines[-1].endswith(f"written in {c['write_seconds']['last']:.2f}s (" + lines[-1].split(" (", 1)[1])


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_resume_reads_no_other_ranks_file_and_continues_to_the_same_loss_matrix(runs, site, tmp_path, kind):
    copy = tmp_path / kind
    shutil.copytree(runs[kind]["run"], copy)
    mid = _steps(copy)[len(_steps(copy)) // 2]
    _cut_after(copy, mid)
    proc = _torchrun("--resume", copy, env=_env(site, tmp_path / "opened"))
    assert f"resumed at step {int(mid.name[5:])}/" in proc.stderr and "warning" not in proc.stderr
    assert _summary(copy)["loss_matrix"] == runs[kind]["summary"]["loss_matrix"]
    opened = _opened(tmp_path / "opened")
    for rank in (0, 1):
        read = [p[len(mid.name) + 1 :] for how, p in opened[rank] if how == "r" and p.startswith(mid.name + "/")]
        other = 1 - rank
        assert f"rank-{rank}.pt" in read and "state.pt" in read and "manifest.json" in read
        assert f"rank-{other}.pt" not in read, (rank, read)
        # rank 0 verifies the shared state.pt (read twice: hashed, then loaded); rank 1 only loads it
        assert read.count("state.pt") == (2 if rank == 0 else 1), read
        if kind == "fsdp":
            assert read.count(f"dcp/__{rank}_0.distcp") == 2  # hashed, then read by DCP
            # DCP itself may read a replicated entry (an optimizer step count) from the rank that stored it: at most once
            assert read.count(f"dcp/__{other}_0.distcp") <= 1, read


def test_a_corrupted_rank_file_makes_every_rank_fall_back_to_the_previous_checkpoint(runs, site, tmp_path):
    copy = tmp_path / "corrupt"
    shutil.copytree(runs["ddp"]["run"], copy)
    steps = _steps(copy)
    mid, newest = steps[len(steps) // 2], steps[len(steps) // 2 + 1]
    _cut_after(copy, newest)
    with open(newest / "rank-1.pt", "r+b") as fh:  # only rank 1's file of the newest checkpoint is bad
        fh.seek(100)
        fh.write(b"\0" * 64)
    proc = _torchrun("--resume", copy, env=_env(site, tmp_path / "opened"))
    warnings = [x for x in proc.stderr.splitlines() if "warning" in x]
    assert len(warnings) == 1 and f"skipping checkpoint {newest}: rank 1: rank-1.pt does not match its checksum" in warnings[0]
    assert f"resumed at step {int(mid.name[5:])}/" in proc.stderr
    # rank 0, whose own files of the newest checkpoint were fine, loaded the previous one as rank 1 did
    opened = _opened(tmp_path / "opened")
    for rank in (0, 1):
        assert ("r", f"{mid.name}/rank-{rank}.pt") in opened[rank]
    assert _summary(copy)["loss_matrix"] == runs["ddp"]["summary"]["loss_matrix"]


def test_a_checkpoint_of_the_earlier_layout_is_refused_not_restarted_from_scratch(runs, site, tmp_path):
    copy = tmp_path / "legacy"
    shutil.copytree(runs["ddp"]["run"], copy)
    newest = _steps(copy)[-1]
    (copy / "summary.json").unlink()
    manifest = json.loads((newest / "manifest.json").read_text())
    del manifest["layout"]
    (newest / "manifest.json").write_text(json.dumps(manifest))
    metrics = (copy / "metrics.jsonl").read_text()
    proc = _torchrun("--resume", copy, env=_env(site), ok=False)
    assert proc.returncode != 0
    assert f"{newest}: written by an earlier cpt" in proc.stderr and "cpt export" in proc.stderr
    assert (copy / "metrics.jsonl").read_text() == metrics and not (copy / "summary.json").exists()


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_async_checkpoints_lagging_behind_training_give_the_same_run(runs, config, site, tmp_path, kind):
    """The writer is slowed down (cpt's 0.2 s per file, DCP's 5 ms per tensor): training runs on while it writes."""
    run = tmp_path / kind
    extra = ["training.parallel=fsdp"] if kind == "fsdp" else []
    proc = _torchrun(config, *extra, "checkpoint.async=true", "--out", run, env=_env(site, slow=0.2))
    s = _summary(run)
    ref = runs[kind]
    assert s["loss_matrix"] == ref["summary"]["loss_matrix"]
    assert [p.name for p in _steps(run)] == [p.name for p in _steps(ref["run"])]
    c = s["checkpoints"]
    assert c["async"] is True and c["written"] == ref["summary"]["checkpoints"]["written"]
    # training was held up for the copy (and, when the writer lags a whole interval, the rest of the previous write)
    assert c["blocking_seconds"]["median"] < c["write_seconds"]["median"] and c["write_seconds"]["median"] > 0.4, c
    assert "training held up" in proc.stderr
    # a checkpoint written while training went on holds the state of its own step: the resume is exact
    mid = _steps(run)[len(_steps(run)) // 2]
    _cut_after(run, mid)
    _torchrun("--resume", run, env=_env(site))
    assert _summary(run)["loss_matrix"] == ref["summary"]["loss_matrix"]


def test_a_preemption_signal_delivered_twice_still_checkpoints_then_resumes_to_the_same_run(runs, config, site, tmp_path):
    """Slurm signals every process of the job step and torchrun forwards the signal again: one request, one checkpoint.

    Without the repeat window (signals.REPEAT_WINDOW_S) the forwarded copy is a "second signal" and the ranks exit
    at once without a checkpoint.

    The writer lags (checkpoint.async, slowed down), so a background write is usually pending when the signal comes.
    """
    run, err_file = tmp_path / "preempted", tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "cpt", "train", str(config)]
    with open(err_file, "w") as err:
        proc = subprocess.Popen(
            [*cmd, "checkpoint.async=true", "--out", str(run)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=_env(site, slow=0.2),
        )
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "step-00000010").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, err_file.read_text()[-3000:]
            time.sleep(0.1)
        # as Slurm signals a job step (every process in its cgroup): each rank directly, then torchrun, which
        # forwards the signal to each rank again (its workers live in sessions of their own)
        for pid in [*_children(proc.pid), proc.pid]:
            os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=120)
    text = err_file.read_text()
    assert "second signal" not in text, text[-3000:]
    # two ranks write to one stderr: their lines may run together, so count the messages, not the lines
    stopped = re.findall(r"stopped by signal 15 after step (\d+); checkpoint written [\d.]+s after the signal", text)
    assert len(stopped) == 2 and len(set(stopped)) == 1, text[-3000:]  # both ranks, at the same step
    step = int(stopped[0])
    assert _steps(run)[-1].name == f"step-{step:08d}" and not (run / "summary.json").exists()
    assert not list((run / "checkpoints").glob(".tmp-*"))  # nothing half-written left behind by the pending write
    _torchrun("--resume", run, env=_env(site))
    assert _summary(run)["loss_matrix"] == runs["ddp"]["summary"]["loss_matrix"]


class _Payload:
    """Unpickling this creates the marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_rank_file_that_would_run_code_is_refused_and_the_previous_checkpoint_used(runs, tmp_path):
    """Rank 1's view of the choice (in this process, as rank 1 of 2): its own file of the newest checkpoint is poisoned."""
    import hashlib

    from cpt.training import checkpoint

    copy = tmp_path / "poisoned"
    shutil.copytree(runs["ddp"]["run"], copy)
    steps = _steps(copy)
    marker = tmp_path / "code-ran"
    own = torch.load(steps[-1] / "rank-1.pt", weights_only=True)
    own["sources"]["payload"] = _Payload(marker)
    torch.save(own, steps[-1] / "rank-1.pt")
    manifest = json.loads((steps[-1] / "manifest.json").read_text())
    manifest["files"]["rank-1.pt"] = hashlib.sha256((steps[-1] / "rank-1.pt").read_bytes()).hexdigest()  # re-signed
    (steps[-1] / "manifest.json").write_text(json.dumps(manifest))
    lines = []
    found = checkpoint.load_latest(copy / "checkpoints", lines.append, rank=1, world=2)
    assert found.directory == steps[-2] and found.own["sources"]["buffer"]["shard"] == 1
    assert len(lines) == 1 and "rank-1.pt: refused: it holds a pickled io.open" in lines[0]
    assert not marker.exists()
