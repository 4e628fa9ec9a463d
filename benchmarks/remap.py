"""Replay-buffer remap figure: what a resume on another number of ranks costs the buffer (`cpt.replay.remap`).

Builds a buffer of W shards (reservoir, `--rows` rows of `--row-len` uint16 tokens in all, filled to capacity
through `ReplayBuffer.add` like training does), flushes it as a checkpoint would, then remaps it to W' shards
and prints the seconds, MiB copied and MiB/s. The remap runs in a child process and its peak RSS is printed (the
rows are copied in chunks of 64 MiB).

    python benchmarks/remap.py                                  # 2 -> 3 shards, 250k rows of 2049 tokens (1 GB)
    /usr/bin/time -v python benchmarks/remap.py --rows 500000 --from-world 4 --to-world 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cpt.replay import ReplayBuffer  # noqa: E402
from cpt.replay.ownership import shard_capacity  # noqa: E402
from cpt.replay.remap import remap_buffer  # noqa: E402


def _remap(source, states, target, world, rows):
    return remap_buffer(source, states, target, world, rows, seed=0, log=print)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=250_000, help="rows in the whole buffer (250000)")
    ap.add_argument("--row-len", type=int, default=2049, help="tokens per row, seq_len + 1 (2049)")
    ap.add_argument("--from-world", type=int, default=2)
    ap.add_argument("--to-world", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="parent dir (default: system temp)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cpt-remap-", dir=args.dir))
    try:
        source = root / "replay"
        rng = np.random.default_rng(0)
        states = []
        t0 = time.perf_counter()
        for q in range(args.from_world):
            cap = shard_capacity(args.rows, args.from_world, q)
            buf = ReplayBuffer(source, args.row_len, cap, "reservoir", np.uint16, seed=0, shard=q)
            for task in range(2):  # two tasks, each offering the shard's capacity
                left = cap
                while left:
                    n = min(left, 256)
                    buf.add(rng.integers(0, 50_000, size=(n, args.row_len), dtype=np.int64), task)
                    left -= n
            buf.flush()
            states.append(buf.state_dict())
            buf.close()
        built = time.perf_counter() - t0
        mib = args.rows * args.row_len * 2 / 2**20
        print(f"built {args.from_world} shard(s): {args.rows:,} rows, {mib:,.0f} MiB in {built:.1f}s")
        # the remap in a child process of its own, so its peak RSS is not the build's
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            summary = pool.apply(_remap, (source, states, root / "remapped", args.to_world, args.rows))
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10
        print(
            f"remap {args.from_world} -> {args.to_world}: {summary['rows']:,} rows, {summary['bytes'] / 2**20:,.0f} MiB in "
            f"{summary['seconds']:.2f}s ({summary['bytes'] / 2**20 / max(summary['seconds'], 1e-9):,.0f} MiB/s); "
            f"rows per shard {summary['rows_per_shard']}; peak RSS of the remapping process {peak:,.0f} MiB"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
