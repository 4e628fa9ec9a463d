"""The demo's `mer` run with another Reptile setting, at several seeds, next to `cpt demo --seeds N`'s runs.

The k/β sweep (benchmarks/sweep_alignment.py) ranks settings on one seed; this runs one setting at seeds
0..N−1 so `cpt report` can judge it against replay across seeds ("Across seeds"). Each run is the demo's
full-scale `mer` config (evaluations and probe as in the demo) with `alignment.k` / `alignment.beta` changed,
written to OUT/mer-k<k>-seed<s> (β = 0.7, the demo's) or OUT/mer-k<k>-b<β>-seed<s>; finished runs are skipped.

    python benchmarks/mer_seeds.py --k 5 --seeds 3 --out runs/demo3   # ~2.5 min a run on 2 cores
    cpt report runs/demo3/*-seed* --out runs/demo3/report
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cpt.config import validate
from cpt.demo import REPTILE, _seeded, demo_config
from cpt.runs import run_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=5, help="Reptile's k (the demo's: %(default)s)")
    ap.add_argument("--beta", type=float, default=REPTILE["beta"], help="Reptile's β (default: the demo's, %(default)s)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    ap.add_argument("--out", type=Path, default=Path("runs/demo3"), help="where `cpt demo --seeds N --out` wrote its runs")
    ap.add_argument("--quick", action="store_true", help="the --quick demo scale (tiny preset)")
    args = ap.parse_args()
    stem = f"mer-k{args.k}" + ("" if args.beta == REPTILE["beta"] else f"-b{args.beta:g}") + ("-quick" if args.quick else "")
    runs = []
    for seed in range(args.seeds):
        cfg = demo_config("mer", args.quick)
        cfg["alignment"].update(k=args.k, beta=args.beta)
        name = f"{stem}-seed{seed}"
        runs.append((name, args.out / name, validate(_seeded(cfg, name, seed), f"benchmark:{name}")))
    summaries, _ = run_all(runs, what=stem)
    print("| run | forgetting | learned | avg final | wall s |")
    print("|---|---:|---:|---:|---:|")
    for name, s in summaries.items():
        print(f"| {name} | {s['forgetting_score']:.3f} | {s['learned_loss']:.3f} | {s['avg_final_loss']:.3f} | {s['wall_seconds']:.0f} |")
    print(f"\njudge it across seeds: cpt report {args.out}/*-seed* --out {args.out}/report")


if __name__ == "__main__":
    main()
