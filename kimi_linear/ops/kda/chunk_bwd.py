"""Triton kernels of the chunkwise KDA backward.

With the per-chunk quantities of the forward (``chunk_fwd.py``; q~ = scale q, G the cumulative decay, gamma = G of
the chunk's last row, T = (I + A)^-1, W, U, A_qk) and the recomputed states S (entering each chunk) and V_new:

    V_new = U - W S,   O = (q~ exp(G)) S + A_qk V_new,   S' = exp(gamma) S + (K exp(gamma - G))^T V_new

three stages run:

* ``chunk_kda_bwd_dh_kernel`` — per (V block, sequence, head), chunks in reverse: with dS' the gradient of the state
  leaving the chunk, dV_new = A_qk^T dO + (K exp(gamma - G)) dS' and
  dS = exp(gamma) dS' + (q~ exp(G))^T dO - W^T dV_new. Writes dS' per chunk, dV_new, and dS of the first chunk (dh0).
* ``chunk_kda_bwd_inter_kernel`` — per (chunk, head), over V blocks: the parts that touch S, dS', V_new, dV_new:
  d(q~ exp G) = dO S^T, dW = -dV_new S^T, d(K exp(gamma - G)) = V_new dS'^T, dA_qk = dO V_new^T,
  dgamma += exp(gamma) sum_v S dS'; then the WY backward (dU = dV_new): d(beta V) = T^T dU,
  d(beta K exp G) = T^T dW, dT = dW (beta K exp G)^T + dU (beta V)^T, dA = -T^T dT T^T (strictly lower).
  Writes dv and partial dq~, dk, dG, dbeta (fp32), and dA, dA_qk for the next stage.
* ``chunk_kda_bwd_intra_kernel`` — per (chunk, head), sub-block by sub-block from the last: the gradients through
  the pair matrices A_kk (with A = beta A_kk) and A_qk — the same decay routing through a reference row as the
  forward — then dg as the reverse cumulative sum of dG inside the chunk.
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
from kimi_linear.ops.kda.chunk_fwd import (
    _dot,
    _load_block,
    _load_G,
    _load_last,
    _load_row,
    _load_rows,
    _load_rows_raw,
    _load_vec,
    _store_block,
    _store_rows,
    _tile,
    chunk_kda_fwd_state_kernel,
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
def chunk_kda_bwd_inter_kernel(
    q, k, v, beta, G, Tinv, h, dh, vn, dvn, do, dq, dk, dG, dA, dAqk, dv, dbeta, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT
    n_rows = tl.minimum(eos - t0, BT)
    dt = v.dtype.element_ty

    o_r = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_r = o_r < n_rows
    b_T = _load_block(Tinv, t0, 0, 0, n_rows, i_h, H, BT, BT)  # [BT, BT] unit lower
    b_beta = _load_vec(beta, t0, 0, n_rows, i_h, H, BT)
    h_base = (i_c.to(tl.int64) * H + i_h) * K * V

    b_dqg = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkd = tl.zeros([BT, BK], dtype=tl.float32)
    b_dAqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    b_dgam = tl.zeros([BK], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_r[:, None] & m_v[None, :]
        m_kv = (o_k < K)[:, None] & m_v[None, :]
        p_kv = h_base + o_k[:, None] * V + o_v[None, :]
        b_h = tl.load(h + p_kv, mask=m_kv, other=0.0)  # [BK, BV], state entering the chunk
        b_dh = tl.load(dh + p_kv, mask=m_kv, other=0.0)  # gradient of the state leaving it
        b_vn = tl.load(_tile(vn, t0, i_h, o_v, H, V, BT), mask=m_tv, other=0.0)
        b_dvn = tl.load(_tile(dvn, t0, i_h, o_v, H, V, BT), mask=m_tv, other=0.0)
        b_do = tl.load(_tile(do, t0, i_h, o_v, H, V, BT), mask=m_tv, other=0.0).to(dt)
        b_v = tl.load(_tile(v, t0, i_h, o_v, H, V, BT), mask=m_tv, other=0.0).to(tl.float32)

        b_dqg += _dot(b_do, tl.trans(b_h.to(dt)), DOT_PREC)
        b_dw -= _dot(b_dvn.to(dt), tl.trans(b_h.to(dt)), DOT_PREC)
        b_dkd += _dot(b_vn.to(dt), tl.trans(b_dh.to(dt)), DOT_PREC)
        b_dAqk += _dot(b_do, tl.trans(b_vn.to(dt)), DOT_PREC)
        b_dgam += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)

        # U = T (beta V): d(beta V) = T^T dU with dU = dV_new
        b_dvb = _dot(tl.trans(b_T), b_dvn.to(tl.float32), DOT_PREC)  # [BT, BV]
        tl.store(_tile(dv, t0, i_h, o_v, H, V, BT), (b_beta[:, None] * b_dvb).to(dv.dtype.element_ty),
                 mask=m_tv)
        b_db += tl.sum(b_v * b_dvb, 1)
        b_dT += _dot(b_dvn.to(tl.float32), tl.trans(b_beta[:, None] * b_v), DOT_PREC)

    G_last = _load_last(G, t0, n_rows, i_h, H, K, BK)
    b_G = _load_G(G, t0, 0, n_rows, G_last, i_h, H, K, BT, BK)
    b_k = _load_rows(k, t0, 0, n_rows, i_h, H, K, BT, BK)
    b_q = _load_rows(q, t0, 0, n_rows, i_h, H, K, BT, BK) * scale
    b_eG = tl.exp(b_G)
    b_ed = tl.exp(G_last[None, :] - b_G)

    # W = T (beta K exp G)
    b_x = b_beta[:, None] * b_k * b_eG
    b_dx = _dot(tl.trans(b_T), b_dw, DOT_PREC)  # [BT, BK]
    b_dT += _dot(b_dw, tl.trans(b_x), DOT_PREC)
    b_dA = -_dot(_dot(tl.trans(b_T), b_dT, "ieee"), tl.trans(b_T), "ieee")
    b_dA = tl.where(o_r[:, None] > o_r[None, :], b_dA, 0.0)
    b_dAqk = tl.where(o_r[:, None] >= o_r[None, :], b_dAqk, 0.0)

    b_dq = b_dqg * b_eG
    b_dk = b_dkd * b_ed + b_dx * b_beta[:, None] * b_eG
    b_kd = b_k * b_ed
    b_dG = b_dqg * b_q * b_eG - b_dkd * b_kd + b_dx * b_x
    # gamma = G of the last valid row: exp(gamma) scales the carried state and every K exp(gamma - G) row
    b_dgam = b_dgam * tl.exp(G_last) + tl.sum(b_dkd * b_kd, 0)
    b_dG += tl.where(o_r[:, None] == n_rows - 1, b_dgam[None, :], 0.0)
    b_db += tl.sum(b_dx * b_k * b_eG, 1)

    _store_rows(dq, b_dq, t0, 0, n_rows, i_h, H, K, BT, BK)
    _store_rows(dk, b_dk, t0, 0, n_rows, i_h, H, K, BT, BK)
    _store_rows(dG, b_dG, t0, 0, n_rows, i_h, H, K, BT, BK)
    _store_block(dA, b_dA, t0, 0, 0, n_rows, i_h, H, BT, BT)
    _store_block(dAqk, b_dAqk, t0, 0, 0, n_rows, i_h, H, BT, BT)
    tl.store(dbeta + (t0 + o_r).to(tl.int64) * H + i_h, b_db, mask=m_r)


@triton.jit
def _bwd_intra_block(a, q, k, beta, G, dq, dk, dG, dA, dAqk, dbeta, t0, n_rows, G_last, i_h, scale,
                     H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    """Sub-block a of a chunk: its final dq~, dk, dbeta and dG (before the reverse cumulative sum).

    Sub-blocks past the chunk's end read zeros, their G is the last valid row's, and produce zeros.
    """
    o_c = tl.arange(0, BC)
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

    # inside block a, element-wise. Two loops, each reading one row (or column) of the operands from memory
    # per step and updating whole [BC, BK] tiles, so that nothing is reduced across rows.
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
    DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    """Without SPLIT: one program per (chunk, head) walks the four sub-blocks from the last, carrying the reverse
    cumulative sum, and writes dg. With SPLIT: one program per (chunk, head, sub-block), four times the
    parallelism; it writes dG, and ``chunk_kda_bwd_dg_kernel`` turns it into dg."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT
    n_rows = tl.minimum(eos - t0, BT)
    o_c = tl.arange(0, BC)
    G_last = _load_last(G, t0, n_rows, i_h, H, K, BK)

    if SPLIT:
        a = tl.program_id(2)
        b_dq, b_dk, b_dG, b_db = _bwd_intra_block(a, q, k, beta, G, dq, dk, dG, dA, dAqk, dbeta, t0, n_rows,
                                                  G_last, i_h, scale, H, K, BT, BC, BK, DOT_PREC)
        r_a = a * BC
        _store_rows(dq_out, b_dq * scale, t0, r_a, n_rows, i_h, H, K, BC, BK)
        _store_rows(dk_out, b_dk, t0, r_a, n_rows, i_h, H, K, BC, BK)
        _store_rows(dg_out, b_dG, t0, r_a, n_rows, i_h, H, K, BC, BK)
        o_a = r_a + o_c
        tl.store(dbeta + (t0 + o_a).to(tl.int64) * H + i_h, b_db, mask=o_a < n_rows)
    else:
        carry = tl.zeros([BK], dtype=tl.float32)  # sum of dG over the later sub-blocks of the chunk
        # static bounds: BT = 4 BC, and the interpreter rejects run-time bounds in range()
        for i in tl.static_range(4):
            a = 3 - i
            b_dq, b_dk, b_dG, b_db = _bwd_intra_block(a, q, k, beta, G, dq, dk, dG, dA, dAqk, dbeta, t0, n_rows,
                                                      G_last, i_h, scale, H, K, BT, BC, BK, DOT_PREC)
            r_a = a * BC
            # g_t contributes to every G_s with s >= t in the chunk
            tot = tl.sum(b_dG, 0)
            b_dg = tot[None, :] - tl.cumsum(b_dG, 0) + b_dG + carry[None, :]
            carry += tot
            _store_rows(dq_out, b_dq * scale, t0, r_a, n_rows, i_h, H, K, BC, BK)
            _store_rows(dk_out, b_dk, t0, r_a, n_rows, i_h, H, K, BC, BK)
            _store_rows(dg_out, b_dg, t0, r_a, n_rows, i_h, H, K, BC, BK)
            o_a = r_a + o_c
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


