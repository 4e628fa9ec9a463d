"""Every knob of a cpt run, validated; the only place defaults live.

A run is described by one YAML file whose sections mirror the pipeline: `tokenizer` → `tasks`
(the ordered data distributions) → `model` → `training` / `optimizer` / `schedule` (the loop) →
`replay` and `alignment` (the two continual-learning techniques) → `checkpoint` / `logging`.
Unknown keys and out-of-range values are rejected with a one-line `CptError` that names the
field; `docs/config.md` is generated from the field descriptions here (`cpt config-reference`).
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from cpt.errors import CptError
from cpt.presets import PRESETS


def _to_count(value: Any) -> Any:
    """Accept 2e6, "2e6" and "2_000_000" for integer budgets (YAML 1.1 reads 2e6 as a string)."""
    if isinstance(value, str):
        try:
            value = float(value.replace("_", ""))
        except ValueError:
            return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return value


def _to_float(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Count = Annotated[int, BeforeValidator(_to_count)]
Real = Annotated[float, BeforeValidator(_to_float)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TokenizerConfig(Section):
    path: str | None = Field(
        None,
        description="A `tokenizer.json` file or an HF tokenizer directory. Empty: train a byte-level "
        "BPE on a sample of the tasks' training splits (`sample_mb`; cached by content hash).",
    )
    vocab_size: Count = Field(8192, ge=256, le=1_000_000, description="Vocabulary size of a trained BPE.")
    min_frequency: Count = Field(2, ge=1, description="Minimum pair frequency when training a BPE.")
    sample_mb: Real = Field(
        64,
        ge=0,
        description="A trained BPE learns from at most this many MB (10^6 bytes of UTF-8) of each task's training documents "
        "(never the held-out ones): every k-th document, k the smallest power of two whose documents fit (a document "
        "longer than the bound is cut to it). A task under the bound is used whole. 0: no bound (every training document).",
    )


_FORMATS = Literal["auto", "txt", "jsonl", "parquet", "hf", "megatron", "datatrove", "tokens"]
_PATH_HELP = (
    "Training data: a file, a directory of shards (every `.txt`/`.jsonl`/`.parquet` file below it, by name), "
    "a glob (`data/fr/*.jsonl.gz`, `**` allowed), or a list of these (read in that order; the documents are the files' "
    "documents one after the other). Files: `.txt` (see `documents`), `.jsonl` (one JSON object per line with a text "
    "field), `.parquet` (`.txt`/`.jsonl` may be `.gz`/`.xz`/`.zst`), a directory written by "
    "`datasets.Dataset.save_to_disk` (one source), or pre-tokenized files (see `format`). Relative paths and globs are "
    "relative to the config file."
)
_FORMAT_HELP = (
    "Reader; `auto` picks by suffix. Pre-tokenized (read in place, need `tokenizer.path`): `megatron` "
    "(`.bin` + `.idx`, Megatron-LM / GPT-NeoX), `datatrove` (`.ds` + `.ds.index`), `tokens` (`.npy`, or `.bin` with `dtype`; "
    "documents end with the tokenizer's EOS)."
)
_DOCUMENTS_HELP = (
    "What one document is in a `.txt` file: `auto` / `blank-lines`: a block of lines separated by a blank line; "
    "`lines`: every non-empty line (one-paragraph-per-line dumps). Other formats: always a line / row."
)


def _check_path(value: str | list[str] | None) -> str | list[str] | None:
    if isinstance(value, list) and (not value or not all(value)):
        raise ValueError("give at least one file, directory or glob, none of them empty")
    if isinstance(value, str) and not value:
        raise ValueError("give a file, directory or glob")
    return value


class SourceConfig(Section):
    path: str | list[str] = Field(..., description="This source's data (as `tasks.N.path`).")
    weight: Real = Field(..., gt=0, description="Its share of the task's training rows and of its held-out set (normalised).")
    format: _FORMATS = Field("auto", description="As `tasks.N.format`.")
    text_field: str = Field("text", description="As `tasks.N.text_field`.")
    documents: Literal["auto", "blank-lines", "lines"] = Field("auto", description="As `tasks.N.documents`.")
    dtype: Literal["uint16", "uint32"] | None = Field(None, description="As `tasks.N.dtype`.")

    _path = field_validator("path")(classmethod(lambda cls, v: _check_path(v)))


class TaskConfig(Section):
    name: str = Field(..., min_length=1, description="Short task name used in tables and plots (e.g. `fr`).")
    path: str | list[str] | None = Field(None, description=_PATH_HELP + " Give `path` or `sources`.")
    sources: list[SourceConfig] | None = Field(
        None,
        description="Several weighted corpora inside one task (e.g. `[{path: fr-web/, weight: 0.7}, {path: fr-wiki.jsonl, weight: 0.3}]`): "
        "training rows are drawn from them with exact shares and the held-out loss is their weighted mean; each source has its "
        "own held-out documents. Instead of `path`.",
    )
    tokens: Count = Field(..., gt=0, description="Budget of NEW training tokens for this task (replay comes on top).")
    format: _FORMATS = Field("auto", description=_FORMAT_HELP)
    dtype: Literal["uint16", "uint32"] | None = Field(None, description="Token type of a raw `.bin` token file (`format: tokens`).")
    text_field: str = Field("text", description="Field / column holding the text (jsonl, parquet, hf).")
    val_fraction: Real = Field(0.05, gt=0, lt=0.5, description="Fraction of documents held out for validation (fixed, never trained on).")
    documents: Literal["auto", "blank-lines", "lines"] = Field("auto", description=_DOCUMENTS_HELP)

    @field_validator("path")
    @classmethod
    def _some_path(cls, value: str | list[str] | None) -> str | list[str] | None:
        return _check_path(value)

    @model_validator(mode="after")
    def _path_or_sources(self) -> TaskConfig:
        if (self.path is None) == (self.sources is None):
            raise ValueError("give `path` (one corpus) or `sources` (weighted corpora), not both and not neither")
        if self.sources is not None and not self.sources:
            raise ValueError("sources: give at least one source")
        return self

    def parts(self) -> list[TaskConfig]:
        """The task's sources as single-corpus tasks (itself when it has `path`): what is prepared, each with its own cache entry."""
        if self.sources is None:
            return [self]
        return [single_corpus_task(f"{self.name}[{i}]", s, self.tokens, self.val_fraction) for i, s in enumerate(self.sources)]

    @property
    def weights(self) -> list[float] | None:
        return None if self.sources is None else [s.weight for s in self.sources]


