"""Normalisations shared by the layers and the KDA ops, each in plain PyTorch (they are their own reference)."""

from __future__ import annotations

import torch

L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, computed in fp32, returned in fp32 (fp64 in and out for fp64 x).

    The eps sits inside the square root (not a clamp), the convention of the released model's kernels.
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x * torch.rsqrt(x.pow(2).sum(dim=-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim in fp32; the result is cast back to x's dtype after the weight is applied."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight.float() * x).to(dtype)
