"""Held-out evaluation of a run: the fixed sets, when to evaluate, and re-evaluating a saved checkpoint.

Every task's held-out set is fixed at the start (`cpt.evaluate.eval_windows`: windows spread over
the whole validation split); what each covers is logged and goes into summary.json. The run
evaluates every task at step 0, every `training.eval_every` steps and at each task end (the rows
of the loss matrix): `Evaluator.should_evaluate` decides. Under torchrun each rank evaluates every
world-th window and the sums are all-reduced; under FSDP2 every rank runs as many forward passes as
the one with the most (each forward is collective). `evaluate_checkpoint` recomputes the same
losses for an HF checkpoint a run saved (`cpt eval`).

Replay sources (`replay.sources`, cpt.replay.sources) have held-out sets made the same way and are
evaluated at the same points (`evaluate_replay_sources`), but kept apart from the tasks' losses: the
loss matrix stays tasks × tasks, so every metric on it keeps its meaning, and the sources' losses
go into `metrics.jsonl` (`replay_sources`) and summary.json's `replay_sources`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cpt import atomic, evaluate
from cpt.config import TrainingConfig
from cpt.data.mixture import share
from cpt.data.tokenizer import cache_root, load_tokenizer
from cpt.data.tokens import TaskTokens, prepare_for
from cpt.errors import CptError
from cpt.model import load_model
from cpt.training import distributed
from cpt.training.device import resolve_device
from cpt.training.parallel import OneProcess
from cpt.training.rundir import open_run


class Evaluator:
    """The run's held-out sets and their evaluation (see the module docstring)."""

    def __init__(
        self,
        tasks: list[TaskTokens],
        tr: TrainingConfig,
        parallel: OneProcess,
        eos_id: int,
        rank: int,
        world: int,
        log,
        replay_sources: list[TaskTokens] = (),
    ):
        self.names = [t.name for t in tasks]
        self.sets = [windows_for(t, tr.seq_len, tr.eval_tokens) for t in tasks]
        self.coverage = [_coverage(t, tr.seq_len, tr.eval_tokens, eos_id) for t in tasks]
        for name, c in zip(self.names, self.coverage):
            log(f"held-out {name}: {evaluate.describe_coverage(c)}")
        self.source_names = [t.name for t in replay_sources]
        self.source_sets = [windows_for(t, tr.seq_len, tr.eval_tokens) for t in replay_sources]
        self.source_coverage = [_coverage(t, tr.seq_len, tr.eval_tokens, eos_id) for t in replay_sources]
        for name, c in zip(self.source_names, self.source_coverage):
            log(f"held-out {name} (replay source): {evaluate.describe_coverage(c)}")
        self.every = tr.eval_every
        self.batch_size = tr.eval_batch_size
        self.parallel = parallel
        self.rank, self.world = rank, world

    def should_evaluate(self, step: int, task_end: bool) -> bool:
        return task_end or bool(self.every and step % self.every == 0)

    def evaluate_all(self) -> dict[str, float]:
        """Every task's held-out loss (a row of the loss matrix at a task end). Collective under torchrun."""
        return self._losses(self.names, self.sets)

    def evaluate_replay_sources(self) -> dict[str, float]:
        """Every replay source's held-out loss, the same way (empty without sources). Collective under torchrun."""
        return self._losses(self.source_names, self.source_sets)

    def _losses(self, names: list[str], sets: list[np.ndarray]) -> dict[str, float]:
        p = self.parallel
        losses = {}
        for name, windows in zip(names, sets):
            mine = windows[self.rank :: self.world]  # each rank evaluates its share; sums are reduced
            batches = p.eval_min_batches(len(windows), self.batch_size)
            total, count = (
                evaluate.heldout_loss(
                    p.forward_model, mine, self.batch_size, p.device, p.autocast_dtype, min_batches=batches, pad=windows[:1]
                )
                if len(mine) or batches
                else (0.0, 0)
            )
            total, count = distributed.all_reduce_sum([total, count], p.device)
            losses[name] = total / max(count, 1)
        return losses

    def summary(self) -> dict:
        return dict(zip(self.names, self.coverage))

    def replay_source_summary(self) -> dict:
        """What each replay source's held-out set covers (as `summary` for the tasks)."""
        return dict(zip(self.source_names, self.source_coverage))


