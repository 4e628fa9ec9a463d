"""Data-parallel processes under `torchrun`: set-up and the few collective operations the loop needs.

The method itself has no second code path: each rank reads its own windows of every task
(`TaskStream(rank, world)`), owns its replay-buffer shard, and the model is wrapped in DDP so the
gradients are averaged; Reptile then edits identical weights on every rank. Only rank 0 writes
metrics, summaries, HF checkpoints and reports; resumable checkpoints hold every rank's data
position, buffer state and RNG (each rank writes its own file), so a run resumes on the same world size.
With `training.parallel: fsdp` the model is sharded instead (FSDP2, below): parameters, gradients and
optimizer state are split across ranks, resumable checkpoints are written by every rank through torch
distributed checkpoint, and HF checkpoints are gathered to rank 0 first.
With one process (no `WORLD_SIZE`), the collective functions here are no-ops.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from cpt.errors import CptError


def world_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def init(device_type: str, timeout_s: float | None = None) -> None:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); a no-op in one process.

    `timeout_s` (`training.dist_timeout_s`) bounds every collective of the run — a gradient all-reduce,
    an evaluation's loss sums, a checkpoint barrier: a rank that waits longer for the slowest one fails
    instead of hanging. The run prepares its data before calling this (`build.prepare_data`), so
    tokenizing, however long, never counts against it. None: torch's default (NCCL 10 min, gloo 30 min).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", **timeout)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (bounded by the process group's timeout, `init`); a no-op in one process."""
    if active():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_to_all(obj):
    """Every rank's `obj`, in rank order (a list of one without torchrun)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------ FSDP2
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of an HF causal LM (`model.model.layers` for Llama, Qwen2, Mistral …)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise CptError(f"training.parallel: fsdp needs a model with model.model.layers; {type(model).__name__} has none")
    return list(layers)


def shard_model(model: torch.nn.Module, mixed_bf16: bool, compile_layers: bool = False) -> None:
    """FSDP2 in place: one `fully_shard` unit per decoder layer, then the root (embeddings, norm, lm_head).

    Parameters become DTensors sharded on dim 0 across the ranks; the optimizer built afterwards owns
    only the local shards, and so does a Reptile anchor made from it. With `mixed_bf16`, layers
    compute in bf16 and gradients are reduced in fp32 (the sharded master weights stay fp32).
    The parameters may still be on the meta device (`cpt.model.meta_model_for`): each rank then gives
    its shards storage and values afterwards (`MetaModel.materialise`), never holding the whole model.
    """
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        if compile_layers:
            layer.compile()
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def full_state_dict(model: torch.nn.Module) -> dict:
    """Collective: the whole (unsharded) model state on rank 0, on CPU; an empty dict elsewhere."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def cpu_group():
    """Collective: a gloo group of all ranks for a background checkpoint writer (its collectives run beside
    training's on the default group, and DCP's `async_save` needs a CPU backend); None in one process."""
    return dist.new_group(backend="gloo") if active() else None


def gather_objects(obj, group=None) -> list:
    """Every rank's (small) `obj`, in rank order, over `group` (default: the default group); a list of one without torchrun."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory, group=None, asynchronous: bool = False):
    """Collective: every rank writes its own shards of model and optimizer state (torch distributed checkpoint).

    `asynchronous`: DCP's `async_save` copies the shards to host memory, writes them in a background thread
    (over `group`, a gloo group: `cpu_group`) and returns its Future; training may change the weights meanwhile.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    if asynchronous:
        return dcp.async_save(state, checkpoint_id=str(directory), process_group=group)
    dcp.save(state, checkpoint_id=str(directory), process_group=group)
    return None


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory) -> None:
    """Collective: read the shards written by `save_sharded` (same world size) into model and optimizer; each rank
    reads the chunks of its own shards (DCP plans the reads from `.metadata`), never the whole checkpoint."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
