"""From a validated config to the parts of a run, one small function per part (litgpt's `setup()`).

    tokenizer + prepared tasks   prepare_data     (before the process group: local rank 0 tokenizes, the others
                                                   poll a marker file, then open the cache; agree_on_data after)
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

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cpt import atomic
from cpt.alignment.merge import TaskEndMerge
from cpt.alignment.probe import AlignmentProbe
from cpt.alignment.reptile import MetaUpdates, Reptile, optimizer_params
from cpt.config import RunConfig, TaskConfig
from cpt.data.mixture import MixtureStream
from cpt.data.prepare import Settings
from cpt.data.readers import iter_documents
from cpt.data.streams import JointStream, TaskStream
from cpt.data.tokenizer import TextTokenizer, cache_root, load_tokenizer, train_or_load_bpe
from cpt.data.tokens import TaskTokens, check_token_range, prepare_for, split_documents, task_key, token_dtype
from cpt.errors import CptError
from cpt.model import NotReplayable, enable_activation_checkpointing, meta_model_for, model_for
from cpt.replay import ownership
from cpt.replay import sources as replay_sources
from cpt.replay.buffer import ReplayBuffer, copy_shard, peek, remove_shard
from cpt.replay.mixing import MixedBatchSource, StepPlan
from cpt.replay.prefetch import ReplayPrefetcher
from cpt.training import distributed
from cpt.training.hooks import AfterStepHook, OptimizerReset
from cpt.training.parallel import OneProcess, parallel_for


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ data
def _given_tokenizer(cfg: RunConfig) -> TextTokenizer | None:
    """`tokenizer.path`, else model.init's own tokenizer; None when a BPE is to be trained. Only loads, never trains."""
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
    return None


def _training_documents(task: TaskConfig, field: str) -> Iterator[str]:
    """A task's training documents in reading order (the held-out ones left out); a task of sources: each source's, in
    turn. `field`: the task's config field (`tasks.2`, `replay.sources.0`), which read errors name."""
    for j, part in enumerate(task.parts()):
        where = f"{field}.path" if task.sources is None else f"{field}.sources.{j}.path"
        docs = iter_documents(part.path, part.format, part.text_field, documents=part.documents, where=where)
        yield from split_documents(docs, part.val_fraction, "train")


def bpe_sample(docs: Iterable[str], budget: int) -> tuple[list[str], dict]:
    """The documents a BPE learns from: every k-th of `docs`, k the smallest power of two whose documents
    total at most `budget` bytes of UTF-8; (texts, a record of what was taken).

    One pass, with no need to know the total in advance: documents are kept while they fit; whenever
    the kept ones pass the bound, every other one is dropped and k doubles. So the sample is spread
    evenly over the whole stream (a corpus sorted by source or date is not represented by its head
    only), and it depends only on the documents, never on how they are read. A kept document longer than `budget` is cut to
    its first `budget` bytes (at a character boundary), so the sample never passes the bound. Memory:
    the sample, at most `budget` bytes plus one document. The record's `whole` is true when the sample
    is every document uncut, i.e. the same texts as no bound at all.
    """
    kept: list[tuple[int, str, int]] = []  # (document index, text, UTF-8 bytes)
    stride, total, seen, cut = 1, 0, 0, False
    for i, doc in enumerate(docs):
        seen += 1
        if i % stride:
            continue
        raw = doc.encode("utf-8")
        if len(raw) > budget:
            doc, cut = raw[:budget].decode("utf-8", "ignore"), True
            raw = doc.encode("utf-8")
        kept.append((i, doc, len(raw)))
        total += len(raw)
        while total > budget:
            stride *= 2
            kept = [k for k in kept if k[0] % stride == 0]
            total = sum(k[2] for k in kept)
    record = {"documents": seen, "kept": len(kept), "stride": stride, "bytes": total, "whole": stride == 1 and not cut}
    return [k[1] for k in kept], record


