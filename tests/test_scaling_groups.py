"""The scaling report keeps apart runs that differ in any grid key but the seed: a second grid axis
(here the learning rate) is neither averaged in as seed noise nor mixed into the verdict's comparisons,
and the plot and the grid-points table name it."""

import pytest

from cpt.report import scaling
from cpt.report.scaling import group, verdict, write_scaling_report


def row(preset, params, rate, flops, loss, seed=0, **grid):
    """A row as cpt.sweep.collect writes it: the run's fields plus one `grid:<dotted key>` per grid key."""
    keys = {"model.preset": preset, "replay.rate": rate, **{k.replace("__", "."): v for k, v in grid.items()}, "seed": seed}
    return {
        "alignment": "none",
        "replay_rate": rate,
        "preset": preset,
        "parameters": params,
        "flops": flops,
        "avg_final_loss": loss,
        "forgetting_score": 0.1,
        "seed": seed,
        **{f"grid:{k}": v for k, v in keys.items()},
    }


def two_lrs() -> list[dict]:
    """Model s/m × replay 0/0.25 × lr 1e-3/3e-3 × seeds 0/1 (±0.01 apart).

    lr 1e-3: from (s, 0) replay doubles compute for −1.0 loss, the bigger model quadruples it for −0.2 → replay.
    lr 3e-3: replay doubles compute for −0.1, the bigger model quadruples it for −1.0 → model size.
    Averaged over both learning rates the two gains (0.55, 0.3) differ by less than the sd of the mixed
    losses (~1.15): a single tie, which is what the report said when it grouped by rate and model only.
    """
    losses = {
        1e-3: {("s", 0.0): 5.0, ("s", 0.25): 4.0, ("m", 0.0): 4.8, ("m", 0.25): 3.9},
        3e-3: {("s", 0.0): 3.0, ("s", 0.25): 2.9, ("m", 0.0): 2.0, ("m", 0.25): 1.9},
    }
    flops = {("s", 0.0): 1e12, ("s", 0.25): 2e12, ("m", 0.0): 4e12, ("m", 0.25): 8e12}
    params = {"s": 1, "m": 4}
    return [
        row(preset, params[preset], rate, flops[preset, rate], loss + (0.01 if seed else -0.01), seed, training__lr=lr)
        for lr, by in losses.items()
        for (preset, rate), loss in by.items()
        for seed in (0, 1)
    ]


def test_two_learning_rates_times_two_seeds_are_two_points_of_two_seeds():
    rows = [row("s", 1, 0.0, 1e12, loss, seed, training__lr=lr) for lr, loss in ((1e-3, 5.0), (3e-3, 3.0)) for seed in (0, 1)]
    points = group(rows)
    assert [p["seeds"] for p in points] == [2, 2]
    assert [(p["grid"], p["seeds"]) for p in points] == [({"training.lr": 1e-3}, 2), ({"training.lr": 3e-3}, 2)]
    assert [p["avg_final_loss"] for p in points] == [5.0, 3.0]
    assert all(p["avg_final_loss_sd"] == 0 for p in points)  # the seeds agree; the lr difference is no noise


def test_the_verdict_compares_only_points_of_the_same_learning_rate():
    comparisons, lines = verdict(group(two_lrs()))
    assert len(comparisons) == 2  # one from (s, 0) per learning rate
    by_lr = {c["grid"]: c for c in comparisons}
    assert set(by_lr) == {"training.lr 0.001", "training.lr 0.003"}
    assert by_lr["training.lr 0.001"]["winner"] == "replay"
    assert by_lr["training.lr 0.001"]["gain_replay"] == pytest.approx(1.0) and by_lr["training.lr 0.001"]["gain_size"] == pytest.approx(0.1)
    assert by_lr["training.lr 0.003"]["winner"] == "model size"
    assert by_lr["training.lr 0.003"]["gain_replay"] == pytest.approx(0.1) and by_lr["training.lr 0.003"]["gain_size"] == pytest.approx(0.5)
    assert by_lr["training.lr 0.001"]["from"] == "s, replay 0, training.lr 0.001"
    assert lines == [
        "From no replay, replay bought more loss reduction per doubling of compute in 1 of 2 comparison(s) (0 within seed noise); "
        "the paper predicts replay: agrees in part."
    ]


def test_plot_lines_and_table_name_the_other_grid_keys(tmp_path):
    points = group(two_lrs())
    assert [(label, [p["preset"] for p in ps]) for label, _, ps in scaling.series(points)] == [
        ("replay 0, training.lr 0.001", ["s", "m"]),
        ("replay 0.25, training.lr 0.001", ["s", "m"]),
        ("replay 0, training.lr 0.003", ["s", "m"]),
        ("replay 0.25, training.lr 0.003", ["s", "m"]),
    ]
    files = write_scaling_report(two_lrs(), tmp_path)
    report = files["report.md"].read_text()
    assert "16 run(s), 8 grid point(s)" in report
    assert "| model | parameters | replay rate | alignment | training.lr | seeds |" in report
    assert report.count("| 0.001 |") == 4 and report.count("| 0.003 |") == 4
    assert files["scaling.png"].stat().st_size > 10_000


def test_rows_without_grid_keys_and_unhashable_grid_values_still_group():
    plain = [{k: v for k, v in r.items() if not k.startswith("grid:")} for r in two_lrs()]
    points = group(plain)  # hand-made rows: nothing tells the learning rates apart, so they are one point per cell
    assert len(points) == 4 and all(p["seeds"] == 4 and p["grid"] == {} for p in points)
    assert [label for label, _, _ in scaling.series(points)] == ["replay 0", "replay 0.25"]

    weights = [row("s", 1, 0.0, 1e12, 5.0, seed, replay__task_weights=w) for w in ({"en": 1}, {"en": 2}) for seed in (0, 1)]
    assert [p["seeds"] for p in group(weights)] == [2, 2]
