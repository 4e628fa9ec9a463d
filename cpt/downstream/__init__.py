"""Downstream evaluation of a run's checkpoints with EleutherAI lm-evaluation-harness (`lm_eval`).

`evaluate_run` loads each checkpoint a run saved (every task end, `final`, and the `model.init`
model it started from when there is one), wraps the loaded model in lm-eval's `HFLM` and calls
`lm_eval.simple_evaluate` in-process, so no model goes through the hub. The scores are merged
into the run's `summary.json` under `downstream`:

    {"downstream": {"task-0-en": {"cpt_cloze_en": {"acc": 0.41, "acc_stderr": 0.02, ...}, ...}, ...}}

without touching anything else in the file (it is rewritten atomically); `cpt report` shows them
as a checkpoint × benchmark table. Task names are cpt's offline tasks (`cpt_cloze_<lang>`,
`cpt.downstream.cloze`, built from the bundled corpus's held-out documents) or any task lm-eval
knows (Belebele, XNLI, PAWS-X ...), which download their data from the hub where it is reachable.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from cpt import atomic
from cpt.data.tokenizer import cache_root
from cpt.downstream import cloze
from cpt.errors import CptError
from cpt.model import load_model
from cpt.runs import main_metric  # also cpt.downstream.main_metric, for the CLI
from cpt.training.device import resolve_device
from cpt.training.rundir import RunDir, open_run

LM_EVAL_PIP = "pip install 'cpt[lm-eval]'"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise CptError(f"--lm-eval needs EleutherAI lm-evaluation-harness: {LM_EVAL_PIP}")


def parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise CptError("--lm-eval: give a comma-separated list of task names, e.g. cpt_cloze_en,cpt_cloze_fr")
    return list(dict.fromkeys(names))


def task_manager(names: list[str], cache: Path):
    """An lm-eval TaskManager that knows `names`: cpt's tasks from their generated YAML, the rest from lm-eval's own.

    Unknown names are refused here, before any model is loaded."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager  # why lazy: optional dependency (cpt[lm-eval])

    ours = [n for n in names if n.startswith(cloze.PREFIX)]
    for n in ours:
        if n not in cloze.task_names():
            raise CptError(f"--lm-eval: unknown task {n!r}; cpt's offline tasks are {', '.join(cloze.task_names())}")
    paths = [str(cloze.write_task(n[len(cloze.PREFIX) :], cache)) for n in ours]
    others = [n for n in names if n not in ours]
    with _quiet():
        manager = TaskManager(include_path=paths or None, include_defaults=bool(others))
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CptError(
            f"--lm-eval: unknown task {unknown[0]!r}; use cpt's offline tasks ({', '.join(cloze.task_names())}) "
            "or a task name from `lm_eval ls tasks` (those need the hub)"
        )
    _load_data(names, others, manager)
    return manager


def _load_data(names: list[str], hub: list[str], manager) -> None:
    """Build every task once (lm-eval loads its dataset), so a dataset that cannot be fetched fails before any model loads."""
    try:
        with _quiet():
            if hasattr(manager, "load"):  # newer lm-eval; get_task_dict is deprecated there
                manager.load(names)
            else:
                from lm_eval.tasks import get_task_dict  # why lazy: optional dependency (cpt[lm-eval])

                get_task_dict(names, manager)
    except Exception as err:
        if not hub:  # cpt's own tasks are local files: a failure here is a bug
            raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CptError(
            f"--lm-eval: cannot load the data of {', '.join(hub)}: {reason}; lm-eval's own tasks download their "
            f"datasets from the Hugging Face hub, which must be reachable (cpt_cloze_* run offline)"
        ) from None


@contextlib.contextmanager
def _quiet():
    """lm-eval logs every task config at INFO/WARNING; keep the errors."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def default_checkpoints(run_dir: Path) -> list[tuple[str, Path]]:
    """(label, HF directory) of what a run can be scored on: its model.init, every task end, final."""
    run = RunDir(Path(run_dir))
    out: list[tuple[str, Path]] = []
    if (run.path / "config.yaml").is_file():
        init = run.config().model.init
        if init and (Path(init) / "config.json").is_file():
            out.append(("init", Path(init)))
    out += [(name, run.checkpoints / name) for name in run.hf_checkpoints()]
    return out


def _weights_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.glob("model*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _metrics(result: dict) -> dict[str, float]:
    """lm-eval's {"acc,none": x, "acc_stderr,none": y, "alias": ...} as {"acc": x, "acc_stderr": y}."""
    out = {}
    for key, value in result.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else key] = float(value)
    if "sample_len" in out:  # how many examples were scored (--limit)
        out["samples"] = int(out.pop("sample_len"))
    return out


