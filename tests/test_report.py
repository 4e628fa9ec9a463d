"""`cpt report`: the files a user opens (markdown, self-contained HTML, PNGs) and its errors."""

import re
import shutil
from pathlib import Path

import pytest

from cpt.errors import CptError
from cpt.report import write_report

RUNS = Path(__file__).parent / "data" / "runs"
ALL = [RUNS / "sequential", RUNS / "replay", RUNS / "joint"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Drawing is the slow part (~1 s): draw once, assert on it many times.
    return write_report(ALL, tmp_path_factory.mktemp("report"))


def test_writes_markdown_html_and_valid_pngs(report: dict[str, Path]) -> None:
    assert report["report.md"].is_file() and report["report.html"].is_file()
    pngs = [p for name, p in report.items() if name.endswith(".png")]
    # compare + first task + per run a heatmap and curves + the replay run's probe
    assert {p.name for p in pngs} >= {
        "compare.png",
        "first_task.png",
        "matrix_joint.png",
        "curves_sequential.png",
        "probe_replay.png",
    }
    assert not (report["report.md"].parent / "probe_sequential.png").exists()
    for p in pngs:
        data = p.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1024, p


def test_html_is_self_contained(report: dict[str, Path]) -> None:
    html = report["report.html"].read_text()
    imgs = re.findall(r"<img [^>]*>", html)
    assert len(imgs) == sum(name.endswith(".png") for name in report)
    assert all('src="data:image/png;base64,' in tag for tag in imgs)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)
    assert "<link" not in html and "<script" not in html


def test_markdown_table_and_links(report: dict[str, Path]) -> None:
    md = report["report.md"].read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    # The sequential fixture has no "run" key: its name is the directory's.
    assert set(rows) >= {"sequential", "replay", "joint"}
    assert "0.847" in rows["sequential"] and "**0.273**" in rows["replay"]  # best is bold
    assert "**3.434**" in rows["joint"]  # joint has the best average final loss
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (report["report.md"].parent / name).is_file()  # relative and present
    assert "How to read this" in md and "forgetting" in md


def test_missing_summary_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CptError, match=re.escape(str(tmp_path / "empty" / "summary.json"))):
        write_report([RUNS / "replay", tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # validated before anything is written


def test_malformed_summary_names_the_file(tmp_path: Path) -> None:
    run = tmp_path / "bad"
    shutil.copytree(RUNS / "replay", run)
    (run / "summary.json").write_text('{"tasks": ["en"], "loss_matrix": [[1.0, 2.0]]}')
    with pytest.raises(CptError, match="summary.json: 'loss_matrix'"):
        write_report([run], tmp_path / "out")
    (run / "summary.json").write_text('{"tasks": ["en"], ')
    with pytest.raises(CptError, match="summary.json: not valid JSON"):
        write_report([run], tmp_path / "out")


def test_truncated_last_metrics_line_is_tolerated(tmp_path: Path) -> None:
    run = tmp_path / "killed"
    shutil.copytree(RUNS / "replay", run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"type": "eval", "step": 310, "losses": {"en": 3.')
    paths = write_report([run], tmp_path / "out")
    assert "curves_replay.png" in paths and "probe_replay.png" in paths
    # A broken line in the middle is not a killed write: it is reported, with its line.
    text = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([text[0], "{oops", *text[1:]]))
    with pytest.raises(CptError, match=r"metrics\.jsonl:2: not valid JSON"):
        write_report([run], tmp_path / "out")


def test_text_columns_are_left_and_number_columns_right_headers_included(report: dict[str, Path]) -> None:
    md = report["report.md"].read_text(encoding="utf-8")
    html = report["report.html"].read_text(encoding="utf-8")
    assert "| run | strategy | forgetting |" in md and "|:---|:---|---:|" in md
    # the strategy column names the method and its settings, header and cells left-aligned like the run names
    assert '<th class="t">strategy</th><th>forgetting</th>' in html and '<td class="t">replay α=0.25</td>' in html
