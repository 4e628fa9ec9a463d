"""Gradient-alignment probe: cosine similarity between gradients of different tasks' batches.

MER is meant to raise the agreement (dot product) between gradients on new and old data. The probe
measures it directly: the gradient of the loss on a small current-task batch, and on a small batch
of each earlier task (and of the replay buffer), then cos(g_current, g_other). It uses
`torch.autograd.grad`, so the training gradients and the optimizer are untouched, and its batches
come from its own readers, so turning it on does not change what the run trains on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_gradient(model: torch.nn.Module, rows: torch.Tensor, params: list[torch.Tensor], autocast_dtype=None) -> torch.Tensor:
    """The flattened fp32 gradient of the mean next-token loss on `rows` [n, seq_len+1]."""
    device = params[0].device
    rows = rows.to(device)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(input_ids=rows[:, :-1]).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])


def gradient_cosines(model: torch.nn.Module, current: torch.Tensor, others: dict[str, torch.Tensor], autocast_dtype=None) -> dict[str, float]:
    """cos(∇L(current), ∇L(other)) for each named batch in `others`."""
    params = [p for p in model.parameters() if p.requires_grad]
    g0 = batch_gradient(model, current, params, autocast_dtype)
    out = {}
    for name, rows in others.items():
        g = batch_gradient(model, rows, params, autocast_dtype)
        out[name] = float(F.cosine_similarity(g0, g, dim=0))
    return out
