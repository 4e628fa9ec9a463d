"""Data preparation under torchrun, and the bounded BPE sample.

Under torchrun the data is prepared before the process group forms: local rank 0 hashes, trains the
tokenizer and tokenizes, then writes a readiness marker; the other ranks poll for it (no collective,
so no collective timeout) and open what it names. The BPE of a run without a tokenizer learns from a
bounded, spread sample of each task's training documents (`tokenizer.sample_mb`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch.distributed as dist

from cpt import atomic
from cpt.config import TokenizerConfig, TrainingConfig, validate
from cpt.data.readers import iter_documents
from cpt.data.tokenizer import load_tokenizer
from cpt.data.tokens import source_key, split_documents
from cpt.errors import CptError
from cpt.training import build
from tests.conftest import ROOT, free_port, tiny_config
from tests.test_distributed import _config


# ------------------------------------------------------------------ waiting on the marker
def test_a_waiter_times_out_with_a_message_naming_the_preparing_rank_and_the_marker(tmp_path):
    marker = tmp_path / "ready" / "launch-abc.json"
    lines: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(CptError) as err:
        build.wait_for_marker(marker, 0.3, rank=3, log=lines.append, poll_s=0.02, progress_s=0.1)
    assert 0.3 <= time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "rank 3" in msg and "local rank 0" in msg and str(marker) in msg and "training.data_wait_s" in msg
    assert lines and all(str(marker) in line for line in lines)  # the progress lines say what it waits for


def test_a_waiter_proceeds_when_the_marker_appears_later(tmp_path):
    marker = tmp_path / "ready" / "launch-abc.json"
    record = {"source_keys": ["k0"], "tokenizer": {"source": "x", "fingerprint": "f", "eos_id": 0}}

    def write_late():
        time.sleep(0.4)
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(marker, record)

    writer = threading.Thread(target=write_late)
    t0 = time.monotonic()
    writer.start()
    got = build.wait_for_marker(marker, 30, rank=1, log=lambda m: None, poll_s=0.02)
    writer.join()
    assert got == record and time.monotonic() - t0 >= 0.4


def test_a_waiter_stops_when_the_working_ranks_heartbeat_goes_silent(tmp_path):
    """rank 0 killed outright while it deals a buffer writes no marker: the others stop once its heartbeat is older
    than the limit (training.dist_timeout_s), not after training.data_wait_s."""
    alive = tmp_path / ".work.alive"
    alive.touch()
    os.utime(alive, (time.time() - 100, time.time() - 100))  # last touched 100 s ago
    t0 = time.monotonic()
    with pytest.raises(CptError, match=r"rank 1: rank 0 has not been heard from for 1\d\ds .*it has most likely died"):
        build.wait_for_marker(tmp_path / "m.json", 3600, rank=1, poll_s=0.02, who="rank 0", what="deal", alive=(alive, 50))
    assert time.monotonic() - t0 < 5
    alive.touch()  # a live heartbeat: waits on, here until its own (short) timeout
    with pytest.raises(CptError, match="waited"):
        build.wait_for_marker(tmp_path / "m.json", 0.2, rank=1, poll_s=0.02, who="rank 0", what="deal", alive=(alive, 50))


def test_a_waiter_stops_at_once_when_the_preparing_rank_recorded_a_failure(tmp_path):
    marker = tmp_path / "m.json"
    atomic.write_json(marker, {"error": "tasks.0 (en): x.txt: no documents"})
    t0 = time.monotonic()
    with pytest.raises(CptError, match="could not prepare the data: tasks.0 \\(en\\): x.txt: no documents"):
        build.wait_for_marker(marker, 60, rank=1)
    assert time.monotonic() - t0 < 5


ON_RANK_0 = """
import sys, time
from pathlib import Path
from cpt.training import build, distributed

distributed.init("cpu", timeout_s=2)  # every collective may wait 2 s at most
rank = distributed.world_info()[0]
out, fail = Path(sys.argv[1]), sys.argv[2] == "fail"

def work():
    time.sleep(5)  # longer than the process group's timeout
    if fail:
        raise ValueError("disk full")

try:
    build.on_rank_0(out, "deal-the-buffer", work, rank, print, wait_s=60, silent_s=60)
