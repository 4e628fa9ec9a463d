"""The loss matrix and the metrics defined on it; held-out loss evaluation.

With T tasks, L[i][j] is the mean token cross-entropy on task j's held-out split after training
task i (row i, column j; 0-based below, the last row is L[T-1]). A joint run has one row. Lower
is better everywhere:

- learned_loss   = mean_i L[i][i]                         (how well each task was learned)
- retained_loss  = mean_{j<T-1} L[T-1][j]                 (earlier tasks at the end)
- forgetting_j   = L[T-1][j] − min_{j<=i<T-1} L[i][j]     (rise above the best seen after learning j)
- forgetting_score = mean_{j<T-1} forgetting_j
- bwt            = mean_{j<T-1} (L[T-1][j] − L[j][j])     (positive = forgot; negative = improved)
- avg_final_loss = mean_j L[T-1][j]

These are the only definitions; training, reports and tests all call them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def learned_loss(L: list[list[float]]) -> float:
    if len(L) == 1:  # joint: the one row is what was learned
        return float(np.mean(L[0]))
    return float(np.mean([L[i][i] for i in range(len(L))]))


def retained_loss(L: list[list[float]]) -> float | None:
    return _mean(L[-1][: len(L[-1]) - 1])


def forgetting(L: list[list[float]]) -> list[float]:
    """forgetting_j for each earlier task j (empty for a joint run or a single task)."""
    T = len(L)
    if T < 2:
        return []
    return [float(L[-1][j] - min(L[i][j] for i in range(j, T - 1))) for j in range(T - 1)]


def forgetting_score(L: list[list[float]]) -> float | None:
    return _mean(forgetting(L))


def bwt(L: list[list[float]]) -> float | None:
    T = len(L)
    if T < 2:
        return None
    return _mean([L[-1][j] - L[j][j] for j in range(T - 1)])


def avg_final_loss(L: list[list[float]]) -> float:
    return float(np.mean(L[-1]))


def summarize(L: list[list[float]]) -> dict:
    return {
        "forgetting": forgetting(L),
        "forgetting_score": forgetting_score(L),
        "retained_loss": retained_loss(L),
        "learned_loss": learned_loss(L),
        "avg_final_loss": avg_final_loss(L),
        "bwt": bwt(L),
    }


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """The fixed held-out set: the first non-overlapping windows of the validation tokens."""
    n = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    if n < 1:
        # short validation splits still get one (shorter) window
        return np.asarray(tokens, dtype=np.int64)[None, :]
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return np.asarray(tokens[: n * seq_len + 1], dtype=np.int64)[idx]


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module, windows: np.ndarray, batch_size: int, device: torch.device, autocast_dtype=None, min_batches: int = 0, pad=None
) -> tuple[float, int]:
    """(sum of token losses, token count) over the windows; the caller divides (and all-reduces).

    `min_batches`: run at least this many forward passes, the extra ones on `pad` and not counted
    (under FSDP2 every rank must take part in every forward).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n_batches = math.ceil(len(windows) / batch_size)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for _ in range(n_batches, min_batches):
            model(input_ids=torch.from_numpy(pad[:, :-1]).to(device))
    for start in range(0, len(windows), batch_size):
        rows = torch.from_numpy(windows[start : start + batch_size]).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=rows[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += rows[:, 1:].numel()
    model.train(was_training)
    if not math.isfinite(total):
        return float("nan"), count
    return total, count
