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

from cpt.training.device import precision
from cpt.training.loss import causal_lm_loss_sum


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


def eval_window_starts(n_tokens: int, seq_len: int, max_tokens: int) -> np.ndarray:
    """Start positions (int64, increasing) of the held-out windows in a split of `n_tokens` tokens.

    With m = (n_tokens − 1) // seq_len non-overlapping windows of seq_len + 1 tokens available
    (window k is tokens[k·seq_len : k·seq_len + seq_len + 1]; neighbours share one boundary token,
    their targets never overlap) and n = min(m, max(1, max_tokens // seq_len)) wanted, window i of n
    is window k_i = ⌊i·(m − 1) / (n − 1)⌋ (k_0 = 0 for n = 1): evenly spaced from the first to the
    last available window, so n = m gives every window. A pure function of its arguments: no seed,
    the same set at every evaluation. A split shorter than one window (m = 0) gets one window at 0.
    """
    m = max(0, (n_tokens - 1) // seq_len)
    n = min(m, max(1, max_tokens // seq_len))
    if n < 1:
        return np.zeros(1, dtype=np.int64)
    if n == m:
        k = np.arange(m, dtype=np.int64)
    elif n == 1:
        k = np.zeros(1, dtype=np.int64)
    else:
        # ⌊i·(m−1)/(n−1)⌋ = i·q + ⌊i·r/(n−1)⌋ with (q, r) = divmod(m−1, n−1): no int64 overflow
        q, r = divmod(m - 1, n - 1)
        i = np.arange(n, dtype=np.int64)
        k = i * q + (i * r) // (n - 1)
    return k * seq_len


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """The fixed held-out set: int64 array [n, seq_len + 1] of windows spread over the whole split.

    The windows start at `eval_window_starts(len(tokens), seq_len, max_tokens)` (evenly spaced from
    the first token to the end, so an ordered corpus is evaluated throughout, not just its start).
    A split shorter than one window gives one shorter window: [1, len(tokens)]. Only the windows'
    tokens are read, so `tokens` can be a large memory map.
    """
    if (len(tokens) - 1) // seq_len < 1:
        # short validation splits still get one (shorter) window
        return np.asarray(tokens[0 : len(tokens)]).astype(np.int64)[None, :]
    starts = eval_window_starts(len(tokens), seq_len, max_tokens)
    idx = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    return tokens[idx].astype(np.int64)


def heldout_coverage(tokens: np.ndarray, seq_len: int, max_tokens: int, eos_id: int, chunk: int = 1 << 24) -> dict:
    """What the held-out set `eval_windows(tokens, seq_len, max_tokens)` covers of its split.

    The split holds N = len(tokens) tokens in documents that each end with `eos_id`; a trailing run
    of tokens without a final EOS counts as one more document. Position p belongs to document
    d(p) = #{EOS at positions < p} (an EOS belongs to the document it ends). With the window starts
    s_i of `eval_window_starts` and ℓ = seq_len (ℓ = N − 1 for a split shorter than one window), window
    i evaluates (predicts) the targets at positions s_i + 1 … s_i + ℓ and reads s_i … s_i + ℓ.

    - documents          = #EOS + (1 if the last token is not EOS)
    - tokens             = N
    - windows            = n; windows_available = m (see eval_window_starts)
    - eval_tokens        = n · ℓ (targets scored per evaluation); token_fraction = eval_tokens / N
    - documents_touched  = #distinct d(p) over all target positions p. Window i covers the documents
      lo_i = d(s_i + 1) … hi_i = d(s_i + ℓ); windows are in order, so lo_{i+1} ≥ hi_i, and the count
      is Σ (hi_i − lo_i + 1) − #{i : lo_{i+1} = hi_i}. document_fraction = documents_touched / documents
    - span_first = s_0, span_last = s_{n−1} + ℓ (first and last position read);
      span_start = span_first / N, span_end = (span_last + 1) / N (0 and 1: the whole split)

    Cost: one vectorised pass over the split comparing `chunk` tokens at a time with `eos_id`
    (memory O(chunk + documents)), then O(windows) work; the windows themselves are not built.
    """
    N = len(tokens)
    eos = np.concatenate(
        [np.flatnonzero(tokens[a : a + chunk] == eos_id) + a for a in range(0, N, max(1, chunk))] or [np.zeros(0, np.int64)]
    )
    documents = len(eos) + int(N > 0 and int(tokens[-1]) != eos_id)
    short = (N - 1) // seq_len < 1
    starts = eval_window_starts(N, seq_len, max_tokens)
    length = max(N - 1, 0) if short else seq_len
    if length > 0:
        lo = np.searchsorted(eos, starts + 1, side="left")
        hi = np.searchsorted(eos, starts + length, side="left")
        touched = int((hi - lo + 1).sum() - (lo[1:] == hi[:-1]).sum())
    else:
        touched = 0
    first, last = int(starts[0]), int(starts[-1]) + length
    eval_tokens = len(starts) * length
    return {
        "documents": documents,
        "tokens": N,
        "windows": len(starts),
        "windows_available": max(0, (N - 1) // seq_len),
        "eval_tokens": eval_tokens,
        "token_fraction": eval_tokens / N if N else 0.0,
        "documents_touched": touched,
        "document_fraction": touched / documents if documents else 0.0,
        "span_first": first,
        "span_last": last,
        "span_start": first / N if N else 0.0,
        "span_end": (last + 1) / N if N else 0.0,
    }


def describe_coverage(cov: dict) -> str:
    """One line for the training log, from `heldout_coverage`."""
    return (
        f"{cov['windows']}/{cov['windows_available']} windows, {cov['eval_tokens']:,} of {cov['tokens']:,} tokens "
        f"({100 * cov['token_fraction']:.1f}%), {cov['documents_touched']}/{cov['documents']} documents "
        f"({100 * cov['document_fraction']:.1f}%), positions {100 * cov['span_start']:.1f}%–{100 * cov['span_end']:.1f}% of the split"
    )


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module, windows: np.ndarray, batch_size: int, device: torch.device, autocast_dtype=None, min_batches: int = 0, pad=None
) -> tuple[float, int]:
    """(sum of token losses, token count) over the windows; the caller divides (and all-reduces).

    Each batch's loss is `causal_lm_loss_sum`: the lm_head and the cross-entropy run in chunks of
    rows, so no [batch × seq_len, vocab] logits are ever held (models it does not support take the
    full-logits path). The batch sums are added on the device in float64 (what adding Python floats
    did) and read once at the end, not once per batch.

    `min_batches`: run at least this many forward passes, the extra ones on `pad` and not counted
    (under FSDP2 every rank must take part in every forward).
    """
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    n_batches = math.ceil(len(windows) / batch_size)
    if n_batches < min_batches:
        padded = torch.from_numpy(pad).to(device)
        with precision(device, autocast_dtype):
            for _ in range(n_batches, min_batches):
                causal_lm_loss_sum(model, padded[:, :-1], padded[:, 1:])
    for start in range(0, len(windows), batch_size):
        rows = torch.from_numpy(windows[start : start + batch_size]).to(device)
        with precision(device, autocast_dtype):
            loss = causal_lm_loss_sum(model, rows[:, :-1], rows[:, 1:])
        total += loss.double()
        count += rows[:, 1:].numel()
    model.train(was_training)
    total = total.item()
    if not math.isfinite(total):
        return float("nan"), count
    return total, count