def single_corpus_task(name: str, corpus, tokens: int, val_fraction: float) -> TaskConfig:
    """A task of one corpus, read as `corpus` says (path, format, dtype, text_field, documents): a source of a mixed
    task (`TaskConfig.parts`) or a replay source (`ReplaySourceConfig.as_task`), prepared through the tasks' code path."""
    return TaskConfig(
        name=name,
        path=corpus.path,
        tokens=tokens,
        format=corpus.format,
        dtype=corpus.dtype,
        text_field=corpus.text_field,
        val_fraction=val_fraction,
        documents=corpus.documents,
    )


class PrepareConfig(Section):
    workers: Count | Literal["auto"] = Field(
        "auto",
        description="Processes that tokenize a task's shards in parallel (`auto`: one per core, with at least two shards per worker).",
    )
    shard_mb: Real = Field(
        256.0,
        gt=0,
        description="Source MB per prepared shard: the unit of parallel and resumable preparation (large plain `.txt` / "
        "`.jsonl` files are cut at document boundaries). Does not change the tokens.",
    )


class ModelConfig(Section):
    preset: str = Field(
        "tiny", description="Named shape from `cpt.model.PRESETS` (tiny, small, demo, paper-99m, paper-560m, paper-1b, paper-3b)."
    )
    init: str | None = Field(None, description="Local HF checkpoint directory to continue from (overrides `preset`).")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel.")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of {', '.join(PRESETS)}")
        return value


