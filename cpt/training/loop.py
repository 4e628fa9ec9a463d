"""The continual pre-training loop: tasks in order, replay mixed into every batch, a hook per step.

One screen of `_train_step` is the whole step: rows from the batch source (the replay seam), a
forward/backward per micro-batch, clip, AdamW, then the after-step hooks (the replay buffer stores
the step's new rows; Reptile may meta-update; the probe may measure gradient alignment). Around
it: held-out evaluation of every task (every `eval_every` steps and at each task end, giving one
row of the loss matrix per task), resumable checkpoints, and the run directory:

    RUN_DIR/config.yaml        the resolved config
    RUN_DIR/metrics.jsonl      train / eval / probe / meta_update lines
    RUN_DIR/summary.json       the loss matrix and its metrics (cpt.evaluate)
    RUN_DIR/checkpoints/       step-N/ (resumable), task-<i>-<name>/ and final/ (HF format)
    RUN_DIR/replay/            the replay buffer shard(s), unless replay.buffer.dir is set
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from cpt import atomic, evaluate, flops
from cpt.alignment.probe import gradient_cosines
from cpt.alignment.reptile import Reptile, optimizer_params
from cpt.config import RunConfig, dump_config, load_config
from cpt.data.readers import iter_documents
from cpt.data.streams import JointStream, TaskStream
from cpt.data.tokenizer import TextTokenizer, cache_root, load_tokenizer, train_or_load_bpe
from cpt.data.tokens import TaskTokens, check_token_range, prepare_task, source_key, split_documents, token_dtype
from cpt.errors import CptError
from cpt.model import build_model, count_parameters, load_model, max_positions, save_hf
from cpt.replay import ownership
from cpt.replay.buffer import ReplayBuffer, copy_shard, remove_shard
from cpt.replay.mixing import MixedBatchSource, StepPlan, replay_shortfall
from cpt.training import checkpoint as ckpt
from cpt.training import distributed
from cpt.training.schedule import lr_at
from cpt.training.speed import NextTokenLoss, configure_cpu, make_adamw, supports_fused_loss

MARKER = "run.json"
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; resume with --resume


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: the current step finished and a checkpoint was written."""

    def __init__(self, run_dir: Path, step: int, signum: int):
        super().__init__(
            f"{run_dir}: stopped by signal {signum} after step {step}; checkpoint written. Continue with: cpt train --resume {run_dir}"
        )
        self.step = step


