"""Replay sources (`replay.sources`): a corpus that is not a task fills the buffer before task 0 and is replayed from step 0.

The situation: continuing a pretrained model without its pretraining data. Here English handbook text stands in for
the original domain, the tasks are French then German, and the model is the tiny preset (seconds per run).
"""

from __future__ import annotations

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
from cpt.replay import sources as replay_sources
from cpt.replay.buffer import ReplayBuffer, peek
from cpt.report import write_report
from cpt.training import build
from tests.conftest import corpus_docs, free_port, tiny_config

SEQ, BATCH, RATE = 64, 4, 0.25
FILL = 32  # sequences of the source: 2048 tokens / 64


def _config(small_texts, sources: list[dict] | None = None, **sections) -> dict:
    cfg = tiny_config(
        small_texts,
        replay={"rate": RATE, "sources": sources or [_source(small_texts)]},
        checkpoint={"every": 10, "keep": 50, "task_ends": False},
        **sections,
    )
    cfg["tasks"] = [
        {"name": "fr", "path": str(small_texts["fr"]), "tokens": 12_000},
        {"name": "de", "path": str(small_texts["de"]), "tokens": 12_000},
    ]
    return cfg


def _source(small_texts, **extra) -> dict:
    return {"name": "en-web", "path": str(small_texts["en"]), "tokens": FILL * SEQ, "val_fraction": 0.2, **extra}


def _summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def _source_rows(replay_dir, task_id: int, shards: int = 1) -> list[np.ndarray]:
    """Every row stored under `task_id` in a buffer directory, shard by shard (slot order)."""
    out = []
    for shard in range(shards):
        meta = json.loads((replay_dir / f"shard-{shard:03d}.meta.json").read_text())
        slots = dict((int(t), s) for t, s in meta["task_slots"]).get(task_id, [])
        buf = ReplayBuffer.open(replay_dir, shard)
        out.append(buf.read(np.asarray(sorted(slots), dtype=np.int64))[0])
        buf.close()
    return out


