"""cpt: continual pre-training of Llama-family models with experience replay and Reptile/MER.

The Python API the CLI wraps:

    import cpt
    summary = cpt.train("examples/tiny.yaml", out="runs/tiny")
    print(summary["loss_matrix"], summary["forgetting_score"])
"""

from cpt.config import load_config
from cpt.errors import CptError

__version__ = "0.1.0"


def train(config, out, **kwargs) -> dict:
    """Run a config (a path or a `cpt.config.RunConfig`) into `out`; returns the summary dict."""
    # why lazy: the training stack imports torch and transformers, and every `cpt` command (the light
    # `cpt report` and `cpt config-reference` too) imports this package first
    from cpt.training.launch import train as _train

    return _train(config, out, **kwargs)


__all__ = ["CptError", "train", "load_config", "__version__"]
