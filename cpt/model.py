"""Model presets and HF load/save.

Every model is a real `transformers.LlamaForCausalLM` (or, with `model.init`, any local HF causal
LM checkpoint), so a run's checkpoints load with `AutoModelForCausalLM.from_pretrained`. The
presets name the shapes used here: `tiny` for tests, `demo` for the bundled CPU default, `small`
between them for the default scaling sweep, and the paper's public configs (layers × hidden, heads, FFN, peak LR; see arXiv 2508.01908).
They live in `cpt.presets` (no torch there, so the config can validate a preset name) and are re-exported here.
`save_hf` writes a checkpoint directory whole or not at all (`cpt.atomic`).

Under FSDP2 a model is first built with its parameters on the meta device (`meta_model_for`), sharded,
and only then given its values, each rank filling only its rows (`MetaModel.materialise`): a fresh
preset replays the seeded init of `build_model` (the same values, exactly), `model.init` reads each
parameter's rows from the safetensors files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, Shard
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from cpt.atomic import written_whole
from cpt.errors import CptError
from cpt.presets import PRESETS, Preset  # noqa: F401  (re-exported: `cpt.model.PRESETS` is the documented name)


def llama_config(preset: str, vocab_size: int, eos_id: int, seq_len: int, attn: str = "sdpa"):
    if preset not in PRESETS:
        raise CptError(f"model.preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden,
        intermediate_size=p.ffn,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads or p.heads,
        max_position_embeddings=max(p.max_positions, seq_len),
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=p.tie_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attention_bias=False,
        mlp_bias=False,
    )
    cfg._attn_implementation = attn
    return cfg


def build_model(preset: str, vocab_size: int, eos_id: int, seq_len: int, seed: int, attn: str = "sdpa") -> torch.nn.Module:
    cfg = llama_config(preset, vocab_size, eos_id, seq_len, attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def load_model(path: str | Path, attn: str = "sdpa") -> torch.nn.Module:
    """A local HF causal-LM checkpoint directory, in fp32 (the optimizer's master weights)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CptError(f"{path}: not an HF checkpoint directory (no config.json) (model.init)")
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn)
    except Exception as err:
        raise CptError(f"{path}: cannot load the checkpoint: {str(err).splitlines()[0]}") from None


def model_for(cfg, vocab_size: int, eos_id: int) -> torch.nn.Module:
    """The model a run config describes: `model.init` loaded, or a fresh `model.preset` (fp32, on CPU)."""
    if cfg.model.init:
        model = load_model(cfg.model.init, cfg.model.attn_implementation)
    else:
        model = build_model(cfg.model.preset, vocab_size, eos_id, cfg.training.seq_len, cfg.seed, cfg.model.attn_implementation)
    _check_positions(cfg, model)
    return model


def _check_positions(cfg, model: torch.nn.Module) -> None:
    if cfg.training.seq_len > max_positions(model):
        raise CptError(f"training.seq_len: {cfg.training.seq_len} exceeds the model's {max_positions(model)} positions")


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (transformers' own, non-reentrant)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise CptError(f"training.activation_checkpointing: {type(model).__name__} does not support it")
    # transformers checkpoints each layer's forward (module hooks such as FSDP2's stay outside it)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def max_positions(model: torch.nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 1 << 30))


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_hf(model: torch.nn.Module, directory: Path, tokenizer=None, state_dict: dict | None = None) -> None:
    """`save_pretrained` (safetensors) plus the tokenizer, so the directory is a complete HF model.

    Written whole (`cpt.atomic.written_whole`): the files go to a temporary sibling directory that is
    renamed to `directory` only once everything is saved, so a crash never leaves a half checkpoint
    under that name, and an existing checkpoint of the same name (a task end saved again after a
    resume, `final`) is replaced as a whole: no stale file of the old one stays behind.
    `state_dict`: the full weights when `model` itself is sharded (FSDP2 gathers them to rank 0).
    """
    with written_whole(Path(directory)) as tmp:
        save_hf_files(model, tmp, tokenizer, state_dict)


def save_hf_files(model: torch.nn.Module, directory: Path, tokenizer=None, state_dict: dict | None = None) -> None:
    """The files of `save_hf` written into `directory` as it is, for a caller that makes the directory whole itself."""
    directory.mkdir(parents=True, exist_ok=True)
    unwrapped = getattr(model, "_orig_mod", model)
    unwrapped.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict)
    arch = unwrapped.config.architectures or []
    if any(a.startswith("FSDP") for a in arch):  # FSDP2 renames the class it wraps; record the model's own
        config_file = directory / "config.json"
        config = json.loads(config_file.read_text())
        config["architectures"] = [a.removeprefix("FSDP") for a in arch]
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


