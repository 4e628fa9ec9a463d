"""GPU throughput and MFU of cpt's training step: plain, replay, Reptile, and replay + Reptile.

For each model preset (default: the paper's 99M, 560M and 1B shapes; `paper-3b` on request) at
seq 2048 this trains four variants of the same one-task run on one device and prints steady-state
tokens/s, MFU, and each variant's step-time overhead over plain training:

    plain            no replay, no Reptile
    replay           α = 0.25 of every batch drawn from the replay buffer
    reptile          Reptile meta-updates, β = 0.7, every k steps
    replay+reptile   both: the paper's efficient MER

Targets: replay + Reptile within 2% of plain, and MFU ≥ 45% for paper-1b at seq 2048 on one H200.

    python benchmarks/gpu.py                                   # the default set (one H200: ~3-5 min, estimated)
    python benchmarks/gpu.py --presets paper-1b --compile --json gpu.json
    python benchmarks/gpu.py --smoke                           # tiny preset on CPU, seconds (CI)

How it measures (why these choices):

- **cpt's own code path.** Every variant is `cpt.train()` on a config built here: the same loop,
  batch source, fused loss, fused AdamW, bf16 autocast (`training.precision: auto`), SDPA and
  Reptile hooks a user's run executes. Nothing is re-implemented or patched.
- **Per-step times from `metrics.jsonl`.** The runs log a train line every step
  (`logging.log_every: 1`); the loop times each `_train_step` call (`time.perf_counter()` around
  it, evaluation excluded) and writes `tokens_per_second` = the step's tokens / that time, so a
  line gives one step's seconds exactly (tokens per step are fixed: replay replaces rows, it never
  adds them). Every step ends synchronised with the GPU up to its queued optimizer update (the
  loop reads each micro-batch's loss on the host for the NaN/Inf check), so the sum of a window
  of consecutive step times is the window's wall time up to one optimizer update's asynchronous
  tail and the microseconds between steps (writing the line).
- **Steady state.** `--warmup` steps are run and discarded (CUDA context, cuBLAS heuristics,
  allocator growth, `torch.compile` on its first step); the next `--steps` steps are the
  measurement: tokens/s = timed tokens / Σ step times. A warning is printed when the two halves
  of the timed window differ by more than 5% (not steady yet: raise `--warmup`).
- **Reptile in proportion.** With k = `--k` and fewer timed steps than k, the window would hold one
  meta-update or none; so Reptile variants use k = min(--k, timed steps) and the timed steps are
  rounded down to a multiple of k: every window holds exactly steps / k meta-updates (checked
  from the `meta_update` lines). Where k had to shrink, the measured overhead is an upper bound
  for the larger k (more meta-updates per step than asked for).
- **Replay from the first timed step.** A short run of the `tiny` preset on the French handbook
  fills a replay buffer (`replay.buffer.dir`) first; each replay variant starts from a copy of it
  (`replay.buffer.init`), so its one task (English) replays α of every batch from step 0 — the
  documented way to continue a sequence with a kept buffer. A single task means no task switch inside the measurement.
- **One process per variant, stopped after the window.** Each variant runs in a child process
  (forked when CUDA is not initialised here, so no re-import; else spawned); once the train line
  of the last timed step is written the child is killed. Its task budget is a few steps longer
  than warm-up + timed steps, and what the loop would do after it — the task-end evaluation and
  the resumable + HF checkpoints (for paper-1b ~16 GB of model, Adam state and anchor per variant)
  — is not part of what is measured, so it is not waited for. Each child frees the GPU before the
  next one starts. Child output goes to `OUT/logs/<preset>-<variant>.log`.
- **Data.** The bundled handbook (`cpt/corpus/handbook/*.txt.xz`) and its committed 8k BPE. A task
  stream loops over its windows epoch after epoch (`cpt/data/streams.py`), so a token budget larger
  than the text simply repeats it; what the data must hold is one micro-batch of windows:
  English has 236,623 training tokens = 115 windows of 2048 (so `--batch-size` ≤ 115 at seq 2048).
- **MFU** = `cpt.flops.flops_per_token(shape, seq_len)` × tokens/s ÷ peak (`cpt.flops.mfu`; PaLM's
  convention: 6·N + 12·L·T·d_attn, see the docstring of `cpt/flops.py`), counted over every trained
  token, new and replayed. Peak: `cpt.flops.peak_flops_of(torch.cuda.get_device_name())` (dense
  bf16), or `--peak-tflops`. On CPU there is no peak: a nominal 1 TFLOP/s is used (labelled so)
  unless `--peak-tflops` is given; such an MFU only shows the script works.

Default batch and timed steps per preset: paper-99m 16 × 50, paper-560m 8 × 40, paper-1b 8 × 25,
paper-3b 4 × 10; 5 warm-up steps (10 with --compile). Sized so the default set should take ~3-5
minutes on one H200 including model set-up (an estimate from the FLOP counts at 20-40% MFU plus
~10 s of set-up per variant; no GPU was available when this was written, so it is not measured). Exit status: 0 when every
variant was measured, 1 when one failed, 2 for a usage error (e.g. --device cuda without CUDA).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Where torch would otherwise call cudaGetDeviceCount (torch.cuda.is_available, e.g. from a library
# import), ask NVML instead: the driver stays uninitialised in this process, so children can fork.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

HANDBOOK = ROOT / "cpt" / "corpus" / "handbook"
TIMED_TASK = "en"  # the largest text: 115 windows of 2048 tokens
PREFILL_TASK = "fr"
PREFILL_ROWS = 32  # sequences put in the replay buffer before the timed runs
BUDGET_MARGIN_STEPS = 20  # the task budget exceeds warm-up + timed steps by this much (the child is killed first)

REPLAY_RATE = 0.25
REPTILE_BETA = 0.7
VARIANTS = ("plain", "replay", "reptile", "replay+reptile")

MFU_TARGET = 0.45
MFU_TARGET_PRESET = "paper-1b"
MFU_TARGET_SEQ = 2048
MFU_TARGET_DEVICE = "H200"
OVERHEAD_TARGET_PCT = 2.0
NOMINAL_CPU_PEAK = 1e12
STEADY_TOLERANCE = 0.05
MARKER = ".cpt-gpu-bench"

DEFAULT_PRESETS = "paper-99m,paper-560m,paper-1b"
# preset -> (batch size, timed steps) at seq 2048 on one H200; see the module docstring
PRESET_DEFAULTS = {
    "tiny": (4, 3),
    "demo": (8, 20),
    "paper-99m": (16, 50),
    "paper-560m": (8, 40),
    "paper-1b": (8, 25),
    "paper-3b": (4, 10),
}


class BenchError(Exception):
    """A usage or environment problem: one line, exit status 2."""


@dataclass
class Plan:
    preset: str
    batch_size: int
    grad_accum: int
    seq_len: int
    warmup: int
    steps: int  # timed steps (a multiple of k)
    k: int  # Reptile's k for this preset
    params: int
    flops_per_token: int
    shape: object  # cpt.flops.Shape

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


@dataclass
class Result:
    preset: str
    variant: str
    status: str  # "ok" or why not
    batch_size: int
    grad_accum: int
    seq_len: int
    warmup: int
    steps: int
    k: int | None
    tokens_per_step: int
    params: int
    flops_per_token: int
    step_ms_mean: float | None = None
    step_ms_median: float | None = None
    step_ms_min: float | None = None
    step_ms_max: float | None = None
    first_step_s: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    overhead_pct: float | None = None  # step time vs plain, same preset
    meta_updates_in_window: int = 0
    replay_wait_ms_per_step: float | None = None
    halves_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    log: str = ""


# ---------------------------------------------------------------- child processes
def _quiet_child(log_path: str | None) -> None:
    """Own process group (so it and anything it starts can be killed together); output to the log."""
    try:
        os.setpgrp()
    except OSError:
        pass
    try:  # Linux: die with the parent, so a killed benchmark never leaves a run holding the GPU
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills the group
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)


def _child_probe(device: str, conn) -> None:
    _quiet_child(None)
    import torch

    info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "available": False, "name": None, "count": 0}
    if device == "cuda":
        info["available"] = bool(torch.cuda.is_available())
        if info["available"]:
            info["count"] = torch.cuda.device_count()
            info["name"] = torch.cuda.get_device_name(0)
    else:
        import platform

        info["available"] = True
        info["name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    conn.send(info)
    conn.close()


def _child_train(cfg: dict, run_dir: str, log_path: str, threads: int | None) -> None:
    _quiet_child(log_path)
    import torch

    from cpt.config import validate
    from cpt.errors import CptError
    from cpt.training.device import ensure_threads
    from cpt.training.launch import train

    if threads:
        torch.set_num_threads(threads)
    else:
        ensure_threads()  # as `cpt train` does
    try:
        train(validate(cfg, cfg.get("name") or "benchmark"), run_dir)
    except CptError as err:
        print(f"cpt: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)


def _context(method: str = "auto"):
    """fork (cheap: torch and cpt are already imported) unless this process initialised CUDA; else spawn."""
    import torch

    if method == "auto":
        method = "fork" if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized() else "spawn"
    return mp.get_context(method)


def _kill(proc) -> None:
    if proc.pid is None or proc.exitcode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        proc.kill()
    proc.join()


class _Tail:
    """Complete JSON lines appended to a file since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        return [json.loads(x) for x in lines if x.strip()]


