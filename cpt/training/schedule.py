"""Learning-rate schedules over a continual sequence of tasks.

`lr_at(step, ...)` is a pure function of the optimizer step (0-based), the total number of steps
and the steps at which tasks end, so a resumed run recomputes the same value.

Contract. Let T = max(total_steps, 1) (steps 0..T-1; a step outside is clamped into that range), lr
the peak and m = min_lr. Every "exactly" below is exact float equality unless marked ≈ (≈: to
rounding, rel 1e-12). Each fraction is turned into a whole number of steps by rounding *up*:

- Warmup: W = max(ceil(warmup·T), 1) steps, capped at T-1 when T ≥ 2 so at least one step follows it.
  Step s < W gives lr·(s+1)/W: step 0 ≈ lr/W (never 0, so step 0 trains), rising linearly, and step
  W-1 is exactly lr, the peak. warmup = 0 gives W = 1: step 0 is the peak (a one-step warmup is no
  warmup). The phases after the warmup start at step W, one step after the peak; each decaying
  phase moves away from its start value at its first step and is exactly on its target at its last.
- cosine: steps W..T-1 (D = T-W steps) follow m + (lr-m)·(1+cos(π·(s-W+1)/D))/2: step W is already
  below lr (the peak is never repeated), the last step T-1 is exactly m, and the values never
  increase after the peak.
- rewarm: the cosine contract applied to every task on its own, with T, W and s replaced by the
  task's length n, W = max(ceil(warmup·n), 1) capped at n-1 (n ≥ 2) and the step within the task.
  A task's first step ≈ lr/W, its step W-1 exactly lr, its last step exactly m. Task i spans steps
  task_ends[i-1]..task_ends[i]-1 (the first starts at 0; steps past the last end, up to T, form one
  more task; ends past T are cut at T).
- wsd: D = ceil(decay·T) decay steps, capped at T-W so the decay never starts before the warmup
  has ended (rounding up both can overlap in short runs; the warmup keeps its steps). Steps
  W..T-D-1 are exactly lr (stable); the decay steps T-D..T-1 are linear,
  lr + (m-lr)·(s-(T-1-D))/D: every decay step drops by the same (lr-m)/D (no jump), the last step
  T-1 is exactly m. decay = 0: no decay, lr to the end. The config requires warmup + decay ≤ 1.
- infinite: with c0 = constant_lr (default lr/2), A = ceil(anneal·T) anneal steps capped at T-W and
  C = ceil(cooldown·T) cooldown steps capped at T-W-A (priority in short runs: warmup, then anneal,
  then cooldown). Cooldown, steps W..W+C-1: cosine c0 + (lr-c0)·(1+cos(π·(s-W+1)/C))/2, its last
  step W+C-1 exactly c0. Constant, steps W+C..T-A-1: exactly c0. Anneal, steps T-A..T-1:
  exponential c0·(max(m,1e-12)/c0)^((s-(T-1-A))/A), its last step T-1 exactly m (also for m = 0).
  cooldown = 0 drops to c0 at step W; anneal = 0 ends on c0. Assumes m ≤ c0 ≤ lr.
- constant: warmup, then exactly lr.

Steps instead of fractions: `warmup_steps` (W = that many steps, per task for rewarm, with the same
caps) and, for infinite, `cooldown_steps` (C) replace ceil(fraction · T). A schedule whose phases are
all given in steps, and that has no phase planned back from the end (cosine's and wsd's decay,
infinite's anneal > 0), gives every step the same LR whatever T is: that is what `--extend` checks.

A release's anneal (`anneal_at` = A, `anneal_steps` = N, set by `cpt release`): steps before A follow the
schedule unchanged; step A + i (i = 0..N-1) is the exponential from the LR of step A-1 to exactly min_lr at
step A + N - 1, and min_lr after.

Short runs: with T = 1 (or a one-step rewarm task) the only step is both the peak and the last
step; the peak wins, so it is lr. With T ≥ 2 every rule above holds (T = 2 is lr, then m for
cosine); a warmup that rounds up to the whole run (or task) is cut to leave its last step to the decay. No division by zero occurs; after the warmup every value lies between m and lr
(between m, c0 and lr for infinite); during the warmup values lie in (0, lr].

Shapes: cosine is the paper's one cosine over all tasks; rewarm is "re-warm and re-decay" in every
task and infinite the "infinite" schedule (Ibrahim et al. 2024), to which tasks can be appended
without re-decaying; wsd is warmup-stable-decay.
"""

