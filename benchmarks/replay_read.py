"""Replay read benchmark: random-row read throughput of a large on-disk `ReplayBuffer` shard, and
how long a training step waits for `ReplayPrefetcher` when reads overlap a simulated step.

The first read pass runs after the shard was unmapped and its pages were dropped with
posix_fadvise(DONTNEED) (best effort, "cold-ish": the kernel may keep some pages, and a VM disk
may be cached by the host); the second pass re-reads the same rows from the page cache ("warm").

    python benchmarks/replay_read.py --tokens 1e8      # quick
    python benchmarks/replay_read.py                   # 1e9 tokens, ~2 GB in the temp dir
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cpt.replay import ReplayBuffer, ReplayPrefetcher, capacity_rows_from  # noqa: E402

TARGET_TOKENS_PER_S = 50e6


def _cached_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reopen_cold(buf: ReplayBuffer) -> tuple[ReplayBuffer, float]:
    """Unmap the shard, ask the kernel to drop its pages, reopen; returns MiB dropped."""
    directory, shard = buf.directory, buf.shard
    buf.close()  # pages still mapped by this process would not be dropped
    before = _cached_mib()
    fd = os.open(directory / f"shard-{shard:03d}.tokens", os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return ReplayBuffer.open(directory, shard), before - _cached_mib()


def _read_pass(buf: ReplayBuffer, batches: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    for slots in batches:
        buf.read(slots)
    return sum(len(b) for b in batches) * buf.row_len / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=float, default=1e9, help="buffer size in tokens (1e9)")
    ap.add_argument("--row-len", type=int, default=2049, help="tokens per row (2049)")
    ap.add_argument("--dtype", choices=("uint16", "uint32"), default="uint16")
    ap.add_argument("--batch", type=int, default=8, help="rows per replay read (8)")
    ap.add_argument("--batches", type=int, default=4000, help="reads per pass (4000)")
    ap.add_argument("--step-ms", type=float, default=50.0, help="simulated step time (50)")
    ap.add_argument("--steps", type=int, default=40, help="simulated training steps (40)")
    ap.add_argument("--dir", type=Path, default=None, help="parent dir (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the buffer files at the end")
    args = ap.parse_args()

    rows = capacity_rows_from(args.tokens, "tokens", args.row_len)
    assert rows is not None
    nbytes = rows * args.row_len * np.dtype(args.dtype).itemsize
    parent = args.dir or Path(tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free < 1.1 * nbytes:
        sys.exit(f"{parent}: needs {nbytes / 2**30:.1f} GiB, only {free / 2**30:.1f} GiB free")
    directory = Path(tempfile.mkdtemp(prefix="cpt-replay-bench-", dir=parent))
    print(f"buffer: {rows} rows x {args.row_len} {args.dtype} = {rows * args.row_len:.3g} tokens, {nbytes / 2**30:.2f} GiB in {directory}")
    try:
        buf = ReplayBuffer(directory, args.row_len, rows, "reservoir", dtype=args.dtype)
        rng = np.random.default_rng(0)
        chunk = max(1, (64 << 20) // (args.row_len * 2))  # ~64 MiB of uint16 per add()
        t0 = time.perf_counter()
        for start in range(0, rows, chunk):  # fill phase: each add() is one contiguous write
            n = min(chunk, rows - start)
            buf.add(rng.integers(0, 32000, size=(n, args.row_len), dtype=np.uint16), 0)
        buf.flush()
        fill_s = time.perf_counter() - t0
        print(f"fill: {fill_s:.1f} s ({rows * args.row_len / fill_s / 1e6:.0f}M tokens/s, incl. flush to disk)")

        buf, dropped = _reopen_cold(buf)
        batches = [buf.sample_slots(args.batch) for _ in range(args.batches)]
        cold = _read_pass(buf, batches)
        warm = _read_pass(buf, batches)
        print(f"random reads, {args.batches} x {args.batch} rows:")
        print(f"  pass 1 (cold-ish, {dropped:.0f} MiB of page cache dropped before): {cold / 1e6:.1f}M tokens/s")
        print(
            f"  pass 2 (warm, same rows from page cache): {warm / 1e6:.1f}M tokens/s  "
            f"[target >= {TARGET_TOKENS_PER_S / 1e6:.0f}M: "
            f"{'ok' if min(cold, warm) >= TARGET_TOKENS_PER_S else 'MISSED (see pass)'}]"
        )
        t0 = time.perf_counter()
        for _ in range(2000):
            buf.sample_slots(args.batch)
        print(f"  sample_slots({args.batch}): {(time.perf_counter() - t0) / 2000 * 1e6:.1f} us")

        # Simulated loop, as the trainer runs it: after step s adds its rows, draw the slots
        # for step s + 2 and submit the read, which overlaps step s + 1.
        buf, _ = _reopen_cold(buf)
        new = rng.integers(0, 32000, size=(args.batch, args.row_len), dtype=np.uint16)
        sync_s, waits = 0.0, []
        with ReplayPrefetcher(buf) as pf:
            for s in (0, 1):
                pf.submit(s, buf.sample_slots(args.batch))
            for s in range(args.steps):
                before = pf.wait_seconds
                pf.get(s)
                waits.append(pf.wait_seconds - before)
                time.sleep(args.step_ms / 1000)  # the training step
                buf.add(new, 1)
                slots = buf.sample_slots(args.batch)
                pf.submit(s + 2, slots)
                t0 = time.perf_counter()
                buf.read(buf.sample_slots(args.batch))  # what a synchronous read would cost
                sync_s += time.perf_counter() - t0
        # steps 0 and 1 were submitted just before their get(): nothing to overlap with
        print(
            f"prefetch, {args.steps} steps of {args.step_ms:.0f} ms, pages dropped first: "
            f"mean wait {np.mean(waits[2:]) * 1e3:.3f} ms/step in steady state (steps 2+), "
            f"{np.mean(waits) * 1e3:.3f} ms/step incl. the first two un-overlapped reads; "
            f"a synchronous cold-ish read takes {sync_s / args.steps * 1e3:.3f} ms/step"
        )
        buf.close()
    finally:
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
