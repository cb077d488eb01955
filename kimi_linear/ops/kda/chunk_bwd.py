"""Triton kernels of the chunkwise KDA backward.

With the per-chunk quantities of the forward (``chunk_fwd.py``; q~ = scale q, G the cumulative decay, gamma = G of
the chunk's last row, T = (I + A)^-1 with A = beta A_kk, W = T (beta K exp G), U = T (beta V), A_qk) and the
recomputed states S (entering each chunk) and V_new:

    V_new = U - W S,   O = (q~ exp(G)) S + A_qk V_new,   S' = exp(gamma) S + (K exp(gamma - G))^T V_new

these stages run after the state recompute (``chunk_kda_fwd_state_kernel`` with ``STORE_H``):

* ``chunk_kda_bwd_dh_kernel`` — per (V block, sequence, head), chunks in reverse: with dS' the gradient of the state
  leaving the chunk, dV_new = A_qk^T dO + (K exp(gamma - G)) dS' and
  dS = exp(gamma) dS' + (q~ exp(G))^T dO - W^T dV_new. Writes dS' per chunk, dV_new, and dS of the first chunk (dh0).
* ``chunk_kda_bwd_inter_kernel`` — per (chunk, head, K block): the parts that touch S and dS', reduced over V:
  d(q~ exp G) = dO S^T, dW = -dV_new S^T, d(K exp(gamma - G)) = V_new dS'^T, dgamma; then d(beta K exp G) = T^T dW.
  Element-wise in K from there on, so it writes the partial dq~, dk, dG (fp32) of its K block and its share of dbeta.
* ``chunk_kda_bwd_wy_kernel`` — per (chunk, head): the parts that reduce over V only: dA_qk = dO V_new^T,
  d(beta V) = T^T dV_new (-> dv), and the UT-transform gradient in one product, dA = -T^T dV_new V_new^T (the two
  WY factors' terms dU (beta V)^T + dW (beta K exp G)^T combine into dV_new ((I + A) V_new)^T; see the kernel).
* ``chunk_kda_bwd_intra_kernel`` — per (chunk, head, sub-block): the gradients through the pair matrices A_kk and
  A_qk with the forward's decay routing through a reference row, giving the final dq, dk, dbeta and dG;
  ``chunk_kda_bwd_dg_kernel`` then takes dg as the reverse cumulative sum of dG inside the chunk.

Products take 16-bit operands where the inputs are 16-bit (states, V_new, dV_new, dO) with fp32 accumulation; the
products with T and the fp32 gradients take fp32 operands (tf32 for 16-bit inputs, full fp32 for fp32 inputs).
Numerics as in the forward: G fp32, only differences <= 0 are exponentiated. Launch settings: ``bwd_launch``.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_common import (
    CHUNK,
    CONFIG,
    SUB_CHUNK,
    _bv,
    launch_fitting,
    state_stages,
)
from kimi_linear.ops.kda.chunk_fwd import (
    _dot,
    _load_block,
    _load_G,
    _load_last,
    _load_row,
    _load_rows,
    _load_rows_raw,
    _load_vec,
    _store_rows,
    _tile,
    chunk_kda_fwd_state_kernel,
)
from kimi_linear.ops.triton_helpers import dot_precision, interpreting, new_buffer, pad_dim

@dataclasses.dataclass(frozen=True)
class BwdLaunch:
    """Launch settings of the backward's kernels (the state recompute takes the forward's). Blocks are in elements;
    ``*_warps`` / ``*_stages`` are Triton's num_warps / num_stages."""

    dh_bv: int  # V block of the reverse state pass: N * H * V / dh_bv programs
    dh_warps: int
    dh_stages: int  # its prefetch depth; launch_fitting steps down where it does not fit (K = 256, fp32)
    inter_bk: int  # K block of the state-gradient stage: one program per (chunk, head, K block)
    inter_bv: int  # its V block
    inter_warps: int  # 4 spill
    inter_stages: int
    wy_bv: int  # V block of the WY / UT stage
    wy_warps: int
    wy_stages: int
    intra_warps: int  # pair-matrix stage, one program per (chunk, head, sub-block)
    intra_stages: int
    dg_warps: int  # reverse cumulative sum of dg


