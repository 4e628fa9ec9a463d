"""`cpt report`: compare finished runs in one markdown + self-contained HTML report with figures.

This module reads run directories written by `cpt train` (`summary.json` for the metrics and
loss matrix, `metrics.jsonl` for evaluations and gradient-alignment probes across steps),
draws the figures with `plots`, assembles the document once as neutral blocks and renders it
with `render` to `report.md` (PNG files linked by relative name) and `report.html` (PNGs
embedded). A run the user points at that lacks or garbles `summary.json` is a `CptError`;
`metrics.jsonl` is optional and may end in a line cut off by a killed run. The metric columns
(which, in which order, under which names) are `cpt.runs.METRICS`, shared with the tables of
`cpt demo` and `cpt sweep`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt import atomic
from cpt.errors import CptError
from cpt.report import plots, seeds
from cpt.report.render import (
    Block,
    Bullets,
    Heading,
    Image,
    Para,
    Table,
    to_html,
    to_markdown,
)
from cpt.runs import METRICS, main_metric

__all__ = ["Run", "load_run", "write_report"]

HOW_TO_READ = [
    (
        "With T tasks trained in order and `L[i][j]` the held-out loss on task j after "
        "training task i (0-based; the last row is `L[T-1]`; the heatmaps show L, the "
        "outlined diagonal is each task right after it was learned). Lower is better for "
        "every metric:"
    ),
    Bullets(
        [
            "learned loss `= mean_i L[i][i]`: how well each task was learned when trained.",
            "retained loss `= mean_{j<T-1} L[T-1][j]`: the earlier tasks at the end.",
            (
                "forgetting `= mean_{j<T-1} (L[T-1][j] - min_{j<=i<T-1} L[i][j])`: how "
                "far each earlier task's loss rose above its best; 0 means nothing was "
                "forgotten."
            ),
            (
                "BWT `= mean_{j<T-1} (L[T-1][j] - L[j][j])`: backward transfer in loss, "
                "so positive means forgetting and negative means later tasks helped."
            ),
            (
                "avg final loss `= mean_j L[T-1][j]`: the final model on all tasks, the "
                "number to compare with a joint run. A joint run trains on all tasks at "
                "once: one row, whose mean is also its learned loss, and no forgetting or "
                "BWT."
            ),
        ]
    ),
    (
        "The curves show each task's validation loss across steps; dashed lines are "
        "task boundaries and the name over each segment is the task being trained. A "
        "task's curve climbing after its own segment is forgetting. The probe plots show "
        "the cosine between the current task's gradient and an earlier task's (or the "
        "replay batch's): below 0, a step on the current task raises that task's loss."
    ),
]


@dataclass
class Run:
    """One run directory, validated; metric values missing from the summary are None."""

    name: str
    path: Path
    summary: dict[str, Any]
    tasks: list[str]
    matrix: list[list[float]]
    boundaries: list[float] | None
    evals: list[dict[str, Any]]
    probes: list[dict[str, Any]]
    config: dict[str, Any] | None = None  # its config.yaml (None when missing or unreadable): labels and seeds read it

    @property
    def joint(self) -> bool:
        return self.summary.get("strategy") == "joint" or len(self.matrix) == 1 < len(self.tasks)

    @property
    def row_labels(self) -> list[str]:
        return ["joint (all)"] if self.joint else [f"after {t}" for t in self.tasks[: len(self.matrix)]]

    @property
    def task_colors(self) -> dict[str, Any]:
        """Task -> colour, the same in the curves and the probe plot; replay in black."""
        return {
            **{t: plots.color(i) for i, t in enumerate(self.tasks)},
            "replay": "black",
        }

    @property
    def segment_labels(self) -> list[str]:
        return ["train all tasks (joint)"] if self.joint else [f"train {t}" for t in self.tasks]

    def metric(self, key: str) -> float | None:
        v = self.summary.get(key)
        return float(v) if _is_number(v) else None

    @property
    def replay_sources(self) -> dict[str, dict[str, Any]]:
        """summary.json `replay_sources` (corpora replayed but not trained as tasks), the entries that hold losses."""
        rs = self.summary.get("replay_sources")
        if not isinstance(rs, dict):
            return {}
        return {n: v for n, v in rs.items() if isinstance(v, dict) and isinstance(v.get("after_task"), list)}

    @property
    def source_colors(self) -> dict[str, Any]:
        """Replay source curve label -> colour, after the tasks' colours."""
        return {f"{n} (replay source)": plots.color(len(self.tasks) + i) for i, n in enumerate(self.replay_sources)}

    def source_forgetting(self) -> float | None:
        """Mean over the replay sources of final − initial held-out loss: how much of the original domain was lost."""
        values = [v["forgetting"] for v in self.replay_sources.values() if _is_number(v.get("forgetting"))]
        return sum(values) / len(values) if values else None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)  # JSON true is not 1


