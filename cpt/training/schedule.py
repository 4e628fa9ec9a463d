"""Learning-rate schedules over a continual sequence of tasks.

`lr_at(step, ...)` is a pure function of the optimizer step (0-based), the total number of steps
and the steps at which tasks end, so a resumed run recomputes the same value. Warmup is linear
from lr/warmup_steps to lr (never exactly 0, so step 0 trains). Shapes:

- cosine: warmup, then one cosine from lr to min_lr over all remaining steps (the paper's).
- rewarm: warmup + cosine restarted in every task ("re-warm and re-decay", Ibrahim et al. 2024).
- infinite: warmup → cosine cooldown to constant_lr → constant → exponential anneal to min_lr over
  the last `anneal` fraction (Ibrahim et al. 2024). Tasks can be appended without re-decaying.
- wsd: warmup → stable at lr → linear decay to min_lr over the last `decay` fraction.
- constant: warmup, then lr.
"""

from __future__ import annotations

import math

from cpt.config import ScheduleConfig


def _warm(step: int, warmup_steps: int, lr: float) -> float:
    return lr * (step + 1) / warmup_steps


def _cosine(progress: float, hi: float, lo: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * progress))


def lr_at(step: int, total_steps: int, task_ends: list[int], lr: float, cfg: ScheduleConfig) -> float:
    """LR for optimizer step `step` (0-based); `task_ends[i]` = steps completed when task i ends."""
    total = max(total_steps, 1)
    if cfg.name == "rewarm":
        start = 0
        for end in task_ends:
            if step < end:
                break
            start = end
        else:
            end = total
        n = max(end - start, 1)
        local = step - start
        w = math.ceil(cfg.warmup * n)
        if local < w:
            return _warm(local, w, lr)
        return _cosine((local - w) / max(n - w, 1), lr, cfg.min_lr)

    w = math.ceil(cfg.warmup * total)
    if step < w:
        return _warm(step, w, lr)
    if cfg.name == "constant":
        return lr
    if cfg.name == "cosine":
        return _cosine((step - w) / max(total - w, 1), lr, cfg.min_lr)
    if cfg.name == "wsd":
        d = math.ceil(cfg.decay * total)
        start = total - d
        if step < start:
            return lr
        return lr + (cfg.min_lr - lr) * (step - start + 1) / max(d, 1)
    if cfg.name == "infinite":
        const = cfg.constant_lr if cfg.constant_lr is not None else lr / 2
        c = math.ceil(cfg.cooldown * total)
        a = math.ceil(cfg.anneal * total)
        if step < w + c:
            return _cosine((step - w) / max(c, 1), lr, const)
        anneal_start = total - a
        if step < anneal_start:
            return const
        # exponential decay from const to min_lr across the anneal phase
        floor = max(cfg.min_lr, 1e-12)
        frac = (step - anneal_start + 1) / max(a, 1)
        return const * (floor / const) ** frac
    raise ValueError(cfg.name)  # pragma: no cover
