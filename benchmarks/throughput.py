"""Training throughput: cpt's own loop vs a plain Hugging Face `Trainer`, same model, same data.

Both sides train the same `cpt.model.build_model(PRESET, ...)` Llama (same seed, so the same
initial weights) on the same token rows in the same order, fresh rows every step (rows of the
bundled English handbook, tokenized by cpt's own BPE), for the same number of steps, with AdamW
(β 0.9/0.95, ε 1e-8, weight decay 0.1), gradient clip 1.0 and a constant learning rate:

  cpt      `cpt.train` on a one-task config; tokens/s is the run's summary.json
           `tokens_per_second` (trained tokens / seconds inside training steps), i.e. cpt's own
           code path, whatever it currently does.
  Trainer  `transformers.Trainer` (optim adamw_torch, no eval, no saving, no workers,
           report_to=[], use_cpu). Two figures: `trainer_steps`, tokens / seconds between each
           step's on_step_begin and on_step_end callbacks (forward+backward+clip+optimizer;
           excludes its data loading, so it flatters the Trainer), and `trainer_runtime`, its own
           train_runtime metric (the whole train() call).

The ratio is cpt / trainer_steps. Every measurement runs in a fresh subprocess (so process-wide
settings one side makes, e.g. flush-denormal, cannot leak into the other), and the two sides
alternate order from repeat to repeat; the figures printed are the medians over repeats.

GFLOP/s is 6 · N · tokens/s with N = parameters that take part in the per-token matmuls =
non-embedding parameters + the lm_head (for tied embeddings: every parameter once); attention's
score/value matmuls (12 · layers · hidden · seq_len per token) are left out.

    python benchmarks/throughput.py                      # demo model, 60 steps, 3 repeats
    python benchmarks/throughput.py --steps 30 --repeats 1
    python benchmarks/throughput.py --set training.compile=true   # a cpt config override
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

TARGET_RATIO = 1.2
BUNDLED_TEXT = ROOT / "cpt" / "corpus" / "handbook" / "en.txt.xz"
LR = 1e-3
SEED = 0


def _text_path(args, work: Path) -> Path:
    if args.text:
        return Path(args.text)
    if BUNDLED_TEXT.is_file():
        return BUNDLED_TEXT
    licenses = sorted(Path("/usr/share/common-licenses").glob("*"))  # any real English text
    out = work / "text.txt"
    out.write_text("\n\n".join(p.read_text(errors="ignore") for p in licenses if p.is_file()))
    return out


def _config_yaml(args, text: Path) -> str:
    tokens = args.steps * args.batch_size * args.seq_len
    return (
        "tasks:\n"
        f"  - {{name: a, path: {json.dumps(str(text))}, tokens: {tokens}}}\n"
        f"tokenizer: {{vocab_size: {args.vocab_size}}}\n"
        f"model: {{preset: {args.preset}}}\n"
        f"training: {{seq_len: {args.seq_len}, batch_size: {args.batch_size}, lr: {LR}, eval_tokens: 4096, device: cpu}}\n"
        "optimizer: {beta1: 0.9, beta2: 0.95, eps: 1.0e-8, weight_decay: 0.1, clip: 1.0}\n"
        "schedule: {name: constant, warmup: 0}\n"
        "logging: {progress: false, log_every: 10}\n"
        "checkpoint: {task_ends: false}\n"
        f"seed: {SEED}\n"
    )


# ---------------------------------------------------------------- workers (one subprocess each)
def worker_cpt(args, work: Path) -> dict:
    import cpt

    train = cpt.train  # the public API
    out = work / f"cpt-run-{os.getpid()}"
    summary = train(str(work / "run.yaml"), out, overrides=args.set or None, overwrite=True)
    windows = [r["tokens_per_second"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    return {
        "tokens_per_second": summary["tokens_per_second"],
        "seconds": summary["train_seconds"],
        "steps": summary["steps"],
        "best_window": max(windows),
        "final_loss": summary["loss_matrix"][-1][0],
        "run_dir": str(out),
    }


def _rows_like_cpt(args, work: Path):
    """The exact rows cpt trains on: its tokenizer and token cache, and its TaskStream(seed, task 0)."""
    from cpt.data.streams import TaskStream
    from cpt.data.tokenizer import load_tokenizer
    from cpt.data.tokens import prepare_task

    tok = load_tokenizer(Path(args.tokenizer_dir))
    task = prepare_task("a", _text_path(args, work), tok, Path(os.environ["CPT_CACHE"]), log=lambda m: None)
    stream = TaskStream(task.train, args.seq_len, SEED, 0)
    return tok, [stream.next_rows(args.batch_size) for _ in range(args.steps)]


def worker_trainer(args, work: Path) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from cpt.model import build_model

    tok, batches = _rows_like_cpt(args, work)
    model = build_model(args.preset, tok.vocab_size, tok.eos_id, args.seq_len, SEED)

    class Rows(torch.utils.data.IterableDataset):  # in order, no sampler: the same batches per step as cpt
        def __iter__(self):
            for batch in batches:
                for row in torch.from_numpy(batch):
                    # labels only count the tokens (num_items_in_batch); the targets are shift_labels
                    yield {"input_ids": row[:-1], "labels": row[:-1], "shift_labels": row[1:]}

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.t0, self.steps, self.times = 0.0, None, 0, []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)
            self.seconds += self.times[-1]
            self.steps += 1

    targs = TrainingArguments(
        output_dir=str(work / f"trainer-{os.getpid()}"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=LR,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        warmup_steps=0,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=SEED,
    )
    timer = StepTimer()
    trainer = Trainer(model=model, args=targs, train_dataset=Rows(), callbacks=[timer])
    result = trainer.train()
    tokens = timer.steps * args.batch_size * args.seq_len
    step_tokens = args.batch_size * args.seq_len
    windows = [10 * step_tokens / sum(timer.times[i : i + 10]) for i in range(0, len(timer.times) - 9, 10)] or [tokens / timer.seconds]
    return {
        "tokens_per_second": tokens / timer.seconds,
        "best_window": max(windows),
        "seconds": timer.seconds,
        "steps": timer.steps,
        "runtime_tokens_per_second": tokens / result.metrics["train_runtime"],
        "final_train_loss": result.training_loss,
    }


def _flop_params(args, work: Path) -> int:
    """N for 6·N·tokens: non-embedding parameters + the lm_head (tied: counted once as the head)."""
    from cpt.model import build_model

    model = build_model(args.preset, args.vocab_size, 0, args.seq_len, SEED)
    unique = {id(p): p for p in model.parameters()}
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    n = sum(p.numel() for p in unique.values())
    if head is not emb:
        n -= emb.numel()  # untied: the input embedding is a lookup, not a matmul
    return n


def _spawn(role: str, args, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--_worker", role, "--_work", str(work)] + args.forward
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{role} worker failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1]
    )
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    ap.add_argument("--preset", default="demo", help="cpt model preset (default demo: 4 layers x 256)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary cpt trains (default 8192)")
    ap.add_argument("--repeats", type=int, default=3, help="cpt/Trainer pairs to run; medians are reported (default 3)")
    ap.add_argument("--text", help="training text (default: the bundled English handbook)")
    ap.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="a cpt config override for the cpt side, e.g. training.compile=true"
    )
    ap.add_argument("--skip-trainer", action="store_true", help="measure cpt only")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_work", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._worker:
        work = Path(args._work)
        result = worker_cpt(args, work) if args._worker == "cpt" else worker_trainer(args, work)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="cpt-throughput-") as tmp:
        work = Path(tmp)
        os.environ["CPT_CACHE"] = str(work / "cache")
        text = _text_path(args, work)
        (work / "run.yaml").write_text(_config_yaml(args, text))
        args.forward = [a for a in sys.argv[1:]]
        n_flop = _flop_params(args, work)
        import torch

        print(f"machine: {os.cpu_count()} CPU(s), torch {torch.__version__}, {torch.get_num_threads()} threads; text {text}")
        print(f"model: {args.preset}, seq_len {args.seq_len}, batch {args.batch_size}, {args.steps} steps; N = {n_flop:,} (6·N FLOP/token)")
        rows = []
        for r in range(args.repeats):
            order = ["cpt", "trainer"] if r % 2 == 0 else ["trainer", "cpt"]
            if args.skip_trainer:
                order = ["cpt"]
            got = {}
            for role in order:
                got[role] = _spawn(role, args, work)
                if role == "cpt" and not args.tokenizer_dir:  # the Trainer side reads cpt's tokenizer and token cache
                    args.tokenizer_dir = str(Path(got["cpt"]["run_dir"]) / "checkpoints" / "final")
                    args.forward += ["--tokenizer-dir", args.tokenizer_dir]
            row = {
                "cpt": got["cpt"]["tokens_per_second"],
                "cpt_best10": got["cpt"]["best_window"],
                "cpt_loss": got["cpt"]["final_loss"],
                "load": _load(),
            }
            if "trainer" in got:
                row.update(
                    trainer_steps=got["trainer"]["tokens_per_second"],
                    trainer_runtime=got["trainer"]["runtime_tokens_per_second"],
                    trainer_best10=got["trainer"]["best_window"],
                    trainer_loss=got["trainer"]["final_train_loss"],
                    ratio_best10=got["cpt"]["best_window"] / got["trainer"]["best_window"],
                    ratio=got["cpt"]["tokens_per_second"] / got["trainer"]["tokens_per_second"],
                )
            rows.append(row)
            line = f"repeat {r + 1}/{args.repeats}: cpt {row['cpt']:,.0f} tok/s"
            if "ratio" in row:
                line += f", Trainer {row['trainer_steps']:,.0f} tok/s (runtime {row['trainer_runtime']:,.0f}), ratio {row['ratio']:.2f}"
            print(line + f"  [load {row['load']}]", flush=True)

        def med(key):
            return statistics.median(r[key] for r in rows)

        print(f"\n{'median over repeats':60s}  tokens/s   GFLOP/s (6·N·tok/s)")
        result = {
            "machine_cpus": os.cpu_count(),
            "torch": torch.__version__,
            "preset": args.preset,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "repeats": args.repeats,
            "flop_params": n_flop,
            "overrides": args.set or [],
            "rows": rows,
        }
        label = "cpt" + (f" ({' '.join(args.set)})" if args.set else "")
        keys = [("cpt", f"{label}, summary"), ("cpt_best10", f"{label}, best 10-step window")]
        if not args.skip_trainer:
            keys += [
                ("trainer_steps", "HF Trainer, step callbacks"),
                ("trainer_best10", "HF Trainer, best 10-step window"),
                ("trainer_runtime", "HF Trainer, train_runtime"),
            ]
        for key, label in keys:
            result[key] = med(key)
            print(f"{label:60s} {med(key):9,.0f}   {6 * n_flop * med(key) / 1e9:7.1f}")
        if not args.skip_trainer:
            result["ratio"] = med("ratio")
            verdict = "meets" if med("ratio") >= TARGET_RATIO else "below"
            result["ratio_best10"] = med("ratio_best10")
            print(
                f"ratio cpt / Trainer: {med('ratio'):.2f} (median of per-repeat ratios of whole runs; target {TARGET_RATIO}: {verdict}); "
                f"best-window ratio {med('ratio_best10'):.2f}"
            )
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
