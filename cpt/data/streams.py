"""Task streams: training sequences cut from a task's token file, in a seeded, resumable order.

A task's training tokens are cut into non-overlapping windows of `seq_len + 1` tokens (inputs and
next-token targets share all but one token). Each epoch visits every window once, in an order
drawn from (seed, task, epoch); a data-parallel rank takes every world-th position of that order
(rank r of W: positions r, r + W, r + 2W, …, so ceil((windows - r) / W) windows per epoch), so
ranks read disjoint data and together cover the epoch. The stream's whole position is two
integers (epoch, position in this rank's share), which a checkpoint stores.

The order is a seeded bijection of [0, windows) computed on the fly, never materialised: a
balanced Feistel network over [0, 4^h), the smallest power of 4 >= windows (two halves of h bits;
`_ROUNDS` rounds, each XORs a splitmix64 hash of one half and a round key into the other), with
cycle walking — a value that lands >= windows is permuted again until it lands inside, which
keeps it a bijection of [0, windows) and takes 4^h / windows <= 4 passes on average (4^h < 4 ·
windows for windows >= 2). The round keys come from SeedSequence(seed, 7919, task, epoch). Memory is O(rows asked
for), not O(windows): a task of 48.8M windows used to cost a 390 MB int64 permutation per rank
per epoch (`rng.permutation(windows)`). This replaced that permutation, so the order of every
run's training rows (and with it its loss matrix) changed once; runs of this version compare
with each other exactly as before.

`TaskStream.tokens` may be a numpy memmap or any 1-D array-like that supports `len()` and
contiguous slicing `tokens[a:b]` → np.ndarray; nothing else is asked of it. `last_starts` holds
the token offsets of the rows the last `next_rows` returned (a replay buffer with
`replay.buffer.store: refs` stores those instead of the rows).

`JointStream` draws each row from one of several task streams with probability proportional to
their token budgets: the retrain-on-everything reference.
"""

from __future__ import annotations

import numpy as np

from cpt.errors import CptError

_ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's finaliser constants
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic): a fast, well-mixing hash."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


class WindowOrder:
    """A seeded bijection of [0, n): a Feistel network over [0, 4^h) with cycle walking (see the module).

    `WindowOrder(n, keys)(i)` maps an int array of positions in [0, n) to windows in [0, n);
    distinct positions give distinct windows. It holds only the round keys.
    """

    def __init__(self, n: int, keys: np.ndarray) -> None:
        if n < 1:
            raise ValueError(f"a window order needs n >= 1, got {n}")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)  # 4^half >= n
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(k) for k in np.asarray(keys, dtype=np.uint64)]

    @classmethod
    def seeded(cls, n: int, seed: int, task_index: int, epoch: int) -> WindowOrder:
        keys = np.random.SeedSequence([seed, 7919, task_index, epoch]).generate_state(_ROUNDS, np.uint64)
        return cls(n, keys)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right + k) & self.mask)
        return (left << h) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(x) == 0:
            return np.empty(0, dtype=np.int64)
        if x.min() < 0 or x.max() >= self.n:
            raise IndexError(f"window order positions must lie in [0, {self.n}), got [{x.min()}, {x.max()}]")
        out = self._feistel(x.astype(np.uint64))
        n = np.uint64(self.n)
        todo = np.flatnonzero(out >= n)
        while len(todo):  # cycle walking: the cycle through x returns inside [0, n) at the latest at x
            out[todo] = self._feistel(out[todo])
            todo = todo[out[todo] >= n]
        return out.astype(np.int64)


class TaskStream:
    """One task's windows in a seeded order per epoch, this rank's share of it, resumable (see the module)."""

    def __init__(self, tokens, seq_len: int, seed: int, task_index: int, rank: int = 0, world: int = 1, name: str = ""):
        self.tokens = tokens
        self.row_len = seq_len + 1
        self.windows = (len(tokens) - 1) // seq_len
        self.seq_len = seq_len
        self.seed = seed
        self.task_index = task_index
        self.rank = rank
        self.world = world
        self.name = name
        if self.windows < world:
            raise CptError(
                f"task {name!r}: {len(tokens)} training tokens hold {self.windows} sequence(s) of "
                f"{seq_len + 1} tokens, fewer than one per rank; add data or lower training.seq_len"
            )
        self.epoch = 0
        self.position = 0  # index into this rank's share of the epoch's order
        self.last_starts = np.empty(0, dtype=np.int64)  # token offsets of the rows next_rows last returned
        self._order: WindowOrder | None = None

    def _epoch_order(self) -> WindowOrder:
        if self._order is None:
            self._order = WindowOrder.seeded(self.windows, self.seed, self.task_index, self.epoch)
        return self._order

    @property
    def windows_per_epoch(self) -> int:
        """Windows this rank reads per epoch: ceil((windows - rank) / world)."""
        return (self.windows - self.rank + self.world - 1) // self.world

    def next_starts(self, n: int) -> np.ndarray:
        """Advance by n rows and return their token offsets (int64 [n]), crossing epochs as needed."""
        per_epoch = self.windows_per_epoch
        starts = np.empty(n, dtype=np.int64)
        done = 0
        while done < n:
            if self.position >= per_epoch:
                self.epoch += 1
                self.position = 0
                self._order = None
            k = min(n - done, per_epoch - self.position)
            positions = self.rank + self.world * (self.position + np.arange(k, dtype=np.int64))
            starts[done : done + k] = self._epoch_order()(positions) * self.seq_len
            self.position += k
            done += k
        return starts

    def next_rows(self, n: int) -> np.ndarray:
        """The next n rows, int64 [n, seq_len + 1]; their token offsets are then in `last_starts`."""
        starts = self.next_starts(n)
        out = np.empty((n, self.row_len), dtype=np.int64)
        for i, s in enumerate(starts.tolist()):
            out[i] = self.tokens[s : s + self.row_len]
        self.last_starts = starts
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = None


class JointStream:
    """Rows from several streams, each row's stream drawn with probability ∝ weight."""

    def __init__(self, streams: list[TaskStream], weights: list[float], seed: int, rank: int = 0):
        self.streams = streams
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self.rng = np.random.default_rng([seed, 104729, rank])

    def next_rows(self, n: int) -> np.ndarray:
        src = self.rng.choice(len(self.streams), size=n, p=self.p)
        rows = np.empty((n, self.streams[0].row_len), dtype=np.int64)
        for s in np.unique(src):
            idx = np.nonzero(src == s)[0]
            rows[idx] = self.streams[s].next_rows(len(idx))
        return rows

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
