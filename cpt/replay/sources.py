"""Replay sources (`replay.sources`): corpora that are not tasks, replayed from the first step.

Continuing a pretrained model (SmolLM2, Llama) usually means not having its pretraining data; a
proxy corpus of the original domain (an English web sample) stands in for it. Each source is
prepared exactly like a task (its own token-cache entry through `cpt.data.tokens.prepare_task`, its
own held-out documents, the run's tokenizer, and a BPE trained by the run learns from it as from a
task), but it is never trained as a task: before task 0, ⌈tokens / seq_len⌉ distinct sequences of
its training split fill the replay buffer, and its held-out split is evaluated at every evaluation
beside the tasks'.

Task ids. The buffer keys rows by task id, and a task replays every id below its own
(`ReplayBuffer.eligible`). The ids are laid out as

    0 … I−1            the rows copied from `replay.buffer.init` (I = `ownership.init_task_offset`)
    I … I+S−1          the S replay sources, in config order
    I+S …              the run's tasks (`replay_task_offset` = I + S)

so task 0 replays the sources (and init's rows) at exactly α from its first step, through the same
plan (`StepPlan` with `replay_first_task`), policies, capacity and weights as any earlier task.

The fill. Source k's sequences are the first n_k positions of one seeded global order of its
training windows (`TaskStream`, stream id `STREAM_BASE + k`); all sources' fill rows together are
dealt to the ranks round-robin (row g of the concatenation to rank g mod W, i.e. source k's counts
are `replay_split(n_k, W, n_0 + … + n_{k−1})`), and each rank stores its contiguous run of every
source's order (`TaskStream.take(n, lo, hi)`), so W shards hold exactly the rows of one process and
each shard's share never exceeds its share of the capacity. The fill happens when the buffer is
made (`cpt.training.build.buffer_for`), before step 0, and is flushed: the buffer's state at every
checkpoint (and its undo journals) includes it, so a resumed run is exact, and a restart from scratch
fills again identically. With `replay.buffer.store: refs` a source's rows are stored as offsets into
its own prepared token file, which the buffer resolves like a task's.

Generated sources (`generate` instead of `path`): without even a proxy corpus, the model's own
samples stand in for its original distribution. `Sampler` draws them from the model as it is before
task 0 (HF `generate` with the KV cache, batched, from the start token), batch b under a seed of
(generate.seed, b), so the rows are the same for a fixed seed on any number of ranks; they fill the
buffer like a corpus's rows (no held-out split, so no column), and the sampling speed goes into the
log and summary.json (`generated.tokens_per_second`, rank 0's share).

What is refused, each in one line: sources with `replay.rate: 0`; a capacity that holds fewer
sequences than the fill, a generated source with `store: refs` (config); a source whose training
split holds fewer sequences than asked (it would store repeats, which a small buffer memorises), or
fewer than one per rank, and a generated source under FSDP2 (here).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cpt.config import GenerateConfig, ReplaySourceConfig, RunConfig, TaskConfig
from cpt.data.prepare import Settings
from cpt.data.streams import TaskStream
from cpt.data.tokenizer import TextTokenizer
from cpt.data.tokens import TaskTokens, check_token_range, prepare_for, source_key
from cpt.errors import CptError
from cpt.replay import ownership
from cpt.replay.mixing import replay_split

STREAM_BASE = 1_000_000  # the sources' fill orders: no task (0, 1, …) nor a task's source (1000·(i+1)+j) uses these ids
FILL_CHUNK = 4096  # global rows per step of the fill: memory is bounded by one chunk of rows


def task_offset(cfg: RunConfig) -> int:
    """The first task id of the run's tasks: after `replay.buffer.init`'s ids and one id per replay source."""
    return ownership.init_task_offset(cfg) + len(cfg.replay.sources)


def source_ids(cfg: RunConfig, replay_task_offset: int) -> list[int]:
    """The buffer task id of each replay source: the S ids just below the run's first task."""
    n = len(cfg.replay.sources)
    if replay_task_offset < n:
        raise CptError(f"replay.sources: {n} source(s) need task ids below the run's first, but it starts at {replay_task_offset}")
    return list(range(replay_task_offset - n, replay_task_offset))


