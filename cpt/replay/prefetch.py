"""Background reads of replay rows, so the training step does not wait on disk.

The training loop draws replay slots in the main thread (deterministically) a couple of steps
ahead, hands them to `ReplayPrefetcher.submit(step, slots)`, and collects the rows with
`get_arrays(step)` (numpy) or `get(step)` (torch, the same memory) when that step runs. One
worker thread performs the reads in submission order and converts the rows to int64 there.
Contract with `ReplayBuffer`: the prefetcher attaches itself to the buffer, and `buffer.add()`
calls `barrier()` before it overwrites anything, so a read submitted before an add returns the
rows as they were at submit time (never a partly written row, never a newer row); reads
submitted after an add see the new rows. `wait_seconds` is the time `get_arrays()`/`get()`
spent blocked, which should stay near 0 once reads run ahead of the step.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
import torch

from cpt.replay.buffer import ReplayBuffer


class ReplayPrefetcher:
    """Reads replay rows ahead in one daemon thread; use as a context manager or close()."""

    def __init__(self, buffer: ReplayBuffer) -> None:
        self.buffer = buffer
        self.wait_seconds = 0.0
        self.reads = 0
        self._cv = threading.Condition()
        self._queue: deque[tuple[int, np.ndarray]] = deque()
        self._done: dict[int, tuple[np.ndarray, np.ndarray] | Exception] = {}
        self._keys: set[int] = set()  # submitted and not yet collected
        self._pending = 0  # submitted and not yet read
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"replay-prefetch-{buffer.shard}")
        self._thread.start()
        buffer.attach(self)

    def submit(self, key: int, slots: np.ndarray) -> None:
        """Queue a read of `slots` for step `key` (copied, so the caller may reuse the array)."""
        slots = np.array(slots, dtype=np.int64).reshape(-1)
        with self._cv:
            if self._closed:
                raise RuntimeError("ReplayPrefetcher is closed")
            if key in self._keys:
                raise ValueError(f"replay read for key {key} was already submitted")
            self._keys.add(key)
            self._queue.append((key, slots))
            self._pending += 1
            self._cv.notify_all()

    def get_arrays(self, key: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows (int64, [n, row_len]) and task ids (int64, [n]) for `key`; blocks until read.

        The time blocked is added to `wait_seconds`. A read that failed raises its error here.
        """
        with self._cv:
            if key not in self._keys:
                raise KeyError(f"no replay read was submitted for key {key}")
            t0 = time.perf_counter()
            while key not in self._done:
                self._cv.wait()
            self.wait_seconds += time.perf_counter() - t0
            result = self._done.pop(key)
            self._keys.discard(key)
        if isinstance(result, Exception):
            raise result
        return result

    def get(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`get_arrays(key)` as CPU int64 tensors sharing the arrays' memory."""
        rows, tids = self.get_arrays(key)
        return torch.from_numpy(rows), torch.from_numpy(tids)

    def barrier(self) -> None:
        """Wait until every submitted read has completed (results stay available to get())."""
        with self._cv:
            while self._pending:
                self._cv.wait()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                key, slots = self._queue.popleft()
            result: tuple[np.ndarray, np.ndarray] | Exception
            try:
                rows, tids = self.buffer.read(slots)
                result = (rows.astype(np.int64), tids.astype(np.int64, copy=False))
            except Exception as e:  # noqa: BLE001 - get() re-raises it in the main thread
                result = e
            with self._cv:
                self._done[key] = result
                self._pending -= 1
                self.reads += 1
                self._cv.notify_all()

    def close(self) -> None:
        """Finish queued reads, stop the thread and detach from the buffer."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        self.buffer.detach(self)

    def __enter__(self) -> ReplayPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
