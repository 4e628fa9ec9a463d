"""Model presets and HF load/save.

Every model is a real `transformers.LlamaForCausalLM` (or, with `model.init`, any local HF causal
LM checkpoint), so a run's checkpoints load with `AutoModelForCausalLM.from_pretrained`. The
presets name the shapes used here: `tiny` for tests, `demo` for the bundled CPU default, `small`
between them for the default scaling sweep, and the paper's public configs (layers × hidden, heads, FFN, peak LR; see arXiv 2508.01908).
They live in `cpt.presets` (no torch there, so the config can validate a preset name) and are re-exported here.
`save_hf` writes a checkpoint directory whole or not at all (`cpt.atomic`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

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
    if cfg.training.seq_len > max_positions(model):
        raise CptError(f"training.seq_len: {cfg.training.seq_len} exceeds the model's {max_positions(model)} positions")
    return model


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