def proxies(cfg: RunConfig) -> list[tuple[int, ReplaySourceConfig]]:
    """(index in replay.sources, source) of the sources read from data (`path`): prepared, tokenizer-trained and evaluated."""
    return [(k, s) for k, s in enumerate(cfg.replay.sources) if s.path is not None]


def corpora(cfg: RunConfig) -> list[tuple[str, TaskConfig]]:
    """The corpora a BPE trained by the run learns from, each with the config field its errors name: the tasks
    (`tasks.N`), then the replay sources read from data, as tasks (`replay.sources.N`)."""
    return [*((f"tasks.{i}", t) for i, t in enumerate(cfg.tasks)), *((f"replay.sources.{k}", s.as_task()) for k, s in proxies(cfg))]


def source_keys(cfg: RunConfig, cache: Path | None) -> list[str]:
    """Each data source's content key (`cpt.data.tokens.source_key`; a missing path is refused naming `replay.sources.N.path`)."""
    return [source_key(s.path, s.format, s.text_field, cache, s.documents, f"replay.sources.{k}.path") for k, s in proxies(cfg)]


def prepare(
    cfg: RunConfig, tokenizer: TextTokenizer, cache: Path, keys: list[str], log, settings: Settings | None = None
) -> list[TaskTokens | None]:
    """Each data source's cache entry (in `proxies` order), made or opened through the tasks' code path (None for a
    `settings.world` > 1 share)."""
    return [
        prepare_for(s.as_task(), tokenizer, cache, log=log, key_of_source=key, settings=settings, field=f"replay.sources.{k}")
        for (k, s), key in zip(proxies(cfg), keys)
    ]


@dataclass(frozen=True)
class Fill:
    """What one source puts into the buffer before task 0 (global: all shards together)."""

    name: str
    task_id: int
    sequences: int
    tokens: int  # sequences × seq_len: the training tokens they hold
    index: int = 0  # in replay.sources
    generate: GenerateConfig | None = None  # sampled from the model instead of read from data


def plan_fills(
    cfg: RunConfig, sources: list[TaskTokens], replay_task_offset: int, world: int, vocab_size: int, sharded: bool = False
) -> list[Fill]:
    """The fill of every source (`sources`: the prepared data sources, in `proxies` order), checked against its data before
    anything is written (one-line CptError otherwise)."""
    seq = cfg.training.seq_len
    data = dict(zip((s.name for _, s in proxies(cfg)), sources))
    fills = []
    for k, (sc, tid) in enumerate(zip(cfg.replay.sources, source_ids(cfg, replay_task_offset))):
        n = math.ceil(sc.fill_tokens / seq)
        field = f"replay.sources.{k}.generate.tokens" if sc.generate is not None else f"replay.sources.{k}.tokens"
        if sc.generate is not None and sharded:
            raise CptError(
                f"replay.sources.{k}.generate: not under training.parallel: fsdp (each rank samples its share alone, which a "
                "sharded model cannot); use ddp, or sample the source once and give it as a path"
            )
        if sc.generate is None:
            tokens = data[sc.name]
            check_token_range(tokens, vocab_size)
            windows = (len(tokens.train) - 1) // seq
            if n > windows:
                raise CptError(
                    f"{field}: {sc.name}'s training split holds {windows:,} sequence(s) of {seq + 1} tokens, fewer than the "
                    f"{n:,} its {sc.tokens:,} tokens ask for (a sequence is never stored twice); lower it to at most "
                    f"{windows * seq:,} or add data"
                )
        if n < world:
            raise CptError(
                f"{field}: {sc.fill_tokens:,} tokens make {n} sequence(s) of {seq}, fewer than one per rank ({world}); "
                f"raise it to at least {world * seq:,}"
            )
        fills.append(Fill(sc.name, tid, n, n * seq, k, sc.generate))
    return fills


