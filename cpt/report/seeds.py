"""Claims judged across seeds: which differences between strategies are larger than seed noise.

One run is one seed, and a gap between two single runs may be noise. Given the summaries of runs
of several strategies with several seeds each, this module

- groups them by strategy (`strategy_label`: the method and its settings, e.g. "replay α=0.25",
  "MER (replay α=0.25 + Reptile k=5 β=0.7)"), one run per seed;
- gives every metric of `cpt.runs.METRICS` as mean ± the half-width of its 95% confidence interval
  (Student t with n − 1 degrees of freedom);
- for each pair the paper compares (replay vs sequential, MER vs replay, joint vs replay, Reptile vs
  sequential) takes the per-seed difference A − B over the seeds both have (a seed only one side has
  is left out, and said so) and judges the claim "A forgets less than B" (forgetting score) and "A
  ends lower than B" (avg final loss): *holds* when the difference's CI lies entirely below 0,
  *refuted* when entirely above, otherwise *not separable from noise at N seeds* (also for N < 2).
  Joint has no forgetting (one row), so joint vs replay is judged on the avg final loss only.

Everything here is a pure function of summary dicts (summary.json; the run's saved config may be
given under the key "config", for the seed and the Reptile and merge settings the summary lacks),
so it is tested on hand-made numbers; `report_blocks` turns the result into the report's section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cpt.report.render import Block, Heading, Para, Table
from cpt.runs import METRICS

__all__ = [
    "Comparison",
    "Group",
    "Interval",
    "compare",
    "comparisons",
    "group_runs",
    "interval",
    "report_blocks",
    "seed_of",
    "strategy_label",
    "t_quantile",
    "verdict",
]

# two-sided 95%: the 0.975 quantile of Student t for 1..30 degrees of freedom (used without scipy)
T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)  # fmt: skip
Z975 = 1.959964  # the normal's 0.975 quantile: beyond 30 degrees of freedom, t is this plus a 1/dof expansion

HOLDS, REFUTED = "holds", "refuted"

#: (kind A, kind B, claim metrics): the paper's comparisons, each claim "A is lower than B"
PAIRS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("replay", "sequential", ("forgetting_score", "avg_final_loss")),
    ("mer", "replay", ("forgetting_score", "avg_final_loss")),
    ("joint", "replay", ("avg_final_loss",)),  # joint trains all tasks at once: no forgetting to compare
    ("reptile", "sequential", ("forgetting_score", "avg_final_loss")),
)
CLAIMS = {"forgetting_score": "forgets less than", "avg_final_loss": "ends with a lower avg final loss than"}


def t_quantile(dof: int) -> float:
    """The 0.975 quantile of Student t with `dof` degrees of freedom: scipy's if installed, else the table (an expansion around the
    normal beyond 30)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {dof}")
    try:
        from scipy.stats import t
    except ImportError:
        if dof <= len(T975):
            return T975[dof - 1]
        z = Z975  # Cornish-Fisher: the normal alone would be 4% narrow at 31 dof; this is within 1e-4
        return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
    return float(t.ppf(0.975, dof))


@dataclass(frozen=True)
class Interval:
    """Mean of n values and the half-width of its 95% CI (NaN for one value: no spread to measure)."""

    mean: float
    half: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def show(self) -> str:
        return f"{self.mean:.3f} ± {self.half:.3f}" if self.n >= 2 else f"{self.mean:.3f} (1 seed)"


def interval(values: list[float]) -> Interval | None:
    """Mean ± t(0.975, n−1)·s/√n of `values` (s the sample standard deviation); None for no values."""
    n = len(values)
    if n == 0:
        return None
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, math.nan, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, t_quantile(n - 1) * sd / math.sqrt(n), n)


def verdict(iv: Interval | None) -> str:
    """The claim "A − B < 0": holds when the CI is entirely below 0, refuted when entirely above, else not separable."""
    if iv is None or iv.n < 2 or not iv.high < 0 and not iv.low > 0:
        return f"not separable from noise at {iv.n if iv else 0} seed{'' if iv and iv.n == 1 else 's'}"
    return HOLDS if iv.high < 0 else REFUTED


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _section(summary: dict, name: str) -> dict:
    cfg = summary.get("config")
    value = cfg.get(name) if isinstance(cfg, dict) else None
    return value if isinstance(value, dict) else {}


