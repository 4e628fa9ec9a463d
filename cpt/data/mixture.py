"""A task made of several weighted sources (`tasks.N.sources`): e.g. French = 0.7 web + 0.3 encyclopedia.

Each source is prepared as a task of its own (its own cache entry and held-out documents). The task's
training rows are drawn from the sources' streams with exact shares, the way replay's α is exact:
row n of the task (counted over the whole run) comes from the source with the largest deficit
w_s·(n + 1) − rows_s (ties to the first source), so after any n rows every source has had
⌊w_s·n⌋ or ⌈w_s·n⌉ rows — deterministic, and nothing random to store. The stream's state is the
per-source row counts and each source stream's own (epoch, position).

The task's held-out loss is the weighted mean over its sources: its fixed set is each source's
evaluation windows with a share of `training.eval_tokens` in proportion to its weight (`share`),
concatenated; so the loss matrix column reads the mixture the task trains on.

`train` / `val` of a mixed task (a `TokenView` over every source's split, one after the other) serve
what needs one array: replay references (`last_starts` are offsets into that concatenation) and the
gradient probe (which samples the concatenation uniformly, not by weight).
"""

from __future__ import annotations

import numpy as np

from cpt.data.streams import slice_by_source
from cpt.data.views import TokenView


def share(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights` (largest remainders): the counts sum to `total` and each is
    ⌊w·total⌋ or ⌈w·total⌉ (w normalised); ties go to the earlier source."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    counts = np.floor(w * total).astype(np.int64)
    order = np.argsort(-(w * total - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return [int(c) for c in counts]


def concat(arrays: list) -> TokenView | np.ndarray:
    """One 1-D view over several splits (memmaps or TokenViews), one after the other; nothing is copied."""
    if len(arrays) == 1:
        return arrays[0]
    shards: list[np.ndarray] = []
    segments: list[np.ndarray] = []
    for a in arrays:
        if isinstance(a, TokenView):
            segs = np.asarray(a.segments, dtype=np.int64).copy()
            segs[:, 0] += len(shards)
            shards.extend(a.shards)
        else:
            segs = np.array([[len(shards), 0, len(a)]], dtype=np.int64)
            shards.append(a)
        segments.append(segs[segs[:, 2] > segs[:, 1]])
    table = np.concatenate(segments) if segments else np.zeros((0, 3), np.int64)
    starts = np.concatenate([[0], np.cumsum(table[:, 2] - table[:, 1])]).astype(np.int64)
    return TokenView(shards, table, starts)


class MixtureStream:
    """Rows of one task from its sources' streams with exact shares (see the module docstring)."""

    def __init__(self, streams: list, weights: list[float], name: str = "") -> None:
        self.streams = streams
        w = np.asarray(weights, dtype=np.float64)
        self.w = w / w.sum()
        self.counts = np.zeros(len(streams), dtype=np.int64)
        self.row_len = streams[0].row_len
        self.name = name
        self.bases = np.concatenate([[0], np.cumsum([len(s.tokens) for s in streams])[:-1]]).astype(np.int64)
        self.last_starts = np.empty(0, dtype=np.int64)

    @property
    def windows_per_epoch(self) -> int:
        return sum(s.windows_per_epoch for s in self.streams)

    @property
    def tokens(self):
        return concat([s.tokens for s in self.streams])

    def next_rows(self, n: int) -> np.ndarray:
        return self.take(n)

    def take(self, n: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """The sources of the step's n global rows by the largest-deficit rule (the counts advance by all n, on
        every rank alike), then rows [lo, hi) of them from their sources' streams."""
        hi = n if hi is None else hi
        src = np.empty(n, dtype=np.int64)
        total = int(self.counts.sum())
        for i in range(n):
            s = int(np.argmax(self.w * (total + 1) - self.counts))
            src[i] = s
            self.counts[s] += 1
            total += 1
        rows, self.last_starts = slice_by_source(self.streams, src, lo, hi, self.row_len, self.bases)
        return rows

    def state_dict(self) -> dict:
        return {"counts": [int(c) for c in self.counts], "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        self.counts = np.asarray(state["counts"], dtype=np.int64)
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