def fill_buffer(
    buffer, fills: list[Fill], sources: list[TaskTokens], seed: int, seq_len: int, rank: int, world: int, log, sample=None
) -> None:
    """Store this rank's share of every source's fill rows in `buffer` (see the module), then flush.

    `sources`: the prepared data sources (`proxies` order); `sample(fill, lo, hi)`: rows [lo, hi) of a generated source
    (a `Sampler`)."""
    refs = getattr(buffer, "store", "rows") == "refs"
    data = {t.name: t for t in sources}
    before = 0  # fill rows of the earlier sources: the round-robin deal continues after them
    for f in fills:
        counts = replay_split(f.sequences, world, before)
        lo = int(counts[:rank].sum())
        hi = lo + int(counts[rank])
        if f.generate is not None:
            if sample is None:
                raise CptError(f"replay.sources.{f.index}.generate: sampling needs the model (fill_buffer(..., sample=Sampler(...)))")
            for a in range(lo, hi, FILL_CHUNK):
                buffer.add(sample(f, a, min(a + FILL_CHUNK, hi)), f.task_id)
        else:
            stream = TaskStream(data[f.name].train, seq_len, seed, STREAM_BASE + f.index, name=f.name)
            for a in range(0, f.sequences, FILL_CHUNK):
                b = min(a + FILL_CHUNK, f.sequences)
                mine_lo, mine_hi = max(lo, a), min(hi, b)
                if mine_hi <= mine_lo:
                    stream.take_starts(b - a, 0, 0)  # another rank's rows: only the cursor moves
                    continue
                rows = stream.take(b - a, mine_lo - a, mine_hi - a)
                buffer.add(rows, f.task_id, starts=stream.last_starts) if refs else buffer.add(rows, f.task_id)
        before += f.sequences
        shards = f" over {world} shards" if world > 1 else ""
        how = "sampled from the model" if f.generate is not None else "of its training split"
        log(
            f"replay: filled the buffer with {f.sequences:,} sequences ({f.tokens:,} tokens) {how}, replay source {f.name} "
            f"(task id {f.task_id}){shards}, before task 0"
        )
    buffer.flush()