def run_until(
    ctx, cfg: dict, run_dir: Path, log_path: Path, last_step: int, timeout: float, threads: int | None = None
) -> tuple[list[dict], str, float]:
    """Train `cfg` in a child until the train line of `last_step` is written; (metrics lines, status, wall s)."""
    sys.stdout.flush()
    sys.stderr.flush()
    # not a daemon: torch.compile may start worker processes of its own, which daemons cannot
    proc = ctx.Process(target=_child_train, args=(cfg, str(run_dir), str(log_path), threads))
    t0 = time.perf_counter()
    proc.start()
    tail = _Tail(run_dir / "metrics.jsonl")
    lines: list[dict] = []
    status = "ok"
    try:
        while True:
            lines += tail.read()
            if any(x["type"] == "train" and x["step"] >= last_step for x in lines):
                break
            if proc.exitcode is not None:
                lines += tail.read()
                if not any(x["type"] == "train" and x["step"] >= last_step for x in lines):
                    status = f"ended (exit status {proc.exitcode}) before the train line of step {last_step}"
                break
            if time.perf_counter() - t0 > timeout:
                status = f"timed out after {timeout:g}s"
                break
            time.sleep(0.05)
    finally:
        _kill(proc)
    return lines, status, time.perf_counter() - t0


def _log_tail(path: Path, n: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + x for x in text[-n:])


