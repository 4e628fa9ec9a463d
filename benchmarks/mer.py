"""MER benchmark: the cost of Reptile meta-updates on top of replay.

Prints the step time of replay + Reptile (k = 100) against plain replay at the same batch
(target overhead <= 1%: one interpolation over the weights every k steps), and the extra memory:
the fp32 anchor, one copy of the parameters, in bytes.

    python benchmarks/mer.py [--preset demo] [--k 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics

from _runs import base_config, step_seconds, workdir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=float, default=1.5e5, help="new tokens per task (2 tasks)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    wd = workdir()
    replay = base_config(args.preset, args.seq_len, args.batch_size, int(args.tokens))
    replay["replay"] = {"rate": 0.25}
    mer = copy.deepcopy(replay)
    mer["alignment"] = {"method": "reptile", "k": args.k, "beta": 0.5}
    a, b = [], []
    for r in range(args.repeats):
        a.append(step_seconds(replay, f"replay{r}", wd)[0])
        t, s = step_seconds(mer, f"mer{r}", wd)
        b.append(t)
    p, q = statistics.median(a), statistics.median(b)
    params = s["parameters"]
    print(f"model preset {args.preset} ({params / 1e6:.2f}M parameters), batch {args.batch_size} x {args.seq_len}, {args.repeats} repeats (median)")
    print(f"step time: replay+Reptile(k={args.k}) {q * 1e3:.2f} ms vs replay {p * 1e3:.2f} ms -> overhead {100 * (q / p - 1):+.2f}% (target <= 1%)")
    print(f"meta-updates in the last run: {s['meta_updates']} over {s['steps']} steps")
    print(f"extra memory: the fp32 anchor = {params * 4:,} bytes (one fp32 copy of {params:,} parameters)")


if __name__ == "__main__":
    main()
