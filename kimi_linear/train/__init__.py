"""Training: the trainer loop, data (embedded corpus, packing), checkpoint/resume and multi-process setup.

``from kimi_linear.train import Trainer, TrainConfig, train`` to train any module on dict batches; the
``kimi-linear train`` command (``kimi_linear.train.cli``) wires it to the Kimi Linear model and the corpus.
"""

from kimi_linear.train.trainer import TrainConfig, Trainer, causal_lm_loss, train

__all__ = ["TrainConfig", "Trainer", "causal_lm_loss", "train"]