# ---------------------------------------------------------------- configs
def base_config(name: str, preset: str, task: str, tokens: int, plan: Plan, device: str, compile_: bool, checkpointing: bool) -> dict:
    from cpt.model import PRESETS

    training = {
        "seq_len": plan.seq_len,
        "batch_size": plan.batch_size,
        "grad_accum": plan.grad_accum,
        "lr": PRESETS[preset].peak_lr,
        "device": device,
        "compile": compile_,
        "eval_tokens": plan.seq_len,  # the loop evaluates once at step 0: keep it to one window
        "eval_batch_size": 1,
    }
    if checkpointing:
        training["activation_checkpointing"] = True
    return {
        "name": name,
        "seed": 0,
        "tokenizer": {"path": str(HANDBOOK / "tokenizer.json")},
        "tasks": [{"name": task, "path": str(HANDBOOK / f"{task}.txt.xz"), "tokens": tokens}],
        "model": {"preset": preset},
        "training": training,
        "schedule": {"name": "constant", "warmup": 0},
        "checkpoint": {"task_ends": False},
        "logging": {"progress": False, "log_every": 1},
    }


def variant_config(variant: str, plan: Plan, device: str, compile_: bool, checkpointing: bool, buffer_src: Path | None) -> dict:
    total = plan.warmup + plan.steps + BUDGET_MARGIN_STEPS
    cfg = base_config(
        f"{plan.preset}-{variant}", plan.preset, TIMED_TASK, total * plan.tokens_per_step, plan, device, compile_, checkpointing
    )
    if "replay" in variant:
        cfg["replay"] = {"rate": REPLAY_RATE, "buffer": {"init": str(buffer_src)}}
    if "reptile" in variant:
        cfg["alignment"] = {"method": "reptile", "k": plan.k, "beta": REPTILE_BETA}
    return cfg


def prefill_config(seq_len: int, device: str, buffer_dir: Path) -> dict:
    plan = Plan("tiny", 8, 1, seq_len, 0, 0, 1, 0, 0, None)
    cfg = base_config("replay-prefill", "tiny", PREFILL_TASK, PREFILL_ROWS * seq_len, plan, device, False, False)
    cfg["replay"] = {"rate": REPLAY_RATE, "buffer": {"dir": str(buffer_dir)}}
    cfg["logging"]["log_every"] = 10
    return cfg


