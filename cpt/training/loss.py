"""The one next-token loss of cpt: plain, fused + chunked for training, chunked for evaluation.

- `token_cross_entropy(logits, targets, reduction)`: cross-entropy of [.., V] logits (cast to fp32)
  against next-token targets; the gradient probe, the plain training path and the evaluation of
  models the chunked paths do not take use it.
- `causal_lm_loss`: the training loss from the hidden states with the lm_head matmul and the
  cross-entropy fused and chunked over tokens. The plain path materialises the [tokens, vocab]
  logits, keeps them and their log-softmax for the backward (2 × 64 MiB at 2048 tokens × 8192
  vocab in fp32), and streams them through memory ~6 times; here each chunk's logits are turned
  into the gradient (softmax − one-hot) while they are still in cache, and the lm_head backward
  matmuls run right away, so nothing of size [tokens, vocab] outlives a chunk. Same mean loss
  and gradients as the plain path to float rounding.
- `causal_lm_loss_in_forward`: the same fused, chunked training loss computed inside the whole model's
  forward (an lm_head pre-hook takes the final hidden states; the loss replaces the logits as the
  model's output), for an FSDP2-sharded model: the root's hooks gather lm_head and the embeddings and
  reduce-scatter their gradients only when the whole model runs and its output is what backward
  starts from. `causal_lm_loss` takes this path for an FSDP2 root.
- `NextTokenLoss`: that loss as a module, which is what DDP wraps and what runs under FSDP2
  (cpt.training.parallel).
- `causal_lm_loss_sum`: the evaluation loss (a sum, no gradients) with the lm_head + cross-entropy
  in chunks of rows, so held-out evaluation never holds [batch × seq_len, vocab] logits either
  (16 × 2048 × 128k fp32 would be 17 GB); it runs the whole model, so it also works on an
  FSDP2-sharded one.
- `chunk_rows(device, vocab)`: rows per chunk for both: 256 on CPU (measured, docs/throughput.md),
  on CUDA as many as make a chunk's fp32 logits ~256 MiB (8192 rows at an 8k vocabulary).

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
CUDA_CHUNK_BYTES = 256 << 20


def chunk_rows(device: torch.device, vocab: int) -> int:
    """Rows per chunk of the chunked lm_head + cross-entropy on `device` for a `vocab`-wide head.

    CPU: `DEFAULT_CHUNK` (256), the fastest of 128–1024 on the 2-core benchmark machine, where a
    chunk's logits should stay in cache. CUDA: a chunk's fp32 logits take ~`CUDA_CHUNK_BYTES`
    (256 MiB; rows rounded down to a multiple of 64, at least 256): large matmuls keep the GPU busy
    and the loop over chunks short (8192 rows at vocab 8192, 512 at 128k), while a chunk's logits,
    their softmax and gradient stay a few hundred MB next to a model's tens of GB.
    """
    if torch.device(device).type == "cuda":
        return max(DEFAULT_CHUNK, CUDA_CHUNK_BYTES // (4 * vocab) // 64 * 64)
    return DEFAULT_CHUNK


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


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (hidden [N, H], weight [V, H],
    targets [N] int64, no ignore_index), fused and chunked (`chunk` rows, default `chunk_rows`): see
    the module docstring.

    Under autocast the matmuls run in the autocast dtype and the softmax in fp32, like the plain
    path's `logits.float()`. Without gradients it is the chunked sum of `linear_cross_entropy_sum`
    divided by N.
    """
    chunk = chunk or chunk_rows(hidden.device, weight.shape[0])
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return linear_cross_entropy_sum(hidden, weight, targets, chunk) / hidden.shape[0]
    dev = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, compute_dtype)


