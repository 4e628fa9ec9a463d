"""Training-compute accounting (cpt.flops) against hand counts, and in a run's summary."""

import pytest

from cpt import flops
from cpt.model import build_model


def test_tiny_preset_flops_per_token_matches_a_hand_count():
    # tiny: 2 layers × 64 hidden, 4 heads, FFN 176, tied embeddings; vocab 512, seq 64
    model = build_model("tiny", vocab_size=512, eos_id=0, seq_len=64, seed=0)
    per_layer = 4 * 64 * 64 + 3 * 64 * 176 + 2 * 64  # q, k, v, o; gate, up, down; two RMSNorms
    n = 512 * 64 + 2 * per_layer + 64  # the tied matrix once (as the lm_head matmul); final norm
    shape = flops.shape_of(model)
    assert shape.matmul_params == n == 133_440
    assert flops.flops_per_token(shape, 64) == 6 * 133_440 + 12 * 2 * 64 * 64 == 898_944


def test_untied_preset_leaves_the_embedding_lookup_out():
    # paper-99m: 16 × 512, 8 heads, FFN 1280, separate lm_head; vocab 8192, seq 2048
    model = build_model("paper-99m", vocab_size=8192, eos_id=0, seq_len=2048, seed=0)
    per_layer = 4 * 512 * 512 + 3 * 512 * 1280 + 2 * 512
    n = 8192 * 512 + 16 * per_layer + 512  # lm_head, layers, final norm — not the input embedding
    shape = flops.shape_of(model)
    assert shape.matmul_params == n
    assert flops.flops_per_token(shape, 2048) == 6 * n + 12 * 16 * 2048 * 512
    # MFU of 1e5 tokens/s against a 1e15 FLOP/s peak
    assert flops.mfu(shape, 2048, 1e5, 1e15) == pytest.approx(flops.flops_per_token(shape, 2048) * 1e5 / 1e15)


def test_peak_lookup_by_device_name():
    assert flops.peak_flops_of("NVIDIA H200") == 989e12
    assert flops.peak_flops_of("some unknown card") is None
