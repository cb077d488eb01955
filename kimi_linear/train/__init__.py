"""Training: the trainer loop, data (embedded corpus, packing), checkpoint/resume and multi-process setup.

``from kimi_linear.train import Trainer, TrainConfig, train`` to train any module on dict batches; the
``kimi-linear train`` command (``kimi_linear.cli.train``) wires it to the Kimi Linear model and the corpus.
The names are imported on first use, so the CLI starts without loading the training stack.
"""

import importlib

__all__ = ["TrainConfig", "Trainer", "causal_lm_loss", "train"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("kimi_linear.train.trainer"), name)
    raise AttributeError(f"module 'kimi_linear.train' has no attribute {name!r}")