class TrainingConfig(Section):
    strategy: Literal["sequential", "joint"] = Field(
        "sequential", description="`sequential`: tasks in order. `joint`: all tasks' data shuffled together for the same total budget."
    )
    seq_len: Count = Field(256, ge=8, le=131072, description="Tokens per training sequence.")
    batch_size: Count = Field(8, ge=1, description="Sequences per micro-batch on each rank.")
    grad_accum: Count = Field(1, ge=1, description="Micro-batches per optimizer step. Global batch = batch_size × ranks × grad_accum.")
    lr: Real = Field(1e-3, gt=0, le=1.0, description="Peak learning rate.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when available.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="`auto`: bf16 autocast on CUDA, fp32 on CPU (bf16 is slower on CPUs)."
    )
    compile: bool = Field(False, description="Wrap the model in `torch.compile` (under FSDP2: each decoder layer).")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: `ddp` replicates the model; `fsdp` shards parameters, gradients and optimizer state (FSDP2 "
        "`fully_shard` per decoder layer) and checkpoints through torch distributed checkpoint. Ignored in one process.",
    )
    fsdp_init: Literal["meta", "full"] = Field(
        "meta",
        description="Under `fsdp`: `meta` builds the model on the meta device, shards it, then fills each rank's shard (the "
        "seeded init replayed, or `model.init` read slice by slice: the same weights as `full`), so a rank holds about its shard; "
        "`full` builds the whole model on every rank first. A model that cannot be filled shard by shard is built whole (logged).",
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward pass (less memory, ~30% more compute)."
    )
    eval_every: Count = Field(0, ge=0, description="Evaluate every task's held-out loss every N steps (0: only at task ends).")
    eval_tokens: Count = Field(65536, ge=1, description="Held-out tokens per task per evaluation (a fixed set).")
    eval_batch_size: Count = Field(16, ge=1, description="Sequences per evaluation forward pass.")
    nan_skip: Count = Field(0, ge=0, description="Batches with a NaN/Inf loss to skip before stopping the run.")
    data_wait_s: Real = Field(
        86400,
        gt=0,
        description="Under torchrun: how long a rank waits for its node's local rank 0 to tokenize the data (before the process "
        "group forms; it polls a marker file in `<cache>/ready/`, see docs/distributed.md), or for rank 0 to deal the replay "
        "buffer to another number of ranks (a marker in the run directory), before failing.",
    )
    dist_timeout_s: Real = Field(
        1800,
        gt=0,
        description="Under torchrun: the process group's timeout, the longest any collective (a gradient all-reduce, a "
        "checkpoint barrier) may wait for the slowest rank. Data preparation happens before the group forms and does not count.",
    )


class OptimizerConfig(Section):
    beta1: Real = Field(0.9, ge=0, lt=1, description="AdamW β1.")
    beta2: Real = Field(0.95, ge=0, lt=1, description="AdamW β2.")
    eps: Real = Field(1e-8, gt=0, description="AdamW ε.")
    weight_decay: Real = Field(0.1, ge=0, description="Decoupled weight decay (not applied to norms and biases).")
    clip: Real = Field(1.0, ge=0, description="Gradient-norm clip (0: off).")
    reset_at_task: bool = Field(False, description="Clear the Adam moments at every task boundary.")


class ScheduleConfig(Section):
    name: Literal["cosine", "rewarm", "infinite", "wsd", "constant"] = Field(
        "cosine",
        description="`cosine`: warmup then one cosine to min_lr over all tasks (the paper's). `rewarm`: warmup + cosine "
        "again in every task. `infinite`: warmup → cosine cooldown to constant_lr → constant → exponential anneal to "
        "min_lr (Ibrahim et al. 2024). `wsd`: warmup → stable → linear decay. `constant`: warmup then constant.",
    )
    warmup: Real = Field(0.01, ge=0, lt=1, description="Warmup as a fraction of the steps it spans (all steps, or the task's for rewarm).")
    min_lr: Real = Field(1e-4, ge=0, description="Final learning rate of cosine / rewarm / wsd / infinite.")
    cooldown: Real = Field(0.1, ge=0, lt=1, description="infinite: fraction of all steps spent cooling down to constant_lr.")
    constant_lr: Real | None = Field(None, gt=0, description="infinite: the constant phase's LR (default: half the peak).")
    anneal: Real = Field(0.05, ge=0, lt=1, description="infinite: fraction of all steps for the final anneal.")
    decay: Real = Field(0.2, ge=0, le=1, description="wsd: fraction of all steps for the final linear decay.")
    warmup_steps: Count | None = Field(
        None,
        ge=0,
        description="Warmup in optimizer steps instead of the `warmup` fraction (per task for rewarm): a schedule whose "
        "phases are steps does not depend on the run's length, so a run that uses it can be extended (`--extend`).",
    )
    cooldown_steps: Count | None = Field(
        None, ge=0, description="infinite: the cooldown in optimizer steps instead of the `cooldown` fraction (see warmup_steps)."
    )
    anneal_at: Count | None = Field(
        None,
        ge=1,
        description="From this optimizer step on, an exponential anneal from the LR of the step before it to min_lr over "
        "`anneal_steps` steps, whatever the schedule (what `cpt release` sets for its annealed copy of a run).",
    )
    anneal_steps: Count = Field(100, ge=1, description="The length of the anneal that `anneal_at` starts.")

    @model_validator(mode="after")
    def _phases_fit(self) -> ScheduleConfig:
        if (
            self.name == "infinite"
            and self.warmup_steps is None
            and self.cooldown_steps is None
            and self.warmup + self.cooldown + self.anneal >= 1
        ):
            raise ValueError("schedule.warmup + schedule.cooldown + schedule.anneal must be < 1")
        if self.name == "wsd" and self.warmup + self.decay > 1:
            raise ValueError("schedule.warmup + schedule.decay must be <= 1")
        return self


