"""A task's training or validation split as one 1-D token array, read in place from its token shards.

A prepared task is a list of token shards (each a memory-mapped 1-D array: a shard cpt wrote, or a
pre-tokenized file read where it lies) and a *segment table*: rows (shard, start, end) whose
concatenation, in order, is the split. The validation split is every held-out document and the
training split every other one, so each split is a few runs of consecutive documents per held-out
document; nothing is copied to build them.

`TokenView` offers what the rest of cpt reads a split with: `len`, an integer index, a contiguous
slice (`view[a:b]` → np.ndarray) and fancy indexing with an integer array of any shape (the held-out
windows). It never holds more than the asked-for tokens: the segment table and its cumulative
starts are memory-mapped `.npy` files too, searched with `np.searchsorted` (O(log segments) per
read), so a rank's memory does not grow with the corpus.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TokenView:
    def __init__(self, shards: list[np.ndarray], segments: np.ndarray, starts: np.ndarray) -> None:
        """`segments` int64 [n, 3] of (shard, start, end); `starts` int64 [n + 1], starts[i] = the view offset of segment i."""
        self.shards = shards
        self.segments = segments
        self.starts = starts
        self._len = int(starts[-1]) if len(starts) else 0
        self.dtype = shards[0].dtype if shards else np.dtype(np.uint16)

    @classmethod
    def load(cls, shards: list[np.ndarray], prefix: Path) -> TokenView | np.ndarray:
        """The view saved by `save(prefix)`; one segment over a whole shard is that shard's memmap itself."""
        segments = np.load(f"{prefix}.segments.npy", mmap_mode="r")
        starts = np.load(f"{prefix}.starts.npy", mmap_mode="r")
        if len(segments) == 1:
            s, a, b = (int(x) for x in segments[0])
            return shards[s][a:b]
        return cls(shards, segments, starts)

    @staticmethod
    def save(prefix: Path, segments: np.ndarray) -> None:
        segments = np.asarray(segments, dtype=np.int64).reshape(-1, 3)
        starts = np.concatenate([[0], np.cumsum(segments[:, 2] - segments[:, 1])]).astype(np.int64)
        np.save(f"{prefix}.segments.npy", segments)
        np.save(f"{prefix}.starts.npy", starts)

    def __len__(self) -> int:
        return self._len

    @property
    def size(self) -> int:
        return self._len

    @property
    def shape(self) -> tuple[int]:
        return (self._len,)

    def _slice(self, a: int, b: int) -> np.ndarray:
        out = np.empty(max(0, b - a), dtype=self.dtype)
        if b <= a:
            return out
        i = int(np.searchsorted(self.starts, a, side="right")) - 1
        at = a
        while at < b:
            s, lo, hi = (int(x) for x in self.segments[i])
            seg_start = int(self.starts[i])
            take_lo = lo + (at - seg_start)
            take_hi = min(hi, lo + (b - seg_start))
            n = take_hi - take_lo
            out[at - a : at - a + n] = self.shards[s][take_lo:take_hi]
            at += n
            i += 1
        return out

    def _gather(self, index: np.ndarray) -> np.ndarray:
        flat = np.asarray(index, dtype=np.int64).ravel()
        if flat.size and (flat.min() < -self._len or flat.max() >= self._len):
            raise IndexError(f"index out of range for a token view of {self._len} tokens")
        flat = np.where(flat < 0, flat + self._len, flat)
        seg = np.searchsorted(self.starts, flat, side="right") - 1
        touched, rows = np.unique(seg, return_inverse=True)  # read only the segments the index touches
        table = np.asarray(self.segments[touched])
        pos = table[rows, 1] + flat - np.asarray(self.starts[touched])[rows]
        shard_of = table[rows, 0]
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(shard_of):
            m = shard_of == s
            out[m] = self.shards[int(s)][pos[m]]
        return out.reshape(np.shape(index))

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(self._len)
            if step != 1:
                return self._slice(a, b)[::step] if b > a else np.empty(0, self.dtype)
            return self._slice(a, b)
        if isinstance(key, (int, np.integer)):
            k = int(key)
            if not -self._len <= k < self._len:
                raise IndexError(f"index {k} out of range for a token view of {self._len} tokens")
            return self._slice(k % self._len, k % self._len + 1)[0]
        return self._gather(np.asarray(key))

    def __array__(self, dtype=None, copy=None):
        out = self._slice(0, self._len)
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"TokenView({self._len} tokens in {len(self.segments)} segment(s) of {len(self.shards)} shard(s))"
