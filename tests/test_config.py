import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpt.config import load_config, reference_markdown
from cpt.errors import CptError

ROOT = Path(__file__).resolve().parents[1]

BASE = {"tasks": [{"name": "en", "path": "en.txt", "tokens": 1000}, {"name": "fr", "path": "fr.txt", "tokens": "2e6"}]}


def write(tmp_path, data) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_misspelled_key_names_the_field(tmp_path):
    data = dict(BASE, training={"lrr": 0.1})
    with pytest.raises(CptError, match=r"training\.lrr: unknown key"):
        load_config(write(tmp_path, data))


def test_out_of_range_value_names_the_field(tmp_path):
    data = dict(BASE, replay={"rate": 1.0})
    with pytest.raises(CptError, match=r"replay\.rate: .*less than 1"):
        load_config(write(tmp_path, data))
    data = dict(BASE, alignment={"method": "reptile", "k": 0})
    with pytest.raises(CptError, match=r"alignment\.k"):
        load_config(write(tmp_path, data))


def test_dotted_overrides_and_scientific_budgets(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["training.lr=3e-4", "tasks.1.tokens=2e6", "replay.rate=0.25"])
    assert cfg.training.lr == 3e-4
    assert cfg.tasks[1].tokens == 2_000_000
    assert cfg.replay.rate == 0.25
    # relative data paths are resolved against the config file's folder
    assert Path(cfg.tasks[0].path) == (tmp_path / "en.txt").resolve()


def test_override_of_missing_task_index(tmp_path):
    with pytest.raises(CptError, match="tasks.5: no such list index"):
        load_config(write(tmp_path, BASE), ["tasks.5.tokens=10"])


def test_cli_prints_one_line_and_exits_2(tmp_path):
    cfg = write(tmp_path, dict(BASE, trainig={"lr": 1}))
    proc = subprocess.run([sys.executable, "-m", "cpt", "train", str(cfg), "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainig: unknown key" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_reference_doc_is_current():
    """docs/config.md is generated from the schema; regenerate with `cpt config-reference > docs/config.md`."""
    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown() + "\n"


def test_every_example_config_validates():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        if path.name.startswith("sweep"):
            continue
        load_config(path)