def windows_for(task: TaskTokens, seq_len: int, eval_tokens: int) -> np.ndarray:
    """A task's fixed held-out windows; a task of weighted sources: each source's windows for its share of
    `eval_tokens` (`cpt.data.mixture.share`), concatenated, so the mean loss is the mixture's."""
    if not task.parts:
        return evaluate.eval_windows(task.val, seq_len, eval_tokens)
    shares = share(eval_tokens, task.weights)
    sets = [evaluate.eval_windows(p.val, seq_len, max(n, seq_len)) for p, n in zip(task.parts, shares)]
    width = min(w.shape[1] for w in sets)  # a source shorter than one window gives a shorter one
    return np.concatenate([w[:, :width] for w in sets])


def _coverage(task: TaskTokens, seq_len: int, eval_tokens: int, eos_id: int) -> dict:
    """What the held-out set covers, computed once per token-cache entry and setting: it counts EOS over
    the whole validation split, which a warm start (and every rank) must not repeat. A task of sources:
    the sums over its sources (each for its share), positions from the first to the last."""
    if task.parts:
        parts = [_coverage(p, seq_len, n, eos_id) for p, n in zip(task.parts, share(eval_tokens, task.weights))]
        total = {
            k: sum(c[k] for c in parts) for k in ("documents", "tokens", "windows", "windows_available", "eval_tokens", "documents_touched")
        }
        total["token_fraction"] = total["eval_tokens"] / max(total["tokens"], 1)
        total["document_fraction"] = total["documents_touched"] / max(total["documents"], 1)
        total.update(
            span_first=parts[0]["span_first"],
            span_last=parts[-1]["span_last"],
            span_start=min(c["span_start"] for c in parts),
            span_end=max(c["span_end"] for c in parts),
            sources=parts,
        )
        return total
    file = task.directory / f"heldout-{seq_len}-{eval_tokens}-{eos_id}.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        coverage = evaluate.heldout_coverage(task.val, seq_len, eval_tokens, eos_id)
        try:
            atomic.write_json(file, coverage)
        except OSError:  # a read-only cache only costs the next start another scan
            pass
        return coverage


def evaluate_checkpoint(run_dir: str | Path, checkpoint: str = "final") -> dict[str, float]:
    """Held-out loss of a saved HF checkpoint of a run on every task (the same fixed sets as training), then on every
    replay source, keyed `<name> (replay source)`."""
    run = open_run(run_dir)
    cfg = run.config()
    directory = run.checkpoints / checkpoint
    if not (directory / "config.json").is_file():
        raise CptError(f"{directory}: no such HF checkpoint; have {sorted(run.hf_checkpoints()) or 'none'}")
    device, autocast_dtype = resolve_device(cfg)
    tok = load_tokenizer(directory)
    cache = cache_root(cfg.cache_dir)
    model = load_model(directory, cfg.model.attn_implementation).to(device)
    out = {}
    for t in cfg.tasks:
        task = prepare_for(t, tok, cache)
        windows = windows_for(task, cfg.training.seq_len, cfg.training.eval_tokens)
        total, count = evaluate.heldout_loss(model, windows, cfg.training.eval_batch_size, device, autocast_dtype)
        out[t.name] = total / max(count, 1)
    for s in (s for s in cfg.replay.sources if s.path is not None):  # a generated source has no held-out split
        windows = windows_for(prepare_for(s.as_task(), tok, cache), cfg.training.seq_len, cfg.training.eval_tokens)
        total, count = evaluate.heldout_loss(model, windows, cfg.training.eval_batch_size, device, autocast_dtype)
        out[f"{s.name} (replay source)"] = total / max(count, 1)
    return out
