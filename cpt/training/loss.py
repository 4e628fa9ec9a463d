"""The one next-token loss of cpt: plain, and fused + chunked for training.

- `token_cross_entropy(logits, targets, reduction)`: cross-entropy of [.., V] logits (cast to fp32)
  against next-token targets; evaluation (`reduction="sum"`), the gradient probe and the plain
  training path all use it.
- `causal_lm_loss`: the training loss from the hidden states with the lm_head matmul and the
  cross-entropy fused and chunked over tokens. The plain path materialises the [tokens, vocab]
  logits, keeps them and their log-softmax for the backward (2 × 64 MiB at 2048 tokens × 8192
  vocab in fp32), and streams them through memory ~6 times; here each chunk's logits are turned
  into the gradient (softmax − one-hot) while they are still in cache, and the lm_head backward
  matmuls run right away, so nothing of size [tokens, vocab] outlives a chunk. Same mean loss
  and gradients as the plain path to float rounding.
- `NextTokenLoss`: that loss as a module, which is what DDP wraps (cpt.training.parallel).

Measured on the demo model (4 × 256, vocab 8192, 8 × 256 tokens per step, 2 threads), steady
state vs the loop's plain step: fused loss +5.6 %, + fused AdamW (cpt.training.optim) +7.7 %,
+ `torch.compile` of the decoder body (`causal_lm_loss(..., body=torch.compile(model.model))`)
+14 % after a one-off ~15 s compile (docs/throughput.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

DEFAULT_CHUNK = 256


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `logits` [..., V] (computed in fp32) against `targets` [...] (int64)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i @ weight.T, target_i), gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, compute_dtype):
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(compute_dtype)
        inv_n = 1.0 / n
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk].to(compute_dtype)
            t = targets[s : s + chunk]
            logits = (h @ w.t()).float()  # [c, V]
            rows = torch.arange(len(t), device=t.device)
            top = logits.amax(dim=-1)
            target_logit = logits[rows, t]
            # one exp pass serves both the loss (log-sum-exp) and the gradient (softmax − one-hot)
            probs = logits.sub_(top[:, None]).exp_()
            denom = probs.sum(dim=-1)
            total += (top + denom.log() - target_logit).sum()
            probs.mul_((inv_n / denom)[:, None])
            probs[rows, t] -= inv_n
            p = probs.to(compute_dtype)
            if compute_dtype == hidden.dtype:
                torch.mm(p, w, out=grad_h[s : s + chunk])
            else:
                grad_h[s : s + chunk] = (p @ w).to(hidden.dtype)
            if compute_dtype == torch.float32:
                grad_w.addmm_(p.t(), h)
            else:
                grad_w += (p.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total * inv_n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (hidden [N, H], weight [V, H],
    targets [N] int64, no ignore_index), fused and chunked: see the module docstring.

    Under autocast the matmuls run in the autocast dtype and the softmax in fp32, like the plain
    path's `logits.float()`. Without gradients it falls back to the plain formula.
    """
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return F.cross_entropy((hidden @ weight.t()).float(), targets)
    dev = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, compute_dtype)


def supports_fused_loss(model: torch.nn.Module) -> bool:
    """True for an HF causal LM with a bias-free linear lm_head over `model.model` (Llama & co).

    False for a DistributedDataParallel wrapper or an FSDP2-sharded model: calling their inner modules
    directly would skip the wrapper's hooks (gradient reduction, parameter gathering), so such models
    take the plain path.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return False
    if isinstance(model, FSDPModule):  # the root's hooks gather lm_head only when the whole model is called
        return False
    base = getattr(model, "_orig_mod", model)
    head = getattr(base, "lm_head", None)
    return (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and hasattr(base, "model")
        and getattr(base.config, "final_logit_softcapping", None) is None
    )


def causal_lm_loss(
    model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK, body: torch.nn.Module | None = None
) -> torch.Tensor:
    """Mean next-token loss of an HF causal LM, equal to
    `F.cross_entropy(model(input_ids=input_ids).logits.float().reshape(-1, V), targets.reshape(-1))`
    to float rounding, without materialising the [tokens, vocab] logits (see the module docstring).

    `body` is the module that maps ids to final hidden states (default `model.model`; pass a
    `torch.compile`d one to compile it). Models `supports_fused_loss` rejects use the plain path.
    """
    if not supports_fused_loss(model):
        return token_cross_entropy(model(input_ids=input_ids).logits, targets)
    base = getattr(model, "_orig_mod", model)
    body = body if body is not None else base.model
    hidden = body(input_ids=input_ids).last_hidden_state
    scale = getattr(base.config, "logit_scale", None)  # (Cohere-style) absent for Llama
    if scale is not None:
        hidden = hidden * scale
    return linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), base.lm_head.weight, targets.reshape(-1), chunk)


class NextTokenLoss(torch.nn.Module):
    """The training objective as a module whose forward returns the mean next-token loss.

    DistributedDataParallel only reduces gradients of a module it runs `forward` on; wrapping this
    module (not the HF model) keeps the fused, chunked loss and a `torch.compile`d decoder body
    under DDP. `body` is kept outside the module tree so the parameters are registered once.
    """

    def __init__(self, model: torch.nn.Module, body: torch.nn.Module | None = None):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_body", body)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.model, input_ids, targets, body=self._body)