class StopOnSignal:
    """First SIGTERM/SIGINT: ask the loop to stop after the current step. Second: exit at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            print(f"cpt: second signal {signum}: exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"\ncpt: signal {signum}: finishing the current step and writing a checkpoint (send again to exit now)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _quiet_transformers() -> None:
    """save_pretrained draws its own progress bar per checkpoint; ours are enough."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class MetricsLog:
    """Append-only JSON lines; flushed per line so a killed run keeps what it measured."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, resumed_step: int | None = None):
        self.path = path
        self.fh = open(path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise CptError("logging.tensorboard: needs the tensorboard package (pip install tensorboard)") from None
            # a resumed run re-logs the steps after its checkpoint: TensorBoard drops the events the killed
            # run wrote after it (steps > the checkpoint's), as metrics.jsonl is truncated to its offset
            self.tb = SummaryWriter(str(tensorboard_dir), purge_step=None if resumed_step is None else resumed_step + 1)

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            if record["type"] == "train":
                self.tb.add_scalar("train/loss", record["loss"], step)
                self.tb.add_scalar("train/lr", record["lr"], step)
            elif record["type"] == "eval":
                for name, value in record["losses"].items():
                    self.tb.add_scalar(f"val/{name}", value, step)
            elif record["type"] == "probe":
                for name, value in record["cosine"].items():
                    self.tb.add_scalar(f"probe/{name}", value, step)

    def offset(self) -> int:
        self.fh.flush()
        return self.fh.tell()

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


class NoMetrics:
    """What ranks other than 0 write: nothing."""

    def write(self, record: dict) -> None:
        pass

    def offset(self) -> int:
        return 0

    def close(self) -> None:
        pass


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, check_only: bool = False) -> None:
    """Refuse to mix two runs in one directory unless told to resume or overwrite."""
    if out.exists() and not out.is_dir():
        raise CptError(f"{out}: exists and is not a directory")
    if resume:
        if not (out / MARKER).is_file():
            raise CptError(f"{out}: not a cpt run directory (no {MARKER}); nothing to resume")
        return
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            what = "another cpt run" if (out / MARKER).is_file() else "other files"
            raise CptError(f"{out}: already holds {what}; pass --resume to continue it or --overwrite to replace it")
        if not (out / MARKER).is_file():
            raise CptError(f"{out}: --overwrite only replaces a cpt run directory, and this one holds other files")
        if check_only:
            return
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    if not check_only:
        out.mkdir(parents=True, exist_ok=True)


def resolve_device(cfg: RunConfig) -> tuple[torch.device, torch.dtype | None]:
    want = cfg.training.device
    if want == "cuda" and not torch.cuda.is_available():
        raise CptError("training.device: cuda requested but no CUDA device is available")
    device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    precision = cfg.training.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return device, (torch.bfloat16 if precision == "bf16" else None)


def load_or_train_tokenizer(cfg: RunConfig, cache: Path, source_keys: list[str]) -> TextTokenizer:
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    if cfg.model.init:
        init = Path(cfg.model.init)
        if (init / "tokenizer.json").is_file() or (init / "tokenizer_config.json").is_file():
            return load_tokenizer(init)
        # a new BPE's ids would fit inside the pretrained embedding table and silently mean other tokens
        raise CptError(
            f"model.init: {init} holds no tokenizer (tokenizer.json / tokenizer_config.json); set tokenizer.path "
            "to the tokenizer the model was trained with"
        )
    parts = [f"{key}:{t.val_fraction}" for key, t in zip(source_keys, cfg.tasks)]
    settings = f"{'|'.join(parts)}|{cfg.tokenizer.vocab_size}|{cfg.tokenizer.min_frequency}"
    key = hashlib.sha256(settings.encode()).hexdigest()[:20]

    def texts():
        for t in cfg.tasks:
            yield from split_documents(iter_documents(t.path, t.format, t.text_field), t.val_fraction, "train")

    t0 = time.perf_counter()
    tok = train_or_load_bpe(key, texts(), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, cache)
    _log(f"tokenizer: byte-level BPE, vocab {tok.vocab_size} ({tok.source}, {time.perf_counter() - t0:.1f}s)")
    return tok


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # norms and biases are not decayed (standard for Llama pre-training)
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Run:
    """Everything one training run holds; `run()` executes it to the summary."""

    def __init__(self, cfg: RunConfig, out: Path, resume: bool = False, log=_log, replay_task_offset: int = 0, run_id: str | None = None):
        self.cfg = cfg
        self.out = out
        self.run_id = run_id
        self.rank, self.world, local_rank = distributed.world_info()
        self.is_main = self.rank == 0
        self.log = log if self.is_main else (lambda msg: None)
        log = self.log
        self.device, self.autocast_dtype = resolve_device(cfg)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        distributed.init(self.device.type)
        if self.device.type == "cpu":
            configure_cpu()
        torch.manual_seed(cfg.seed)
        cache = cache_root(cfg.cache_dir)

        if not self.is_main:
            distributed.barrier()  # rank 0 trains the tokenizer and fills the token cache first
        source_keys = [source_key(Path(t.path), t.format, t.text_field) for t in cfg.tasks]  # reads each file once
        self.source_keys = source_keys
        self.tokenizer = load_or_train_tokenizer(cfg, cache, source_keys)
        self.tasks: list[TaskTokens] = [
            prepare_task(
                t.name, t.path, self.tokenizer, cache, fmt=t.format, text_field=t.text_field, val_fraction=t.val_fraction, log=log, key_of_source=key
            )
            for key, t in zip(source_keys, cfg.tasks)
        ]
        if self.is_main:
            distributed.barrier()
        tr = cfg.training
        if cfg.model.init:
            self.model = load_model(cfg.model.init, cfg.model.attn_implementation)
        else:
            self.model = build_model(
                cfg.model.preset, self.tokenizer.vocab_size, self.tokenizer.eos_id, tr.seq_len, cfg.seed, cfg.model.attn_implementation
            )
        vocab = self.model.get_input_embeddings().weight.shape[0]
        for task in self.tasks:
            check_token_range(task, vocab)
        if tr.seq_len > max_positions(self.model):
            raise CptError(f"training.seq_len: {tr.seq_len} exceeds the model's {max_positions(self.model)} positions")
        self.model.to(self.device)
        self.n_params = count_parameters(self.model)
        self.shape = flops.shape_of(self.model)
        if tr.activation_checkpointing:
            if not getattr(self.model, "supports_gradient_checkpointing", False):
                raise CptError(f"training.activation_checkpointing: {type(self.model).__name__} does not support it")
            # transformers checkpoints each layer's forward (module hooks such as FSDP2's stay outside it)
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ddp = None
        self.fsdp = self.world > 1 and tr.parallel == "fsdp"
        # what runs forward: the model for evaluation and the probe; a loss module for training, so that
        # under DDP the fused loss and a compiled body are what DDP wraps (it reduces what it runs)
        self.train_body = None
        self.forward_model = self.model
        self.compiled: list[str] = []
        if self.fsdp:
            if cfg.alignment.probe_every:
                raise CptError("alignment.probe_every: the gradient probe does not run under training.parallel: fsdp; use ddp or set it to 0")
            distributed.shard_model(self.model, mixed_bf16=self.autocast_dtype is not None, compile_layers=tr.compile)
            if tr.compile:
                self.compiled.append(f"{len(distributed.decoder_layers(self.model))} decoder layers, each before FSDP2 sharding")
        elif tr.compile and supports_fused_loss(self.model):
            # the decoder body; the lm_head + cross-entropy stay fused and chunked (eager)
            self.train_body = torch.compile(self.model.model)
            self.compiled.append("model.model (the decoder body; the fused lm_head + loss runs eagerly)")
        elif tr.compile:
            self.forward_model = torch.compile(self.model)
            self.compiled.append("the whole model")
        self.loss_module = NextTokenLoss(self.forward_model, self.train_body)
        self.train_model: torch.nn.Module = self.loss_module
        if self.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.train_model = self.ddp
        if self.compiled:
            log(f"compile: {'; '.join(self.compiled)} (torch.compile{', under DDP' if self.ddp is not None else ''})")

        self.rows_per_step = tr.batch_size * tr.grad_accum
        rp = cfg.replay
        if tr.strategy == "joint":
            streams = [TaskStream(t.train, tr.seq_len, cfg.seed, i, self.rank, self.world, t.name) for i, t in enumerate(self.tasks)]
            self._check_rows(streams)
            budgets = [sum(t.tokens for t in cfg.tasks)]
            self.streams = [JointStream(streams, [t.tokens for t in cfg.tasks], cfg.seed, self.rank)]
            self.row_names = ["joint"]
        else:
            self.streams = [TaskStream(t.train, tr.seq_len, cfg.seed, i, self.rank, self.world, t.name) for i, t in enumerate(self.tasks)]
            self._check_rows(self.streams)
            budgets = [t.tokens for t in cfg.tasks]
            self.row_names = [t.name for t in cfg.tasks]
        self.replay_task_offset = replay_task_offset
        # with a reused buffer of earlier tasks, the first task replays too
        self.plan = StepPlan.build(
            # each rank trains its share of every budget: the global batch is batch × accum × ranks
            [math.ceil(b / self.world) for b in budgets],
            tr.seq_len,
            self.rows_per_step,
            rp.rate,
            rp.include_current or replay_task_offset > 0,
        )

        self.buffer = self.prefetcher = None
        self.resume = resume
        self.resumed_from: Path | None = None  # the checkpoint directory a resume reads
        self.stop_requested = False
        self.source: MixedBatchSource | None = None  # made in run(): the buffer lives in the run directory

        self.optimizer = make_adamw(
            _param_groups(self.model, cfg.optimizer.weight_decay),
            self.device,
            lr=tr.lr,
            betas=(cfg.optimizer.beta1, cfg.optimizer.beta2),
            eps=cfg.optimizer.eps,
        )
        al = cfg.alignment
        self.reptile = Reptile(optimizer_params(self.optimizer), al.k, al.beta, al.anchor_device) if al.method == "reptile" else None
        self.eval_sets = [evaluate.eval_windows(t.val, tr.seq_len, tr.eval_tokens) for t in self.tasks]
        # what each fixed held-out set covers (windows spread over the whole validation split)
        self.heldout = [evaluate.heldout_coverage(t.val, tr.seq_len, tr.eval_tokens, self.tokenizer.eos_id) for t in self.tasks]
        for t, c in zip(self.tasks, self.heldout):
            log(f"held-out {t.name}: {evaluate.describe_coverage(c)}")
        if al.probe_every:
            self.probe_streams = [
                TaskStream(t.train, tr.seq_len, cfg.seed + 1_000_003, i, self.rank, self.world, t.name) for i, t in enumerate(self.tasks)
            ]
            self.probe_rng = np.random.default_rng([cfg.seed, 31337])

        # progress of the run (all of it is checkpointed)
        self.step = 0
        self.loss_matrix: list[list[float]] = []
        self.wall_before = 0.0
        self.train_seconds = 0.0
        self.probe_seconds = 0.0
        self.nan_skipped = 0
        self.trained_tokens = 0

    def _check_rows(self, streams: list[TaskStream]) -> None:
        for s in streams:
            if s.windows_per_epoch < self.cfg.training.batch_size:
                raise CptError(
                    f"task {s.name!r}: its training split holds {s.windows_per_epoch} sequence(s) of "
                    f"{s.row_len} tokens per rank, less than one batch ({self.cfg.training.batch_size}); "
                    "add data or lower training.batch_size / training.seq_len"
                )

    def _make_source(self) -> None:
        rp = self.cfg.replay
        if rp.rate > 0:
            self._make_buffer(self.resume)
        names = [t.name for t in self.cfg.tasks]
        off = self.replay_task_offset
        weights = {off + names.index(n): w for n, w in rp.task_weights.items()} if rp.task_weights else None
        self.source = MixedBatchSource(self.streams, self.plan, self.buffer, self.prefetcher, rp.include_current, weights, off)

    def _make_buffer(self, resume: bool) -> None:
        """This rank's shard: reopened on resume; else made empty (or copied from replay.buffer.init).

        `train` has checked (ownership.check_buffers) that whatever shard is found here may be cleared.
        """
        from cpt.replay.prefetch import ReplayPrefetcher

        bc = self.cfg.replay.buffer
        directory = ownership.buffer_dir(self.cfg, self.out)
        row_len = self.cfg.training.seq_len + 1
        owner = ownership.owner_record(self.run_id, self.out, self.cfg) if self.run_id else None
        if resume:
            self.buffer = ReplayBuffer.open(directory, self.rank)
            if self.buffer.row_len != row_len:
                raise CptError(f"{directory}: buffer rows hold {self.buffer.row_len} tokens but training.seq_len + 1 = {row_len}")
        else:
            remove_shard(directory, self.rank)  # a stale shard of this run directory (never another run's)
            if bc.init:
                copy_shard(Path(bc.init), directory, self.rank)
                self.buffer = ReplayBuffer.open(directory, self.rank)
                self.log(f"replay: copied {self.buffer.fill} sequence(s) per shard from {bc.init} (replay.buffer.init)")
            else:
                capacity = ownership.shard_capacity(ownership.global_capacity_rows(self.cfg), self.world, self.rank)
                self.buffer = ReplayBuffer(
                    directory, row_len, capacity, bc.policy, token_dtype(self.tokenizer.vocab_size), self.cfg.seed, self.rank, owner=owner
                )
            if owner is not None:
                self.buffer.set_owner(owner)
        if self.cfg.replay.prefetch:
            self.prefetcher = ReplayPrefetcher(self.buffer)
            self.buffer.attach(self.prefetcher)

    # ---------------------------------------------------------------- evaluation
    def evaluate_all(self) -> dict[str, float]:
        losses = {}
        for task, windows in zip(self.tasks, self.eval_sets):
            mine = windows[self.rank :: self.world]  # each rank evaluates its share; sums are reduced
            bs = self.cfg.training.eval_batch_size
            # FSDP2: every forward is collective, so every rank runs as many batches as rank 0 (the most)
            batches = math.ceil(len(windows[0 :: self.world]) / bs) if self.fsdp else 0
            total, count = (
                evaluate.heldout_loss(self.forward_model, mine, bs, self.device, self.autocast_dtype, min_batches=batches, pad=windows[:1])
                if len(mine) or batches
                else (0.0, 0)
            )
            total, count = distributed.all_reduce_sum([total, count], self.device)
            losses[task.name] = total / max(count, 1)
        return losses

    def _probe(self, task: int) -> None:
        t0 = time.perf_counter()
        n = self.cfg.alignment.probe_batch_size
        current = torch.from_numpy(self.probe_streams[task].next_rows(n))
        others = {self.tasks[j].name: torch.from_numpy(self.probe_streams[j].next_rows(n)) for j in range(task)}
        if self.buffer is not None and self.buffer.fill:
            ids = self.probe_rng.integers(0, self.buffer.fill, size=4 * n)
            rows, task_ids = self.buffer.read(ids)
            top = self.replay_task_offset + task
            eligible = task_ids <= top if self.cfg.replay.include_current else task_ids < top
            if eligible.sum() >= 1:
                others["replay"] = torch.from_numpy(np.asarray(rows[eligible][:n], dtype=np.int64))
        if others:
            cos = gradient_cosines(self.model, current, others, self.autocast_dtype)
            self.metrics.write({"type": "probe", "step": self.step, "task": self.tasks[task].name, "cosine": cos})
        self.probe_seconds += time.perf_counter() - t0

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        # under FSDP2 each rank's anchor shard has its own file (save_resumable)
        reptile = self.reptile.state_dict(anchor=not self.fsdp) if self.reptile else None
        return {
            "step": self.step,
            # under FSDP2 model and optimizer shards are written by every rank through DCP (save_resumable)
            "model": None if self.fsdp else self.model.state_dict(),
            "optimizer": None if self.fsdp else self.optimizer.state_dict(),
            "sources": distributed.gather_to_all(self.source.state_dict()),  # one per rank
            "reptile": reptile,
            "rngs": distributed.gather_to_all(_rng_state()),
            "probe": {"streams": [s.state_dict() for s in self.probe_streams], "rng": self.probe_rng.bit_generator.state}
            if self.cfg.alignment.probe_every
            else None,
            "loss_matrix": self.loss_matrix,
            "wall_seconds": self.wall_before + (time.perf_counter() - self.t_start),
            "train_seconds": self.train_seconds,
            "probe_seconds": self.probe_seconds,
            "nan_skipped": self.nan_skipped,
            "trained_tokens": self.trained_tokens,
            "metrics_offset": self.metrics.offset(),
        }

    def load_state_dict(self, state: dict, directory: Path | None = None) -> None:
        self.step = state["step"]
        if len(state["sources"]) != self.world:
            raise CptError(
                f"{self.out}: the checkpoint was written by {len(state['sources'])} process(es); resume with the same number (now {self.world})"
            )
        sharded = state["model"] is None
        if sharded != self.fsdp:
            kind = "FSDP2 (training.parallel: fsdp)" if sharded else "unsharded"
            raise CptError(f"{directory}: an {kind} checkpoint; resume with the training.parallel it was written with")
        if sharded:
            distributed.load_sharded(self.model, self.optimizer, directory / "dcp")
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.source.load_state_dict(state["sources"][self.rank])
        if self.reptile and state["reptile"]:
            if sharded:
                state["reptile"]["anchor"] = ckpt.load_state(directory / f"anchor-rank{self.rank}.pt")
            self.reptile.load_state_dict(state["reptile"])
        _set_rng_state(state["rngs"][self.rank])
        if state.get("probe") and self.cfg.alignment.probe_every:
            for s, st in zip(self.probe_streams, state["probe"]["streams"]):
                s.load_state_dict(st)
            self.probe_rng.bit_generator.state = state["probe"]["rng"]
        self.loss_matrix = state["loss_matrix"]
        self.wall_before = state["wall_seconds"]
        self.train_seconds = state["train_seconds"]
        self.probe_seconds = state["probe_seconds"]
        self.nan_skipped = state["nan_skipped"]
        self.trained_tokens = state["trained_tokens"]

    def save_resumable(self) -> None:
        if self.buffer is not None:
            # the buffer keeps an undo journal per checkpoint so any kept checkpoint can be restored
            self.buffer.flush(keep_journals=self.cfg.checkpoint.keep + 1)
        root = self.out / "checkpoints"
        staged = None
        if self.fsdp:
            staged = ckpt.staging_dir(root, self.step)
            if self.is_main:
                shutil.rmtree(staged, ignore_errors=True)
                staged.mkdir(parents=True)
            distributed.barrier()
            distributed.save_sharded(self.model, self.optimizer, staged / "dcp")  # collective
            if self.reptile is not None:
                torch.save(self.reptile.state_dict()["anchor"], staged / f"anchor-rank{self.rank}.pt")
            distributed.barrier()
        state = self.state_dict()  # collective: every rank takes part
        if self.is_main:
            ckpt.save_checkpoint(root, self.step, state, self.cfg.checkpoint.keep, staged=staged)
        distributed.barrier()

    def save_hf_checkpoint(self, directory: Path) -> None:
        """An HF checkpoint of the current weights, written by rank 0 (under FSDP2 gathered from every rank first)."""
        state = distributed.full_state_dict(self.model) if self.fsdp else None  # collective
        if self.is_main:
            save_hf(self.model, directory, self.tokenizer, state_dict=state)

    # ---------------------------------------------------------------- the step
    def _train_step(self, step: int) -> tuple[float, int]:
        cfg = self.cfg
        rows, n_new, n_replay = self.source.next_batch(step)
        rows = rows.to(self.device, non_blocking=True)
        lr = lr_at(step, self.plan.total_steps, self.plan.task_ends, cfg.training.lr, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        micros = rows.chunk(cfg.training.grad_accum)
        for i, micro in enumerate(micros):
            # under DDP, all-reduce gradients once per optimizer step, not once per micro-batch
            last = i == len(micros) - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            with sync:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                    loss = self.train_model(micro[:, :-1], micro[:, 1:])
                (loss / cfg.training.grad_accum).backward()
            total += float(loss.detach()) / cfg.training.grad_accum
        stop = float(self.stopper.signum is not None)
        if self.world > 1:  # the global mean and any rank's signal, so every rank takes the same NaN and stop decisions
            total, stop = distributed.all_reduce_sum([total, stop], self.device)
            total /= self.world
        self.stop_requested = stop > 0
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            self.nan_skipped += 1
            if self.nan_skipped > cfg.training.nan_skip:
                good = ckpt.list_checkpoints(self.out / "checkpoints")
                where = f"; last good checkpoint: {good[-1]}" if good else ""
                raise CptError(
                    f"step {step}: the training loss is {total} (NaN/Inf); stopping{where}. Lower training.lr or raise training.nan_skip"
                )
            self.log(f"warning: step {step}: loss {total}; batch skipped ({self.nan_skipped}/{cfg.training.nan_skip})")
            self.source.skip_step(step, n_new, n_replay)
            return total, 0
        if cfg.optimizer.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optimizer.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.source.after_step(step)
        if self.reptile is not None and self.reptile.after_step():
            self.metrics.write({"type": "meta_update", "step": step + 1, "count": self.reptile.meta_updates})
        return total, (n_new + n_replay) * cfg.training.seq_len

    def run(self, resumed_state: dict | None = None) -> dict:
        cfg = self.cfg
        self.t_start = time.perf_counter()
        self._make_source()
        metrics_path = self.out / "metrics.jsonl"
        if resumed_state is not None and self.is_main:
            with open(metrics_path, "r+b") as fh:
                fh.truncate(resumed_state["metrics_offset"])
        if self.is_main:
            self.metrics = MetricsLog(
                metrics_path,
                self.out / "tensorboard" if cfg.logging.tensorboard else None,
                resumed_step=resumed_state["step"] if resumed_state is not None else None,
            )
        else:
            self.metrics = NoMetrics()
        if resumed_state is not None:
            self.load_state_dict(resumed_state, self.resumed_from)
            self.log(f"resumed at step {self.step}/{self.plan.total_steps}")
        else:
            self.log(
                f"model: {self.n_params / 1e6:.2f}M parameters on {self.device}"
                f"{' (bf16 autocast)' if self.autocast_dtype else ' (fp32)'}; {self.plan.total_steps} steps; "
                f"{len(self.plan.task_ends)} task(s)"
            )
            losses = self.evaluate_all()
            self.metrics.write({"type": "eval", "step": 0, "task_index": -1, "losses": losses, "task_end": False})
        self.source.start(self.step)
        try:
            with StopOnSignal() as self.stopper:
                self._loop()
        finally:
            if self.prefetcher is not None:
                self.prefetcher.close()
            self.metrics.close()
        return self._finish()

    def _loop(self) -> None:
        cfg = self.cfg
        from tqdm.auto import tqdm

        n_rows = len(self.plan.task_ends)
        while self.step < self.plan.total_steps:
            task = self.plan.task_of_step[self.step]
            start = self.plan.task_ends[task - 1] if task else 0
            end = self.plan.task_ends[task]
            bar = tqdm(
                total=end - start,
                initial=self.step - start,
                desc=f"[{task + 1}/{n_rows}] {self.row_names[task]}",
                disable=not cfg.logging.progress or not self.is_main,
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=0.5,
            )
            # tokens/s counts time inside training steps only (not evaluation, probes, checkpoints)
            window_loss, window_n, window_tokens, window_t = 0.0, 0, 0, 0.0
            while self.step < end:
                t0 = time.perf_counter()
                loss, tokens = self._train_step(self.step)
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                window_t += dt
                self.trained_tokens += tokens
                self.step += 1
                bar.update(1)
                if math.isfinite(loss):
                    window_loss += loss
                    window_n += 1
                window_tokens += tokens
                if self.step % cfg.logging.log_every == 0 or self.step == end:
                    tps = window_tokens / max(window_t, 1e-9)
                    mean = window_loss / max(window_n, 1)
                    self.metrics.write(
                        {
                            "type": "train",
                            "step": self.step,
                            "task": self.row_names[task],
                            "task_index": task,
                            "loss": mean,
                            "lr": self.optimizer.param_groups[0]["lr"],
                            "tokens_per_second": tps,
                            "replay_wait_seconds": self.source.wait_seconds,
                        }
                    )
                    bar.set_postfix(loss=f"{mean:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                    window_loss, window_n, window_tokens, window_t = 0.0, 0, 0, 0.0
                if cfg.alignment.probe_every and self.step % cfg.alignment.probe_every == 0 and self.is_main:
                    self._probe(task)
                task_end = self.step == end
                if task_end and self.reptile is not None and cfg.alignment.task_end_update and self.reptile.steps_since_anchor:
                    # the loss-matrix row and the task checkpoint hold interpolated weights, whatever k's phase
                    self.reptile.meta_update()
                    self.metrics.write({"type": "meta_update", "step": self.step, "count": self.reptile.meta_updates, "task_end": True})
                if task_end or (cfg.training.eval_every and self.step % cfg.training.eval_every == 0):
                    losses = self.evaluate_all()
                    self.metrics.write({"type": "eval", "step": self.step, "task_index": task, "losses": losses, "task_end": task_end})
                    if task_end:
                        self.loss_matrix.append([losses[t.name] for t in self.tasks])
                if task_end:
                    self._task_end(task)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and not task_end:
                    self.save_resumable()
                if self.stop_requested:  # agreed across ranks in the step, so all of them checkpoint together
                    if not task_end:  # a task end has just written one
                        self.save_resumable()
                    bar.close()
                    raise Preempted(self.out, self.step, self.stopper.signum or 15)
            bar.close()

    def _task_end(self, task: int) -> None:
        cfg = self.cfg
        row = self.loss_matrix[-1]
        self.log(f"after {self.row_names[task]}: " + "  ".join(f"{t.name}={v:.3f}" for t, v in zip(self.tasks, row)))
        if cfg.checkpoint.task_ends and cfg.training.strategy != "joint":
            self.save_hf_checkpoint(self.out / "checkpoints" / f"task-{task}-{self.row_names[task]}")
        if self.buffer is not None:
            stats = self.source.stats
            warning = replay_shortfall(self.plan, stats.new_rows[task], stats.replay_rows[task], task, cfg.replay.rate)
            if warning:
                self.log(f"warning: task {self.row_names[task]}: {warning}")
        if cfg.optimizer.reset_at_task:
            self.optimizer.state = defaultdict(dict)
        self.save_resumable()

    def _replay_summary(self) -> dict:
        """Global capacity and fill of the buffer (all shards) and the tasks that replayed less than planned."""
        stats = self.source.stats
        warnings = {}
        for task, name in enumerate(self.row_names):
            w = replay_shortfall(self.plan, stats.new_rows[task], stats.replay_rows[task], task, self.cfg.replay.rate)
            if w:
                warnings[name] = w
        if self.buffer is None:
            return {"replay_warnings": warnings}
        cap = self.buffer.capacity_rows
        fill, capacity, unbounded = distributed.all_reduce_sum([self.buffer.fill, cap or 0, float(cap is None)], self.device)
        return {
            "replay_warnings": warnings,
            "replay_buffer": {
                "shards": self.world,
                "capacity_sequences": None if unbounded else int(capacity),
                "capacity_tokens": None if unbounded else int(capacity) * self.cfg.training.seq_len,
                "fill_sequences": int(fill),
                "fill_tokens": int(fill) * self.cfg.training.seq_len,
            },
        }

    def _finish(self) -> dict:
        cfg = self.cfg
        self.save_hf_checkpoint(self.out / "checkpoints" / "final")
        stats = self.source.stats
        wall = self.wall_before + (time.perf_counter() - self.t_start)
        # every rank trains the same number of new and replayed rows per step
        tokens = {
            "new": int(sum(stats.new_rows)) * cfg.training.seq_len * self.world,
            "replay": int(sum(stats.replay_rows)) * cfg.training.seq_len * self.world,
        }
        per_token = flops.flops_per_token(self.shape, cfg.training.seq_len)
        summary = {
            "run": cfg.name or self.out.name,
            "strategy": cfg.training.strategy,
            "tasks": [t.name for t in self.tasks],
            "loss_matrix": self.loss_matrix,
            **evaluate.summarize(self.loss_matrix),
            "tokens": tokens,
            "world_size": self.world,
            "replay_rate": cfg.replay.rate,
            "replay_fraction": stats.fraction(),
            "replay_wait_seconds": self.source.wait_seconds,
            "replay_task_offset": self.replay_task_offset,
            "alignment": cfg.alignment.method,
            "meta_updates": self.reptile.meta_updates if self.reptile else 0,
            "steps": self.step,
            "task_boundaries": self.plan.task_ends,
            "parameters": self.n_params,
            # training compute (cpt.flops): 6·N + 12·L·T·d_attn per token trained on, new and replayed
            "flops": {
                "per_token": per_token,
                "training": per_token * (tokens["new"] + tokens["replay"]),
                "matmul_parameters": self.shape.matmul_params,
            },
            "wall_seconds": wall,
            "train_seconds": self.train_seconds,
            "probe_seconds": self.probe_seconds,
            "tokens_per_second": self.trained_tokens * self.world / max(self.train_seconds, 1e-9),
            "nan_skipped": self.nan_skipped,
            "heldout": {t.name: c for t, c in zip(self.tasks, self.heldout)},
            "compile": {"modules": self.compiled, "graphs": _compiled_graphs()} if self.compiled else None,
            **self._replay_summary(),
        }
        if self.is_main:
            atomic.write_json(self.out / "summary.json", summary, indent=2)
        if self.buffer is not None:
            self.log(f"replay: waited {self.source.wait_seconds:.3f}s on the prefetcher in {self.step} steps")
        if self.cfg.alignment.probe_every:
            share = 100 * self.probe_seconds / max(self.train_seconds, 1e-9)
            self.log(f"probe: {self.probe_seconds:.1f}s in all ({share:.1f}% of the training time)")
        self.log(
            f"done: {self.step} steps in {wall:.1f}s ({summary['tokens_per_second']:,.0f} tokens/s); "
            f"avg final loss {summary['avg_final_loss']:.3f}, forgetting "
            + (f"{summary['forgetting_score']:.3f}" if summary["forgetting_score"] is not None else "n/a")
        )
        return summary


def train(
    config: RunConfig | str | Path | None,
    out: str | Path,
    *,
    overrides: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Run (or resume) a continual pre-training run; returns the summary (also in out/summary.json)."""
    out = Path(out)
    _quiet_transformers()
    if not resume:  # validate before touching the run directory
        if isinstance(config, RunConfig):
            cfg = config
        elif config is None:
            raise CptError("a config file is required (or --resume RUN_DIR)")
        else:
            cfg = load_config(config, overrides)
    prepare_run_dir(out, resume, overwrite, check_only=True)
    marker: dict = {}
    if resume:
        # the run's own saved config wins: a resumed run must be the same run
        cfg = load_config(out / "config.yaml")
        marker = ownership.read_marker(out, MARKER)
        offset = marker.get("replay_task_offset", 0)
    else:
        offset = ownership.init_task_offset(cfg)
    run = Run(cfg, out, resume=resume, replay_task_offset=offset)  # data and model first: bad input fails before any write
    if resume:
        _check_same_data(run, marker, out)
        run.run_id = marker.get("run_id")
    else:
        run.run_id = distributed.broadcast_object(uuid.uuid4().hex)  # every rank's shards name the same owner
    ownership.check_buffers(cfg, out, run.run_id, resume, run.world, token_dtype(run.tokenizer.vocab_size).name, run.log)
    if not run.is_main:
        distributed.barrier()  # rank 0 prepares the run directory
        return _run_and_close(run, out, resume)
    prepare_run_dir(out, resume, overwrite)
    if not resume:
        atomic.write_text(out / "config.yaml", dump_config(cfg))
        marker = {
            "cpt": 1,
            "run_id": run.run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "replay_task_offset": offset,
            # what a resume must find again: each task's source content and the tokenizer
            "sources": {t.name: key for t, key in zip(cfg.tasks, run.source_keys)},
            "tokenizer": run.tokenizer.fingerprint,
        }
        atomic.write_json(out / MARKER, marker, indent=1)
    distributed.barrier()
    return _run_and_close(run, out, resume)