def seed_of(summary: dict) -> int | None:
    """The run's seed: the summary's `seed`, else its config's; None when neither says."""
    for s in (summary.get("seed"), (summary.get("config") or {}).get("seed") if isinstance(summary.get("config"), dict) else None):
        if isinstance(s, int) and not isinstance(s, bool):
            return s
    return None


def _kind(summary: dict) -> str:
    replay = (_number(summary.get("replay_rate")) or 0) > 0
    reptile = summary.get("alignment") == "reptile"
    merge = isinstance(summary.get("merge"), dict) or _section(summary, "merge").get("enabled") is True
    if summary.get("strategy") == "joint":
        return "joint"
    if replay and reptile:
        return "mer"
    if replay:
        return "replay+merge" if merge else "replay"
    return "reptile" if reptile else "merge" if merge else "sequential"


def strategy_label(summary: dict) -> str:
    """The strategy and its settings, e.g. "replay α=0.25", "MER (replay α=0.25 + Reptile k=5 β=0.7)", "merge λ=0.5"."""
    kind = _kind(summary)
    if kind == "joint":
        return "joint"
    align = _section(summary, "alignment")
    reptile = "Reptile" + "".join(f" {n}={align[key]:g}" for key, n in (("k", "k"), ("beta", "β")) if _number(align.get(key)) is not None)
    replay = f"replay α={_number(summary.get('replay_rate')) or 0:g}"
    m = summary.get("merge") if isinstance(summary.get("merge"), dict) else _section(summary, "merge")
    merge = "merge" + (f" λ={m['lam']:g}" if _number(m.get("lam")) is not None else "")
    merge += f" toward {m['toward']}" if m.get("toward") not in (None, "previous") else ""
    return {
        "mer": f"MER ({replay} + {reptile})",
        "replay": replay,
        "replay+merge": f"{replay} + {merge}",
        "reptile": reptile,
        "merge": merge,
    }.get(kind, "sequential")


@dataclass
class Group:
    """The runs of one strategy in one setting (`setting`: the tasks and the model size), by seed."""

    label: str
    kind: str
    replay_rate: float
    setting: tuple = ()
    runs: dict[int, dict] = field(default_factory=dict)

    def values(self, metric: str) -> dict[int, float]:
        return {s: v for s, r in self.runs.items() if (v := _number(r.get(metric))) is not None}

    def interval(self, metric: str) -> Interval | None:
        return interval(list(self.values(metric).values()))


def _setting(summary: dict) -> tuple:
    """What must be the same for two runs to be seeds of one experiment: the task sequence and the model's size."""
    tasks = summary.get("tasks")
    return (tuple(tasks) if isinstance(tasks, list) else None, _number(summary.get("parameters")))


def group_runs(summaries: list[dict]) -> tuple[list[Group], list[str]]:
    """The summaries grouped by `strategy_label` and setting (tasks, model size), in `KIND_ORDER` (first-seen order
    within a kind), with one run per
    seed; and notes on the runs left out (no seed known; a seed already taken in its group, where the first is kept).
    The same strategy in another setting is another group, its label marked with its tasks or size, never pooled:
    a difference between model sizes is not seed noise."""
    keyed: dict[tuple, list[dict]] = {}
    for s in summaries:
        keyed.setdefault((strategy_label(s), _setting(s)), []).append(s)
    shared = {label for label, _ in keyed if sum(k[0] == label for k in keyed) > 1}
    groups: list[Group] = []
    notes: list[str] = []
    for (label, setting), runs in keyed.items():
        if label in shared:  # the same strategy in several settings: say which one each group is, by size where sizes differ
            tasks, params = setting
            by_size = params is not None and len({k[1][1] for k in keyed if k[0] == label}) > 1
            label += f" ({params:,.0f} parameters)" if by_size else f" ({' → '.join(tasks or ['?'])})"
        g = Group(label, _kind(runs[0]), _number(runs[0].get("replay_rate")) or 0.0, setting)
        groups.append(g)
        for s in runs:
            seed, name = seed_of(s), s.get("run", "?")
            if seed is None:
                notes.append(f"`{name}` ({label}): no seed in its summary or config; left out")
            elif seed in g.runs:
                notes.append(f"`{name}` ({label}): seed {seed} already given by `{g.runs[seed].get('run', '?')}`; left out")
            else:
                g.runs[seed] = s
    # the paper's order of strategies (sequential first, joint last), whatever order the runs were given in
    return sorted(groups, key=lambda g: KIND_ORDER.index(g.kind) if g.kind in KIND_ORDER else len(KIND_ORDER)), notes