@torch.no_grad()
def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Sum over rows of CE(hidden @ weight.T, targets) (shapes as `linear_cross_entropy`), no gradients,
    `chunk` rows at a time (default `chunk_rows`): nothing of size [N, V] is allocated.

    A chunk's logits are computed as the plain path computes them (`F.linear` in the ambient autocast
    dtype, then fp32) and its per-row losses go into an [N] fp32 vector, which `F.nll_loss` sums: the
    reduction `F.cross_entropy(..., reduction="sum")` ends in, so on CPU the result is the same float
    as the full-logits cross-entropy (BLAS rows do not depend on the other rows of a matmul).
    """
    chunk = chunk or chunk_rows(hidden.device, weight.shape[0])
    n = hidden.shape[0]
    per_row = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for s in range(0, n, chunk):
        logits = F.linear(hidden[s : s + chunk], weight)
        per_row[s : s + chunk] = F.cross_entropy(logits.float(), targets[s : s + chunk], reduction="none")
    return F.nll_loss(per_row.neg_().unsqueeze(1), torch.zeros(n, dtype=torch.long, device=hidden.device), reduction="sum")


def _has_fusable_head(model: torch.nn.Module) -> bool:
    """An HF causal LM (or a `torch.compile` of one) with a bias-free linear lm_head over `model.model`."""
    base = getattr(model, "_orig_mod", model)
    head = getattr(base, "lm_head", None)
    return (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and hasattr(base, "model")
        and getattr(base.config, "final_logit_softcapping", None) is None
    )


def supports_fused_loss(model: torch.nn.Module) -> bool:
    """True for an HF causal LM with a bias-free linear lm_head over `model.model` (Llama & co).

    False for a DistributedDataParallel wrapper or an FSDP2-sharded model: calling their inner modules
    directly would skip the wrapper's hooks (gradient reduction, parameter gathering). `causal_lm_loss`
    then takes the plain path, except for an FSDP2 root, whose fused loss it computes inside the whole
    model's forward (`causal_lm_loss_in_forward`).
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return False
    if isinstance(model, FSDPModule):  # the root's hooks gather lm_head only when the whole model is called
        return False
    return _has_fusable_head(model)


def causal_lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    chunk: int | None = None,
    body: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Mean next-token loss of an HF causal LM, equal to
    `F.cross_entropy(model(input_ids=input_ids).logits.float().reshape(-1, V), targets.reshape(-1))`
    to float rounding, without materialising the [tokens, vocab] logits (see the module docstring).

    `body` is the module that maps ids to final hidden states (default `model.model`; pass a
    `torch.compile`d one to compile it). An FSDP2 root with a fusable head runs the whole model instead
    (`causal_lm_loss_in_forward`; `body` unused: FSDP2 compiles per layer); other models
    `supports_fused_loss` rejects use the plain path.
    """
    if isinstance(model, FSDPModule) and _has_fusable_head(model):
        return causal_lm_loss_in_forward(model, input_ids, targets, chunk)
    if not supports_fused_loss(model):
        return token_cross_entropy(model(input_ids=input_ids).logits, targets)
    base = getattr(model, "_orig_mod", model)
    body = body if body is not None else base.model
    hidden = body(input_ids=input_ids).last_hidden_state
    scale = getattr(base.config, "logit_scale", None)  # (Cohere-style) absent for Llama
    if scale is not None:
        hidden = hidden * scale
    return linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), base.lm_head.weight, targets.reshape(-1), chunk)


def causal_lm_loss_in_forward(
    model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Mean next-token loss of `input_ids` [B, T] against `targets` [B, T] (int64), the fused and chunked
    `linear_cross_entropy` computed inside the forward of the whole model, which returns it in place of
    its logits: the value and gradients of `causal_lm_loss`, never [B·T, V] logits.

    For an FSDP2-sharded model (`model` must pass `_has_fusable_head`). Its root gathers the embeddings,
    final norm and lm_head in its pre-forward hook, registers its pre-backward hook on the tensors of
    its output, and that hook queues the callback that reduce-scatters the root's gradients: calling
    `model.model` and the loss separately would skip both. So a forward pre-hook on the lm_head takes
    the final hidden states, computes the loss from them with the lm_head's weight as it is at that
    moment (the gathered one; the embedding's when tied), and hands the lm_head zero rows; a forward
    hook makes the loss the lm_head's output, hence the model's `logits`, the tensor FSDP2 hooks and
    backward starts from. The gradient of the weight lands on the gathered parameter, which FSDP2
    reduce-scatters like any other. Without gradients it is the chunked mean.
    """
    flat = targets.reshape(-1)
    return _loss_at_head(model, input_ids, lambda hidden, weight: linear_cross_entropy(hidden, weight, flat, chunk), returned=True)


