"""Backward stage 2: the gradients through the states, per chunk.

With S the state entering the chunk, dS' the gradient of the state leaving it (stage 1), V_new and dV_new, and
T = (I + A)^-1 from the forward, the parts of the backward that reduce over V against S or dS':

    d(q~ exp G)        = dO S^T
    dW                 = -dV_new S^T,        d(beta K exp G) = T^T dW        (W = T (beta K exp G), T held fixed)
    d(K exp(gamma - G)) = V_new dS'^T
    dgamma             = exp(gamma) sum_v S * dS' + sum_t K exp(gamma - G) * d(K exp(gamma - G))

From there everything is element-wise in K, so one program per (chunk, head, K block of ``inter_bk`` columns) runs
the V loop in blocks of ``inter_bv`` and writes, for its K block: the partial dq~ (w.r.t. q~ = scale q), dk and
dG (gradient w.r.t. the cumulative decay, gamma's term on the last valid row), all fp32, and its share of dbeta
(sum_k d(beta K exp G) K exp G) into ``dbk`` [TT, H, NK]. The pair-matrix terms are added by stage 4 and the WY
value side by stage 3. Products with S, dS', V_new, dV_new, dO take the inputs' dtype; the product with T and the
fp32 gradients take fp32 operands (tf32 for 16-bit inputs). Rows past a chunk's end take G of its last valid row,
so exp(gamma - G) <= 1 there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_common import CHUNK
from kimi_linear.ops.triton_helpers import chunk_rows, dot, dot_precision, load_cols_at, new_buffer, store_cols_at

if TYPE_CHECKING:
    from kimi_linear.ops.kda.chunk_bwd import BwdLaunch


@triton.jit
def chunk_kda_bwd_inter_kernel(
    q, k, beta, G, Tinv, h, dh, vn, dvn, do, dq, dk, dG, dbk, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, n_rows = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
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
        b_do = load_cols_at(do, t0, n_rows, i_h, o_v, m_v, H, V, BT).to(dt)  # [BT, BV]
        b_vn = load_cols_at(vn, t0, n_rows, i_h, o_v, m_v, H, V, BT)
        b_dvn = load_cols_at(dvn, t0, n_rows, i_h, o_v, m_v, H, V, BT)
        b_dqg += dot(b_do, tl.trans(b_h), DOT_PREC)
        b_dw -= dot(b_dvn, tl.trans(b_h), DOT_PREC)
        b_dkd += dot(b_vn, tl.trans(b_dh), DOT_PREC)
        b_dgam += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)

    o_t = tl.arange(0, BT)
    b_T = load_cols_at(Tinv, t0, n_rows, i_h, o_t, o_t < BT, H, BT, BT)  # [BT, BT] fp32
    b_beta = tl.load(beta + (t0 + o_r).to(tl.int64) * H + i_h, mask=m_r, other=0.0).to(tl.float32)
    G_last = tl.load(G + ((t0 + n_rows - 1).to(tl.int64) * H + i_h) * K + o_k, mask=m_k, other=0.0)
    # rows past the chunk's end take G_last, so exp(G_last - G) stays <= 1 there
    b_G = tl.where(m_r[:, None], load_cols_at(G, t0, n_rows, i_h, o_k, m_k, H, K, BT), G_last[None, :])
    b_k = load_cols_at(k, t0, n_rows, i_h, o_k, m_k, H, K, BT).to(tl.float32)
    b_q = load_cols_at(q, t0, n_rows, i_h, o_k, m_k, H, K, BT).to(tl.float32) * scale
    b_eG = tl.exp(b_G)  # G <= 0 from the chunk start
    b_ed = tl.exp(G_last[None, :] - b_G)

    b_dx = dot(tl.trans(b_T), b_dw, DOT_PREC)  # [BT, BK], d(beta K exp G)
    b_kd = b_k * b_ed
    b_dq = b_dqg * b_eG
    b_dk = b_dkd * b_ed + b_dx * b_beta[:, None] * b_eG
    b_dG = b_dqg * b_q * b_eG - b_dkd * b_kd + b_dx * b_beta[:, None] * b_k * b_eG
    # gamma = G of the last valid row: exp(gamma) scales the carried state and every K exp(gamma - G) row
    b_dgam = b_dgam * tl.exp(G_last) + tl.sum(b_dkd * b_kd, 0)
    b_dG += tl.where(o_r[:, None] == n_rows - 1, b_dgam[None, :], 0.0)
    store_cols_at(dq, b_dq, t0, n_rows, i_h, o_k, m_k, H, K, BT)
    store_cols_at(dk, b_dk, t0, n_rows, i_h, o_k, m_k, H, K, BT)
    store_cols_at(dG, b_dG, t0, n_rows, i_h, o_k, m_k, H, K, BT)
    p_b = ((t0 + o_r).to(tl.int64) * H + i_h) * tl.num_programs(2) + i_k
    tl.store(dbk + p_b, tl.sum(b_dx * b_k * b_eG, 1), mask=m_r)


def bwd_through_states(q, k, beta, G, Tinv, h, dh, vn, dvn, do, scale: float, layout, launch: BwdLaunch):
    """-> (partial dq~, dk, dG ``[TT, H, K]`` fp32, dbeta shares ``[TT, H, NK]`` fp32), NK = cdiv(K, inter_bk)."""
    TT, H, K = q.shape
    V = vn.shape[-1]
    dev = q.device
    NK = triton.cdiv(K, launch.inter_bk)
    dq, dk, dG = (new_buffer(TT, H, K, device=dev, dtype=torch.float32) for _ in range(3))
    dbk = new_buffer(TT, H, NK, device=dev, dtype=torch.float32)
    chunk_kda_bwd_inter_kernel[(layout.NT, H, NK)](
        q, k, beta, G, Tinv, h, dh, vn, dvn, do, dq, dk, dG, dbk, layout.cu_seqlens, layout.chunk_indices, scale,
        H=H, K=K, V=V, BT=CHUNK, BK=launch.inter_bk, BV=launch.inter_bv, DOT_PREC=dot_precision(vn.dtype),
        num_warps=launch.inter_warps, num_stages=launch.inter_stages,
    )
    return dq, dk, dG, dbk
