"""Backward stage 4: the gradients through the pair matrices, then dg as a reverse cumulative sum.

The forward's pair matrices inside a chunk (q~ = scale q, G the cumulative log-decay, rows t, columns j <= t):

    A_qk[t, j] = sum_k q~_tk k_jk exp(G_tk - G_jk),    A[t, j] = beta_t sum_k k_tk k_jk exp(G_tk - G_jk)  (j < t)

Given dA_qk and dA (stage 3), with r_t = sum_j dA[t, j] k_j exp(G_t - G_j) (the row side, before beta_t):

    dq~_t += sum_j dA_qk[t, j] k_j exp(G_t - G_j)
    dk_j  += beta_t r_t (as a row) + sum_t (dA[t, j] beta_t k_t + dA_qk[t, j] q~_t) exp(G_t - G_j) (as a column)
    dbeta_t += sum_k k_t r_t,    dG_t += q~_t dq~_t(pairs) + k_t (beta_t r_t - column side of k_t)

added to stage 2's partial dq~, dk, dG and stage 3's dbeta. One program per (chunk, head, 16-row sub-block a) of
the 64-row chunk. The pairs across sub-blocks (b < a as rows of a, c > a as columns of a) are [16, 16] x [16, K]
products, with the decay routed through the first row of the later sub-block, so every exponent is <= 0 (the
forward does the same). The pairs inside sub-block a are [16, 16] x [16, K] fp32 products too, with one decay
reference, the block's exit row d: exp(G_t - G_j) = exp(G_t - d) exp(d - G_j), the first factor capped at
e^``BwdLaunch.intra_diag_cap``; a block whose decay range passes the cap (steep gates, g = -1000) goes element-wise
instead, one row or column per step, each exponent clamped at 0, so any gate is safe. Sub-blocks past the chunk's
end read zeros and write nothing. The products across sub-blocks take the stored fp32 dA / dA_qk and fp32 q, k
(tf32 for 16-bit inputs, full fp32 for fp32 inputs); the in-block ones are full fp32.

Then ``chunk_kda_bwd_dg_kernel``, one program per (chunk, head): g_t enters every G_s with s >= t in its chunk,
so dg_t = sum_{s >= t} dG_s (in place, fp32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_common import CHUNK, SUB_CHUNK
from kimi_linear.ops.triton_helpers import (
    chunk_rows,
    dot,
    dot_precision,
    load_block,
    load_G,
    load_last,
    load_row,
    load_rows,
    load_vec,
    new_buffer,
    pad_dim,
    store_rows,
)

if TYPE_CHECKING:
    from kimi_linear.ops.kda.chunk_bwd import BwdLaunch


@triton.jit
def _bwd_intra_diag_loops(acc_q, acc_r, acc_c, q, k, beta, G, dA, dAqk, G_a, t0, r_a, n_rows, i_h, scale,
                          H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """The pairs inside sub-block a (rows r_a..), element-wise: adds to dq~ (acc_q), to r (acc_r, before beta) and
    to the column side (acc_c). Each exponent is clamped at 0, so any g is safe."""
    # two loops, each reading one row (or column) of the operands from memory per step and updating whole [BC, BK]
    # tiles, so that nothing is reduced across rows
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    for j in range(BC):  # columns j: the row side, dq~_t and r_t for t >= j
        m_j = m_k & (r_a + j < n_rows)
        p_j = ((t0 + r_a + j).to(tl.int64) * H + i_h) * K + o_k
        k_j = tl.load(k + p_j, mask=m_j, other=0.0).to(tl.float32)
        G_j = tl.load(G + p_j, mask=m_j, other=0.0)
        E = tl.where(o_c[:, None] >= j, tl.exp(tl.minimum(G_a - G_j[None, :], 0.0)), 0.0)  # [BC, BK]
        p_col = ((t0 + r_a + o_c).to(tl.int64) * H + i_h) * BT + r_a + j
        dqk_j = tl.load(dAqk + p_col, mask=r_a + o_c < n_rows, other=0.0)  # dA_qk[t, j] over t
        dkk_j = tl.load(dA + p_col, mask=r_a + o_c < n_rows, other=0.0)
        acc_q += dqk_j[:, None] * k_j[None, :] * E
        acc_r += dkk_j[:, None] * k_j[None, :] * E
    for t in range(BC):  # rows t: the column side, for keys j <= t
        m_t = m_k & (r_a + t < n_rows)
        p_t = ((t0 + r_a + t).to(tl.int64) * H + i_h) * K + o_k
        q_t = tl.load(q + p_t, mask=m_t, other=0.0).to(tl.float32) * scale
        bk_t = tl.load(k + p_t, mask=m_t, other=0.0).to(tl.float32) * tl.load(
            beta + (t0 + r_a + t).to(tl.int64) * H + i_h, mask=r_a + t < n_rows, other=0.0).to(tl.float32)
        G_t = tl.load(G + p_t, mask=m_t, other=0.0)
        E = tl.where(o_c[:, None] <= t, tl.exp(tl.minimum(G_t[None, :] - G_a, 0.0)), 0.0)  # [BC(j), BK]
        p_row = ((t0 + r_a + t).to(tl.int64) * H + i_h) * BT + r_a + o_c
        dqk_t = tl.load(dAqk + p_row, mask=(o_c < BC) & (r_a + t < n_rows), other=0.0)  # dA_qk[t, j] over j
        dkk_t = tl.load(dA + p_row, mask=(o_c < BC) & (r_a + t < n_rows), other=0.0)
        acc_c += (dkk_t[:, None] * bk_t[None, :] + dqk_t[:, None] * q_t[None, :]) * E
    return acc_q, acc_r, acc_c


@triton.jit
def _bwd_intra_diag_dots(acc_q, acc_r, acc_c, q_a, k_a, b_a, G_a, d, dA, dAqk, t0, r_a, n_rows, i_h,
                         H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, DIAG_CAP: tl.constexpr):
    """The same pairs as ``_bwd_intra_diag_loops`` by [BC, BC] x [BC, BK] products, for a block whose decay range
    max(G_t - d) over its rows and K is at most DIAG_CAP (d its exit row): exp(G_t - G_j) = exp(G_t - d)
    exp(d - G_j), the first factor in [1, e^DIAG_CAP], the second <= 1. The products are fp32 ("ieee"), as the
    loops' sums are; q_a is already scaled."""
    o_c = tl.arange(0, BC)
    low = o_c[:, None] >= o_c[None, :]  # pairs (t, j), j <= t, as the loops take them
    dqk = tl.where(low, load_block(dAqk, t0, r_a, r_a, n_rows, i_h, H, BT, BC), 0.0)
    dkk = tl.where(low, load_block(dA, t0, r_a, r_a, n_rows, i_h, H, BT, BC), 0.0)
    a_own = G_a - d[None, :]
    eU = tl.exp(tl.minimum(a_own, DIAG_CAP))
    eD = tl.exp(tl.minimum(-a_own, 0.0))
    kD = k_a * eD
    acc_q += eU * tl.dot(dqk, kD, input_precision="ieee")
    acc_r += eU * tl.dot(dkk, kD, input_precision="ieee")
    acc_c += eD * (tl.dot(tl.trans(dkk), b_a[:, None] * k_a * eU, input_precision="ieee")
                   + tl.dot(tl.trans(dqk), q_a * eU, input_precision="ieee"))
    return acc_q, acc_r, acc_c


