"""Downstream evaluation with lm-evaluation-harness: offline cloze tasks, scores in summary.json and the report."""

import json
import sys

import pytest

import cpt
from cpt.cli import main
from cpt.config import validate
from cpt.data.readers import iter_documents
from cpt.data.tokens import split_documents
from cpt.downstream import cloze
from cpt.errors import CptError
from tests.conftest import tiny_config

pytest.importorskip("lm_eval", reason="downstream evaluation needs lm-evaluation-harness: pip install 'cpt[lm-eval]'")

LIMIT = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_texts):
    out = tmp_path_factory.mktemp("runs") / "seq"
    cpt.train(validate(tiny_config(small_texts)), out)
    return out


def test_cloze_examples_come_from_held_out_documents_only():
    for lang in ("en", "ja"):
        source = cloze.HANDBOOK / f"{lang}.txt.xz"
        val = "\n".join(split_documents(iter_documents(source), cloze.VAL_FRACTION, "val"))
        train = "\n".join(split_documents(iter_documents(source), cloze.VAL_FRACTION, "train"))
        examples = cloze.build_examples(lang, max_examples=50)
        assert examples == cloze.build_examples(lang, max_examples=50)  # a pure function of the corpus
        assert len(examples) == 50
        sep = "" if lang in cloze.CHAR_UNITS else " "
        for e in examples:
            assert len(e["choices"]) == 4 and len(set(e["choices"])) == 4
            passage = e["context"] + sep + e["choices"][e["label"]]
            assert passage in val and passage not in train  # the true continuation, from text training never sees
        assert len({e["label"] for e in examples}) == 4  # the answer is not always in one place


def test_lm_eval_scores_every_task_end_into_summary_and_report(run_dir, tmp_path, capsys):
    before = json.loads((run_dir / "summary.json").read_text())
    code = main(["eval", str(run_dir), "--lm-eval", "cpt_cloze_en,cpt_cloze_fr", "--limit", str(LIMIT)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "task-0-en" in printed and "cpt_cloze_fr" in printed

    summary = json.loads((run_dir / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if not k.startswith("downstream")} == before  # nothing else changed
    scores = summary["downstream"]
    assert list(scores) == ["task-0-en", "task-1-fr", "final"]
    for checkpoint in scores.values():
        for task in ("cpt_cloze_en", "cpt_cloze_fr"):
            m = checkpoint[task]
            assert 0.0 <= m["acc"] <= 1.0 and 0.0 <= m["acc_norm"] <= 1.0 and m["acc_stderr"] > 0
            assert m["samples"] == LIMIT
            assert m["num_fewshot"] == 0
    assert scores["final"] == scores["task-1-fr"]  # the same weights, scored once

    # a second call adds a task without losing the first ones
    assert main(["eval", str(run_dir), "--lm-eval", "cpt_cloze_de", "--limit", "4", "--checkpoint", "final"]) == 0
    again = json.loads((run_dir / "summary.json").read_text())["downstream"]
    assert again["final"]["cpt_cloze_en"] == scores["final"]["cpt_cloze_en"] and again["final"]["cpt_cloze_de"]["samples"] == 4
    assert "cpt_cloze_de" not in again["task-0-en"]

    files = cpt_report(run_dir, tmp_path)
    md = files["report.md"].read_text()
    assert "| checkpoint | cpt_cloze_en (acc) | cpt_cloze_fr (acc) | cpt_cloze_de (acc) |" in md
    row = f"| after en | {scores['task-0-en']['cpt_cloze_en']['acc']:.3f} ± {scores['task-0-en']['cpt_cloze_en']['acc_stderr']:.3f} |"
    assert row in md
    html = files["report.html"].read_text()
    assert "<th>cpt_cloze_en (acc)</th>" in html and ">after fr</td>" in html


def cpt_report(run_dir, tmp_path):
    from cpt.report import write_report

    return write_report([run_dir], tmp_path / "report")


def test_unknown_task_and_missing_lm_eval_are_one_line_errors(run_dir, capsys, monkeypatch):
    before = (run_dir / "summary.json").read_text()
    assert main(["eval", str(run_dir), "--lm-eval", "cpt_cloze_en,cpt_cloze_xx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task 'cpt_cloze_xx'" in err[0] and "cpt_cloze_fr" in err[0]
    assert main(["eval", str(run_dir), "--lm-eval", "cpt_cloze_en", "--checkpoint", "task-7-xx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task-7-xx" in err[0] and "task-0-en" in err[0]

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-evaluation-harness were not installed
    assert main(["eval", str(run_dir), "--lm-eval", "cpt_cloze_en"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'cpt[lm-eval]'" in err[0]
    assert (run_dir / "summary.json").read_text() == before
    with pytest.raises(CptError, match="comma-separated"):
        from cpt.downstream import parse_tasks

        parse_tasks(" , ")
