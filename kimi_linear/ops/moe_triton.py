"""Triton kernels of the MoE experts: the routing-weighted SwiGLU step h = silu(g) * u * w between the grouped
GEMMs (forward and backward), and the decode path's per-slot matrix-vector products (below, forward only).

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


def swiglu_weighted_fwd_triton(gate_SF: torch.Tensor, up_SF: torch.Tensor, weights_S: torch.Tensor) -> torch.Tensor:
    """``h_SF = silu(gate_SF) * up_SF * weights_S[:, None]`` in gate's dtype, one kernel, no autograd.

    Args: gate_SF, up_SF ``[S, F]`` one float dtype and device; weights_S ``[S]`` (used in fp32).
    """
    gate_SF, up_SF, weights_S = gate_SF.contiguous(), up_SF.contiguous(), weights_S.float().contiguous()
    S, F = gate_SF.shape
    h_SF = torch.empty_like(gate_SF)
    n = S * F
    if n:
        _swiglu_weighted_fwd_kernel[(triton.cdiv(n, BLOCK_FWD),)](gate_SF, up_SF, weights_S, h_SF, n, F,
                                                                  BLOCK=BLOCK_FWD)
    return h_SF


def swiglu_weighted_bwd_triton(gate_SF: torch.Tensor, up_SF: torch.Tensor, weights_S: torch.Tensor,
                               dh_SF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``swiglu_weighted_fwd_triton`` for ``dh_SF``: (dgate_SF, dup_SF in their dtype,
    dweights_S fp32), one kernel, no autograd."""
    gate_SF, up_SF, weights_S = gate_SF.contiguous(), up_SF.contiguous(), weights_S.float().contiguous()
    dh_SF = dh_SF.contiguous()
    S, F = gate_SF.shape
    dgate_SF, dup_SF = torch.empty_like(gate_SF), torch.empty_like(up_SF)
    dweights_S = torch.empty_like(weights_S)
    if S * F:
        _swiglu_weighted_bwd_kernel[(triton.cdiv(S, BS_BWD),)](gate_SF, up_SF, weights_S, dh_SF, dgate_SF, dup_SF,
                                                               dweights_S, S, F, BS=BS_BWD, BF=BF_BWD)
    else:
        dweights_S.zero_()
    return dgate_SF, dup_SF, dweights_S


class SwiGLUWeighted(torch.autograd.Function):
    """h_SF = silu(gate_SF) * up_SF * weights_S[:, None] with the fused kernels above."""

    @staticmethod
    def forward(ctx, gate_SF, up_SF, weights_S):
        ctx.save_for_backward(gate_SF, up_SF, weights_S)
        return swiglu_weighted_fwd_triton(gate_SF, up_SF, weights_S)

    @staticmethod
    def backward(ctx, dh_SF):
        return swiglu_weighted_bwd_triton(*ctx.saved_tensors, dh_SF)


def swiglu_weighted_triton(
    gate_SF: torch.Tensor, up_SF: torch.Tensor, weights_S: torch.Tensor
) -> torch.Tensor:
    """``silu(gate_SF) * up_SF * weights_S[:, None]`` in gate's dtype; differentiable in all three.

    Args: gate_SF, up_SF ``[S, F]`` same float dtype and device; weights_S ``[S]`` (used in fp32).
    """
    return SwiGLUWeighted.apply(gate_SF, up_SF, weights_S)


# ---- Decode: a few token-slots, each reading its own expert's rows (no sort, no weight copies) ----
#
# Legend here: S = N * K slots in token order (slot s is token s // K), D hidden, F expert intermediate.
# With a handful of tokens every chosen expert sees about one token, so the expert matmuls are matrix-vector
# products bound by reading the weights; a grouped GEMM pads each one-row group to a full tile and the sort
# around it costs more kernels than the products themselves.

DECODE_BF_GATE, DECODE_BD_GATE = 16, 256  # rows of w1/w3 per program, and the step along D
DECODE_BD_DOWN, DECODE_BF_DOWN = 16, 256  # rows of w2 per program, and the step along F


