"""The continual pre-training loop: tasks in order, replay mixed into every batch, hooks after each step.

`Run(cfg, out)` builds the parts (cpt.training.build) and `run()` trains them to the summary. The
step (`train_step`) is the whole method: rows from the batch source (the replay seam), a
forward/backward per micro-batch, clip, AdamW, then the after-step hooks (cpt.training.hooks: the
buffer stores the step's new rows, Reptile may meta-update, the probe may measure alignment). The
loop around it asks the components when to act — the meter when to write a train line, the
evaluator when to evaluate (each task end gives a row of the loss matrix), the checkpoint policy
when to save — and stops cleanly on a signal. The run directory's layout is in cpt.training.rundir.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch._dynamo.utils import counters  # private but stable since torch 2.0; only read when compiling
from tqdm.auto import tqdm

from cpt import atomic, evaluate, flops
from cpt.config import RunConfig
from cpt.errors import CptError
from cpt.model import count_parameters, save_hf
from cpt.replay import sources as replay_sources
from cpt.replay.mixing import replay_shortfall
from cpt.training import build, distributed
from cpt.training import checkpoint as ckpt
from cpt.training.device import configure_cpu, precision, resolve_device
from cpt.training.evaluator import Evaluator
from cpt.training.metrics import TrainMeter, open_metrics
from cpt.training.optim import optimizer_for
from cpt.training.schedule import lr_at
from cpt.training.signals import PREEMPTED_EXIT_CODE, Preempted, StopOnSignal

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "Run"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Run:
    """One training run: `__init__` builds its parts (setup), `run()` trains them (fit) to the summary."""

    def __init__(
        self, cfg: RunConfig, out: Path, resume: bool = False, log=_log, replay_task_offset: int | None = None, run_id: str | None = None
    ):
        self.cfg, self.out, self.resume, self.run_id = cfg, out, resume, run_id
        self.rank, self.world, local_rank = distributed.world_info()
        self.is_main = self.rank == 0
        self.log = log = log if self.is_main else (lambda msg: None)
        self.device, self.autocast_dtype = resolve_device(cfg, local_rank, self.world)
        if self.device.type == "cpu":
            configure_cpu()
        torch.manual_seed(cfg.seed)
        # the data first, before the process group forms: tokenizing (hours at scale) never waits in a collective
        data = build.prepare_data(cfg, log, self.rank, self.world, local_rank)
        distributed.init(self.device.type, cfg.training.dist_timeout_s)
        build.agree_on_data(data)
        self.tokenizer, self.tasks, self.source_keys = data.tokenizer, data.tasks, data.source_keys
        self.replay_sources, self.replay_source_keys = data.replay_sources or [], data.replay_source_keys or []
        self.model, self.parallel = build.model_and_parallel(cfg, data, self.device, self.autocast_dtype, self.world, log)
        self.n_params, self.shape = count_parameters(self.model), flops.shape_of(self.model)
        self.streams, self.row_names, budgets = build.streams_for(cfg, self.tasks, self.rank, self.world)
        if replay_task_offset is None:  # a new run: buffer.init's task ids, then one per replay source (a resume passes run.json's)
            replay_task_offset = replay_sources.task_offset(cfg)
        self.replay_task_offset = replay_task_offset
        vocab = self.model.get_input_embeddings().weight.shape[0]
        self.fills = replay_sources.plan_fills(cfg, self.replay_sources, replay_task_offset, self.world, vocab, self.parallel.sharded)
        self.source_record = replay_sources.SourceRecord([s.name for s in self.replay_sources]) if cfg.replay.sources else None
        self.plan = build.plan_for(cfg, budgets, self.world, replay_task_offset)
        self.optimizer = optimizer_for(self.model, cfg.optimizer, cfg.training.lr, self.device)
        self.meta = build.reptile_for(cfg, self.optimizer, self.plan, self.parallel.sharded, self.model)
        self.merge = build.merge_for(cfg, self.optimizer, self.plan, self.parallel.sharded, self.model)
        self.evaluator = Evaluator(
            self.tasks, cfg.training, self.parallel, self.tokenizer.eos_id, self.rank, self.world, log, replay_sources=self.replay_sources
        )
        self.progress = ckpt.Progress()
        self.checkpointer = ckpt.Checkpointer(
            out / "checkpoints", cfg.checkpoint, self.parallel, self.optimizer, self.rank, self.world, log
        )  # collective with checkpoint.async (its writer's process group)
        self.resumed_from: Path | None = None  # the checkpoint directory a resume reads
        self.fill_rows: list[list[float]] | None = None  # an extension: the earlier rows' losses on the new tasks
        self.extended_from: dict | None = None
        self.stop_requested = False

    def _make_source(self) -> None:
        """The buffer lives in the run directory, so the batch source and the hooks are made once it is prepared."""
        cfg = self.cfg
        self.buffer, self.prefetcher = build.buffer_for(
            cfg,
            self.out,
            self.run_id,
            self.rank,
            self.world,
            self.tokenizer.vocab_size,
            self.resume,
            self.log,
            self.tasks,
            replay_task_offset=self.replay_task_offset,
            sources=self.replay_sources,
            fills=self.fills,
            sample=self._sampler(),
        )
        self.source = build.source_for(
            cfg, self.streams, self.plan, self.buffer, self.prefetcher, self.replay_task_offset, self.rank, self.world
        )
        self.probe = build.probe_for(
            cfg, self.model, self.tasks, self.rank, self.world, self.plan, self.autocast_dtype, self.is_main, self.source
        )
        self.hooks = build.hooks_for(cfg, self.source, self.meta, self.optimizer, self.plan, self.probe, merge=self.merge)
        if self.source_record is not None:  # acts on no step; a hook so that every checkpoint keeps it
            self.hooks.append(self.source_record)

    def _sampler(self) -> replay_sources.Sampler | None:
        """What samples the generated replay sources from the model as it is now (before step 0), if any."""
        if not any(f.generate is not None for f in self.fills):
            return None
        start = self.model.config.bos_token_id
        start = self.tokenizer.eos_id if start is None else start  # a cpt document starts after an EOS
        return replay_sources.Sampler(
            self.model, start, self.cfg.training.seq_len, self.device, self.autocast_dtype, self.source_record, self.log
        )

    # ---------------------------------------------------------------- the step
    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step (0-based `step`): (the global mean loss, tokens trained on this rank; 0 if skipped).

        The host waits on the device once per step: the micro-batch losses are added on the device
        (float64, the arithmetic the float sum of earlier versions did, so the loss is the same float),
        and that sum travels with the stop flag in one tensor, all-reduced under torchrun and read
        once (`_agree_on_device`); the NaN / skip and the stop decisions come from that one read.
        Rows arrive as int32 (pinned when CUDA is available) and are copied without blocking; the
        targets become int64 on the device.
        """
        cfg, accum = self.cfg, self.cfg.training.grad_accum
        rows, n_new, n_replay = self.source.next_batch(step)
        rows = rows.to(self.device, non_blocking=True)
        inputs, targets = rows[:, :-1], rows[:, 1:].long()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.plan.total_steps, self.plan.task_ends, cfg.training.lr, cfg.schedule)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        micros = list(zip(inputs.chunk(accum), targets.chunk(accum)))
        for i, (micro_inputs, micro_targets) in enumerate(micros):
            with self.parallel.micro_batch(last=i == len(micros) - 1):  # gradients synchronised on the last one only
                with precision(self.device, self.autocast_dtype):
                    loss = self.parallel.train_module(micro_inputs, micro_targets)
                (loss / accum).backward()
            total += loss.detach().double() / accum
        total, self.stop_requested = _agree_on_device(total, self.stopper.signum is not None, self.world)
        skipped = not math.isfinite(total)
        if skipped:
            self._skip_batch(step, total)
        else:
            if cfg.optimizer.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optimizer.clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for hook in self.hooks:
            for record in hook.after_step(step, skipped):
                self.metrics.write(record)
        return total, 0 if skipped else (n_new + n_replay) * cfg.training.seq_len

    def _skip_batch(self, step: int, loss: float) -> None:
        """A NaN/Inf loss: the batch is not applied, up to training.nan_skip times."""
        self.progress.nan_skipped += 1
        allowed = self.cfg.training.nan_skip
        if self.progress.nan_skipped > allowed:
            good = ckpt.list_checkpoints(self.out / "checkpoints")
            where = f"; last good checkpoint: {good[-1]}" if good else ""
            raise CptError(
                f"step {step}: the training loss is {loss} (NaN/Inf); stopping{where}. Lower training.lr or raise training.nan_skip"
            )
        self.log(f"warning: step {step}: loss {loss}; batch skipped ({self.progress.nan_skipped}/{allowed})")

    # ---------------------------------------------------------------- the loop
    def run(self, resumed: ckpt.Found | None = None) -> dict:
        """Train to the summary; `resumed`: the checkpoint `checkpoint.load_latest` chose, to continue from."""
        self.t_start = time.perf_counter()
        remapped = None
        if resumed is not None and resumed.resharded:
            self.log(f"resuming {resumed.directory.name}, written by {resumed.world} rank(s), on {self.world}")
            remapped = build.remap_buffer_for(self.cfg, self.out, resumed, self.world, self.rank, self.log)  # collective
        self._make_source()
        if remapped is not None and self.buffer is not None:
            self.buffer.load_state_dict(remapped)  # the shard as remapped from the checkpoint
        resumed_step = resumed.state["progress"]["step"] if resumed is not None else None
        offset = resumed.state["progress"]["metrics_offset"] if resumed is not None else None
        self.metrics = open_metrics(self.out, self.is_main, self.cfg, resumed_step, offset, self.run_id)
        if resumed is not None:
            t0 = time.perf_counter()
            self.resumed_from = resumed.directory
            self.load_state_dict(resumed)
            seconds = resumed.seconds + time.perf_counter() - t0
            self.log(f"resumed at step {self.progress.step}/{self.plan.total_steps} (checkpoint verified and read in {seconds:.2f}s)")
        else:
            self.log(
                f"model: {self.n_params / 1e6:.2f}M parameters on {self.device}"
                f"{' (bf16 autocast)' if self.autocast_dtype else ' (fp32)'}; {self.plan.total_steps} steps; {len(self.plan.task_ends)} task(s)"
            )
            t_eval = time.perf_counter()
            record = {"type": "eval", "step": 0, "task_index": -1, "losses": self.evaluator.evaluate_all(), "task_end": False}
            self.progress.eval_seconds += time.perf_counter() - t_eval
            if self.evaluator.source_names:  # the original domain before any training: what its forgetting is measured from
                record["replay_sources"] = self.source_record.initial = self.evaluator.evaluate_replay_sources()
            self.metrics.write(record)
        self.source.start(self.progress.step)
        try:
            with StopOnSignal() as self.stopper:
                self.fit()
            self.checkpointer.wait()  # a background write of the last checkpoint; its error is the run's
        finally:
            self.checkpointer.close()
            if self.prefetcher is not None:
                self.prefetcher.close()
            self.metrics.close()
        return self._finish()

    def fit(self) -> None:
        p, plan, meter = self.progress, self.plan, TrainMeter(self.cfg.logging.log_every)
        self.first_step, self.first_train_seconds = p.step, p.train_seconds  # the ETA counts this process's steps
        while p.step < plan.total_steps:
            task = plan.task_of_step[p.step]
            end = plan.task_ends[task]
            bar = self._bar(task)
            meter.reset()
            while p.step < end:
                t0 = time.perf_counter()
                probe_before = self.probe.seconds if self.probe else 0.0
                loss, tokens = self.train_step(p.step)
                dt = time.perf_counter() - t0 - ((self.probe.seconds - probe_before) if self.probe else 0.0)
                p.train_seconds += dt
                p.trained_tokens += tokens
                p.step += 1
                bar.update(1)
                meter.add(loss, tokens, dt)
                task_end = p.step == end
                if meter.should_log(p.step, task_end):
                    self._train_line(meter, task, bar)
                if self.evaluator.should_evaluate(p.step, task_end):
                    t_eval = time.perf_counter()
                    self._evaluate(task, task_end)
                    p.eval_seconds += time.perf_counter() - t_eval
                if self.checkpointer.should_save(p.step, task_end) or self.stop_requested:
                    t_ckpt = time.perf_counter()
                    self.save_resumable(wait=self.stop_requested)  # stopping: the checkpoint is complete before the exit
                    p.checkpoint_seconds += time.perf_counter() - t_ckpt
                if self.stop_requested:  # agreed across ranks in the step, so all of them checkpointed together
                    bar.close()
                    raise Preempted(self.out, p.step, self.stopper.signum or 15, self.stopper.seconds_since())
            bar.close()

    def _bar(self, task: int):
        start = self.plan.task_ends[task - 1] if task else 0
        return tqdm(
            total=self.plan.task_ends[task] - start,
            initial=self.progress.step - start,
            desc=f"[{task + 1}/{len(self.plan.task_ends)}] {self.row_names[task]}",
            disable=not self.cfg.logging.progress or not self.is_main,
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=0.5,
        )

    def _train_line(self, meter: TrainMeter, task: int, bar) -> None:
        mean, tps = meter.line()
        eff = self.efficiency(tps)
        record = {
            "type": "train",
            "step": self.progress.step,
            "task": self.row_names[task],
            "task_index": task,
            "loss": mean,
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens_per_second": tps,  # this rank's, in the window since the last line
            "replay_wait_seconds": self.source.wait_seconds,
            **eff,
        }
        self.metrics.write(record)
        eta = eff["eta_seconds"]
        bar.set_postfix(
            loss=f"{mean:.3f}",
            tok_s=f"{eff['tokens_per_second_all_ranks']:,.0f}",
            **({"mfu": f"{100 * eff['mfu']:.0f}%"} if eff["mfu"] is not None else {}),
            eta_all=_clock(eta) if eta is not None else "?",
            refresh=False,
        )

    def efficiency(self, tps: float) -> dict:
        """What a train line says about speed: tokens/s over all ranks, MFU against the device's peak (None where it
        is unknown, e.g. on CPU), this process's peak memory (CUDA max allocated, else peak RSS), the shares of the
        wall time so far spent in training steps, evaluation, the probe, checkpoints and waiting on replay reads, and
        the ETA of the whole sequence from this process's mean step time."""
        p = self.progress
        wall = p.wall_seconds + (time.perf_counter() - self.t_start)
        probe = self.probe.seconds if self.probe else 0.0
        parts = {"train": p.train_seconds, "eval": p.eval_seconds, "probe": probe, "checkpoint": p.checkpoint_seconds}
        parts["replay_wait"] = self.source.wait_seconds
        steps_here = p.step - self.first_step
        per_step = (p.train_seconds - self.first_train_seconds) / steps_here if steps_here > 0 else None
        peak = flops.peak_flops_of(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        return {
            "tokens_per_second_all_ranks": tps * self.world,
            "mfu": flops.mfu(self.shape, self.cfg.training.seq_len, tps, peak) if peak else None,
            "peak_memory_mib": peak_memory_mib(self.device),
            "time_shares": {k: round(v / max(wall, 1e-9), 4) for k, v in parts.items()},
            "seconds": {**{k: round(v, 3) for k, v in parts.items()}, "wall": round(wall, 3)},
            "eta_seconds": per_step * (self.plan.total_steps - p.step) if per_step is not None else None,
        }

    def _evaluate(self, task: int, task_end: bool) -> None:
        losses = self.evaluator.evaluate_all()
        record = {"type": "eval", "step": self.progress.step, "task_index": task, "losses": losses, "task_end": task_end}
        sources = self.evaluator.evaluate_replay_sources() if self.evaluator.source_names else None
        if sources is not None:
            record["replay_sources"] = sources
        self.metrics.write(record)
        if not task_end:
            return
        row = [losses[t.name] for t in self.tasks]
        self.progress.loss_matrix.append(row)
        self.log(f"after {self.row_names[task]}: " + "  ".join(f"{t.name}={v:.3f}" for t, v in zip(self.tasks, row)))
        if sources is not None:
            self.source_record.after_task.append(sources)
            self.log(f"after {self.row_names[task]}, replay sources: " + "  ".join(f"{n}={v:.3f}" for n, v in sources.items()))
        if self.cfg.checkpoint.task_ends and self.cfg.training.strategy != "joint":
            self.save_hf_checkpoint(self.out / "checkpoints" / f"task-{task}-{self.row_names[task]}")
        stats = self.source.stats
        warning = replay_shortfall(self.plan, stats.new_rows[task], stats.replay_rows[task], task, self.cfg.replay.rate)
        if warning and self.buffer is not None:
            self.log(f"warning: task {self.row_names[task]}: {warning}")

    # ---------------------------------------------------------------- checkpoints (cpt.training.checkpoint.Checkpointer)
    def snapshot(self) -> ckpt.Progress:
        """The progress record as a checkpoint keeps it: wall time so far and the metrics offset."""
        elapsed = time.perf_counter() - self.t_start
        return replace(self.progress, wall_seconds=self.progress.wall_seconds + elapsed, metrics_offset=self.metrics.offset())

    def save_resumable(self, wait: bool = False) -> None:
        """Collective: a resumable checkpoint; with checkpoint.async written in the background unless `wait`."""
        self.checkpointer.save(self.snapshot(), self.hooks, self.buffer, wait=wait)

    def load_state_dict(self, found: ckpt.Found) -> None:
        self.progress = self.checkpointer.load(found, self.hooks)
        if self.fill_rows is not None:  # an extended run: the earlier run's rows get the new tasks' columns
            for row, extra in zip(self.progress.loss_matrix, self.fill_rows):
                if len(row) < len(self.tasks):
                    row.extend(extra)

    def save_hf_checkpoint(self, directory: Path) -> None:
        """An HF checkpoint of the current weights, written by rank 0 (under FSDP2 gathered from every rank first)."""
        state = self.parallel.full_state_dict()  # collective
        if self.is_main:
            save_hf(self.model, directory, self.tokenizer, state_dict=state)

    # ---------------------------------------------------------------- the summary
    def _finish(self) -> dict:
        cfg, p = self.cfg, self.progress
        self.save_hf_checkpoint(self.out / "checkpoints" / "final")
        stats = self.source.stats
        wall = p.wall_seconds + (time.perf_counter() - self.t_start)
        tokens = {  # the statistics count the global batch's rows
            "new": int(sum(stats.new_rows)) * cfg.training.seq_len,
            "replay": int(sum(stats.replay_rows)) * cfg.training.seq_len,
        }
        per_token = flops.flops_per_token(self.shape, cfg.training.seq_len)
        probe_seconds = self.probe.seconds if self.probe else 0.0
        summary = {
            "run": cfg.name or self.out.name,
            "strategy": cfg.training.strategy,
            "seed": cfg.seed,
            "tasks": [t.name for t in self.tasks],
            "loss_matrix": p.loss_matrix,
            **evaluate.summarize(p.loss_matrix),
            "tokens": tokens,
            "world_size": self.world,
            "replay_rate": cfg.replay.rate,
            "replay_fraction": stats.fraction(),
            "replay_wait_seconds": self.source.wait_seconds,
            "replay_task_offset": self.replay_task_offset,
            "extended_from": self.extended_from,
            "alignment": cfg.alignment.method,
            "meta_updates": self.meta.meta_updates if self.meta else 0,
            "merge": {"lam": cfg.merge.lam, "toward": cfg.merge.toward, "merges": self.merge.merges} if self.merge else None,
            "steps": p.step,
            "task_boundaries": self.plan.task_ends,
            "parameters": self.n_params,
            # training compute (cpt.flops): 6·N + 12·L·T·d_attn per token trained on, new and replayed
            "flops": {
                "per_token": per_token,
                "training": per_token * (tokens["new"] + tokens["replay"]),
                "matmul_parameters": self.shape.matmul_params,
            },
            "wall_seconds": wall,
            "train_seconds": p.train_seconds,
            "probe_seconds": probe_seconds,
            "tokens_per_second": p.trained_tokens * self.world / max(p.train_seconds, 1e-9),
            # the whole run: MFU, peak memory, where the wall time went (train / eval / probe / checkpoint / replay wait)
            "efficiency": {k: v for k, v in self.efficiency(p.trained_tokens / max(p.train_seconds, 1e-9)).items() if k != "eta_seconds"},
            "nan_skipped": p.nan_skipped,
            # this process's resumable checkpoints: the write time sizes a preemption's grace period (docs/distributed.md)
            "checkpoints": self.checkpointer.summary(),
            "heldout": self.evaluator.summary(),
            "compile": {"modules": self.parallel.compiled, "graphs": _compiled_graphs()} if self.parallel.compiled else None,
            **self._replay_summary(),
            **self._replay_sources_summary(),
        }
        if self.is_main:
            atomic.write_json(self.out / "summary.json", summary, indent=2)
        self.metrics.log_summary(summary, self.log)  # the trackers' summary, summary.json and the report, then they close
        if self.buffer is not None:
            self.log(f"replay: waited {self.source.wait_seconds:.3f}s on the prefetcher in {p.step} steps")
        for name, rs in (summary.get("replay_sources") or {}).items():
            if rs.get("forgetting") is not None:
                self.log(
                    f"replay source {name}: held-out loss {rs['initial']:.3f} before training, {rs['after_task'][-1]:.3f} at the end "
                    f"(forgetting {rs['forgetting']:+.3f})"
                )
        if self.probe is not None:
            share = 100 * probe_seconds / max(p.train_seconds, 1e-9)
            self.log(f"probe: {probe_seconds:.1f}s in all ({share:.1f}% of the training time)")
        self.log(
            f"done: {p.step} steps in {wall:.1f}s ({summary['tokens_per_second']:,.0f} tokens/s); "
            f"avg final loss {summary['avg_final_loss']:.3f}, forgetting "
            + (f"{summary['forgetting_score']:.3f}" if summary["forgetting_score"] is not None else "n/a")
        )
        return summary

    def _replay_sources_summary(self) -> dict:
        """summary.json `replay_sources` (cpt.replay.sources.summary): the original domain's loss before training and at every
        task end, its forgetting, and how many of its rows the buffer (all shards) still held. Collective under torchrun."""
        if self.source_record is None:
            return {}
        counts = self.buffer.counts_per_task() if self.buffer is not None else {}
        at_end = distributed.all_reduce_sum([float(counts.get(f.task_id, 0)) for f in self.fills], self.device)
        coverage = self.evaluator.replay_source_summary()
        return {"replay_sources": replay_sources.summary(self.fills, self.source_record, coverage, [int(x) for x in at_end])}

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


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far: CUDA max allocated on a GPU, else the peak resident set size (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _agree_on_device(loss: torch.Tensor, stop: bool, world: int) -> tuple[float, bool]:
    """(the global mean of this rank's 0-dim float64 `loss`, whether any rank was signalled) with one host read.

    [loss, stop] is one float64 tensor on the loss's device (the flag filled by a kernel, not copied
    from the host), summed over the ranks by one all-reduce, and read back once with `tolist`:
    every rank takes the same NaN and stop decisions.
    """
    packed = torch.stack([loss, loss.new_full((), float(stop))])
    if world > 1:
        torch.distributed.all_reduce(packed)
    total, flag = packed.tolist()
    return (total / world if world > 1 else total), flag > 0


def _compiled_graphs() -> int:
    """Graphs torch.compile (dynamo) has compiled in this process: > 0 once a compiled module ran."""
    return int(counters["stats"]["unique_graphs"])
