"""The intra-chunk pair stage of chunkwise KDA (paper §3.1): cumulative decays and the pair matrices.

Per chunk of BT = 64 rows (four sub-blocks of BC = 16), with G the chunk-local cumulative sum of the log-decay g:

    A_kk[t, s] = sum_c k_t k_s exp(G_t - G_s)  (s < t),      A_qk[t, s] = sum_c q_t k_s exp(G_t - G_s)  (s <= t)

stored as beta_t A_kk (fp32, into the buffer the UT solve then turns into T) and scale A_qk (inputs' dtype). Three
kernels:

* ``chunk_kda_fwd_cumsum_kernel`` — G per (chunk, head, K block), fp32; in the backward (``decay_operands``) also
  the state pass's operands below, which the forward's autograd does not keep.
* ``chunk_kda_fwd_offdiag_kernel`` — per (chunk, head), every block of both matrices as [BT, BKS] x [BKS, BT]
  tensor-core dots over K slices, one decay reference per column block (below); it also writes the state pass's
  operands scale q exp(G) and K exp(G_last - G) from the tiles it holds, and flags the diagonal blocks whose decay
  range passed the cap.
* ``chunk_kda_fwd_diag_token_kernel`` — the flagged diagonal blocks again, element-wise (one program per block and
  head; the others return after one load).

Numerics. With d_j the last row of sub-block j (d_3 the chunk's last valid row), for s in block j and t at or below
it, exp(G_t - G_s) = exp(G_t - d_j) exp(d_j - G_s). The column factor's exponent is <= 0, and so is the row
factor's below block j; inside block j the row factor is >= 1, at most e^(decay range of the block), and is capped
at ``diag_cap`` (e^60 ~ 1e26: no factor, product or masked entry above the diagonal can overflow fp32 or bf16; e^6
for fp16 operands). A block whose range passed the cap is recomputed by the element-wise kernel, which takes
exp(G_t - G_s), s <= t, directly (<= 1 for decaying gates): g = -1000 always goes there and gives exact zeros. Rows
past the end of a sequence read g = 0 and k, q = 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_common import CHUNK, SUB_CHUNK
from kimi_linear.ops.kda.naive import LOG_DECAY_FLOOR
from kimi_linear.ops.triton_helpers import (
    chunk_rows,
    dot,
    dot_precision,
    interpreting,
    load_cols,
    load_vec,
    new_buffer,
    pad_dim,
    store_cols,
)


def diag_cap(dtype: torch.dtype) -> float:
    """The largest exponent of a diagonal block's row factor in the off-diagonal kernel's dots: e^60 ~ 1e26 leaves
    fp32 and bf16 room for any product and sum of them; fp16 operands (largest 65504) take e^6 ~ 403, so more of
    their blocks go to the element-wise fallback."""
    return 6.0 if dtype == torch.float16 else 60.0


@triton.jit
def chunk_kda_fwd_cumsum_kernel(
    g, q, k, G_out, qg_out, kd_out, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BKG: tl.constexpr, FLOOR: tl.constexpr,
    DECAYED: tl.constexpr,
):
    """Per (chunk, head, K block) — grid (NT, H, cdiv(K, BKG)): G = the chunk-local cumulative sum of g over the
    chunk's rows (fp32), columns [i_k BKG, (i_k + 1) BKG), each g taken no lower than FLOOR (``LOG_DECAY_FLOOR``:
    -inf is a reset with finite differences of G). With DECAYED also scale q exp(G) and K exp(G_last - G) of those
    columns, by the off-diagonal kernel's expressions, so from the same G they come out bit for bit as it writes
    them. The DECAYED build may order the cumulative sum differently (the compiler picks its register layout per
    build), so its G can differ from the forward's by the rounding of a sum of BT terms. Rows past the chunk's end
    are not written."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, n_rows = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    b_g = load_cols(g, t0, 0, i_k * BKG, n_rows, i_h, H, K, BT, BKG).to(tl.float32)  # [BT, BKG]
    b_g = tl.where(b_g < FLOOR, FLOOR, b_g)
    b_G = tl.cumsum(b_g, 0)
    store_cols(G_out, b_G, t0, 0, i_k * BKG, n_rows, i_h, H, K, BT, BKG)
    if DECAYED:
        last = tl.sum(tl.where((tl.arange(0, BT) == n_rows - 1)[:, None], b_G, 0.0), 0)  # [BKG] G_last
        b_k = load_cols(k, t0, 0, i_k * BKG, n_rows, i_h, H, K, BT, BKG).to(tl.float32)
        b_q = load_cols(q, t0, 0, i_k * BKG, n_rows, i_h, H, K, BT, BKG).to(tl.float32)
        store_cols(kd_out, b_k * tl.exp(last[None, :] - b_G), t0, 0, i_k * BKG, n_rows, i_h, H, K, BT, BKG)
        store_cols(qg_out, scale * b_q * tl.exp(b_G), t0, 0, i_k * BKG, n_rows, i_h, H, K, BT, BKG)


