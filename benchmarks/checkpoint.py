"""Resumable-checkpoint cost on 2 ranks: write time, what training waited, resume time and bytes per rank.

For each of DDP and FSDP2 (2 gloo ranks on CPU under torchrun, or NCCL on 2 GPUs with `--device cuda`) and
each of synchronous and `checkpoint.async: true` saves, this trains a short two-task run of a preset (default
`paper-99m`, seq 128, batch 1, Reptile on so the anchor is saved, replay on) that checkpoints every
`--every` steps, then cuts it after its next-to-last checkpoint and resumes it, and prints:

    write s     median seconds from the start of a save to the rename into place (summary.json
                `checkpoints.write_seconds`): what a preemption needs, the figure to size the grace period from
    held up s   median seconds training stood still for it (`checkpoints.blocking_seconds`: the whole write when
                synchronous; the copy to host memory plus any wait for the previous write with checkpoint.async)
    step s      mean seconds per optimizer step (summary.json `train_seconds` / steps): a background write
                competes with training for the CPU / host memory bandwidth
    MiB / rank  bytes each rank wrote into the last checkpoint (its manifest's `bytes`), and the total
    resume s    the resumed run's "checkpoint verified and read in" figure (rank 0): every rank hashes its own
                files, memory-maps state.pt and its rank file, then the model / optimizer / hooks are loaded
    read MiB    per rank, the sizes of the distinct files of the resumed checkpoint the rank opened for reading
                (recorded by an audit hook, `sitecustomize.py` on the children's PYTHONPATH), other ranks' files
                apart: an upper bound of what it read (state.pt is memory-mapped, DCP reads only the chunks it needs)
    others'     files written by another rank that a rank opened: under FSDP2, DCP reads an entry stored once for
                all ranks (the optimizer's step counts) from the rank that stored it

The earlier layout made every rank hash every file of the checkpoint (the total column) and gathered every
rank's state to every rank. Runs go to `--out` (default: a temporary directory, deleted after).

    python benchmarks/checkpoint.py                              # paper-99m, DDP + FSDP2, sync + async: ~5 min on 2 CPU cores
    python benchmarks/checkpoint.py --preset tiny --steps 4      # seconds: checks the script
    python benchmarks/checkpoint.py --json ckpt.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
HANDBOOK = ROOT / "cpt" / "corpus" / "handbook"

from cpt.training.checkpoint import owner_of  # noqa: E402

SITECUSTOMIZE = r"""
import os, sys
if "RANK" in os.environ and os.environ.get("CPT_BENCH_OPEN_LOG"):
    _fh = open(os.path.join(os.environ["CPT_BENCH_OPEN_LOG"], f"rank-{os.environ['RANK']}.txt"), "a", buffering=1)
    def _hook(event, args):
        if event == "open" and isinstance(args[0], str) and "/checkpoints/step-" in args[0]:
            mode, flags = args[1], args[2]
            write = any(c in mode for c in "wax+") if mode is not None else bool(flags & (os.O_WRONLY | os.O_RDWR))
            if not write:
                _fh.write(args[0] + "\n")
    sys.addaudithook(_hook)