@triton.jit
def _bwd_intra_block(a, q, k, beta, G, dq, dk, dG, dA, dAqk, dbeta, t0, n_rows, G_last, i_h, scale,
                     H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                     DOT_PREC: tl.constexpr, DIAG_CAP: tl.constexpr):
    """Sub-block a of a chunk: its final dq~, dk, dbeta and dG (before the reverse cumulative sum).

    Sub-blocks past the chunk's end read zeros, their G is the last valid row's, and produce zeros.
    """
    r_a = a * BC
    q_a = load_rows(q, t0, r_a, n_rows, i_h, H, K, BC, BK) * scale
    k_a = load_rows(k, t0, r_a, n_rows, i_h, H, K, BC, BK)
    G_a = load_G(G, t0, r_a, n_rows, G_last, i_h, H, K, BC, BK)
    b_a = load_vec(beta, t0, r_a, n_rows, i_h, H, BC)
    Gr_a = tl.where(r_a < n_rows, load_row(G, t0, r_a, n_rows, i_h, H, K, BK), G_last)  # block a's first row

    # rows of block a against columns of earlier blocks b, through the reference row of a
    acc_q = tl.zeros([BC, BK], dtype=tl.float32)
    acc_r = tl.zeros([BC, BK], dtype=tl.float32)  # sum_i dA[t, i] k_i exp(G_t - G_i), before the beta_t factor
    for b in tl.static_range(3):
        if b < a:
            k_b = load_rows(k, t0, b * BC, n_rows, i_h, H, K, BC, BK)
            G_b = load_G(G, t0, b * BC, n_rows, G_last, i_h, H, K, BC, BK)
            kb = k_b * tl.exp(Gr_a[None, :] - G_b)
            acc_q += dot(load_block(dAqk, t0, r_a, b * BC, n_rows, i_h, H, BT, BC), kb, DOT_PREC)
            acc_r += dot(load_block(dA, t0, r_a, b * BC, n_rows, i_h, H, BT, BC), kb, DOT_PREC)
    e_a = tl.exp(G_a - Gr_a[None, :])
    acc_q *= e_a
    acc_r *= e_a

    # columns of block a against rows of later blocks c (A = beta A_kk, so the key side carries beta_t)
    acc_c = tl.zeros([BC, BK], dtype=tl.float32)
    for c in tl.static_range(1, 4):
        if c > a:
            q_c = load_rows(q, t0, c * BC, n_rows, i_h, H, K, BC, BK) * scale
            k_c = load_rows(k, t0, c * BC, n_rows, i_h, H, K, BC, BK)
            b_c = load_vec(beta, t0, c * BC, n_rows, i_h, H, BC)
            G_c = load_G(G, t0, c * BC, n_rows, G_last, i_h, H, K, BC, BK)
            Gr_c = tl.where(c * BC < n_rows, load_row(G, t0, c * BC, n_rows, i_h, H, K, BK), G_last)
            e_c = tl.exp(G_c - Gr_c[None, :])
            part = dot(tl.trans(load_block(dA, t0, c * BC, r_a, n_rows, i_h, H, BT, BC)),
                        b_c[:, None] * k_c * e_c, DOT_PREC)
            dAqk_ca = load_block(dAqk, t0, c * BC, r_a, n_rows, i_h, H, BT, BC)
            part += dot(tl.trans(dAqk_ca), q_c * e_c, DOT_PREC)
            acc_c += part * tl.exp(Gr_c[None, :] - G_a)

    # inside block a: by small products where the block's decay range allows, else element-wise
    # the block's exit row (its last valid row; G_last for a block that is cut short or past the end)
    d = tl.where(r_a + BC - 1 < n_rows, load_row(G, t0, r_a + BC - 1, n_rows, i_h, H, K, BK), G_last)
    if tl.max(tl.max(G_a - d[None, :], 1), 0) <= DIAG_CAP:
        acc_q, acc_r, acc_c = _bwd_intra_diag_dots(acc_q, acc_r, acc_c, q_a, k_a, b_a, G_a, d, dA, dAqk, t0, r_a,
                                                   n_rows, i_h, H, BT, BC, DIAG_CAP)
    else:
        acc_q, acc_r, acc_c = _bwd_intra_diag_loops(acc_q, acc_r, acc_c, q, k, beta, G, dA, dAqk, G_a, t0, r_a,
                                                    n_rows, i_h, scale, H, K, BT, BC, BK)

    dk_row = b_a[:, None] * acc_r
    b_dq = load_rows(dq, t0, r_a, n_rows, i_h, H, K, BC, BK) + acc_q
    b_dk = load_rows(dk, t0, r_a, n_rows, i_h, H, K, BC, BK) + dk_row + acc_c
    b_dG = load_rows(dG, t0, r_a, n_rows, i_h, H, K, BC, BK) + q_a * acc_q + k_a * (dk_row - acc_c)
    b_db = load_vec(dbeta, t0, r_a, n_rows, i_h, H, BC) + tl.sum(k_a * acc_r, 1)
    return b_dq, b_dk, b_dG, b_db