def _number(v: Any) -> float:
    """A loss-matrix entry: a number, or null (not evaluated) as NaN."""
    if v is None:
        return math.nan
    if not _is_number(v):
        raise TypeError
    return float(v)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of metrics.jsonl; a bad final line is a write cut short and is skipped."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, s in enumerate(lines) if s.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == last:
                break
            raise CptError(f"{path}:{i + 1}: not valid JSON (only the last line of a killed run may be cut short)") from None
        if isinstance(rec, dict):
            records.append(rec)
    return records


def load_run(path: Path) -> Run:
    """Read and validate one run directory; raises CptError naming the offending file."""
    path = Path(path)
    file = path / "summary.json"
    if not file.is_file():
        raise CptError(f"{file}: not found; pass run directories written by `cpt train`")
    try:
        s = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CptError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(s, dict):
        raise CptError(f"{file}: expected a JSON object")
    tasks = s.get("tasks")
    if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)):
        raise CptError(f"{file}: 'tasks' must be a non-empty list of task names")
    try:
        rows = s["loss_matrix"]
        matrix = [[_number(v) for v in row] for row in rows]
        if not 1 <= len(matrix) <= len(tasks) or any(len(r) != len(tasks) for r in matrix):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise CptError(f"{file}: 'loss_matrix' must be 1 to {len(tasks)} rows of {len(tasks)} numbers (one column per task)") from None
    for key in [
        *(c.key for c in METRICS),
        "wall_seconds",
        "tokens_per_second",
        "replay_rate",
        "meta_updates",
    ]:
        if s.get(key) is not None and not _is_number(s[key]):
            raise CptError(f"{file}: '{key}' must be a number, got {s[key]!r}")
    b = s.get("task_boundaries")
    # Older or odd runs may lack boundaries: their figures then just have no segments.
    ok = isinstance(b, list) and len(b) == len(matrix) and all(map(_is_number, b))
    records = _read_metrics(path / "metrics.jsonl")

    def of_type(kind: str, field: str) -> list[dict[str, Any]]:
        return [r for r in records if r.get("type") == kind and _is_number(r.get("step")) and isinstance(r.get(field), dict)]

    name = s["run"] if isinstance(s.get("run"), str) and s["run"] else path.resolve().name
    return Run(
        name,
        path,
        s,
        tasks,
        matrix,
        [float(x) for x in b] if ok else None,
        of_type("eval", "losses"),
        of_type("probe", "cosine"),
        _read_config(path),
    )


