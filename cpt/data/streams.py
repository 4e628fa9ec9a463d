"""Task streams: training sequences cut from a task's token file, in a seeded, resumable order.

A task's training tokens are cut into non-overlapping windows of `seq_len + 1` tokens (inputs and
next-token targets share all but one token). Each epoch visits every window once, in an order
drawn from (seed, task, epoch). The training loop reads a stream with a *global* cursor:
`take(n, lo, hi)` advances the stream by the n rows of one optimizer step over all data-parallel
ranks and returns the rows [lo, hi) of them, this rank's slice. So the global sequence of rows is
the same on 1, 2 or 64 ranks (only who computes which row changes), every rank's copy of the
cursor is the same two integers (epoch, position), and a checkpoint keeps them once, in the shared
state: a run resumed on another number of ranks continues the same sequence.

`TaskStream(rank, world)` with world > 1 is the other reading, used by the gradient probe: rank r
of W takes every W-th position of each epoch's order (r, r + W, r + 2W, …), so ranks read disjoint
rows with cursors of their own; `next_rows(n)` advances that share.

The order is a seeded bijection of [0, windows) computed on the fly, never materialised: a
balanced Feistel network over [0, 4^h), the smallest power of 4 >= windows (two halves of h bits;
`_ROUNDS` rounds, each XORs a splitmix64 hash of one half and a round key into the other), with
cycle walking — a value that lands >= windows is permuted again until it lands inside, which
keeps it a bijection of [0, windows) and takes 4^h / windows <= 4 passes on average (4^h < 4 ·
windows for windows >= 2). The round keys come from SeedSequence(seed, 7919, task, epoch). Memory is O(rows asked
for), not O(windows): a task of 48.8M windows used to cost a 390 MB int64 permutation per rank
per epoch (`rng.permutation(windows)`).

`TaskStream.tokens` may be a numpy memmap or any 1-D array-like that supports `len()` and
contiguous slicing `tokens[a:b]` → np.ndarray; nothing else is asked of it. `last_starts` holds
the token offsets of the rows the last `take` / `next_rows` returned (a replay buffer with
`replay.buffer.store: refs` stores those instead of the rows).

`JointStream` draws each row from one of several task streams with probability proportional to
their token budgets: the retrain-on-everything reference. Its draws are global too (one generator,
the same on every rank), so it is sliced like a task stream.
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
        """Advance this rank's share by n rows and return their token offsets (int64 [n]), crossing epochs as needed."""
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

    def take_starts(self, n: int, lo: int, hi: int) -> np.ndarray:
        """Advance the global cursor by n rows; the token offsets of rows [lo, hi) of them (int64 [hi - lo]).

        Only those rows' positions are computed (O(hi - lo)); the cursor moves by n on every rank alike.
        """
        if self.world != 1:
            raise ValueError("take() reads the global order: build the stream with rank 0, world 1")
        if not 0 <= lo <= hi <= n:
            raise ValueError(f"take(n={n}, lo={lo}, hi={hi}): need 0 <= lo <= hi <= n")
        w = self.windows
        if self.position >= w:  # an epoch ended exactly at the last step (next_rows' lazy roll-over)
            self.epoch, self.position, self._order = self.epoch + self.position // w, self.position % w, None
        starts = np.empty(hi - lo, dtype=np.int64)
        done, at = 0, self.position + lo  # `at`: position relative to the current epoch's start
        while done < hi - lo:
            epoch, pos = self.epoch + at // w, at % w
            k = min(hi - lo - done, w - pos)
            order = self._epoch_order() if epoch == self.epoch else WindowOrder.seeded(w, self.seed, self.task_index, epoch)
            starts[done : done + k] = order(pos + np.arange(k, dtype=np.int64)) * self.seq_len
            done += k
            at += k
        end = self.position + n
        if end // w:
            self.epoch, self._order = self.epoch + end // w, None
        self.position = end % w
        return starts

    def _rows_at(self, starts: np.ndarray) -> np.ndarray:
        out = np.empty((len(starts), self.row_len), dtype=np.int64)
        for i, s in enumerate(starts.tolist()):
            out[i] = self.tokens[s : s + self.row_len]
        self.last_starts = starts
        return out

    def next_rows(self, n: int) -> np.ndarray:
        """This rank's next n rows, int64 [n, seq_len + 1]; their token offsets are then in `last_starts`."""
        return self._rows_at(self.next_starts(n))

    def take(self, n: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Advance the global cursor by n rows and return rows [lo, hi) of them (default all n), int64."""
        return self._rows_at(self.take_starts(n, lo, n if hi is None else hi))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = None


class JointStream:
    """Rows from several streams, each row's stream drawn with probability ∝ weight (one generator for all ranks)."""

    def __init__(self, streams: list[TaskStream], weights: list[float], seed: int, rank: int = 0):
        self.streams = streams
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self.rng = np.random.default_rng([seed, 104729, rank])
        self.row_len = streams[0].row_len
        self.last_starts = None  # rows of several token files: no single offset space (joint runs keep no refs)

    def next_rows(self, n: int) -> np.ndarray:
        return self.take(n)

    def take(self, n: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """n global rows' streams drawn; rows [lo, hi) read. Each source stream advances by its global count."""
        hi = n if hi is None else hi
        src = self.rng.choice(len(self.streams), size=n, p=self.p)
        return slice_by_source(self.streams, src, lo, hi, self.row_len)[0]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)


def slice_by_source(streams: list, src: np.ndarray, lo: int, hi: int, row_len: int, bases=None) -> tuple[np.ndarray, np.ndarray]:
    """Rows [lo, hi) of a step whose n global rows come from `streams[src[i]]`, in order, and their token offsets
    (plus `bases[s]`, the offset of stream s's tokens in a concatenation). Stream s advances by its global count;
    its rows that fall in [lo, hi) are one contiguous run of its rows, so each stream reads only that run."""
    rows = np.empty((hi - lo, row_len), dtype=np.int64)
    starts = np.empty(hi - lo, dtype=np.int64)
    mine = src[lo:hi]
    for s in range(len(streams)):
        total = int(np.count_nonzero(src == s))
        if total == 0:
            continue
        a = int(np.count_nonzero(src[:lo] == s))
        idx = np.flatnonzero(mine == s)
        rows[idx] = streams[s].take(total, a, a + len(idx))
        starts[idx] = streams[s].last_starts + (0 if bases is None else bases[s])
    return rows, starts
