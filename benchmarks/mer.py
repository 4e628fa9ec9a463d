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

from _runs import add_run_args, base_config, step_seconds, workdir


def meta_update_seconds(preset: str, repeats: int = 20) -> float:
    """Median wall time of one Reptile meta-update over a real model's AdamW-owned parameters."""
    import time

    import torch

    from cpt.alignment.reptile import Reptile, optimizer_params
    from cpt.model import build_model

    model = build_model(preset, 8192, 0, 128, seed=0)
    opt = torch.optim.AdamW(model.parameters())
    reptile = Reptile(optimizer_params(opt), k=1, beta=0.5)
    times = []
    for _ in range(repeats):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)  # move away from the anchor so the update does real work
        t0 = time.perf_counter()
        reptile.after_step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    ap.add_argument("--k", type=int, default=100)
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
    t_meta = meta_update_seconds(args.preset)
    print(
        f"model preset {args.preset} ({params / 1e6:.2f}M parameters), batch {args.batch_size} x {args.seq_len}, {args.repeats} repeats (median)"
    )
    print(
        f"step time: replay+Reptile(k={args.k}) {q * 1e3:.2f} ms vs replay {p * 1e3:.2f} ms -> overhead {100 * (q / p - 1):+.2f}% (target <= 1%)"
    )
    print(f"meta-updates in the last run: {s['meta_updates']} over {s['steps']} steps")
    print(
        f"one meta-update measured directly: {t_meta * 1e3:.2f} ms -> amortised over k={args.k} steps of {p * 1e3:.1f} ms: "
        f"{100 * t_meta / (args.k * p):.3f}% (the whole-run difference above is dominated by run-to-run noise)"
    )
    print(f"extra memory: the fp32 anchor = {params * 4:,} bytes (one fp32 copy of {params:,} parameters)")


if __name__ == "__main__":
    main()