KIND_ORDER = ("sequential", "replay", "mer", "reptile", "merge", "replay+merge", "joint")


@dataclass(frozen=True)
class Comparison:
    """The claim "`a` is lower than `b` in `metric`", judged on the per-seed differences a − b."""

    a: str
    b: str
    metric: str
    diffs: dict[int, float]
    unpaired: dict[str, list[int]]  # label -> its seeds the other side lacks (left out)
    interval: Interval | None
    verdict: str

    @property
    def claim(self) -> str:
        return f"{self.a} {CLAIMS.get(self.metric, 'is lower in ' + self.metric + ' than')} {self.b}"


def compare(a: Group, b: Group, metric: str) -> Comparison:
    """Pair `a`'s and `b`'s runs by seed and judge "a is lower than b" in `metric` on the differences."""
    va, vb = a.values(metric), b.values(metric)
    diffs = {s: va[s] - vb[s] for s in sorted(va.keys() & vb.keys())}
    unpaired = {g.label: sorted(set(g.runs) - (a.runs.keys() & b.runs.keys())) for g in (a, b)}
    iv = interval(list(diffs.values()))
    return Comparison(a.label, b.label, metric, diffs, {k: v for k, v in unpaired.items() if v}, iv, verdict(iv))


def comparisons(groups: list[Group]) -> list[Comparison]:
    """Every comparison of `PAIRS` the groups allow: in the same setting, and MER against the replay group of its own α."""
    out = []
    for ka, kb, metrics in PAIRS:
        for a in (g for g in groups if g.kind == ka):
            for b in (g for g in groups if g.kind == kb):
                if a.setting != b.setting or (ka, kb) == ("mer", "replay") and a.replay_rate != b.replay_rate:
                    continue
                out += [compare(a, b, m) for m in metrics]
    return out


HOW_TO_READ = (
    "Each strategy's runs differ only in `seed`. A metric is shown as mean ± the half-width of its 95% confidence interval "
    "(Student t, n − 1 degrees of freedom). Each claim is judged on the differences A − B between runs of the same seed: "
    "*holds* when the difference's 95% CI lies entirely below 0, *refuted* when entirely above 0, and *not separable from "
    "noise* when it contains 0 or fewer than 2 seeds are paired (more seeds may still separate them)."
)


def report_blocks(summaries: list[dict]) -> list[Block]:
    """The report's "Across seeds" section: nothing unless some strategy has at least 2 runs with different seeds."""
    groups, notes = group_runs(summaries)
    if not any(len(g.runs) >= 2 for g in groups):
        return []
    means = Table(
        ["strategy", "seeds", *(c.long for c in METRICS)],
        [
            [g.label, ", ".join(map(str, sorted(g.runs))), *(iv.show() if (iv := g.interval(c.key)) else None for c in METRICS)]
            for g in groups
        ],
    )
    blocks: list[Block] = [Heading("Across seeds"), Para(HOW_TO_READ), means]
    cs = comparisons(groups)
    if cs:

        def ci(c: Comparison) -> str | None:
            iv = c.interval
            return None if iv is None or iv.n < 2 else f"[{iv.low:+.3f}, {iv.high:+.3f}]"

        blocks.append(
            Table(
                ["claim", "verdict", "paired seeds", "mean A − B", "95% CI of A − B"],
                [[c.claim, c.verdict, str(len(c.diffs)), f"{c.interval.mean:+.3f}" if c.interval else None, ci(c)] for c in cs],
            )
        )
        for c in cs:
            notes += [  # one note per pair, not per metric: dict.fromkeys below drops the repeats
                f"{c.a} vs {c.b}: seed(s) {', '.join(map(str, seeds))} of {label} have no run of the other side"
                for label, seeds in c.unpaired.items()
            ]
    else:
        blocks.append(Para("No pair of the compared strategies (replay, MER, joint, Reptile, sequential) is among these runs."))
    if notes:
        blocks.append(Para("Left out: " + "; ".join(dict.fromkeys(notes)) + "."))
    return blocks