def _check_same_data(run: Run, marker: dict, out: Path) -> None:
    """A resumed run must train on the data it started with (runs made before fingerprints were kept are not checked)."""
    sources = marker.get("sources") or {}
    for i, (t, key) in enumerate(zip(run.cfg.tasks, run.source_keys)):
        if t.name in sources and sources[t.name] != key:
            raise CptError(
                f"tasks.{i} ({t.name}): {t.path} changed since {out} started (its content hash differs); "
                "restore the original data or start a new run"
            )
    if marker.get("tokenizer") and marker["tokenizer"] != run.tokenizer.fingerprint:
        raise CptError(f"tokenizer: {run.tokenizer.source} is not the tokenizer {out} started with; restore it or start a new run")


def _run_and_close(run: Run, out: Path, resume: bool) -> dict:
    state = None
    if resume:
        found = ckpt.load_latest(out / "checkpoints", run.log)
        if found is None:
            if (out / "summary.json").is_file():
                raise CptError(f"{out}: the run already finished (summary.json exists)")
            run.log(f"{out}: no usable checkpoint; starting the run from the beginning (with an empty replay buffer)")
            if run.is_main:
                (out / "metrics.jsonl").unlink(missing_ok=True)
            run.resume = False  # the buffer too starts as it was at step 0, not as the killed run left it
        else:
            run.resumed_from, state = found
    try:
        return run.run(state)
    finally:
        distributed.shutdown()