@triton.jit
def chunk_kda_bwd_intra_kernel(
    q, k, beta, G, dq, dk, dG, dA, dAqk, dbeta, dq_out, dk_out, dg_out, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    DOT_PREC: tl.constexpr, DIAG_CAP: tl.constexpr,
):
    """One program per (chunk, head, sub-block): writes dq, dk, dbeta (in place) and dG, which
    ``chunk_kda_bwd_dg_kernel`` then turns into dg."""
    i_c, i_h, a = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, n_rows = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    G_last = load_last(G, t0, n_rows, i_h, H, K, BK)
    b_dq, b_dk, b_dG, b_db = _bwd_intra_block(a, q, k, beta, G, dq, dk, dG, dA, dAqk, dbeta, t0, n_rows,
                                              G_last, i_h, scale, H, K, BT, BC, BK, DOT_PREC, DIAG_CAP)
    r_a = a * BC
    store_rows(dq_out, b_dq * scale, t0, r_a, n_rows, i_h, H, K, BC, BK)
    store_rows(dk_out, b_dk, t0, r_a, n_rows, i_h, H, K, BC, BK)
    store_rows(dg_out, b_dG, t0, r_a, n_rows, i_h, H, K, BC, BK)
    o_a = r_a + tl.arange(0, BC)
    tl.store(dbeta + (t0 + o_a).to(tl.int64) * H + i_h, b_db, mask=o_a < n_rows)


