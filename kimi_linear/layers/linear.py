"""``Linear``: ``nn.Linear`` (no bias) whose product is ``ops.linear.linear`` — the decode GEMV for one row on CUDA
outside autograd, ``F.linear`` everywhere else. Same parameters and state-dict names as ``nn.Linear``."""

from __future__ import annotations

import torch
from torch import nn

from kimi_linear.ops.linear import linear


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kwargs):
        if bias:
            raise ValueError("the model's projections have no bias")
        super().__init__(in_features, out_features, bias=False, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