# ------------------------------------------------------------------ built on the meta device (FSDP2)
_aten = torch.ops.aten
_FILLS = (_aten.fill_.Scalar, _aten.zero_.default)


class NotReplayable(Exception):
    """A model whose parameters cannot be given their values shard by shard (the message says why)."""


@dataclass
class _Write:
    """One write into a parameter's storage recorded while the model was built on the meta device.

    `param` indexes the recorder's parameters; `size` / `stride` / `offset` are those of the tensor
    written (the parameter, or a view of it such as an embedding's padding row); `seeded` writes draw
    from the CPU generator and are replayed in order, so that every later draw sees the state it saw
    in a plain CPU build."""

    func: Callable
    param: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    args: tuple
    kwargs: dict
    seeded: bool


def _written(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an aten op writes into, from its schema (`Tensor(a!)` arguments)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        out.extend(v for v in values if isinstance(v, torch.Tensor))
    return out


class _ParamsOnMeta(TorchDispatchMode):
    """While a model is constructed: every parameter is registered on the meta device and every write into one is recorded.

    Buffers (RoPE frequencies) stay real tensors on CPU, and no device context is active, so
    transformers runs its weight init as in a plain build (it skips it under `torch.device("meta")`);
    its writes land on meta tensors, cost nothing and draw nothing from the generator. What cannot be
    replayed exactly is noted in `refused` (the first reason): a write other than a random fill,
    `fill_` or `zero_`, a random draw into anything but a parameter, an explicit generator."""

    def __init__(self):
        super().__init__()
        self.params: list[torch.nn.Parameter] = []
        self.index_of: dict[int, int] = {}  # storage → parameter
        self.writes: list[_Write] = []
        self.refused: str | None = None

    def __enter__(self):
        recorder, original = self, torch.nn.Module.register_parameter

        def register(module, name, param):
            if param is not None and not param.is_meta:
                param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
            if param is not None:
                recorder._track(param)
            original(module, name, param)

        self._original = original
        torch.nn.Module.register_parameter = register
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.Module.register_parameter = self._original
        return super().__exit__(*exc)

    def _track(self, param: torch.nn.Parameter) -> None:
        key = param.untyped_storage()._cdata
        if key in self.index_of:
            if self.params[self.index_of[key]] is not param:
                self._refuse("two parameters share one storage")
            return
        if param.storage_offset() or not param.is_contiguous():
            self._refuse("a parameter that is a view")
        self.index_of[key] = len(self.params)
        self.params.append(param)

    def _refuse(self, reason: str) -> None:
        self.refused = self.refused or reason

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seeded = torch.Tag.nondeterministic_seeded in func.tags
        written = [t for t in _written(func, args, kwargs) if t.is_meta]
        if written:
            target = args[0] if args else None
            index = self.index_of.get(target.untyped_storage()._cdata) if isinstance(target, torch.Tensor) else None
            if len(written) != 1 or written[0] is not target or index is None:
                self._refuse(f"{func} writes a meta tensor that is not a parameter")
            elif not (seeded or func in _FILLS):
                self._refuse(f"{func} writes a parameter")
            elif kwargs.get("generator") is not None:
                self._refuse(f"{func} draws from its own generator")
            else:
                self.writes.append(
                    _Write(
                        func,
                        index,
                        tuple(target.shape),
                        tuple(target.stride()),
                        target.storage_offset(),
                        target.dtype,
                        args[1:],
                        kwargs,
                        seeded,
                    )
                )
        elif seeded:
            self._refuse(f"{func} draws random numbers into a tensor that is not a parameter")
        return func(*args, **kwargs)


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the part of `param` this rank holds, the index of its first row): all of it for a plain tensor;
    under FSDP2 the local tensor of the dim-0 shard (torch.chunk's split: ⌈rows / ranks⌉ each, the last ones shorter)."""
    if not isinstance(param, DTensor):
        return param.detach(), 0
    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise CptError(f"a parameter placed as {param.placements} on a {param.device_mesh.ndim}-D mesh; expected FSDP2's Shard(0)")
    with torch.no_grad():
        local = param.to_local()
    if not param.dim():
        return local, 0
    chunk = -(-param.shape[0] // param.device_mesh.size())
    return local, min(param.device_mesh.get_local_rank() * chunk, param.shape[0])


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(torch.empty(shape, device="meta").stride())


def _covers(w: _Write, shape: tuple[int, ...]) -> bool:
    return w.offset == 0 and w.size == shape and w.stride == _contiguous_stride(shape)


def _write_local(local: torch.Tensor, row0: int, shape: tuple[int, ...], w: _Write, values: torch.Tensor | None) -> None:
    """Apply write `w` of a parameter of `shape` to the rows this rank holds (`local`, from row `row0`)."""
    fill = None if values is not None else (0.0 if w.func is _aten.zero_.default else w.args[0])
    if _covers(w, shape):
        if values is None:
            local.fill_(fill)
        else:
            local.copy_(values[row0 : row0 + local.shape[0]] if local.dim() else values)
        return
    # a view (an embedding's padding row): the flat indices it covers, those of this rank's rows kept
    row = math.prod(shape[1:])
    index = torch.arange(math.prod(shape)).as_strided(w.size, w.stride, w.offset).reshape(-1)
    lo = row0 * row
    keep = (index >= lo) & (index < lo + local.numel())
    where = (index[keep] - lo).to(local.device)
    flat = local.view(-1)
    if values is None:
        flat.index_fill_(0, where, fill)
    else:
        flat.index_copy_(0, where, values.reshape(-1)[keep].to(flat))


class MetaModel:
    """A model whose parameters are on the meta device (buffers real, on CPU) and where their values come from.

    Shard it (or not), then `materialise(device)`: the parameters get empty storage on `device` —
    under FSDP2 only this rank's shard — and are filled row range by row range, so a rank never
    holds more than its shards plus one full parameter (the one being generated or read) on the host.
    Tied embeddings stay one parameter (checked)."""

    def __init__(self, model: torch.nn.Module, source: str, fill: Callable[[torch.nn.Module], None]):
        self.model, self.source, self._fill = model, source, fill
        self._tied = _tied(model)

    def materialise(self, device: torch.device) -> None:
        model = self.model
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        swap = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)  # the Parameter objects stay: tied ones stay one
        try:
            model.to_empty(device=device)  # buffers too: put back below
        finally:
            torch.__future__.set_swap_module_params_on_conversion(swap)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
            self._fill(model)
        if self._tied and not _tied(model):
            raise CptError("model: the tied input and output embeddings came apart while sharding")


def _tied(model: torch.nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def _live_names(model: torch.nn.Module, recorder: _ParamsOnMeta) -> dict[int, str]:
    """Recorded parameter → its name in the built model (tied ones: the first name); those dropped while building are absent."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        index = recorder.index_of.get(p.untyped_storage()._cdata)
        if index is None or recorder.params[index] is not p:
            raise NotReplayable(f"parameter {name} was not registered while the model was built")
        names.setdefault(index, name)
    return names


def _replay(recorder: _ParamsOnMeta, names: dict[int, str], seed: int) -> Callable[[torch.nn.Module], None]:
    """The fill of a preset built on meta: the recorded writes run again, in order, from the seed, each
    into a CPU scratch tensor of the written shape, and each parameter's last whole write and what follows
    it are copied into this rank's rows. A random draw thereby sees the generator state it saw in
    `build_model` (same op, shape, strides, dtype), so the values equal a plain CPU build exactly."""
    shapes = {i: tuple(recorder.params[i].shape) for i in names}
    last_whole: dict[int, int] = {}
    for j, w in enumerate(recorder.writes):
        if w.param in names and _covers(w, shapes[w.param]):
            last_whole[w.param] = j
    if unwritten := [names[i] for i in names if i not in last_whole]:
        raise NotReplayable(f"no init writes the whole of {', '.join(unwritten[:3])}")
    writes = recorder.writes

    def fill(model: torch.nn.Module) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for j, w in enumerate(writes):
                values = None
                if w.seeded:
                    values = torch.empty_strided(w.size, w.stride, dtype=w.dtype)
                    w.func(values, *w.args, **w.kwargs)
                if w.param not in names or j < last_whole[w.param]:
                    continue  # overwritten later, or a parameter the model dropped (tying): only its draws count
                local, row0 = local_rows(model.get_parameter(names[w.param]))
                _write_local(local, row0, shapes[w.param], w, values)

    return fill


def _safetensors_index(path: Path) -> dict[str, Path] | None:
    """Tensor name → its safetensors file in an HF checkpoint directory; None without safetensors."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), "pt") as f:
            return dict.fromkeys(f.keys(), single)
    return None


def _read_slices(path: Path, model: torch.nn.Module) -> Callable[[torch.nn.Module], None]:
    """The fill of a checkpoint built on meta: each parameter's rows read from its safetensors file
    (`get_slice`: only those bytes of the mapped file), cast to the parameter's dtype as
    `from_pretrained(dtype=float32)` does."""
    from safetensors import safe_open

    files = _safetensors_index(path)
    if files is None:
        raise NotReplayable("no model.safetensors (a .bin checkpoint cannot be read by slices)")
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    plan: dict[Path, list[tuple[str, str]]] = {}  # file → (parameter name, tensor name)
    for name, p in model.named_parameters():
        key = next((a for a in aliases[id(p)] if a in files), None)
        if key is None:
            raise NotReplayable(f"the checkpoint holds no tensor named {name}")
        with safe_open(str(files[key]), "pt") as f:
            if tuple(f.get_slice(key).get_shape()) != tuple(p.shape):
                raise NotReplayable(f"{key} has another shape in the checkpoint than in the model")
        plan.setdefault(files[key], []).append((name, key))

    def fill(sharded: torch.nn.Module) -> None:
        for file, entries in plan.items():
            for name, key in entries:
                # opened per tensor: the mapped pages read (counted in the RSS) go with it
                with safe_open(str(file), "pt") as f:
                    local, row0 = local_rows(sharded.get_parameter(name))
                    part = f.get_slice(key)
                    rows = part[row0 : row0 + local.shape[0]] if local.dim() else part[...]
                    local.copy_(rows.to(local.dtype))

    return fill


def meta_model_for(cfg, vocab_size: int, eos_id: int) -> MetaModel:
    """The model of `model_for`, with its parameters on the meta device and the fill that gives them
    the values `model_for` would (exactly). NotReplayable when that cannot be done shard by shard
    (the caller then builds the whole model)."""
    attn = cfg.model.attn_implementation
    if cfg.model.init:
        path = Path(cfg.model.init)
        if not (path / "config.json").is_file():
            raise CptError(f"{path}: not an HF checkpoint directory (no config.json) (model.init)")
        try:
            config = AutoConfig.from_pretrained(str(path))
            with _ParamsOnMeta():
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
        except Exception as err:
            raise CptError(f"{path}: cannot load the checkpoint: {str(err).splitlines()[0]}") from None
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(path))
        model.eval()  # as from_pretrained leaves it
        _check_positions(cfg, model)
        return MetaModel(model, f"model.init read slice by slice from {path}", _read_slices(path, model))
    config = llama_config(cfg.model.preset, vocab_size, eos_id, cfg.training.seq_len, attn)
    with _ParamsOnMeta() as recorder:
        model = LlamaForCausalLM(config)
    if recorder.refused:
        raise NotReplayable(recorder.refused)
    _check_positions(cfg, model)
    fill = _replay(recorder, _live_names(model, recorder), cfg.seed)
    return MetaModel(model, f"the seeded init of preset {cfg.model.preset} replayed shard by shard", fill)
