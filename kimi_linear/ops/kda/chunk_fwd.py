"""Triton kernels of the chunkwise KDA forward (paper §3.1), and the block helpers the backward shares.

Two stages, chunk size BT = 64 split into four sub-blocks of BC = 16 rows:

* ``chunk_kda_fwd_intra_kernel`` — one program per (chunk, head), everything that stays inside the chunk:
  the fp32 cumulative log-decay G, the pair matrices A_kk (strictly lower, times beta) and A_qk (lower, times
  scale), the UT transform T = (I + A_kk)^-1 by forward substitution on the four 16x16 diagonal blocks and a
  block merge, and the WY factors W = T (beta exp(G) K), U = T (beta V).
* ``chunk_kda_fwd_state_kernel`` — one program per (V block, sequence, head), a sequential pass over the
  sequence's chunks carrying the fp32 state S [K, BV]: V_new = U - W S, O = (scale Q exp(G)) S + A_qk V_new,
  S <- exp(G_last) S + (K exp(G_last - G))^T V_new. With ``STORE_H`` it also writes the state entering each chunk
  and V_new (the backward recomputes them this way instead of keeping them from the forward).

Numerics: G stays fp32; exponentials are taken only of differences that are <= 0 — for pairs of rows in different
sub-blocks the decay is routed through the first row r of the later block, exp(G_t - G_i) = exp(G_t - G_r)
exp(G_r - G_i), and inside a sub-block it is applied element-wise and clamped before masking. Rows past the end of
a sequence read g = 0, so their G equals the last valid row's and no factor exceeds 1 (g = -1000 gives zeros).

Layout: every sequence tensor is packed ``[T_total, H, D]`` (contiguous); sequences are delimited by ``cu_seqlens``
and each program finds its sequence and chunk in ``chunk_indices`` ``[NT, 2]`` (sequence, chunk within it).
Limits: K, V <= 256 (padded to powers of two >= 16 inside); BT = 64 and BC = 16 are fixed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_common import (
    CHUNK,
    CONFIG,
    SUB_CHUNK,
    _bv,
    _dot_precision,
    _empty,
    _interpreting,
    _pad_dim,
)


@triton.jit
def _load_rows(ptr, t0, row0, n_rows, i_h, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Rows [row0, row0 + BR) of a chunk starting at packed row t0 of ``ptr`` [T_total, H, D], as fp32 [BR, BD].

    Rows at or past ``n_rows`` (the chunk's valid length) and columns past D read 0.
    """
    o_r = row0 + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < n_rows)[:, None] & (o_d < D)[None, :]
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    return tl.load(p, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _load_rows_raw(ptr, t0, n_rows, i_h, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Rows [0, BR) of a chunk in the stored dtype (dot operands stay 16-bit: half the registers of fp32)."""
    o_r = tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < n_rows)[:, None] & (o_d < D)[None, :]
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _store_rows(ptr, x, t0, row0, n_rows, i_h, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
                BD: tl.constexpr):
    o_r = row0 + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < n_rows)[:, None] & (o_d < D)[None, :]
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _load_vec(ptr, t0, row0, n_rows, i_h, H: tl.constexpr, BR: tl.constexpr):
    """Per-row scalars (beta) of ``ptr`` [T_total, H] for rows [row0, row0 + BR) of a chunk, fp32 [BR]."""
    o_r = row0 + tl.arange(0, BR)
    return tl.load(ptr + (t0 + o_r).to(tl.int64) * H + i_h, mask=o_r < n_rows, other=0.0).to(tl.float32)


@triton.jit
def _load_G(ptr, t0, row0, n_rows, G_last, i_h, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
            BD: tl.constexpr):
    """Stored cumulative decays G; rows past the chunk's end take the last valid row's value, so that every
    difference exponentiated against them stays <= 0."""
    o_r = row0 + tl.arange(0, BR)
    G = _load_rows(ptr, t0, row0, n_rows, i_h, H, D, BR, BD)
    return tl.where((o_r < n_rows)[:, None], G, G_last[None, :])


@triton.jit
def _load_row(ptr, t0, row, n_rows, i_h, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """Row ``row`` of a chunk of ``ptr`` [T_total, H, D] as fp32 [BD] (zeros past the chunk's end)."""
    o_d = tl.arange(0, BD)
    p = ptr + ((t0 + row).to(tl.int64) * H + i_h) * D + o_d
    return tl.load(p, mask=(o_d < D) & (row < n_rows), other=0.0).to(tl.float32)


@triton.jit
def _load_last(ptr, t0, n_rows, i_h, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """The chunk's last valid row of ``ptr`` [T_total, H, D] as fp32 [BD]."""
    o_d = tl.arange(0, BD)
    p = ptr + ((t0 + n_rows - 1).to(tl.int64) * H + i_h) * D + o_d
    return tl.load(p, mask=o_d < D, other=0.0).to(tl.float32)


@triton.jit
def _tile(ptr, t0, i_h, o_v, H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr):
    """Pointers to rows [t0, t0 + BT) and columns o_v of ``ptr`` [T_total, H, V]."""
    o_r = tl.arange(0, BT)
    return ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * V + o_v[None, :]


@triton.jit
def _load_block(ptr, t0, row0, col0, n_rows, i_h, H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Sub-block [BC, BC] at (row0, col0) of a per-chunk matrix stored as ``ptr`` [T_total, H, BT], fp32."""
    o_r = row0 + tl.arange(0, BC)
    o_c = col0 + tl.arange(0, BC)
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * BT + o_c[None, :]
    return tl.load(p, mask=(o_r < n_rows)[:, None], other=0.0)


@triton.jit
def _store_block(ptr, x, t0, row0, col0, n_rows, i_h, H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    o_r = row0 + tl.arange(0, BC)
    o_c = col0 + tl.arange(0, BC)
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * BT + o_c[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=(o_r < n_rows)[:, None])


@triton.jit
def _diag_pairs(q_a, k_a, G_a, G_prev, k, g, t0, r_a, n_rows, i_h, H: tl.constexpr, K: tl.constexpr,
                BC: tl.constexpr, BK: tl.constexpr):
    """Inside one sub-block: A_kk[t, j] = sum_c k_t k_j exp(G_t - G_j) for j < t, A_qk likewise for j <= t.

    Row j of k is read from memory and G_j is rebuilt as a running sum from G_prev (the decay before the block),
    so that the loop needs no row extraction across threads; the reductions run along K only.
    """
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    A_kk = tl.zeros([BC, BC], dtype=tl.float32)
    A_qk = tl.zeros([BC, BC], dtype=tl.float32)
    G_j = G_prev
    for j in range(BC):
        m_j = (o_k < K) & (r_a + j < n_rows)
        p_j = ((t0 + r_a + j).to(tl.int64) * H + i_h) * K + o_k
        k_j = tl.load(k + p_j, mask=m_j, other=0.0).to(tl.float32)
        G_j += tl.load(g + p_j, mask=m_j, other=0.0).to(tl.float32)
        # rows above j would give positive exponents; they are masked, the clamp keeps them finite
        kE = k_j[None, :] * tl.exp(tl.minimum(G_a - G_j[None, :], 0.0))  # [BC, BK]
        kk_j = tl.sum(k_a * kE, 1)
        qk_j = tl.sum(q_a * kE, 1)
        sel = o_c[None, :] == j
        A_kk = tl.where(sel & (o_c[:, None] > j), kk_j[:, None], A_kk)
        A_qk = tl.where(sel & (o_c[:, None] >= j), qk_j[:, None], A_qk)
    return A_kk, A_qk


@triton.jit
def _inv_unit_lower(A_ptr, t0, r_a, n_rows, i_h, H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """(I + A)^-1 for the strictly lower [BC, BC] diagonal block of A stored at rows/columns r_a.. of ``A_ptr``
    [T_total, H, BT], by forward substitution: x_i = e_i - sum_{j<i} A[i, j] x_j.

    Row i of A comes from memory and the inverse is built transposed (Y = X^T), so each step reduces within
    a row of Y instead of across the rows of X.
    """
    o_c = tl.arange(0, BC)
    Y = tl.zeros([BC, BC], dtype=tl.float32)
    for i in tl.static_range(BC):
        p_i = A_ptr + ((t0 + r_a + i).to(tl.int64) * H + i_h) * BT + r_a + o_c
        a_i = tl.load(p_i, mask=(o_c < BC) & (r_a + i < n_rows), other=0.0)
        y_i = -tl.sum(a_i[None, :] * Y, 1) + tl.where(o_c == i, 1.0, 0.0)
        Y = tl.where(o_c[None, :] == i, y_i[:, None], Y)
    return tl.trans(Y)


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _dot_exact(a, b):
    """fp32 products of the small UT-transform blocks: they steer the whole chunk, so no tf32 rounding."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def chunk_kda_fwd_intra_kernel(
    q, k, v, g, beta, G_out, Aqk_out, Tinv_out, w_out, u_out, qg_out, kd_out, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT
    n_rows = tl.minimum(eos - t0, BT)

    # cumulative log-decay, sub-block by sub-block, carrying the running sum; padded rows add 0
    g0 = _load_rows(g, t0, 0, n_rows, i_h, H, K, BC, BK)
    g1 = _load_rows(g, t0, BC, n_rows, i_h, H, K, BC, BK)
    g2 = _load_rows(g, t0, 2 * BC, n_rows, i_h, H, K, BC, BK)
    g3 = _load_rows(g, t0, 3 * BC, n_rows, i_h, H, K, BC, BK)
    c1 = tl.sum(g0, 0)  # decay accumulated before each sub-block
    c2 = c1 + tl.sum(g1, 0)
    c3 = c2 + tl.sum(g2, 0)
    G0 = tl.cumsum(g0, 0)
    G1 = tl.cumsum(g1, 0) + c1[None, :]
    G2 = tl.cumsum(g2, 0) + c2[None, :]
    G3 = tl.cumsum(g3, 0) + c3[None, :]
    _store_rows(G_out, G0, t0, 0, n_rows, i_h, H, K, BC, BK)
    _store_rows(G_out, G1, t0, BC, n_rows, i_h, H, K, BC, BK)
    _store_rows(G_out, G2, t0, 2 * BC, n_rows, i_h, H, K, BC, BK)
    _store_rows(G_out, G3, t0, 3 * BC, n_rows, i_h, H, K, BC, BK)
    G_last = c3 + tl.sum(g3, 0)  # padded rows add 0: the last valid row's decay

    k0 = _load_rows(k, t0, 0, n_rows, i_h, H, K, BC, BK)
    k1 = _load_rows(k, t0, BC, n_rows, i_h, H, K, BC, BK)
    k2 = _load_rows(k, t0, 2 * BC, n_rows, i_h, H, K, BC, BK)
    k3 = _load_rows(k, t0, 3 * BC, n_rows, i_h, H, K, BC, BK)
    q0 = _load_rows(q, t0, 0, n_rows, i_h, H, K, BC, BK) * scale
    q1 = _load_rows(q, t0, BC, n_rows, i_h, H, K, BC, BK) * scale
    q2 = _load_rows(q, t0, 2 * BC, n_rows, i_h, H, K, BC, BK) * scale
    q3 = _load_rows(q, t0, 3 * BC, n_rows, i_h, H, K, BC, BK) * scale
    b0 = _load_vec(beta, t0, 0, n_rows, i_h, H, BC)
    b1 = _load_vec(beta, t0, BC, n_rows, i_h, H, BC)
    b2 = _load_vec(beta, t0, 2 * BC, n_rows, i_h, H, BC)
    b3 = _load_vec(beta, t0, 3 * BC, n_rows, i_h, H, BC)

    # the state pass's operands: q~ exp(G) reads the state, K exp(G_last - G) writes it
    _store_rows(qg_out, q0 * tl.exp(G0), t0, 0, n_rows, i_h, H, K, BC, BK)
    _store_rows(qg_out, q1 * tl.exp(G1), t0, BC, n_rows, i_h, H, K, BC, BK)
    _store_rows(qg_out, q2 * tl.exp(G2), t0, 2 * BC, n_rows, i_h, H, K, BC, BK)
    _store_rows(qg_out, q3 * tl.exp(G3), t0, 3 * BC, n_rows, i_h, H, K, BC, BK)
    _store_rows(kd_out, k0 * tl.exp(G_last[None, :] - G0), t0, 0, n_rows, i_h, H, K, BC, BK)
    _store_rows(kd_out, k1 * tl.exp(G_last[None, :] - G1), t0, BC, n_rows, i_h, H, K, BC, BK)
    _store_rows(kd_out, k2 * tl.exp(G_last[None, :] - G2), t0, 2 * BC, n_rows, i_h, H, K, BC, BK)
    _store_rows(kd_out, k3 * tl.exp(G_last[None, :] - G3), t0, 3 * BC, n_rows, i_h, H, K, BC, BK)

    # diagonal sub-blocks, element-wise decay
    Akk00, Aqk00 = _diag_pairs(q0, k0, G0, tl.zeros([BK], dtype=tl.float32), k, g, t0, 0, n_rows, i_h, H, K, BC, BK)
    Akk11, Aqk11 = _diag_pairs(q1, k1, G1, c1, k, g, t0, BC, n_rows, i_h, H, K, BC, BK)
    Akk22, Aqk22 = _diag_pairs(q2, k2, G2, c2, k, g, t0, 2 * BC, n_rows, i_h, H, K, BC, BK)
    Akk33, Aqk33 = _diag_pairs(q3, k3, G3, c3, k, g, t0, 3 * BC, n_rows, i_h, H, K, BC, BK)

    # off-diagonal sub-blocks (a > b): decay routed through the first row of block a, both factors <= 1
    Gr1 = c1 + _load_row(g, t0, 1 * BC, n_rows, i_h, H, K, BK)
    e1 = tl.exp(G1 - Gr1[None, :])
    kb = k0 * tl.exp(Gr1[None, :] - G0)
    Akk10 = _dot(k1 * e1, tl.trans(kb), DOT_PREC)
    Aqk10 = _dot(q1 * e1, tl.trans(kb), DOT_PREC)

    Gr2 = c2 + _load_row(g, t0, 2 * BC, n_rows, i_h, H, K, BK)
    e2 = tl.exp(G2 - Gr2[None, :])
    kb = k0 * tl.exp(Gr2[None, :] - G0)
    Akk20 = _dot(k2 * e2, tl.trans(kb), DOT_PREC)
    Aqk20 = _dot(q2 * e2, tl.trans(kb), DOT_PREC)
    kb = k1 * tl.exp(Gr2[None, :] - G1)
    Akk21 = _dot(k2 * e2, tl.trans(kb), DOT_PREC)
    Aqk21 = _dot(q2 * e2, tl.trans(kb), DOT_PREC)

    Gr3 = c3 + _load_row(g, t0, 3 * BC, n_rows, i_h, H, K, BK)
    e3 = tl.exp(G3 - Gr3[None, :])
    kb = k0 * tl.exp(Gr3[None, :] - G0)
    Akk30 = _dot(k3 * e3, tl.trans(kb), DOT_PREC)
    Aqk30 = _dot(q3 * e3, tl.trans(kb), DOT_PREC)
    kb = k1 * tl.exp(Gr3[None, :] - G1)
    Akk31 = _dot(k3 * e3, tl.trans(kb), DOT_PREC)
    Aqk31 = _dot(q3 * e3, tl.trans(kb), DOT_PREC)
    kb = k2 * tl.exp(Gr3[None, :] - G2)
    Akk32 = _dot(k3 * e3, tl.trans(kb), DOT_PREC)
    Aqk32 = _dot(q3 * e3, tl.trans(kb), DOT_PREC)

    zero = tl.zeros([BC, BC], dtype=tl.float32)
    _store_block(Aqk_out, Aqk00, t0, 0, 0, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, zero, t0, 0, BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, zero, t0, 0, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, zero, t0, 0, 3 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, Aqk10, t0, BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, Aqk11, t0, BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, zero, t0, BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, zero, t0, BC, 3 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, Aqk20, t0, 2 * BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, Aqk21, t0, 2 * BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, Aqk22, t0, 2 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, zero, t0, 2 * BC, 3 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, Aqk30, t0, 3 * BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, Aqk31, t0, 3 * BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, Aqk32, t0, 3 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, Aqk33, t0, 3 * BC, 3 * BC, n_rows, i_h, H, BT, BC)

    # UT transform: A = beta * A_kk (row scale), T = (I + A)^-1 block by block
    A00 = b0[:, None] * Akk00
    A11 = b1[:, None] * Akk11
    A22 = b2[:, None] * Akk22
    A33 = b3[:, None] * Akk33
    A10 = b1[:, None] * Akk10
    A20 = b2[:, None] * Akk20
    A21 = b2[:, None] * Akk21
    A30 = b3[:, None] * Akk30
    A31 = b3[:, None] * Akk31
    A32 = b3[:, None] * Akk32
    # the forward substitution reads rows of the diagonal blocks from memory (the T buffer, overwritten below)
    _store_block(Tinv_out, A00, t0, 0, 0, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, A11, t0, BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, A22, t0, 2 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, A33, t0, 3 * BC, 3 * BC, n_rows, i_h, H, BT, BC)
    tl.debug_barrier()
    T00 = _inv_unit_lower(Tinv_out, t0, 0, n_rows, i_h, H, BT, BC)
    T11 = _inv_unit_lower(Tinv_out, t0, BC, n_rows, i_h, H, BT, BC)
    T22 = _inv_unit_lower(Tinv_out, t0, 2 * BC, n_rows, i_h, H, BT, BC)
    T33 = _inv_unit_lower(Tinv_out, t0, 3 * BC, n_rows, i_h, H, BT, BC)
    tl.debug_barrier()
    # T_ij = -T_ii sum_{j <= m < i} A_im T_mj
    T10 = -_dot_exact(T11, _dot_exact(A10, T00))
    T21 = -_dot_exact(T22, _dot_exact(A21, T11))
    T20 = -_dot_exact(T22, _dot_exact(A20, T00) + _dot_exact(A21, T10))
    T32 = -_dot_exact(T33, _dot_exact(A32, T22))
    T31 = -_dot_exact(T33, _dot_exact(A31, T11) + _dot_exact(A32, T21))
    T30 = -_dot_exact(T33, _dot_exact(A30, T00) + _dot_exact(A31, T10) + _dot_exact(A32, T20))

    _store_block(Tinv_out, T00, t0, 0, 0, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, zero, t0, 0, BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, zero, t0, 0, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, zero, t0, 0, 3 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, T10, t0, BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, T11, t0, BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, zero, t0, BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, zero, t0, BC, 3 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, T20, t0, 2 * BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, T21, t0, 2 * BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, T22, t0, 2 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, zero, t0, 2 * BC, 3 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, T30, t0, 3 * BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, T31, t0, 3 * BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, T32, t0, 3 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv_out, T33, t0, 3 * BC, 3 * BC, n_rows, i_h, H, BT, BC)

    # W = T (beta exp(G) K), U = T (beta V); exp(G) <= 1 (G measured from the chunk start)
    x0 = b0[:, None] * k0 * tl.exp(G0)
    x1 = b1[:, None] * k1 * tl.exp(G1)
    x2 = b2[:, None] * k2 * tl.exp(G2)
    x3 = b3[:, None] * k3 * tl.exp(G3)
    _store_rows(w_out, _dot(T00, x0, DOT_PREC), t0, 0, n_rows, i_h, H, K, BC, BK)
    _store_rows(w_out, _dot(T10, x0, DOT_PREC) + _dot(T11, x1, DOT_PREC), t0, BC, n_rows, i_h, H, K, BC, BK)
    _store_rows(w_out, _dot(T20, x0, DOT_PREC) + _dot(T21, x1, DOT_PREC) + _dot(T22, x2, DOT_PREC),
                t0, 2 * BC, n_rows, i_h, H, K, BC, BK)
    _store_rows(w_out, _dot(T30, x0, DOT_PREC) + _dot(T31, x1, DOT_PREC) + _dot(T32, x2, DOT_PREC)
                + _dot(T33, x3, DOT_PREC), t0, 3 * BC, n_rows, i_h, H, K, BC, BK)
    y0 = b0[:, None] * _load_rows(v, t0, 0, n_rows, i_h, H, V, BC, BV)
    y1 = b1[:, None] * _load_rows(v, t0, BC, n_rows, i_h, H, V, BC, BV)
    y2 = b2[:, None] * _load_rows(v, t0, 2 * BC, n_rows, i_h, H, V, BC, BV)
    y3 = b3[:, None] * _load_rows(v, t0, 3 * BC, n_rows, i_h, H, V, BC, BV)
    _store_rows(u_out, _dot(T00, y0, DOT_PREC), t0, 0, n_rows, i_h, H, V, BC, BV)
    _store_rows(u_out, _dot(T10, y0, DOT_PREC) + _dot(T11, y1, DOT_PREC), t0, BC, n_rows, i_h, H, V, BC, BV)
    _store_rows(u_out, _dot(T20, y0, DOT_PREC) + _dot(T21, y1, DOT_PREC) + _dot(T22, y2, DOT_PREC),
                t0, 2 * BC, n_rows, i_h, H, V, BC, BV)
    _store_rows(u_out, _dot(T30, y0, DOT_PREC) + _dot(T31, y1, DOT_PREC) + _dot(T32, y2, DOT_PREC)
                + _dot(T33, y3, DOT_PREC), t0, 3 * BC, n_rows, i_h, H, V, BC, BV)


@triton.jit
def _fwd_state_step(S, i_t, bos, eos, c0, i_h, qg, kd, w, u, G, Aqk, o, h_out, vnew_out, o_v, m_kv, o_kv,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, STORE_O: tl.constexpr, STORE_H: tl.constexpr, DOT_PREC: tl.constexpr):
    """One chunk of the state pass: returns the state leaving chunk i_t."""
    dt = w.dtype.element_ty
    t0 = bos + i_t * BT
    n_rows = tl.minimum(eos - t0, BT)
    o_r = tl.arange(0, BT)
    m_tv = (o_r < n_rows)[:, None] & (o_v < V)[None, :]
    if STORE_H:
        tl.store(h_out + ((c0 + i_t) * H + i_h) * K * V + o_kv, S.to(h_out.dtype.element_ty), mask=m_kv)
    b_w = _load_rows_raw(w, t0, n_rows, i_h, H, K, BT, BK)
    b_u = tl.load(_tile(u, t0, i_h, o_v, H, V, BT), mask=m_tv, other=0.0).to(tl.float32)
    b_kd = _load_rows_raw(kd, t0, n_rows, i_h, H, K, BT, BK)
    b_S = S.to(dt)
    b_vn = b_u - _dot(b_w, b_S, DOT_PREC)  # [BT, BV]
    if STORE_O:
        b_qg = _load_rows_raw(qg, t0, n_rows, i_h, H, K, BT, BK)
        b_A = _load_rows_raw(Aqk, t0, n_rows, i_h, H, BT, BT, BT)  # [BT, BT]
        b_o = _dot(b_qg, b_S, DOT_PREC) + _dot(b_A, b_vn.to(dt), DOT_PREC)
        tl.store(_tile(o, t0, i_h, o_v, H, V, BT), b_o.to(o.dtype.element_ty), mask=m_tv)
    if STORE_H:
        tl.store(_tile(vnew_out, t0, i_h, o_v, H, V, BT), b_vn.to(vnew_out.dtype.element_ty), mask=m_tv)
    G_last = _load_last(G, t0, n_rows, i_h, H, K, BK)
    return S * tl.exp(G_last)[:, None] + _dot(tl.trans(b_kd), b_vn.to(dt), DOT_PREC)


@triton.jit
def chunk_kda_fwd_state_kernel(
    qg, kd, w, u, G, Aqk, o, h0, ht, h_out, vnew_out, cu_seqlens, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_O: tl.constexpr, STORE_H: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    n_chunks = (eos - bos + BT - 1) // BT
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]  # offsets inside one [K, V] state
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + (i_n * H + i_h) * K * V + o_kv, mask=m_kv, other=0.0)

    if INTERPRET:  # the interpreter cannot take a run-time bound in range()
        i_t = 0
        while i_t < n_chunks:
            S = _fwd_state_step(S, i_t, bos, eos, c0, i_h, qg, kd, w, u, G, Aqk, o, h_out, vnew_out, o_v, m_kv,
                                o_kv, H, K, V, BT, BK, BV, STORE_O, STORE_H, DOT_PREC)
            i_t += 1
    else:
        for i_t in range(n_chunks):
            S = _fwd_state_step(S, i_t, bos, eos, c0, i_h, qg, kd, w, u, G, Aqk, o, h_out, vnew_out, o_v, m_kv,
                                o_kv, H, K, V, BT, BK, BV, STORE_O, STORE_H, DOT_PREC)

    if STORE_HT:
        tl.store(ht + (i_n * H + i_h) * K * V + o_kv, S, mask=m_kv)


@triton.jit
def chunk_kda_fwd_output_kernel(
    qg, Aqk, h, vn, o, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """O = (q~ exp(G)) S + A_qk V_new per (chunk, head, V block), from the states ``h`` [NT, H, K, V] and V_new that
    the state pass wrote: the unfused alternative to computing O inside the sequential pass."""
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT
    n_rows = tl.minimum(eos - t0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_r = tl.arange(0, BT)
    m_tv = (o_r < n_rows)[:, None] & (o_v < V)[None, :]
    b_h = tl.load(h + (i_c.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                  mask=(o_k < K)[:, None] & (o_v < V)[None, :], other=0.0)
    b_qg = _load_rows_raw(qg, t0, n_rows, i_h, H, K, BT, BK)
    b_A = _load_rows_raw(Aqk, t0, n_rows, i_h, H, BT, BT, BT)
    b_vn = tl.load(_tile(vn, t0, i_h, o_v, H, V, BT), mask=m_tv, other=0.0)
    b_o = _dot(b_qg, b_h, DOT_PREC) + _dot(b_A, b_vn, DOT_PREC)
    tl.store(_tile(o, t0, i_h, o_v, H, V, BT), b_o.to(o.dtype.element_ty), mask=m_tv)


def chunk_fwd(q, k, v, g, beta, scale, h0, output_final_state, layout):
    """Forward launcher: packed q, k [TT, H, K], v [TT, H, V], g fp32, beta [TT, H] -> (o, final state or None,
    the intermediates the backward reads: G, A_qk, T, W, U, q~ exp(G), K exp(G_last - G))."""
    TT, H, K = q.shape
    V = v.shape[-1]
    BK, BVf = _pad_dim(K), _pad_dim(V)
    dev, dt = q.device, q.dtype
    prec = _dot_precision(dt)
    G = _empty(TT, H, K, device=dev, dtype=torch.float32)
    Aqk = _empty(TT, H, CHUNK, device=dev, dtype=dt)
    Tinv = _empty(TT, H, CHUNK, device=dev, dtype=torch.float32)  # also the UT transform's scratch
    w = _empty(TT, H, K, device=dev, dtype=dt)
    u = _empty(TT, H, V, device=dev, dtype=dt)
    qg = _empty(TT, H, K, device=dev, dtype=dt)
    kd = _empty(TT, H, K, device=dev, dtype=dt)
    if layout.NT > 0:
        chunk_kda_fwd_intra_kernel[(layout.NT, H)](
            q, k, v, g, beta, G, Aqk, Tinv, w, u, qg, kd, layout.cu_seqlens, layout.chunk_indices, scale,
            H=H, K=K, V=V, BT=CHUNK, BC=SUB_CHUNK, BK=BK, BV=BVf, DOT_PREC=prec,
            num_warps=CONFIG["intra_warps"], num_stages=CONFIG["intra_stages"],
        )
    o = _empty(TT, H, V, device=dev, dtype=dt)
    ht = _empty(layout.N, H, K, V, device=dev, dtype=torch.float32) if output_final_state else None
    BV = _bv(V, "state_bv")
    fused = CONFIG["fused_output"] or layout.NT == 0
    h = o if fused else _empty(layout.NT, H, K, V, device=dev, dtype=dt)
    vn = o if fused else _empty(TT, H, V, device=dev, dtype=dt)
    chunk_kda_fwd_state_kernel[(triton.cdiv(V, BV), layout.N * H)](
        qg, kd, w, u, G, Aqk, o, h0 if h0 is not None else o, ht if ht is not None else o, h, vn,
        layout.cu_seqlens, layout.chunk_offsets,
        H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, USE_H0=h0 is not None, STORE_HT=ht is not None, STORE_O=fused,
        STORE_H=not fused, DOT_PREC=prec, INTERPRET=_interpreting(), num_warps=CONFIG["state_warps"],
        num_stages=CONFIG["state_stages"],
    )
    if not fused:
        BVo = _bv(V, "output_bv")
        chunk_kda_fwd_output_kernel[(layout.NT, H, triton.cdiv(V, BVo))](
            qg, Aqk, h, vn, o, layout.cu_seqlens, layout.chunk_indices,
            H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BVo, DOT_PREC=prec, num_warps=4, num_stages=1,
        )
    return o, ht, (G, Aqk, Tinv, w, u, qg, kd)


def sm90_build_jobs(H: int, K: int, V: int) -> list:
    """(kernel, constexprs, num_warps, num_stages) as the launcher uses them, for ``benchmarks/kda_chunk_build.py``."""
    c = CONFIG
    BK, BVf = _pad_dim(K), _pad_dim(V)
    common = dict(H=H, K=K, V=V, BT=CHUNK, BK=BK, DOT_PREC="tf32")
    return [
        (chunk_kda_fwd_intra_kernel, dict(common, BC=SUB_CHUNK, BV=BVf), c["intra_warps"], c["intra_stages"]),
        (chunk_kda_fwd_state_kernel, dict(common, BV=min(BVf, c["state_bv"]), USE_H0=True, STORE_HT=True,
                                          STORE_O=c["fused_output"], STORE_H=not c["fused_output"],
                                          INTERPRET=False), c["state_warps"], c["state_stages"]),
        (chunk_kda_fwd_output_kernel, dict(common, BV=min(BVf, c["output_bv"])), 4, 1),
    ]
