"""Weight merging at task ends: the WiSE-FT / model-merging baseline for forgetting, with no replayed data.

At the end of every task (so at the end of the run too) the weights are interpolated toward a
reference copy θ_ref:

    θ ← (1 − λ)·θ_ref + λ·θ

`merge.toward: previous` keeps θ_ref at the previous task end (the model at step 0 before the
first one) and replaces it with the merged weights after each merge, so every task's update is
shrunk by λ and the earlier tasks' weights decay geometrically; `initial` keeps the step-0 model
(WiSE-FT's "interpolate the fine-tuned model with the zero-shot one"), so each task end lands at
most a fraction λ of the way from it. λ = 1 is plain training, bit for bit.

As with Reptile (cpt.alignment.reptile) the edit lands on the tensors the optimizer owns: the fp32
master weights under autocast, each rank's local shard under FSDP2, so the next optimizer step
starts from the merged weights. θ_ref is one fp32 copy on the parameters' device. The loop runs
this hook inside the step, before the task-end evaluation, so each loss-matrix row and each task
checkpoint holds merged weights. Adam's moments are left as they are (`optimizer.reset_at_task`
clears them separately).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from cpt.alignment.reptile import _local


class TaskEndMerge:
    """An after-step hook (cpt.training.hooks): at each task end, θ ← (1 − λ)·θ_ref + λ·θ on the optimizer's parameters.

    Checkpointed like Reptile's anchor: unsharded, θ_ref is whole in `state.pt` (this hook's state);
    under FSDP2 it travels as DTensors with the parameters' placements in the torch distributed
    checkpoint (`dcp_state`), so it reshards with the weights. `names`: each parameter's name (the
    DCP key of its copy); `task_names`: the rows' names for the metrics records.
    """

    name = "merge"

    def __init__(
        self,
        params: list[torch.Tensor],
        lam: float,
        toward: str,
        task_ends: list[int],
        sharded: bool = False,
        names: list[str] | None = None,
        task_names: list[str] | None = None,
    ):
        if not 0 < lam <= 1:
            raise ValueError("lam must be in (0, 1]")
        if toward not in ("previous", "initial"):
            raise ValueError("toward must be 'previous' or 'initial'")
        self.params = params
        self.lam = lam
        self.toward = toward
        self.task_ends = list(task_ends)
        self.sharded = sharded
        self.names = names or [f"param{i}" for i in range(len(params))]
        self.task_names = task_names or [str(i) for i in range(len(self.task_ends))]
        self.merges = 0
        self.reference = [self._copy(p) for p in params]

    @staticmethod
    def _copy(p: torch.Tensor) -> torch.Tensor:
        local = _local(p.detach())
        return local.to(dtype=torch.float32, copy=True)

    @torch.no_grad()
    def merge(self) -> None:
        """θ ← (1 − λ)·θ_ref + λ·θ now; with `toward: previous` θ_ref becomes the merged weights.

        λ = 1 leaves θ untouched rather than computing θ + 0·(θ_ref − θ), which would turn a −0.0 into +0.0."""
        for p, ref in zip(self.params, self.reference):
            w = _local(p.detach())
            if self.lam != 1.0:
                if w.dtype == torch.float32:
                    w.lerp_(ref, 1.0 - self.lam)
                else:
                    w.copy_(ref.lerp(w.float(), self.lam))
            if self.toward == "previous":
                ref.copy_(w)
        self.merges += 1

    def after_step(self, step: int, skipped: bool = False) -> list[dict]:
        """At a task end (step + 1 is one), merge, skipped batch or not: the task is over either way."""
        if step + 1 not in self.task_ends:
            return []
        self.merge()
        task = self.task_ends.index(step + 1)
        return [{"type": "merge", "step": step + 1, "task": self.task_names[task], "task_index": task, "count": self.merges}]

    def state_dict(self) -> dict:
        return {
            "reference": None if self.sharded else [r.cpu() for r in self.reference],
            "merges": self.merges,
            "lam": self.lam,
            "toward": self.toward,
        }

    def dcp_state(self, for_load: bool = False) -> dict | None:
        """θ_ref as DCP sees it: {name: DTensor} under FSDP2 (saved and loaded there); when loading into an unsharded
        run, {name: tensor} to be filled from a sharded checkpoint; else None (it is in `state.pt`)."""
        if self.sharded:
            return {
                n: DTensor.from_local(r, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                for n, r, p in zip(self.names, self.reference, self.params)
            }
        return dict(zip(self.names, self.reference)) if for_load else None

    def load_state_dict(self, state: dict | None) -> None:
        """θ_ref and the count from a checkpoint; a whole θ_ref loaded into an FSDP2 run is cut to this rank's shards."""
        if state is None:
            return
        reference = state.get("reference")
        if reference is not None:
            if self.sharded:
                reference = [
                    distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local()
                    for whole, p in zip(reference, self.params)
                ]
            for r, saved in zip(self.reference, reference):
                r.copy_(saved)
        self.merges = int(state["merges"])
