"""Backward stage 3: the gradients that reduce over V only, per chunk: the output's pair matrix, the value side of
the WY factors and the UT transform.

With T = (I + A)^-1, A = beta A_kk (strictly lower), U = T (beta V), W = T (beta K exp G), V_new = U - W S:

    dA_qk     = dO V_new^T                  (lower, with the diagonal)
    d(beta V) = T^T dV_new,   dv = beta d(beta V),   dbeta += sum_v V d(beta V)
    dA        = -T^T dV_new V_new^T         (strictly lower)

The last line folds both WY factors into one product: with dU = dV_new and dW = -dV_new S^T,
dT = dU (beta V)^T + dW (beta K exp G)^T = dV_new (beta V - beta K exp(G) S)^T = dV_new ((I + A) V_new)^T, and
dA = -T^T dT T^T = -T^T dV_new V_new^T. One program per (chunk, head) runs V in blocks of ``wy_bv``; it also sums
stage 2's K-block shares of dbeta, so its dbeta is complete but for the pair-matrix term (stage 4). The products
with T and dV_new take fp32 operands (tf32 for 16-bit inputs): T steers every row of the chunk.
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
def chunk_kda_bwd_wy_kernel(
    v, beta, Tinv, vn, dvn, do, dbk, dA, dAqk, dv, dbeta, cu_seqlens, chunk_indices,
    H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, n_rows = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_r = tl.arange(0, BT)
    m_r = o_r < n_rows
    o_t = tl.arange(0, BT)
    b_T = load_cols_at(Tinv, t0, n_rows, i_h, o_t, o_t < BT, H, BT, BT)  # [BT, BT] fp32, unit lower
    b_beta = tl.load(beta + (t0 + o_r).to(tl.int64) * H + i_h, mask=m_r, other=0.0).to(tl.float32)

    b_dAqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = load_cols_at(do, t0, n_rows, i_h, o_v, m_v, H, V, BT)  # [BT, BV]
        b_vn = load_cols_at(vn, t0, n_rows, i_h, o_v, m_v, H, V, BT)
        b_dvn = load_cols_at(dvn, t0, n_rows, i_h, o_v, m_v, H, V, BT).to(tl.float32)
        b_v = load_cols_at(v, t0, n_rows, i_h, o_v, m_v, H, V, BT).to(tl.float32)
        b_dAqk += dot(b_do, tl.trans(b_vn), DOT_PREC)
        b_dvb = dot(tl.trans(b_T), b_dvn, DOT_PREC)  # [BT, BV], fp32 operands: T steers every row
        b_dA -= dot(b_dvb, tl.trans(b_vn.to(tl.float32)), DOT_PREC)
        store_cols_at(dv, b_beta[:, None] * b_dvb, t0, n_rows, i_h, o_v, m_v, H, V, BT)
        b_db += tl.sum(b_v * b_dvb, 1)
    b_dA = tl.where(o_r[:, None] > o_t[None, :], b_dA, 0.0)
    b_dAqk = tl.where(o_r[:, None] >= o_t[None, :], b_dAqk, 0.0)
    store_cols_at(dA, b_dA, t0, n_rows, i_h, o_t, o_t < BT, H, BT, BT)
    store_cols_at(dAqk, b_dAqk, t0, n_rows, i_h, o_t, o_t < BT, H, BT, BT)
    p_b = (t0 + o_r).to(tl.int64) * H + i_h
    for i_k in tl.static_range(NK):
        b_db += tl.load(dbk + p_b * NK + i_k, mask=m_r, other=0.0)
    tl.store(dbeta + p_b, b_db, mask=m_r)


def bwd_wy(v, beta, Tinv, vn, dvn, do, dbk, layout, launch: BwdLaunch):
    """-> (dA, dA_qk ``[TT, H, CHUNK]`` fp32, dv ``[TT, H, V]`` in v's dtype, dbeta but the pair term ``[TT, H]``
    fp32). ``dbk`` [TT, H, NK]: stage 2's shares of dbeta."""
    TT, H, V = v.shape
    dev = v.device
    dA, dAqk = (new_buffer(TT, H, CHUNK, device=dev, dtype=torch.float32) for _ in range(2))
    dv = new_buffer(TT, H, V, device=dev, dtype=v.dtype)
    db = new_buffer(TT, H, device=dev, dtype=torch.float32)
    chunk_kda_bwd_wy_kernel[(layout.NT, H)](
        v, beta, Tinv, vn, dvn, do, dbk, dA, dAqk, dv, db, layout.cu_seqlens, layout.chunk_indices,
        H=H, V=V, BT=CHUNK, BV=launch.wy_bv, NK=dbk.shape[-1], DOT_PREC=dot_precision(vn.dtype),
        num_warps=launch.wy_warps, num_stages=launch.wy_stages,
    )
    return dA, dAqk, dv, db