except Exception as err:
    print(f"rank {rank} failed: {err}", flush=True)
    sys.exit(3)
print(f"rank {rank} done", flush=True)
"""


@pytest.mark.parametrize("fail", [False, True])
def test_work_on_rank_0_may_outlast_the_process_groups_timeout(tmp_path, fail):
    """Rank 0 deals a buffer for longer than training.dist_timeout_s: the others wait on a marker, not in a collective,
    so nothing times out; a failure on rank 0 ends every rank with its message."""
    script = tmp_path / "on_rank_0.py"
    script.write_text(ON_RANK_0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(script)]
    proc = subprocess.run([*cmd, str(tmp_path), "fail" if fail else "ok"], capture_output=True, text=True, cwd=ROOT)
    if not fail:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "rank 0 done" in proc.stdout and "rank 1 done" in proc.stdout
        assert not list(tmp_path.glob(".deal*"))  # the marker and heartbeat are gone once every rank has read them
    else:
        assert proc.returncode != 0
        assert "rank 1 failed: rank 1: rank 0 could not deal the buffer: ValueError: disk full" in proc.stdout


def test_the_marker_names_the_launch_and_the_data(small_texts, tmp_path, monkeypatch):
    for var in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_ERROR_FILE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = validate(tiny_config(small_texts))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = build.ready_marker(cfg, tmp_path)
    assert first.parent == tmp_path / "ready" and first.name.startswith("job7-0-") and first.suffix == ".json"
    assert build.ready_marker(cfg, tmp_path) == first
    # a task's budget is not data; its split and the tokenizer are
    more = tiny_config(small_texts)
    more["tasks"][0]["tokens"] = 99
    assert build.ready_marker(validate(more), tmp_path) == first
    more["tasks"][0]["val_fraction"] = 0.1
    assert build.ready_marker(validate(more), tmp_path) != first
    assert build.ready_marker(validate(tiny_config(small_texts, tokenizer={"vocab_size": 600})), tmp_path) != first
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarted the workers: a new launch
    assert build.ready_marker(cfg, tmp_path) != first
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", "/tmp/torchelastic_x/job7_ab/attempt_0/1/error.json")
    with_logs = build.ready_marker(cfg, tmp_path)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", "/tmp/torchelastic_x/job7_ab/attempt_0/0/error.json")
    assert build.ready_marker(cfg, tmp_path) == with_logs != first  # one name for the node's local ranks
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", "/tmp/torchelastic_y/job7_cd/attempt_0/1/error.json")
    assert build.ready_marker(cfg, tmp_path) != with_logs  # another launch of the same job id
    for var in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    other = build.ready_marker(cfg, tmp_path)
    monkeypatch.setenv("MASTER_PORT", "29501")
    assert build.ready_marker(cfg, tmp_path) != other


def test_in_process_only_local_rank_0_hashes_and_tokenizes(small_texts, tmp_path, monkeypatch):
    """prepare_data for a waiting rank (a thread, started first) and local rank 0: the waiter hashes nothing and gets the same data."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"inproc-{time.time_ns()}")
    cfg = validate(tiny_config(small_texts, cache_dir=str(tmp_path / "cache")))
    hashed: list[str] = []
    real_key = build.task_key
    monkeypatch.setattr(build, "task_key", lambda *a, **k: hashed.append(threading.current_thread().name) or real_key(*a, **k))
    got: dict = {}
    waiter = threading.Thread(
        target=lambda: got.setdefault("data", build.prepare_data(cfg, lambda m: None, rank=1, world=2, local_rank=1)), name="rank1"
    )
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()  # nothing to read yet: it waits
    lines: list[str] = []
    mine = build.prepare_data(cfg, lines.append, rank=0, world=2, local_rank=0)
    waiter.join(30)
    theirs = got["data"]
    assert hashed and set(hashed) == {threading.current_thread().name}
    assert sum(line.startswith("tokenized ") for line in lines) == len(cfg.tasks)
    assert theirs.source_keys == mine.source_keys and theirs.tokenizer.fingerprint == mine.tokenizer.fingerprint
    assert [t.directory for t in theirs.tasks] == [t.directory for t in mine.tasks]
    assert mine.wrote_marker and mine.marker.is_file() and theirs.marker == mine.marker and not theirs.wrote_marker
    record = json.loads(mine.marker.read_text())
    assert record["source_keys"] == mine.source_keys and record["tokenizer"]["fingerprint"] == mine.tokenizer.fingerprint
    build.agree_on_data(mine)  # one process: no collective; the writer removes its marker
    assert not mine.marker.exists()