class BufferConfig(Section):
    capacity: int | Literal["all"] = Field("all", description="Buffer size in `capacity_unit`s, or `all` to keep every sequence seen.")
    capacity_unit: Literal["tokens", "sequences"] = Field("tokens", description="Unit of `capacity`.")
    policy: Literal["reservoir", "balanced", "fifo"] = Field(
        "reservoir", description="`reservoir`: uniform over all seen (Algorithm R). `balanced`: equal share per task. `fifo`: newest kept."
    )
    dir: str | None = Field(
        None,
        description="Where this run keeps its buffer (default: `<run>/replay`). The buffer records the run that owns it: "
        "another run may not write into it (start from a copy with `init` instead), `--overwrite` and a restart from "
        "scratch clear it. A sweep gives each run its own `<dir>/<run name>`.",
    )
    init: str | None = Field(
        None,
        description="A buffer kept by an earlier run (its `replay.buffer.dir`, or `<run>/replay`) to start from: its rows "
        "are copied into this run's buffer (the source is only read) and replayed as earlier tasks, whose ids come "
        "before this run's, so the first task replays too. Written by another number of ranks, its rows are dealt anew to this run's (`cpt.replay.remap`); needs the same row length and buffer settings.",
    )
    store: Literal["rows", "refs"] = Field(
        "rows",
        description="What a slot holds: `rows`, the sequence's tokens; `refs`, its 8-byte offset into the task's prepared "
        "token file, read from there when replayed (same runs, a fraction of the disk; not with `init`).",
    )

    @model_validator(mode="before")
    @classmethod
    def _capacity_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict) and "capacity" in data and data["capacity"] != "all":
            data = dict(data)
            data["capacity"] = _to_count(data["capacity"])
        return data

    @model_validator(mode="after")
    def _positive(self) -> BufferConfig:
        if self.capacity != "all" and self.capacity <= 0:
            raise ValueError("replay.buffer.capacity must be > 0 or 'all'")
        return self


class GenerateConfig(Section):
    """Sampling a replay source from the model itself, as it is before task 0 (`replay.sources.N.generate`)."""

    tokens: Count = Field(
        ...,
        gt=0,
        description="Tokens to sample: ⌈tokens / seq_len⌉ sequences, each the start token (the model's BOS, else the "
        "tokenizer's EOS) and seq_len sampled tokens (HF `generate` with the KV cache; EOS does not stop a sequence).",
    )
    temperature: Real = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: Real = Field(
        1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: all)."
    )
    seed: Count = Field(
        0,
        ge=0,
        description="Seed of the sampling: batch b of the source's sequences is sampled under a seed made of (seed, b), so a "
        "fixed seed gives the same sequences on any number of ranks (on one kind of device).",
    )
    batch_size: Count = Field(16, ge=1, description="Sequences sampled together.")


