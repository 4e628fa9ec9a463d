"""Task streams: training sequences cut from a task's token file, in a seeded, resumable order.

A task's training tokens are cut into non-overlapping windows of `seq_len + 1` tokens (inputs and
next-token targets share all but one token). Each epoch visits every window once in a permutation
drawn from (seed, task, epoch); a data-parallel rank takes every world-th window of it, so ranks
read disjoint data. The stream's whole position is two integers, which a checkpoint stores.

`JointStream` draws each row from one of several task streams with probability proportional to
their token budgets: the retrain-on-everything reference.
"""

from __future__ import annotations

import numpy as np

from cpt.errors import CptError


class TaskStream:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, task_index: int, rank: int = 0, world: int = 1, name: str = ""):
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
        self.position = 0  # index into this rank's share of the epoch's permutation
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, 7919, self.task_index, self.epoch])
            self._order = rng.permutation(self.windows)[self.rank :: self.world]
        return self._order

    @property
    def windows_per_epoch(self) -> int:
        return len(self._epoch_order())

    def next_rows(self, n: int) -> np.ndarray:
        out = np.empty((n, self.row_len), dtype=np.int64)
        for i in range(n):
            order = self._epoch_order()
            if self.position >= len(order):
                self.epoch += 1
                self.position = 0
                self._order = None
                order = self._epoch_order()
            start = int(order[self.position]) * self.seq_len
            out[i] = self.tokens[start : start + self.row_len]
            self.position += 1
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
