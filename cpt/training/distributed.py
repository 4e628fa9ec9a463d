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


def all_true(flag: bool, group=None) -> bool:
    """Collective: whether `flag` holds on every rank (a MIN all-reduce of one int over `group`, a gloo group)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def gather_objects(obj, group=None) -> list:
    """Every rank's (small) `obj`, in rank order, over `group` (default: the default group); a list of one without torchrun."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory, group=None, asynchronous: bool = False, extra=None):
    """Collective: every rank writes its own shards of model and optimizer state (torch distributed checkpoint).

    `extra`: more named state dicts of DTensors saved with them (the Reptile anchor), resharded alike on load.
    `asynchronous`: DCP's `async_save` copies the shards to host memory, writes them in a background thread
    (over `group`, a gloo group: `cpu_group`) and returns its Future; training may change the weights meanwhile.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd, **(extra or {})}
    if asynchronous:
        return dcp.async_save(state, checkpoint_id=str(directory), process_group=group)
    dcp.save(state, checkpoint_id=str(directory), process_group=group)
    return None


def saved_keys(directory) -> set[str]:
    """The top-level names in a DCP checkpoint ("model", "optimizer", "anchor", …), read from its `.metadata`."""
    meta = dcp.FileSystemReader(str(directory)).read_metadata()
    return {k.split(".", 1)[0] for k in meta.state_dict_metadata}


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory, extra=None) -> None:
    """Collective: read a DCP checkpoint (`save_sharded`) into model and optimizer, whatever the world size it was
    written with and whether this model is sharded (FSDP2: each rank reads the chunks of its own shards; unsharded:
    every rank reads the whole state). `extra`: templates to fill in place, for the names the checkpoint holds."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    have = saved_keys(directory)
    state = {"model": model_sd, "optimizer": optim_sd, **{k: v for k, v in (extra or {}).items() if k in have}}
    dcp.load(state, checkpoint_id=str(directory), no_dist=not active())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_whole_into_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """An unsharded checkpoint (one process or DDP: `state_dict()`s of the whole model and of the optimizer) into an
    FSDP2 model: each rank keeps its own rows of every tensor (read through the memory-mapped `state.pt`)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    optim_fqn = {
        "state": {order[int(i)]: v for i, v in optim_state["state"].items()},
        "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in optim_state["param_groups"]],
    }
    set_state_dict(
        model, optimizer, model_state_dict=model_state, optim_state_dict=optim_fqn, options=StateDictOptions(full_state_dict=True)
    )