@pytest.fixture(scope="module")
def reference(small_texts, tmp_path_factory):
    """One process, capacity all: the uninterrupted run the others are compared with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    cpt.train(validate(_config(small_texts)), out)
    return out


def test_the_source_fills_the_buffer_under_the_id_before_task_0_before_any_step(small_texts, tmp_path):
    from cpt.training.loop import Run

    cfg = validate(_config(small_texts))
    out = tmp_path / "zero"
    out.mkdir()
    run = Run(cfg, out, replay_task_offset=replay_sources.task_offset(cfg))
    run._make_source()  # what the run does once its directory exists, before step 0
    try:
        assert run.replay_task_offset == 1  # the source is id 0, French id 1, German id 2
        assert run.buffer.counts_per_task() == {0: FILL}
        assert run.source.eligible_tasks(0) == [0]  # so task 0 replays it from its first step
    finally:
        run.prefetcher.close()
        run.buffer.close()


def test_task_0_replays_the_source_at_exactly_alpha(reference):
    s = _summary(reference)
    assert s["replay_task_offset"] == 1 and s["tasks"] == ["fr", "de"]
    steps = s["task_boundaries"][0]
    assert abs(s["replay_fraction"][0] - RATE) <= 1 / (BATCH * steps)  # the exact plan's tolerance, first task included
    assert abs(s["replay_fraction"][1] - RATE) <= 1 / (BATCH * (s["task_boundaries"][1] - steps))
    assert s["replay_warnings"] == {}
    assert s["tokens"]["replay"] == round(RATE * BATCH * s["steps"]) * SEQ  # every step replayed its α·B rows
    # stored first (capacity all keeps the order rows were offered in): slots 0..31 are the source's, then French rows
    meta = json.loads((reference / "replay" / "shard-000.meta.json").read_text())
    slots = {int(t): s for t, s in meta["task_slots"]}
    assert slots[0] == list(range(FILL)) and min(slots[1]) == FILL
    assert peek(reference / "replay")["rows_per_task"][0] == FILL


def test_summary_and_report_show_the_source_beside_the_tasks(reference, tmp_path):
    s = _summary(reference)
    assert np.shape(s["loss_matrix"]) == (2, 2)  # tasks × tasks: every metric keeps its meaning
    rs = s["replay_sources"]["en-web"]
    evals = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["type"] == "eval"]
    assert rs["initial"] == evals[0]["replay_sources"]["en-web"] and evals[0]["step"] == 0
    assert rs["after_task"] == [e["replay_sources"]["en-web"] for e in evals if e["task_end"]]
    assert len(rs["after_task"]) == 2 and rs["forgetting"] == pytest.approx(rs["after_task"][-1] - rs["initial"])
    assert rs["fill"] == {"sequences": FILL, "tokens": FILL * SEQ} and rs["stored_at_end"] == FILL
    assert rs["heldout"]["documents"] >= 2 and rs["task_id"] == 0
    report = (write_report([reference], tmp_path / "report")["report.md"]).read_text()
    assert "replay-source forgetting" in report and "| en-web (replay source) |" in report
    assert f"{rs['forgetting']:.3f}" in report


def test_cpt_eval_reports_the_source_too(reference):
    from cpt.training.evaluator import evaluate_checkpoint

    losses = evaluate_checkpoint(reference, "final")
    assert set(losses) == {"fr", "de", "en-web (replay source)"}
    assert losses["en-web (replay source)"] == pytest.approx(_summary(reference)["replay_sources"]["en-web"]["after_task"][-1], rel=1e-5)


def test_held_out_documents_never_enter_the_buffer(small_texts, reference):
    source = build.prepare_data(validate(_config(small_texts)), lambda m: None).replay_sources[0]
    train, val = np.asarray(source.train[:]), np.asarray(source.val[:])
    windows = {train[s : s + SEQ + 1].tobytes() for s in range(0, len(train) - SEQ, SEQ)}
    held_out = {val[s : s + SEQ + 1].tobytes() for s in range(len(val) - SEQ)}  # every window of the held-out split
    (rows,) = _source_rows(reference / "replay", 0)
    assert len(rows) == FILL and len({r.tobytes() for r in rows}) == FILL  # distinct sequences
    for r in rows:
        assert r.astype(train.dtype).tobytes() in windows  # a training window of the source
        assert r.astype(val.dtype).tobytes() not in held_out


@pytest.mark.parametrize("cut_at", [10, 70])
def test_a_resumed_run_equals_the_uninterrupted_one(small_texts, tmp_path, cut_at):
    """A finite reservoir, so the tasks' rows evict the source's and the undo journals matter."""
    cfg = _config(small_texts)
    cfg["replay"]["buffer"] = {"capacity": 3200, "policy": "reservoir"}  # 50 sequences: the fill and 18 more
    whole = tmp_path / "whole"
    a = cpt.train(validate(cfg), whole)
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    ckpts = sorted((cut / "checkpoints").glob("step-*"))
    keep = next(c for c in ckpts if int(c.name[5:]) >= cut_at)
    for later in ckpts[ckpts.index(keep) + 1 :]:
        shutil.rmtree(later)
    (cut / "summary.json").unlink()
    b = cpt.train(None, cut, resume=True)
    for key in ("loss_matrix", "replay_sources", "tokens", "replay_fraction", "replay_buffer"):
        assert b[key] == a[key], key
    assert a["replay_sources"]["en-web"]["stored_at_end"] < FILL  # the fill was partly evicted by then


def test_refs_resolve_the_source_in_its_token_file(small_texts, reference, tmp_path):
    """`replay.buffer.store: refs` stores the source's offsets into its prepared tokens: the same run as storing rows."""
    cfg = _config(small_texts)
    cfg["replay"]["buffer"] = {"store": "refs"}
    s = cpt.train(validate(cfg), tmp_path / "refs")
    ref = _summary(reference)
    for key in ("loss_matrix", "replay_sources", "tokens", "replay_fraction"):
        assert s[key] == ref[key], key
    assert peek(tmp_path / "refs" / "replay")["stored_bytes"] < peek(reference / "replay")["stored_bytes"] / 10


def test_buffer_init_ids_come_first_then_the_sources(small_texts, tmp_path):
    earlier = tiny_config(small_texts, replay={"rate": RATE}, checkpoint={"task_ends": False})
    earlier["tasks"] = earlier["tasks"][:1]  # one task: English, stored as id 0
    cpt.train(validate(earlier), tmp_path / "a")
    cfg = _config(small_texts)
    cfg["tasks"] = cfg["tasks"][1:]  # German only
    cfg["replay"]["buffer"] = {"init": str(tmp_path / "a" / "replay")}
    s = cpt.train(validate(cfg), tmp_path / "b")
    assert s["replay_task_offset"] == 2 and s["replay_sources"]["en-web"]["task_id"] == 1
    rows = peek(tmp_path / "b" / "replay")["rows_per_task"]
    assert rows[1] == FILL and rows[0] == peek(tmp_path / "a" / "replay")["fill"] and 2 in rows
    assert s["replay_fraction"] == [RATE]


