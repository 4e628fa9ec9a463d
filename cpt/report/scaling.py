"""The scaling report of a sweep: replay rate against model size at equal compute.

The paper's practical conclusion (Abbes et al. 2025, scaling analysis) is about where to spend
compute: going from no replay to a small replay rate is worth more than a larger model, but
beyond small rates a larger model is worth more than more replay. This module checks that claim
on a sweep's own runs.

Runs are grouped by (alignment, replay rate, model) and averaged over seeds (mean ± standard
deviation, the error bars). The figure plots average final loss and forgetting against training
FLOPs (`summary.json` → flops.training, see cpt.flops), one line per replay rate with one point per
model size, the shape of the paper's scaling figure.

The verdict compares, from every grid point (model m, rate r), the two ways to spend more compute:
the next replay rate (m, r⁺) and the next model size (m⁺, r). Each buys a change in average final
loss for a change in compute; the one with the larger loss reduction per doubling of compute
    gain = (L(from) − L(to)) / log2(C(to) / C(from))
"buys more" at that compute level. The paper predicts replay from r = 0 and model size from r > 0.
A comparison whose two gains differ by less than the seeds' standard deviation is marked a tie.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from cpt.report import plots
from cpt.report.render import Bullets, Heading, Image, Para, Table, to_html, to_markdown


def _stats(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (alignment, replay rate, model); sorted by those and by size."""
    buckets: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        buckets[(row["alignment"], row["replay_rate"], row["preset"])].append(row)
    points = []
    for (alignment, rate, preset), rs in buckets.items():
        loss, loss_sd = _stats([r["avg_final_loss"] for r in rs])
        forg, forg_sd = _stats([r["forgetting_score"] for r in rs])
        flops, _ = _stats([r["flops"] for r in rs])
        points.append(
            {
                "alignment": alignment,
                "replay_rate": rate,
                "preset": preset,
                "parameters": rs[0]["parameters"],
                "seeds": len(rs),
                "flops": flops,
                "avg_final_loss": loss,
                "avg_final_loss_sd": loss_sd,
                "forgetting_score": forg,
                "forgetting_score_sd": forg_sd,
            }
        )
    points.sort(key=lambda p: (p["alignment"], p["replay_rate"], p["parameters"] or 0))
    return points


def _gain(here: dict, to: dict) -> float | None:
    """Reduction of average final loss per doubling of training FLOPs from `here` to `to`."""
    ratio = to["flops"] / here["flops"]
    if not ratio > 1:
        return None
    return (here["avg_final_loss"] - to["avg_final_loss"]) / math.log2(ratio)


def verdict(points: list[dict]) -> tuple[list[dict], list[str]]:
    """Comparisons from every point that has both a next replay rate and a next model size; and the verdict lines."""
    comparisons = []
    for alignment in sorted({p["alignment"] for p in points}):
        mine = [p for p in points if p["alignment"] == alignment]
        rates = sorted({p["replay_rate"] for p in mine})
        sizes = sorted({(p["parameters"], p["preset"]) for p in mine})
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
                        "rate": rate,
                        "from": f"{preset}, replay {rate:g}",
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


def scaling_plot(path: Path, points: list[dict]) -> Path:
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    lines = sorted({(p["alignment"], p["replay_rate"]) for p in points})
    for ax, key, label in ((axes[0], "avg_final_loss", "average final loss"), (axes[1], "forgetting_score", "forgetting")):
        for i, (alignment, rate) in enumerate(lines):
            ps = [p for p in points if (p["alignment"], p["replay_rate"]) == (alignment, rate)]
            name = f"replay {rate:g}" + ("" if alignment == "none" else f" + {alignment}")
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
            "From each point (model, replay rate), spending more compute on the next replay rate or on the next model size: "
            "`gain = (L_from − L_to) / log2(C_to / C_from)`, the reduction of average final loss per doubling of training "
            "FLOPs. The larger gain buys more; a difference below the seeds' standard deviation is a tie."
        ),
    ]
    if points:
        written["scaling.png"] = scaling_plot(out / "scaling.png", points)
        blocks += [Heading("Loss and forgetting against compute"), Image("scaling.png", "average final loss and forgetting against training FLOPs")]
        blocks += [
            Heading("Grid points (mean ± sd over seeds)"),
            Table(
                ["model", "parameters", "replay rate", "alignment", "seeds", "training FLOPs", "avg final loss", "± sd", "forgetting", "± sd"],
                [
                    [
                        p["preset"],
                        f"{p['parameters']:,}" if p["parameters"] else None,
                        f"{p['replay_rate']:g}",
                        p["alignment"],
                        str(p["seeds"]),
                        f"{p['flops']:.3g}",
                        p["avg_final_loss"],
                        p["avg_final_loss_sd"],
                        p["forgetting_score"],
                        p["forgetting_score_sd"],
                    ]
                    for p in points
                ],
                lower_is_better=frozenset({6, 8}),
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
    (out / "report.md").write_text(to_markdown(title, blocks), encoding="utf-8")
    (out / "report.html").write_text(to_html(title, blocks, out), encoding="utf-8")
    written["report.md"] = out / "report.md"
    written["report.html"] = out / "report.html"
    return written