def write_summary(run_dir: Path, downstream: dict) -> Path:
    """Merge scores into summary.json (other keys untouched), atomically."""
    file = run_dir / "summary.json"
    try:
        summary = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except json.JSONDecodeError:
        raise CptError(f"{file}: not valid JSON; the downstream scores were not written") from None
    if not isinstance(summary, dict):
        raise CptError(f"{file}: expected a JSON object")
    merged = summary.get("downstream") if isinstance(summary.get("downstream"), dict) else {}
    for checkpoint, scores in downstream.items():
        merged.setdefault(checkpoint, {}).update(scores)
    summary["downstream"] = merged
    atomic.write_json(file, summary, indent=2)  # a crash mid-write leaves the previous summary.json
    return file


def evaluate_run(
    run_dir: str | Path,
    tasks: list[str],
    checkpoints: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    log: Callable[[str], None] = _log,
) -> dict[str, dict[str, dict[str, float]]]:
    """Score checkpoints of a run on lm-eval tasks; returns {checkpoint: {task: {metric: value}}} and
    merges it into RUN_DIR/summary.json. `checkpoints` default: init (if any), every task end, final."""
    run = open_run(run_dir)
    run_dir = run.path
    cfg = run.config()
    require_lm_eval()
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per checkpoint; lm-eval draws the useful ones
    if checkpoints:
        targets = []
        for name in checkpoints:
            d = Path(cfg.model.init) if name == "init" and cfg.model.init else run_dir / "checkpoints" / name
            if not (d / "config.json").is_file():
                have = ", ".join(n for n, _ in default_checkpoints(run_dir)) or "none"
                raise CptError(f"{d}: no such HF checkpoint (--checkpoint); have {have}")
            targets.append((name, d))
    else:
        targets = default_checkpoints(run_dir)
        if not targets:
            raise CptError(f"{run_dir / 'checkpoints'}: no HF checkpoint to evaluate (task ends or final); finish the run first")
    cache = cache_root(cfg.cache_dir)
    manager = task_manager(tasks, cache)
    device, autocast_dtype = resolve_device(cfg)

    # why lazy: lm_eval is an optional dependency (cpt[lm-eval]); require_lm_eval() above names the install
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    results: dict[str, dict[str, dict[str, float]]] = {}
    seen: dict[str, str] = {}
    t_all = time.perf_counter()
    for i, (name, directory) in enumerate(targets, 1):
        digest = _weights_digest(directory)
        if digest in seen:  # `final` is the last task end's weights: score once
            results[name] = results[seen[digest]]
            log(f"lm-eval [{i}/{len(targets)}] {name}: same weights as {seen[digest]}; scores reused")
            continue
        seen[digest] = name
        t0 = time.perf_counter()
        log(f"lm-eval [{i}/{len(targets)}] {name}: {', '.join(tasks)}" + (f" (first {limit} examples each)" if limit else ""))
        model = load_model(directory, cfg.model.attn_implementation).to(device).eval()
        if autocast_dtype is not None:
            model = model.to(autocast_dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        with _quiet():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            out = simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=False,
                bootstrap_iters=1000,  # closed-form stderr for means; a short bootstrap for the rest
                verbosity="ERROR",
            )
        if out is None:  # pragma: no cover - only non-zero ranks under lm-eval's own launcher
            raise CptError("lm-eval returned no results")
        shots = out.get("n-shot", {})
        results[name] = {task: _metrics(out["results"].get(task, {})) | {"num_fewshot": shots.get(task)} for task in tasks}
        shown = "  ".join(f"{t}={s[m]:.3f} ({m})" for t, s in results[name].items() if (m := main_metric(s)))
        log(f"lm-eval [{i}/{len(targets)}] {name}: {shown}  ({time.perf_counter() - t0:.0f}s)")
        del lm, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    file = write_summary(run_dir, results)
    log(f"lm-eval: {len(targets)} checkpoint(s) × {len(tasks)} task(s) in {time.perf_counter() - t_all:.0f}s; written to {file}")
    return results
