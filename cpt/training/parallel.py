"""One process, DDP or FSDP2 behind one interface, so the loop has no parallelism branches.

The model knows nothing of parallelism (torchtitan's rule); a `Parallel` applies it from outside and
gives the loop two handles: `model` (the parameters the optimizer owns, whose state is saved) and
`train_module` (what runs forward: the next-token loss, `cpt.training.loss.NextTokenLoss`, wrapped
as the strategy needs). What differs between the strategies lives here and nowhere else:

- `wrap(model, compile)`: one process runs the loss module as it is; DDP wraps the loss module (it
  reduces the gradients of what it runs, so the fused loss and a compiled decoder body stay on);
  FSDP2 shards each decoder layer and the root (`fully_shard`), compiling each layer first, and the
  fused loss runs inside the root's forward (`cpt.training.loss.causal_lm_loss_in_forward`); the
  model may come with its parameters on the meta device, filled once sharded (`cpt.model.MetaModel`).
- `micro_batch(last)`: gradients are synchronised on the last micro-batch of a step only.
- `eval_min_batches(n)`: under FSDP2 every forward is collective, so every rank runs as many
  evaluation batches as the rank with the most.
- `full_state_dict()`: the whole weights for an HF checkpoint (gathered to rank 0 under FSDP2).
- `load`: model and optimizer state — written in `state.pt` unsharded, through torch distributed checkpoint
  (`dcp/`, one file per rank) under FSDP2 — read from either into any strategy at any world size (DCP reshards).
"""

from __future__ import annotations

import contextlib
import gc
import math
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from cpt.training import distributed
from cpt.training.loss import NextTokenLoss, supports_fused_loss


class OneProcess:
    """A single process: the loss module runs as it is."""

    kind = "one process"
    sharded = False

    def __init__(self, device: torch.device, autocast_dtype: torch.dtype | None, world: int = 1):
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.world = world
        self.compiled: list[str] = []
        self.model: torch.nn.Module | None = None
        self.forward_model: torch.nn.Module | None = None  # what evaluation and the probe call
        self.train_module: torch.nn.Module | None = None

    def wrap(self, model: torch.nn.Module, compile_: bool) -> torch.nn.Module:
        self.model = self.forward_model = model
        body = None
        if compile_ and supports_fused_loss(model):
            # the decoder body; the lm_head + cross-entropy stay fused and chunked (eager)
            body = torch.compile(model.model)
            self.compiled.append("model.model (the decoder body; the fused lm_head + loss runs eagerly)")
        elif compile_:
            self.forward_model = torch.compile(model)
            self.compiled.append("the whole model")
        self.train_module = self._wrap_loss(NextTokenLoss(self.forward_model, body))
        return self.train_module

    def _wrap_loss(self, loss: torch.nn.Module) -> torch.nn.Module:
        return loss

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def eval_min_batches(self, n_windows: int, batch_size: int) -> int:
        return 0

    def full_state_dict(self) -> dict | None:
        """Collective under FSDP2; None means: save the module's own state."""
        return None

    def model_state(self) -> dict | None:
        return self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        return optimizer.state_dict()

    def close(self) -> None:
        """Release what holds the process group (before `distributed.shutdown`)."""

    def load(self, optimizer: torch.optim.Optimizer, state: dict, directory: Path, hooks=()) -> None:
        """Model and optimizer (and the hooks' DCP parts) from any checkpoint: unsharded from `state.pt`; sharded
        (FSDP2, any world size) through DCP, which reshards — so DDP, FSDP2 and one process resume each other's runs."""
        if (directory / "dcp").is_dir():
            distributed.load_sharded(self.model, optimizer, directory / "dcp", dcp_extra(hooks, for_load=True))
        elif self.sharded:
            distributed.load_whole_into_shards(self.model, optimizer, state["model"], state["optimizer"])
        else:
            self.model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])


class DataParallel(OneProcess):
    """torchrun + DDP: the loss module is replicated and DDP averages the gradients."""

    kind = "DDP"

    def _wrap_loss(self, loss: torch.nn.Module) -> torch.nn.Module:
        self.ddp = DistributedDataParallel(loss, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return self.ddp

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        # all-reduce gradients once per optimizer step, not once per micro-batch
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def close(self) -> None:
        # free DDP's reducer while the process group lives: freed after destroy_process_group, its
        # destructor joins a gloo thread that waits for the GIL the destructor holds (seen as a hang at exit)
        self.ddp = self.train_module = None
        gc.collect()


class FullySharded(OneProcess):
    """torchrun + FSDP2: parameters, gradients and optimizer state sharded across the ranks."""

    kind = "FSDP2"
    sharded = True

    def wrap(self, model: torch.nn.Module, compile_: bool) -> torch.nn.Module:
        self.model = self.forward_model = model
        distributed.shard_model(model, mixed_bf16=self.autocast_dtype is not None, compile_layers=compile_)
        if compile_:
            self.compiled.append(f"{len(distributed.decoder_layers(model))} decoder layers, each before FSDP2 sharding")
        # the root's hooks gather lm_head and reduce its gradient only when the whole model runs: the fused,
        # chunked loss is computed inside the root's forward and returned as its output (causal_lm_loss_in_forward)
        self.train_module = NextTokenLoss(model)
        return self.train_module

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def eval_min_batches(self, n_windows: int, batch_size: int) -> int:
        return math.ceil(len(range(0, n_windows, self.world)) / batch_size)

    def full_state_dict(self) -> dict | None:
        return distributed.full_state_dict(self.model)

    def model_state(self) -> dict | None:
        return None  # the shards are in dcp/ (save_shards)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        return None


def dcp_extra(hooks, for_load: bool = False) -> dict:
    """The hooks' state that travels in the DCP checkpoint (name -> state dict of DTensors): the Reptile anchor under FSDP2."""
    out = {}
    for hook in hooks:
        part = hook.dcp_state(for_load) if hasattr(hook, "dcp_state") else None
        if part:
            out[hook.name] = part
    return out


def parallel_for(parallel: str, world: int, device: torch.device, autocast_dtype: torch.dtype | None) -> OneProcess:
    """The strategy of `training.parallel` at this world size (one process ignores it)."""
    if world <= 1:
        return OneProcess(device, autocast_dtype)
    if parallel == "fsdp":
        return FullySharded(device, autocast_dtype, world)
    return DataParallel(device, autocast_dtype, world)
