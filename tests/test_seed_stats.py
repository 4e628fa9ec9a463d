"""Claims judged across seeds (cpt.report.seeds): intervals, verdicts, pairing by seed, labels, the report section, `demo --seeds`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from cpt.cli import _parser
from cpt.config import validate
from cpt.demo import _seeded, demo_config, printed_results, seeded_runs
from cpt.errors import CptError
from cpt.report import write_report
from cpt.report.render import Para, Table, to_markdown
from cpt.report.seeds import (
    Z975,
    compare,
    comparisons,
    group_runs,
    interval,
    report_blocks,
    strategy_label,
    t_quantile,
    verdict,
)

RUNS = Path(__file__).parent / "data" / "runs"


def run(kind: str, seed: int | None, forgetting: float | None, final: float, **extra) -> dict:
    """A hand-made summary of one strategy and seed, with its config (as the report attaches config.yaml)."""
    s = {"run": f"{kind}-seed{seed}", "strategy": "joint" if kind == "joint" else "sequential", "replay_rate": 0.0, "alignment": "none"}
    config: dict = {"seed": seed}
    if kind in ("replay", "mer"):
        s["replay_rate"] = 0.25
    if kind in ("mer", "reptile"):
        s["alignment"] = "reptile"
        config["alignment"] = {"method": "reptile", "k": 5, "beta": 0.7}
    return {**s, "forgetting_score": forgetting, "avg_final_loss": final, "config": config, **extra}


def test_interval_of_three_seeds_is_the_student_t_interval() -> None:
    iv = interval([1.0, 2.0, 3.0])  # mean 2, sample sd 1: half-width t(0.975, 2) / sqrt(3)
    assert iv.n == 3 and iv.mean == pytest.approx(2.0)
    assert iv.half == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5)
    assert (iv.low, iv.high) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)
    assert iv.show() == "2.000 ± 2.484"
    one = interval([0.5])
    assert one.n == 1 and math.isnan(one.half) and one.show() == "0.500 (1 seed)"
    assert interval([]) is None


def test_t_quantiles_without_scipy_match_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    with_scipy = [t_quantile(d) for d in (1, 4, 30, 31, 100)]
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # `from scipy.stats import t` now raises ImportError
    table = [t_quantile(d) for d in (1, 4, 30, 31, 100)]
    assert table[:3] == pytest.approx(with_scipy[:3], abs=1e-5)
    assert table[3:] == pytest.approx(with_scipy[3:], abs=1e-4) and Z975 < table[4] < table[3]  # beyond the table: near the normal
    with pytest.raises(ValueError):
        t_quantile(0)


def test_verdict_holds_refuted_or_not_separable() -> None:
    seq = [run("sequential", s, f, 3.6) for s, f in enumerate([0.80, 0.85, 0.90])]
    # replay forgets clearly less on every seed: the difference's CI lies below 0
    (g_seq, g_rep), _ = group_runs(seq + [run("replay", s, f, 3.5) for s, f in enumerate([0.30, 0.27, 0.33])])
    c = compare(g_rep, g_seq, "forgetting_score")
    assert c.claim == "replay α=0.25 forgets less than sequential" and c.verdict == "holds"
    assert c.interval.mean == pytest.approx(-0.55) and c.interval.high < 0
    # replay forgets more on every seed: refuted
    (g_seq, g_rep), _ = group_runs(seq + [run("replay", s, f, 3.5) for s, f in enumerate([1.30, 1.27, 1.33])])
    assert compare(g_rep, g_seq, "forgetting_score").verdict == "refuted"
    # differences of either sign: the CI contains 0
    (g_seq, g_rep), _ = group_runs(seq + [run("replay", s, f, 3.5) for s, f in enumerate([0.70, 0.95, 0.85])])
    c = compare(g_rep, g_seq, "forgetting_score")
    assert c.interval.low < 0 < c.interval.high and c.verdict == "not separable from noise at 3 seeds"
    # one seed: however large the gap, no spread to judge it by
    (g_seq, g_rep), _ = group_runs([seq[0], run("replay", 0, 0.01, 3.5)])
    assert compare(g_rep, g_seq, "forgetting_score").verdict == "not separable from noise at 1 seed"
    assert verdict(None) == "not separable from noise at 0 seeds"


def test_pairing_by_seed_leaves_unpaired_seeds_out_and_says_so() -> None:
    summaries = [run("sequential", s, 0.8 + s / 100, 3.6) for s in (0, 1)] + [run("replay", s, 0.3 + s / 100, 3.5) for s in (0, 1, 2)]
    seq, rep = group_runs(summaries)[0]
    c = compare(rep, seq, "forgetting_score")
    assert sorted(c.diffs) == [0, 1] and c.unpaired == {"replay α=0.25": [2]}
    assert c.interval.mean == pytest.approx(-0.5)  # seed 2's replay run (0.32) is not in the mean
    md = to_markdown("t", report_blocks(summaries))
    assert "replay α=0.25 vs sequential: seed(s) 2 of replay α=0.25 have no run of the other side" in md
    assert md.count("seed(s) 2 of") == 1  # one note for the pair, not one per metric


def test_runs_without_a_seed_or_with_a_taken_seed_are_left_out() -> None:
    groups, notes = group_runs([run("replay", 0, 0.3, 3.5), run("replay", 0, 0.9, 3.9, run="again"), run("replay", None, 0.3, 3.5)])
    assert [g.runs[0]["run"] for g in groups] == ["replay-seed0"]  # the first run of a seed is kept
    assert any("`again`" in n and "seed 0 already given by `replay-seed0`" in n for n in notes)
    assert any("no seed" in n for n in notes)
    # a seed in the summary itself wins over the config's
    assert group_runs([{**run("replay", 0, 0.3, 3.5), "seed": 4}])[0][0].runs.keys() == {4}


def test_strategy_labels_name_the_method_and_its_settings() -> None:
    assert strategy_label(run("sequential", 0, 0.8, 3.6)) == "sequential"
    assert strategy_label(run("replay", 0, 0.3, 3.5)) == "replay α=0.25"
    assert strategy_label(run("mer", 0, 0.3, 3.5)) == "MER (replay α=0.25 + Reptile k=5 β=0.7)"
    assert strategy_label(run("reptile", 0, 0.3, 3.5)) == "Reptile k=5 β=0.7"
    assert strategy_label(run("joint", 0, None, 3.4)) == "joint"
    merged = {"strategy": "sequential", "replay_rate": 0.0, "alignment": "none", "merge": {"lam": 0.5, "toward": "previous", "merges": 4}}
    assert strategy_label(merged) == "merge λ=0.5"
    assert (
        strategy_label({**merged, "merge": {"lam": 0.3, "toward": "initial"}, "replay_rate": 0.1})
        == "replay α=0.1 + merge λ=0.3 toward initial"
    )
    assert strategy_label({"strategy": "sequential", "alignment": "reptile"}) == "Reptile"  # no config: settings unknown


def test_the_papers_comparisons_are_made_between_the_groups_present() -> None:
    kinds = ("sequential", "replay", "mer", "reptile", "joint")
    groups, _ = group_runs([run(k, s, None if k == "joint" else 0.5, 3.5) for k in kinds for s in (0, 1)])
    claims = [c.claim for c in comparisons(groups)]
    assert claims == [
        "replay α=0.25 forgets less than sequential",
        "replay α=0.25 ends with a lower avg final loss than sequential",
        "MER (replay α=0.25 + Reptile k=5 β=0.7) forgets less than replay α=0.25",
        "MER (replay α=0.25 + Reptile k=5 β=0.7) ends with a lower avg final loss than replay α=0.25",
        "joint ends with a lower avg final loss than replay α=0.25",  # joint has no forgetting to compare
        "Reptile k=5 β=0.7 forgets less than sequential",
        "Reptile k=5 β=0.7 ends with a lower avg final loss than sequential",
    ]
    # MER is compared with the replay run of its own α only
    other = [{**run("replay", s, 0.4, 3.5), "replay_rate": 0.5} for s in (0, 1)]
    groups, _ = group_runs([run("mer", s, 0.3, 3.5) for s in (0, 1)] + other)
    assert comparisons(groups) == []


def test_runs_of_another_model_size_are_not_pooled_as_seeds() -> None:
    small = [run("replay", s, 0.3, 3.5, parameters=1_000_000, tasks=["en", "fr"]) for s in (0, 1)]
    large = [run("replay", s, 0.1, 3.0, parameters=8_000_000, tasks=["en", "fr"]) for s in (0, 1)]
    seq = [run("sequential", s, 0.8, 3.6, parameters=1_000_000, tasks=["en", "fr"]) for s in (0, 1)]
    groups, notes = group_runs(small + large + seq)
    assert [g.label for g in groups] == ["sequential", "replay α=0.25 (1,000,000 parameters)", "replay α=0.25 (8,000,000 parameters)"]
    assert not notes and all(len(g.runs) == 2 for g in groups)  # the large model's seeds 0, 1 are not "taken" by the small's
    assert [c.a for c in comparisons(groups)] == ["replay α=0.25 (1,000,000 parameters)"] * 2  # only the same size is compared
    other_tasks = [run("replay", s, 0.3, 3.5, parameters=1_000_000, tasks=["en", "de"]) for s in (0, 1)]
    assert [g.label for g in group_runs(small + other_tasks)[0]] == ["replay α=0.25 (en → fr)", "replay α=0.25 (en → de)"]


def test_section_tables_right_align_numbers_and_show_mean_and_ci() -> None:
    blocks = report_blocks([run("sequential", s, f, 3.6) for s, f in enumerate([1.0, 2.0, 3.0])] + [run("replay", 0, 0.3, 3.5)])
    means, claims = [b for b in blocks if isinstance(b, Table)]
    assert means.rows[0][:3] == ["sequential", "0, 1, 2", "2.000 ± 2.484"] and means.rows[1][2] == "0.300 (1 seed)"
    assert claims.rows[0][1] == "not separable from noise at 1 seed"
    md = to_markdown("t", blocks)
    assert "|:---|---:|---:|---:|---:|---:|---:|" in md  # the label left; seeds and every metric right, headers too
    assert not report_blocks([run("sequential", 0, 0.8, 3.6), run("replay", 0, 0.3, 3.5)])  # one seed each: no section
    assert any(isinstance(b, Para) and "No pair" in b.text for b in report_blocks([run("sequential", s, 0.8, 3.6) for s in (0, 1)]))


def _runs(tmp_path: Path, seeds: tuple[int, ...]) -> list[Path]:
    """Copies of the fixture runs, one per strategy and seed, each with a config.yaml giving its seed."""
    dirs = []
    for name in ("sequential", "replay"):
        summary = json.loads((RUNS / name / "summary.json").read_text())
        for seed in seeds:
            d = tmp_path / f"{name}-seed{seed}"
            d.mkdir(parents=True)
            summary.update(run=d.name, forgetting_score=summary["forgetting_score"] + seed / 100)
            (d / "summary.json").write_text(json.dumps(summary))
            (d / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
            dirs.append(d)
    return dirs


def test_report_has_an_across_seeds_section_with_two_seeds_and_not_with_one(tmp_path: Path) -> None:
    dirs = _runs(tmp_path / "two", (0, 1))
    md = write_report(dirs[::-1], tmp_path / "report2")["report.md"].read_text()  # replay's runs given first
    assert "## Across seeds" in md
    # the first screen: the strategies' means and the verdicts, before the table of every run
    assert md.index("## Across seeds") < md.index("## Every run") and "## Summary" not in md
    assert md.index("| sequential | 0, 1 |") < md.index("| replay α=0.25 | 0, 1 |")  # the paper's order, not the given one
    assert "| replay α=0.25 | 0, 1 |" in md and "| replay α=0.25 forgets less than sequential | holds | 2 |" in md
    html = (tmp_path / "report2" / "report.html").read_text()
    assert "<h2>Across seeds</h2>" in html and '<td class="t">holds</td>' in html
    assert "<em>holds</em> when" in html and "*holds*" not in html  # the how-to-read's emphasis, rendered
    from cpt.report.render import _inline

    assert _inline("`runs/*/a/*` and *this*") == "<code>runs/*/a/*</code> and <em>this</em>"  # never inside code
    md = write_report(_runs(tmp_path / "one", (0,)), tmp_path / "report1")["report.md"].read_text()
    assert "Across seeds" not in md and "## Summary" in md


def test_demo_seeds_layout_and_cli_flag() -> None:
    names = ["sequential", "replay"]
    assert seeded_runs(names, 1) == [("sequential", "sequential", 0), ("replay", "replay", 0)]  # today's layout
    assert seeded_runs(names, 2) == [("sequential-seed0", "sequential", 0), ("replay-seed0", "replay", 0), ("sequential-seed1", "sequential", 1), ("replay-seed1", "replay", 1)]  # fmt: skip
    with pytest.raises(CptError, match="--seeds"):
        seeded_runs(names, 0)
    cfg = validate(_seeded(demo_config("replay", quick=True), "replay-seed2", 2), "demo:replay-seed2")
    assert (cfg.seed, cfg.name) == (2, "replay-seed2")
    assert demo_config("replay") == _seeded(demo_config("replay"), "replay", 0)  # one seed: the config is unchanged
    assert _parser().parse_args(["demo", "--seeds", "3"]).seeds == 3 and _parser().parse_args(["demo"]).seeds == 1


def test_the_demo_prints_each_runs_strategy_and_seed_and_the_claims_across_seeds() -> None:
    planned = seeded_runs(["sequential", "replay"], 2)
    made = {
        "sequential-seed0": run("sequential", 0, 2.0, 8.0),
        "replay-seed0": run("replay", 0, 0.05, 6.5),
        "sequential-seed1": run("sequential", 1, 2.2, 8.1),
        "replay-seed1": run("replay", 1, 0.07, 6.6),
    }
    summaries = {name: {k: v for k, v in s.items() if k != "config"} for name, s in made.items()}  # what training returns
    configs = {name: s["config"] for name, s in made.items()}
    lines = printed_results(planned, summaries, configs).splitlines()
    assert lines[3].startswith("| replay (seed 0) | 0.050 |") and lines[5].startswith("| replay (seed 1) | 0.070 |")
    assert "## Across seeds" in lines
    assert any(line.startswith("| replay α=0.25 forgets less than sequential | holds | 2 |") for line in lines)
    one = printed_results(seeded_runs(["replay"], 1), {"replay": summaries["replay-seed0"]}, {}).splitlines()
    assert one[2].startswith("| replay | 0.050 |") and len(one) == 3  # one seed: the table the README quotes, nothing more