def _compiled_graphs() -> int:
    """Graphs torch.compile (dynamo) has compiled in this process: > 0 once a compiled module ran."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return 0
    return int(counters["stats"]["unique_graphs"])


def ensure_threads() -> None:
    """Use every core for intra-op work unless the user already chose (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


def evaluate_checkpoint(run_dir: str | Path, checkpoint: str = "final") -> dict[str, float]:
    """Held-out loss of a saved HF checkpoint of a run on every task (the same fixed sets as training)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CptError(f"{run_dir}: not a cpt run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    directory = run_dir / "checkpoints" / checkpoint
    if not (directory / "config.json").is_file():
        have = sorted(p.name for p in (run_dir / "checkpoints").glob("*") if (p / "config.json").is_file())
        raise CptError(f"{directory}: no such HF checkpoint; have {have or 'none'}")
    device, autocast_dtype = resolve_device(cfg)
    tok = load_tokenizer(directory)
    cache = cache_root(cfg.cache_dir)
    model = load_model(directory, cfg.model.attn_implementation).to(device)
    out = {}
    for t in cfg.tasks:
        task = prepare_task(t.name, t.path, tok, cache, fmt=t.format, text_field=t.text_field, val_fraction=t.val_fraction)
        windows = evaluate.eval_windows(task.val, cfg.training.seq_len, cfg.training.eval_tokens)
        total, count = evaluate.heldout_loss(model, windows, cfg.training.eval_batch_size, device, autocast_dtype)
        out[t.name] = total / max(count, 1)
    return out