class Sampler:
    """Sequences of a generated replay source, sampled from the model as it is before task 0 (HF `generate`, KV cache).

    Row g of the source's global order is row g mod batch_size of batch ⌊g / batch_size⌋, and batch b is sampled under a
    torch seed made of (generate.seed, b) inside `torch.random.fork_rng` (the run's own RNG streams are left as they were):
    so any rank computes any row alike, and a rank asked for rows [lo, hi) samples only the batches they fall in. Each row
    is the start token and seq_len sampled tokens; sampling does not stop at EOS (documents run on, as in packed training).
    The time spent and the tokens sampled are recorded in `record.generated` (this rank's)."""

    def __init__(self, model, start_id: int, seq_len: int, device, autocast_dtype, record: SourceRecord, log) -> None:
        self.model, self.start_id, self.seq_len = model, start_id, seq_len
        self.device, self.autocast_dtype, self.record, self.log = device, autocast_dtype, record, log

    def __call__(self, fill: Fill, lo: int, hi: int) -> np.ndarray:
        from transformers import GenerationConfig  # why lazy: only a generated source needs it

        from cpt.training.device import precision

        g = fill.generate
        config = GenerationConfig(
            do_sample=True,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=0,  # HF's default keeps the 50 most likely tokens; top_p alone decides here
            max_new_tokens=self.seq_len,
            use_cache=True,
            bos_token_id=self.start_id,
            pad_token_id=self.start_id,
            eos_token_id=None,  # EOS does not end a sequence
        )
        out = np.empty((hi - lo, self.seq_len + 1), dtype=np.int64)
        t0, sampled = time.perf_counter(), 0
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        was_training = self.model.training
        self.model.eval()
        try:
            for b in range(lo // g.batch_size, -(-hi // g.batch_size)):
                first = b * g.batch_size
                n = min(g.batch_size, fill.sequences - first)
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(int(np.random.SeedSequence([g.seed, b]).generate_state(1)[0]))
                    ids = torch.full((n, 1), self.start_id, dtype=torch.long, device=self.device)
                    with precision(self.device, self.autocast_dtype):
                        rows = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
                rows = rows.cpu().numpy()
                if rows.shape != (n, self.seq_len + 1):
                    raise CptError(
                        f"replay.sources.{fill.index}.generate: the model returned rows of shape {rows.shape}, not {(n, self.seq_len + 1)}"
                    )
                sampled += n * self.seq_len
                a, z = max(lo, first), min(hi, first + n)
                out[a - lo : z - lo] = rows[a - first : z - first]
        finally:
            self.model.train(was_training)
        seconds = time.perf_counter() - t0
        mine = self.record.generated.setdefault(fill.name, {"sampled_tokens": 0, "seconds": 0.0})
        mine["sampled_tokens"] += sampled
        mine["seconds"] += seconds
        self.log(
            f"replay: sampled {sampled:,} tokens of replay source {fill.name} in {seconds:.1f}s ({sampled / max(seconds, 1e-9):,.0f} "
            f"tokens/s, batch {g.batch_size}, temperature {g.temperature:g}, top_p {g.top_p:g}, seed {g.seed})"
        )
        return out


def weights_by_id(cfg: RunConfig, replay_task_offset: int) -> dict[int, float] | None:
    """The replay weight of each buffer task id, from `replay.task_weights` and the sources' `weight`; None: uniform over rows.

    A source's `weight` is a `replay.task_weights` entry for its name. With `replay.task_weights` given, the ids it does not
    name (nor a source's weight) weigh 0, as they always did; without it, every other id (tasks, unweighted sources,
    `buffer.init`'s) weighs 1, so giving one source a weight never silences the tasks."""
    rp = cfg.replay
    ids = {n: replay_task_offset + i for i, n in enumerate(cfg.task_names)}
    ids |= dict(zip((s.name for s in rp.sources), source_ids(cfg, replay_task_offset)))
    own = {s.name: float(s.weight) for s in rp.sources if s.weight is not None}
    if rp.task_weights is None and not own:
        return None
    if rp.task_weights is not None:
        return {ids[n]: float(w) for n, w in {**rp.task_weights, **own}.items()}
    return {i: 1.0 for i in range(replay_task_offset - len(rp.sources))} | {i: own.get(n, 1.0) for n, i in ids.items()}


class SourceRecord:
    """What the summary reports of the replay sources and a resumed run must still know: the data sources' held-out losses
    before training and at each task end, and the time rank 0 spent sampling the generated ones. Checkpointed in state.pt
    like a hook's state; it acts on no step (it is in the run's hook list only so that every checkpoint keeps it)."""

    name = "replay_sources"
    per_rank = False

    def __init__(self, names: list[str]) -> None:
        self.names = names  # the sources with a held-out split
        self.initial: dict[str, float] | None = None
        self.after_task: list[dict[str, float]] = []
        self.generated: dict[str, dict] = {}  # name -> {"sampled_tokens", "seconds"} (rank 0's share)

    def after_step(self, step: int, skipped: bool = False) -> list[dict]:
        return []

    def state_dict(self) -> dict:
        return {
            "initial": self.initial,
            "after_task": [dict(r) for r in self.after_task],
            "generated": {k: dict(v) for k, v in self.generated.items()},
        }

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            return
        self.initial = state.get("initial")
        self.after_task = [dict(r) for r in state.get("after_task", [])]
        self.generated = {k: dict(v) for k, v in state.get("generated", {}).items()}


def summary(fills: list[Fill], record: SourceRecord, coverage: dict, stored_at_end: list[int]) -> dict:
    """summary.json `replay_sources`: per data source its held-out loss before training (`initial`), at each task end
    (`after_task`), `forgetting` = final − initial (positive: the original domain got worse) and what its held-out set
    covers; per generated source how it was sampled and how fast (`generated`: rank 0's share, tokens/s); for both the
    fill and the rows of it the buffer still held at the end (all shards)."""
    out = {}
    for f, at_end in zip(fills, stored_at_end):
        entry: dict = {"task_id": f.task_id, "fill": {"sequences": f.sequences, "tokens": f.tokens}, "stored_at_end": int(at_end)}
        if f.generate is not None:
            done = record.generated.get(f.name, {})
            seconds = float(done.get("seconds", 0.0))
            entry["generated"] = {
                **f.generate.model_dump(mode="json"),
                "sampled_tokens": int(done.get("sampled_tokens", 0)),
                "seconds": seconds,
                "tokens_per_second": done.get("sampled_tokens", 0) / seconds if seconds > 0 else None,
            }
        else:
            initial = (record.initial or {}).get(f.name)
            after = [row.get(f.name) for row in record.after_task]
            final = after[-1] if after else None
            entry |= {
                "initial": initial,
                "after_task": after,
                "forgetting": None if initial is None or final is None else final - initial,
                "heldout": coverage.get(f.name),
            }
        out[f.name] = entry
    return out