def test_ranks_that_hold_other_data_than_rank_0_stop_with_a_message(small_texts, tmp_path, monkeypatch):
    """After the group forms, one all-gather compares every rank's source keys and tokenizer with rank 0's."""
    cfg = validate(tiny_config(small_texts, cache_dir=str(tmp_path / "cache")))
    data = build.prepare_data(cfg, lambda m: None)
    data.marker, data.wrote_marker = tmp_path / "ready" / "m.json", True
    data.marker.parent.mkdir()
    data.marker.write_text("{}")
    views = [[data.source_keys, data.tokenizer.fingerprint], [["stale", "keys"], data.tokenizer.fingerprint]]
    monkeypatch.setattr(build.distributed, "gather_to_all", lambda obj: views)
    with pytest.raises(CptError, match="rank 1 prepared other data than rank 0"):
        build.agree_on_data(data)
    assert not data.marker.exists()  # removed all the same
    monkeypatch.setattr(build.distributed, "gather_to_all", lambda obj: [obj, obj])
    build.agree_on_data(data)


def test_a_failure_of_local_rank_0_reaches_the_waiting_ranks_through_the_marker(small_texts, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"fail-{time.time_ns()}")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    cfg = validate(tiny_config({**small_texts, "fr": empty}, cache_dir=str(tmp_path / "cache")))
    with pytest.raises(CptError, match="no documents") as err:
        build.prepare_data(cfg, lambda m: None, rank=0, world=2, local_rank=0)
    marker = build.ready_marker(cfg, tmp_path / "cache")
    assert json.loads(marker.read_text())["error"] == str(err.value)
    with pytest.raises(CptError, match="rank 1: local rank 0 of this node could not prepare the data: .*no documents"):
        build.prepare_data(cfg, lambda m: None, rank=1, world=2, local_rank=1)


def test_the_process_group_gets_training_dist_timeout_s(monkeypatch):
    from datetime import timedelta

    from cpt.training import distributed

    got = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: got.update(kw))
    distributed.init("cpu", TrainingConfig().dist_timeout_s)
    assert got == {"backend": "gloo", "timeout": timedelta(seconds=1800)}


def test_one_process_writes_no_marker(small_texts, tmp_path):
    cfg = validate(tiny_config(small_texts, cache_dir=str(tmp_path / "cache")))
    data = build.prepare_data(cfg, lambda m: None)
    assert data.marker is None and not (tmp_path / "cache" / "ready").exists()


def test_the_timeouts_have_documented_defaults():
    tr = TrainingConfig()
    assert tr.dist_timeout_s == 1800 and tr.data_wait_s == 86400
    doc = (ROOT / "docs" / "config.md").read_text()
    assert "`training.dist_timeout_s` | float | `1800`" in doc and "`training.data_wait_s` | float | `86400`" in doc
    dist_doc = (ROOT / "docs" / "distributed.md").read_text()
    assert "training.dist_timeout_s" in dist_doc and "training.data_wait_s" in dist_doc and "<cache>/ready/" in dist_doc


