"""Reptile meta-updates: the gradient-alignment half of efficient MER.

Convention (the one this code implements; β is the *meta step size*):
    every k optimizer steps:  θ ← θ₀ + β·(θ − θ₀);  θ₀ ← θ
where θ₀ (the anchor) is the weights at the previous meta-update. By default (alignment.task_end_update)
the loop also meta-updates at every task end, so each row of the loss matrix and each task checkpoint
holds interpolated weights and k counts from each task's start; with it off k counts globally across
task boundaries, as the paper's public code does. β = 1 keeps the k inner steps
whole (plain training); smaller β moves only part of the way, which (Nichol et al. 2018; Riemer
et al. 2019) favours directions whose gradients agree across the batches of the k steps, i.e.
across old (replayed) and new data when combined with replay. The paper's "interpolation
coefficient" is this β when phrased as "move a fraction β of the way from the old weights to the
new"; a code base that writes θ ← θ + ε(θ₀ − θ) uses ε = 1 − β.

The update edits the tensors the optimizer owns (its param groups): fp32 master weights under
autocast, each rank's local shard under FSDP2 (DTensor), so the next optimizer step starts from
the edited values. The anchor is an fp32 copy, on the parameters' device or on CPU. Adam's
moments are left untouched at a meta-update, as in the paper.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class Reptile:
    """After every k optimizer steps, interpolate the optimizer's weights toward the anchor."""

    def __init__(self, params: list[torch.Tensor], k: int, beta: float, anchor_device: str = "same"):
        if k <= 0:
            raise ValueError("k must be > 0")
        if not 0 < beta <= 1:
            raise ValueError("beta must be in (0, 1]")
        self.params = params
        self.k = k
        self.beta = beta
        self.anchor_device = anchor_device
        self.steps_since_anchor = 0
        self.meta_updates = 0
        self.anchor = [self._copy(p) for p in params]

    def _copy(self, p: torch.Tensor) -> torch.Tensor:
        local = _local(p.detach())
        device = torch.device("cpu") if self.anchor_device == "cpu" else local.device
        out = torch.empty(local.shape, dtype=torch.float32, device=device, pin_memory=device.type == "cpu" and local.is_cuda)
        out.copy_(local)
        return out

    @property
    def anchor_bytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.anchor)

    def after_step(self) -> bool:
        """Call after each optimizer step; returns True when a meta-update happened."""
        self.steps_since_anchor += 1
        if self.steps_since_anchor < self.k:
            return False
        self.meta_update()
        return True

    @torch.no_grad()
    def meta_update(self) -> None:
        """θ ← θ₀ + β·(θ − θ₀); θ₀ ← θ now, whatever the count (the loop calls it at task ends too)."""
        for p, a in zip(self.params, self.anchor):
            w = _local(p.detach())
            if self.beta != 1.0:  # β = 1 must be plain training bit for bit: leave θ alone
                a_dev = a.to(w.device, non_blocking=True)
                new = a_dev + self.beta * (w.float() - a_dev)
                w.copy_(new)
            a.copy_(w, non_blocking=True)
        self.steps_since_anchor = 0
        self.meta_updates += 1

    def state_dict(self, anchor: bool = True) -> dict:
        """`anchor=False` leaves the anchor out (None), for callers that store it elsewhere (per-rank shards)."""
        return {
            "anchor": [a.cpu() for a in self.anchor] if anchor else None,
            "steps_since_anchor": self.steps_since_anchor,
            "meta_updates": self.meta_updates,
            "k": self.k,
            "beta": self.beta,
        }

    def load_state_dict(self, state: dict) -> None:
        for a, saved in zip(self.anchor, state["anchor"]):
            a.copy_(saved)
        self.steps_since_anchor = int(state["steps_since_anchor"])
        self.meta_updates = int(state["meta_updates"])


class MetaUpdates:
    """Reptile as an after-step hook (cpt.training.hooks): k counted inside, and a meta-update at task ends.

    With `at_task_end` (alignment.task_end_update) a task end that falls between two k-multiples
    meta-updates too, so the loss-matrix row and the task checkpoint hold interpolated weights.

    Where the anchor is checkpointed: unsharded, whole in `state.pt` (this hook's state); under FSDP2 as
    DTensors with the parameters' placements inside the torch distributed checkpoint (`dcp_state`), so it
    reshards like the weights when a run resumes on another number of ranks. A whole anchor loaded into an
    FSDP2 run (a DDP or one-process checkpoint) is cut to this rank's shards; a sharded one loaded into an
    unsharded run arrives whole through DCP. `names`: each anchor tensor's parameter name (its DCP key).
    """

    name = "reptile"

    def __init__(self, reptile: Reptile, task_ends: list[int], at_task_end: bool, sharded: bool = False, names: list[str] | None = None):
        self.reptile = reptile
        self.task_ends = set(task_ends)
        self.at_task_end = at_task_end
        self.sharded = sharded
        self.names = names or [f"param{i}" for i in range(len(reptile.params))]

    @property
    def meta_updates(self) -> int:
        return self.reptile.meta_updates

    def after_step(self, step: int, skipped: bool = False) -> list[dict]:
        records = []
        if not skipped and self.reptile.after_step():
            records.append({"type": "meta_update", "step": step + 1, "count": self.reptile.meta_updates})
        if step + 1 in self.task_ends and self.at_task_end and self.reptile.steps_since_anchor:
            self.reptile.meta_update()
            records.append({"type": "meta_update", "step": step + 1, "count": self.reptile.meta_updates, "task_end": True})
        return records

    def state_dict(self) -> dict:
        return self.reptile.state_dict(anchor=not self.sharded)

    def dcp_state(self, for_load: bool = False) -> dict | None:
        """The anchor as DCP sees it: {name: DTensor} under FSDP2 (saved and loaded there); when loading into an
        unsharded run, {name: tensor} to be filled from a sharded checkpoint; else None (it is in `state.pt`)."""
        if self.sharded:
            return {
                n: DTensor.from_local(a, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                for n, a, p in zip(self.names, self.reptile.anchor, self.reptile.params)
            }
        return dict(zip(self.names, self.reptile.anchor)) if for_load else None

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            return
        anchor = state.get("anchor")
        if anchor is not None and self.sharded:  # a whole anchor into shards: this rank's part of each
            anchor = [
                distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local()
                for whole, p in zip(anchor, self.reptile.params)
            ]
        if anchor is None:  # filled through DCP already (`dcp_state`)
            anchor = self.reptile.anchor
        self.reptile.load_state_dict({**state, "anchor": anchor})

    def load_shard(self, state: dict | None, directory: Path, rank: int, load) -> None:
        """An FSDP2 checkpoint of an earlier cpt: this rank's anchor from `anchor-rank<r>.pt`, then the rest of `state`."""
        if self.sharded and state is not None:
            self.reptile.load_state_dict({**state, "anchor": load(directory / f"anchor-rank{rank}.pt")})