def bwd_launch(K: int, V: int, dtype: torch.dtype) -> BwdLaunch:
    """The shipped launch settings for head sizes K, V and input dtype ``dtype``. Blocks are clipped to the padded
    head size; fp32 inputs take half the V block in the state-gradient and WY stages (their operands take twice the
    shared memory)."""
    BK, BV = pad_dim(K), pad_dim(V)
    halve = 2 if dtype == torch.float32 else 1
    return BwdLaunch(
        dh_bv=min(BV, 32), dh_warps=4, dh_stages=3,
        inter_bk=min(BK, 64), inter_bv=min(BV, 64 // halve), inter_warps=8, inter_stages=2,
        wy_bv=min(BV, 64 // halve), wy_warps=4, wy_stages=2,
        intra_warps=8, intra_stages=1,
        dg_warps=4,
    )


@triton.jit
def _bwd_dh_step(dS, i_t, bos, eos, c0, i_h, qg, kd, w, G, Aqk, do, dh_out, dvn_out, o_v, m_kv, o_kv,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, DOT_PREC: tl.constexpr):
    """One chunk of the reverse pass: takes dS' (leaving chunk i_t), returns dS (entering it)."""
    dt = w.dtype.element_ty
    t0 = bos + i_t * BT
    n_rows = tl.minimum(eos - t0, BT)
    o_r = tl.arange(0, BT)
    m_tv = (o_r < n_rows)[:, None] & (o_v < V)[None, :]
    tl.store(dh_out + ((c0 + i_t) * H + i_h) * K * V + o_kv, dS.to(dh_out.dtype.element_ty), mask=m_kv)
    b_do = tl.load(_tile(do, t0, i_h, o_v, H, V, BT), mask=m_tv, other=0.0).to(dt)  # [BT, BV]
    b_A = _load_rows_raw(Aqk, t0, n_rows, i_h, H, BT, BT, BT)  # [BT, BT]
    b_kd = _load_rows_raw(kd, t0, n_rows, i_h, H, K, BT, BK)
    b_qg = _load_rows_raw(qg, t0, n_rows, i_h, H, K, BT, BK)
    b_w = _load_rows_raw(w, t0, n_rows, i_h, H, K, BT, BK)
    b_dvn = _dot(tl.trans(b_A), b_do, DOT_PREC) + _dot(b_kd, dS.to(dt), DOT_PREC)
    tl.store(_tile(dvn_out, t0, i_h, o_v, H, V, BT), b_dvn.to(dvn_out.dtype.element_ty), mask=m_tv)
    G_last = _load_last(G, t0, n_rows, i_h, H, K, BK)
    dS = dS * tl.exp(G_last)[:, None]
    dS += _dot(tl.trans(b_qg), b_do, DOT_PREC)
    dS -= _dot(tl.trans(b_w), b_dvn.to(dt), DOT_PREC)
    return dS


@triton.jit
def chunk_kda_bwd_dh_kernel(
    qg, kd, w, G, Aqk, do, dht, dh_out, dvn_out, dh0, cu_seqlens, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
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
    o_kv = o_k[:, None] * V + o_v[None, :]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + (i_n * H + i_h) * K * V + o_kv, mask=m_kv, other=0.0)

    if INTERPRET:  # the interpreter cannot take a run-time bound in range()
        i_t = n_chunks - 1
        while i_t >= 0:
            dS = _bwd_dh_step(dS, i_t, bos, eos, c0, i_h, qg, kd, w, G, Aqk, do, dh_out, dvn_out, o_v, m_kv, o_kv,
                              H, K, V, BT, BK, BV, DOT_PREC)
            i_t -= 1
    else:
        for i in range(n_chunks):
            dS = _bwd_dh_step(dS, n_chunks - 1 - i, bos, eos, c0, i_h, qg, kd, w, G, Aqk, do, dh_out, dvn_out,
                              o_v, m_kv, o_kv, H, K, V, BT, BK, BV, DOT_PREC)

    if STORE_DH0:
        tl.store(dh0 + (i_n * H + i_h) * K * V + o_kv, dS, mask=m_kv)


@triton.jit
def _cols_tile(ptr, t0, n_rows, i_h, o_d, m_d, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr):
    """Rows [0, BR) and columns o_d of a chunk of ``ptr`` [T_total, H, D], in the stored dtype; zero where the rows
    pass the chunk's end or m_d is false."""
    o_r = tl.arange(0, BR)
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    return tl.load(p, mask=(o_r < n_rows)[:, None] & m_d[None, :], other=0.0)


@triton.jit
def _put_cols_tile(ptr, x, t0, n_rows, i_h, o_d, m_d, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr):
    o_r = tl.arange(0, BR)
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=(o_r < n_rows)[:, None] & m_d[None, :])


@triton.jit
def _chunk_bounds(cu_seqlens, chunk_indices, i_c, BT: tl.constexpr):
    """First packed row of chunk i_c and its number of valid rows."""
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT
    return t0, tl.minimum(eos - t0, BT)


@triton.jit
def chunk_kda_bwd_wy_kernel(
    v, beta, Tinv, vn, dvn, do, dbk, dA, dAqk, dv, dbeta, cu_seqlens, chunk_indices,
    H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """The parts that reduce over V, one program per (chunk, head), V in blocks of BV:
    dA_qk = dO V_new^T (lower), d(beta V) = T^T dV_new (dv = beta d(beta V)), and the gradient of the strictly lower
    A = beta A_kk through the UT transform, dA = -T^T dV_new V_new^T.

    That last form folds the two WY factors into one product: with dW = -dV_new S^T and dU = dV_new,
    dT = dU (beta V)^T + dW (beta K exp G)^T = dV_new (beta V - beta K exp(G) S)^T = dV_new ((I + A) V_new)^T, so
    dA = -T^T dT T^T = -T^T dV_new V_new^T. dbeta = sum_v V d(beta V) plus the K-block partials
    of ``chunk_kda_bwd_inter_kernel`` (which runs first), ``dbk`` [TT, H, NK].
    """
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, n_rows = _chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
    o_r = tl.arange(0, BT)
    m_r = o_r < n_rows
    o_t = tl.arange(0, BT)
    b_T = _cols_tile(Tinv, t0, n_rows, i_h, o_t, o_t < BT, H, BT, BT)  # [BT, BT] fp32, unit lower
    b_beta = tl.load(beta + (t0 + o_r).to(tl.int64) * H + i_h, mask=m_r, other=0.0).to(tl.float32)

    b_dAqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = _cols_tile(do, t0, n_rows, i_h, o_v, m_v, H, V, BT)  # [BT, BV]
        b_vn = _cols_tile(vn, t0, n_rows, i_h, o_v, m_v, H, V, BT)
        b_dvn = _cols_tile(dvn, t0, n_rows, i_h, o_v, m_v, H, V, BT).to(tl.float32)
        b_v = _cols_tile(v, t0, n_rows, i_h, o_v, m_v, H, V, BT).to(tl.float32)
        b_dAqk += _dot(b_do, tl.trans(b_vn), DOT_PREC)
        b_dvb = _dot(tl.trans(b_T), b_dvn, DOT_PREC)  # [BT, BV], fp32 operands: T steers every row
        b_dA -= _dot(b_dvb, tl.trans(b_vn.to(tl.float32)), DOT_PREC)
        _put_cols_tile(dv, b_beta[:, None] * b_dvb, t0, n_rows, i_h, o_v, m_v, H, V, BT)
        b_db += tl.sum(b_v * b_dvb, 1)
    b_dA = tl.where(o_r[:, None] > o_t[None, :], b_dA, 0.0)
    b_dAqk = tl.where(o_r[:, None] >= o_t[None, :], b_dAqk, 0.0)
    _put_cols_tile(dA, b_dA, t0, n_rows, i_h, o_t, o_t < BT, H, BT, BT)
    _put_cols_tile(dAqk, b_dAqk, t0, n_rows, i_h, o_t, o_t < BT, H, BT, BT)
    p_b = (t0 + o_r).to(tl.int64) * H + i_h
    for i_k in tl.static_range(NK):
        b_db += tl.load(dbk + p_b * NK + i_k, mask=m_r, other=0.0)
    tl.store(dbeta + p_b, b_db, mask=m_r)


@triton.jit
def chunk_kda_bwd_inter_kernel(
    q, k, beta, G, Tinv, h, dh, vn, dvn, do, dq, dk, dG, dbk, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The parts that touch the state, one program per (chunk, head, K block of BK columns), V in blocks of BV:
    d(q~ exp G) = dO S^T, dW = -dV_new S^T, d(K exp(gamma - G)) = V_new dS'^T, dgamma = exp(gamma) sum_v S dS' (+ the
    K exp(gamma - G) term), and W = T (beta K exp G) backward: d(beta K exp G) = T^T dW. Everything here is
    element-wise in K once the V reductions are done, so K blocks are independent. Writes the partial dq~, dk, dG
    (fp32; the intra stage adds the pair-matrix terms) and this K block's share of dbeta into ``dbk`` [TT, H, NK].
    """
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, n_rows = _chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
    dt = vn.dtype.element_ty
    o_r = tl.arange(0, BT)
    m_r = o_r < n_rows
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    h_base = (i_c.to(tl.int64) * H + i_h) * K * V

    b_dqg = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkd = tl.zeros([BT, BK], dtype=tl.float32)
    b_dgam = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        p_kv = h_base + o_k[:, None] * V + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_h = tl.load(h + p_kv, mask=m_kv, other=0.0)  # [BK, BV], the state entering the chunk
        b_dh = tl.load(dh + p_kv, mask=m_kv, other=0.0)  # the gradient of the state leaving it
        b_do = _cols_tile(do, t0, n_rows, i_h, o_v, m_v, H, V, BT).to(dt)  # [BT, BV]
        b_vn = _cols_tile(vn, t0, n_rows, i_h, o_v, m_v, H, V, BT)
        b_dvn = _cols_tile(dvn, t0, n_rows, i_h, o_v, m_v, H, V, BT)
        b_dqg += _dot(b_do, tl.trans(b_h), DOT_PREC)
        b_dw -= _dot(b_dvn, tl.trans(b_h), DOT_PREC)
        b_dkd += _dot(b_vn, tl.trans(b_dh), DOT_PREC)
        b_dgam += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)

    o_t = tl.arange(0, BT)
    b_T = _cols_tile(Tinv, t0, n_rows, i_h, o_t, o_t < BT, H, BT, BT)  # [BT, BT] fp32
    b_beta = tl.load(beta + (t0 + o_r).to(tl.int64) * H + i_h, mask=m_r, other=0.0).to(tl.float32)
    G_last = tl.load(G + ((t0 + n_rows - 1).to(tl.int64) * H + i_h) * K + o_k, mask=m_k, other=0.0)
    # rows past the chunk's end take G_last, so exp(G_last - G) stays <= 1 there
    b_G = tl.where(m_r[:, None], _cols_tile(G, t0, n_rows, i_h, o_k, m_k, H, K, BT), G_last[None, :])
    b_k = _cols_tile(k, t0, n_rows, i_h, o_k, m_k, H, K, BT).to(tl.float32)
    b_q = _cols_tile(q, t0, n_rows, i_h, o_k, m_k, H, K, BT).to(tl.float32) * scale
    b_eG = tl.exp(b_G)  # G <= 0 from the chunk start
    b_ed = tl.exp(G_last[None, :] - b_G)

    b_dx = _dot(tl.trans(b_T), b_dw, DOT_PREC)  # [BT, BK], d(beta K exp G)
    b_kd = b_k * b_ed
    b_dq = b_dqg * b_eG
    b_dk = b_dkd * b_ed + b_dx * b_beta[:, None] * b_eG
    b_dG = b_dqg * b_q * b_eG - b_dkd * b_kd + b_dx * b_beta[:, None] * b_k * b_eG
    # gamma = G of the last valid row: exp(gamma) scales the carried state and every K exp(gamma - G) row
    b_dgam = b_dgam * tl.exp(G_last) + tl.sum(b_dkd * b_kd, 0)
    b_dG += tl.where(o_r[:, None] == n_rows - 1, b_dgam[None, :], 0.0)
    _put_cols_tile(dq, b_dq, t0, n_rows, i_h, o_k, m_k, H, K, BT)
    _put_cols_tile(dk, b_dk, t0, n_rows, i_h, o_k, m_k, H, K, BT)
    _put_cols_tile(dG, b_dG, t0, n_rows, i_h, o_k, m_k, H, K, BT)
    p_b = ((t0 + o_r).to(tl.int64) * H + i_h) * tl.num_programs(2) + i_k
    tl.store(dbk + p_b, tl.sum(b_dx * b_k * b_eG, 1), mask=m_r)


@triton.jit
def _bwd_intra_diag_loops(acc_q, acc_r, acc_c, q, k, beta, G, dA, dAqk, G_a, t0, r_a, n_rows, i_h, scale,
                          H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """The pairs inside sub-block a (rows r_a..) of ``_bwd_intra_block``, element-wise: adds to dq~ (acc_q), to
    r (acc_r, before beta) and to the column side (acc_c). Each exponent is clamped at 0, so any g is safe."""
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
def _bwd_intra_block(a, q, k, beta, G, dq, dk, dG, dA, dAqk, dbeta, t0, n_rows, G_last, i_h, scale,
                     H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    """Sub-block a of a chunk: its final dq~, dk, dbeta and dG (before the reverse cumulative sum).

    Sub-blocks past the chunk's end read zeros, their G is the last valid row's, and produce zeros.
    """
    r_a = a * BC
    q_a = _load_rows(q, t0, r_a, n_rows, i_h, H, K, BC, BK) * scale
    k_a = _load_rows(k, t0, r_a, n_rows, i_h, H, K, BC, BK)
    G_a = _load_G(G, t0, r_a, n_rows, G_last, i_h, H, K, BC, BK)
    b_a = _load_vec(beta, t0, r_a, n_rows, i_h, H, BC)
    Gr_a = tl.where(r_a < n_rows, _load_row(G, t0, r_a, n_rows, i_h, H, K, BK), G_last)  # block a's first row

    # rows of block a against columns of earlier blocks b, through the reference row of a
    acc_q = tl.zeros([BC, BK], dtype=tl.float32)
    acc_r = tl.zeros([BC, BK], dtype=tl.float32)  # sum_i dA[t, i] k_i exp(G_t - G_i), before the beta_t factor
    for b in tl.static_range(3):
        if b < a:
            k_b = _load_rows(k, t0, b * BC, n_rows, i_h, H, K, BC, BK)
            G_b = _load_G(G, t0, b * BC, n_rows, G_last, i_h, H, K, BC, BK)
            kb = k_b * tl.exp(Gr_a[None, :] - G_b)
            acc_q += _dot(_load_block(dAqk, t0, r_a, b * BC, n_rows, i_h, H, BT, BC), kb, DOT_PREC)
            acc_r += _dot(_load_block(dA, t0, r_a, b * BC, n_rows, i_h, H, BT, BC), kb, DOT_PREC)
    e_a = tl.exp(G_a - Gr_a[None, :])
    acc_q *= e_a
    acc_r *= e_a

    # columns of block a against rows of later blocks c (A = beta A_kk, so the key side carries beta_t)
    acc_c = tl.zeros([BC, BK], dtype=tl.float32)
    for c in tl.static_range(1, 4):
        if c > a:
            q_c = _load_rows(q, t0, c * BC, n_rows, i_h, H, K, BC, BK) * scale
            k_c = _load_rows(k, t0, c * BC, n_rows, i_h, H, K, BC, BK)
            b_c = _load_vec(beta, t0, c * BC, n_rows, i_h, H, BC)
            G_c = _load_G(G, t0, c * BC, n_rows, G_last, i_h, H, K, BC, BK)
            Gr_c = tl.where(c * BC < n_rows, _load_row(G, t0, c * BC, n_rows, i_h, H, K, BK), G_last)
            e_c = tl.exp(G_c - Gr_c[None, :])
            part = _dot(tl.trans(_load_block(dA, t0, c * BC, r_a, n_rows, i_h, H, BT, BC)),
                        b_c[:, None] * k_c * e_c, DOT_PREC)
            dAqk_ca = _load_block(dAqk, t0, c * BC, r_a, n_rows, i_h, H, BT, BC)
            part += _dot(tl.trans(dAqk_ca), q_c * e_c, DOT_PREC)
            acc_c += part * tl.exp(Gr_c[None, :] - G_a)

    # inside block a
    acc_q, acc_r, acc_c = _bwd_intra_diag_loops(acc_q, acc_r, acc_c, q, k, beta, G, dA, dAqk, G_a, t0, r_a,
                                                n_rows, i_h, scale, H, K, BT, BC, BK)

    dk_row = b_a[:, None] * acc_r
    b_dq = _load_rows(dq, t0, r_a, n_rows, i_h, H, K, BC, BK) + acc_q
    b_dk = _load_rows(dk, t0, r_a, n_rows, i_h, H, K, BC, BK) + dk_row + acc_c
    b_dG = _load_rows(dG, t0, r_a, n_rows, i_h, H, K, BC, BK) + q_a * acc_q + k_a * (dk_row - acc_c)
    b_db = _load_vec(dbeta, t0, r_a, n_rows, i_h, H, BC) + tl.sum(k_a * acc_r, 1)
    return b_dq, b_dk, b_dG, b_db


@triton.jit
def chunk_kda_bwd_intra_kernel(
    q, k, beta, G, dq, dk, dG, dA, dAqk, dbeta, dq_out, dk_out, dg_out, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One program per (chunk, head, sub-block): writes dq, dk, dbeta (in place) and dG, which
    ``chunk_kda_bwd_dg_kernel`` then turns into dg."""
    i_c, i_h, a = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT
    n_rows = tl.minimum(eos - t0, BT)
    G_last = _load_last(G, t0, n_rows, i_h, H, K, BK)
    b_dq, b_dk, b_dG, b_db = _bwd_intra_block(a, q, k, beta, G, dq, dk, dG, dA, dAqk, dbeta, t0, n_rows,
                                              G_last, i_h, scale, H, K, BT, BC, BK, DOT_PREC)
    r_a = a * BC
    _store_rows(dq_out, b_dq * scale, t0, r_a, n_rows, i_h, H, K, BC, BK)
    _store_rows(dk_out, b_dk, t0, r_a, n_rows, i_h, H, K, BC, BK)
    _store_rows(dg_out, b_dG, t0, r_a, n_rows, i_h, H, K, BC, BK)
    o_a = r_a + tl.arange(0, BC)
    tl.store(dbeta + (t0 + o_a).to(tl.int64) * H + i_h, b_db, mask=o_a < n_rows)


@triton.jit
def chunk_kda_bwd_dg_kernel(dg, cu_seqlens, chunk_indices, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                            BK: tl.constexpr):
    """In place: dg_t = sum over s >= t in the chunk of dG_s (g_t enters every later cumulative decay)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT
    n_rows = tl.minimum(eos - t0, BT)
    b_dG = _load_rows(dg, t0, 0, n_rows, i_h, H, K, BT, BK)  # [BT, BK], zero past the end
    b_dg = tl.sum(b_dG, 0)[None, :] - tl.cumsum(b_dG, 0) + b_dG
    _store_rows(dg, b_dg, t0, 0, n_rows, i_h, H, K, BT, BK)


def chunk_bwd(q, k, v, beta, saved, scale, h0, do, dht, layout, launch: BwdLaunch | None = None):
    """Backward launcher: the forward's inputs and saved intermediates, dO (and dS_T) -> dq, dk, dv, dg, dbeta, dh0.
    ``launch``: the launch settings (default ``bwd_launch(K, V, q.dtype)``)."""
    G, Aqk, Tinv, w, u, qg, kd = saved
    TT, H, K = q.shape
    V = v.shape[-1]
    BK = pad_dim(K)
    dev, dt = q.device, q.dtype
    prec = dot_precision(dt)
    NT = layout.NT
    c = launch or bwd_launch(K, V, dt)
    # states entering each chunk and the pseudo-values V_new, recomputed
    h = new_buffer(NT, H, K, V, device=dev, dtype=dt)
    vn = new_buffer(TT, H, V, device=dev, dtype=dt)
    BV = _bv(V, "state_bv")
    launch_fitting(
        chunk_kda_fwd_state_kernel, lambda bv: (triton.cdiv(V, bv), layout.N * H), BV, state_stages(dt),
        qg, kd, w, u, G, Aqk, vn, h0 if h0 is not None else vn, vn, h, vn,
        layout.cu_seqlens, layout.chunk_offsets, dtype=dt,
        H=H, K=K, V=V, BT=CHUNK, BK=BK, USE_H0=h0 is not None, STORE_HT=False, STORE_O=False,
        STORE_H=True, DOT_PREC=prec, INTERPRET=interpreting(), num_warps=CONFIG["state_warps"],
    )
    dh = new_buffer(NT, H, K, V, device=dev, dtype=dt)
    dvn = new_buffer(TT, H, V, device=dev, dtype=dt)
    dh0 = new_buffer(layout.N, H, K, V, device=dev, dtype=torch.float32) if h0 is not None else None
    launch_fitting(
        chunk_kda_bwd_dh_kernel, lambda bv: (triton.cdiv(V, bv), layout.N * H), c.dh_bv, c.dh_stages,
        qg, kd, w, G, Aqk, do, dht if dht is not None else do, dh, dvn, dh0 if dh0 is not None else do,
        layout.cu_seqlens, layout.chunk_offsets, dtype=dt,
        H=H, K=K, V=V, BT=CHUNK, BK=BK, USE_DHT=dht is not None, STORE_DH0=dh0 is not None,
        DOT_PREC=prec, INTERPRET=interpreting(), num_warps=c.dh_warps,
    )
    dv = new_buffer(TT, H, V, device=dev, dtype=v.dtype)
    db = new_buffer(TT, H, device=dev, dtype=torch.float32)
    dq_out = new_buffer(TT, H, K, device=dev, dtype=dt)
    dk_out = new_buffer(TT, H, K, device=dev, dtype=dt)
    dg = new_buffer(TT, H, K, device=dev, dtype=torch.float32)
    if NT > 0:
        dq = new_buffer(TT, H, K, device=dev, dtype=torch.float32)
        dk = new_buffer(TT, H, K, device=dev, dtype=torch.float32)
        dG = new_buffer(TT, H, K, device=dev, dtype=torch.float32)
        dA = new_buffer(TT, H, CHUNK, device=dev, dtype=torch.float32)
        dAqk = new_buffer(TT, H, CHUNK, device=dev, dtype=torch.float32)
        NK = triton.cdiv(K, c.inter_bk)
        dbk = new_buffer(TT, H, NK, device=dev, dtype=torch.float32)
        chunk_kda_bwd_inter_kernel[(NT, H, NK)](
            q, k, beta, G, Tinv, h, dh, vn, dvn, do, dq, dk, dG, dbk, layout.cu_seqlens, layout.chunk_indices,
            scale, H=H, K=K, V=V, BT=CHUNK, BK=c.inter_bk, BV=c.inter_bv,
            DOT_PREC=prec, num_warps=c.inter_warps, num_stages=c.inter_stages,
        )
        chunk_kda_bwd_wy_kernel[(NT, H)](
            v, beta, Tinv, vn, dvn, do, dbk, dA, dAqk, dv, db, layout.cu_seqlens, layout.chunk_indices,
            H=H, V=V, BT=CHUNK, BV=c.wy_bv, NK=NK, DOT_PREC=prec,
            num_warps=c.wy_warps, num_stages=c.wy_stages,
        )
        chunk_kda_bwd_intra_kernel[(NT, H, CHUNK // SUB_CHUNK)](
            q, k, beta, G, dq, dk, dG, dA, dAqk, db, dq_out, dk_out, dg,
            layout.cu_seqlens, layout.chunk_indices, scale,
            H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, DOT_PREC=prec,
            num_warps=c.intra_warps, num_stages=c.intra_stages,
        )
        chunk_kda_bwd_dg_kernel[(NT, H)](dg, layout.cu_seqlens, layout.chunk_indices, H=H, K=K, BT=CHUNK, BK=BK,
                                         num_warps=c.dg_warps)
    return dq_out, dk_out, dv, dg, db, dh0


def sm90_build_jobs(H: int, K: int, V: int, launch: BwdLaunch | None = None) -> list:
    """(kernel, constexprs, num_warps, num_stages) as the launcher uses them (16-bit inputs unless ``launch`` says
    otherwise), for ``benchmarks/kda_chunk_build.py``."""
    c = launch or bwd_launch(K, V, torch.bfloat16)
    BK = pad_dim(K)
    common = dict(H=H, K=K, V=V, BT=CHUNK, BK=BK, DOT_PREC="tf32")
    return [
        (chunk_kda_bwd_dh_kernel, dict(common, BV=c.dh_bv, USE_DHT=True, STORE_DH0=True, INTERPRET=False),
         c.dh_warps, c.dh_stages),
        (chunk_kda_bwd_inter_kernel, dict(common, BK=c.inter_bk, BV=c.inter_bv), c.inter_warps, c.inter_stages),
        (chunk_kda_bwd_wy_kernel, dict(H=H, V=V, BT=CHUNK, BV=c.wy_bv, NK=triton.cdiv(K, c.inter_bk),
                                       DOT_PREC="tf32"), c.wy_warps, c.wy_stages),
        (chunk_kda_bwd_intra_kernel, dict(H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, DOT_PREC="tf32"), c.intra_warps,
         c.intra_stages),
        (chunk_kda_bwd_dg_kernel, dict(H=H, K=K, BT=CHUNK, BK=BK), c.dg_warps, 1),
    ]