def _series(records: list[dict[str, Any]], field: str, tasks: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """{key: (steps, values)} from each record's `field` dict; tasks first, in task order,
    then other keys such as "replay", so legends read in training order."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for r in sorted(records, key=lambda r: r["step"]):
        for k, v in r[field].items():
            if _is_number(v):
                steps, vals = out.setdefault(k, ([], []))
                steps.append(r["step"])
                vals.append(v)
    rank = {t: i for i, t in enumerate(tasks)}
    return dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _tokens(n: Any) -> str:
    if not isinstance(n, int | float):
        return "—"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def _table(runs: list[Run]) -> Table:
    with_meta = any("meta_updates" in r.summary for r in runs)
    with_sources = any(r.replay_sources for r in runs)
    header = [
        "run",
        "strategy",
        *(c.long for c in METRICS),
        *(["replay-source forgetting"] if with_sources else []),
        "tokens new / replay",
        *(["meta-updates"] if with_meta else []),
        "wall time (s)",
    ]
    rows: list[list[Any]] = []
    for r in runs:
        tok = r.summary.get("tokens") if isinstance(r.summary.get("tokens"), dict) else {}
        meta = r.summary.get("meta_updates")
        wall = r.metric("wall_seconds")
        rows.append(
            [
                r.name,
                _label(r),
                *(r.metric(c.key) for c in METRICS),  # numbers: the renderer bolds the best
                *([r.source_forgetting()] if with_sources else []),
                f"{_tokens(tok.get('new'))} / {_tokens(tok.get('replay', 0))}",
                *([str(meta) if meta is not None else "—"] if with_meta else []),
                "—" if wall is None else f"{wall:.1f}",
            ]
        )
    return Table(header, rows, frozenset(range(2, 2 + len(METRICS) + with_sources)))


def _details(r: Run) -> str:
    s = r.summary
    parts = [
        " → ".join(r.tasks),
        f"{s['steps']} steps" if isinstance(s.get("steps"), int) else None,
        f"replay rate {s['replay_rate']:g}" if r.metric("replay_rate") is not None else None,
        f"alignment: {s['alignment']}" if s.get("alignment") else None,
        f"{s['tokens_per_second']:,.0f} tokens/s" if r.metric("tokens_per_second") is not None else None,
        f"directory `{r.path}`",
    ]
    return " · ".join(p for p in parts if p)


def _downstream_blocks(r: Run) -> list[Block]:
    """The run's lm-eval scores (summary.json `downstream`, written by `cpt eval --lm-eval`) as a
    checkpoint × benchmark table of each benchmark's main metric (± its standard error)."""
    scores = r.summary.get("downstream")
    if not isinstance(scores, dict):
        return []
    rows = {c: {b: m for b, m in v.items() if isinstance(m, dict) and main_metric(m)} for c, v in scores.items() if isinstance(v, dict)}

    def order(name: str) -> tuple[int, int, str]:  # init, the task ends in training order, final, the rest
        m = re.match(r"task-(\d+)-", name)
        if name == "init":
            return (0, 0, "")
        if m:
            return (1, int(m.group(1)), "")
        return (2, 0, "") if name == "final" else (3, 0, name)

    checkpoints = sorted((c for c in rows if rows[c]), key=order)
    benchmarks = list(dict.fromkeys(b for c in checkpoints for b in rows[c]))
    if not benchmarks:
        return []
    label = {f"task-{i}-{t}": f"after {t}" for i, t in enumerate(r.tasks)} | {"init": "init (before training)"}
    metric = {b: next(main_metric(rows[c][b]) for c in checkpoints if b in rows[c]) for b in benchmarks}

    def cell(m: dict | None, key: str) -> str | None:
        if not m or not _is_number(m.get(key)):
            return None
        err = m.get(f"{key}_stderr")
        return f"{m[key]:.3f} ± {err:.3f}" if _is_number(err) else f"{m[key]:.3f}"

    table = Table(
        ["checkpoint", *(f"{b} ({metric[b]})" for b in benchmarks)],
        [[label.get(c, c), *(cell(rows[c].get(b), metric[b]) for b in benchmarks)] for c in checkpoints],
    )
    samples = {rows[c][b].get("samples") for c in checkpoints for b in rows[c]}
    note = f"; {samples.pop()} examples per task" if len(samples) == 1 and _is_number(next(iter(samples))) else ""
    return [
        Para(f"Downstream scores (lm-evaluation-harness, `cpt eval --lm-eval`{note}): each benchmark's main metric ± its standard error."),
        table,
    ]


REPLAY_SOURCES_HOW_TO_READ = (
    "Replay sources (`replay.sources`) are corpora that are replayed but never trained as tasks, e.g. a stand-in for a "
    "pretrained model's own data. Their held-out loss is shown beside the loss matrix in columns marked *replay source*; "
    "the metrics above are computed on the tasks only. Replay-source forgetting `= final − initial` held-out loss (before "
    "any training), averaged over the sources: positive means the original domain got worse."
)


def _replay_source_blocks(r: Run) -> list[Block]:
    """The run's replay sources: held-out loss before training and after each task, and its forgetting (final − initial)."""
    every = r.summary.get("replay_sources") if isinstance(r.summary.get("replay_sources"), dict) else {}
    generated = [
        f"`{n}`: {_tokens(v['generated'].get('tokens'))} tokens sampled from the model before the first task (temperature "
        f"{v['generated'].get('temperature')}, top_p {v['generated'].get('top_p')}, seed {v['generated'].get('seed')})"
        + (f", {v['generated']['tokens_per_second']:,.0f} tokens/s" if _is_number(v["generated"].get("tokens_per_second")) else "")
        for n, v in every.items()
        if isinstance(v, dict) and isinstance(v.get("generated"), dict)
    ]
    blocks: list[Block] = [Para("Generated replay sources (no held-out split): " + "; ".join(generated) + ".")] if generated else []
    rs = r.replay_sources
    if not rs:
        return blocks
    ends = max(len(v["after_task"]) for v in rs.values())
    after = [f"after {t}" for t in r.tasks[:ends]] + [f"after task {i}" for i in range(len(r.tasks), ends)]

    def num(v: Any) -> float | None:
        return float(v) if _is_number(v) else None

    rows = []
    for name, v in rs.items():
        fill = v.get("fill") if isinstance(v.get("fill"), dict) else {}
        cells = [num(x) for x in v["after_task"]] + [None] * (ends - len(v["after_task"]))
        kept = v.get("stored_at_end")
        rows.append(
            [
                f"{name} (replay source)",
                num(v.get("initial")),
                *cells,
                num(v.get("forgetting")),
                f"{_tokens(fill.get('tokens'))} / {kept if _is_number(kept) else '—'}",
            ]
        )
    return blocks + [
        Para(
            "Held-out loss of the replay sources, which are replayed from the first step but never trained as tasks: "
            "before any training, after each task, and their forgetting (final − initial). The last column is the tokens "
            "that filled the buffer before the first task and how many of those sequences it still held at the end."
        ),
        Table(["replay source", "before training", *after, "forgetting (final − initial)", "tokens filled / sequences left"], rows),
    ]


def _read_config(path: Path) -> dict | None:
    """A run's saved config.yaml as a mapping (None when missing or unreadable: the report still works without it)."""
    import yaml

    try:
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def _label(r: Run) -> str:
    """The strategy column: the method and its settings ("replay α=0.25", "MER (replay α=0.25 + Reptile k=5 β=0.7)"),
    the same label the across-seeds tables use, not the summary's training.strategy (sequential for all of those)."""
    return seeds.strategy_label({**r.summary, "config": r.config})


def _seed_summaries(runs: list[Run]) -> list[dict[str, Any]]:
    """Each run's summary for `seeds.report_blocks`, under its report name and with its saved config.yaml (the seed and
    the Reptile and merge settings the summary lacks); a missing or unreadable config.yaml is just left out."""
    return [{**r.summary, "run": r.name, "config": r.config} for r in runs]


def write_report(run_dirs: list[Path], out: Path, title: str = "cpt report") -> dict[str, Path]:
    """Write report.md, report.html and the PNG figures for `run_dirs` into `out`.

    Returns {file name: path} for everything written. All runs are loaded (and validated)
    before anything is written, so a bad run directory leaves `out` untouched.
    """
    if not run_dirs:
        raise CptError("cpt report: give at least one run directory")
    runs = [load_run(Path(d)) for d in run_dirs]
    seen: dict[str, int] = {}
    for r in runs:  # runs are keyed by name in legends and file names: keep names unique
        seen[r.name] = seen.get(r.name, 0) + 1
        r.name += f" ({seen[r.name]})" if seen[r.name] > 1 else ""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def figure(name: str, alt: str, draw: Callable[..., Path], *args: Any, **kw: Any) -> Image:
        written[name] = draw(out / name, *args, **kw)
        return Image(name, alt)

    names = [r.name for r in runs]
    # with several seeds of a strategy, its mean ± CI and the claims' verdicts come first: the first screen then says
    # which strategy forgot least and whether that is more than seed noise; the per-run table follows
    across = seeds.report_blocks(_seed_summaries(runs))  # only with at least 2 seeds of one strategy
    blocks: list[Block] = [
        Para(f"{len(runs)} run(s): " + ", ".join(f"`{n}`" for n in names) + "."),
        *across,
        Heading("Every run" if across else "Summary"),
        _table(runs),
        Heading("How to read this"),
        *(b if isinstance(b, Bullets) else Para(b) for b in HOW_TO_READ),
        *([Para(REPLAY_SOURCES_HOW_TO_READ)] if any(r.replay_sources for r in runs) else []),
        Heading("Strategy comparison"),
        figure(
            "compare.png",
            "forgetting, learned loss and average final loss per run",
            plots.compare_bars,
            names,
            {c.long: [r.metric(c.key) for r in runs] for c in METRICS if c.key in ("forgetting_score", "learned_loss", "avg_final_loss")},
        ),
    ]

    # Forgetting at a glance: every run's loss on the first task, on one axis. Task
    # segments are drawn only when all sequential runs share them.
    first = {r.name: _series(r.evals, "losses", r.tasks).get(r.tasks[0]) for r in runs}
    if first := {k: v for k, v in first.items() if v}:
        seq = [r for r in runs if not r.joint and r.boundaries]
        same = bool(seq) and all((r.boundaries, r.tasks) == (seq[0].boundaries, seq[0].tasks) for r in seq)
        task0 = runs[0].tasks[0]
        blocks += [
            Heading("Loss on the first task across training"),
            figure(
                "first_task.png",
                "loss on the first task across training, one line per run",
                plots.line_plot,
                first,
                f"Loss on the first task ({task0}) across training",
                f"validation loss on {task0}",
                seq[0].boundaries if same else None,
                seq[0].segment_labels if same else None,
                colors={r.name: plots.color(i) for i, r in enumerate(runs)},
            ),
        ]

    # One colour scale for all heatmaps, so the same colour means the same loss in every run.
    losses = [v for r in runs for row in r.matrix for v in row if not math.isnan(v)]
    losses += [float(x) for r in runs for v in r.replay_sources.values() for x in v["after_task"] if _is_number(x)]
    vrange = (min(losses), max(losses)) if losses else None
    blocks.append(Heading("Runs"))
    slugs: set[str] = set()
    for r in runs:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", r.name).strip("-.") or "run"
        while slug in slugs:  # distinct names can still share a slug ("a b", "a-b")
            slug += "_"
        slugs.add(slug)
        blocks += [
            Heading(f"{r.name} ({_label(r)})", 3),
            Para(_details(r)),
            figure(
                f"matrix_{slug}.png",
                f"{r.name} loss matrix",
                plots.loss_heatmap,
                r.matrix,
                r.tasks,
                r.row_labels,
                f"{r.name}: loss matrix",
                vrange,
                replay_sources={n: v["after_task"] for n, v in r.replay_sources.items()} or None,
            ),
        ]
        blocks += _replay_source_blocks(r)
        blocks += _downstream_blocks(r)
        curves = _series(r.evals, "losses", r.tasks)
        with_sources = [e for e in r.evals if isinstance(e.get("replay_sources"), dict)]
        curves |= {f"{k} (replay source)": v for k, v in _series(with_sources, "replay_sources", []).items()}
        if curves:
            blocks.append(
                figure(
                    f"curves_{slug}.png",
                    f"{r.name} validation loss per task across training",
                    plots.line_plot,
                    curves,
                    f"{r.name}: validation loss per task",
                    "validation loss",
                    r.boundaries,
                    r.segment_labels,
                    {**r.task_colors, **r.source_colors},
                )
            )
        else:
            blocks.append(Para("No evaluations in `metrics.jsonl`; no curves."))
        if probe := _series(r.probes, "cosine", r.tasks):
            blocks.append(
                figure(
                    f"probe_{slug}.png",
                    f"{r.name} gradient cosine similarity across training",
                    plots.line_plot,
                    probe,
                    f"{r.name}: gradient alignment with the current task",
                    "cosine similarity",
                    r.boundaries,
                    r.segment_labels,
                    r.task_colors,
                    zero_line=True,
                )
            )

    # whole or not at all: a report open in a browser or being re-generated is never read half-written
    atomic.write_text(out / "report.md", to_markdown(title, blocks))
    atomic.write_text(out / "report.html", to_html(title, blocks, out))
    return {
        "report.md": out / "report.md",
        "report.html": out / "report.html",
        **written,
    }
