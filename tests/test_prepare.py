"""`cpt prepare` and the sharded token cache: shards cut at document boundaries, parallel and resumable
preparation that writes the same tokens however it is spread, warm starts that read no source byte,
pre-tokenized inputs that train the loss matrix of their text, and weighted sources inside a task."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import cpt
from cpt.cli import main
from cpt.config import validate
from cpt.data import readers
from cpt.data.mixture import MixtureStream, share
from cpt.data.prepare import Settings
from cpt.data.readers import Piece, ReadStats, boundary, iter_documents, iter_pieces
from cpt.data.streams import TaskStream
from cpt.data.tokenizer import load_tokenizer
from cpt.data.tokens import prepare_task
from cpt.errors import CptError
from tests.conftest import ROOT, corpus_docs, tiny_config

TOKENIZER = ROOT / "cpt" / "corpus" / "handbook" / "tokenizer.json"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def big_text(tmp_path_factory) -> Path:
    """~2 MB of real English handbook text (the pages repeated with a counter): many shards at shard_mb 0.1."""
    docs = corpus_docs("en")
    out = tmp_path_factory.mktemp("big") / "en.txt"
    with open(out, "w", encoding="utf-8") as fh:
        for rep in range(2):
            for i, d in enumerate(docs):
                fh.write(f"Page {rep}.{i}.\n{d}\n\n")
    return out


def _arrays(task) -> dict[str, np.ndarray]:
    return {"train": np.asarray(task.train), "val": np.asarray(task.val)}


def test_pieces_cut_at_boundaries_give_the_documents_of_the_whole_file(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "_CHUNK", 7)  # boundaries and separators across every read
    rng = random.Random(3)
    alphabet = ["a", "b", "é", " ", "\t", "\n", "\r\n", "\n\n", "\n \n", "x\n\n\n", '{"text": "q"}\n']
    for trial in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        f = tmp_path / "t.txt"
        f.write_bytes(text.encode())
        for mode in ("auto", "lines"):
            whole = list(iter_documents(f, documents=mode))
            size = f.stat().st_size
            cuts = sorted({boundary(f, rng.randint(0, size + 2), documents=mode) for _ in range(4)})
            edges = [0, *[c for c in cuts if 0 < c < size], None]
            pieces = [Piece(f, a, b) for a, b in zip(edges[:-1], edges[1:])]
            assert list(iter_pieces(pieces, "auto", "text", ReadStats(), mode)) == whole, (trial, mode, text, cuts)
    docs = [f"line {i} " + "w" * rng.randint(0, 30) for i in range(200)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cut = boundary(jsonl, 1000)
    assert jsonl.read_bytes()[cut - 1 : cut] == b"\n"
    parts = [Piece(jsonl, 0, cut), Piece(jsonl, cut, None)]
    assert list(iter_pieces(parts, "auto", "text", ReadStats())) == list(iter_documents(jsonl)) == [d.strip() for d in docs]


def test_shards_and_workers_do_not_change_the_tokens(big_text, tok, tmp_path):
    one = prepare_task("en", big_text, tok, tmp_path / "a", log=lambda m: None, settings=Settings(workers=1, shard_mb=1000))
    many = prepare_task("en", big_text, tok, tmp_path / "b", log=lambda m: None, settings=Settings(workers=2, shard_mb=0.1))
    assert len(one.meta["shards"]) == 1 and len(many.meta["shards"]) >= 15
    for split, arr in _arrays(one).items():
        assert np.array_equal(arr, _arrays(many)[split]), split
    same = ("documents", "train_tokens", "val_tokens", "max_train_id", "max_val_id", "bytes")
    assert {k: one.meta[k] for k in same} == {k: many.meta[k] for k in same}
    # the held-out documents are the fixed rule's, counted across shards: EOS count per split
    n_val = int((_arrays(one)["val"] == tok.eos_id).sum())
    assert n_val == sum(((i + 1) * (np.sqrt(5) - 1) / 2) % 1.0 < 0.05 for i in range(one.meta["documents"]))


def _entry_files(cache: Path) -> dict[str, bytes]:
    """Every file of the cache's token entries, timings removed from the JSON ones."""
    out = {}
    for f in sorted((cache / "tokens").glob("*/*")):
        data = f.read_bytes()
        if f.suffix == ".json":
            obj = json.loads(data)
            for key in ("seconds", "tokenize_seconds"):
                obj.pop(key, None)
            data = json.dumps(obj, sort_keys=True).encode()
        out[f.name] = data
    return out