@triton.jit
def _column_block(acc_qk, acc_kk, b_q, b_k, b_G, kR, r, d_j, j: tl.constexpr, DIAG_CAP: tl.constexpr,
                  dt: tl.constexpr, DOT_PREC: tl.constexpr):
    """Column block j, one K slice: rows in blocks >= j times exp(G - d_j) (<= 1 below block j, capped in it),
    against kR = k exp(d_own - G) in block j's columns."""
    e = tl.exp(tl.minimum(b_G - d_j[None, :], DIAG_CAP))
    R = tl.trans(tl.where(r == j, kR, 0.0).to(dt))  # [BKS, BT]
    acc_qk += dot(tl.where(r >= j, b_q * e, 0.0).to(dt), R, DOT_PREC)
    acc_kk += dot(tl.where(r >= j, b_k * e, 0.0).to(dt), R, DOT_PREC)
    return acc_qk, acc_kk


@triton.jit
def chunk_kda_fwd_offdiag_kernel(
    q, k, G, beta, Aqk_out, Tinv_out, diag_unsafe, qg_out, kd_out, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BKS: tl.constexpr,
    DIAG_CAP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Per (chunk, head) — grid (NT, H): both pair matrices of the chunk, from the stored G, K in slices of BKS.

    Column block j (j = 0..3) is one dot per matrix and slice: L_j = x exp(G - d_j), zero in rows above block j,
    against R_j = k exp(d_j - G) in block j's columns, zero elsewhere (``_column_block``); four dots per matrix
    accumulate into one [BT, BT] tile (M = 64: one wgmma tile). The entries above the diagonal (finite garbage
    from the capped factors) are masked at the store, so the whole tile is written. Each row's largest G_t - d_own
    over K is tracked; a diagonal block whose largest passes DIAG_CAP gets 1 in ``diag_unsafe`` [NT, H, BT // BC]
    (else 0). Also writes the state pass's operands scale q exp(G) and K exp(G_last - G) (G_last = d_3).
    The dot operands (each factor capped) are in the inputs' dtype.
    """
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, n_rows = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    dt = q.dtype.element_ty
    o_t = tl.arange(0, BT)
    r = (o_t // BC)[:, None]  # [BT, 1] each row's sub-block
    # the exit rows of the sub-blocks (always valid rows)
    e0 = tl.minimum(BC - 1, n_rows - 1)
    e1 = tl.minimum(2 * BC - 1, n_rows - 1)
    e2 = tl.minimum(3 * BC - 1, n_rows - 1)
    e3 = n_rows - 1
    m_valid = (o_t < n_rows)[:, None]
    rng = tl.zeros([BT], dtype=tl.float32)  # each row's largest G_t - d_own over K
    acc_kk = tl.zeros([BT, BT], dtype=tl.float32)
    acc_qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, BK // BKS):
        col0 = i_k * BKS
        o_d = col0 + tl.arange(0, BKS)
        m_d = o_d < K
        d0 = tl.load(G + ((t0 + e0) * H + i_h) * K + o_d, mask=m_d, other=0.0)  # [BKS]
        d1 = tl.load(G + ((t0 + e1) * H + i_h) * K + o_d, mask=m_d, other=0.0)
        d2 = tl.load(G + ((t0 + e2) * H + i_h) * K + o_d, mask=m_d, other=0.0)
        d3 = tl.load(G + ((t0 + e3) * H + i_h) * K + o_d, mask=m_d, other=0.0)
        b_G = load_cols(G, t0, 0, col0, n_rows, i_h, H, K, BT, BKS)  # [BT, BKS] fp32; 0 past the end
        b_k = load_cols(k, t0, 0, col0, n_rows, i_h, H, K, BT, BKS).to(tl.float32)
        b_q = load_cols(q, t0, 0, col0, n_rows, i_h, H, K, BT, BKS).to(tl.float32)
        store_cols(kd_out, b_k * tl.exp(d3[None, :] - b_G), t0, 0, col0, n_rows, i_h, H, K, BT, BKS)
        store_cols(qg_out, scale * b_q * tl.exp(b_G), t0, 0, col0, n_rows, i_h, H, K, BT, BKS)
        d_own = tl.where(r == 0, d0[None, :], tl.where(r == 1, d1[None, :],
                                                        tl.where(r == 2, d2[None, :], d3[None, :])))
        a_own = b_G - d_own
        rng = tl.maximum(rng, tl.max(tl.where(m_valid, a_own, 0.0), 1))
        kR = b_k * tl.exp(tl.minimum(-a_own, 0.0))
        acc_qk, acc_kk = _column_block(acc_qk, acc_kk, b_q, b_k, b_G, kR, r, d0, 0, DIAG_CAP, dt, DOT_PREC)
        acc_qk, acc_kk = _column_block(acc_qk, acc_kk, b_q, b_k, b_G, kR, r, d1, 1, DIAG_CAP, dt, DOT_PREC)
        acc_qk, acc_kk = _column_block(acc_qk, acc_kk, b_q, b_k, b_G, kR, r, d2, 2, DIAG_CAP, dt, DOT_PREC)
        acc_qk, acc_kk = _column_block(acc_qk, acc_kk, b_q, b_k, b_G, kR, r, d3, 3, DIAG_CAP, dt, DOT_PREC)

    acc_qk = tl.where(o_t[None, :] <= o_t[:, None], acc_qk, 0.0)
    acc_kk = tl.where(o_t[None, :] < o_t[:, None], acc_kk, 0.0)
    unsafe = tl.max(tl.reshape(rng, [BT // BC, BC]), 1) > DIAG_CAP  # [BT // BC] per diagonal block
    tl.store(diag_unsafe + (i_c * H + i_h) * (BT // BC) + tl.arange(0, BT // BC), unsafe.to(tl.int32))
    m = (o_t < n_rows)[:, None] & (o_t < BT)[None, :]
    p = ((t0 + o_t).to(tl.int64)[:, None] * H + i_h) * BT + o_t[None, :]
    b_b = load_vec(beta, t0, 0, n_rows, i_h, H, BT)
    tl.store(Aqk_out + p, (scale * acc_qk).to(Aqk_out.dtype.element_ty), mask=m)
    tl.store(Tinv_out + p, b_b[:, None] * acc_kk, mask=m)


@triton.jit
def _token_pair(b_q, b_kb, b_L, k_s, G_s, Aqk_out, Tinv_out, s, row, p_t, m_h, scale, BT: tl.constexpr):
    """Pair (t, s), s <= t, for the program's BH heads: row s of k and G (loaded, [BH, BK]) against row t's q,
    beta k and log2(e) G, stored as scale A_qk[t, s] and beta_t A_kk[t, s] (0 at s = t)."""
    kE = k_s.to(tl.float32) * tl.exp2(b_L - G_s * 1.4426950408889634)  # [BH, BK]
    a_qk = scale * tl.sum(b_q * kE, 1)
    a_kk = tl.sum(b_kb * kE, 1) * tl.where(s < row, 1.0, 0.0)
    tl.store(Aqk_out + p_t * BT + s, a_qk.to(Aqk_out.dtype.element_ty), mask=m_h)
    tl.store(Tinv_out + p_t * BT + s, a_kk, mask=m_h)


@triton.jit
def _token_row(k, G, t0, s, o_h, o_k, m, H: tl.constexpr, K: tl.constexpr):
    """Row s of k (as stored) and G for the BH heads o_h, [BH, BK]."""
    p_s = ((t0 + s) * H + o_h).to(tl.int64)[:, None] * K + o_k[None, :]
    return tl.load(k + p_s, mask=m, other=0.0), tl.load(G + p_s, mask=m, other=0.0)


@triton.jit
def _token_row_pairs(q, k, G, beta, Aqk_out, Tinv_out, t0, row, r0, o_h, o_k, m, m_h, scale,
                     H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, INTERPRET: tl.constexpr):
    """Row t = ``row`` of its diagonal block (rows from r0) for the BH heads o_h: the pairs s = r0 .. t."""
    p_t = ((t0 + row) * H + o_h).to(tl.int64)  # [BH] row t of each head
    p_tk = p_t[:, None] * K + o_k[None, :]
    b_q = tl.load(q + p_tk, mask=m, other=0.0).to(tl.float32)
    b_b = tl.load(beta + p_t, mask=m_h, other=0.0).to(tl.float32)
    b_kb = tl.load(k + p_tk, mask=m, other=0.0).to(tl.float32) * b_b[:, None]
    b_L = tl.load(G + p_tk, mask=m, other=0.0) * 1.4426950408889634  # log2(e) G_t
    if INTERPRET:  # the interpreter cannot take a run-time bound in range()
        for j in range(0, BC):
            if r0 + j <= row:
                k_s, G_s = _token_row(k, G, t0, r0 + j, o_h, o_k, m, H, K)
                _token_pair(b_q, b_kb, b_L, k_s, G_s, Aqk_out, Tinv_out, r0 + j, row, p_t, m_h, scale, BT)
    else:
        for j in range(0, row - r0 + 1):
            k_s, G_s = _token_row(k, G, t0, r0 + j, o_h, o_k, m, H, K)
            _token_pair(b_q, b_kb, b_L, k_s, G_s, Aqk_out, Tinv_out, r0 + j, row, p_t, m_h, scale, BT)


@triton.jit
def chunk_kda_fwd_diag_token_kernel(
    q, k, G, beta, Aqk_out, Tinv_out, diag_unsafe, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Per (diagonal block, group of BH heads) — grid (NT * BT // BC, cdiv(H, BH)): the blocks the off-diagonal
    kernel flagged in ``diag_unsafe`` for one of the program's heads, element-wise, row by row: for row t the pairs
    s <= t of its block, A_kk[t, s] and A_qk[t, s] = sum_c x_t k_s exp(G_t - G_s), one [BH, BK] step each, the
    loop running to t only. Writes scale A_qk[t, s] to ``Aqk_out`` and beta_t A_kk[t, s] (0 at s = t) to
    ``Tinv_out``; the zeros above the diagonal are the off-diagonal kernel's. s <= t within one sequence, so
    G_t <= G_s for decaying gates and the exponent needs no clamp (fp32 rounding is monotone: the cumsum of terms
    <= 0 never rises). Base 2 on log2(e) G, with beta folded into row t's k. Unflagged programs return after one
    load (a per-row grid would spend its time starting programs that return)."""
    i_p, i_hb = tl.program_id(0), tl.program_id(1)
    o_h = i_hb * BH + tl.arange(0, BH)
    o_k = tl.arange(0, BK)
    m_h = o_h < H
    m = m_h[:, None] & (o_k < K)[None, :]
    i_c = i_p // (BT // BC)
    r0 = i_p % (BT // BC) * BC
    flagged = tl.load(diag_unsafe + (i_c * H + o_h) * (BT // BC) + r0 // BC, mask=m_h, other=0)
    if tl.max(flagged, 0) == 0:
        return
    t0, n_rows = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    if INTERPRET:
        for i in range(0, BC):
            if r0 + i < n_rows:
                _token_row_pairs(q, k, G, beta, Aqk_out, Tinv_out, t0, r0 + i, r0, o_h, o_k, m, m_h, scale,
                                 H, K, BT, BC, INTERPRET)
    else:
        for row in range(r0, tl.minimum(r0 + BC, n_rows)):
            _token_row_pairs(q, k, G, beta, Aqk_out, Tinv_out, t0, row, r0, o_h, o_k, m, m_h, scale,
                             H, K, BT, BC, INTERPRET)


def build_pairs(q, k, g, beta, scale, layout, launch):
    """The pair stage: packed q, k [TT, H, K], g [TT, H, K] fp32, beta [TT, H] -> (G fp32, scale A_qk, beta A_kk
    fp32 [TT, H, BT] (the UT solve's input, solved in place), scale q exp(G), K exp(G_last - G)).
    ``launch``: the forward's ``FwdLaunch``."""
    TT, H, K = q.shape
    dev, dt = q.device, q.dtype
    BK = pad_dim(K)
    G = new_buffer(TT, H, K, device=dev, dtype=torch.float32)
    Aqk = new_buffer(TT, H, CHUNK, device=dev, dtype=dt)
    Tinv = new_buffer(TT, H, CHUNK, device=dev, dtype=torch.float32)
    qg = new_buffer(TT, H, K, device=dev, dtype=dt)
    kd = new_buffer(TT, H, K, device=dev, dtype=dt)
    if layout.NT == 0:
        return G, Aqk, Tinv, qg, kd
    diag_unsafe = torch.empty(layout.NT, H, CHUNK // SUB_CHUNK, device=dev, dtype=torch.int32)
    BKG = min(BK, launch.cumsum_block)
    chunk_kda_fwd_cumsum_kernel[(layout.NT, H, triton.cdiv(K, BKG))](
        g, q, k, G, G, G, layout.cu_seqlens, layout.chunk_indices, scale, H=H, K=K, BT=CHUNK, BKG=BKG,
        FLOOR=LOG_DECAY_FLOOR, DECAYED=False, num_warps=4,
    )
    chunk_kda_fwd_offdiag_kernel[(layout.NT, H)](
        q, k, G, beta, Aqk, Tinv, diag_unsafe, qg, kd, layout.cu_seqlens, layout.chunk_indices, scale,
        H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, BKS=min(BK, launch.offdiag_bks), DIAG_CAP=diag_cap(dt),
        DOT_PREC=dot_precision(dt), num_warps=launch.offdiag_warps, num_stages=launch.offdiag_stages,
    )
    BH = min(triton.next_power_of_2(H), launch.fallback_heads)
    chunk_kda_fwd_diag_token_kernel[(layout.NT * (CHUNK // SUB_CHUNK), triton.cdiv(H, BH))](
        q, k, G, beta, Aqk, Tinv, diag_unsafe, layout.cu_seqlens, layout.chunk_indices, scale,
        H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, BH=BH, INTERPRET=interpreting(),
        num_warps=launch.fallback_warps, num_stages=1,
    )
    return G, Aqk, Tinv, qg, kd


def decay_operands(q, k, g, scale, layout, launch):
    """What the backward needs of the pair stage's element-wise outputs, recomputed rather than kept from the
    forward: packed q, k [TT, H, K], g [TT, H, K] fp32 -> (G fp32, scale q exp(G), K exp(G_last - G) in q's dtype),
    ``build_pairs``'s up to the order of G's sums (bit for bit under the interpreter). ``launch``: the forward's
    ``FwdLaunch``."""
    TT, H, K = q.shape
    dev = q.device
    G = new_buffer(TT, H, K, device=dev, dtype=torch.float32)
    qg = new_buffer(TT, H, K, device=dev, dtype=q.dtype)
    kd = new_buffer(TT, H, K, device=dev, dtype=q.dtype)
    if layout.NT == 0:
        return G, qg, kd
    BKG = min(pad_dim(K), launch.cumsum_block)
    chunk_kda_fwd_cumsum_kernel[(layout.NT, H, triton.cdiv(K, BKG))](
        g, q, k, G, qg, kd, layout.cu_seqlens, layout.chunk_indices, scale, H=H, K=K, BT=CHUNK, BKG=BKG,
        FLOOR=LOG_DECAY_FLOOR, DECAYED=True, num_warps=4,
    )
    return G, qg, kd


def sm90_build_jobs(H: int, K: int, dtype: torch.dtype, launch) -> list:
    """(kernel, constexprs, num_warps, num_stages) as ``build_pairs`` launches them."""
    BK = pad_dim(K)
    return [
        (chunk_kda_fwd_cumsum_kernel, dict(H=H, K=K, BT=CHUNK, BKG=min(BK, launch.cumsum_block),
                                           FLOOR=LOG_DECAY_FLOOR, DECAYED=False), 4, 1),
        (chunk_kda_fwd_offdiag_kernel, dict(H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, BKS=min(BK, launch.offdiag_bks),
                                            DIAG_CAP=diag_cap(dtype), DOT_PREC=dot_precision(dtype)),
         launch.offdiag_warps, launch.offdiag_stages),
        (chunk_kda_fwd_diag_token_kernel, dict(H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK,
                                               BH=min(triton.next_power_of_2(H), launch.fallback_heads),
                                               INTERPRET=False), launch.fallback_warps, 1),
    ]
