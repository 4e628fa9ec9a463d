"""The scaling report of a sweep: replay rate against model size at equal compute.

The paper's practical conclusion (Abbes et al. 2025, scaling analysis) is about where to spend
compute: going from no replay to a small replay rate is worth more than a larger model, but
beyond small rates a larger model is worth more than more replay. This module checks that claim
on a sweep's own runs.

Runs are grouped by (alignment, replay rate, model) and by every other grid key of the sweep but the
seed (the `grid:<dotted key>` entries of cpt.sweep.collect's rows: a learning rate, schedule, policy
…), and averaged over seeds only (mean ± standard deviation, the error bars). Runs that differ in
another grid key are different experiments, not seed noise. Rows without grid keys (made by hand)
group by the first three alone. The figure plots average final loss and forgetting against training
FLOPs (`summary.json` → flops.training, see cpt.flops), one line per replay rate and value of the
other grid keys (labelled, e.g. "replay 0.25, training.lr 0.001") with one point per model size,
the shape of the paper's scaling figure; the grid-points table has a column per other grid key.

The verdict compares, from every grid point (model m, rate r), the two ways to spend more compute:
the next replay rate (m, r⁺) and the next model size (m⁺, r), both among the points of the same
alignment and the same values of every other grid key. Each buys a change in average final
loss for a change in compute; the one with the larger loss reduction per doubling of compute
    gain = (L(from) − L(to)) / log2(C(to) / C(from))
"buys more" at that compute level. The paper predicts replay from r = 0 and model size from r > 0.
A comparison whose two gains differ by less than the seeds' standard deviation is marked a tie.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from cpt import atomic
from cpt.report import plots
from cpt.report.render import Bullets, Heading, Image, Para, Table, to_html, to_markdown


def _stats(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# Grid keys the report already has as its own fields: the seed is averaged over, and the replay rate,
# the model and the alignment method are `replay_rate`, `preset` (model.init's name when set) and
# `alignment`. Every other grid key tells grid points apart. alignment.k and .beta stay: the alignment
# label names them only for reptile.
OWN_KEYS = frozenset({"seed", "replay.rate", "model.preset", "model.init", "alignment.method"})


def other_keys(rows: list[dict]) -> list[str]:
    """The dotted grid keys beyond OWN_KEYS in the rows, in grid order."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update((k[5:], None) for k in row if k.startswith("grid:") and k[5:] not in OWN_KEYS)
    return list(keys)


def _same(value) -> str:
    """A hashable, canonical form of a grid value (values may be lists or mappings, e.g. replay.task_weights)."""
    return json.dumps(value, sort_keys=True, default=str)


def _order(value) -> tuple:
    # numbers by size (as text, 1e-05 would sort after 0.001), anything else by its canonical text
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return (0, value, "") if number else (1, 0, _same(value))


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def context_label(point: dict) -> str:
    """The point's other grid keys as text, "training.lr 0.001, schedule.name wsd"; "" without any."""
    shown = point["grid"].items()
    if point["alignment"] != "none":  # the alignment label already says "reptile k… β…"
        shown = [(k, v) for k, v in shown if k not in ("alignment.k", "alignment.beta")]
    return ", ".join(f"{k} {_show(v)}" for k, v in shown)


def _context(point: dict) -> tuple:
    """What must be equal for two points to be compared: alignment and every other grid key."""
    return (point["alignment"], tuple((k, _same(v)) for k, v in point["grid"].items()))


