"""Replay benchmark: what experience replay costs per step, and how long steps wait on disk.

Prints (a) the step time with replay.rate 0.25 against 0 at the same batch size (target <= 1.02×:
replay replaces rows, it does not add them, so only the buffer's bookkeeping and reads cost
extra); (c) the mean wait per step on the prefetcher in that run. (b), random-read throughput from
a 1B-token buffer on disk, is `benchmarks/replay_read.py` (it needs ~2 GB of disk).

    python benchmarks/replay.py [--preset demo] [--tokens 2e5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics

from _runs import add_run_args, base_config, step_seconds, workdir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    args = ap.parse_args()
    wd = workdir()
    base = base_config(args.preset, args.seq_len, args.batch_size, int(args.tokens))
    replay = copy.deepcopy(base)
    replay["replay"] = {"rate": 0.25}
    plain_t, replay_t, waits = [], [], []
    for r in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        plain_t.append(step_seconds(base, f"plain{r}", wd)[0])
        t, s = step_seconds(replay, f"replay{r}", wd)
        replay_t.append(t)
        waits.append(s["replay_wait_seconds"] / s["steps"])
    p, q = statistics.median(plain_t), statistics.median(replay_t)
    print(f"model preset {args.preset}, batch {args.batch_size} x {args.seq_len}, {args.repeats} repeats (median)")
    print(f"(a) step time: replay 0.25 {q * 1e3:.1f} ms vs no replay {p * 1e3:.1f} ms -> {q / p:.3f}x (target <= 1.02x)")
    print(f"(c) mean wait on the replay prefetcher: {statistics.median(waits) * 1e3:.3f} ms per step")
    print("(b) read throughput: python benchmarks/replay_read.py")


if __name__ == "__main__":
    main()