# ---------------------------------------------------------------- measurement
def steady_state(lines: list[dict], plan: Plan, variant: str, res: Result) -> None:
    """Fill `res` from the train / meta_update lines of the timed window (warmup, warmup + steps]."""
    lo, hi = plan.warmup, plan.warmup + plan.steps
    train = {x["step"]: x for x in lines if x["type"] == "train"}
    window = [train.get(s) for s in range(lo + 1, hi + 1)]
    if any(x is None for x in window) or lo not in train:
        res.status = "metrics.jsonl lacks train lines of the timed window (is logging.log_every 1?)"
        return
    if any(x["tokens_per_second"] <= 0 for x in window):
        res.status = "a timed step trained no tokens (NaN/Inf loss skipped?)"
        return
    secs = [plan.tokens_per_step / x["tokens_per_second"] for x in window]
    total = sum(secs)
    res.step_ms_mean = 1e3 * total / len(secs)
    res.step_ms_median = 1e3 * statistics.median(secs)
    res.step_ms_min, res.step_ms_max = 1e3 * min(secs), 1e3 * max(secs)
    half = len(secs) // 2
    if half:
        res.halves_ms = [1e3 * sum(secs[:half]) / half, 1e3 * sum(secs[half:]) / (len(secs) - half)]
    if 1 in train and train[1]["tokens_per_second"] > 0:
        res.first_step_s = plan.tokens_per_step / train[1]["tokens_per_second"]
    res.tokens_per_second = plan.steps * plan.tokens_per_step / total
    res.meta_updates_in_window = sum(1 for x in lines if x["type"] == "meta_update" and lo < x["step"] <= hi)
    res.replay_wait_ms_per_step = 1e3 * (window[-1]["replay_wait_seconds"] - train[lo]["replay_wait_seconds"]) / plan.steps
    if "reptile" in variant and res.meta_updates_in_window != plan.steps // plan.k:
        res.status = f"expected {plan.steps // plan.k} meta-update(s) in the timed window, saw {res.meta_updates_in_window}"


