"""From a validated config to the parts of a run, one small function per part (litgpt's `setup()`).

    tokenizer + prepared tasks   prepare_data     (rank 0 tokenizes; the others wait, then read the cache)
    model + parallel wrapper     model_for / parallel_for (cpt.model, cpt.training.parallel)
    task streams + step plan     streams_for, plan_for   (where α acts: the plan's replay rows per step)
    optimizer                    cpt.training.optim.optimizer_for
    replay buffer + batch source buffer_for, source_for
    after-step hooks             hooks_for        (replay insert, Reptile — where k acts —, reset, probe)
    evaluator                    cpt.training.evaluator.Evaluator

`cpt.training.loop.Run` calls these in order and then only trains. Nothing here trains or writes
the run directory, except `buffer_for`, which the run calls once the directory is prepared.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cpt.alignment.probe import AlignmentProbe
from cpt.alignment.reptile import MetaUpdates, Reptile, optimizer_params
from cpt.config import RunConfig
from cpt.data.readers import iter_documents
from cpt.data.streams import JointStream, TaskStream
from cpt.data.tokenizer import TextTokenizer, cache_root, load_tokenizer, train_or_load_bpe
from cpt.data.tokens import TaskTokens, check_token_range, prepare_for, source_key, split_documents, token_dtype
from cpt.errors import CptError
from cpt.model import enable_activation_checkpointing, model_for
from cpt.replay import ownership
from cpt.replay.buffer import ReplayBuffer, copy_shard, remove_shard
from cpt.replay.mixing import MixedBatchSource, StepPlan
from cpt.replay.prefetch import ReplayPrefetcher
from cpt.training import distributed
from cpt.training.hooks import AfterStepHook, OptimizerReset
from cpt.training.parallel import OneProcess, parallel_for


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ data
def load_or_train_tokenizer(cfg: RunConfig, cache: Path, source_keys: list[str], log=_log) -> TextTokenizer:
    """`tokenizer.path`, else model.init's own tokenizer, else a byte-level BPE trained on the tasks' training splits (cached)."""
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
            yield from split_documents(iter_documents(t.path, t.format, t.text_field, documents=t.documents), t.val_fraction, "train")

    t0 = time.perf_counter()
    tok = train_or_load_bpe(key, texts(), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, cache)
    log(f"tokenizer: byte-level BPE, vocab {tok.vocab_size} ({tok.source}, {time.perf_counter() - t0:.1f}s)")
    return tok


@dataclass
class Data:
    tokenizer: TextTokenizer
    tasks: list[TaskTokens]
    source_keys: list[str]  # each task's source content hash (run.json keeps them; a resume checks them)


def prepare_data(cfg: RunConfig, is_main: bool, log) -> Data:
    """The tokenizer and every task's token files; rank 0 fills the cache first, the other ranks then read it."""
    cache = cache_root(cfg.cache_dir)
    if not is_main:
        distributed.barrier()
    # hashes each file once; warm: a stat per file
    keys = [source_key(t.path, t.format, t.text_field, cache, t.documents, f"tasks.{i}.path") for i, t in enumerate(cfg.tasks)]
    tokenizer = load_or_train_tokenizer(cfg, cache, keys)
    tasks = [prepare_for(t, tokenizer, cache, log=log, key_of_source=key, index=i) for i, (key, t) in enumerate(zip(keys, cfg.tasks))]
    if is_main:
        distributed.barrier()
    return Data(tokenizer, tasks, keys)


# ------------------------------------------------------------------ model
def model_and_parallel(
    cfg: RunConfig, data: Data, device: torch.device, autocast_dtype, world: int, log
) -> tuple[torch.nn.Module, OneProcess]:
    """The run's model on its device, wrapped for one process, DDP or FSDP2 (and compiled if asked)."""
    tr = cfg.training
    model = model_for(cfg, data.tokenizer.vocab_size, data.tokenizer.eos_id)
    vocab = model.get_input_embeddings().weight.shape[0]
    for task in data.tasks:
        check_token_range(task, vocab)
    model.to(device)
    if tr.activation_checkpointing:
        enable_activation_checkpointing(model)
    parallel = parallel_for(tr.parallel, world, device, autocast_dtype)
    if parallel.sharded and cfg.alignment.probe_every:
        raise CptError("alignment.probe_every: the gradient probe does not run under training.parallel: fsdp; use ddp or set it to 0")
    parallel.wrap(model, tr.compile)
    if parallel.compiled:
        log(f"compile: {'; '.join(parallel.compiled)} (torch.compile{', under DDP' if parallel.kind == 'DDP' else ''})")
    return model, parallel