def group(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (alignment, replay rate, model, other grid keys); sorted by alignment,
    the other keys' values, replay rate and size. Each point's `grid` maps the other keys to its values."""
    keys = other_keys(rows)
    buckets: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        extra = tuple(_same(row.get(f"grid:{k}")) for k in keys)
        buckets[(row["alignment"], row["replay_rate"], row["preset"], extra)].append(row)
    points = []
    for (alignment, rate, preset, _), rs in buckets.items():
        loss, loss_sd = _stats([r["avg_final_loss"] for r in rs])
        forg, forg_sd = _stats([r["forgetting_score"] for r in rs])
        flops, _ = _stats([r["flops"] for r in rs])
        points.append(
            {
                "alignment": alignment,
                "replay_rate": rate,
                "preset": preset,
                "grid": {k: rs[0].get(f"grid:{k}") for k in keys},
                "parameters": rs[0]["parameters"],
                "seeds": len(rs),
                "flops": flops,
                "avg_final_loss": loss,
                "avg_final_loss_sd": loss_sd,
                "forgetting_score": forg,
                "forgetting_score_sd": forg_sd,
            }
        )
    points.sort(key=lambda p: (p["alignment"], [_order(v) for v in p["grid"].values()], p["replay_rate"], p["parameters"] or 0))
    return points


def _gain(here: dict, to: dict) -> float | None:
    """Reduction of average final loss per doubling of training FLOPs from `here` to `to`."""
    ratio = to["flops"] / here["flops"]
    if not ratio > 1:
        return None
    return (here["avg_final_loss"] - to["avg_final_loss"]) / math.log2(ratio)


def verdict(points: list[dict]) -> tuple[list[dict], list[str]]:
    """Comparisons from every point that has both a next replay rate and a next model size among the points of its
    alignment and other grid keys (`grid` names those keys' values); and the verdict lines over all of them."""
    comparisons = []
    contexts = list(dict.fromkeys(_context(p) for p in points))  # in the points' order
    for context in contexts:
        # only points that agree on alignment and every other grid key: the step to the next replay rate or
        # model size must change that axis alone
        mine = [p for p in points if _context(p) == context]
        alignment, where = mine[0]["alignment"], context_label(mine[0])
        rates = sorted({p["replay_rate"] for p in mine})
        sizes = sorted({(p["parameters"], p["preset"]) for p in mine}, key=lambda s: (s[0] or 0, s[1]))
        at = {(p["replay_rate"], p["preset"]): p for p in mine}
        for ri, rate in enumerate(rates[:-1]):
            for si, (_, preset) in enumerate(sizes[:-1]):
                here = at.get((rate, preset))
                more_replay = at.get((rates[ri + 1], preset))
                bigger = at.get((rate, sizes[si + 1][1]))
                if not (here and more_replay and bigger):
                    continue

                g_replay, g_size = _gain(here, more_replay), _gain(here, bigger)
                if g_replay is None or g_size is None:
                    continue
                noise = max(here["avg_final_loss_sd"], more_replay["avg_final_loss_sd"], bigger["avg_final_loss_sd"])
                winner = "tie" if abs(g_replay - g_size) <= noise else ("replay" if g_replay > g_size else "model size")
                expected = "replay" if rate == 0 else "model size"
                comparisons.append(
                    {
                        "alignment": alignment,
                        "grid": where,
                        "rate": rate,
                        "from": f"{preset}, replay {rate:g}" + (f", {where}" if where else ""),
                        "flops": here["flops"],
                        "replay_to": rates[ri + 1],
                        "size_to": sizes[si + 1][1],
                        "gain_replay": g_replay,
                        "gain_size": g_size,
                        "winner": winner,
                        "paper": expected,
                    }
                )
    lines = []
    for label, zero in (("from no replay", True), ("from a replay rate above 0", False)):
        cs = [c for c in comparisons if (c["rate"] == 0) == zero]
        if not cs:
            continue
        expected = cs[0]["paper"]
        agree = sum(c["winner"] == expected for c in cs)
        ties = sum(c["winner"] == "tie" for c in cs)
        lines.append(
            f"{label.capitalize()}, {expected} bought more loss reduction per doubling of compute in {agree} of {len(cs)} "
            f"comparison(s) ({ties} within seed noise); the paper predicts {expected}: "
            + ("agrees." if agree == len(cs) else "agrees in part." if agree else "disagrees.")
        )
    if not lines:
        lines.append("No verdict: it needs at least two replay rates and two model sizes with results.")
    return comparisons, lines


def series(points: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """The figure's lines: (label, alignment, points by size), one per alignment, other grid keys and replay rate."""
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:  # group() sorted them by alignment, other keys, rate and size
        lines[(_context(p), p["replay_rate"])].append(p)
    out = []
    for ps in lines.values():
        p = ps[0]
        label = f"replay {p['replay_rate']:g}" + ("" if p["alignment"] == "none" else f" + {p['alignment']}")
        where = context_label(p)
        out.append((label + (f", {where}" if where else ""), p["alignment"], ps))
    return out


def scaling_plot(path: Path, points: list[dict]) -> Path:
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    lines = series(points)
    for ax, key, label in ((axes[0], "avg_final_loss", "average final loss"), (axes[1], "forgetting_score", "forgetting")):
        for i, (name, alignment, ps) in enumerate(lines):
            ax.errorbar(
                [p["flops"] for p in ps],
                [p[key] for p in ps],
                yerr=[p[f"{key}_sd"] for p in ps],
                marker="o",
                capsize=3,
                color=plots.color(i),
                linestyle="-" if alignment == "none" else "--",
                label=name,
            )
            if ax is axes[0]:
                for p in ps:
                    ax.annotate(p["preset"], (p["flops"], p[key]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs compute")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=plots.DPI)
    return path


def write_scaling_report(rows: list[dict], out: Path, title: str = "cpt sweep") -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = group(rows)
    comparisons, lines = verdict(points)
    written: dict[str, Path] = {}
    blocks = [
        Para(f"{len(rows)} run(s), {len(points)} grid point(s) after averaging over seeds."),
        Heading("Verdict"),
        Bullets(lines),
        Para(
            "From each point (model, replay rate), spending more compute on the next replay rate or on the next model size "
            "(at the same alignment and values of the other grid keys): "
            "`gain = (L_from − L_to) / log2(C_to / C_from)`, the reduction of average final loss per doubling of training "
            "FLOPs. The larger gain buys more; a difference below the seeds' standard deviation is a tie."
        ),
    ]
    if points:
        written["scaling.png"] = scaling_plot(out / "scaling.png", points)
        blocks += [
            Heading("Loss and forgetting against compute"),
            Image("scaling.png", "average final loss and forgetting against training FLOPs"),
        ]
        keys = list(points[0]["grid"])  # the other grid keys, one column each
        blocks += [
            Heading("Grid points (mean ± sd over seeds)"),
            Table(
                [
                    "model",
                    "parameters",
                    "replay rate",
                    "alignment",
                    *keys,
                    "seeds",
                    "training FLOPs",
                    "avg final loss",
                    "± sd",
                    "forgetting",
                    "± sd",
                ],
                [
                    [
                        p["preset"],
                        f"{p['parameters']:,}" if p["parameters"] else None,
                        f"{p['replay_rate']:g}",
                        p["alignment"],
                        *(None if p["grid"][k] is None else _show(p["grid"][k]) for k in keys),
                        str(p["seeds"]),
                        f"{p['flops']:.3g}",
                        p["avg_final_loss"],
                        p["avg_final_loss_sd"],
                        p["forgetting_score"],
                        p["forgetting_score_sd"],
                    ]
                    for p in points
                ],
                lower_is_better=frozenset({6 + len(keys), 8 + len(keys)}),
            ),
        ]
    if comparisons:
        blocks += [
            Heading("Replay rate or model size, from each point"),
            Table(
                ["from", "alignment", "FLOPs", "→ replay", "gain", "→ model", "gain", "buys more", "paper"],
                [
                    [
                        c["from"],
                        c["alignment"],
                        f"{c['flops']:.3g}",
                        f"{c['replay_to']:g}",
                        c["gain_replay"],
                        c["size_to"],
                        c["gain_size"],
                        c["winner"],
                        c["paper"],
                    ]
                    for c in comparisons
                ],
            ),
        ]
    atomic.write_text(out / "report.md", to_markdown(title, blocks))
    atomic.write_text(out / "report.html", to_html(title, blocks, out))
    written["report.md"] = out / "report.md"
    written["report.html"] = out / "report.html"
    return written