"""


def config(args, parallel: str, asynchronous: bool) -> dict:
    world = 2
    tokens = args.steps // 2 * args.batch_size * args.seq_len * world  # per task: half the steps each
    return {
        "seed": 0,
        "tokenizer": {"path": str(HANDBOOK / "tokenizer.json")},
        "tasks": [
            {"name": "en", "path": str(HANDBOOK / "en.txt.xz"), "tokens": tokens},
            {"name": "fr", "path": str(HANDBOOK / "fr.txt.xz"), "tokens": tokens},
        ],
        "model": {"preset": args.preset},
        "training": {
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "eval_tokens": args.seq_len,
            "eval_batch_size": 1,
            "device": args.device,
            "parallel": parallel,
        },
        "replay": {"rate": 0.5},
        "alignment": {"method": "reptile", "k": 2, "beta": 0.7},
        "schedule": {"name": "constant"},
        "checkpoint": {"every": args.every, "keep": 2, "task_ends": False, "async": asynchronous},
        "logging": {"progress": False, "log_every": 1},
    }


def torchrun(args, work: Path, *cli: str, open_log: Path | None = None) -> tuple[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": os.pathsep.join([str(work / "site"), str(ROOT)])}
    if open_log is not None:
        open_log.mkdir(parents=True, exist_ok=True)
        env["CPT_BENCH_OPEN_LOG"] = str(open_log)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cpt", "train", *cli]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"benchmark: {' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return proc.stderr, time.perf_counter() - t0


def measure(args, work: Path, parallel: str, asynchronous: bool) -> dict:
    name = f"{parallel}-{'async' if asynchronous else 'sync'}"
    run, cfg_file = work / name, work / f"{name}.yaml"
    cfg_file.write_text(yaml.safe_dump(config(args, parallel, asynchronous)))
    _, wall = torchrun(args, work, str(cfg_file), "--out", str(run))
    s = json.loads((run / "summary.json").read_text())
    c = s["checkpoints"]
    steps = sorted((run / "checkpoints").glob("step-*"))
    manifest = json.loads((steps[-1] / "manifest.json").read_text())
    # an interruption after the next-to-last checkpoint, then the resume
    resumed_from = steps[-2]
    shutil.rmtree(steps[-1])
    (run / "summary.json").unlink()
    total_bytes = sum(p.stat().st_size for p in resumed_from.rglob("*") if p.is_file())
    err, resume_wall = torchrun(args, work, "--resume", str(run), open_log=work / f"{name}-opened")
    m = re.search(r"resumed at step \d+/\d+ \(checkpoint verified and read in ([\d.]+)s\)", err)
    read, foreign = {}, {}
    for rank in (0, 1):
        opened = set((work / f"{name}-opened" / f"rank-{rank}.txt").read_text().split())
        names = sorted(p[len(str(resumed_from)) + 1 :] for p in opened if p.startswith(str(resumed_from) + "/"))
        names = [n for n in names if (resumed_from / n).is_file()]
        shared = {"state.pt", "manifest.json", "dcp/.metadata"}
        read[rank] = sum((resumed_from / n).stat().st_size for n in names if n in shared or owner_of(n) == rank)
        foreign[rank] = [n for n in names if n not in shared and owner_of(n) != rank]
    resumed = json.loads((run / "summary.json").read_text())
    result = {
        "name": name,
        "parallel": parallel,
        "async": asynchronous,
        "checkpoints": c["written"],
        "write_seconds_median": c["write_seconds"]["median"],
        "write_seconds_max": c["write_seconds"]["max"],
        "held_up_seconds_median": c["blocking_seconds"]["median"],
        "step_seconds": s["train_seconds"] / s["steps"],
        "bytes_per_rank": manifest["bytes"],
        "bytes_total": sum(manifest["bytes"]),
        "resume_seconds": float(m.group(1)) if m else None,
        "resume_read_bytes": [read[0], read[1]],
        "resume_opened_other_ranks_files": [foreign[0], foreign[1]],
        "resumed_checkpoint_bytes": total_bytes,
        "resumed_same_loss_matrix": resumed["loss_matrix"] == s["loss_matrix"],
        "run_wall_seconds": wall,
        "resume_wall_seconds": resume_wall,
    }
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    return result


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def table(results: list[dict]) -> str:
    head = (
        "| run | checkpoints | write s (median / max) | held up s | step s | MiB / rank (total) | resume s "
        "| read MiB / rank (checkpoint) | others' files opened | resume exact |"
    )
    rows = [head, "|" + "---|" * 10]
    for r in results:
        rows.append(
            f"| {r['name']} | {r['checkpoints']} | {r['write_seconds_median']:.2f} / {r['write_seconds_max']:.2f} "
            f"| {r['held_up_seconds_median']:.2f} | {r['step_seconds']:.2f} "
            f"| {' + '.join(mib(b) for b in r['bytes_per_rank'])} ({mib(r['bytes_total'])}) "
            f"| {r['resume_seconds'] if r['resume_seconds'] is not None else '?'} "
            f"| {' / '.join(mib(b) for b in r['resume_read_bytes'])} ({mib(r['resumed_checkpoint_bytes'])}) "
            f"| {'; '.join(f'rank {i}: ' + ', '.join(f) for i, f in enumerate(r['resume_opened_other_ranks_files']) if f) or 'none'} "
            f"| {'yes' if r['resumed_same_loss_matrix'] else 'NO'} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper-99m")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps of a run (two tasks of half each)")
    ap.add_argument("--every", type=int, default=2, help="checkpoint.every")
    ap.add_argument("--parallel", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    ap.add_argument("--out", help="keep the work directory (runs with --keep) here")
    ap.add_argument("--keep", action="store_true", help="keep each run directory")
    ap.add_argument("--json", help="write every figure to this file")
    args = ap.parse_args(argv)
    if args.steps < 2 * args.every:
        ap.error("--steps must allow two checkpoints (>= 2 x --every)")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cpt-ckpt-bench-"))
    (work / "site").mkdir(parents=True, exist_ok=True)
    (work / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    results = []
    t0 = time.perf_counter()
    try:
        for parallel in args.parallel:
            for asynchronous in (False, True):
                r = measure(args, work, parallel, asynchronous)
                results.append(r)
                print(
                    f"[{len(results)}/{2 * len(args.parallel)}] {r['name']}: write {r['write_seconds_median']:.2f}s, "
                    f"held up {r['held_up_seconds_median']:.2f}s, resume {r['resume_seconds']}s "
                    f"({r['run_wall_seconds']:.0f}s + {r['resume_wall_seconds']:.0f}s wall)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{args.preset}, 2 ranks on {args.device}, seq {args.seq_len} x batch {args.batch_size}, {args.steps} steps, "
        f"checkpoint every {args.every}; {time.perf_counter() - t0:.0f}s in all\n"
    )
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0 if all(r["resumed_same_loss_matrix"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