@torch.no_grad()
def causal_lm_loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Sum of the next-token losses of `input_ids` [B, T] against `targets` [B, T] (int64): a 0-dim fp32
    tensor on the model's device, no gradients, equal to
    `token_cross_entropy(model(input_ids=input_ids).logits, targets, reduction="sum")` (the same float
    on CPU) without the [B·T, V] logits: the lm_head + cross-entropy run `chunk` rows at a time
    (`linear_cross_entropy_sum`). Meant for evaluation (and anything else that needs a loss, not its
    gradient); the autocast context is the caller's.

    The whole model is called, so a wrapper's hooks run as for the plain path: on an FSDP2-sharded
    model the root's forward gathers the lm_head weight, and each decoder layer its own. A forward
    pre-hook on the lm_head takes its input (the final hidden states), computes the chunked loss with
    the lm_head's weight as it is at that moment (the gathered one), and hands the lm_head zero rows, so
    the model's own logits are [B, 0, V]. Models `_has_fusable_head` rejects (a biased or tied-and-scaled
    head, soft-capped logits, DDP) take the plain path.
    """
    if not _has_fusable_head(model):
        return token_cross_entropy(model(input_ids=input_ids).logits, targets, reduction="sum")
    flat = targets.reshape(-1)
    return _loss_at_head(model, input_ids, lambda hidden, weight: linear_cross_entropy_sum(hidden, weight, flat, chunk), returned=False)


def _loss_at_head(model: torch.nn.Module, input_ids: torch.Tensor, compute, returned: bool) -> torch.Tensor:
    """Run the whole model with a forward pre-hook on its lm_head that computes `compute(hidden [B·T, H], weight)` from
    the final hidden states (times the config's `logit_scale`, if any) with the head's weight as it is at that moment
    (FSDP2's gathered one), and hands the head zero rows. `returned`: a forward hook also makes that loss the head's
    output, hence the model's `logits`, which is returned (backward starts from it, as FSDP2's hooks need); else the
    loss is returned and the model's logits, [B, 0, V], are dropped."""
    base = getattr(model, "_orig_mod", model)
    scale = getattr(base.config, "logit_scale", None)
    losses: list[torch.Tensor] = []

    def head_input(head: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0] if scale is None else args[0] * scale
        losses.append(compute(hidden.reshape(-1, hidden.size(-1)), head.weight))
        return (args[0][..., :0, :], *args[1:])

    handles = [base.lm_head.register_forward_pre_hook(head_input)]
    if returned:
        handles.append(base.lm_head.register_forward_hook(lambda head, args, output: losses[-1]))
    try:
        out = model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    if len(losses) != 1:
        raise RuntimeError(f"{type(base).__name__}: the lm_head ran {len(losses)} times in one forward; expected once")
    return out.logits if returned else losses[0]


class NextTokenLoss(torch.nn.Module):
    """The training objective as a module whose forward returns the mean next-token loss.

    DistributedDataParallel only reduces gradients of a module it runs `forward` on; wrapping this
    module (not the HF model) keeps the fused, chunked loss and a `torch.compile`d decoder body
    under DDP. Under FSDP2 it wraps the sharded root, and `causal_lm_loss` runs the fused loss inside
    the root's forward. `body` is kept outside the module tree so the parameters are registered once.
    """

    def __init__(self, model: torch.nn.Module, body: torch.nn.Module | None = None):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_body", body)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.model, input_ids, targets, body=self._body)
