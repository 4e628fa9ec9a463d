"""Where a run computes and in which precision: the device, the autocast context, CPU math and threads.

`resolve_device` turns `training.device` / `training.precision` into a device and an autocast dtype
(bf16 on CUDA, none — plain fp32 — on CPU, where bf16 matmuls are slower); `precision` is the one
autocast context every forward pass of the run uses (training, evaluation, the probe).
"""

from __future__ import annotations

import contextlib
import os

import torch

from cpt.config import RunConfig
from cpt.errors import CptError


def resolve_device(cfg: RunConfig, local_rank: int = 0, world: int = 1) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None); under torchrun with CUDA, this rank's GPU."""
    want = cfg.training.device
    if want == "cuda" and not torch.cuda.is_available():
        raise CptError("training.device: cuda requested but no CUDA device is available")
    device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    precision = cfg.training.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device, (torch.bfloat16 if precision == "bf16" else None)


def precision(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The run's autocast context: `dtype` (bf16) on `device`, or plain fp32 when None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def configure_cpu() -> None:
    """Process-wide CPU math settings for training: flush denormals to zero.

    Denormal (subnormal) floats take a microcode slow path on x86: a training loop whose values
    drift into that range runs many times slower (seen as 10× on a loop that repeats one batch).
    Flushing them changes results only below ~1e-38 in fp32. No-op where unsupported.
    """
    torch.set_flush_denormal(True)


def ensure_threads() -> None:
    """Use every core for intra-op work unless the user already chose (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


def rng_state() -> dict:
    """This process's torch RNG state (CPU, and every CUDA device when present)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
