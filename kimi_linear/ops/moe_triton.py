"""Triton kernels for the MoE's elementwise step: the routing-weighted SwiGLU gate h = silu(g) * u * w.

Shape legend: S token-slots (rows, sorted by expert), F expert intermediate size.

Between the grouped GEMMs of the experts, ``h_SF = silu(gate_SF) * up_SF * weights_S[:, None]`` in plain
PyTorch is five kernels with fp32 temporaries of S x F (at the release's prefill shapes, S = 32768 and F =
1024: ~130 MB each); one kernel reads g and u once and writes h once, and the backward kernel produces dg, du
and the row sums dw = sum_F(dh * silu(g) * u) in one pass. Math is fp32 in registers; g, u, h, dg, du keep the
input dtype (bf16/fp16/fp32); w and dw are fp32.

Limits: contiguous 2-D inputs; any S and F (offsets are 64-bit; F is a compile-time constant, one build per
size). Runs on CUDA, or on CPU tensors through Triton's interpreter when TRITON_INTERPRET=1 is set before this
module is imported (tests only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_FWD = 1024  # elements per program of the forward (flat over S*F)
BS_BWD, BF_BWD = 16, 128  # rows x columns of one backward tile; a program loops over F for its rows


@triton.jit
def _swiglu_weighted_fwd_kernel(g_ptr, u_ptr, w_ptr, h_ptr, n_elements, F: tl.constexpr, BLOCK: tl.constexpr):
    i_b = tl.program_id(0)
    o_x = i_b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_x = o_x < n_elements
    b_g = tl.load(g_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_u = tl.load(u_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_w = tl.load(w_ptr + o_x // F, mask=m_x, other=0.0)
    b_h = b_g * tl.sigmoid(b_g) * b_u * b_w
    tl.store(h_ptr + o_x, b_h.to(h_ptr.dtype.element_ty), mask=m_x)


@triton.jit
def _swiglu_weighted_bwd_kernel(g_ptr, u_ptr, w_ptr, dh_ptr, dg_ptr, du_ptr, dw_ptr, S, F: tl.constexpr,
                                BS: tl.constexpr, BF: tl.constexpr):
    i_s = tl.program_id(0)
    o_s = i_s.to(tl.int64) * BS + tl.arange(0, BS)
    m_s = o_s < S
    b_w = tl.load(w_ptr + o_s, mask=m_s, other=0.0)
    b_dw = tl.zeros([BS], dtype=tl.float32)
    for f0 in range(0, F, BF):
        o_f = f0 + tl.arange(0, BF)
        m_x = m_s[:, None] & (o_f < F)[None, :]
        o_x = o_s[:, None] * F + o_f[None, :]
        b_g = tl.load(g_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
        b_u = tl.load(u_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
        b_dh = tl.load(dh_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
        b_sig = tl.sigmoid(b_g)
        b_silu = b_g * b_sig
        b_dw += tl.sum(b_dh * b_silu * b_u, axis=1)
        b_dhw = b_dh * b_w[:, None]
        # d silu(g) / dg = sig(g) * (1 + g * (1 - sig(g)))
        b_dg = b_dhw * b_u * b_sig * (1.0 + b_g * (1.0 - b_sig))
        tl.store(dg_ptr + o_x, b_dg.to(dg_ptr.dtype.element_ty), mask=m_x)
        tl.store(du_ptr + o_x, (b_dhw * b_silu).to(du_ptr.dtype.element_ty), mask=m_x)
    tl.store(dw_ptr + o_s, b_dw, mask=m_s)


class SwiGLUWeighted(torch.autograd.Function):
    """h_SF = silu(gate_SF) * up_SF * weights_S[:, None] with the fused kernels above."""

    @staticmethod
    def forward(ctx, gate_SF, up_SF, weights_S):
        gate_SF, up_SF, weights_S = gate_SF.contiguous(), up_SF.contiguous(), weights_S.float().contiguous()
        S, F = gate_SF.shape
        h_SF = torch.empty_like(gate_SF)
        n = S * F
        if n:
            grid = (triton.cdiv(n, BLOCK_FWD),)
            _swiglu_weighted_fwd_kernel[grid](gate_SF, up_SF, weights_S, h_SF, n, F, BLOCK=BLOCK_FWD)
        ctx.save_for_backward(gate_SF, up_SF, weights_S)
        return h_SF

    @staticmethod
    def backward(ctx, dh_SF):
        gate_SF, up_SF, weights_S = ctx.saved_tensors
        dh_SF = dh_SF.contiguous()
        S, F = gate_SF.shape
        dgate_SF, dup_SF = torch.empty_like(gate_SF), torch.empty_like(up_SF)
        dweights_S = torch.empty_like(weights_S)
        if S * F:
            grid = (triton.cdiv(S, BS_BWD),)
            _swiglu_weighted_bwd_kernel[grid](gate_SF, up_SF, weights_S, dh_SF, dgate_SF, dup_SF, dweights_S,
                                              S, F, BS=BS_BWD, BF=BF_BWD)
        else:
            dweights_S.zero_()
        return dgate_SF, dup_SF, dweights_S


def swiglu_weighted_triton(
    gate_SF: torch.Tensor, up_SF: torch.Tensor, weights_S: torch.Tensor
) -> torch.Tensor:
    """``silu(gate_SF) * up_SF * weights_S[:, None]`` in gate's dtype; differentiable in all three.

    Args: gate_SF, up_SF ``[S, F]`` same float dtype and device; weights_S ``[S]`` (used in fp32).
    """
    return SwiGLUWeighted.apply(gate_SF, up_SF, weights_S)
