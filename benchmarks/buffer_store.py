"""Replay buffer disk figure: what a keep-everything (`capacity: all`) shard occupies with
`replay.buffer.store: rows` against `refs` after N inserted rows.

Not a timed benchmark: it prints bytes. Both buffers are fed the same rows from one `TaskStream`
over a synthetic token file (refs store each row's offset into it), flushed, and measured with
`peek` — `stored_bytes` (fill × bytes per slot: row_len × token bytes, or 8) and `disk_bytes`
(the shard files' allocated blocks: tokens, metadata). It also checks that both read back the same rows.

    python benchmarks/buffer_store.py                           # 100k rows of 2049 uint16 tokens
    python benchmarks/buffer_store.py --rows 20000 --row-len 1025 --dtype uint32
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cpt.data.streams import TaskStream  # noqa: E402
from cpt.replay import ReplayBuffer  # noqa: E402
from cpt.replay.buffer import peek  # noqa: E402


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000, help="rows inserted (100000)")
    ap.add_argument("--row-len", type=int, default=2049, help="tokens per row, seq_len + 1 (2049)")
    ap.add_argument("--dtype", choices=("uint16", "uint32"), default="uint16")
    ap.add_argument("--batch", type=int, default=64, help="rows per insert (64)")
    ap.add_argument("--dir", type=Path, default=None, help="parent dir (default: system temp)")
    args = ap.parse_args()

    seq = args.row_len - 1
    n_tokens = args.rows * seq + 1  # one epoch holds exactly the rows inserted
    work = Path(tempfile.mkdtemp(prefix="cpt-buffer-store-", dir=args.dir))
    try:
        tokens = np.memmap(work / "task.tokens", dtype=args.dtype, mode="w+", shape=(n_tokens,))  # the task's token file
        for a in range(0, n_tokens, 1 << 24):  # in chunks: no O(tokens) int64 temporaries
            tokens[a : a + (1 << 24)] = np.arange(a, min(a + (1 << 24), n_tokens)) % 50_000
        figures = {}
        for store in ("rows", "refs"):
            stream = TaskStream(tokens, seq, seed=0, task_index=0)
            buf = ReplayBuffer(work / store, args.row_len, None, dtype=args.dtype, store=store, resolver={0: tokens})
            left = args.rows
            while left:
                n = min(args.batch, left)
                rows = stream.next_rows(n)
                buf.add(rows, 0, starts=stream.last_starts) if store == "refs" else buf.add(rows, 0)
                left -= n
            buf.flush()
            figures[store] = (peek(work / store), buf)
        rows_buf, refs_buf = figures["rows"][1], figures["refs"][1]
        probe = np.random.default_rng(0).integers(0, args.rows, size=256)
        assert (rows_buf.read(probe)[0] == refs_buf.read(probe)[0]).all(), "rows and refs read different rows"
        print(f"capacity all, {args.rows:,} rows of {args.row_len} {args.dtype} tokens ({args.rows * args.row_len:.3g} tokens)")
        for store, (info, _) in figures.items():
            print(
                f"  store {store:4}: stored {_mib(info['stored_bytes']):>14} ({info['stored_bytes']:,} B), on disk {_mib(info['disk_bytes']):>14}"
            )
        a, b = figures["rows"][0], figures["refs"][0]
        print(
            f"  rows / refs: stored {a['stored_bytes'] / b['stored_bytes']:.1f}x "
            f"(row_len x {np.dtype(args.dtype).itemsize} / 8 = {args.row_len * np.dtype(args.dtype).itemsize / 8:.1f}), "
            f"on disk {a['disk_bytes'] / b['disk_bytes']:.1f}x"
        )
        for _, buf in figures.values():
            buf.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