class ReplaySourceConfig(Section):
    """A corpus that is not a task (e.g. a stand-in for a pretrained model's own data): prepared like a task, its training
    rows fill the buffer before task 0 and its held-out loss is evaluated with the tasks'. Or sequences sampled from the
    model before task 0 (`generate`), which have no held-out split."""

    name: str = Field(..., min_length=1, description="Its name in the summary and the report (unique among tasks and sources).")
    path: str | list[str] | None = Field(
        None, description="Its data, as `tasks.N.path` (file, directory, glob or a list). Give `path` or `generate`."
    )
    tokens: Count | None = Field(
        None,
        gt=0,
        description="With `path`: training tokens of it that fill the buffer before task 0: ⌈tokens / seq_len⌉ distinct "
        "sequences of its training split (never its held-out documents), stored under a task id before the run's tasks, so "
        "every task replays them. A split with fewer sequences is refused. (With `generate`: `generate.tokens`.)",
    )
    generate: GenerateConfig | None = Field(
        None,
        description="Instead of `path`: sequences sampled from the model as it is before task 0 (e.g. `{tokens: 2e6, top_p: "
        "0.95}`), stored in the buffer like a corpus's rows; no held-out column. Not under `training.parallel: fsdp`.",
    )
    weight: Real | None = Field(
        None,
        gt=0,
        description="Its replay weight, as a `replay.task_weights` entry for its name. Without `replay.task_weights` every task "
        "(and every source without a weight) then weighs 1; with it, names it does not list weigh 0.",
    )
    format: _FORMATS = Field("auto", description="As `tasks.N.format`.")
    dtype: Literal["uint16", "uint32"] | None = Field(None, description="As `tasks.N.dtype`.")
    text_field: str = Field("text", description="As `tasks.N.text_field`.")
    val_fraction: Real = Field(
        0.05, gt=0, lt=0.5, description="As `tasks.N.val_fraction`: its held-out documents, evaluated like a task's."
    )
    documents: Literal["auto", "blank-lines", "lines"] = Field("auto", description="As `tasks.N.documents`.")

    _path = field_validator("path")(classmethod(lambda cls, v: _check_path(v)))

    @model_validator(mode="after")
    def _path_or_generate(self) -> ReplaySourceConfig:
        if (self.path is None) == (self.generate is None):
            raise ValueError("give `path` (a corpus) or `generate` (sampled from the model), not both and not neither")
        if self.path is not None and self.tokens is None:
            raise ValueError("tokens: how many of its training tokens fill the buffer (required with `path`)")
        if self.generate is not None and self.tokens is not None:
            raise ValueError("tokens: with `generate` the budget is `generate.tokens`")
        return self

    @property
    def fill_tokens(self) -> int:
        """The tokens it fills the buffer with: `tokens`, or `generate.tokens`."""
        return self.generate.tokens if self.generate is not None else self.tokens

    def as_task(self) -> TaskConfig:
        """The source as a single-corpus task: what is prepared (its own cache entry, through the tasks' code path)."""
        return single_corpus_task(self.name, self, self.tokens, self.val_fraction)


class ReplayConfig(Section):
    rate: Real = Field(0.0, ge=0, lt=1, description="α: fraction of every batch drawn from the replay buffer (0: no replay).")
    include_current: bool = Field(False, description="Also replay the current task's earlier sequences.")
    task_weights: dict[str, Real] | None = Field(
        None, description="Sampling weight per task name (default: uniform over stored sequences)."
    )
    prefetch: bool = Field(True, description="Read replay rows in a background thread ahead of the step.")
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    sources: list[ReplaySourceConfig] = Field(
        [],  # pydantic copies a mutable default per instance
        description="Corpora that are not tasks (e.g. `[{name: web-en, path: en-sample.jsonl, tokens: 2e6}]`, a proxy for a "
        "pretrained model's own data): each is prepared like a task, `tokens` of its training split fill the buffer before "
        "task 0 (under task ids before the run's, after `buffer.init`'s), so the first task replays them too, and its held-out "
        "loss is evaluated at every evaluation (summary.json `replay_sources`). Needs `rate` > 0.",
    )

    @model_validator(mode="after")
    def _sources_need_replay(self) -> ReplayConfig:
        if self.sources and self.rate <= 0:
            raise ValueError("replay.sources: they are replayed, so replay.rate must be > 0 (or remove replay.sources)")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"replay.sources: names must be unique, got {names}")
        if self.buffer.store == "refs" and any(s.generate is not None for s in self.sources):
            raise ValueError(
                "replay.buffer.store: refs points into prepared token files, which a generated replay source has none of; use store: rows"
            )
        both = sorted(s.name for s in self.sources if s.weight is not None and s.name in (self.task_weights or {}))
        if both:
            raise ValueError(f"replay.sources: {both} weighed twice (a source's `weight` and replay.task_weights); give one")
        return self

    @model_validator(mode="after")
    def _fifo_keeps_earlier_tasks(self) -> ReplayConfig:
        b = self.buffer
        if self.rate > 0 and b.policy == "fifo" and b.capacity != "all" and not self.include_current:
            # the current task's rows would evict every earlier row, and then nothing is left to replay
            raise ValueError(
                "replay.buffer.policy: fifo with a finite capacity and include_current: false stops replaying once the "
                "current task's rows have evicted the earlier tasks'; use reservoir or balanced, capacity: all, or include_current: true"
            )
        return self