def _sample_fits_whole(task: TaskConfig, index: int, field: str, key: str, budget: int, cache: Path, samples: dict, log) -> bool:
    """Whether task `index`'s training split is under the BPE sample bound (so its sample is all of it).

    Learnt by reading the task once (`bpe_sample`, whose texts are kept in `samples` for the trainer)
    and remembered in `<cache>/tokenizers/samples/` under the task's source key, validation fraction
    and the bound, so a warm start reads no text."""
    digest = hashlib.sha256(f"{key}|{task.val_fraction}|{budget}".encode()).hexdigest()[:20]
    record_file = cache / "tokenizers" / "samples" / f"{digest}.json"
    try:
        return bool(json.loads(record_file.read_text())["whole"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    t0 = time.perf_counter()
    samples[index], record = bpe_sample(_training_documents(task, field), budget)
    record_file.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(record_file, record)
    took = ("all" if record["whole"] else "all, one or more cut to the bound") if record["stride"] == 1 else f"1 in {record['stride']}"
    log(
        f"tokenizer sample: {task.name}: {took} of {record['documents']:,} training documents, {record['bytes'] / 1e6:.1f} MB "
        f"(tokenizer.sample_mb {budget / 1e6:g}; {time.perf_counter() - t0:.1f}s)"
    )
    return record["whole"]


def load_or_train_tokenizer(cfg: RunConfig, cache: Path, source_keys: list[str], log=_log) -> TextTokenizer:
    """`tokenizer.path`, else model.init's own tokenizer, else a byte-level BPE trained on a bounded sample
    of the tasks' training splits (cached).

    The sample: at most `tokenizer.sample_mb` of each task's training documents (`bpe_sample`; 0: all
    of them), so the trainer's time and memory do not grow with the corpus. The BPE's cache key names
    what it learns from: each task's source key and validation fraction, the vocabulary settings, and,
    only for a task larger than the bound, the bound. A task under the bound is used whole and adds
    nothing to the key, so a tokenizer of small tasks (the bundled handbook, ~1 MB a language) keeps
    the key and fingerprint it had before the bound existed, and so do the token-cache entries made with it.
    Cost: finding a task's sample reads its text once more (no tokenizing) and holds the sample, so
    the trainer's input is at most `sample_mb` × tasks. A run started before the bound existed, on a
    task over it, trained on everything: resuming it needs `tokenizer.sample_mb: 0` in its config.yaml.
    """
    given = _given_tokenizer(cfg)
    if given is not None:
        return given
    tc = cfg.tokenizer
    budget = int(tc.sample_mb * 1e6)
    samples: dict[int, list[str]] = {}  # texts of the tasks read while finding the key
    parts = []
    corpora = replay_sources.corpora(cfg)  # the tasks, then the replay sources: a BPE learns from both alike
    for i, (key, (field, t)) in enumerate(zip(source_keys, corpora)):
        whole = not budget or _sample_fits_whole(t, i, field, key, budget, cache, samples, log)
        parts.append(f"{key}:{t.val_fraction}" + ("" if whole else f":sample={budget}B"))
    settings = f"{'|'.join(parts)}|{tc.vocab_size}|{tc.min_frequency}"
    key = hashlib.sha256(settings.encode()).hexdigest()[:20]

    def texts():
        # consumed only when the BPE is not cached yet; a task not read above (its record was cached) is read now
        for i, (field, t) in enumerate(corpora):
            if not budget:
                yield from _training_documents(t, field)
                continue
            docs = samples.pop(i, None)
            yield from docs if docs is not None else bpe_sample(_training_documents(t, field), budget)[0]

    t0 = time.perf_counter()
    tok = train_or_load_bpe(key, texts(), tc.vocab_size, tc.min_frequency, cache)
    log(f"tokenizer: byte-level BPE, vocab {tok.vocab_size} ({tok.source}, {time.perf_counter() - t0:.1f}s)")
    return tok


@dataclass
class Data:
    tokenizer: TextTokenizer
    tasks: list[TaskTokens]
    source_keys: list[str]  # each task's source content hash (run.json keeps them; a resume checks them)
    marker: Path | None = None  # under torchrun: the readiness marker this rank wrote (local rank 0) or read
    wrote_marker: bool = False
    replay_sources: list[TaskTokens] | None = None  # replay.sources, prepared like tasks (cpt.replay.sources)
    replay_source_keys: list[str] | None = None


def settings_of(cfg: RunConfig, **changes) -> Settings:
    """How `cpt train` spreads the tokenizing of a task not prepared yet (`prepare` section; never changes the tokens)."""
    return Settings(workers=cfg.prepare.workers, shard_mb=cfg.prepare.shard_mb, progress=cfg.logging.progress, **changes)


def _prepare(cfg: RunConfig, cache: Path, log, settings: Settings | None = None) -> Data:
    """Hash the sources, load or train the tokenizer, tokenize every task into the cache (each step once, then cached)."""
    # hashes each file once; warm: a stat per file
    keys = [task_key(t, cache, i) for i, t in enumerate(cfg.tasks)]
    extra = replay_sources.source_keys(cfg, cache)
    tokenizer = load_or_train_tokenizer(cfg, cache, keys + extra, log)
    settings = settings or settings_of(cfg)
    tasks = [
        prepare_for(t, tokenizer, cache, log=log, key_of_source=key, index=i, settings=settings)
        for i, (key, t) in enumerate(zip(keys, cfg.tasks))
    ]
    return Data(
        tokenizer, tasks, keys, replay_sources=replay_sources.prepare(cfg, tokenizer, cache, extra, log, settings), replay_source_keys=extra
    )


def prepare_config(
    cfg: RunConfig, settings: Settings, *, tokenizer_only: bool = False, require_tokenizer: bool = False, log=_log
) -> list[str]:
    """`cpt prepare`: the tokenizer and every task's cache entry (or, with `settings.world` > 1, this
    machine's share of their shards); returns the lines of the manifest table it prints.

    `require_tokenizer`: refuse to train a BPE here (the ranks of a many-machine preparation must all
    use one tokenizer made before: `tokenizer.path` or model.init's; `cpt prepare --tokenizer-only` trains a BPE once and prints its path)."""
    cache = cache_root(cfg.cache_dir)
    keys = [task_key(t, cache, i) for i, t in enumerate(cfg.tasks)]
    extra = replay_sources.source_keys(cfg, cache)
    if require_tokenizer and not cfg.tokenizer.path and not cfg.model.init:
        raise CptError(
            "tokenizer.path: the machines of a shared preparation (--world > 1) must all tokenize with one tokenizer made "
            "before; set tokenizer.path (`cpt prepare CONFIG --tokenizer-only` trains the BPE once and prints its path)"
        )
    tokenizer = load_or_train_tokenizer(cfg, cache, keys + extra, log)
    lines = [f"tokenizer: {tokenizer.source} (vocab {tokenizer.vocab_size}, eos {tokenizer.eos_id}, fingerprint {tokenizer.fingerprint})"]
    if tokenizer_only:
        return lines
    prepared = [
        (t.name, prepare_for(t, tokenizer, cache, log=log, key_of_source=key, index=i, settings=settings))
        for i, (key, t) in enumerate(zip(keys, cfg.tasks))
    ]
    sources = replay_sources.prepare(cfg, tokenizer, cache, extra, log, settings)
    prepared += [(f"{s.name} (replay source)", t) for (_, s), t in zip(replay_sources.proxies(cfg), sources)]
    w = max([12, *(len(name) for name, _ in prepared)])  # the name column fits the longest name
    lines.append(f"{'task':<{w}} {'documents':>10} {'train tokens':>14} {'val tokens':>12} {'max id':>7} {'shards':>6}  entry")
    for name, task in prepared:
        if task is None:
            lines.append(f"{name:<{w}} share {settings.rank} of {settings.world} done; run `cpt prepare` once more (world 1) to finish")
            continue
        m = task.meta
        shards = sum(len(p.meta.get("shards", [1])) for p in (task.parts or [task]))
        top = max(m.get("max_train_id", -1), m.get("max_val_id", -1))
        lines.append(
            f"{name:<{w}} {m['documents']:>10,} {m['train_tokens']:>14,} {m['val_tokens']:>12,} {top:>7} {shards:>6}  "
            + ", ".join(str(p.directory) for p in (task.parts or [task]))
        )
    return lines


def launch_id() -> str:
    """What names this launch on this node, the same for all its local ranks: torchrun's run id and
    restart count (else MASTER_ADDR:MASTER_PORT), the attempt's log directory torchrun makes afresh for
    every launch (from TORCHELASTIC_ERROR_FILE, when set) and the host."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        parts = [f"{env['TORCHELASTIC_RUN_ID']}-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"]
    else:
        parts = [f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"]
    if env.get("TORCHELASTIC_ERROR_FILE"):  # <log dir>/<run id>_<random>/attempt_<n>/<local rank>/error.json
        parts.append(str(Path(env["TORCHELASTIC_ERROR_FILE"]).parent.parent))
    parts.append(socket.gethostname())
    return "|".join(parts)


def ready_marker(cfg: RunConfig, cache: Path) -> Path:
    """`<cache>/ready/<launch>-<hash>.json`: where local rank 0 says the data of this launch and config is prepared.

    The hash covers the launch (`launch_id`) and the data-relevant config (tasks but their budgets,
    tokenizer section, model.init), so two runs of one launch (a sweep) with other data never share one."""
    data = {
        "tasks": [t.model_dump(mode="json", exclude={"tokens"}) for t in cfg.tasks],
        "tokenizer": cfg.tokenizer.model_dump(mode="json"),
        "init": cfg.model.init,
    }
    if cfg.replay.sources:  # only when present, so the markers of runs without sources keep their names
        data["replay_sources"] = [s.model_dump(mode="json", exclude={"tokens", "weight"}) for s in cfg.replay.sources]
    launch = launch_id()
    digest = hashlib.sha256(json.dumps([launch, data], sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", launch.split("|")[0])[:48]
    return cache / "ready" / f"{name}-{digest}.json"


def wait_for_marker(
    marker: Path,
    timeout_s: float,
    rank: int,
    log=_log,
    poll_s: float = 1.0,
    progress_s: float = 60.0,
    who: str = "local rank 0",
    what: str = "prepare the data",
    hint: str = "check that rank's log, or raise training.data_wait_s when tokenizing takes longer",
    alive: tuple[Path, float] | None = None,
) -> dict:
    """Poll for `marker` (written whole by `who`, `cpt.atomic`) and return its record; no collective is involved.

    A progress line every `progress_s`; a CptError naming the working rank and the marker after
    `timeout_s` (`training.data_wait_s`), or at once when `who` recorded a failure in it. `alive`: (a heartbeat
    file `who` touches while it works, the longest silence): a CptError once that file is older than that."""
    t0 = time.monotonic()
    next_line = t0 + progress_s
    node = " of this node" if who == "local rank 0" else ""  # a node's own preparing rank; else the job's rank 0
    while True:
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict):
            if record.get("error"):
                raise CptError(f"rank {rank}: {who}{node} could not {what}: {record['error']}")
            return record
        waited = time.monotonic() - t0
        if alive is not None:
            try:
                silent = time.time() - alive[0].stat().st_mtime
            except OSError:  # not touched yet, or removed as the marker appeared: read the marker again first
                silent = 0.0
            if silent > alive[1]:
                raise CptError(
                    f"rank {rank}: {who} has not been heard from for {silent:.0f}s (its heartbeat {alive[0]}; "
                    f"training.dist_timeout_s {alive[1]:g}s) while it was to {what}: it has most likely died; check its log"
                )
        if waited >= timeout_s:
            raise CptError(
                f"rank {rank}: waited {waited:.0f}s (training.data_wait_s) for {who}{node}{f' ({socket.gethostname()})' if node else ''} "
                f"to {what}, but its marker {marker} "
                f"did not appear; {hint}"
            )
        if time.monotonic() >= next_line:
            log(f"rank {rank}: waiting for {who} to {what} ({waited / 60:.0f} min; marker {marker})")
            next_line += progress_s
        time.sleep(max(0.0, min(poll_s, timeout_s - waited)))


HEARTBEAT_S = 10.0  # how often rank 0 says it is alive while it works alone (on_rank_0)


def on_rank_0(out: Path, name: str, work, rank: int, log, wait_s: float, silent_s: float, poll_s: float = 1.0) -> None:
    """Collective: rank 0 runs `work()` (e.g. dealing a replay buffer to another number of ranks: O(buffer), possibly
    longer than `training.dist_timeout_s`) while the other ranks poll a marker file in `out` (a shared directory: every
    rank opens its shard there) for up to `wait_s` (`training.data_wait_s`) — no collective waits meanwhile, so the
    process group's timeout does not bound the work.

    A failure on rank 0 is recorded in the marker (rank 0 then lingers a few polls so the others read it before
    torchrun stops them) and ends every rank with its message. While it works, rank 0 touches a heartbeat file every
    `HEARTBEAT_S`; a rank that finds it older than `silent_s` (`training.dist_timeout_s`: as long as a collective would
    have waited for a dead peer) stops, saying rank 0 has gone. Rank 0 removes stale files before a first barrier and
    its files after a last one, so none is ever read stale."""
    stem = out / f".{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}"
    marker, alive = stem.with_name(stem.name + ".done.json"), stem.with_name(stem.name + ".alive")
    if rank == 0:
        marker.unlink(missing_ok=True)
        alive.unlink(missing_ok=True)
    distributed.barrier()
    what = name.replace("-", " ")
    if rank == 0:
        if not distributed.active():
            work()
            return
        alive.touch()
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                alive.touch()

        beating = threading.Thread(target=beat, name="cpt-heartbeat", daemon=True)
        beating.start()
        try:
            work()
            atomic.write_json(marker, {"done": True})
        except BaseException as err:
            stop.set()
            atomic.write_json(marker, {"error": str(err) if isinstance(err, CptError) else f"{type(err).__name__}: {err}"})
            time.sleep(3 * poll_s)  # the others read it before torchrun, seeing this rank exit, stops them
            raise
        finally:
            stop.set()
            beating.join()
    else:
        hint = "check rank 0's log, or raise training.data_wait_s when that work takes longer"
        wait_for_marker(marker, wait_s, rank, log, poll_s, who="rank 0", what=what, hint=hint, alive=(alive, silent_s))
    distributed.barrier()
    if rank == 0:
        marker.unlink(missing_ok=True)
        alive.unlink(missing_ok=True)


def _open_prepared(cfg: RunConfig, cache: Path, record: dict, log) -> Data:
    """The data local rank 0 prepared, from its marker: the tokenizer loaded, each cache entry opened (no hashing, no tokenizing)."""
    keys, recorded = record["source_keys"], record["tokenizer"]
    if len(keys) != len(cfg.tasks):
        raise CptError(f"the readiness marker names {len(keys)} task(s), the config {len(cfg.tasks)}; another config wrote it")
    tokenizer = _given_tokenizer(cfg) or load_tokenizer(recorded["source"])
    if (tokenizer.fingerprint, tokenizer.eos_id) != (recorded["fingerprint"], recorded["eos_id"]):
        raise CptError(f"tokenizer: {tokenizer.source} is not the tokenizer local rank 0 prepared the data with (it changed meanwhile)")
    tasks = [prepare_for(t, tokenizer, cache, log=log, key_of_source=key, index=i) for i, (key, t) in enumerate(zip(keys, cfg.tasks))]
    extra = list(record.get("replay_source_keys") or [])
    if len(extra) != len(replay_sources.proxies(cfg)):
        raise CptError(
            f"the readiness marker names {len(extra)} replay source(s), the config {len(replay_sources.proxies(cfg))}; another config wrote it"
        )
    sources = replay_sources.prepare(cfg, tokenizer, cache, extra, log)
    return Data(tokenizer, tasks, list(keys), replay_sources=sources, replay_source_keys=extra)


def prepare_data(cfg: RunConfig, log, rank: int = 0, world: int = 1, local_rank: int = 0) -> Data:
    """The tokenizer and every task's token files, before the process group forms (so in no collective).

    One process: prepared here. Under torchrun, local rank 0 of each node prepares (hashes, trains or
    loads the tokenizer, tokenizes: hours at scale) and then writes the readiness marker
    (`ready_marker`) with the source keys and the tokenizer; the node's other ranks poll for it for up
    to `training.data_wait_s` (`wait_for_marker`), then load the tokenizer and open the entries. A
    failure is written into the marker too (torchrun stops the other ranks anyway). `agree_on_data`,
    once the group has formed, checks that all ranks hold the same data and removes the marker.
    """
    cache = cache_root(cfg.cache_dir)
    if world <= 1:
        return _prepare(cfg, cache, log)
    marker = ready_marker(cfg, cache)
    if local_rank != 0:
        progress = _log if local_rank == 1 else (lambda msg: None)  # one waiting line per node
        data = _open_prepared(cfg, cache, wait_for_marker(marker, cfg.training.data_wait_s, rank, progress), log)
        data.marker = marker
        return data
    marker.unlink(missing_ok=True)  # a stale marker of an earlier launch of the same name
    marker.parent.mkdir(parents=True, exist_ok=True)
    stamp = {"cpt": 1, "launch": launch_id(), "rank": rank, "pid": os.getpid(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        data = _prepare(cfg, cache, log)
    except Exception as err:
        with contextlib.suppress(Exception):  # the original error is the one to report
            atomic.write_json(marker, {**stamp, "error": str(err) if isinstance(err, CptError) else f"{type(err).__name__}: {err}"})
        raise
    tok = data.tokenizer
    record = {
        **stamp,
        "source_keys": data.source_keys,
        "tokenizer": {"source": tok.source, "fingerprint": tok.fingerprint, "eos_id": tok.eos_id},
        "entries": [str(t.directory) for t in data.tasks],
        "replay_source_keys": data.replay_source_keys or [],
    }
    atomic.write_json(marker, record, indent=1)
    data.marker, data.wrote_marker = marker, True
    return data


def agree_on_data(data: Data) -> None:
    """Once the process group has formed: every rank must hold rank 0's source keys and tokenizer (one
    small all-gather; a stale or foreign marker cannot go unnoticed); then local rank 0 removes its marker,
    which every rank of its node has read by now. A no-op in one process."""
    views = distributed.gather_to_all([data.source_keys, data.tokenizer.fingerprint, data.replay_source_keys or []])
    if data.wrote_marker and data.marker is not None:
        data.marker.unlink(missing_ok=True)
    for r, view in enumerate(views):
        if view != views[0]:
            raise CptError(
                f"rank {r} prepared other data than rank 0 (source keys or tokenizer differ); every node must see the same "
                f"task files and tokenizer{f' (readiness marker {data.marker})' if data.marker else ''}"
            )


# ------------------------------------------------------------------ model
def model_and_parallel(
    cfg: RunConfig, data: Data, device: torch.device, autocast_dtype, world: int, log
) -> tuple[torch.nn.Module, OneProcess]:
    """The run's model on its device, wrapped for one process, DDP or FSDP2 (and compiled if asked).

    Under FSDP2 (`training.fsdp_init: meta`) the model is built on the meta device, sharded, and then
    each rank fills only its shards (`cpt.model.MetaModel`): the same weights as a whole build, at about
    a shard's memory per rank. Every rank's peak memory at this point is logged."""
    tr = cfg.training
    parallel = parallel_for(tr.parallel, world, device, autocast_dtype)
    deferred = None
    if parallel.sharded and tr.fsdp_init == "meta":
        try:
            deferred = meta_model_for(cfg, data.tokenizer.vocab_size, data.tokenizer.eos_id)
        except NotReplayable as why:
            log(f"fsdp: building the whole model on every rank: it cannot be filled shard by shard ({why})")
    model = deferred.model if deferred is not None else model_for(cfg, data.tokenizer.vocab_size, data.tokenizer.eos_id)
    vocab = model.get_input_embeddings().weight.shape[0]
    for task in data.tasks:
        check_token_range(task, vocab)
    if deferred is None:
        model.to(device)
    if tr.activation_checkpointing:
        enable_activation_checkpointing(model)
    parallel.wrap(model, tr.compile)
    if deferred is not None:
        deferred.materialise(device)
    if parallel.compiled:
        log(f"compile: {'; '.join(parallel.compiled)} (torch.compile{', under DDP' if parallel.kind == 'DDP' else ''})")
    how = (
        f"built on meta, sharded, then {deferred.source}"
        if deferred is not None
        else "built whole" + (" on every rank" if world > 1 else "")
    )
    log(f"memory at start ({parallel.kind}, model {how}): {start_memory(device, world)}")
    return model, parallel


def start_memory(device: torch.device, world: int) -> str:
    """Each rank's peak memory so far, gathered (collective under torchrun): the host's peak RSS
    (`getrusage`, the whole process: interpreter, torch, data preparation on local rank 0) and on CUDA
    the peak of `torch.cuda.max_memory_allocated`."""
    peak = {"host_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if device.type == "cuda":
        peak["device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    ranks = distributed.gather_to_all(peak) if world > 1 else [peak]
    parts = []
    for r, m in enumerate(ranks):
        line = f"host peak RSS {m['host_mb']:,.0f} MiB" + (f", device peak {m['device_mb']:,.0f} MiB" if "device_mb" in m else "")
        parts.append(f"rank {r}: {line}" if world > 1 else line)
    return "; ".join(parts)


# ------------------------------------------------------------------ data order
def streams_for(cfg: RunConfig, tasks: list[TaskTokens], rank: int, world: int) -> tuple[list, list[str], list[int]]:
    """(one stream per row of the loss matrix, the rows' names, their budgets of new tokens)."""
    tr = cfg.training
    # global streams (every rank the same cursor); the batch source hands each rank its slice of a step's rows
    streams = [_stream(t, tr.seq_len, cfg.seed, i) for i, t in enumerate(tasks)]
    batch = tr.batch_size * tr.grad_accum * world
    for s in streams:
        if s.windows_per_epoch < batch:
            raise CptError(
                f"task {s.name!r}: its training split holds {s.windows_per_epoch} sequence(s) of "
                f"{s.row_len} tokens, less than one global batch ({batch} = training.batch_size × grad_accum × {world} rank(s)); "
                "add data or lower training.batch_size / training.seq_len"
            )
    if tr.strategy == "joint":
        return [JointStream(streams, [t.tokens for t in cfg.tasks], cfg.seed)], ["joint"], [sum(t.tokens for t in cfg.tasks)]
    return streams, [t.name for t in cfg.tasks], [t.tokens for t in cfg.tasks]


def _stream(task: TaskTokens, seq_len: int, seed: int, index: int):
    """A task's training stream; a task of weighted sources draws from one stream per source (exact shares)."""
    if not task.parts:
        return TaskStream(task.train, seq_len, seed, index, name=task.name)
    # each source's own order: ids that no single-corpus task (0, 1, …) takes
    parts = [TaskStream(p.train, seq_len, seed, 1000 * (index + 1) + j, name=p.name) for j, p in enumerate(task.parts)]
    return MixtureStream(parts, task.weights, task.name)


def plan_for(cfg: RunConfig, budgets: list[int], world: int, replay_task_offset: int) -> StepPlan:
    """Which task each step trains and how many of its rows are replayed (α, exactly)."""
    tr, rp = cfg.training, cfg.replay
    return StepPlan.build(
        # one plan for all ranks: the global batch is batch × accum × ranks, each rank trains its slice of it
        budgets,
        tr.seq_len,
        tr.batch_size * tr.grad_accum * world,
        rp.rate,
        # with a buffer of earlier tasks (replay.buffer.init), the first task replays too
        rp.include_current or replay_task_offset > 0,
    )


# ------------------------------------------------------------------ replay
def buffer_for(
    cfg: RunConfig,
    out: Path,
    run_id: str | None,
    rank: int,
    world: int,
    vocab_size: int,
    resume: bool,
    log,
    tasks: list[TaskTokens] | None = None,
    *,
    replay_task_offset: int = 0,
    sources: list[TaskTokens] | None = None,
    fills: list[replay_sources.Fill] | None = None,
    sample: replay_sources.Sampler | None = None,
) -> tuple[ReplayBuffer | None, ReplayPrefetcher | None]:
    """This rank's buffer shard: reopened on resume; else made empty (or copied from replay.buffer.init),
    then filled with this rank's share of the replay sources' rows (`fills`, `cpt.replay.sources`) before step 0.

    `cpt.training.loop.train` has checked (ownership.check_buffers) that a shard found here may be cleared.
    `tasks`: the run's prepared tasks; with `replay.buffer.store: refs` the buffer resolves a stored
    (task id, offset) in task id's training split, or a replay source's (refs refuse `init`, so the
    only ids before the tasks' are the sources').
    """
    if cfg.replay.rate <= 0:
        return None, None
    bc = cfg.replay.buffer
    ownership.check_store(cfg)
    directory = ownership.buffer_dir(cfg, out)
    row_len = cfg.training.seq_len + 1
    owner = ownership.owner_record(run_id, out, cfg) if run_id else None
    resolver = None
    if bc.store == "refs":
        if tasks is None:
            raise CptError("replay.buffer.store: refs needs the run's tasks to resolve rows (buffer_for(..., tasks=...))")
        resolver = {replay_task_offset + i: t.train for i, t in enumerate(tasks)}
        data = {s.name: s for s in sources or []}
        resolver |= {f.task_id: data[f.name].train for f in fills or [] if f.generate is None}
    if resume:
        buffer = ReplayBuffer.open(directory, rank, store=bc.store, resolver=resolver)
        if buffer.row_len != row_len:
            raise CptError(f"{directory}: buffer rows hold {buffer.row_len} tokens but training.seq_len + 1 = {row_len}")
    else:
        remove_shard(directory, rank)  # a stale shard of this run directory (never another run's)
        if rank == 0:  # and the shards of more ranks than this start has (a restart from scratch on fewer): stale rows
            for meta in directory.glob("shard-[0-9][0-9][0-9].meta.json"):
                if int(meta.name[6:9]) >= world:
                    remove_shard(directory, int(meta.name[6:9]))
        if bc.init:
            source = init_source_for(cfg, out, world, rank, log)  # collective
            copy_shard(source, directory, rank)
            if source != Path(bc.init):
                distributed.barrier()  # every rank has copied its shard of the dealt buffer: it can go
                if rank == 0:
                    shutil.rmtree(source, ignore_errors=True)
            buffer = ReplayBuffer.open(directory, rank, store="rows")
            log(f"replay: copied {buffer.fill} sequence(s) per shard from {bc.init} (replay.buffer.init)")
        else:
            capacity = ownership.shard_capacity(ownership.global_capacity_rows(cfg), world, rank)
            dtype = token_dtype(vocab_size)
            buffer = ReplayBuffer(
                directory, row_len, capacity, bc.policy, dtype, cfg.seed, rank, owner=owner, store=bc.store, resolver=resolver
            )
        if fills:
            replay_sources.fill_buffer(buffer, fills, sources or [], cfg.seed, cfg.training.seq_len, rank, world, log, sample)
        if owner is not None:
            buffer.set_owner(owner)
    prefetcher = ReplayPrefetcher(buffer) if cfg.replay.prefetch else None  # it attaches itself to the buffer
    return buffer, prefetcher


def init_source_for(cfg: RunConfig, out: Path, world: int, rank: int, log) -> Path:
    """Where this run's ranks copy their shards of `replay.buffer.init` from. The directory itself when as many ranks
    wrote it as this run has; else (collective) rank 0 copies its shards (the directory is only read: opening a
    shard to deal its rows could rewrite its metadata) and deals their rows to `world` shards in `<out>/.replay-init`
    (`cpt.replay.remap`: every stored row kept, capacities split as this run's, counters shared out), the others
    wait; the caller removes it once every rank has its copy. Cost: two passes over the buffer, on rank 0, once; disk:
    up to twice the buffer's stored rows meanwhile (the copy, then the dealt shards and every rank's copy of its own)."""
    from cpt.replay.remap import remap_buffer

    source = Path(cfg.replay.buffer.init)
    shards = (peek(source, all_shards=False) or {}).get("shards", world)
    if shards == world:
        return source
    dealt, copy = out / ".replay-init", out / ".replay-init-copy"

    def deal() -> None:
        for d in (dealt, copy):
            shutil.rmtree(d, ignore_errors=True)  # left by a start killed meanwhile
        try:
            for q in range(shards):
                copy_shard(source, copy, q)
            states = [json.loads((source / f"shard-{q:03d}.meta.json").read_text()) for q in range(shards)]
            remap_buffer(copy, states, dealt, world, ownership.global_capacity_rows(cfg), cfg.seed, log)
        except BaseException:
            shutil.rmtree(dealt, ignore_errors=True)  # a failed deal leaves no copy of the buffer behind
            raise
        finally:
            shutil.rmtree(copy, ignore_errors=True)

    on_rank_0(out, "deal-replay.buffer.init-to-this-run's-ranks", deal, rank, log, cfg.training.data_wait_s, cfg.training.dist_timeout_s)
    return dealt


REMAP_RECORD = "remap.json"  # in a buffer directory: which checkpoint its shards were remapped from, to how many ranks


def remap_buffer_for(cfg: RunConfig, out: Path, found, world: int, rank: int, log) -> dict | None:
    """Collective: a run resumed on another number of ranks than wrote `found` (a checkpoint) — rank 0 remaps the
    buffer's shards to this world size (`cpt.replay.remap`), the others wait. Returns this rank's shard state as of
    the checkpoint (to load after opening the shard), None without replay.

    The old shards are first rolled back to the checkpoint (their states are in the checkpoint's rank files), the
    new ones built in a hidden directory and swapped in; the new shards' states at that moment are kept in
    `remap/` with a `remap.json` naming the checkpoint, so resuming from that checkpoint again (after a crash, or on
    yet another world size) starts from them. Cost: one pass over the buffer, on rank 0, once per change of world size.
    """
    if cfg.replay.rate <= 0:
        return None
    from cpt.replay.remap import remap_buffer
    from cpt.training.checkpoint import load_state, rank_file

    directory = ownership.buffer_dir(cfg, out)
    replaced = directory.with_name(f".{directory.name}.replaced")

    def remap() -> None:
        if not directory.exists() and replaced.exists():  # killed between the two renames below
            replaced.rename(directory)
        record = json.loads((directory / REMAP_RECORD).read_text()) if (directory / REMAP_RECORD).is_file() else {}
        same = record.get("checkpoint") == found.directory.name
        if not (same and record.get("world") == world):
            if same:
                states = [json.loads((directory / "remap" / f"shard-{q:03d}.meta.json").read_text()) for q in range(record["world"])]
            else:
                states = [load_state(found.directory / rank_file(q), mmap=True)["sources"]["buffer"] for q in range(found.world)]
            target = directory.with_name(f".{directory.name}.remap-partial")
            shutil.rmtree(target, ignore_errors=True)
            remap_buffer(directory, states, target, world, ownership.global_capacity_rows(cfg), cfg.seed, log)
            (target / "remap").mkdir()
            for r in range(world):
                shutil.copyfile(target / f"shard-{r:03d}.meta.json", target / "remap" / f"shard-{r:03d}.meta.json")
            atomic.write_json(target / REMAP_RECORD, {"checkpoint": found.directory.name, "world": world, "from_world": len(states)})
            shutil.rmtree(replaced, ignore_errors=True)
            directory.rename(replaced)
            target.rename(directory)
            shutil.rmtree(replaced, ignore_errors=True)

    on_rank_0(
        out, "remap-the-replay-buffer-to-this-number-of-ranks", remap, rank, log, cfg.training.data_wait_s, cfg.training.dist_timeout_s
    )
    return json.loads((directory / "remap" / f"shard-{rank:03d}.meta.json").read_text())


def source_for(
    cfg: RunConfig, streams: list, plan: StepPlan, buffer, prefetcher, replay_task_offset: int, rank: int = 0, world: int = 1
) -> MixedBatchSource:
    """The batch source; under torchrun with replay, ranks agree on whether a step can replay over a gloo group of their own."""
    rp = cfg.replay
    off = replay_task_offset
    weights = replay_sources.weights_by_id(cfg, off)  # replay.task_weights and the replay sources' weights
    agree = None
    if world > 1 and rp.rate > 0:
        group = distributed.cpu_group()  # collective: every rank builds its source at the same point
        agree = lambda ok: distributed.all_true(ok, group)  # noqa: E731
    return MixedBatchSource(streams, plan, buffer, prefetcher, rp.include_current, weights, off, rank, world, agree)


# ------------------------------------------------------------------ after-step hooks
def reptile_for(cfg: RunConfig, optimizer: torch.optim.Optimizer, plan: StepPlan, sharded: bool, model=None) -> MetaUpdates | None:
    al = cfg.alignment
    if al.method != "reptile":
        return None
    params = optimizer_params(optimizer)
    names = None
    if model is not None:  # each anchor tensor's parameter name: its key in a (resharding) DCP checkpoint
        by_id = {id(p): n for n, p in model.named_parameters()}
        names = [by_id[id(p)] for p in params]
    reptile = Reptile(params, al.k, al.beta, al.anchor_device)
    return MetaUpdates(reptile, plan.task_ends, al.task_end_update, sharded, names)


def merge_for(cfg: RunConfig, optimizer: torch.optim.Optimizer, plan: StepPlan, sharded: bool, model=None) -> TaskEndMerge | None:
    """The task-end weight merge (merge.enabled), its reference copied from the weights as they are now (step 0)."""
    mc = cfg.merge
    if not mc.enabled:
        return None
    params = optimizer_params(optimizer)
    names = None
    if model is not None:  # each copy's parameter name: its key in a (resharding) DCP checkpoint
        by_id = {id(p): n for n, p in model.named_parameters()}
        names = [by_id[id(p)] for p in params]
    return TaskEndMerge(params, mc.lam, mc.toward, plan.task_ends, sharded, names, cfg.task_names)


def hooks_for(
    cfg: RunConfig,
    source: MixedBatchSource,
    meta: MetaUpdates | None,
    optimizer,
    plan: StepPlan,
    probe: AlignmentProbe | None,
    merge: TaskEndMerge | None = None,
) -> list[AfterStepHook]:
    """The after-step hooks in the order they act (cpt.training.hooks)."""
    hooks: list[AfterStepHook] = [source.shared, source]  # the shared part first: it loads the cursors
    if meta is not None:
        hooks.append(meta)
    if merge is not None:
        hooks.append(merge)
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
