"""Triton kernel of ``add_norm.add_rms_norm``: the residual add and the RMSNorm after it in one pass.

Rows are the ``R = prod(lead)`` rows of x, delta ``[..., D]``; each program takes ``BR`` rows, all D columns
(D <= ``add_norm.MAX_D``), and computes s = x + delta rounded to x's dtype, then from that rounded s, in fp32,
y = s * rsqrt(mean(s^2) + eps) * weight, rounded to x's dtype: the unfused ops' values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.triton_helpers import cast_to, interpreting, poisoned


def _block_rows(D: int) -> int:
    """Rows per program: about 4096 elements a program (one row from D = 4096 up)."""
    return max(1, min(16, 4096 // triton.next_power_of_2(D)))


@triton.jit
def add_norm_fwd_kernel(x, delta, w, s, y, R, D, BR: tl.constexpr, BD: tl.constexpr, EPS: tl.constexpr,
                        INTERPRET: tl.constexpr):
    """s = x + delta, y = rmsnorm(s) w for BR rows of contiguous [R, D] tensors. Grid (cdiv(R, BR),)."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    offs = o_r[:, None] * D + o_d[None, :]
    b_s = tl.load(x + offs, mask=m, other=0.0).to(tl.float32) + tl.load(delta + offs, mask=m, other=0.0).to(tl.float32)
    b_s = cast_to(b_s, s, INTERPRET)
    tl.store(s + offs, b_s, mask=m)
    b_s = b_s.to(tl.float32)
    b_r = tl.math.rsqrt(tl.sum(b_s * b_s, axis=1) / D + EPS)
    b_w = tl.load(w + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    tl.store(y + offs, cast_to(b_s * b_r[:, None] * b_w[None, :], y, INTERPRET), mask=m)


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path of ``add_norm.add_rms_norm`` (arguments checked there): ``(s, y)`` like x."""
    D = x.shape[-1]
    xr, dr = x.reshape(-1, D).contiguous(), delta.reshape(-1, D).contiguous()
    R = xr.shape[0]
    s, y = poisoned(torch.empty_like(xr)), poisoned(torch.empty_like(xr))
    BR, BD = _block_rows(D), triton.next_power_of_2(D)
    if R > 0:
        add_norm_fwd_kernel[(triton.cdiv(R, BR),)](
            xr, dr, weight.contiguous(), s, y, R, D, BR=BR, BD=BD, EPS=float(eps), INTERPRET=interpreting(),
            num_warps=4 if BR * BD <= 2048 else 8)
    return s.view(x.shape), y.view(x.shape)