class AlignmentConfig(Section):
    method: Literal["none", "reptile"] = Field(
        "none", description="`reptile`: Reptile meta-updates (efficient MER when combined with replay)."
    )
    k: Count = Field(
        500, gt=0, description="Optimizer steps between meta-updates (500 as in the paper's public code; short runs want less)."
    )
    beta: Real = Field(
        0.7, gt=0, le=1, description="Meta step size: θ ← θ₀ + β·(θ − θ₀). β = 1 is plain training (0.7: see docs/alignment.md)."
    )
    task_end_update: bool = Field(
        True,
        description="Also meta-update at every task end (so at the end of the run too) when fewer than k steps passed since the "
        "last one: every loss-matrix row and task checkpoint holds interpolated weights, and k counts from each task's start. "
        "false: k counts globally across task boundaries (the paper's public code).",
    )
    anchor_device: Literal["same", "cpu"] = Field("same", description="Where the fp32 anchor θ₀ lives; `cpu` saves accelerator memory.")
    probe_every: Count = Field(
        0, ge=0, description="Measure gradient cosine between the current task and earlier tasks every N steps (0: off)."
    )
    probe_batch_size: Count = Field(2, ge=1, description="Sequences per probe batch.")


class MergeConfig(Section):
    """Weight merging at task ends (cpt.alignment.merge): a baseline against forgetting that needs no replayed data."""

    enabled: bool = Field(
        False,
        description="At every task end interpolate the weights toward a reference: θ ← (1 − λ)·θ_ref + λ·θ (WiSE-FT / model "
        "merging); every loss-matrix row and task checkpoint holds the merged weights.",
    )
    lam: Real = Field(0.5, gt=0, le=1, description="λ, the weight kept from the task just trained; 1 is plain training.")
    toward: Literal["previous", "initial"] = Field(
        "previous",
        description="θ_ref: `previous`, the merged weights of the previous task end (the step-0 model before the first); "
        "`initial`, the step-0 model at every task end.",
    )


class CheckpointConfig(Section):
    every: Count = Field(0, ge=0, description="Write a resumable checkpoint every N steps (0: only at task ends).")
    keep: Count = Field(2, ge=1, description="Resumable checkpoints to keep (the newest).")
    task_ends: bool = Field(True, description="Save an HF checkpoint at the end of every task (`checkpoints/task-<i>-<name>`).")
    # `async` is a Python keyword: the attribute is `async_`, the YAML key and the dump say `async`
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_by_name=True, serialize_by_alias=True)
    async_: bool = Field(
        False,
        alias="async",
        description="Write resumable checkpoints in the background: training waits only while the state is copied to host "
        "memory (FSDP2: DCP's `async_save`; one process / DDP: a copy written by a thread), costing host memory for one "
        "copy of model + optimizer state (of a rank's shard under FSDP2). The next checkpoint, a preemption and the end of "
        "the run wait for the write; a checkpoint is renamed into place only once complete.",
    )


class LoggingConfig(Section):
    log_every: Count = Field(10, ge=1, description="Steps between train-loss lines in metrics.jsonl.")
    progress: bool = Field(True, description="Progress bar per task.")
    tensorboard: bool = Field(False, description="Also write TensorBoard events to `<run>/tensorboard`.")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        [],  # pydantic copies a mutable default per instance
        description="Experiment trackers that get the config, every metrics.jsonl record and the summary (rank 0): "
        "`tensorboard` (`<run>/tensorboard`), `wandb` (offline under `<run>/wandb` without an API key; pip install 'cpt[wandb]'), "
        "`mlflow` (`file:<run>/mlruns` unless MLFLOW_TRACKING_URI; pip install 'cpt[mlflow]').",
    )