# ------------------------------------------------------------------ data order
def streams_for(cfg: RunConfig, tasks: list[TaskTokens], rank: int, world: int) -> tuple[list, list[str], list[int]]:
    """(one stream per row of the loss matrix, the rows' names, their budgets of new tokens)."""
    tr = cfg.training
    streams = [TaskStream(t.train, tr.seq_len, cfg.seed, i, rank, world, t.name) for i, t in enumerate(tasks)]
    for s in streams:
        if s.windows_per_epoch < tr.batch_size:
            raise CptError(
                f"task {s.name!r}: its training split holds {s.windows_per_epoch} sequence(s) of "
                f"{s.row_len} tokens per rank, less than one batch ({tr.batch_size}); "
                "add data or lower training.batch_size / training.seq_len"
            )
    if tr.strategy == "joint":
        return [JointStream(streams, [t.tokens for t in cfg.tasks], cfg.seed, rank)], ["joint"], [sum(t.tokens for t in cfg.tasks)]
    return streams, [t.name for t in cfg.tasks], [t.tokens for t in cfg.tasks]


def plan_for(cfg: RunConfig, budgets: list[int], world: int, replay_task_offset: int) -> StepPlan:
    """Which task each step trains and how many of its rows are replayed (α, exactly)."""
    tr, rp = cfg.training, cfg.replay
    return StepPlan.build(
        # each rank trains its share of every budget: the global batch is batch × accum × ranks
        [math.ceil(b / world) for b in budgets],
        tr.seq_len,
        tr.batch_size * tr.grad_accum,
        rp.rate,
        # with a buffer of earlier tasks (replay.buffer.init), the first task replays too
        rp.include_current or replay_task_offset > 0,
    )


# ------------------------------------------------------------------ replay
def buffer_for(
    cfg: RunConfig, out: Path, run_id: str | None, rank: int, world: int, vocab_size: int, resume: bool, log
) -> tuple[ReplayBuffer | None, ReplayPrefetcher | None]:
    """This rank's buffer shard: reopened on resume; else made empty (or copied from replay.buffer.init).

    `cpt.training.loop.train` has checked (ownership.check_buffers) that a shard found here may be cleared.
    """
    if cfg.replay.rate <= 0:
        return None, None
    bc = cfg.replay.buffer
    directory = ownership.buffer_dir(cfg, out)
    row_len = cfg.training.seq_len + 1
    owner = ownership.owner_record(run_id, out, cfg) if run_id else None
    if resume:
        buffer = ReplayBuffer.open(directory, rank)
        if buffer.row_len != row_len:
            raise CptError(f"{directory}: buffer rows hold {buffer.row_len} tokens but training.seq_len + 1 = {row_len}")
    else:
        remove_shard(directory, rank)  # a stale shard of this run directory (never another run's)
        if bc.init:
            copy_shard(Path(bc.init), directory, rank)
            buffer = ReplayBuffer.open(directory, rank)
            log(f"replay: copied {buffer.fill} sequence(s) per shard from {bc.init} (replay.buffer.init)")
        else:
            capacity = ownership.shard_capacity(ownership.global_capacity_rows(cfg), world, rank)
            buffer = ReplayBuffer(directory, row_len, capacity, bc.policy, token_dtype(vocab_size), cfg.seed, rank, owner=owner)
        if owner is not None:
            buffer.set_owner(owner)
    prefetcher = ReplayPrefetcher(buffer) if cfg.replay.prefetch else None  # it attaches itself to the buffer
    return buffer, prefetcher


def source_for(cfg: RunConfig, streams: list, plan: StepPlan, buffer, prefetcher, replay_task_offset: int) -> MixedBatchSource:
    rp = cfg.replay
    names = [t.name for t in cfg.tasks]
    off = replay_task_offset
    weights = {off + names.index(n): w for n, w in rp.task_weights.items()} if rp.task_weights else None
    return MixedBatchSource(streams, plan, buffer, prefetcher, rp.include_current, weights, off)


# ------------------------------------------------------------------ after-step hooks
def reptile_for(cfg: RunConfig, optimizer: torch.optim.Optimizer, plan: StepPlan, sharded: bool) -> MetaUpdates | None:
    al = cfg.alignment
    if al.method != "reptile":
        return None
    reptile = Reptile(optimizer_params(optimizer), al.k, al.beta, al.anchor_device)
    return MetaUpdates(reptile, plan.task_ends, al.task_end_update, sharded)


def hooks_for(
    cfg: RunConfig, source: MixedBatchSource, meta: MetaUpdates | None, optimizer, plan: StepPlan, probe: AlignmentProbe | None
) -> list[AfterStepHook]:
    """The after-step hooks in the order they act (cpt.training.hooks)."""
    hooks: list[AfterStepHook] = [source]
    if meta is not None:
        hooks.append(meta)
    if cfg.optimizer.reset_at_task:
        hooks.append(OptimizerReset(optimizer, plan.task_ends))
    if probe is not None:
        hooks.append(probe)
    return hooks


def probe_for(
    cfg: RunConfig, model, tasks, rank: int, world: int, plan: StepPlan, autocast_dtype, is_main: bool, source
) -> AlignmentProbe | None:
    al = cfg.alignment
    if not al.probe_every:
        return None
    return AlignmentProbe(
        model,
        tasks,
        cfg.training.seq_len,
        cfg.seed,
        rank,
        world,
        al.probe_every,
        al.probe_batch_size,
        plan.task_of_step,
        autocast_dtype,
        is_main,
        buffer=source.buffer,
        eligible=source.eligible_tasks,
    )
