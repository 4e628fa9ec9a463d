"""Sweep Reptile's k and β on the bundled 5-language default, against replay alone.

Every point is a normal cpt run of the demo config (`cpt.demo.demo_config("mer")`) with
`alignment.k` and `alignment.beta` overridden; the reference is the demo's `replay` run (same
replay rate, no Reptile). Prints a Markdown table: forgetting, learned and average final loss,
and whether the point meets the bar for a default (less forgetting than replay, learned loss
within 2% of replay's). Finished runs are re-used, so the sweep can be stopped and restarted.

    python benchmarks/sweep_alignment.py --out runs/sweep-alignment [--quick] [--k 5,20,50] [--beta 0.25,0.5,0.75] [--seeds 3]

With `--seeds N` every point and the reference run at seeds 0..N−1, the table shows means, and the claims
"MER (k, β) forgets less than replay" / "ends lower" are judged on the per-seed differences (95% intervals,
`cpt.report.seeds`): one seed ranks the points by noise as much as by k and β (README, docs/alignment.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpt.config import validate  # noqa: E402
from cpt.demo import demo_config  # noqa: E402
from cpt.report.render import to_markdown  # noqa: E402
from cpt.report.seeds import report_blocks  # noqa: E402
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
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 of every point and of the reference (names get -seed<k>)")
    args = ap.parse_args()
    if args.seeds < 1:
        raise SystemExit("--seeds: at least 1")

    everything: list[dict] = []  # every summary with its config, for the seed statistics

    def seeded(cfg: dict, name: str) -> list[dict]:
        """The runs of one point at every seed (one seed: the earlier layout, seed 0, no suffix)."""
        if args.seeds == 1:
            return [run(cfg, args.out / name)]
        out = []
        for k in range(args.seeds):
            c = dict(cfg, seed=k, name=f"{name}-seed{k}")
            out.append(run(c, args.out / c["name"]))
            everything.append({**out[-1], "config": validate(c).model_dump(mode="json")})
        return out

    def mean(runs: list[dict], key: str) -> float:
        return sum(r[key] for r in runs) / len(runs)

    ref_cfg = demo_config("replay", args.quick)
    ref_cfg["training"]["eval_every"] = 0  # only task ends: the sweep needs the matrix, not curves
    refs = seeded(ref_cfg, "replay")
    rows = []
    for k in (int(x) for x in args.k.split(",")):
        for beta in (float(x) for x in args.beta.split(",")):
            cfg = demo_config("mer", args.quick)
            cfg["training"]["eval_every"] = 0
            cfg["alignment"] = {"method": "reptile", "k": k, "beta": beta}
            runs = seeded(cfg, f"mer-k{k}-b{beta}")
            f, learned = mean(runs, "forgetting_score"), mean(runs, "learned_loss")
            ok = f < mean(refs, "forgetting_score") and learned <= 1.02 * mean(refs, "learned_loss")
            rows.append((k, beta, runs, ok))
            print(f"k={k} beta={beta}: forgetting {f:.3f} learned {learned:.3f}", file=sys.stderr, flush=True)
    over = "" if args.seeds == 1 else f" (means over seeds 0..{args.seeds - 1})"
    print(
        f"reference replay (rate {ref_cfg['replay']['rate']}){over}: forgetting {mean(refs, 'forgetting_score'):.3f}, "
        f"learned {mean(refs, 'learned_loss'):.3f}, avg final {mean(refs, 'avg_final_loss'):.3f}\n"
    )
    print("| k | β | forgetting | vs replay | learned | vs replay | avg final | meets the bar |")
    print("|---|---|---|---|---|---|---|---|")
    ref_f, ref_l = mean(refs, "forgetting_score"), mean(refs, "learned_loss")
    for k, beta, runs, ok in rows:
        f, learned = mean(runs, "forgetting_score"), mean(runs, "learned_loss")
        print(
            f"| {k} | {beta} | {f:.3f} | {f - ref_f:+.3f} | {learned:.3f} | {100 * (learned / ref_l - 1):+.1f}% | "
            f"{mean(runs, 'avg_final_loss'):.3f} | {'yes' if ok else 'no'} |"
        )
    if args.seeds > 1:  # which of those differences are more than seed noise (cpt.report.seeds, as `cpt report` judges them)
        blocks = report_blocks(everything)
        print("\n" + "\n".join(to_markdown("", blocks).splitlines()[2:]).rstrip())


if __name__ == "__main__":
    main()
