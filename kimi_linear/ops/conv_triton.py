"""Triton kernels for the causal depthwise convolution (+ SiLU) of the KDA layer's ShortConv, with backward.

Computes what ``kimi_linear.ops.conv.causal_conv1d`` (the PyTorch reference) computes:

    pre[t, c] = sum_{j=0}^{W-1} w[c, j] * x[t - (W-1) + j, c]        y[t, c] = act(pre[t, c])

over a packed layout ``x [T_total, C]`` holding N sequences back to back (``cu_seqlens``, or B sequences of equal
length T). Inputs before a sequence's start come from ``initial_state [N, C, W-1]`` (oldest first) or are zero; no
input crosses a sequence boundary, and a block of rows may straddle one (each row finds its own sequence).

Kernels (all accumulate in fp32; ``x``, ``y``, ``dy``, ``dx`` are in x's dtype, contiguous along C; ``x``'s rows
may lie further apart, ``SX`` elements, as the columns of a wider projection do):
    conv_fwd_kernel         grid (cdiv(T_total, BT), cdiv(C, BC)): y for BT rows x BC channels.
    conv_final_state_kernel grid (N, cdiv(C, BC)): the last W-1 inputs of each sequence (reaching into
                            initial_state or zeros when the sequence is shorter than W-1).
    conv_bwd_kernel         grid (cdiv(T_total, BT), cdiv(C, BC)): dx for its rows (the causal-transposed conv of
                            dpre = dy * act'(pre), pre recomputed from x, nothing saved from the forward), plus the
                            final state's gradient; and this block's partial dweight [W, BC] (summed over blocks
                            afterwards in a fixed order: deterministic).
    conv_bwd_h0_kernel      grid (N, cdiv(C, BC)): d initial_state, from the first W-1 rows of each sequence and
                            from the final state's gradient where a sequence is shorter than W-1.

Launch settings are a ``ConvLaunch`` value, ``conv_launch(C, has_initial_state)`` unless the caller passes one.

Limits: W <= 8 (the taps are unrolled; the backward recomputes pre at W shifts, W^2 loads per element that mostly
hit L1). Row offsets are 64-bit, so T_total * C may exceed 2^31.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kimi_linear.ops.triton_helpers import cast_to, interpreting, poisoned

MAX_WIDTH = 8


@dataclass(frozen=True)
class ConvLaunch:
    """Launch settings of the conv kernels: rows per program of the forward (``fwd_bt``) and of the backward
    (``bwd_bt``), channels per program (``bc``, also for the final-state and initial-state-gradient kernels), warps
    per program of the forward and backward. ``fwd_bt``, ``bwd_bt`` and ``bc`` are powers of two."""

    fwd_bt: int
    bwd_bt: int
    bc: int
    warps: int


def conv_launch(C: int, has_initial_state: bool) -> ConvLaunch:
    """The shipped launch for C channels: 16 rows per forward program (8 with initial states, where every tap also
    gathers from the state), 8 per backward program, up to 128 channels, 4 warps. Rows x channels per program stay
    at 8-16 elements per thread: the backward's W-fold recompute holds W^2 loaded tiles and spills at 64 x 128
    (see ``python -m benchmarks conv_speed --build-report``)."""
    return ConvLaunch(fwd_bt=8 if has_initial_state else 16, bwd_bt=8, bc=min(128, triton.next_power_of_2(C)),
                      warps=4)


@triton.jit
def _silu_grad(pre):
    """d silu(p) / dp = sigmoid(p) * (1 + p * (1 - sigmoid(p)))."""
    sig = 1.0 / (1.0 + tl.exp(-pre))
    return sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _row_bounds(cu_seqlens, seq_idx, o_t, m_t, T_seq, IS_VARLEN: tl.constexpr):
    """(sequence index, start row, end row) of each row ``o_t`` (int64)."""
    if IS_VARLEN:
        n = tl.load(seq_idx + o_t, mask=m_t, other=0).to(tl.int64)
        start = tl.load(cu_seqlens + n, mask=m_t, other=0).to(tl.int64)
        end = tl.load(cu_seqlens + n + 1, mask=m_t, other=0).to(tl.int64)
    else:
        n = o_t // T_seq
        start = n * T_seq
        end = start + T_seq
    return n, start, end


@triton.jit
def _tap(x, h0, o_t, start, n, o_c, m_t, m_c, C, SX, SHIFT: tl.constexpr, W: tl.constexpr, HAS_H0: tl.constexpr):
    """x[o_t - SHIFT] per row as fp32 [BT, BC] (x's rows SX elements apart): from x inside the row's sequence,
    else from the state or 0."""
    pos = o_t - start  # position of the row inside its sequence
    inside = pos >= SHIFT
    m_x = (m_t & inside)[:, None] & m_c[None, :]
    b = tl.load(x + (o_t - SHIFT)[:, None] * SX + o_c[None, :], mask=m_x, other=0.0).to(tl.float32)
    if HAS_H0:
        # x[t - SHIFT] lies SHIFT - pos rows before the start: state index W-1 - (SHIFT - pos), oldest first
        m_h = (m_t & ~inside)[:, None] & m_c[None, :]
        o_h = n * C * (W - 1) + (W - 1 - SHIFT) + pos  # [BT] row part of the state offset
        b += tl.load(h0 + o_h[:, None] + (o_c * (W - 1))[None, :], mask=m_h, other=0.0).to(tl.float32)
    return b


@triton.jit
def conv_fwd_kernel(x, w, h0, y, cu_seqlens, seq_idx, T_total, T_seq, C, SX,
                    W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ACT: tl.constexpr,
                    HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr, INTERPRET: tl.constexpr):
    """y[t, c] = act(sum_j w[c, j] x[t - (W-1) + j, c]) for BT rows x BC channels. Grid (cdiv(T_total, BT),
    cdiv(C, BC)); ACT 1 = SiLU, 0 = identity."""
    i_t, i_c = tl.program_id(0), tl.program_id(1)
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_t, m_c = o_t < T_total, o_c < C
    n, start, _ = _row_bounds(cu_seqlens, seq_idx, o_t, m_t, T_seq, IS_VARLEN)
    b_acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        b_w = tl.load(w + o_c * W + j, mask=m_c, other=0.0).to(tl.float32)
        b_acc += _tap(x, h0, o_t, start, n, o_c, m_t, m_c, C, SX, W - 1 - j, W, HAS_H0) * b_w[None, :]
    if ACT == 1:
        b_acc = b_acc / (1.0 + tl.exp(-b_acc))
    tl.store(y + o_t[:, None] * C + o_c[None, :], cast_to(b_acc, y, INTERPRET), mask=m_t[:, None] & m_c[None, :])


@triton.jit
def _sequence_bounds(cu_seqlens, i_n, T_seq, IS_VARLEN: tl.constexpr):
    """First and end row of sequence i_n: from ``cu_seqlens``, or T_seq rows each."""
    if IS_VARLEN:
        start = tl.load(cu_seqlens + i_n).to(tl.int64)
        end = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        start = i_n * T_seq
        end = start + T_seq
    return start, end


@triton.jit
def conv_final_state_kernel(x, h0, final, cu_seqlens, T_seq, C, SX,
                            W: tl.constexpr, BC: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
                            INTERPRET: tl.constexpr):
    """final[n, c, j] = x[end_n - (W-1) + j, c], or initial_state[n, c, len_n + j] (0 without one) where that row
    lies before the sequence's start. Grid (N, cdiv(C, BC))."""
    i_n, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    start, end = _sequence_bounds(cu_seqlens, i_n, T_seq, IS_VARLEN)
    for j in tl.static_range(W - 1):
        t_abs = end - (W - 1) + j
        inside = t_abs >= start
        b = tl.load(x + t_abs * SX + o_c, mask=m_c & inside, other=0.0).to(tl.float32)
        if HAS_H0:
            b += tl.load(h0 + (i_n * C + o_c) * (W - 1) + (end - start + j), mask=m_c & ~inside, other=0.0)
        tl.store(final + (i_n * C + o_c) * (W - 1) + j, cast_to(b, final, INTERPRET), mask=m_c)


@triton.jit
def conv_bwd_kernel(x, w, h0, dy, dfinal, dx, dw_part, cu_seqlens, seq_idx, T_total, T_seq, C, SX,
                    W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ACT: tl.constexpr,
                    HAS_H0: tl.constexpr, HAS_DFINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
                    INTERPRET: tl.constexpr):
    """For BT rows u x BC channels: dx[u] = sum_s w[W-1-s] dpre[u + s] over rows u + s of u's sequence, with
    dpre = dy * act'(pre) and pre recomputed, plus dfinal[n, :, j] where u is the sequence's row end - (W-1) + j;
    and dw_part[i_t, j, c] = sum_{t in block} dpre[t, c] x[t - (W-1) + j, c] (x from the state before the start).
    Grid (cdiv(T_total, BT), cdiv(C, BC)); dw_part is [cdiv(T_total, BT), W, C] fp32."""
    i_t, i_c = tl.program_id(0), tl.program_id(1)
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_t, m_c = o_t < T_total, o_c < C
    m_tc = m_t[:, None] & m_c[None, :]
    n, start, end = _row_bounds(cu_seqlens, seq_idx, o_t, m_t, T_seq, IS_VARLEN)
    b_dx = tl.zeros([BT, BC], dtype=tl.float32)
    for s in tl.static_range(W):
        # rows t = u + s of the same sequence: they read x[u] through tap W-1-s
        o_r = o_t + s
        m_r = m_t & (o_r < end)
        b_dy = tl.load(dy + o_r[:, None] * C + o_c[None, :], mask=m_r[:, None] & m_c[None, :],
                       other=0.0).to(tl.float32)
        if ACT == 1:
            b_pre = tl.zeros([BT, BC], dtype=tl.float32)
            for j in tl.static_range(W):
                b_wj = tl.load(w + o_c * W + j, mask=m_c, other=0.0).to(tl.float32)
                b_pre += _tap(x, h0, o_r, start, n, o_c, m_r, m_c, C, SX, W - 1 - j, W, HAS_H0) * b_wj[None, :]
            b_dpre = b_dy * _silu_grad(b_pre)
        else:
            b_dpre = b_dy
        b_w = tl.load(w + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
        b_dx += b_dpre * b_w[None, :]
        if s == 0:
            for j in tl.static_range(W):
                b_src = _tap(x, h0, o_t, start, n, o_c, m_t, m_c, C, SX, W - 1 - j, W, HAS_H0)
                tl.store(dw_part + (i_t * W + j).to(tl.int64) * C + o_c, tl.sum(b_dpre * b_src, axis=0), mask=m_c)
    if HAS_DFINAL:
        # row u is entry j = u - (end - (W-1)) of its sequence's final state
        j_f = o_t - (end - (W - 1))
        m_f = (m_t & (j_f >= 0))[:, None] & m_c[None, :]
        b_dx += tl.load(dfinal + (n * C)[:, None] * (W - 1) + o_c[None, :] * (W - 1) + j_f[:, None], mask=m_f,
                        other=0.0).to(tl.float32)
    tl.store(dx + o_t[:, None] * C + o_c[None, :], cast_to(b_dx, dx, INTERPRET), mask=m_tc)


@triton.jit
def conv_bwd_h0_kernel(x, w, h0, dy, dfinal, dh0, cu_seqlens, T_seq, C, SX,
                       W: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr, ACT: tl.constexpr,
                       HAS_DFINAL: tl.constexpr, IS_VARLEN: tl.constexpr):
    """dh0[n, c, i] = sum over rows t = start + p (p < W-1, t < end) and shifts s > p with W-1-s+p = i of
    w[c, W-1-s] dpre[t, c], plus dfinal[n, c, j] for i = len_n + j < W-1. Grid (N, cdiv(C, BC)); fp32 out."""
    i_n, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_c = i_c * BC + tl.arange(0, BC)
    o_i = tl.arange(0, BW)
    m_c = o_c < C
    start, end = _sequence_bounds(cu_seqlens, i_n, T_seq, IS_VARLEN)
    p_state = h0 + (i_n * C + o_c) * (W - 1)
    b_dh = tl.zeros([BC, BW], dtype=tl.float32)
    for p in tl.static_range(W - 1):
        t = start + p
        m_r = m_c & (t < end)
        b_dpre = tl.load(dy + t * C + o_c, mask=m_r, other=0.0).to(tl.float32)
        if ACT == 1:
            b_pre = tl.zeros([BC], dtype=tl.float32)
            for j in tl.static_range(W):
                b_wj = tl.load(w + o_c * W + j, mask=m_c, other=0.0).to(tl.float32)
                if p >= W - 1 - j:
                    b_src = tl.load(x + (t - (W - 1 - j)) * SX + o_c, mask=m_r, other=0.0).to(tl.float32)
                else:
                    b_src = tl.load(p_state + (j + p), mask=m_r, other=0.0).to(tl.float32)
                b_pre += b_wj * b_src
            b_dpre = b_dpre * _silu_grad(b_pre)
        for s in tl.static_range(p + 1, W):
            b_ws = tl.load(w + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
            b_dh += tl.where(o_i[None, :] == W - 1 - s + p, (b_ws * b_dpre)[:, None], 0.0)
    if HAS_DFINAL:
        o_j = o_i - (end - start)  # final-state entry j that is state entry i = len + j
        m_f = m_c[:, None] & ((o_j >= 0) & (o_i < W - 1))[None, :]
        b_dh += tl.load(dfinal + (i_n * C + o_c)[:, None] * (W - 1) + o_j[None, :], mask=m_f, other=0.0)
    m_out = m_c[:, None] & (o_i < W - 1)[None, :]
    tl.store(dh0 + (i_n * C + o_c)[:, None] * (W - 1) + o_i[None, :], b_dh, mask=m_out)


def _layout(x: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """Packed [T_total, C] rows (a view where x's rows are evenly spaced with contiguous channels, as the column
    slice of a wider projection is: the kernels take the row stride; else a contiguous copy), sequence count,
    per-row sequence index (varlen) and int32 boundaries."""
    B, T, C = x.shape
    x2 = x.reshape(B * T, C)
    if x2.stride(-1) != 1 and x2.numel() > 0:
        x2 = x2.contiguous()
    if cu_seqlens is None:
        return x2, B, None, None
    cu = cu_seqlens.to(device=x.device, dtype=torch.int32).contiguous()
    rows = torch.arange(B * T, device=x.device, dtype=torch.int32)
    seq_idx = torch.searchsorted(cu[1:], rows, right=True).to(torch.int32)  # [T_total], no host sync
    return x2, cu.numel() - 1, cu, seq_idx


def conv_fwd(x, weight, initial_state, cu_seqlens, act: int, output_final_state: bool,
             launch: ConvLaunch | None = None):
    """Launch the forward kernels. x [B, T, C], weight [C, W]; ``launch`` None: ``conv_launch``'s choice.
    Returns (y [B, T, C], final [N, C, W-1] | None)."""
    B, T, C = x.shape
    W = weight.shape[-1]
    x2, N, cu, seq_idx = _layout(x, cu_seqlens)
    w = weight.contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    launch = launch or conv_launch(C, h0 is not None)
    T_total = x2.shape[0]
    y = poisoned(torch.empty(T_total, C, dtype=x.dtype, device=x.device))
    BC = launch.bc
    varlen = cu is not None
    if T_total > 0:
        BT = launch.fwd_bt
        grid = (triton.cdiv(T_total, BT), triton.cdiv(C, BC))
        conv_fwd_kernel[grid](x2, w, h0, y, cu, seq_idx, T_total, max(T, 1), C, x2.stride(0), W=W, BT=BT, BC=BC,
                              ACT=act, HAS_H0=h0 is not None, IS_VARLEN=varlen, INTERPRET=interpreting(),
                              num_warps=launch.warps)
    final = None
    if output_final_state:
        final = poisoned(torch.empty(N, C, W - 1, dtype=x.dtype, device=x.device))
        if N > 0 and W > 1:
            conv_final_state_kernel[(N, triton.cdiv(C, BC))](x2, h0, final, cu, max(T, 1), C, x2.stride(0), W=W,
                                                            BC=BC, HAS_H0=h0 is not None, IS_VARLEN=varlen,
                                                            INTERPRET=interpreting())
    return y.view(B, T, C), final


def conv_bwd(x, weight, initial_state, cu_seqlens, act: int, dy, dfinal, launch: ConvLaunch | None = None):
    """Launch the backward kernels; ``launch`` None: ``conv_launch``'s choice. Returns (dx [B, T, C] x.dtype,
    dweight [C, W] fp32, dh0 [N, C, W-1] fp32 | None)."""
    B, T, C = x.shape
    W = weight.shape[-1]
    x2, N, cu, seq_idx = _layout(x, cu_seqlens)
    w = weight.contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    launch = launch or conv_launch(C, h0 is not None)
    dy2 = dy.reshape(B * T, C).contiguous()
    df = None if dfinal is None else dfinal.contiguous()
    T_total = x2.shape[0]
    BC = launch.bc
    varlen = cu is not None
    BT = launch.bwd_bt
    NT = triton.cdiv(T_total, BT)
    dx = poisoned(torch.empty(T_total, C, dtype=x.dtype, device=x.device))
    dw_part = poisoned(torch.empty(NT, W, C, dtype=torch.float32, device=x.device))
    if T_total > 0:
        conv_bwd_kernel[(NT, triton.cdiv(C, BC))](
            x2, w, h0, dy2, df, dx, dw_part, cu, seq_idx, T_total, max(T, 1), C, x2.stride(0), W=W, BT=BT, BC=BC,
            ACT=act,
            HAS_H0=h0 is not None, HAS_DFINAL=df is not None, IS_VARLEN=varlen, INTERPRET=interpreting(),
            num_warps=launch.warps)
    dweight = dw_part.sum(0).t()  # [C, W], a fixed-order reduction over blocks
    dh0 = None
    if h0 is not None:
        dh0 = poisoned(torch.empty(N, C, W - 1, dtype=torch.float32, device=x.device))
        if N > 0:
            conv_bwd_h0_kernel[(N, triton.cdiv(C, BC))](
                x2, w, h0, dy2, df, dh0, cu, max(T, 1), C, x2.stride(0), W=W, BC=BC,
                BW=triton.next_power_of_2(W - 1), ACT=act,
                HAS_DFINAL=df is not None, IS_VARLEN=varlen)
    return dx.view(B, T, C), dweight, dh0


class CausalConv1dFunction(torch.autograd.Function):
    """Autograd wrapper: saves only x, weight and initial_state; the backward recomputes pre-activations. Forward
    and backward launch with the same ``ConvLaunch``."""

    @staticmethod
    def forward(ctx, x, weight, initial_state, cu_seqlens, act, output_final_state, launch):
        y, final = conv_fwd(x, weight, initial_state, cu_seqlens, act, output_final_state, launch)
        ctx.save_for_backward(x, weight, initial_state, cu_seqlens)
        ctx.act = act
        ctx.launch = launch
        return y if final is None else (y, final)

    @staticmethod
    def backward(ctx, dy, *dfinal):
        x, weight, initial_state, cu_seqlens = ctx.saved_tensors
        df = dfinal[0] if dfinal else None
        dx, dw, dh0 = conv_bwd(x, weight, initial_state, cu_seqlens, ctx.act, dy, df, ctx.launch)
        dh0 = None if dh0 is None or not ctx.needs_input_grad[2] else dh0.to(initial_state.dtype)
        return dx, dw.to(weight.dtype), dh0, None, None, None, None


def causal_conv1d_triton(x, weight, initial_state, cu_seqlens, activation, output_final_state,
                         launch: ConvLaunch | None = None):
    """Triton path of ``causal_conv1d`` (arguments already validated there, weight ``[C, W]``): (y, final_state |
    None). ``launch``: the kernels' settings, None for ``conv_launch(C, initial_state is not None)``."""
    if weight.shape[-1] > MAX_WIDTH:
        raise ValueError(f"the Triton causal_conv1d supports W <= {MAX_WIDTH}, got W={weight.shape[-1]}")
    act = 1 if activation == "silu" else 0
    launch = launch or conv_launch(x.shape[-1], initial_state is not None)
    out = CausalConv1dFunction.apply(x, weight, initial_state, cu_seqlens, act, output_final_state, launch)
    return out if output_final_state else (out, None)
