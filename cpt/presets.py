"""The named model shapes (`model.preset`), without torch: the config validates a preset name with them.

`tiny` for tests, `demo` for the bundled CPU default, `small` between them for the default scaling
sweep, and the paper's public configs (layers × hidden, heads, FFN, peak LR; see arXiv 2508.01908).
`cpt.model` builds the models and re-exports `PRESETS`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    layers: int
    hidden: int
    heads: int
    ffn: int
    kv_heads: int | None = None
    peak_lr: float = 1e-3
    max_positions: int = 2048
    tie_embeddings: bool = True


PRESETS: dict[str, Preset] = {
    "tiny": Preset(layers=2, hidden=64, heads=4, ffn=176, peak_lr=3e-3, max_positions=1024),
    "small": Preset(layers=4, hidden=128, heads=4, ffn=344, peak_lr=3e-3, max_positions=1024),
    "demo": Preset(layers=4, hidden=256, heads=4, ffn=688, peak_lr=2e-3, max_positions=1024),
    "paper-99m": Preset(layers=16, hidden=512, heads=8, ffn=1280, peak_lr=4e-4, tie_embeddings=False),
    "paper-560m": Preset(layers=24, hidden=1024, heads=16, ffn=2560, peak_lr=2.8e-4, tie_embeddings=False),
    "paper-1b": Preset(layers=24, hidden=1792, heads=28, ffn=5120, peak_lr=2.2e-4, tie_embeddings=False),
    "paper-3b": Preset(layers=30, hidden=3072, heads=24, ffn=9216, peak_lr=1.5e-4, tie_embeddings=False),
}