@triton.jit
def chunk_kda_bwd_dg_kernel(dg, cu_seqlens, chunk_indices, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                            BK: tl.constexpr):
    """In place: dg_t = sum over s >= t in the chunk of dG_s (g_t enters every later cumulative decay)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, n_rows = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    b_dG = load_rows(dg, t0, 0, n_rows, i_h, H, K, BT, BK)  # [BT, BK], zero past the end
    b_dg = tl.sum(b_dG, 0)[None, :] - tl.cumsum(b_dG, 0) + b_dG
    store_rows(dg, b_dg, t0, 0, n_rows, i_h, H, K, BT, BK)


def bwd_pairs(q, k, beta, G, dq, dk, dG, dA, dAqk, db, scale: float, layout, launch: BwdLaunch):
    """Stage 2's partial dq~, dk, dG and stage 3's dA, dA_qk -> (dq, dk ``[TT, H, K]`` in q's dtype, dg ``[TT, H, K]``
    fp32). ``db`` (stage 3's dbeta) gets the pair term in place and is then the final dbeta."""
    TT, H, K = q.shape
    dev, dt = q.device, q.dtype
    BK = pad_dim(K)
    dq_out = new_buffer(TT, H, K, device=dev, dtype=dt)
    dk_out = new_buffer(TT, H, K, device=dev, dtype=dt)
    dg = new_buffer(TT, H, K, device=dev, dtype=torch.float32)
    chunk_kda_bwd_intra_kernel[(layout.NT, H, CHUNK // SUB_CHUNK)](
        q, k, beta, G, dq, dk, dG, dA, dAqk, db, dq_out, dk_out, dg, layout.cu_seqlens, layout.chunk_indices, scale,
        H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, DOT_PREC=dot_precision(dt), DIAG_CAP=launch.intra_diag_cap,
        num_warps=launch.intra_warps, num_stages=launch.intra_stages,
    )
    chunk_kda_bwd_dg_kernel[(layout.NT, H)](dg, layout.cu_seqlens, layout.chunk_indices, H=H, K=K, BT=CHUNK, BK=BK,
                                           num_warps=launch.dg_warps)
    return dq_out, dk_out, dg
