"""Data-parallel processes under `torchrun`: set-up and the few collective operations the loop needs.

The method itself has no second code path: each rank reads its own windows of every task
(`TaskStream(rank, world)`), owns its replay-buffer shard, and the model is wrapped in DDP so the
gradients are averaged; Reptile then edits identical weights on every rank. Only rank 0 writes
metrics, summaries, HF checkpoints and reports; resumable checkpoints hold every rank's data
position, buffer state and RNG (gathered to rank 0), so a run resumes on the same world size.
With one process (no `WORLD_SIZE`), every function here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def init(device_type: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
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
