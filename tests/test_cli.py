"""`cpt train` takes dotted KEY=VALUE overrides wherever they are typed on the line (before or after
--out / --overwrite, before or after the config); anything else left over is still argparse's
"unrecognized arguments" (exit 2), and --resume with overrides that change what the run trains is refused."""

import json

import pytest
import yaml

from cpt.cli import main
from cpt.errors import CptError
from tests.conftest import tiny_config


@pytest.fixture
def cfg(small_texts, tmp_path):
    """A run small enough for seconds: 2 tasks of 3000 tokens, 32-token sequences, batch 2."""
    data = tiny_config(
        small_texts,
        training={"seq_len": 32, "batch_size": 2, "eval_tokens": 256},
        checkpoint={"task_ends": False},
    )
    for task in data["tasks"]:
        task["tokens"] = 3000
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_an_override_after_out_reaches_the_config(cfg, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["train", str(cfg), "--out", str(out), "training.lr=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cpt: error: ") and "training.lr" in err and "\n" not in err  # validated: it was applied
    assert not out.exists()  # refused before the run directory is touched


def test_overrides_anywhere_on_the_line_are_applied_in_order(cfg, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "tasks.1.tokens=2500", str(cfg), "--out", str(out), "training.lr=2e-3", "--overwrite", "training.lr=4e-3"]
    assert main(argv) == 0, capsys.readouterr().err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["training"]["lr"] == 4e-3  # the later of two overrides of one key wins, as typed
    assert [t["tokens"] for t in saved["tasks"]] == [3000, 2500]
    assert json.loads((out / "summary.json").read_text())["tokens"]["new"] < 6000  # the budgets as overridden, not 2 × 3000


@pytest.mark.parametrize(
    "argv,left_over",
    [
        (["train", "{cfg}", "--out", "{out}", "bogus"], "bogus"),  # not KEY=VALUE
        (["train", "{cfg}", "--out", "{out}", "--bogus", "training.lr=1e-3"], "--bogus"),  # an unknown option
        (["train", "{cfg}", "--out", "{out}", "a/b=1"], "a/b=1"),  # a path with `=` is no dotted key
        (["eval", "{out}", "training.lr=1e-3"], "training.lr=1e-3"),  # overrides belong to train only
    ],
)
def test_other_leftovers_are_still_unrecognized_arguments(cfg, tmp_path, capsys, argv, left_over):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main([a.format(cfg=cfg, out=out) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith(f"cpt: error: unrecognized arguments: {left_over}")
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--resume", "{run}", "training.lr=1e-3"],
        ["train", "--resume", "{run}", "training.lr=1e-3", "--overwrite", "tasks.1.tokens=2e3"],  # after an option too
        ["train", "--out", "{run}", "--resume", "training.lr=1e-3"],  # what --resume's optional RUN_DIR would swallow
    ],
)
def test_resume_with_overrides_is_refused(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert main([a.format(run=tmp_path / "a") for a in argv]) == 2
    assert "training.lr cannot change" in capsys.readouterr().err


def test_resume_may_change_how_the_run_executes_only():
    from cpt.training.launch import resume_overrides

    assert resume_overrides(["training.parallel=fsdp", "checkpoint.async=true"]) == ["training.parallel=fsdp", "checkpoint.async=true"]
    with pytest.raises(CptError, match="training.batch_size cannot change"):
        resume_overrides(["training.batch_size=4"])
