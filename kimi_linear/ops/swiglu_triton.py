"""Triton kernel of ``swiglu.silu_mul``: ``silu(gate) * up`` in one pass.

Rows are the ``R = prod(lead)`` rows of gate and up ``[..., I]`` (each row contiguous; rows at any stride, so the
two halves of a packed gate-and-up projection's output are read in place). Each program takes ``BR`` rows and a
``BI``-wide block of columns and computes, in fp32, silu(gate) rounded to the inputs' dtype, then its product with
up rounded again: the two unfused ops' values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.triton_helpers import cast_to, interpreting, poisoned

BLOCK = 4096  # elements a program takes: BR * BI


@triton.jit
def silu_mul_kernel(gate, up, out, R, I, s_gate, s_up, BR: tl.constexpr, BI: tl.constexpr,
                    INTERPRET: tl.constexpr):
    """out[r, i] = silu(gate[r, i]) * up[r, i] for BR rows and BI columns. Grid (cdiv(R, BR), cdiv(I, BI))."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_i = tl.program_id(1) * BI + tl.arange(0, BI)
    m = (o_r < R)[:, None] & (o_i < I)[None, :]
    b_g = tl.load(gate + o_r[:, None] * s_gate + o_i[None, :], mask=m, other=0.0).to(tl.float32)
    b_u = tl.load(up + o_r[:, None] * s_up + o_i[None, :], mask=m, other=0.0).to(tl.float32)
    b_a = cast_to(b_g / (1.0 + tl.exp(-b_g)), out, INTERPRET).to(tl.float32)
    tl.store(out + o_r[:, None] * I + o_i[None, :], cast_to(b_a * b_u, out, INTERPRET), mask=m)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton path of ``swiglu.silu_mul`` (arguments checked there): ``[..., I]`` like gate, contiguous."""
    I = gate.shape[-1]
    g, u = gate.reshape(-1, I), up.reshape(-1, I)  # views: only the last dim must be contiguous
    R = g.shape[0]
    out = poisoned(torch.empty(R, I, device=gate.device, dtype=gate.dtype))
    BI = min(triton.next_power_of_2(max(I, 1)), BLOCK)
    BR = max(1, min(16, BLOCK // BI))
    if R > 0 and I > 0:
        silu_mul_kernel[(triton.cdiv(R, BR), triton.cdiv(I, BI))](
            g, u, out, R, I, g.stride(0), u.stride(0), BR=BR, BI=BI, INTERPRET=interpreting(),
            num_warps=4 if BR * BI <= 2048 else 8)
    return out.view(gate.shape)