def test_a_killed_prepare_resumes_to_the_files_of_an_uninterrupted_one(big_text, tmp_path):
    def config(cache: Path) -> Path:
        path = tmp_path / f"{cache.name}.yaml"
        cfg = {
            "cache_dir": str(cache),
            "tokenizer": {"path": str(TOKENIZER)},
            "tasks": [{"name": "en", "path": str(big_text), "tokens": 1000}],
        }
        path.write_text(yaml.safe_dump(cfg))
        return path

    cmd = [sys.executable, "-m", "cpt", "prepare", "--workers", "1", "--shard-mb", "0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, str(config(tmp_path / "whole"))], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, str(config(killed))], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(killed.glob("tokens/.*.partial/shard-00002.json")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = list(killed.glob("tokens/.*.partial"))
    assert partial, "the prepare finished before it could be killed"
    done = len(list(partial[0].glob("shard-*.json")))
    planned = len(json.loads((partial[0] / "plan.json").read_text())["units"])
    assert 3 <= done < planned and not list(killed.glob("tokens/*/meta.json"))

    out = subprocess.run([*cmd, str(config(killed))], check=True, env=env, capture_output=True, text=True)
    assert f"continuing an interrupted preparation: {done} of {planned} shard(s) already done" in out.stderr
    assert _entry_files(killed) == _entry_files(tmp_path / "whole")
    assert not list(killed.glob("tokens/.*.partial"))


def test_a_warm_start_reads_no_source_byte(big_text, tok, tmp_path, monkeypatch):
    cfg = validate(
        {
            "cache_dir": str(tmp_path / "c"),
            "tokenizer": {"path": str(TOKENIZER)},
            "tasks": [{"name": "en", "path": str(big_text), "tokens": 1000}],
        }
    )
    from cpt.training.build import prepare_data

    first = prepare_data(cfg, lambda m: None)

    def refuse(*args, **kwargs):
        raise AssertionError("a warm start read the source")

    monkeypatch.setattr(readers, "_hash_files", refuse)
    monkeypatch.setattr(readers, "_open_stream", refuse)
    monkeypatch.setattr(readers, "_iter_file", refuse)
    again = prepare_data(cfg, lambda m: None)
    assert again.source_keys == first.source_keys
    assert np.array_equal(np.asarray(again.tasks[0].train), np.asarray(first.tasks[0].train))


# ------------------------------------------------------------------ pre-tokenized inputs
@pytest.fixture(scope="module")
def pretokenized(tmp_path_factory, small_texts, tok):
    """The en task's documents as jsonl text, and tokenized with the same tokenizer (EOS after each) by
    datatrove's DocumentTokenizer, megatron-core's builder, and as a .npy token file."""
    pytest.importorskip("datatrove")
    pytest.importorskip("megatron.core")
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    from tests.test_pretokenized import build_megatron

    root = tmp_path_factory.mktemp("pretok")
    docs = list(iter_documents(small_texts["en"]))
    (root / "text").mkdir()
    with open(root / "text" / "en.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    writer = DocumentTokenizer(
        output_folder=str(root / "ds"), tokenizer_name_or_path=str(TOKENIZER), eos_token="<|endoftext|>", shuffle_documents=False
    )
    LocalPipelineExecutor(
        [JsonlReader(str(root / "text"), glob_pattern="*.jsonl"), writer], tasks=1, workers=1, logging_dir=str(root / "logs")
    ).run()
    ids = [seq + [tok.eos_id] for seq in tok.encode_batch(docs)]
    build_megatron(root / "en_text_document", ids)
    np.save(root / "en.npy", np.concatenate([np.asarray(s, dtype=np.uint16) for s in ids]))
    return {
        "jsonl": root / "text" / "en.jsonl",
        "datatrove": root / "ds" / "00000_unshuffled.ds",
        "megatron": root / "en_text_document",
        "npy": root / "en.npy",
    }


def test_pretokenized_inputs_train_the_loss_matrix_of_their_text(pretokenized, small_texts, tmp_path):
    def run(path, name):
        cfg = tiny_config(small_texts, tokenizer={"path": str(TOKENIZER)}, replay={"rate": 0.25})
        cfg["tasks"][0]["path"] = str(path)
        for t in cfg["tasks"]:
            t["tokens"] = 3000
        summary = cpt.train(validate(cfg), tmp_path / name)
        return summary["loss_matrix"], summary["heldout"]["en"]["documents"]

    ref = run(pretokenized["jsonl"], "jsonl")
    for kind in ("datatrove", "megatron", "npy"):
        assert run(pretokenized[kind], kind) == ref, kind


def test_pretokenized_errors_are_one_line_naming_the_file(pretokenized, small_texts, tmp_path, capsys):
    def train(path, **task) -> str:
        cfg = tiny_config(small_texts, tokenizer={"path": str(TOKENIZER)})
        cfg["tasks"][0].update(path=str(path), **task)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r"), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        return err[-1]

    idx = pretokenized["megatron"].with_name("en_text_document.idx")
    cut = tmp_path / "cut_text_document"
    cut.with_suffix(".idx").write_bytes(idx.read_bytes()[:-9])
    cut.with_suffix(".bin").write_bytes(idx.with_suffix(".bin").read_bytes())
    assert "cut_text_document.idx" in train(cut)
    long = tmp_path / "long_text_document"
    long.with_suffix(".idx").write_bytes(idx.read_bytes())
    long.with_suffix(".bin").write_bytes(idx.with_suffix(".bin").read_bytes() + b"\0\0")
    assert "long_text_document.bin" in train(long)
    alien = tmp_path / "alien.npy"
    np.save(alien, np.array([5, 9000, 0, 7, 0], dtype=np.uint16))  # an id past this tokenizer's 8192
    msg = train(alien)
    assert "alien.npy" in msg and "token id 9000" in msg and "tokenizer.path" in msg
    raw = tmp_path / "raw.bin"
    np.asarray([5, 6, 0], dtype=np.uint16).tofile(raw)
    assert "tasks.0.dtype" in train(raw)


def test_pretokenized_input_without_a_tokenizer_says_to_set_it(pretokenized, small_texts, tmp_path, capsys):
    cfg = tiny_config(small_texts)
    cfg["tasks"][0]["path"] = str(pretokenized["npy"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "pre-tokenized" in err and "tokenizer.path" in err


# ------------------------------------------------------------------ many machines, the CLI
def test_datatrove_tasks_and_a_final_prepare_make_the_entry_of_one_process(big_text, tmp_path):
    pytest.importorskip("datatrove")
    from datatrove.executor import LocalPipelineExecutor

    from cpt.data.engine import CptPrepare

    def config(cache: Path) -> Path:
        path = tmp_path / f"{cache.name}.yaml"
        cfg = {
            "cache_dir": str(cache),
            "tokenizer": {"path": str(TOKENIZER)},
            "prepare": {"shard_mb": 0.2},
            "tasks": [{"name": "en", "path": str(big_text), "tokens": 1000}],
        }
        path.write_text(yaml.safe_dump(cfg))
        return path

    LocalPipelineExecutor([CptPrepare(str(config(tmp_path / "dt")))], tasks=3, workers=1, logging_dir=str(tmp_path / "logs")).run()
    partial = next((tmp_path / "dt").glob("tokens/.*.partial"))
    assert len(list(partial.glob("shard-*.json"))) == len(json.loads((partial / "plan.json").read_text())["units"])
    assert main(["prepare", str(config(tmp_path / "dt"))]) == 0  # finishes the entry: nothing left to tokenize
    assert main(["prepare", str(config(tmp_path / "one")), "--workers", "1"]) == 0
    assert _entry_files(tmp_path / "dt") == _entry_files(tmp_path / "one")


def test_cpt_prepare_prints_the_manifest_and_refuses_bad_settings(big_text, tmp_path, capsys):
    cfg = {
        "cache_dir": str(tmp_path / "c"),
        "tokenizer": {"path": str(TOKENIZER)},
        "tasks": [{"name": "en", "path": str(big_text), "tokens": 1000}],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["prepare", str(tmp_path / "p.yaml"), "--workers", "1", "--shard-mb", "0.5"]) == 0
    out = capsys.readouterr().out
    meta = json.loads(next((tmp_path / "c").glob("tokens/*/meta.json")).read_text())
    row = next(line for line in out.splitlines() if line.startswith("en "))
    assert f"{meta['train_tokens']:,}" in row and f"{meta['val_tokens']:,}" in row and str(len(meta["shards"])) in row.split()
    # a replay source is listed too, its longer name widening the name column so every column stays aligned
    sourced = {**cfg, "replay": {"rate": 0.25, "sources": [{"name": "english-web-proxy", "path": str(big_text), "tokens": 1000}]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sourced))
    assert main(["prepare", str(tmp_path / "s.yaml"), "--workers", "1", "--shard-mb", "0.5"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("tokenizer:")]
    assert [line.split()[0] for line in table] == ["task", "en", "english-web-proxy"]
    ends = {line.index("entry") if i == 0 else line.index("  /") + 2 for i, line in enumerate(table)}
    assert len(ends) == 1, table  # the entry column starts at one place in the header and every row
    assert main(["prepare", str(tmp_path / "p.yaml"), "--rank", "2", "--world", "2"]) == 2
    assert "--rank 2 --world 2" in capsys.readouterr().err
    del cfg["tokenizer"]
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["prepare", str(tmp_path / "q.yaml"), "--rank", "0", "--world", "2"]) == 2
    assert "tokenizer.path" in capsys.readouterr().err


# ------------------------------------------------------------------ weighted sources
def test_weighted_sources_draw_exact_shares_and_resume():
    tokens = [np.arange(n, dtype=np.int64) for n in (5000, 3000, 800)]
    streams = [TaskStream(t, 16, 0, 1000 + j) for j, t in enumerate(tokens)]
    mix = MixtureStream(streams, [0.5, 0.3, 0.2])
    seen = np.zeros(3, dtype=np.int64)
    for n in (1, 7, 32, 100):
        before = mix.counts.copy()
        rows = mix.next_rows(n)
        seen += mix.counts - before
        total = int(seen.sum())
        assert np.all(np.abs(seen - np.array([0.5, 0.3, 0.2]) * total) < 1), seen
        # each row is the window of the concatenation at its reported offset
        cat = np.concatenate(tokens)
        assert all(np.array_equal(r, cat[s : s + 17]) for r, s in zip(rows, mix.last_starts))
    state = json.loads(json.dumps(mix.state_dict()))
    ahead = mix.next_rows(40)
    again = MixtureStream([TaskStream(t, 16, 0, 1000 + j) for j, t in enumerate(tokens)], [0.5, 0.3, 0.2])
    again.load_state_dict(state)
    assert np.array_equal(again.next_rows(40), ahead)
    assert share(10, [0.7, 0.3]) == [7, 3] and sum(share(1001, [1, 1, 1])) == 1001


def test_a_task_of_weighted_sources_trains_and_evaluates_its_mixture(small_texts, tmp_path):
    cfg = tiny_config(small_texts, replay={"rate": 0.25})
    cfg["tasks"][1] = {
        "name": "mix",
        "tokens": 3000,
        "sources": [{"path": str(small_texts["fr"]), "weight": 0.75}, {"path": str(small_texts["de"]), "weight": 0.25}],
    }
    cfg["tasks"][0]["tokens"] = 3000
    summary = cpt.train(validate(cfg), tmp_path / "mix")
    assert len(summary["loss_matrix"]) == 2 and all(np.isfinite(summary["loss_matrix"][1]))
    cov = summary["heldout"]["mix"]
    assert [s["eval_tokens"] for s in cov["sources"]] == [1536, 512]  # 2048 eval tokens at 0.75 / 0.25
    with pytest.raises(CptError, match="give `path` .* or `sources`"):
        validate({"tasks": [{"name": "a", "tokens": 10, "path": "x", "sources": [{"path": "y", "weight": 1}]}]})