def chunk_bwd(q, k, v, beta, saved, scale, h0, do, dht, layout):
    """Backward launcher: the forward's inputs and saved intermediates, dO (and dS_T) -> dq, dk, dv, dg, dbeta, dh0."""
    G, Aqk, Tinv, w, u, qg, kd = saved
    TT, H, K = q.shape
    V = v.shape[-1]
    BK = _pad_dim(K)
    dev, dt = q.device, q.dtype
    prec = _dot_precision(dt)
    NT = layout.NT
    # states entering each chunk and the pseudo-values V_new, recomputed
    h = _empty(NT, H, K, V, device=dev, dtype=dt)
    vn = _empty(TT, H, V, device=dev, dtype=dt)
    BV = _bv(V, "state_bv")
    chunk_kda_fwd_state_kernel[(triton.cdiv(V, BV), layout.N * H)](
        qg, kd, w, u, G, Aqk, vn, h0 if h0 is not None else vn, vn, h, vn,
        layout.cu_seqlens, layout.chunk_offsets,
        H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, USE_H0=h0 is not None, STORE_HT=False, STORE_O=False,
        STORE_H=True, DOT_PREC=prec, INTERPRET=_interpreting(), num_warps=CONFIG["state_warps"],
        num_stages=CONFIG["state_stages"],
    )
    dh = _empty(NT, H, K, V, device=dev, dtype=dt)
    dvn = _empty(TT, H, V, device=dev, dtype=dt)
    dh0 = _empty(layout.N, H, K, V, device=dev, dtype=torch.float32) if h0 is not None else None
    BV = _bv(V, "dh_bv")
    chunk_kda_bwd_dh_kernel[(triton.cdiv(V, BV), layout.N * H)](
        qg, kd, w, G, Aqk, do, dht if dht is not None else do, dh, dvn, dh0 if dh0 is not None else do,
        layout.cu_seqlens, layout.chunk_offsets,
        H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, USE_DHT=dht is not None, STORE_DH0=dh0 is not None,
        DOT_PREC=prec, INTERPRET=_interpreting(), num_warps=CONFIG["dh_warps"], num_stages=CONFIG["dh_stages"],
    )
    dv = _empty(TT, H, V, device=dev, dtype=v.dtype)
    db = _empty(TT, H, device=dev, dtype=torch.float32)
    dq_out = _empty(TT, H, K, device=dev, dtype=dt)
    dk_out = _empty(TT, H, K, device=dev, dtype=dt)
    dg = _empty(TT, H, K, device=dev, dtype=torch.float32)
    if NT > 0:
        dq = _empty(TT, H, K, device=dev, dtype=torch.float32)
        dk = _empty(TT, H, K, device=dev, dtype=torch.float32)
        dG = _empty(TT, H, K, device=dev, dtype=torch.float32)
        dA = _empty(TT, H, CHUNK, device=dev, dtype=torch.float32)
        dAqk = _empty(TT, H, CHUNK, device=dev, dtype=torch.float32)
        # fp32 operands take twice the shared memory of 16-bit ones
        inter_bv = _bv(V, "inter_bv") if dt != torch.float32 else min(_bv(V, "inter_bv"), 32)
        chunk_kda_bwd_inter_kernel[(NT, H)](
            q, k, v, beta, G, Tinv, h, dh, vn, dvn, do, dq, dk, dG, dA, dAqk, dv, db,
            layout.cu_seqlens, layout.chunk_indices, scale,
            H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=inter_bv, DOT_PREC=prec,
            num_warps=CONFIG["inter_warps"], num_stages=CONFIG["inter_stages"],
        )
        split = CONFIG["bwd_intra_split"]
        chunk_kda_bwd_intra_kernel[(NT, H, CHUNK // SUB_CHUNK if split else 1)](
            q, k, beta, G, dq, dk, dG, dA, dAqk, db, dq_out, dk_out, dg,
            layout.cu_seqlens, layout.chunk_indices, scale,
            H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, DOT_PREC=prec, SPLIT=split,
            num_warps=CONFIG["bwd_intra_warps"], num_stages=CONFIG["bwd_intra_stages"],
        )
        if split:
            chunk_kda_bwd_dg_kernel[(NT, H)](dg, layout.cu_seqlens, layout.chunk_indices, H=H, K=K, BT=CHUNK, BK=BK,
                                             num_warps=4)
    return dq_out, dk_out, dv, dg, db, dh0


def sm90_build_jobs(H: int, K: int, V: int) -> list:
    """(kernel, constexprs, num_warps, num_stages) as the launcher uses them, for ``benchmarks/kda_chunk_build.py``."""
    c = CONFIG
    BK, BVf = _pad_dim(K), _pad_dim(V)
    common = dict(H=H, K=K, V=V, BT=CHUNK, BK=BK, DOT_PREC="tf32")
    return [
        (chunk_kda_bwd_dh_kernel, dict(common, BV=min(BVf, c["dh_bv"]), USE_DHT=True, STORE_DH0=True,
                                       INTERPRET=False), c["dh_warps"], c["dh_stages"]),
        (chunk_kda_bwd_inter_kernel, dict(common, BV=min(BVf, c["inter_bv"])), c["inter_warps"], c["inter_stages"]),
        (chunk_kda_bwd_intra_kernel, dict(H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, DOT_PREC="tf32",
                                          SPLIT=c["bwd_intra_split"]), c["bwd_intra_warps"], c["bwd_intra_stages"]),
        (chunk_kda_bwd_dg_kernel, dict(H=H, K=K, BT=CHUNK, BK=BK), 4, 1),
    ]
