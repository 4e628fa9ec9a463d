"""Sweep Reptile's k and β on the bundled 5-language default, against replay alone.

Every point is a normal cpt run of the demo config (`cpt.demo.demo_config("mer")`) with
`alignment.k` and `alignment.beta` overridden; the reference is the demo's `replay` run (same
replay rate, no Reptile). Prints a Markdown table: forgetting, learned and average final loss,
and whether the point meets the bar for a default (less forgetting than replay, learned loss
within 2% of replay's). Finished runs are re-used, so the sweep can be stopped and restarted.

    python benchmarks/sweep_alignment.py --out runs/sweep-alignment [--quick] [--k 5,20,50] [--beta 0.25,0.5,0.75]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpt.config import validate  # noqa: E402
from cpt.demo import demo_config  # noqa: E402
from cpt.training.launch import train  # noqa: E402


def run(cfg: dict, out: Path) -> dict:
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    cfg = dict(cfg, logging={"progress": False, "log_every": 10})
    return train(validate(cfg), out, overwrite=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/sweep-alignment"))
    ap.add_argument("--quick", action="store_true", help="the --quick demo scale (tiny preset)")
    ap.add_argument("--k", default="5,20,50")
    ap.add_argument("--beta", default="0.25,0.5,0.75")
    args = ap.parse_args()
    ref_cfg = demo_config("replay", args.quick)
    ref_cfg["training"]["eval_every"] = 0  # only task ends: the sweep needs the matrix, not curves
    ref = run(ref_cfg, args.out / "replay")
    rows = []
    for k in (int(x) for x in args.k.split(",")):
        for beta in (float(x) for x in args.beta.split(",")):
            cfg = demo_config("mer", args.quick)
            cfg["training"]["eval_every"] = 0
            cfg["alignment"] = {"method": "reptile", "k": k, "beta": beta}
            s = run(cfg, args.out / f"mer-k{k}-b{beta}")
            ok = s["forgetting_score"] < ref["forgetting_score"] and s["learned_loss"] <= 1.02 * ref["learned_loss"]
            rows.append((k, beta, s, ok))
            print(f"k={k} beta={beta}: forgetting {s['forgetting_score']:.3f} learned {s['learned_loss']:.3f}", file=sys.stderr, flush=True)
    print(
        f"reference replay (rate {ref_cfg['replay']['rate']}): forgetting {ref['forgetting_score']:.3f}, "
        f"learned {ref['learned_loss']:.3f}, avg final {ref['avg_final_loss']:.3f}\n"
    )
    print("| k | β | forgetting | vs replay | learned | vs replay | avg final | meets the bar |")
    print("|---|---|---|---|---|---|---|---|")
    for k, beta, s, ok in rows:
        print(
            f"| {k} | {beta} | {s['forgetting_score']:.3f} | {s['forgetting_score'] - ref['forgetting_score']:+.3f} | "
            f"{s['learned_loss']:.3f} | {100 * (s['learned_loss'] / ref['learned_loss'] - 1):+.1f}% | {s['avg_final_loss']:.3f} | {'yes' if ok else 'no'} |"
        )


if __name__ == "__main__":
    main()
