"""Background reads of replay rows, so the training step does not wait on disk.

The training loop draws replay slots in the main thread (deterministically) a couple of steps
ahead, hands them to `ReplayPrefetcher.submit(step, slots)`, and collects the rows with
`get(step)` when that step runs. One worker thread performs the reads in submission order.
Contract with `ReplayBuffer`: the prefetcher attaches itself to the buffer, and `buffer.add()`
calls `barrier()` before it overwrites anything, so a read submitted before an add returns the
rows as they were at submit time (never a partly written row, never a newer row); reads
submitted after an add see the new rows. `wait_seconds` is the time `get()` spent blocked,
which should stay near 0 once reads run ahead of the step.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Self

import numpy as np
import torch

from cpt.replay.buffer import ReplayBuffer


class ReplayPrefetcher:
    """Reads replay rows ahead in one daemon thread; use as a context manager or close()."""

    def __init__(self, buffer: ReplayBuffer, device: torch.device | None = None,
                 pin_memory: bool = False) -> None:
        self.buffer = buffer
        self.device = device
        # pinning needs CUDA; without it a pinned copy would only cost time
        self.pin_memory = bool(pin_memory and torch.cuda.is_available())
        self.wait_seconds = 0.0
        self.reads = 0
        self._cv = threading.Condition()
        self._queue: deque[tuple[int, np.ndarray]] = deque()
        self._done: dict[int, tuple[torch.Tensor, torch.Tensor] | Exception] = {}
        self._keys: set[int] = set()  # submitted and not yet collected by get()
        self._pending = 0  # submitted and not yet read
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"replay-prefetch-{buffer.shard}")
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

    def get(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (int64, [n, row_len]) and task ids (int64, [n]) for `key`; blocks until read."""
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
        rows, tids = result
        if self.device is not None:
            rows = rows.to(self.device, non_blocking=self.pin_memory)
            tids = tids.to(self.device, non_blocking=self.pin_memory)
        return rows, tids

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
            result: tuple[torch.Tensor, torch.Tensor] | Exception
            try:
                rows, tids = self.buffer.read(slots)
                r = torch.from_numpy(rows.astype(np.int64))
                t = torch.from_numpy(tids.astype(np.int64))
                result = (r.pin_memory(), t.pin_memory()) if self.pin_memory else (r, t)
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