# ------------------------------------------------------------------ torchrun: one rank prepares
_RECORDER = """
import json, os, sys
import cpt.training.build as b

out = os.environ["CPT_TEST_CALLS"]

def note(**kw):
    with open(os.path.join(out, f"{os.getpid()}.jsonl"), "a") as fh:
        fh.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), **kw}) + "\\n")

real_key, real_bpe, real_prepare = b.task_key, b.train_or_load_bpe, b.prepare_for

def task_key(*a, **k):
    note(fn="task_key")
    return real_key(*a, **k)

def train_or_load_bpe(*a, **k):
    note(fn="train_or_load_bpe")
    return real_bpe(*a, **k)

def prepare_for(task, tok, cache, **k):
    tokens = cache / "tokens"
    before = {p.name for p in tokens.iterdir()} if tokens.is_dir() else set()
    t = real_prepare(task, tok, cache, **k)
    note(fn="prepare_for", task=task.name, created=t.directory.name not in before)
    return t

b.task_key, b.train_or_load_bpe, b.prepare_for = task_key, train_or_load_bpe, prepare_for
from cpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _ranks_config(small_texts, tmp_path, batch_size, cache):
    return _config(small_texts, tmp_path, batch_size, cache_dir=str(cache))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_two_ranks_prepare_the_data_once_and_train_as_one_process(small_texts, tmp_path):
    """torchrun, 2 gloo ranks, a cold cache: rank 0 alone hashes, trains the BPE and writes the entries;
    rank 1 opens them; the loss matrix is one process's at the same global batch; no marker is left."""
    cache, calls = tmp_path / "cache", tmp_path / "calls"
    calls.mkdir()
    script = tmp_path / "recorder.py"
    script.write_text(_RECORDER)
    env = {**os.environ, "CPT_TEST_CALLS": str(calls), "PYTHONPATH": str(ROOT)}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script), "train"]
        + [str(_ranks_config(small_texts, tmp_path, 4, cache)), "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    records = [json.loads(line) for f in calls.glob("*.jsonl") for line in f.read_text().splitlines()]
    by_rank = {r: [c for c in records if c["rank"] == r] for r in (0, 1)}
    assert len({f.name for f in calls.glob("*.jsonl")}) == 2  # two processes took part
    assert {c["fn"] for c in by_rank[0]} == {"task_key", "train_or_load_bpe", "prepare_for"}
    assert {c["fn"] for c in by_rank[1]} == {"prepare_for"}  # no hashing, no tokenizer training
    assert sorted(c["task"] for c in by_rank[0] if c["fn"] == "prepare_for" and c["created"]) == ["en", "fr"]
    assert not any(c["created"] for c in by_rank[1])  # rank 1 only opened the entries
    assert sum(line.startswith("tokenized ") for line in two.stderr.splitlines()) == 2
    assert not list((cache / "ready").glob("*.json"))  # removed once every rank agreed
    one = subprocess.run(
        [sys.executable, "-m", "cpt", "train", str(_ranks_config(small_texts, tmp_path, 8, cache)), "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "summary.json").read_text())
    b = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert b["world_size"] == 2 and b["tokens"] == a["tokens"] and b["meta_updates"] == a["meta_updates"]
    np.testing.assert_allclose(b["loss_matrix"], a["loss_matrix"], rtol=1e-3)


# ------------------------------------------------------------------ the BPE sample
def test_bpe_sample_takes_every_kth_document_under_the_bound():
    docs = [f"{i:04d}" + "x" * 96 for i in range(1000)]  # 100 bytes each
    texts, record = build.bpe_sample(iter(docs), 10_000)
    # stride 8 would keep 125 documents (12,500 bytes): too many; 16 keeps 63 (6,300)
    assert record == {"documents": 1000, "kept": 63, "stride": 16, "bytes": 6300, "whole": False}
    assert texts == docs[::16]
    texts, record = build.bpe_sample(iter(docs), 100_000)
    assert texts == docs and record["whole"] and record["stride"] == 1
    # a document longer than the bound is cut to it, at a character boundary
    texts, record = build.bpe_sample(iter(["é" * 10]), 7)
    assert texts == ["ééé"] and not record["whole"] and record["bytes"] == 6


def _train_docs(path, val_fraction=0.05):
    return set(split_documents(iter_documents(path), val_fraction, "train")), set(
        split_documents(iter_documents(path), val_fraction, "val")
    )


def test_the_trainer_sees_at_most_sample_mb_per_task_and_no_validation_document(small_texts, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfg = validate(tiny_config(small_texts, tokenizer={"vocab_size": 300, "sample_mb": 0.01}))  # 10 kB of ~60 kB a task
    keys = [source_key(t.path, t.format, t.text_field, cache, t.documents) for t in cfg.tasks]
    seen: list[str] = []
    real = build.train_or_load_bpe

    def spy(key, texts, *a, **k):
        return real(key, (seen.append(t) or t for t in texts), *a, **k)

    monkeypatch.setattr(build, "train_or_load_bpe", spy)
    lines: list[str] = []
    tok = build.load_or_train_tokenizer(cfg, cache, keys, lines.append)
    splits = [_train_docs(task.path) for task in cfg.tasks]
    taken = [0] * len(cfg.tasks)
    for text in seen:  # each text is one training document of one task, whole or cut to the bound
        owner = [i for i, (train, _) in enumerate(splits) if text in train or any(d.startswith(text) for d in train)]
        assert len(owner) == 1, text[:80]
        assert not any(d.startswith(text) for d in splits[owner[0]][1])  # never a held-out document
        taken[owner[0]] += len(text.encode())
    assert all(0 < n <= 10_000 for n in taken), taken
    assert all(sum(len(d.encode()) for d in train) > 10_000 for train, _ in splits)  # the bound did bind
    assert sum(line.startswith("tokenizer sample: ") for line in lines) == 2
    # the bound is in the key: an unbounded BPE of the same tasks is another tokenizer
    unbounded = validate(tiny_config(small_texts, tokenizer={"vocab_size": 300, "sample_mb": 0}))
    assert build.load_or_train_tokenizer(unbounded, cache, keys, lambda m: None).source != tok.source
    # a warm start reads no text: what fits under the bound is remembered in the cache
    monkeypatch.setattr(build, "iter_documents", lambda *a, **k: pytest.fail("read the text on a warm start"))
    assert build.load_or_train_tokenizer(cfg, cache, keys, lambda m: None).fingerprint == tok.fingerprint


def test_tasks_under_the_bound_keep_their_tokenizer(small_texts, tmp_path):
    """Under the bound the sample is the whole training split: the same key and the same BPE as with no bound."""
    cache = tmp_path / "cache"
    keys = None
    toks = []
    for mb in (64, 0):
        cfg = validate(tiny_config(small_texts, tokenizer={"vocab_size": 300, "sample_mb": mb}))
        keys = keys or [source_key(t.path, t.format, t.text_field, cache, t.documents) for t in cfg.tasks]
        toks.append(build.load_or_train_tokenizer(cfg, cache, keys, lambda m: None))
    assert toks[0].source == toks[1].source and toks[0].fingerprint == toks[1].fingerprint


def test_the_demo_tasks_retrain_the_committed_tokenizer_under_the_default_bound(tmp_path):
    """The bundled demo's five ~1 MB languages are under 64 MB each: a BPE trained on them without
    `tokenizer.path` is byte for byte the committed one (fingerprint 9ead3d101a35847f)."""
    from cpt.demo import HANDBOOK, demo_config

    raw = demo_config("sequential", quick=True)
    raw["tokenizer"] = {}
    cfg = validate(raw)
    assert cfg.tokenizer.sample_mb == 64 and cfg.tokenizer.vocab_size == 8192
    keys = [source_key(t.path, t.format, t.text_field, tmp_path, t.documents) for t in cfg.tasks]
    tok = build.load_or_train_tokenizer(cfg, tmp_path, keys, lambda m: None)
    assert tok.fingerprint == load_tokenizer(HANDBOOK / "tokenizer.json").fingerprint == "9ead3d101a35847f"
    assert tok.source.endswith("bpe-57acb2828fa8260e1fcb.json")  # the key it had before the bound existed


def test_sample_mb_default_and_documentation():
    assert TokenizerConfig().sample_mb == 64
    row = next(line for line in (ROOT / "docs" / "config.md").read_text().splitlines() if line.startswith("| `tokenizer.sample_mb`"))
    assert "`64`" in row and "0: no bound" in row and "never the held-out" in row and "every k-th document" in row
    assert validate({"tasks": [{"name": "a", "path": "a.txt", "tokens": 1}], "tokenizer": {"sample_mb": 0}}).tokenizer.sample_mb == 0
    with pytest.raises(CptError, match="tokenizer.sample_mb"):
        validate({"tasks": [{"name": "a", "path": "a.txt", "tokens": 1}], "tokenizer": {"sample_mb": -1}})
