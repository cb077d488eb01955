"""RMSNorm as a module (the learned-weight norm of every block, the final norm and MLA's latent norm)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kimi_linear.ops.add_norm import add_rms_norm
from kimi_linear.ops.norm import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, fp32 inside, with a learned weight (initialised to ones)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            # one fused kernel (fp32 statistics inside) instead of the reference's chain of element-wise ops
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, self(x + delta))``, the add and the norm fused into one kernel where ``add_rms_norm``
        can (CUDA, no autograd)."""
        return add_rms_norm(x, delta, self.weight, self.eps)