from __future__ import annotations

import math

from cpt.config import ScheduleConfig


def _clip(x: float, a: float, b: float) -> float:
    """`x` clipped to the interval spanned by `a` and `b` (in either order): rounding never leaves it."""
    return min(max(x, min(a, b)), max(a, b))


def _warmup_steps(frac: float, n: int, steps: int | None = None) -> int:
    """W: at least 1 (step 0 = the peak when frac = 0), at most n-1 when n ≥ 2 (one step left after the peak).
    `steps` (schedule.warmup_steps) replaces ceil(frac · n) when given."""
    want = math.ceil(frac * n) if steps is None else steps
    return min(max(want, 1), max(n - 1, 1))


def _warm(step: int, warmup_steps: int, lr: float) -> float:
    return lr * ((step + 1) / warmup_steps)  # (W/W) is exactly 1: the last warmup step is exactly lr


def _cosine(i: int, n: int, hi: float, lo: float) -> float:
    """Step i (1..n) of a cosine from `hi` (at step 0, the previous phase's last) to exactly `lo` at step n."""
    if i >= n:
        return lo
    return _clip(lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * i / n)), hi, lo)


def _linear(i: int, n: int, hi: float, lo: float) -> float:
    """Step i (1..n) of a line from `hi` (at step 0) to exactly `lo` at step n."""
    if i >= n:
        return lo
    return _clip(hi + (lo - hi) * (i / n), hi, lo)


def _exponential(i: int, n: int, hi: float, lo: float) -> float:
    """Step i (1..n) of a geometric decay from `hi` (at step 0) towards max(lo, 1e-12), exactly `lo` at step n."""
    if i >= n or hi <= 0:
        return lo
    floor = max(lo, 1e-12)
    return _clip(hi * (floor / hi) ** (i / n), hi, lo)


def lr_at(step: int, total_steps: int, task_ends: list[int], lr: float, cfg: ScheduleConfig) -> float:
    """LR for optimizer step `step` (0-based); `task_ends[i]` = steps completed when task i ends. See the module's contract."""
    if cfg.anneal_at is not None and step >= cfg.anneal_at:  # a release's anneal, after the schedule's own steps
        before = lr_at(cfg.anneal_at - 1, total_steps, task_ends, lr, cfg.model_copy(update={"anneal_at": None}))
        return _exponential(step - cfg.anneal_at + 1, cfg.anneal_steps, before, cfg.min_lr)
    total = max(total_steps, 1)
    step = min(max(step, 0), total - 1)
    if cfg.name == "rewarm":
        start, end = 0, total
        for e in task_ends:
            if step < e:
                end = min(e, total)
                break
            start = e
        n = end - start  # ≥ 1: start ≤ step < end
        local = step - start
        w = _warmup_steps(cfg.warmup, n, cfg.warmup_steps)
        if local < w:
            return _warm(local, w, lr)
        return _cosine(local - w + 1, n - w, lr, cfg.min_lr)

    w = _warmup_steps(cfg.warmup, total, cfg.warmup_steps)
    if step < w:
        return _warm(step, w, lr)
    # total ≥ 2 from here on: with total = 1, w = 1 and step 0 is the warmup's (the peak)
    if cfg.name == "constant":
        return lr
    if cfg.name == "cosine":
        return _cosine(step - w + 1, total - w, lr, cfg.min_lr)
    if cfg.name == "wsd":
        d = min(math.ceil(cfg.decay * total), total - w)
        stable_end = total - 1 - d  # the last step at lr (the peak itself when there is no stable phase)
        if step <= stable_end:
            return lr
        return _linear(step - stable_end, d, lr, cfg.min_lr)
    if cfg.name == "infinite":
        const = cfg.constant_lr if cfg.constant_lr is not None else lr / 2
        a = min(math.ceil(cfg.anneal * total), total - w)
        c = min(math.ceil(cfg.cooldown * total) if cfg.cooldown_steps is None else cfg.cooldown_steps, total - w - a)
        if step < w + c:
            return _cosine(step - w + 1, c, lr, const)
        constant_end = total - 1 - a  # the last step at constant_lr (or the cooldown's last, or the peak)
        if step <= constant_end:
            return const
        return _exponential(step - constant_end, a, const, cfg.min_lr)
    raise ValueError(cfg.name)  # pragma: no cover
