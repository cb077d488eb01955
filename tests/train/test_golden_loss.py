"""Golden loss: a fixed-seed training run of the debug model on the CPU follows stored per-step losses.

The values were computed once by this file's ``golden_run`` at main 319a8a2 (before the training-speed work:
plain [tokens, vocab] logits loss, for-loop AdamW, no recomputation), on one CPU thread. Regenerate only for a
change that is *meant* to alter the numbers, and say so in the commit:

    python -m tests.train.test_golden_loss

Tolerance: relative 2e-5 per step. Everything is fp32 on the CPU, so a change that keeps the mathematics
(row-chunked head matmul and loss, foreach AdamW, recomputed activations) moves only the rounding: the first
loss by ~1e-7 relative, and the rounding differences grow over the steps (lr 3e-3). 2e-5 is well above that
drift yet far below what a real change does (a gradient term dropped, the schedule or the masking changed all
move these losses by 1e-3 or more).
"""

from __future__ import annotations

import pytest
import torch

from kimi_linear.config import KimiLinearConfig
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.train.data import PackedBatches
from kimi_linear.train.trainer import TrainConfig, Trainer

BOS = 256
GOLDEN_LOSSES = [5.577047040385585, 5.5365036528505485, 5.322239938862099, 5.119704648672816, 5.015003173828125,
                 4.920393242893449, 4.844743441962049, 4.7624367387117985]
RTOL = 2e-5


def token_stream(n: int, seed: int) -> torch.Tensor:
    """Byte tokens from a skewed fixed distribution (so there is something to learn), a BOS every 20-60."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.arange(1, 257, dtype=torch.float64) ** -1.1
    tokens = torch.multinomial(probs, n, replacement=True, generator=gen).to(torch.int16)
    pos = 0
    while pos < n:
        tokens[pos] = BOS
        pos += int(torch.randint(20, 60, (1,), generator=gen))
    return tokens


def golden_run(steps: int = 8, **train_options) -> list[float]:
    """Per-step training losses of the debug model (all four layer branches: KDA/MLA x dense/MoE), packed
    documents with ``cu_seqlens``, two micro-batches per step, fp32 on the CPU."""
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig.from_preset("debug"))
    config = TrainConfig(max_steps=steps, lr=3e-3, warmup_steps=2, grad_accum=2, dtype="float32",
                         **train_options)
    batches = PackedBatches(token_stream(6000, seed=1), 64, 8, seed=2, grad_accum=2, bos_token_id=BOS)
    trainer = Trainer(model, config, progress=False)
    return trainer.fit(batches)["losses"]


def test_debug_run_follows_the_golden_losses(one_thread):
    losses = golden_run()
    assert len(losses) == len(GOLDEN_LOSSES)
    assert losses == pytest.approx(GOLDEN_LOSSES, rel=RTOL, abs=0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(golden_run())
