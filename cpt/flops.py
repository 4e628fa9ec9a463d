"""Training compute: FLOPs per token and model FLOPs utilisation (MFU).

The count follows the PaLM paper's MFU convention (Chowdhery et al. 2022, appendix B):

    FLOPs per trained token = 6 · N  +  12 · L · T · d_attn

- N: parameters that take part in a matrix multiply for every token: all parameters except the
  input embedding table (a lookup, not a matmul). The output projection (lm_head) counts once;
  with tied embeddings the shared matrix counts once, as the lm_head. Norm weights are included
  (negligible). 6 = 2 (multiply-add) × 3 (forward, backward w.r.t. activations and weights).
- Attention: per layer and token, Q·Kᵀ and A·V each take 2 · T · d_attn FLOPs forward
  (T = sequence length, d_attn = heads × head_dim); ×3 for training gives 12 · L · T · d_attn.
  As in PaLM, the causal mask is NOT discounted (a causal kernel does about half of this work),
  so MFU is comparable with PaLM / Megatron / torchtitan figures.

Training FLOPs of a run = FLOPs per token × every token the optimizer trained on (new + replay).
Evaluation forward passes and the alignment probe are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 peak (no sparsity) of accelerators users run on, in FLOP/s.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    head_dim: int
    matmul_params: int  # N in 6·N

    @property
    def d_attn(self) -> int:
        return self.heads * self.head_dim


def shape_of(model) -> Shape:
    """The counting shape of a (possibly wrapped) HF causal LM."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    cfg = inner.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    unique = {id(p): p for p in inner.parameters()}
    total = sum(p.numel() for p in unique.values())
    emb = inner.get_input_embeddings().weight
    tied = inner.get_output_embeddings() is not None and inner.get_output_embeddings().weight is emb
    # The embedding lookup is not a matmul; tied weights are used as the lm_head matmul once.
    matmul = total if tied else total - emb.numel()
    return Shape(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=heads, head_dim=head_dim, matmul_params=matmul)


def flops_per_token(shape: Shape, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward) at sequence length `seq_len`."""
    return 6 * shape.matmul_params + 12 * shape.layers * seq_len * shape.d_attn


def mfu(shape: Shape, seq_len: int, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak."""
    return flops_per_token(shape, seq_len) * tokens_per_second / peak_flops


def peak_flops_of(device_name: str) -> float | None:
    """Dense bf16 peak for a CUDA device name such as 'NVIDIA H200', or None when unknown."""
    upper = device_name.upper()
    for key, value in PEAK_FLOPS.items():
        if key in upper:
            return value
    return None