def make_plan(preset: str, args, vocab: int, eos: int) -> Plan:
    import torch

    from cpt.flops import flops_per_token, shape_of
    from cpt.model import build_model, count_parameters

    batch, steps = PRESET_DEFAULTS.get(preset, (8, 20))
    batch = args.batch_size or batch
    steps = args.steps or steps
    k = min(args.k, steps)
    steps = (steps // k) * k  # whole Reptile periods, so meta-updates are counted in proportion
    with torch.device("meta"):  # the exact model cpt builds, without memory or init time
        model = build_model(preset, vocab, eos, args.seq_len, seed=0)
    shape = shape_of(model)
    fpt = flops_per_token(shape, args.seq_len)
    return Plan(preset, batch, args.grad_accum, args.seq_len, args.warmup, steps, k, count_parameters(model), fpt, shape)


def fmt_int(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def fmt_pct(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.2f}%" if sign else f"{x:.1f}%"


def table(results: list[Result], peak_note: str) -> str:
    rows = [
        f"| preset | variant | batch × seq | warm-up + timed steps | ms/step (median) | tokens/s | MFU{peak_note} | step time vs plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ms = "—" if r.step_ms_mean is None else f"{r.step_ms_mean:.1f} ({r.step_ms_median:.1f})"
        acc = f" × {r.grad_accum}" if r.grad_accum > 1 else ""
        k = f", k = {r.k}" if r.k else ""
        name = r.variant + k + ("" if r.status == "ok" else f" — {r.status}")
        mfu = None if r.mfu is None else 100 * r.mfu
        vs = "—" if r.variant == "plain" else fmt_pct(r.overhead_pct, sign=True)
        rows.append(
            f"| {r.preset} | {name} | {r.batch_size}{acc} × {r.seq_len} | {r.warmup} + {r.steps} | {ms} | {fmt_int(r.tokens_per_second)} | {fmt_pct(mfu)} | {vs} |"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=None, help=f"comma-separated model presets (default {DEFAULT_PRESETS}; paper-3b optional)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch, all presets (default: per preset, see above)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant, all presets (default: per preset)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 10 with --compile)")
    ap.add_argument("--k", type=int, default=50, help="Reptile k (capped at the timed steps, see above; default 50)")
    ap.add_argument("--compile", action="store_true", help="training.compile: true")
    ap.add_argument("--activation-checkpointing", action="store_true", help="training.activation_checkpointing: true")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default cuda; cpu only for a smoke run")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for MFU (default: from the device name)")
    ap.add_argument("--out", default=None, help="work directory (default: a new temporary one)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed per variant (default 300)")
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads per training process (default: every core, as cpt train; --smoke: 1)"
    )
    ap.add_argument(
        "--start-method",
        choices=("auto", "fork", "spawn"),
        default="auto",
        help="how children start (default: fork unless CUDA is initialised)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny preset, seq 128, CPU, 3 + 3 steps: checks the script works")
    args = ap.parse_args(argv)
    if args.smoke:
        args.presets = args.presets or "tiny"
        args.seq_len = args.seq_len or 128
        args.device = args.device or "cpu"
        args.warmup = args.warmup or 3
        args.steps = args.steps or 3
        args.threads = args.threads or 1  # a smoke run must not compete for a shared CI machine's cores
    args.presets = args.presets or DEFAULT_PRESETS
    args.seq_len = args.seq_len or 2048
    args.device = args.device or "cuda"
    args.warmup = args.warmup if args.warmup is not None else (10 if args.compile else 5)
    for name in ("seq_len", "grad_accum", "k", "warmup"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("batch_size", "steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def prepare_out(out: str | None) -> Path:
    if out is None:
        work = Path(tempfile.mkdtemp(prefix="cpt-gpu-bench-"))
    else:
        work = Path(out)
        if work.exists() and any(work.iterdir()) and not (work / MARKER).is_file():
            raise BenchError(f"--out {work}: exists and holds other files; give an empty or new directory")
        for sub in ("runs", "logs", "prefill"):
            shutil.rmtree(work / sub, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("work directory of benchmarks/gpu.py; its runs/, logs/ and prefill/ are replaced on the next run\n")
    return work


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except BenchError as err:
        print(f"benchmarks/gpu.py: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchmarks/gpu.py: interrupted", file=sys.stderr)
        return 130


def _main(args) -> int:
    os.environ.setdefault("CPT_CACHE", str(Path(tempfile.gettempdir()) / "cpt-bench-cache"))
    from cpt.config import TrainingConfig
    from cpt.data.tokenizer import load_tokenizer
    from cpt.flops import mfu, peak_flops_of
    from cpt.model import PRESETS

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise BenchError(f"--presets: unknown {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise BenchError(f"--variants: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    variants = [v for v in VARIANTS if v in variants]
    if args.activation_checkpointing and "activation_checkpointing" not in TrainingConfig.model_fields:
        raise BenchError("--activation-checkpointing: this cpt has no training.activation_checkpointing setting")

    tok = load_tokenizer(HANDBOOK / "tokenizer.json")
    plans = [make_plan(p, args, tok.vocab_size, tok.eos_id) for p in presets]

    # the device, asked in a child so this process never initialises CUDA (children can then fork)
    ctx = _context(args.start_method)
    parent, child = ctx.Pipe(duplex=False)
    sys.stdout.flush()
    probe = ctx.Process(target=_child_probe, args=(args.device, child), daemon=True)
    probe.start()
    child.close()  # ours; so a probe that dies unanswered reads as end-of-file, not a 120 s wait
    try:
        info = parent.recv() if parent.poll(120) else None
    except EOFError:
        info = None
    probe.join(10)
    if info is None:
        raise BenchError("could not query the device (the probe process did not answer)")
    if not info["available"]:
        build = f"built with CUDA {info['cuda_build']}" if info["cuda_build"] else "a CPU-only build"
        raise BenchError(
            f"--device cuda: no CUDA device is available (torch {info['torch']}, {build}); use --smoke or --device cpu for a smoke run"
        )
    if args.peak_tflops:
        peak, peak_src = args.peak_tflops * 1e12, "--peak-tflops"
    elif args.device == "cuda":
        peak, peak_src = peak_flops_of(info["name"]), "cpt.flops.PEAK_FLOPS"
    else:
        peak, peak_src = NOMINAL_CPU_PEAK, "nominal: a CPU has no peak here, so this MFU only shows that the script works"
    peak_note = "" if peak else " (no peak known: --peak-tflops)"
    work = prepare_out(args.out)

    print(
        f"device: {info['name']}; torch {info['torch']}; peak {peak / 1e12:g} TFLOP/s ({peak_src})"
        if peak
        else f"device: {info['name']}; torch {info['torch']}; peak unknown: pass --peak-tflops for MFU"
    )
    print(
        f"seq {args.seq_len}; replay α = {REPLAY_RATE}; Reptile β = {REPTILE_BETA}; compile {args.compile}; "
        f"activation checkpointing {args.activation_checkpointing}; work dir {work}"
    )
    for p in plans:
        print(
            f"  {p.preset}: {p.params / 1e6:,.1f}M parameters, {p.flops_per_token / 1e9:.3f} GFLOP/token; batch {p.batch_size}"
            f"{f' × {p.grad_accum} accum' if p.grad_accum > 1 else ''} × {p.seq_len}; {p.warmup} warm-up + {p.steps} timed steps; "
            f"Reptile k = {p.k}{f' (asked {args.k}: capped at the timed steps)' if p.k < args.k else ''}"
        )
    sys.stdout.flush()

    buffer_src = None
    if any("replay" in v for v in variants):
        buffer_src = work / "prefill" / "buffer"
        cfg = prefill_config(args.seq_len, args.device, buffer_src)
        _validate(cfg)
        (work / "logs").mkdir(parents=True, exist_ok=True)
        log = work / "logs" / "replay-prefill.log"
        lines, status, wall = run_until(ctx, cfg, work / "prefill" / "run", log, 10**9, args.timeout, args.threads)  # runs to its end
        if not (buffer_src / "shard-000.meta.json").is_file():
            raise BenchError(f"filling the replay buffer failed ({status}); see {log}:\n{_log_tail(log)}")
        print(f"replay buffer: {PREFILL_ROWS} sequences of {PREFILL_TASK} ({wall:.1f}s)")

    results: list[Result] = []
    n_total, i = len(plans) * len(variants), 0
    t_all = time.perf_counter()
    for plan in plans:
        for variant in variants:
            i += 1
            run_dir = work / "runs" / plan.preset / variant
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            cfg = variant_config(variant, plan, args.device, args.compile, args.activation_checkpointing, buffer_src)
            _validate(cfg)
            log = work / "logs" / f"{plan.preset}-{variant}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            res = Result(
                preset=plan.preset,
                variant=variant,
                status="ok",
                batch_size=plan.batch_size,
                grad_accum=plan.grad_accum,
                seq_len=plan.seq_len,
                warmup=plan.warmup,
                steps=plan.steps,
                k=plan.k if "reptile" in variant else None,
                tokens_per_step=plan.tokens_per_step,
                params=plan.params,
                flops_per_token=plan.flops_per_token,
                log=str(log),
            )
            lines, status, res.wall_s = run_until(ctx, cfg, run_dir, log, plan.warmup + plan.steps, args.timeout, args.threads)
            if status != "ok":
                res.status = status
            else:
                steady_state(lines, plan, variant, res)
            if res.tokens_per_second and peak:
                res.mfu = mfu(plan.shape, plan.seq_len, res.tokens_per_second, peak)
            if "replay" in variant and res.status == "ok" and "(replay.buffer.init)" not in log.read_text(errors="replace"):
                print(f"  warning: {log} does not show the prefilled replay buffer being reused", file=sys.stderr)
            results.append(res)
            _progress(i, n_total, res)
            if res.status != "ok":
                print(f"  {res.preset} {res.variant}: {res.status}; last lines of {log}:\n{_log_tail(log)}", file=sys.stderr)
            shutil.rmtree(run_dir / "replay", ignore_errors=True)

    for r in results:
        plain = next((x for x in results if x.preset == r.preset and x.variant == "plain"), None)
        if r.variant != "plain" and plain and plain.step_ms_mean and r.step_ms_mean:
            r.overhead_pct = 100 * (r.step_ms_mean / plain.step_ms_mean - 1)

    print(f"\nall variants: {time.perf_counter() - t_all:.0f}s\n")
    print(table(results, peak_note))
    print()
    verdicts = _verdicts(results, args, info["name"] or "", peak)
    for line in verdicts["lines"]:
        print(line)
    if args.json:
        out = {
            "device": info["name"],
            "torch": info["torch"],
            "peak_flops": peak,
            "peak_source": peak_src,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "replay_rate": REPLAY_RATE,
            "reptile_beta": REPTILE_BETA,
            "results": [asdict(r) for r in results],
            "targets": {k: v for k, v in verdicts.items() if k != "lines"},
        }
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"\nresults: {args.json}")
    return 0 if all(r.status == "ok" for r in results) else 1


def _validate(cfg: dict) -> None:
    from cpt.config import validate
    from cpt.errors import CptError

    try:
        validate(copy.deepcopy(cfg), cfg.get("name") or "benchmark")
    except CptError as err:
        raise BenchError(str(err)) from None


def _progress(i: int, n: int, r: Result) -> None:
    if r.status != "ok" and r.tokens_per_second is None:
        print(f"[{i}/{n}] {r.preset} {r.variant}: FAILED ({r.status}) after {r.wall_s:.1f}s", flush=True)
        return
    mfu = "" if r.mfu is None else f", MFU {100 * r.mfu:.1f}%"
    first = "" if r.first_step_s is None else f"; first step {r.first_step_s:.2f}s"
    steady = ""
    if len(r.halves_ms) == 2 and abs(r.halves_ms[1] / r.halves_ms[0] - 1) > STEADY_TOLERANCE:
        steady = f"; WARNING: halves of the window differ ({r.halves_ms[0]:.1f} vs {r.halves_ms[1]:.1f} ms/step): raise --warmup"
    extra = ""
    if r.k:
        extra += f"; {r.meta_updates_in_window} meta-update(s)"
    if "replay" in r.variant and r.replay_wait_ms_per_step is not None:
        extra += f"; replay wait {r.replay_wait_ms_per_step:.3f} ms/step"
    print(
        f"[{i}/{n}] {r.preset} {r.variant}: {fmt_int(r.tokens_per_second)} tokens/s{mfu}, {r.step_ms_mean:.1f} ms/step "
        f"(median {r.step_ms_median:.1f}, {r.steps} steps after {r.warmup} warm-up{extra}{first}); {r.wall_s:.1f}s{steady}",
        flush=True,
    )


def _verdicts(results: list[Result], args, device_name: str, peak: float | None) -> dict:
    lines, overhead = [], {}
    for r in results:
        if r.variant == "replay+reptile":
            overhead[r.preset] = r.overhead_pct
    if overhead:
        parts = []
        for preset, pct in overhead.items():
            if pct is None:
                parts.append(f"{preset} — (not measured)")
            else:
                parts.append(f"{preset} {pct:+.2f}% ({'met' if pct <= OVERHEAD_TARGET_PCT else 'NOT met'})")
        lines.append(f"replay+Reptile step-time overhead vs plain (target ≤ {OVERHEAD_TARGET_PCT:.0f}%): " + "; ".join(parts))
    else:
        lines.append("replay+Reptile overhead: not measured (needs the plain and replay+reptile variants)")
    mfu_target = {"target": MFU_TARGET, "evaluated": False, "met": None, "mfu": {}}
    mine = {r.variant: r.mfu for r in results if r.preset == MFU_TARGET_PRESET}
    where = f"{MFU_TARGET_PRESET} at seq {MFU_TARGET_SEQ} on one {MFU_TARGET_DEVICE}"
    if (
        mine.get("plain") is not None
        and args.seq_len == MFU_TARGET_SEQ
        and MFU_TARGET_DEVICE in device_name.upper()
        and args.device == "cuda"
        and not args.peak_tflops
    ):
        met = mine["plain"] >= MFU_TARGET
        mfu_target.update(evaluated=True, met=met, mfu=mine)
        others = ", ".join(f"{v} {100 * m:.1f}%" for v, m in mine.items() if v != "plain" and m is not None)
        lines.append(
            f"MFU target (≥ {100 * MFU_TARGET:.0f}% for {where}): plain {100 * mine['plain']:.1f}% → {'met' if met else 'NOT met'}"
            + (f" ({others})" if others else "")
        )
    else:
        this = f"{','.join(sorted({r.preset for r in results}))} at seq {args.seq_len} on {device_name}"
        lines.append(f"MFU target (≥ {100 * MFU_TARGET:.0f}% for {where}): not evaluated by this run ({this})")
    return {"lines": lines, "overhead_pct": overhead, "overhead_target_pct": OVERHEAD_TARGET_PCT, "mfu": mfu_target}


if __name__ == "__main__":
    sys.exit(main())