@triton.jit
def _moe_gate_up_gemv_kernel(x_ptr, w1_ptr, w3_ptr, experts_ptr, weights_ptr, h_ptr,
                             D: tl.constexpr, F: tl.constexpr, K: tl.constexpr,
                             BF: tl.constexpr, BD: tl.constexpr):
    i_s, i_f = tl.program_id(0), tl.program_id(1)
    i_e = tl.load(experts_ptr + i_s).to(tl.int64)
    i_n = i_s // K
    o_f = i_f * BF + tl.arange(0, BF)
    m_f = o_f < F
    b_g = tl.zeros([BF], dtype=tl.float32)
    b_u = tl.zeros([BF], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = tl.load(x_ptr + i_n * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        o_w = i_e * F * D + o_f[:, None] * D + o_d[None, :]
        m_w = m_f[:, None] & m_d[None, :]
        b_g += tl.sum(tl.load(w1_ptr + o_w, mask=m_w, other=0.0).to(tl.float32) * b_x[None, :], axis=1)
        b_u += tl.sum(tl.load(w3_ptr + o_w, mask=m_w, other=0.0).to(tl.float32) * b_x[None, :], axis=1)
    b_w = tl.load(weights_ptr + i_s)
    tl.store(h_ptr + i_s * F + o_f, b_g * tl.sigmoid(b_g) * b_u * b_w, mask=m_f)


@triton.jit
def _moe_down_gemv_kernel(h_ptr, w2_ptr, experts_ptr, y_ptr,
                          D: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    i_s, i_d = tl.program_id(0), tl.program_id(1)
    i_e = tl.load(experts_ptr + i_s).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_y = tl.zeros([BD], dtype=tl.float32)
    for f0 in range(0, F, BF):
        o_f = f0 + tl.arange(0, BF)
        m_f = o_f < F
        b_h = tl.load(h_ptr + i_s * F + o_f, mask=m_f, other=0.0)
        o_w = i_e * D * F + o_d[:, None] * F + o_f[None, :]
        b_w2 = tl.load(w2_ptr + o_w, mask=m_d[:, None] & m_f[None, :], other=0.0).to(tl.float32)
        b_y += tl.sum(b_w2 * b_h[None, :], axis=1)
    tl.store(y_ptr + i_s * D + o_d, b_y, mask=m_d)


def moe_experts_gemv_triton(
    x_ND: torch.Tensor,
    weights_NK: torch.Tensor,
    experts_NK: torch.Tensor,
    w1_EFD: torch.Tensor,
    w3_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
) -> torch.Tensor:
    """Routed-expert output for a few tokens (decode), inference only (no autograd).

    Args:
        x_ND: ``[N, D]`` contiguous, any float dtype (the output's). weights_NK: ``[N, K]`` (used in fp32).
        experts_NK: ``[N, K]`` int expert ids. w1_EFD, w3_EFD ``[E, F, D]``, w2_EDF ``[E, D, F]``: contiguous,
        any float dtype (read and converted to fp32 in registers).

    Returns:
        ``y_ND [N, D]`` in x's dtype: sum over k of weights * w2 (silu(w1 x) * (w3 x)); the per-slot products
        and the sum over k are accumulated in fp32.
    """
    N, K = experts_NK.shape
    _, F, D = w1_EFD.shape
    S = N * K
    experts_S = experts_NK.reshape(-1).contiguous()
    weights_S = weights_NK.reshape(-1).float().contiguous()
    h_SF = torch.empty(S, F, device=x_ND.device, dtype=torch.float32)
    y_SD = torch.empty(S, D, device=x_ND.device, dtype=torch.float32)
    if S:
        _moe_gate_up_gemv_kernel[(S, triton.cdiv(F, DECODE_BF_GATE))](
            x_ND, w1_EFD, w3_EFD, experts_S, weights_S, h_SF, D=D, F=F, K=K,
            BF=DECODE_BF_GATE, BD=DECODE_BD_GATE)
        _moe_down_gemv_kernel[(S, triton.cdiv(D, DECODE_BD_DOWN))](
            h_SF, w2_EDF, experts_S, y_SD, D=D, F=F, BD=DECODE_BD_DOWN, BF=DECODE_BF_DOWN)
    return y_SD.view(N, K, D).sum(dim=1).to(x_ND.dtype)
