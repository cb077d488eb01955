"""Triton GEMV of ``linear.linear``: ``y = W x`` for one row x ``[K]`` and a contiguous weight ``[N, K]``.

Each program owns ``BN`` rows of W and walks K in ``BK``-wide tiles, keeping a ``[BN, BK]`` block of fp32 partial
products that it sums across at the end: every weight byte is read once, by one program, and no partial sums go
through memory. The launch (``gemv_launch``) is a pure function of (N, K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kimi_linear.ops.triton_helpers import cast_to, interpreting, poisoned


@dataclass(frozen=True)
class GemvLaunch:
    BN: int  # rows of W per program
    BK: int  # columns per tile
    num_warps: int
    num_stages: int


def gemv_launch(N: int, K: int) -> GemvLaunch:
    """Rows per program: enough programs to cover the GPU several times over for the narrow matrices."""
    return GemvLaunch(BN=8 if N >= 4096 else 4, BK=512 if K >= 512 else triton.next_power_of_2(max(K, 16)),
                      num_warps=4, num_stages=3)


@triton.jit
def gemv_kernel(x, w, y, N, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr):
    """y[n] = sum_k w[n, k] x[k] for BN rows n. Grid (cdiv(N, BN),)."""
    o_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    m_n = o_n < N
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        b_w = tl.load(w + o_n[:, None] * K + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
        b_x = tl.load(x + o_k, mask=m_k, other=0.0)
        acc += b_w.to(tl.float32) * b_x.to(tl.float32)[None, :]
    tl.store(y + o_n, cast_to(tl.sum(acc, axis=1), y, INTERPRET), mask=m_n)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Triton path of ``linear.linear`` (arguments checked there): ``[..., N]`` for one row x ``[..., K]``."""
    N, K = weight.shape
    xr = x.reshape(K).contiguous()
    y = poisoned(torch.empty(N, device=x.device, dtype=x.dtype))
    cfg = gemv_launch(N, K)
    if N > 0:
        gemv_kernel[(triton.cdiv(N, cfg.BN),)](xr, weight, y, N, K, BN=cfg.BN, BK=cfg.BK, INTERPRET=interpreting(),
                                               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.view(*x.shape[:-1], N)
