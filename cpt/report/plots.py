"""Figures for `cpt report`: loss-matrix heatmaps, curves across training, strategy bars.

Each function draws one PNG from plain numbers (lists and dicts, no run objects), so the
figures can be tested and reused on their own. They use matplotlib's object-oriented `Figure`
API, which renders with Agg without pyplot: no global backend is selected and nothing in other
modules that import matplotlib is affected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.transforms import blended_transform_factory

#: label -> (steps, values); one line of a curve figure.
Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]

DPI = 110


def color(i: int) -> tuple[float, float, float, float]:
    """The i-th colour of a qualitative palette, so a task or run keeps its colour across figures."""
    return colormaps["tab10"](i % 10)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def loss_heatmap(
    path: Path,
    matrix: Sequence[Sequence[float]],
    tasks: Sequence[str],
    row_labels: Sequence[str],
    title: str,
    vrange: tuple[float, float] | None = None,
    replay_sources: Mapping[str, Sequence[float | None]] | None = None,
) -> Path:
    """Heatmap of L[i][j] (rows: after training task i, columns: loss on task j), annotated.

    `vrange` lets the caller share one colour scale across runs so colours compare between them.
    `replay_sources` ({name: loss after each task}) adds one column per replay source after the tasks',
    labelled "(replay source)" and set apart by a line: not part of the matrix its metrics are computed on.
    """
    m = np.asarray(matrix, dtype=float)
    n_tasks = len(tasks)
    if replay_sources:
        cols = [[np.nan if v is None else float(v) for v in list(vals)[: m.shape[0]]] for vals in replay_sources.values()]
        extra = np.array([c + [np.nan] * (m.shape[0] - len(c)) for c in cols], dtype=float).T
        m = np.hstack([m, extra])
        tasks = [*tasks, *(f"{n}\n(replay source)" for n in replay_sources)]
    fig = Figure(
        figsize=(1.0 * len(tasks) + 2.6, 0.6 * len(row_labels) + 1.9),
        layout="constrained",
    )
    ax = fig.add_subplot()
    cmap = colormaps["RdYlGn_r"]  # green = low loss = good
    vmin, vmax = vrange or (np.nanmin(m), np.nanmax(m))
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("loss on task")
    ax.set_ylabel("after training task")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    norm = im.norm
    for (i, j), v in np.ndenumerate(m):
        if math.isnan(v):
            ax.text(j, i, "—", ha="center", va="center")
            continue
        r, g, b, _ = cmap(norm(v))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # luminance: keep the number readable
        ax.text(
            j,
            i,
            f"{v:.2f}",
            ha="center",
            va="center",
            color="white" if dark else "black",
        )
    if replay_sources:
        ax.axvline(n_tasks - 0.5, color="white", lw=4)
    if m.shape[0] == n_tasks > 1:
        # Outline the diagonal: the loss on each task right after learning it.
        for i in range(m.shape[0]):
            ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, ec="black", lw=1.5))
    fig.colorbar(im, ax=ax, label="held-out loss", shrink=0.9)
    ax.set_title(title, fontsize=11)
    return _save(fig, path)


def _mark_segments(ax: Axes, boundaries: Sequence[float], labels: Sequence[str]) -> None:
    """Dashed lines at task boundaries, alternate shading, and the trained task over each segment."""
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    start = 0.0
    for i, (end, label) in enumerate(zip(boundaries, labels, strict=False)):
        if i % 2:
            ax.axvspan(start, end, color="0.5", alpha=0.08, lw=0)
        if i < len(boundaries) - 1:
            ax.axvline(end, color="0.35", ls="--", lw=1)
        ax.text(
            (start + end) / 2,
            1.01,
            label,
            transform=trans,
            ha="center",
            va="bottom",
            fontsize=9,
        )
        start = end


def line_plot(
    path: Path,
    series: Series,
    title: str,
    ylabel: str,
    boundaries: Sequence[float] | None = None,
    segment_labels: Sequence[str] | None = None,
    colors: Mapping[str, object] | None = None,
    zero_line: bool = False,
) -> Path:
    """Values across training steps, one line per series, with task segments marked on top.

    Used for per-task validation loss, the first task's loss across runs, and probe cosines.
    """
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for k, (label, (steps, values)) in enumerate(series.items()):
        c = (colors or {}).get(label, color(k))
        dots = "o" if len(steps) <= 60 else None  # markers only while points are sparse
        ax.plot(steps, values, marker=dots, ms=3, lw=1.6, label=label, color=c)
    if zero_line:
        ax.axhline(0, color="0.2", lw=0.8)
    if boundaries:
        _mark_segments(ax, boundaries, segment_labels or [""] * len(boundaries))
        ax.set_xlim(0, boundaries[-1])
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11, pad=18 if boundaries else 6)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def compare_bars(path: Path, runs: Sequence[str], metrics: Mapping[str, Sequence[float | None]]) -> Path:
    """One panel per metric, one bar per run (missing values shown as "n/a"); lower is better.

    Panels rather than one shared axis because forgetting (~0.1-1) and losses (~3-5) differ in
    scale, and a shared axis would flatten the forgetting bars.
    """
    fig = Figure(figsize=(3.2 * len(metrics) + 0.6, 3.8), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    x = np.arange(len(runs))
    for ax, (name, values) in zip(axes, metrics.items(), strict=True):
        heights = [np.nan if v is None else v for v in values]
        bars = ax.bar(x, np.nan_to_num(heights), color=[color(i) for i in range(len(runs))])
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(
                "n/a" if v is None else f"{v:.3f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        tilt = max(map(len, runs)) > 8  # long run names overlap when horizontal
        ax.set_xticks(x, runs, rotation=30 if tilt else 0, ha="right" if tilt else "center")
        ax.set_title(f"{name} (lower is better)", fontsize=10)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("value")
    fig.suptitle("Strategy comparison", fontsize=11)
    return _save(fig, path)