def test_two_ranks_fill_their_shards_with_their_share_of_one_order(small_texts, reference, tmp_path):
    cfg = _config(small_texts, training={"batch_size": BATCH // 2})  # the same global batch as the reference
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    proc = subprocess.run([*cmd, "-m", "cpt", "train", str(path), "--out", str(tmp_path / "two")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = _summary(tmp_path / "two")
    assert s["world_size"] == 2 and s["replay_fraction"] == [RATE, RATE] and s["replay_warnings"] == {}
    shards = _source_rows(tmp_path / "two" / "replay", 0, shards=2)
    assert [len(r) for r in shards] == [FILL // 2, FILL // 2]
    (one,) = _source_rows(reference / "replay", 0)
    assert sorted(r.tobytes() for r in np.concatenate(shards)) == sorted(r.tobytes() for r in one)  # one process's rows
    assert s["replay_sources"]["en-web"]["stored_at_end"] == FILL and len(s["replay_sources"]["en-web"]["after_task"]) == 2


def test_a_trained_bpe_learns_from_the_source_too(small_texts, tmp_path):
    """Like a task's text: a Japanese source gives the run's BPE Japanese merges that French and German alone do not."""
    ja = tmp_path / "ja.txt"
    ja.write_text("\n\n".join(corpus_docs("ja")[:40]) + "\n", encoding="utf-8")
    sentence = corpus_docs("ja")[50][:200]
    lengths = []
    for sources in ([], [{"name": "ja-web", "path": str(ja), "tokens": 1024}]):
        cfg = _config(small_texts)
        cfg["replay"]["sources"] = sources
        tok = build.prepare_data(validate(cfg), lambda m: None).tokenizer
        lengths.append(len(tok.encode_batch([sentence])[0]))
    assert lengths[1] < 0.8 * lengths[0]


def test_weights_of_sources_and_tasks(small_texts):
    def weights(**replay):
        cfg = _config(small_texts)
        cfg["replay"].update(replay)
        c = validate(cfg)
        return replay_sources.weights_by_id(c, replay_sources.task_offset(c))

    assert weights() is None  # uniform over stored rows, as without sources
    assert weights(sources=[_source(small_texts, weight=2)]) == {0: 2.0, 1: 1.0, 2: 1.0}  # the tasks keep weight 1
    assert weights(task_weights={"fr": 1, "en-web": 3}) == {1: 1.0, 0: 3.0}  # a source named in task_weights
    assert weights(task_weights={"fr": 1}, sources=[_source(small_texts, weight=3)]) == {1: 1.0, 0: 3.0}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rate": 0.0}, r"replay.sources: they are replayed, so replay.rate must be > 0"),
        ({"buffer": {"capacity": 1000}}, r"replay.buffer.capacity: 1000 tokens hold fewer than the 32 sequences of replay.sources"),
        ({"buffer": {"capacity": 31, "capacity_unit": "sequences"}}, r"replay.buffer.capacity: 31 sequences hold fewer than the 32"),
        ({"task_weights": {"en-web": 1}, "sources": "weighted"}, r"replay.sources: \['en-web'\] weighed twice"),
        ({"sources": "named fr"}, r"replay.sources: \['fr'\] also name a task"),
        ({"sources": "twice"}, r"replay.sources: names must be unique"),
        (
            {"task_weights": {"it": 1}},
            r"replay.task_weights: unknown task\(s\) \['it'\]; tasks are \['fr', 'de'\], replay sources \['en-web'\]",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused_in_one_line(small_texts, change, message):
    cfg = _config(small_texts)
    variants = {
        "weighted": [_source(small_texts, weight=1)],
        "named fr": [{**_source(small_texts), "name": "fr"}],
        "twice": [_source(small_texts), _source(small_texts)],
    }
    for key, value in change.items():
        cfg["replay"][key] = variants.get(value, value) if isinstance(value, str) else value
    with pytest.raises(CptError, match=message) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_a_source_with_fewer_sequences_than_asked_is_refused_before_anything_is_written(small_texts, tmp_path):
    cfg = _config(small_texts, sources=[_source(small_texts, tokens=10**6)])
    cfg["replay"]["buffer"] = {"capacity": "all"}
    with pytest.raises(
        CptError, match=r"replay.sources.0.tokens: en-web's training split holds [\d,]+ sequence\(s\) of 65 tokens, fewer than the 15,625"
    ):
        cpt.train(validate(cfg), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_a_sources_unreadable_data_is_named_by_its_own_field(small_texts, tmp_path):
    """A JSONL source without the text field: the error names `replay.sources.0.text_field`, not a task's field."""
    data = tmp_path / "web.jsonl"
    data.write_text("".join(json.dumps({"body": d}) + "\n" for d in corpus_docs("en")[:40]))
    cfg = _config(small_texts, sources=[_source(small_texts, path=str(data))])
    with pytest.raises(CptError, match=r"web.jsonl:1: no 'text' field \(set replay.sources.0.text_field\)$"):
        cpt.train(validate(cfg), tmp_path / "never")


def test_the_cli_refuses_with_one_line_and_exit_code_2(small_texts, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_config(small_texts)))
    proc = subprocess.run(
        [sys.executable, "-m", "cpt", "train", str(path), "replay.rate=0", "--out", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("cpt: error:") and "replay.sources" in proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------ generated sources (sampled from the model before task 0)
GENERATED = {"name": "self", "generate": {"tokens": FILL * SEQ, "seed": 3, "batch_size": 8, "top_p": 0.9}}


def _filled_rows(small_texts, tmp_path, name: str, **generate) -> np.ndarray:
    """The generated source's rows in the buffer of a run that has made its source (before step 0)."""
    from cpt.training.loop import Run

    cfg = validate(_config(small_texts, sources=[{**GENERATED, "generate": {**GENERATED["generate"], **generate}}]))
    (tmp_path / name).mkdir()
    run = Run(cfg, tmp_path / name)
    run._make_source()
    try:
        rows = run.buffer.read(np.arange(run.buffer.fill))[0]
        assert run.buffer.counts_per_task() == {0: FILL}
        return rows
    finally:
        run.prefetcher.close()
        run.buffer.close()


def test_a_generated_source_is_reproducible_for_a_fixed_seed(small_texts, tmp_path):
    a = _filled_rows(small_texts, tmp_path, "a")
    b = _filled_rows(small_texts, tmp_path, "b")
    c = _filled_rows(small_texts, tmp_path, "c", seed=4)
    assert a.shape == (FILL, SEQ + 1) and np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({r.tobytes() for r in a}) == FILL  # sampled, not one sequence repeated


def test_generated_rows_do_not_depend_on_how_they_are_split_over_ranks(small_texts, tmp_path):
    """Batch b is sampled under a seed of (seed, b): a rank asked for rows [lo, hi) gets the rows one process has there."""
    from cpt.training.loop import Run

    cfg = validate(_config(small_texts, sources=[GENERATED]))
    run = Run(cfg, tmp_path / "split")
    sample, fill = run._sampler(), run.fills[0]
    whole = sample(fill, 0, FILL)
    assert np.array_equal(np.concatenate([sample(fill, 0, 13), sample(fill, 13, FILL)]), whole)  # 13: inside batch 1
    start = run.model.config.bos_token_id if run.model.config.bos_token_id is not None else run.tokenizer.eos_id
    assert (whole[:, 0] == start).all() and whole.max() < run.tokenizer.vocab_size


def test_a_generated_source_is_replayed_from_step_0_and_its_speed_reported(small_texts, tmp_path):
    s = cpt.train(validate(_config(small_texts, sources=[GENERATED])), tmp_path / "gen")
    assert s["replay_task_offset"] == 1 and abs(s["replay_fraction"][0] - RATE) <= 1 / (BATCH * s["task_boundaries"][0])
    g = s["replay_sources"]["self"]
    assert g["fill"] == {"sequences": FILL, "tokens": FILL * SEQ} and "after_task" not in g  # no held-out split
    assert g["generated"]["sampled_tokens"] == FILL * SEQ and g["generated"]["tokens_per_second"] > 0
    evals = [json.loads(line) for line in (tmp_path / "gen" / "metrics.jsonl").read_text().splitlines()]
    assert not any("replay_sources" in e for e in evals)  # nothing to evaluate
    assert "tokens/s" in (write_report([tmp_path / "gen"], tmp_path / "report")["report.md"]).read_text()


@pytest.mark.parametrize(
    "source, buffer, message",
    [
        ({**GENERATED, "path": "x.txt"}, {}, r"give `path` \(a corpus\) or `generate`"),
        ({**GENERATED, "tokens": 2048}, {}, r"tokens: with `generate` the budget is `generate.tokens`"),
        ({"name": "web", "path": "x.txt"}, {}, r"tokens: how many of its training tokens fill the buffer"),
        (GENERATED, {"store": "refs"}, r"replay.buffer.store: refs points into prepared token files"),
    ],
)
def test_generated_sources_refuse_what_cannot_work(small_texts, source, buffer, message):
    cfg = _config(small_texts, sources=[source])
    cfg["replay"]["buffer"] = buffer
    with pytest.raises(CptError, match=message):
        validate(cfg)


def test_a_generated_source_is_refused_under_fsdp(small_texts):
    cfg = validate(_config(small_texts, sources=[GENERATED]))
    with pytest.raises(CptError, match=r"replay.sources.0.generate: not under training.parallel: fsdp"):
        replay_sources.plan_fills(cfg, [], replay_sources.task_offset(cfg), 2, 512, sharded=True)