class RunConfig(Section):
    name: str | None = Field(None, description="Run name for reports (default: the run directory's name).")
    seed: Count = Field(0, ge=0, description="Seed for model init, data order, replay and every RNG.")
    cache_dir: str | None = Field(None, description="Token and tokenizer cache (default: $CPT_CACHE or ~/.cache/cpt).")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    tasks: list[TaskConfig] = Field(..., min_length=1, description="The ordered task sequence.")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: task names must be unique, got {names}")
        sources = [s.name for s in self.replay.sources]
        if set(sources) & set(names):
            raise ValueError(f"replay.sources: {sorted(set(sources) & set(names))} also name a task; give sources names of their own")
        b, seq = self.replay.buffer, self.training.seq_len
        fill = sum(math.ceil(s.fill_tokens / seq) for s in self.replay.sources)
        if fill and b.capacity != "all" and (b.capacity // seq if b.capacity_unit == "tokens" else b.capacity) < fill:
            raise ValueError(
                f"replay.buffer.capacity: {b.capacity} {b.capacity_unit} hold fewer than the {fill} sequences of replay.sources' "
                "tokens, so the fill would evict part of itself; raise the capacity or lower replay.sources.N.tokens"
            )
        if self.replay.task_weights:
            unknown = sorted(set(self.replay.task_weights) - set(names) - set(sources))
            if unknown:
                raise ValueError(
                    f"replay.task_weights: unknown task(s) {unknown}; tasks are {names}"
                    + (f", replay sources {sources}" if sources else "")
                )
        if self.training.strategy == "joint" and self.replay.rate > 0:
            raise ValueError("replay.rate: joint training sees all tasks at once; replay must be 0")
        return self

    @model_validator(mode="after")
    def _merge_checks(self) -> RunConfig:
        """Merging needs task ends to merge at, and Reptile's anchor would pull the weights back past a merge."""
        if not self.merge.enabled:
            return self
        if self.training.strategy == "joint":
            raise ValueError("merge.enabled: joint training has no task ends between tasks to merge at; use strategy sequential")
        if self.alignment.method != "none":
            raise ValueError(
                "merge.enabled: not with alignment.method reptile (its anchor, the unmerged weights, would pull the next "
                "meta-update back past the merge); use one or the other"
            )
        return self

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; `cpt config-reference` lists every key)"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.lr=3e-4` → (["training", "lr"], 3e-4); the value is read as YAML."""
    if "=" not in text:
        raise CptError(f"override {text!r}: expected KEY=VALUE, e.g. training.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise CptError(f"override {text!r}: empty key segment")
    value = yaml.safe_load(raw) if raw.strip() else None
    return parts, _to_float(value) if isinstance(value, str) else value


def apply_override(data: dict, parts: list[str], value: Any, text: str) -> None:
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise CptError(f"override {text!r}: {'.'.join(parts[: i + 1])}: no such list index (have {len(node)})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise CptError(f"override {text!r}: {'.'.join(parts[:i])} is not a section")


def resolve_paths(data: dict, base: Path) -> dict:
    """Make task paths (each entry of a list; a glob stays a glob), tokenizer path, model.init and the buffer dir / init absolute relative to the config file."""

    def fix(p: Any) -> Any:
        if isinstance(p, str) and p and not Path(p).is_absolute():
            return str((base / p).resolve())
        return p

    def fix_source(p: Any) -> Any:
        # a glob stays a glob (its wildcards are matched when the task is read): only the folders before
        # the first wildcard are resolved against the config's folder
        if isinstance(p, str) and p and not Path(p).is_absolute() and any(c in p for c in "*?["):
            parts = Path(p).parts
            fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
            return str((base / Path(*parts[:fixed])).resolve().joinpath(*parts[fixed:]))
        return fix(p)

    def fix_task_path(entry: Any) -> None:
        if isinstance(entry, dict) and "path" in entry:
            entry["path"] = [fix_source(p) for p in entry["path"]] if isinstance(entry["path"], list) else fix_source(entry["path"])

    for task in data.get("tasks") or []:
        fix_task_path(task)
        if isinstance(task, dict) and isinstance(task.get("sources"), list):
            for source in task["sources"]:
                fix_task_path(source)
    for section, key in (("tokenizer", "path"), ("model", "init"), ("cache_dir", None)):
        if key is None:
            if section in data:
                data[section] = fix(data[section])
        elif isinstance(data.get(section), dict) and key in data[section]:
            data[section][key] = fix(data[section][key])
    replay_sources = (data.get("replay") or {}).get("sources") if isinstance(data.get("replay"), dict) else None
    for source in replay_sources if isinstance(replay_sources, list) else []:
        fix_task_path(source)
    buf = (data.get("replay") or {}).get("buffer") if isinstance(data.get("replay"), dict) else None
    if isinstance(buf, dict):
        for key in ("dir", "init"):
            if key in buf:
                buf[key] = fix(buf[key])
    return data


def validate(data: Any, source: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise CptError(f"{source}: expected a mapping of sections at the top level")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise CptError(_format_error(err, source)) from None


def read_yaml_mapping(path: Path, what: str = "config file", expected: str = "a mapping at the top level") -> dict:
    """A YAML file holding a mapping; a missing file, bad YAML or another shape is a one-line CptError."""
    if not path.is_file():
        raise CptError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise CptError(f"{path}: not valid YAML{where}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CptError(f"{path}: expected {expected}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, validate; errors name the file and field."""
    path = Path(path)
    data = read_yaml_mapping(path, "config file", "a mapping of sections at the top level")
    for text in overrides or []:
        parts, value = parse_override(text)
        apply_override(data, parts, value, text)
    resolve_paths(data, path.parent.resolve())
    return validate(data, str(path))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


def _bounds(metadata: list) -> str:
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "min length"}
    out = []
    for item in metadata:
        for attr, sym in symbols.items():
            if hasattr(item, attr):
                out.append(f"{sym} {getattr(item, attr)}")
    return ", ".join(out)


def reference_markdown() -> str:
    """The key reference in Markdown, generated from the schema (written to docs/config.md)."""
    lines = [
        "# Config reference",
        "",
        "Generated by `cpt config-reference` from `cpt/config.py`; every key of a run YAML.",
        "Override any of them on the command line: `cpt train run.yaml training.lr=3e-4 tasks.1.tokens=2e6`.",
        "",
    ]

    def walk(model: type[BaseModel], prefix: str) -> None:
        rows = []
        nested = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if name == "tasks":
                nested.append((TaskConfig, f"{prefix}tasks.N."))
                rows.append((f"{prefix}tasks", "list", "required", field.description or ""))
                continue
            if sub is not None:
                nested.append((sub, f"{prefix}{name}."))
                continue
            item = typing.get_args(ann)[0] if typing.get_origin(ann) is list and typing.get_args(ann) else None
            if isinstance(item, type) and issubclass(item, BaseModel):  # a list of sections (replay.sources): its keys too
                nested.append((item, f"{prefix}{name}.N."))
            optional = (
                [a for a in typing.get_args(ann) if a is not type(None)]
                if typing.get_origin(ann) in (typing.Union, types.UnionType)
                else []
            )
            if len(optional) == 1 and isinstance(optional[0], type) and issubclass(optional[0], BaseModel):  # an optional section
                nested.append((optional[0], f"{prefix}{name}."))
            default = "required" if field.is_required() else repr(field.default)
            typ = _type_name(ann)
            desc = field.description or ""
            bounds = _bounds(field.metadata)
            if bounds:
                desc += f" ({bounds})"
            rows.append((f"{prefix}{field.alias or name}", typ, default, desc))
        if rows:
            lines.append(f"## `{prefix.rstrip('.') or 'top level'}`")
            lines.append("")
            lines.append("| key | type | default | meaning |")
            lines.append("|---|---|---|---|")
            for key, typ, default, desc in rows:
                typ, desc = typ.replace("|", "\\|"), desc.replace("|", "\\|")
                lines.append(f"| `{key}` | {typ} | `{default}` | {desc} |")
            lines.append("")
        for sub, pre in nested:
            walk(sub, pre)

    walk(RunConfig, "")
    return "\n".join(lines)
