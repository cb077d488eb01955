"""Triton kernels of the chunkwise KDA forward (paper §3.1), and the block helpers the backward shares.

Three stages, chunk size BT = 64 split into four sub-blocks of BC = 16 rows:

* The pair stage: the fp32 cumulative log-decay G and the pair matrices A_kk (strictly lower, times beta; to the
  T buffer) and A_qk (lower, times scale). By default (``FWD_CONFIG["pairs_impl"] = "chunk"``,
  ``diag_impl = "dots"``) ``chunk_kda_fwd_cumsum_kernel`` (G per (chunk, head, K block)), then
  ``chunk_kda_fwd_offdiag_kernel``: every block of both matrices per (chunk, head) as [64, BKS] x [BKS, 64] dots,
  one decay reference per column block (the diagonal blocks' row factors capped; a block whose decay range passes
  the cap is flagged), and, with ``offdiag_qgkd``, the state pass's operands scale q exp(G), K exp(G_last - G);
  then ``chunk_kda_fwd_diag_token_kernel`` recomputes the flagged diagonal blocks element-wise. With
  ``diag_impl = "tokens"`` that kernel builds the lower triangles of all diagonal 16x16 blocks (one program per row
  and group of heads) and the off-diagonal kernel only the blocks below them, the decay routed through the
  sub-blocks' last rows; ``"blocks"``: ``chunk_kda_fwd_diag_kernel``, whole blocks per (sub-block, chunk, head).
  With ``offdiag_cumsum`` the off-diagonal kernel computes and stores G itself.
  Alternatively (``"subblock"``), ``chunk_kda_fwd_pairs_kernel`` — one program per (sub-block, chunk, head),
  walking K in slices of ``pairs_bks`` columns: the sub-block's rows of G, A_kk and A_qk — against earlier rows as
  one tl.dot, inside the sub-block element-wise (one column per step over the whole K, or a [16, 16, BKS]
  broadcast per slice).
  Or (``"fused"``) ``chunk_kda_fwd_intra_kernel`` — one program per (chunk, head) doing this stage and the next
  one together: G, the off-diagonal blocks as [16, BKS] x [BKS, 16] dots per block pair, the diagonal blocks, the
  UT transform on the blocks in registers, then the WY factors (no round trip of the pair matrices through memory,
  one launch instead of four).
* ``chunk_kda_fwd_wy_kernel`` — one program per (chunk, head): the UT transform T = (I + beta A_kk)^-1 in fp32
  (the four 16x16 diagonal blocks inverted in registers as a Neumann product, or with ``wy_solve_regs`` off by
  forward substitution over rows read from memory; then a block merge), then, 64 columns at a time, the WY
  factors W = T (beta exp(G) K), U = T (beta V) and (unless the off-diagonal kernel has, ``offdiag_qgkd``) the
  state pass's operands scale q exp(G), K exp(G_last - G).
  Where the UT transform runs is ``FWD_CONFIG["solve_impl"]``: here ("wy"), in ``chunk_kda_fwd_solve_kernel`` of
  its own ("kernel", the default), or at the end of the off-diagonal kernel ("offdiag"); the WY kernel then only
  streams, and by default (``wy_split``) as ``chunk_kda_fwd_wy_block_kernel``, one program per column block.
* ``chunk_kda_fwd_state_kernel`` — one program per (V block, sequence, head), a sequential pass over the
  sequence's chunks carrying the fp32 state S [K, BV]: V_new = U - W S, O = (scale Q exp(G)) S + A_qk V_new,
  S <- exp(G_last) S + (K exp(G_last - G))^T V_new. With ``STORE_H`` it also writes the state entering each chunk
  and V_new (the backward recomputes them this way instead of keeping them from the forward).

Numerics: G stays fp32. Outside the diagonal blocks exponentials are taken only of differences that are <= 0 —
for pairs of rows in different sub-blocks the decay goes through a row c between them: exp(G_t - G_i) =
exp(G_t - c) exp(c - G_i) (c the exit row of i's block with diag_impl "dots", else the row just before t's
block). Inside a diagonal block the element-wise kernels take exp(G_t - G_s), s <= t, directly; the dots of
diag_impl "dots" take exp(G_t - c) >= 1 for the rows of the block, capped at e^60 (e^6 for fp16 operands), so no
value can overflow, and a block that needed more is recomputed element-wise (g = -1000 always is). Rows past the
end of a sequence read g = 0 and their k, q, v read 0 (g = -1000 gives zeros).

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
    launch_fitting,
    state_stages,
)
from kimi_linear.ops.triton_helpers import dot_precision, interpreting, new_buffer, pad_dim

# Launch settings of the per-chunk forward kernels (the state pass keeps chunk_common.CONFIG's).
FWD_CONFIG = {
    # "chunk": three kernels — chunk-local cumsum, diagonal blocks per sub-block, off-diagonal blocks per chunk;
    # "subblock": one pair kernel per (sub-block, chunk, head) doing G, the off-diagonal rows and the diagonal block
    # "fused": one kernel per chunk for G, the pair matrices, the UT transform and the WY factors.
    # H200, 8k fwd / fwd+bwd: chunk 1.45 / 5.01 ms, fused 1.68 / 5.25 (diagonal by rows), 2.22 / 5.78 (by levels)
    # (2026-12-03); subblock 2.05 / 5.76 (2026-11-26, before the layout cache)
    "pairs_impl": "chunk",
    "pairs_bks": 32,  # K columns per step of the pair kernel (16: fwd 2.44 vs 2.10 ms at T = 8192 with stages 1)
    "pairs_ops_16bit": True,  # off-diagonal pair dots on operands in the inputs' dtype (else fp32 / tf32)
    "pairs_diag_rows": True,  # diagonal blocks one column per step over the whole K (else a 3D broadcast per slice)
    "pairs_warps": 4,  # 8 warps: fwd 2.68 vs 2.45 ms at T = 8192 on the H200
    "pairs_stages": 1,  # 2 (prefetch the next K slice) measured slower at bks 32
    "cumsum_block": 64,  # pairs_impl "chunk": K columns per program of the cumsum kernel
    # pairs_impl "chunk": the off-diagonal kernel computes and stores G (no cumsum kernel); 8k fwd 1.409 vs 1.301 ms
    "offdiag_cumsum": False,
    "diag_warps": 4,
    # pairs_impl "chunk": diagonal blocks per sub-block ("blocks") or per row and group of heads, lower triangle
    # only ("tokens"). H200, 8k fwd / fwd+bwd, register solve off: blocks 1.445 / 4.980 ms, tokens 1.368 / 4.911
    # (heads 8, warps 4: 1.369 / 4.910; heads 2, warps 1: 1.359 / 4.904) (2026-12-03). Heads per program and
    # warps: 2 and 1 vs 4 and 2, diag kernel 0.261 vs 0.270 ms at 8k (2026-12-03, 23:10 UTC). The loop running to
    # row t only, no clamp, base 2, no zero stores: 0.227 ms (heads 4: 0.249, 1: 0.295) (2026-12-04). Measured and
    # dropped (2026-12-04): the diagonal blocks by pair levels inside the off-diagonal kernel (batched 16x16 dots;
    # off-diagonal kernel 0.470-0.618 ms instead of 0.168 + 0.262), and carried row by row from the raw gates
    # (F <- F exp(g_t), one exponential per row and column; 0.341 ms at 1 warp, 0.484 at 4). "dots": the diagonal
    # blocks from the off-diagonal kernel's dots, the element-wise kernel (one program per block) only for blocks
    # whose decay range passes the cap: 8k fwd 0.994 -> 0.828 ms (off-diagonal kernel 0.167 -> 0.204, diagonal
    # 0.218 -> 0.011 with no block flagged); with every block of about half the heads flagged (--gates steep)
    # 0.965 vs 0.994 (2026-12-04)
    "diag_impl": "dots",
    "diag_heads": 2,  # diag_impl "tokens": heads per program
    "diag_token_warps": 1,
    # diag_impl "dots": heads per program of the element-wise fallback (one program per block and group of heads).
    # H200, 8k fwd with every block of about half the heads flagged (benchmarks/kda_kernels.py --gates steep):
    # fallback kernel 0.182 ms with 1 head, 0.385 with 2 (2026-12-04)
    "diag_fallback_heads": 1,
    # K columns per step of the off-diagonal kernel; H200 8k fwd 1.156 (64) vs 1.215 ms (32), kernel 0.176 vs 0.233
    "offdiag_bks": 64,
    "offdiag_warps": 4,  # one warpgroup: the [64, BKS] x [BKS, 64] dots are one wgmma tile
    # vs 2: kernel 0.168 vs 0.176 ms at 8k (2026-12-03, 23:10 UTC); with diag_impl "dots" and offdiag_qgkd,
    # 1: 0.251, 2: 0.262, 3: 0.305 ms (2026-12-04)
    "offdiag_stages": 1,
    "offdiag_split": False,  # A_kk and A_qk in separate programs of the off-diagonal kernel (one accumulator each)
    # scale q exp(G) and K exp(G_last - G) stored by the off-diagonal kernel (it holds q, k, G) instead of the WY
    # kernel, which then reads no q: 8k fwd 0.828 -> 0.785 ms (WY 0.213 -> 0.119, off-diagonal 0.204 -> 0.251 at
    # offdiag_stages 1) (2026-12-04)
    "offdiag_qgkd": True,
    "intra_bks": 32,  # pairs_impl "fused": K columns per step of the off-diagonal blocks
    "intra_warps": 4,
    "intra_stages": 1,
    # diagonal blocks as tensor-core dots by pair level (fused and chunk kernels), else one column per step;
    # in the fused kernel 8k fwd 2.22 vs 1.68 ms (H200, 2026-12-03)
    "diag_levels": False,
    "wy_block": 64,  # K / V columns per step of the WY kernel (and of the fused kernel's WY part)
    "wy_warps": 8,
    # diagonal blocks of the UT transform inverted from registers (Neumann product) instead of by forward
    # substitution over rows read from memory. H200, 8k fwd / fwd+bwd: diag blocks 1.374 vs 1.445 / 4.914 vs 4.980
    # ms (4 warps 1.372 / 4.912); with diag tokens 1.301 / 4.843, the best setting measured (2026-12-03)
    "wy_solve_regs": True,
    # prefetch depth over the column blocks; with solve_impl "kernel", 8k fwd 1.244 (3) vs 1.266 (2) vs 1.247 (4)
    "wy_stages": 3,
    # pairs_impl "chunk": where the UT transform runs — at the start of the WY kernel ("wy"), in its own kernel
    # ("kernel", solve_warps warps: many small programs per SM, the WY kernel then only streams), or at the end of
    # the off-diagonal kernel ("offdiag"; the diagonal kernel then runs first). H200, 8k fwd / fwd+bwd at wy_stages
    # 2: wy 1.301 / 4.845, kernel 1.264 / 4.805 (solve 0.096 + WY 0.287 ms instead of WY 0.419), offdiag 1.287 /
    # 4.833 (off-diagonal kernel 0.347 instead of 0.227); outputs and gradients bit-identical (2026-12-03)
    "solve_impl": "kernel",
    "solve_warps": 2,  # 1: 1.280, 4: 1.295 ms
    # the WY factors by one program per (column block of wy_split_block, chunk, head) (``chunk_kda_fwd_wy_block_
    # kernel``) instead of one per (chunk, head), where T is stored before the WY stage (pairs_impl "chunk" with
    # solve_impl "kernel" or "offdiag"; otherwise the per-chunk kernel, which runs the UT transform). H200, 8k
    # fwd / fwd+bwd: per chunk 1.259 / 4.841 ms (WY 0.268), split by 64 columns 1.234 / 4.812 (0.245), by 32
    # 1.222 / 4.800 (0.232); 8 warps 1.274; outputs and gradients bit-identical (2026-12-03)
    "wy_split": True,
    # 64 with wy_ops_16bit: WY 0.211 vs 0.232 ms at 32 (2026-12-04)
    "wy_split_block": 64,
    "wy_split_warps": 4,
    # the W / U products on T and operands rounded to the inputs' dtype (wy_split, or after the solve kernel), as
    # FLA does; H200 8k fwd 1.022 (with wy_split_block 64) vs 1.035 ms, fwd+bwd 4.451 vs 4.467 (2026-12-04)
    "wy_ops_16bit": True,
    "wy_t16": True,  # wy_ops_16bit with solve_impl "kernel": the solve kernel also stores T in that dtype
}


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
def _load_cols(ptr, t0, row0, col0, n_rows, i_h, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
               BD: tl.constexpr):
    """Rows [row0, row0 + BR), columns [col0, col0 + BD) of a chunk of ``ptr`` [T_total, H, D], in the stored
    dtype; rows at or past ``n_rows`` and columns past D read 0."""
    o_r = row0 + tl.arange(0, BR)
    o_d = col0 + tl.arange(0, BD)
    m = (o_r < n_rows)[:, None] & (o_d < D)[None, :]
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _store_cols(ptr, x, t0, row0, col0, n_rows, i_h, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
                BD: tl.constexpr):
    o_r = row0 + tl.arange(0, BR)
    o_d = col0 + tl.arange(0, BD)
    m = (o_r < n_rows)[:, None] & (o_d < D)[None, :]
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _diag_slice(q_a, k_a, G_a):
    """One K slice of a diagonal sub-block: sum_c k_t k_j exp(G_t - G_j) and sum_c q_t k_j exp(G_t - G_j) for every
    pair (t, j) of the block, as [BC, BC] fp32, from [BC, BKS] fp32 tiles. The exponent is clamped at 0: pairs with
    j > t would be positive (they are masked by the caller), every kept factor is <= 1. Base 2 on log2(e) G saves
    the multiply that exp would spend on each of the [BC, BC, BKS] elements."""
    L = G_a * 1.4426950408889634  # log2(e) G
    kE = k_a[None, :, :] * tl.exp2(tl.minimum(L[:, None, :] - L[None, :, :], 0.0))  # [BC, BC, BKS]
    return tl.sum(k_a[:, None, :] * kE, 2), tl.sum(q_a[:, None, :] * kE, 2)


@triton.jit
def _diag_rows(q, k, G, t0, r0, n_rows, i_h, H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr,
               BK: tl.constexpr):
    """The diagonal sub-block at rows/columns [r0, r0 + BC) of a chunk over the whole K at once: column j of
    A_kk[t, j] = sum_c k_t k_j exp(G_t - G_j) and of A_qk (q_t for k_t) per step, from row j of k and of the stored
    G (fp32 [T_total, H, K]). The BC steps are independent (no carried value but the assembled tile), so their
    loads and [BC, BK] exponentials pipeline. Exponents are clamped at 0 (pairs j > t, masked by the caller);
    rows past the chunk's end read k = 0 and G = 0."""
    q_a = _load_rows(q, t0, r0, n_rows, i_h, H, K, BC, BK)
    k_a = _load_rows(k, t0, r0, n_rows, i_h, H, K, BC, BK)
    L_a = _load_rows(G, t0, r0, n_rows, i_h, H, K, BC, BK) * 1.4426950408889634  # log2(e) G
    o_c = tl.arange(0, BC)
    A_kk = tl.zeros([BC, BC], dtype=tl.float32)
    A_qk = tl.zeros([BC, BC], dtype=tl.float32)
    for j in range(BC):
        k_j = _load_row(k, t0, r0 + j, n_rows, i_h, H, K, BK)
        L_j = _load_row(G, t0, r0 + j, n_rows, i_h, H, K, BK) * 1.4426950408889634
        kE = k_j[None, :] * tl.exp2(tl.minimum(L_a - L_j[None, :], 0.0))  # [BC, BK]
        sel = o_c[None, :] == j
        A_kk = tl.where(sel, tl.sum(k_a * kE, 1)[:, None], A_kk)
        A_qk = tl.where(sel, tl.sum(q_a * kE, 1)[:, None], A_qk)
    return A_kk, A_qk


@triton.jit
def _load_rows_at(ptr, t0, rows, m_rows, i_h, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """Rows ``rows`` [BR] (chunk-relative) of ``ptr`` [T_total, H, D] as fp32 [BR, BD]; rows where ``m_rows`` is
    False and columns past D read 0."""
    o_d = tl.arange(0, BD)
    m = m_rows[:, None] & (o_d < D)[None, :]
    p = ptr + ((t0 + rows).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    return tl.load(p, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _diag_levels(q, k, G, t0, r0, n_rows, i_h, H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr,
                 BK: tl.constexpr, dt: tl.constexpr, DOT_PREC: tl.constexpr):
    """The diagonal sub-block at rows/columns [r0, r0 + BC) of a chunk (same contract as ``_diag_rows``) on the
    tensor cores: the block's pairs t > s split by the highest bit where t and s differ, level l (block size
    2^l, l = 3..0): t sits in the upper half of an aligned group of 2^(l+1) rows and s in its lower half, so the
    last row of the lower half, m = (t >> l << l) - 1, lies between them and routes the decay,
    exp(G_t - G_s) = exp(G_t - G_m) exp(G_m - G_s), both exponents <= 0. One [BC, BK] x [BK, BC] dot per level
    and matrix gives every pair of that level (entries of other levels are discarded); the diagonal of A_qk is
    q_t . k_t. G comes from memory (this chunk's rows are stored); rows past the chunk's end read k = q = 0."""
    o_c = tl.arange(0, BC)
    o_r = r0 + o_c
    m_valid = o_r < n_rows
    q_a = _load_rows(q, t0, r0, n_rows, i_h, H, K, BC, BK)
    k_a = _load_rows(k, t0, r0, n_rows, i_h, H, K, BC, BK)
    G_a = _load_rows(G, t0, r0, n_rows, i_h, H, K, BC, BK)
    x = o_c[:, None] ^ o_c[None, :]  # [BC, BC] pair (t, s) belongs to level l iff 2^l <= t ^ s < 2^(l + 1)
    A_kk = tl.zeros([BC, BC], dtype=tl.float32)
    A_qk = tl.where(o_c[:, None] == o_c[None, :], tl.sum(q_a * k_a, 1)[:, None], 0.0)
    for lvl in tl.static_range(4):
        half = 1 << lvl
        upper = ((o_c >> lvl) & 1) == 1  # rows that are the later side of a level-l pair
        ref_l = (o_c >> lvl << lvl) - 1  # for an upper row: the last row of the lower half before it
        ref_r = (o_c >> lvl << lvl) + half - 1  # for a lower row: the last row of its own half
        G_l = _load_rows_at(G, t0, r0 + ref_l, upper & m_valid, i_h, H, K, BK)
        G_r = _load_rows_at(G, t0, r0 + ref_r, (~upper) & (r0 + ref_r < n_rows), i_h, H, K, BK)
        e_l = tl.where((upper & m_valid)[:, None], tl.exp(tl.minimum(G_a - G_l, 0.0)), 0.0)
        kR = tl.where(((~upper) & (r0 + ref_r < n_rows))[:, None], k_a * tl.exp(tl.minimum(G_r - G_a, 0.0)), 0.0)
        kRt = tl.trans(kR.to(dt))
        sel = (x >= half) & (x < 2 * half)
        A_kk += tl.where(sel, tl.dot((k_a * e_l).to(dt), kRt, input_precision=DOT_PREC), 0.0)
        A_qk += tl.where(sel, tl.dot((q_a * e_l).to(dt), kRt, input_precision=DOT_PREC), 0.0)
    return A_kk, A_qk


@triton.jit
def _diag_block(q, k, G, t0, r0, n_rows, i_h, H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                dt: tl.constexpr, LEVELS: tl.constexpr, DOT_PREC: tl.constexpr):
    """The diagonal sub-block at r0: by levels on the tensor cores (``_diag_levels``) or one column per step
    (``_diag_rows``)."""
    if LEVELS:
        A_kk, A_qk = _diag_levels(q, k, G, t0, r0, n_rows, i_h, H, K, BC, BK, dt, DOT_PREC)
    else:
        A_kk, A_qk = _diag_rows(q, k, G, t0, r0, n_rows, i_h, H, K, BC, BK)
    return A_kk, A_qk


@triton.jit
def chunk_kda_fwd_pairs_kernel(
    q, k, g, beta, G_out, Aqk_out, A_out, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BKS: tl.constexpr,
    OPS_16BIT: tl.constexpr, DIAG_ROWS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Per (sub-block a, chunk, head) — grid (BT // BC, NT, H): rows [a BC, (a + 1) BC) of the cumulative decay G
    and of the pair matrices.

    Walks K in slices of BKS columns. Each slice: G of the rows up to the block's end (a chunk-local cumsum of g;
    the program stores its own BC rows), then the slice's share of A_kk[t, j] = sum_c k_t k_j exp(G_t - G_j) and of
    A_qk[t, j] (q_t in place of k_t): against the earlier rows j < a BC as one tl.dot [BC, BKS] x [BKS, BT] with the
    decay routed through c, the decay just before the block (exp(G_t - c) exp(c - G_j), both <= 1; later rows are
    zeroed), and inside the block element-wise: with DIAG_ROWS after the slices, one column per step over the whole K
from the stored G (``_diag_rows``), else per slice as a [BC, BC, BKS] broadcast. Writes the block's rows of
    scale * A_qk (lower, with the diagonal) to ``Aqk_out`` and of beta * A_kk (strictly lower) to ``A_out`` (fp32;
    the T buffer, which the solve kernel then overwrites), zeros above. With OPS_16BIT the dot operands (decayed
    q, k, each factor <= 1) are rounded to the inputs' dtype, else they stay fp32 (tf32 products on 16-bit inputs).
    """
    i_a, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT
    n_rows = tl.minimum(eos - t0, BT)
    n_prev = tl.minimum(n_rows, i_a * BC)  # valid rows before the block
    r0 = i_a * BC
    dt = q.dtype.element_ty if OPS_16BIT else tl.float32

    acc_kk = tl.zeros([BC, BT], dtype=tl.float32)  # against earlier rows; columns >= r0 stay 0
    acc_qk = tl.zeros([BC, BT], dtype=tl.float32)
    d_kk = tl.zeros([BC, BC], dtype=tl.float32)  # inside the block
    d_qk = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(0, BK // BKS):
        col0 = i_k * BKS
        g_p = _load_cols(g, t0, 0, col0, n_prev, i_h, H, K, BT, BKS).to(tl.float32)  # [BT, BKS], 0 from r0 on
        G_p = tl.cumsum(g_p, 0)
        c = tl.sum(g_p, 0)  # [BKS] the decay before the block
        g_a = _load_cols(g, t0, r0, col0, n_rows, i_h, H, K, BC, BKS).to(tl.float32)
        G_a = c[None, :] + tl.cumsum(g_a, 0)  # [BC, BKS]; padded rows add 0
        _store_cols(G_out, G_a, t0, r0, col0, n_rows, i_h, H, K, BC, BKS)

        k_a = _load_cols(k, t0, r0, col0, n_rows, i_h, H, K, BC, BKS).to(tl.float32)
        q_a = _load_cols(q, t0, r0, col0, n_rows, i_h, H, K, BC, BKS).to(tl.float32)
        k_p = _load_cols(k, t0, 0, col0, n_prev, i_h, H, K, BT, BKS).to(tl.float32)  # [BT, BKS], 0 from r0 on
        # the clamp only guards against positive gates: c - G_j <= 0 for every earlier row j
        kbT = tl.trans((k_p * tl.exp(tl.minimum(c[None, :] - G_p, 0.0))).to(dt))  # [BKS, BT]
        e_a = tl.exp(G_a - c[None, :])
        acc_kk += _dot((k_a * e_a).to(dt), kbT, DOT_PREC)
        acc_qk += _dot((q_a * e_a).to(dt), kbT, DOT_PREC)

        if not DIAG_ROWS:
            s_kk, s_qk = _diag_slice(q_a, k_a, G_a)
            d_kk += s_kk
            d_qk += s_qk
    if DIAG_ROWS:
        tl.debug_barrier()  # this program's rows of G are stored; read them back whole across threads
        d_kk, d_qk = _diag_rows(q, k, G_out, t0, r0, n_rows, i_h, H, K, BC, BK)

    o_c = tl.arange(0, BC)
    o_r = r0 + o_c
    o_t = tl.arange(0, BT)
    m_row = (o_r < n_rows)[:, None]
    m_out = m_row & ((o_t < r0) | (o_t >= r0 + BC))[None, :]  # the diagonal block is written separately
    p_row = ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * BT
    b_b = _load_vec(beta, t0, r0, n_rows, i_h, H, BC)
    tl.store(Aqk_out + p_row + o_t[None, :], (scale * acc_qk).to(Aqk_out.dtype.element_ty), mask=m_out)
    tl.store(A_out + p_row + o_t[None, :], b_b[:, None] * acc_kk, mask=m_out)
    d_qk = tl.where(o_c[:, None] >= o_c[None, :], scale * d_qk, 0.0)
    d_kk = tl.where(o_c[:, None] > o_c[None, :], b_b[:, None] * d_kk, 0.0)
    tl.store(Aqk_out + p_row + r0 + o_c[None, :], d_qk.to(Aqk_out.dtype.element_ty), mask=m_row)
    tl.store(A_out + p_row + r0 + o_c[None, :], d_kk, mask=m_row)


@triton.jit
def _chunk_rows(cu_seqlens, chunk_indices, i_c, BT: tl.constexpr):
    """The packed row where chunk i_c starts and its number of valid rows (<= BT)."""
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT
    return t0, tl.minimum(eos - t0, BT)


@triton.jit
def chunk_kda_fwd_cumsum_kernel(
    g, G_out, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BKG: tl.constexpr,
):
    """Per (chunk, head, K block) — grid (NT, H, cdiv(K, BKG)): G = the chunk-local cumulative sum of g over the
    chunk's rows (fp32), columns [i_k BKG, (i_k + 1) BKG). Rows past the chunk's end are not written."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, n_rows = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    b_g = _load_cols(g, t0, 0, i_k * BKG, n_rows, i_h, H, K, BT, BKG).to(tl.float32)  # [BT, BKG]
    _store_cols(G_out, tl.cumsum(b_g, 0), t0, 0, i_k * BKG, n_rows, i_h, H, K, BT, BKG)


@triton.jit
def chunk_kda_fwd_diag_kernel(
    q, k, G, beta, Aqk_out, Tinv_out, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    LEVELS: tl.constexpr, OPS_16BIT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Per (sub-block a, chunk, head) — grid (BT // BC, NT, H): the diagonal [BC, BC] block at rows/columns
    [a BC, (a + 1) BC) of the pair matrices, from the stored G (``chunk_kda_fwd_cumsum_kernel``).

    The block's q, k and G rows [BC, BK] are loaded once; step j builds column j, A_kk[t, j] = sum_c k_t k_j
    exp(G_t - G_j) and A_qk[t, j] (q_t for k_t), for all t at once as [BC, BK] element-wise products reduced
    along K (``_diag_rows``): 2D only, each exponent clamped at 0 (the pairs j > t, zeroed here). Writes
    scale * A_qk (with the diagonal) to ``Aqk_out`` and beta * A_kk (strictly lower) to ``Tinv_out`` (fp32),
    zeros above the diagonal; the rest of those rows is ``chunk_kda_fwd_offdiag_kernel``'s. With LEVELS the block
    is built on the tensor cores instead (``_diag_levels``).
    """
    i_a, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, n_rows = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    r0 = i_a * BC
    d_kk, d_qk = _diag_block(q, k, G, t0, r0, n_rows, i_h, H, K, BC, BK,
                             q.dtype.element_ty if OPS_16BIT else tl.float32, LEVELS, DOT_PREC)
    o_c = tl.arange(0, BC)
    o_r = r0 + o_c
    m_row = (o_r < n_rows)[:, None]
    p = ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * BT + r0 + o_c[None, :]
    b_b = _load_vec(beta, t0, r0, n_rows, i_h, H, BC)
    d_qk = tl.where(o_c[:, None] >= o_c[None, :], scale * d_qk, 0.0)
    d_kk = tl.where(o_c[:, None] > o_c[None, :], b_b[:, None] * d_kk, 0.0)
    tl.store(Aqk_out + p, d_qk.to(Aqk_out.dtype.element_ty), mask=m_row)
    tl.store(Tinv_out + p, d_kk, mask=m_row)


@triton.jit
def _diag_token_pair(b_q, b_kb, b_L, k_s, G_s, Aqk_out, Tinv_out, s, row, p_t, m_h, scale, BT: tl.constexpr):
    """Pair (t, s), s <= t, of ``chunk_kda_fwd_diag_token_kernel`` for its BH heads: row s of k and G (loaded,
    [BH, BK]) against row t's q, beta k and log2(e) G, stored as scale A_qk[t, s] and beta_t A_kk[t, s] (0 at
    s = t)."""
    kE = k_s.to(tl.float32) * tl.exp2(b_L - G_s * 1.4426950408889634)  # [BH, BK]
    a_qk = scale * tl.sum(b_q * kE, 1)
    a_kk = tl.sum(b_kb * kE, 1) * tl.where(s < row, 1.0, 0.0)
    tl.store(Aqk_out + p_t * BT + s, a_qk.to(Aqk_out.dtype.element_ty), mask=m_h)
    tl.store(Tinv_out + p_t * BT + s, a_kk, mask=m_h)


@triton.jit
def _diag_token_row(k, G, t0, s, o_h, o_k, m, H: tl.constexpr, K: tl.constexpr):
    """Row s of k (as stored) and G for the BH heads o_h, [BH, BK]."""
    p_s = ((t0 + s) * H + o_h).to(tl.int64)[:, None] * K + o_k[None, :]
    return tl.load(k + p_s, mask=m, other=0.0), tl.load(G + p_s, mask=m, other=0.0)


@triton.jit
def _diag_token_row_pairs(q, k, G, beta, Aqk_out, Tinv_out, t0, row, r0, o_h, o_k, m, m_h, scale,
                          H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                          INTERPRET: tl.constexpr):
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
                k_s, G_s = _diag_token_row(k, G, t0, r0 + j, o_h, o_k, m, H, K)
                _diag_token_pair(b_q, b_kb, b_L, k_s, G_s, Aqk_out, Tinv_out, r0 + j, row, p_t, m_h, scale, BT)
    else:
        for j in range(0, row - r0 + 1):
            k_s, G_s = _diag_token_row(k, G, t0, r0 + j, o_h, o_k, m, H, K)
            _diag_token_pair(b_q, b_kb, b_L, k_s, G_s, Aqk_out, Tinv_out, r0 + j, row, p_t, m_h, scale, BT)


@triton.jit
def chunk_kda_fwd_diag_token_kernel(
    q, k, G, beta, Aqk_out, Tinv_out, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr,
    INTERPRET: tl.constexpr = False, UNSAFE_ONLY: tl.constexpr = False, diag_unsafe=None,
):
    """Per (row of a chunk, group of BH heads) — grid (NT * BT, cdiv(H, BH)): row t's share of the diagonal
    [BC, BC] block of the pair matrices (``diag_impl = "tokens"``), only the pairs s <= t: A_kk[t, s] and
    A_qk[t, s] = sum_c x_t k_s exp(G_t - G_s) for the earlier rows s of t's sub-block, one [BH, BK] step each,
    the loop running to t only. Writes scale * A_qk[t, s] (s <= t) to ``Aqk_out`` and beta_t * A_kk[t, s]
    (0 at s = t) to ``Tinv_out``; the zeros above the diagonal are the off-diagonal kernel's (its accumulators
    are exactly 0 there). s <= t within one sequence, so G_t <= G_s for decaying gates and the exponent needs no
    clamp (fp32 rounding is monotone: the cumsum of terms <= 0 never rises). Base 2 on log2(e) G, with beta
    folded into row t's k.

    With UNSAFE_ONLY (``diag_impl = "dots"``, the fallback of the off-diagonal kernel's diagonal blocks) the grid
    is (NT * BT // BC, cdiv(H, BH)), one program per diagonal block, and only the blocks flagged in
    ``diag_unsafe`` [NT, H, BT // BC] for one of the program's heads are written, row by row; the others return
    after one load (a per-row grid would spend ~0.08 ms at T = 8k, H = 32 only starting programs that return)."""
    i_p, i_hb = tl.program_id(0), tl.program_id(1)
    o_h = i_hb * BH + tl.arange(0, BH)
    o_k = tl.arange(0, BK)
    m_h = o_h < H
    m = m_h[:, None] & (o_k < K)[None, :]
    if UNSAFE_ONLY:
        i_c = i_p // (BT // BC)
        r0 = i_p % (BT // BC) * BC
        flagged = tl.load(diag_unsafe + (i_c * H + o_h) * (BT // BC) + r0 // BC, mask=m_h, other=0)
        if tl.max(flagged, 0) == 0:
            return
        t0, n_rows = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
        if INTERPRET:
            for i in range(0, BC):
                if r0 + i < n_rows:
                    _diag_token_row_pairs(q, k, G, beta, Aqk_out, Tinv_out, t0, r0 + i, r0, o_h, o_k, m, m_h, scale,
                                          H, K, BT, BC, INTERPRET)
        else:
            for row in range(r0, tl.minimum(r0 + BC, n_rows)):
                _diag_token_row_pairs(q, k, G, beta, Aqk_out, Tinv_out, t0, row, r0, o_h, o_k, m, m_h, scale,
                                      H, K, BT, BC, INTERPRET)
    else:
        i_c = i_p // BT
        row = i_p % BT
        t0, n_rows = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
        if row < n_rows:
            _diag_token_row_pairs(q, k, G, beta, Aqk_out, Tinv_out, t0, row, row // BC * BC, o_h, o_k, m, m_h, scale,
                                  H, K, BT, BC, INTERPRET)


@triton.jit
def _offdiag_routed(acc_qk, acc_kk, b_q, b_k, b_G, r, d0, d1, d2, dt: tl.constexpr, DOT_PREC: tl.constexpr,
                    SPLIT: tl.constexpr):
    """One K slice of ``chunk_kda_fwd_offdiag_kernel``'s blocks below the diagonal blocks, the decay routed through
    the exit rows d0, d1, d2 ([BKS] each): three dots per matrix (only acc_qk with SPLIT)."""
    # column side: each row's own exit reference (block 3 is never a column block here)
    d_own = tl.where(r == 0, d0[None, :], tl.where(r == 1, d1[None, :], d2[None, :]))
    kR = b_k * tl.exp(tl.minimum(d_own - b_G, 0.0))
    # row side: the exit reference of the block before (block 0 is never a row block here)
    d_prev = tl.where(r == 1, d0[None, :], tl.where(r == 2, d1[None, :], d2[None, :]))
    e_L = tl.exp(tl.minimum(b_G - d_prev, 0.0))
    kL = b_k * e_L
    qL = b_q * e_L
    f20 = tl.exp(tl.minimum(d1 - d0, 0.0))[None, :]  # exp(d_{i-1} - d_j) for (i, j) = (2, 0), (3, 0), (3, 1)
    f30 = tl.exp(tl.minimum(d2 - d0, 0.0))[None, :]
    f31 = tl.exp(tl.minimum(d2 - d1, 0.0))[None, :]
    s0 = tl.where(r == 1, 1.0, tl.where(r == 2, f20, tl.where(r == 3, f30, 0.0)))  # [BT, BKS]
    s1 = tl.where(r == 2, 1.0, tl.where(r == 3, f31, 0.0))
    s2 = tl.where(r == 3, 1.0, 0.0)  # [BT, 1]
    R0 = tl.trans(tl.where(r == 0, kR, 0.0).to(dt))  # [BKS, BT]
    R1 = tl.trans(tl.where(r == 1, kR, 0.0).to(dt))
    R2 = tl.trans(tl.where(r == 2, kR, 0.0).to(dt))
    acc_qk += _dot((qL * s0).to(dt), R0, DOT_PREC)
    acc_qk += _dot((qL * s1).to(dt), R1, DOT_PREC)
    acc_qk += _dot((qL * s2).to(dt), R2, DOT_PREC)
    if not SPLIT:
        acc_kk += _dot((kL * s0).to(dt), R0, DOT_PREC)
        acc_kk += _dot((kL * s1).to(dt), R1, DOT_PREC)
        acc_kk += _dot((kL * s2).to(dt), R2, DOT_PREC)
    return acc_qk, acc_kk


@triton.jit
def _diag_dots_column(acc_qk, acc_kk, b_q, b_k, b_G, kR, r, d_j, j: tl.constexpr, DIAG_CAP: tl.constexpr,
                      dt: tl.constexpr, DOT_PREC: tl.constexpr):
    """Column block j of ``chunk_kda_fwd_offdiag_kernel`` with DIAG_DOTS, one K slice: rows in blocks >= j times
    exp(G - d_j) (<= 1 below block j, capped in it), against kR = k exp(d_own - G) in block j's columns."""
    e = tl.exp(tl.minimum(b_G - d_j[None, :], DIAG_CAP))
    R = tl.trans(tl.where(r == j, kR, 0.0).to(dt))  # [BKS, BT]
    acc_qk += _dot(tl.where(r >= j, b_q * e, 0.0).to(dt), R, DOT_PREC)
    acc_kk += _dot(tl.where(r >= j, b_k * e, 0.0).to(dt), R, DOT_PREC)
    return acc_qk, acc_kk


@triton.jit
def chunk_kda_fwd_offdiag_kernel(
    q, k, g, G, beta, Aqk_out, Tinv_out, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BKS: tl.constexpr,
    CUMSUM: tl.constexpr, OPS_16BIT: tl.constexpr, DOT_PREC: tl.constexpr, SOLVE: tl.constexpr = False,
    SOLVE_REGS: tl.constexpr = True, SPLIT: tl.constexpr = False, ZERO_DIAG: tl.constexpr = False,
    DIAG_DOTS: tl.constexpr = False, diag_unsafe=None, DIAG_CAP: tl.constexpr = 60.0,
    STORE_QGKD: tl.constexpr = False, qg_out=None, kd_out=None,
):
    """Per (chunk, head) — grid (NT, H), or (NT, H, 2) with SPLIT: the off-diagonal blocks (i, j), i > j, of the
    pair matrices
    A_kk[t, s] = sum_c k_t k_s exp(G_t - G_s) and A_qk[t, s] (q_t for k_t), over the whole chunk, from the stored
    G — or, with CUMSUM, computing G from g per K slice (a cumsum over the chunk's rows) and storing it, in place
    of ``chunk_kda_fwd_cumsum_kernel`` (the diagonal kernel then runs after this one).

    Decay routing. Let d_j be G at the last row of sub-block j (j = 0, 1, 2; the chunk's last valid row if the
    chunk ends sooner). For t in block i > j and s in block j, G_t <= d_{i-1} <= d_j <= G_s, so
        exp(G_t - G_s) = exp(G_t - d_{i-1}) * exp(d_{i-1} - d_j) * exp(d_j - G_s),
    three factors with exponents <= 0 each (a single reference row per chunk cannot do this: rows before it would
    need positive exponents). The first is one [BT, BKS] exponential per row (its block's entry reference), the
    last one per column (its own block's exit reference), the middle one a [BKS] vector per block pair. Column
    block j then needs the left rows scaled by the middle factor of their block against j, and zero in blocks
    <= j: L_j = x exp(G - d_{blk-1}) * where(blk > j, exp(d_{blk-1} - d_j), 0), R_j = where(blk == j,
    k exp(d_j - G), 0), and A = sum_{j<3} L_j R_j^T — per K slice three [BT, BKS] x [BKS, BT] dots per matrix
    accumulating into one [BT, BT] tile (one wgmma tile of 64 rows; equivalently one dot over 3 BKS inner
    columns), whose diagonal blocks and upper part come out exactly 0. The per-row-block alternative (reference
    d_{i-1} on both sides, [16, BKS] x [BKS, 16 i] per block row) has M = 16: mma.sync, not wgmma; this way does 8x
    the (idle) tensor-core work of the useful blocks but every dot is M = 64. Exponents are clamped at 0 (the
    clamp acts only on entries that are masked, or on positive gates), so g = -1000 gives exact zeros and
    nothing overflows.

    Writes scale * A_qk to ``Aqk_out`` and beta * A_kk to ``Tinv_out`` (fp32) for every column outside the
    diagonal blocks (zeros above them) and the zeros above the diagonal inside them; the diagonal blocks' lower
    triangles are the diagonal kernel's. With ZERO_DIAG (the diagonal kernel runs after this one) the whole tile
    is stored, exact zeros in the diagonal blocks, which the diagonal kernel then overwrites: a store masked by
    rows only. With OPS_16BIT
    the dot operands (each factor <= 1) are rounded to the inputs' dtype, else fp32 (tf32 on 16-bit inputs).
    With SOLVE (``solve_impl = "offdiag"``; the diagonal kernel has run before and written its blocks) the program
    then turns its chunk of ``Tinv`` into T = (I + A)^-1 (``_ut_solve``), so the WY kernel only streams.
    With STORE_QGKD (``offdiag_qgkd``) the program also writes the state pass's operands scale q exp(G) and
    K exp(G_last - G) from the tiles it holds (G_last = d_3), so the WY kernel reads neither q nor writes them.
    With SPLIT (``offdiag_split``) each program builds one of the two matrices (A_kk for program_id(2) = 0, else
    A_qk): one [BT, BT] accumulator instead of two, twice the programs.

    With DIAG_DOTS (``diag_impl = "dots"``) the diagonal blocks come out of the dots too, and the decay takes one
    reference per column block instead of the routing: with d_j the exit row of block j (d_3 the chunk's last
    valid row), exp(G_t - G_s) = exp(G_t - d_j) * exp(d_j - G_s) for s in block j and t at or below it, so column
    block j is one dot per matrix (``_diag_dots_column``), four in all. The column factor's exponent is <= 0, and
    so is the row factor's below block j; inside block j it is >= 0, at most the block's decay range a_j = max over
    its rows and K of G_t - d_j, and it is capped at DIAG_CAP (``_diag_cap``: e^60 ~ 1e26, so no factor, product
    or garbage entry above the diagonal can overflow fp32 or bf16; e^6 for fp16 operands). Where a_j <= DIAG_CAP
    (every block of moderate gates) the block is exact up to the operands' rounding, as the blocks below it are;
    where a_j > DIAG_CAP the cap made it wrong, and the program
    writes 1 to ``diag_unsafe`` [NT, H, BT // BC] (else 0) so that ``chunk_kda_fwd_diag_token_kernel`` with
    UNSAFE_ONLY recomputes exactly those blocks element-wise. The entries above the diagonal are masked to 0 at
    the store.
    """
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_m = tl.program_id(2)
    t0, n_rows = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    dt = q.dtype.element_ty if OPS_16BIT else tl.float32
    o_t = tl.arange(0, BT)
    r = (o_t // BC)[:, None]  # [BT, 1] each row's sub-block
    # the exit rows of sub-blocks 0, 1, 2 (always valid rows)
    e0 = tl.minimum(BC - 1, n_rows - 1)
    e1 = tl.minimum(2 * BC - 1, n_rows - 1)
    e2 = tl.minimum(3 * BC - 1, n_rows - 1)
    e3 = n_rows - 1
    m_valid = (o_t < n_rows)[:, None]
    rng = tl.zeros([BT], dtype=tl.float32)  # DIAG_DOTS: each row's largest G_t - d_own over K
    acc_kk = tl.zeros([BT, BT], dtype=tl.float32)
    acc_qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, BK // BKS):
        col0 = i_k * BKS
        o_d = col0 + tl.arange(0, BKS)
        m_d = o_d < K
        if CUMSUM:
            b_G = tl.cumsum(_load_cols(g, t0, 0, col0, n_rows, i_h, H, K, BT, BKS).to(tl.float32), 0)  # [BT, BKS]
            _store_cols(G, b_G, t0, 0, col0, n_rows, i_h, H, K, BT, BKS)
            # the exit rows, picked out of the tile (a reduction over rows with one nonzero term: exact)
            d0 = tl.sum(tl.where(o_t[:, None] == e0, b_G, 0.0), 0)  # [BKS]
            d1 = tl.sum(tl.where(o_t[:, None] == e1, b_G, 0.0), 0)
            d2 = tl.sum(tl.where(o_t[:, None] == e2, b_G, 0.0), 0)
            if DIAG_DOTS or STORE_QGKD:
                d3 = tl.sum(tl.where(o_t[:, None] == e3, b_G, 0.0), 0)
        else:
            d0 = tl.load(G + ((t0 + e0) * H + i_h) * K + o_d, mask=m_d, other=0.0)  # [BKS]
            d1 = tl.load(G + ((t0 + e1) * H + i_h) * K + o_d, mask=m_d, other=0.0)
            d2 = tl.load(G + ((t0 + e2) * H + i_h) * K + o_d, mask=m_d, other=0.0)
            if DIAG_DOTS or STORE_QGKD:
                d3 = tl.load(G + ((t0 + e3) * H + i_h) * K + o_d, mask=m_d, other=0.0)
            b_G = _load_cols(G, t0, 0, col0, n_rows, i_h, H, K, BT, BKS)  # [BT, BKS] fp32; 0 past the end
        b_k = _load_cols(k, t0, 0, col0, n_rows, i_h, H, K, BT, BKS).to(tl.float32)
        if SPLIT:  # one matrix per program: A_kk (i_m = 0) or A_qk; its left rows in b_q
            if i_m == 0:
                b_q = b_k
            else:
                b_q = _load_cols(q, t0, 0, col0, n_rows, i_h, H, K, BT, BKS).to(tl.float32)
        else:
            b_q = _load_cols(q, t0, 0, col0, n_rows, i_h, H, K, BT, BKS).to(tl.float32)
        if STORE_QGKD and (not SPLIT or i_m == 1):  # the state pass's operands, in place of the WY kernel
            _store_cols(kd_out, b_k * tl.exp(d3[None, :] - b_G), t0, 0, col0, n_rows, i_h, H, K, BT, BKS)
            _store_cols(qg_out, scale * b_q * tl.exp(b_G), t0, 0, col0, n_rows, i_h, H, K, BT, BKS)
        if DIAG_DOTS:  # column block j against every row at or below it, with the reference d_j on both sides
            d_own = tl.where(r == 0, d0[None, :], tl.where(r == 1, d1[None, :],
                                                            tl.where(r == 2, d2[None, :], d3[None, :])))
            a_own = b_G - d_own
            rng = tl.maximum(rng, tl.max(tl.where(m_valid, a_own, 0.0), 1))
            kR = b_k * tl.exp(tl.minimum(-a_own, 0.0))
            acc_qk, acc_kk = _diag_dots_column(acc_qk, acc_kk, b_q, b_k, b_G, kR, r, d0, 0, DIAG_CAP, dt, DOT_PREC)
            acc_qk, acc_kk = _diag_dots_column(acc_qk, acc_kk, b_q, b_k, b_G, kR, r, d1, 1, DIAG_CAP, dt, DOT_PREC)
            acc_qk, acc_kk = _diag_dots_column(acc_qk, acc_kk, b_q, b_k, b_G, kR, r, d2, 2, DIAG_CAP, dt, DOT_PREC)
            acc_qk, acc_kk = _diag_dots_column(acc_qk, acc_kk, b_q, b_k, b_G, kR, r, d3, 3, DIAG_CAP, dt, DOT_PREC)
        else:
            acc_qk, acc_kk = _offdiag_routed(acc_qk, acc_kk, b_q, b_k, b_G, r, d0, d1, d2, dt, DOT_PREC, SPLIT)

    # the lower triangles of the diagonal blocks are written separately; their upper parts are 0 here (exactly)
    if DIAG_DOTS:  # every block from the dots: the entries above the diagonal (garbage, finite) are masked
        acc_qk = tl.where(o_t[None, :] <= o_t[:, None], acc_qk, 0.0)
        acc_kk = tl.where(o_t[None, :] < o_t[:, None], acc_kk, 0.0)
        unsafe = tl.max(tl.reshape(rng, [BT // BC, BC]), 1) > DIAG_CAP  # [BT // BC] per diagonal block
        tl.store(diag_unsafe + (i_c * H + i_h) * (BT // BC) + tl.arange(0, BT // BC), unsafe.to(tl.int32))
    if ZERO_DIAG or DIAG_DOTS:
        m = (o_t < n_rows)[:, None] & (o_t < BT)[None, :]
    else:
        m = (o_t < n_rows)[:, None] & ((r != (o_t // BC)[None, :]) | (o_t[:, None] < o_t[None, :]))
    p = ((t0 + o_t).to(tl.int64)[:, None] * H + i_h) * BT + o_t[None, :]
    b_b = _load_vec(beta, t0, 0, n_rows, i_h, H, BT)
    if SPLIT:  # acc_qk holds this program's matrix
        if i_m == 0:
            tl.store(Tinv_out + p, b_b[:, None] * acc_qk, mask=m)
        else:
            tl.store(Aqk_out + p, (scale * acc_qk).to(Aqk_out.dtype.element_ty), mask=m)
    else:
        tl.store(Aqk_out + p, (scale * acc_qk).to(Aqk_out.dtype.element_ty), mask=m)
        tl.store(Tinv_out + p, b_b[:, None] * acc_kk, mask=m)
    if SOLVE:
        tl.debug_barrier()  # the blocks just stored are read back as 16x16 tiles, across threads
        _ut_solve(Tinv_out, t0, n_rows, i_h, H, BT, BC, SOLVE_REGS)


@triton.jit
def _ut_merge(T00, T11, T22, T33, A10, A20, A21, A30, A31, A32):
    """The blocks below the diagonal of T = (I + A)^-1 from its inverted diagonal blocks T_ii and A's blocks below
    the diagonal: T_ij = -T_ii sum_{j <= m < i} A_im T_mj, in fp32."""
    T10 = -_dot_exact(T11, _dot_exact(A10, T00))
    T21 = -_dot_exact(T22, _dot_exact(A21, T11))
    T20 = -_dot_exact(T22, _dot_exact(A20, T00) + _dot_exact(A21, T10))
    T32 = -_dot_exact(T33, _dot_exact(A32, T22))
    T31 = -_dot_exact(T33, _dot_exact(A31, T11) + _dot_exact(A32, T21))
    T30 = -_dot_exact(T33, _dot_exact(A30, T00) + _dot_exact(A31, T10) + _dot_exact(A32, T20))
    return T10, T20, T21, T30, T31, T32


@triton.jit
def _store_ut(ptr, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33, t0, n_rows, i_h, H: tl.constexpr,
              BT: tl.constexpr, BC: tl.constexpr):
    """One chunk of T = (I + A)^-1 into ``ptr`` [T_total, H, BT] from its ten lower [BC, BC] blocks: all sixteen
    blocks, the zeros above the diagonal included, rounded to ptr's dtype."""
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    _store_block(ptr, T00, t0, 0, 0, n_rows, i_h, H, BT, BC)
    _store_block(ptr, zero, t0, 0, BC, n_rows, i_h, H, BT, BC)
    _store_block(ptr, zero, t0, 0, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(ptr, zero, t0, 0, 3 * BC, n_rows, i_h, H, BT, BC)
    _store_block(ptr, T10, t0, BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(ptr, T11, t0, BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(ptr, zero, t0, BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(ptr, zero, t0, BC, 3 * BC, n_rows, i_h, H, BT, BC)
    _store_block(ptr, T20, t0, 2 * BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(ptr, T21, t0, 2 * BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(ptr, T22, t0, 2 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(ptr, zero, t0, 2 * BC, 3 * BC, n_rows, i_h, H, BT, BC)
    _store_block(ptr, T30, t0, 3 * BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(ptr, T31, t0, 3 * BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(ptr, T32, t0, 3 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(ptr, T33, t0, 3 * BC, 3 * BC, n_rows, i_h, H, BT, BC)


@triton.jit
def _ut_solve(Tinv, t0, n_rows, i_h, H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
              SOLVE_REGS: tl.constexpr, T16=None, STORE16: tl.constexpr = False):
    """In place on one chunk of ``Tinv``: A = beta * A_kk (strictly lower, fp32, every block written) on entry,
    T = (I + A)^-1 on exit. The four diagonal blocks are inverted by forward substitution reading A's rows from
    memory, or with SOLVE_REGS from the blocks loaded whole, as the Neumann product (``_inv_unit_lower_regs``);
    then the block merge T_ij = -T_ii sum_{j <= m < i} A_im T_mj, in fp32. The zeros above the diagonal blocks are
    left as they are. With STORE16 T is also written, rounded to T16's dtype, to ``T16`` (every block, the zeros
    above the diagonal included)."""
    A10 = _load_block(Tinv, t0, BC, 0, n_rows, i_h, H, BT, BC)
    A20 = _load_block(Tinv, t0, 2 * BC, 0, n_rows, i_h, H, BT, BC)
    A21 = _load_block(Tinv, t0, 2 * BC, BC, n_rows, i_h, H, BT, BC)
    A30 = _load_block(Tinv, t0, 3 * BC, 0, n_rows, i_h, H, BT, BC)
    A31 = _load_block(Tinv, t0, 3 * BC, BC, n_rows, i_h, H, BT, BC)
    A32 = _load_block(Tinv, t0, 3 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    if SOLVE_REGS:
        T00 = _inv_unit_lower_regs(_load_block(Tinv, t0, 0, 0, n_rows, i_h, H, BT, BC), BC)
        T11 = _inv_unit_lower_regs(_load_block(Tinv, t0, BC, BC, n_rows, i_h, H, BT, BC), BC)
        T22 = _inv_unit_lower_regs(_load_block(Tinv, t0, 2 * BC, 2 * BC, n_rows, i_h, H, BT, BC), BC)
        T33 = _inv_unit_lower_regs(_load_block(Tinv, t0, 3 * BC, 3 * BC, n_rows, i_h, H, BT, BC), BC)
    else:
        T00 = _inv_unit_lower(Tinv, t0, 0, n_rows, i_h, H, BT, BC)
        T11 = _inv_unit_lower(Tinv, t0, BC, n_rows, i_h, H, BT, BC)
        T22 = _inv_unit_lower(Tinv, t0, 2 * BC, n_rows, i_h, H, BT, BC)
        T33 = _inv_unit_lower(Tinv, t0, 3 * BC, n_rows, i_h, H, BT, BC)
    tl.debug_barrier()  # every read of A is done before T overwrites it
    T10, T20, T21, T30, T31, T32 = _ut_merge(T00, T11, T22, T33, A10, A20, A21, A30, A31, A32)
    _store_block(Tinv, T00, t0, 0, 0, n_rows, i_h, H, BT, BC)
    _store_block(Tinv, T10, t0, BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(Tinv, T11, t0, BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv, T20, t0, 2 * BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(Tinv, T21, t0, 2 * BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv, T22, t0, 2 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv, T30, t0, 3 * BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(Tinv, T31, t0, 3 * BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv, T32, t0, 3 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Tinv, T33, t0, 3 * BC, 3 * BC, n_rows, i_h, H, BT, BC)
    if STORE16:
        _store_ut(T16, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33, t0, n_rows, i_h, H, BT, BC)


@triton.jit
def chunk_kda_fwd_solve_kernel(Tinv, T16, cu_seqlens, chunk_indices, H: tl.constexpr, BT: tl.constexpr,
                               BC: tl.constexpr, SOLVE_REGS: tl.constexpr, STORE16: tl.constexpr = False):
    """Per (chunk, head) — grid (NT, H): only the UT transform (``_ut_solve``), for ``solve_impl = "kernel"``. A
    short dependent chain of small products with little memory traffic, so it is launched with few warps and
    many programs per SM hide each other's latency; the WY kernel after it is then a pure streaming pass. With
    STORE16 also T in the inputs' dtype to ``T16``, for the WY kernel's 16-bit products (``wy_ops_16bit``)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, n_rows = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    _ut_solve(Tinv, t0, n_rows, i_h, H, BT, BC, SOLVE_REGS, T16, STORE16)


@triton.jit
def chunk_kda_fwd_wy_kernel(
    q, k, v, beta, G, Tinv, T16, w_out, u_out, qg_out, kd_out, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BKW: tl.constexpr,
    BVW: tl.constexpr, SOLVE: tl.constexpr, SOLVE_REGS: tl.constexpr, DOT_PREC: tl.constexpr,
    LOAD16: tl.constexpr = False, STORE_QGKD: tl.constexpr = True,
):
    """Per (chunk, head) — grid (NT, H): the UT transform (with SOLVE; else ``Tinv`` already holds T), the WY
    factors and the state pass's decayed operands.

    With SOLVE, ``Tinv`` holds A = beta * A_kk (strictly lower, fp32) from the pair kernels on entry and
    T = (I + A)^-1 on exit (``_ut_solve``). Then, K in blocks of BKW: W = T (beta exp(G) K), scale q exp(G),
    K exp(G_last - G); V in blocks of BVW: U = T (beta V). G is measured from the chunk start, so every exponent
    is <= 0. With LOAD16 (the solve kernel has run and stored T rounded to the inputs' dtype in ``T16``) the
    products take T from there, on 16-bit operands.
    """
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, n_rows = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    if SOLVE:
        _ut_solve(Tinv, t0, n_rows, i_h, H, BT, BC, SOLVE_REGS)
        tl.debug_barrier()  # T is read back whole, across threads
    _wy_factors(q, k, v, beta, G, T16 if LOAD16 else Tinv, w_out, u_out, qg_out, kd_out, t0, n_rows, i_h, scale,
                H, K, V, BT, BKW, BVW, DOT_PREC, STORE_QGKD)


@triton.jit
def _wy_k_block(q, k, beta, G, b_T, w_out, qg_out, kd_out, t0, n_rows, i_h, col0, scale,
                H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BKW: tl.constexpr, DOT_PREC: tl.constexpr,
                STORE_QGKD: tl.constexpr = True):
    """K columns [col0, col0 + BKW) of W = T (beta exp(G) K), scale q exp(G) and K exp(G_last - G), with T
    [BT, BT] already loaded (fp32, or the inputs' dtype for 16-bit dots)."""
    o_d = tl.arange(0, BKW)
    b_b = _load_vec(beta, t0, 0, n_rows, i_h, H, BT)
    b_G = _load_cols(G, t0, 0, col0, n_rows, i_h, H, K, BT, BKW)  # [BT, BKW] fp32; 0 past the end
    b_k = _load_cols(k, t0, 0, col0, n_rows, i_h, H, K, BT, BKW).to(tl.float32)
    b_w = _dot(b_T, (b_b[:, None] * b_k * tl.exp(b_G)).to(b_T.dtype), DOT_PREC)
    _store_cols(w_out, b_w, t0, 0, col0, n_rows, i_h, H, K, BT, BKW)
    if STORE_QGKD:  # else the off-diagonal kernel has stored them (``offdiag_qgkd``)
        G_last = tl.load(G + ((t0 + n_rows - 1) * H + i_h) * K + col0 + o_d, mask=col0 + o_d < K, other=0.0)
        _store_cols(kd_out, b_k * tl.exp(G_last[None, :] - b_G), t0, 0, col0, n_rows, i_h, H, K, BT, BKW)
        b_q = _load_cols(q, t0, 0, col0, n_rows, i_h, H, K, BT, BKW).to(tl.float32)
        _store_cols(qg_out, scale * b_q * tl.exp(b_G), t0, 0, col0, n_rows, i_h, H, K, BT, BKW)


@triton.jit
def _wy_v_block(v, beta, b_T, u_out, t0, n_rows, i_h, col0, H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                BVW: tl.constexpr, DOT_PREC: tl.constexpr):
    """V columns [col0, col0 + BVW) of U = T (beta V), with T [BT, BT] already loaded."""
    b_b = _load_vec(beta, t0, 0, n_rows, i_h, H, BT)
    b_v = _load_cols(v, t0, 0, col0, n_rows, i_h, H, V, BT, BVW).to(tl.float32)
    b_u = _dot(b_T, (b_b[:, None] * b_v).to(b_T.dtype), DOT_PREC)
    _store_cols(u_out, b_u, t0, 0, col0, n_rows, i_h, H, V, BT, BVW)


@triton.jit
def _wy_factors(q, k, v, beta, G, Tinv, w_out, u_out, qg_out, kd_out, t0, n_rows, i_h, scale,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BKW: tl.constexpr,
                BVW: tl.constexpr, DOT_PREC: tl.constexpr, STORE_QGKD: tl.constexpr = True):
    """With T = (I + A)^-1 stored in ``Tinv`` and G in ``G`` for this chunk: W = T (beta exp(G) K) and the state
    pass's operands scale q exp(G), K exp(G_last - G), K in blocks of BKW; U = T (beta V), V in blocks of BVW."""
    b_T = _load_rows_raw(Tinv, t0, n_rows, i_h, H, BT, BT, BT)  # [BT, BT] as stored; rows past the end read 0
    for i_b in range(0, tl.cdiv(K, BKW)):
        _wy_k_block(q, k, beta, G, b_T, w_out, qg_out, kd_out, t0, n_rows, i_h, i_b * BKW, scale,
                    H, K, BT, BKW, DOT_PREC, STORE_QGKD)
    for i_b in range(0, tl.cdiv(V, BVW)):
        _wy_v_block(v, beta, b_T, u_out, t0, n_rows, i_h, i_b * BVW, H, V, BT, BVW, DOT_PREC)


@triton.jit
def chunk_kda_fwd_wy_block_kernel(
    q, k, v, beta, G, Tinv, T16, w_out, u_out, qg_out, kd_out, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BKW: tl.constexpr, BVW: tl.constexpr,
    OPS_16BIT: tl.constexpr, DOT_PREC: tl.constexpr, LOAD16: tl.constexpr = False, STORE_QGKD: tl.constexpr = True,
):
    """Per (column block, chunk, head) — grid (cdiv(K, BKW) + cdiv(V, BVW), NT, H): one block of the WY
    kernel's columns (``wy_split``): K blocks first (W, scale q exp(G), K exp(G_last - G)), then V blocks (U),
    from T already in ``Tinv``. Each program reloads the chunk's T (from L2: the column blocks of one chunk are
    neighbours in the grid), for several times the programs in flight of the per-chunk kernel. With OPS_16BIT
    T and the right-hand operands are rounded to the inputs' dtype for the products (fp32 accumulation); T is then
    read from ``T16`` when LOAD16 (the solve kernel's 16-bit copy: half the bytes each program loads)."""
    i_b, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, n_rows = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    if LOAD16:
        b_T = _load_rows_raw(T16, t0, n_rows, i_h, H, BT, BT, BT)  # [BT, BT] in the inputs' dtype
    else:
        b_T = _load_rows_raw(Tinv, t0, n_rows, i_h, H, BT, BT, BT)  # [BT, BT] fp32; rows past the end read 0
        if OPS_16BIT:
            b_T = b_T.to(q.dtype.element_ty)
    NKB: tl.constexpr = (K + BKW - 1) // BKW
    if i_b < NKB:
        _wy_k_block(q, k, beta, G, b_T, w_out, qg_out, kd_out, t0, n_rows, i_h, i_b * BKW, scale,
                    H, K, BT, BKW, DOT_PREC, STORE_QGKD)
    else:
        _wy_v_block(v, beta, b_T, u_out, t0, n_rows, i_h, (i_b - NKB) * BVW, H, V, BT, BVW, DOT_PREC)


@triton.jit
def _inv_unit_lower_regs(A, BC: tl.constexpr):
    """(I + A)^-1 of a strictly lower [BC, BC] block held in registers (BC = 16), as the finite Neumann product
    (I - A)(I + A^2)(I + A^4)(I + A^8): A is nilpotent (A^16 = 0), so the product is exact in exact arithmetic.
    Six fp32 products of [BC, BC] blocks instead of sixteen dependent substitution steps over rows in memory."""
    o_c = tl.arange(0, BC)
    eye = tl.where(o_c[:, None] == o_c[None, :], 1.0, 0.0)
    A2 = _dot_exact(A, A)
    A4 = _dot_exact(A2, A2)
    A8 = _dot_exact(A4, A4)
    X = eye - A
    X += _dot_exact(X, A2)
    X += _dot_exact(X, A4)
    X += _dot_exact(X, A8)
    return X


@triton.jit
def chunk_kda_fwd_intra_kernel(
    q, k, v, g, beta, G_out, Aqk_out, Tinv_out, w_out, u_out, qg_out, kd_out, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    BKS: tl.constexpr, BKW: tl.constexpr, BVW: tl.constexpr, OPS_16BIT: tl.constexpr, DIAG_LEVELS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Per (chunk, head) — grid (NT, H): the whole per-chunk forward in one program (``pairs_impl = "fused"``):
    G, the pair matrices, the UT transform and the WY factors, with the pair matrices kept in registers as
    [BC, BC] blocks (a 64-row chunk is four sub-blocks 0..3; block (i, j) holds rows of sub-block i against
    columns of sub-block j).

    1. K in slices of BKS columns: G per sub-block as a cumsum of g plus the carry c_i = G at the last row of
       sub-block i (stored to ``G_out``); the six off-diagonal blocks (i > j) of A_kk and A_qk as [BC, BKS] x
       [BKS, BC] dots, the decay routed through the exit rows: exp(G_t - G_s) = exp(G_t - c_{i-1})
       exp(c_{i-1} - c_j) exp(c_j - G_s) for t in block i, s in block j (each exponent <= 0).
    2. The four diagonal blocks from the stored G: with DIAG_LEVELS on the tensor cores by levels of the pair
       index (``_diag_levels``), else element-wise one column per step (``_diag_rows``).
    3. With A = beta A_kk: T_ii = (I + A_ii)^-1 (``_inv_unit_lower_regs``), then the block merge
       T_ij = -T_ii sum_{j <= m < i} A_im T_mj, in fp32; T and scale A_qk are stored whole (zeros above).
    4. W, U, scale q exp(G), K exp(G_last - G) from the stored T and G (``_wy_factors``).
    Writes the same tensors as the split kernels, so the backward is shared.
    """
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, n_rows = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    dt = q.dtype.element_ty if OPS_16BIT else tl.float32
    qk10 = tl.zeros([BC, BC], dtype=tl.float32)
    kk10 = tl.zeros([BC, BC], dtype=tl.float32)
    qk20 = tl.zeros([BC, BC], dtype=tl.float32)
    kk20 = tl.zeros([BC, BC], dtype=tl.float32)
    qk21 = tl.zeros([BC, BC], dtype=tl.float32)
    kk21 = tl.zeros([BC, BC], dtype=tl.float32)
    qk30 = tl.zeros([BC, BC], dtype=tl.float32)
    kk30 = tl.zeros([BC, BC], dtype=tl.float32)
    qk31 = tl.zeros([BC, BC], dtype=tl.float32)
    kk31 = tl.zeros([BC, BC], dtype=tl.float32)
    qk32 = tl.zeros([BC, BC], dtype=tl.float32)
    kk32 = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(0, BK // BKS):
        col0 = i_k * BKS
        # [BC, BKS] per sub-block; rows past the chunk's end read g = 0, so G there repeats the last valid row
        g0 = _load_cols(g, t0, 0, col0, n_rows, i_h, H, K, BC, BKS).to(tl.float32)
        g1 = _load_cols(g, t0, BC, col0, n_rows, i_h, H, K, BC, BKS).to(tl.float32)
        g2 = _load_cols(g, t0, 2 * BC, col0, n_rows, i_h, H, K, BC, BKS).to(tl.float32)
        g3 = _load_cols(g, t0, 3 * BC, col0, n_rows, i_h, H, K, BC, BKS).to(tl.float32)
        c0 = tl.sum(g0, 0)  # [BKS] G at the last row of each sub-block
        c1 = c0 + tl.sum(g1, 0)
        c2 = c1 + tl.sum(g2, 0)
        G0 = tl.cumsum(g0, 0)
        G1 = c0[None, :] + tl.cumsum(g1, 0)
        G2 = c1[None, :] + tl.cumsum(g2, 0)
        G3 = c2[None, :] + tl.cumsum(g3, 0)
        _store_cols(G_out, G0, t0, 0, col0, n_rows, i_h, H, K, BC, BKS)
        _store_cols(G_out, G1, t0, BC, col0, n_rows, i_h, H, K, BC, BKS)
        _store_cols(G_out, G2, t0, 2 * BC, col0, n_rows, i_h, H, K, BC, BKS)
        _store_cols(G_out, G3, t0, 3 * BC, col0, n_rows, i_h, H, K, BC, BKS)
        k0 = _load_cols(k, t0, 0, col0, n_rows, i_h, H, K, BC, BKS).to(tl.float32)
        k1 = _load_cols(k, t0, BC, col0, n_rows, i_h, H, K, BC, BKS).to(tl.float32)
        k2 = _load_cols(k, t0, 2 * BC, col0, n_rows, i_h, H, K, BC, BKS).to(tl.float32)
        k3 = _load_cols(k, t0, 3 * BC, col0, n_rows, i_h, H, K, BC, BKS).to(tl.float32)
        q1 = _load_cols(q, t0, BC, col0, n_rows, i_h, H, K, BC, BKS).to(tl.float32)
        q2 = _load_cols(q, t0, 2 * BC, col0, n_rows, i_h, H, K, BC, BKS).to(tl.float32)
        q3 = _load_cols(q, t0, 3 * BC, col0, n_rows, i_h, H, K, BC, BKS).to(tl.float32)
        # the clamps only guard against positive gates; for g <= 0 every exponent here is <= 0 already
        R0 = k0 * tl.exp(tl.minimum(c0[None, :] - G0, 0.0))  # column side: own block's exit row
        R1 = k1 * tl.exp(tl.minimum(c1[None, :] - G1, 0.0))
        R2 = k2 * tl.exp(tl.minimum(c2[None, :] - G2, 0.0))
        e1 = tl.exp(tl.minimum(G1 - c0[None, :], 0.0))  # row side: the block before's exit row
        e2 = tl.exp(tl.minimum(G2 - c1[None, :], 0.0))
        e3 = tl.exp(tl.minimum(G3 - c2[None, :], 0.0))
        f20 = tl.exp(tl.minimum(c1 - c0, 0.0))[None, :]  # exp(c_{i-1} - c_j) for (i, j) = (2, 0), (3, 0), (3, 1)
        f30 = tl.exp(tl.minimum(c2 - c0, 0.0))[None, :]
        f31 = tl.exp(tl.minimum(c2 - c1, 0.0))[None, :]
        R0t = tl.trans(R0.to(dt))  # [BKS, BC]
        R1t = tl.trans(R1.to(dt))
        R2t = tl.trans(R2.to(dt))
        R20t = tl.trans((R0 * f20).to(dt))
        R30t = tl.trans((R0 * f30).to(dt))
        R31t = tl.trans((R1 * f31).to(dt))
        Lq = (q1 * e1).to(dt)
        Lk = (k1 * e1).to(dt)
        qk10 = tl.dot(Lq, R0t, qk10, input_precision=DOT_PREC)
        kk10 = tl.dot(Lk, R0t, kk10, input_precision=DOT_PREC)
        Lq = (q2 * e2).to(dt)
        Lk = (k2 * e2).to(dt)
        qk20 = tl.dot(Lq, R20t, qk20, input_precision=DOT_PREC)
        kk20 = tl.dot(Lk, R20t, kk20, input_precision=DOT_PREC)
        qk21 = tl.dot(Lq, R1t, qk21, input_precision=DOT_PREC)
        kk21 = tl.dot(Lk, R1t, kk21, input_precision=DOT_PREC)
        Lq = (q3 * e3).to(dt)
        Lk = (k3 * e3).to(dt)
        qk30 = tl.dot(Lq, R30t, qk30, input_precision=DOT_PREC)
        kk30 = tl.dot(Lk, R30t, kk30, input_precision=DOT_PREC)
        qk31 = tl.dot(Lq, R31t, qk31, input_precision=DOT_PREC)
        kk31 = tl.dot(Lk, R31t, kk31, input_precision=DOT_PREC)
        qk32 = tl.dot(Lq, R2t, qk32, input_precision=DOT_PREC)
        kk32 = tl.dot(Lk, R2t, kk32, input_precision=DOT_PREC)
    tl.debug_barrier()  # G is stored; the diagonal blocks read it back row by row, across threads

    o_c = tl.arange(0, BC)
    m_le = o_c[:, None] >= o_c[None, :]
    m_lt = o_c[:, None] > o_c[None, :]
    b0 = _load_vec(beta, t0, 0, n_rows, i_h, H, BC)[:, None]
    b1 = _load_vec(beta, t0, BC, n_rows, i_h, H, BC)[:, None]
    b2 = _load_vec(beta, t0, 2 * BC, n_rows, i_h, H, BC)[:, None]
    b3 = _load_vec(beta, t0, 3 * BC, n_rows, i_h, H, BC)[:, None]
    zero = tl.zeros([BC, BC], dtype=tl.float32)

    # A_qk: scale, lower with the diagonal, zeros above
    kk00, qk00 = _diag_block(q, k, G_out, t0, 0, n_rows, i_h, H, K, BC, BK, dt, DIAG_LEVELS, DOT_PREC)
    _store_block(Aqk_out, tl.where(m_le, scale * qk00, 0.0), t0, 0, 0, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, zero, t0, 0, BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, zero, t0, 0, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, zero, t0, 0, 3 * BC, n_rows, i_h, H, BT, BC)
    kk11, qk11 = _diag_block(q, k, G_out, t0, BC, n_rows, i_h, H, K, BC, BK, dt, DIAG_LEVELS, DOT_PREC)
    _store_block(Aqk_out, scale * qk10, t0, BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, tl.where(m_le, scale * qk11, 0.0), t0, BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, zero, t0, BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, zero, t0, BC, 3 * BC, n_rows, i_h, H, BT, BC)
    kk22, qk22 = _diag_block(q, k, G_out, t0, 2 * BC, n_rows, i_h, H, K, BC, BK, dt, DIAG_LEVELS, DOT_PREC)
    _store_block(Aqk_out, scale * qk20, t0, 2 * BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, scale * qk21, t0, 2 * BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, tl.where(m_le, scale * qk22, 0.0), t0, 2 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, zero, t0, 2 * BC, 3 * BC, n_rows, i_h, H, BT, BC)
    kk33, qk33 = _diag_block(q, k, G_out, t0, 3 * BC, n_rows, i_h, H, K, BC, BK, dt, DIAG_LEVELS, DOT_PREC)
    _store_block(Aqk_out, scale * qk30, t0, 3 * BC, 0, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, scale * qk31, t0, 3 * BC, BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, scale * qk32, t0, 3 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    _store_block(Aqk_out, tl.where(m_le, scale * qk33, 0.0), t0, 3 * BC, 3 * BC, n_rows, i_h, H, BT, BC)

    # the UT transform on A = beta A_kk (strictly lower)
    T00 = _inv_unit_lower_regs(tl.where(m_lt, b0 * kk00, 0.0), BC)
    T11 = _inv_unit_lower_regs(tl.where(m_lt, b1 * kk11, 0.0), BC)
    T22 = _inv_unit_lower_regs(tl.where(m_lt, b2 * kk22, 0.0), BC)
    T33 = _inv_unit_lower_regs(tl.where(m_lt, b3 * kk33, 0.0), BC)
    A10 = b1 * kk10
    A20 = b2 * kk20
    A21 = b2 * kk21
    A30 = b3 * kk30
    A31 = b3 * kk31
    A32 = b3 * kk32
    T10, T20, T21, T30, T31, T32 = _ut_merge(T00, T11, T22, T33, A10, A20, A21, A30, A31, A32)
    _store_ut(Tinv_out, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33, t0, n_rows, i_h, H, BT, BC)
    tl.debug_barrier()  # T is read back whole, across threads
    _wy_factors(q, k, v, beta, G_out, Tinv_out, w_out, u_out, qg_out, kd_out, t0, n_rows, i_h, scale,
                H, K, V, BT, BKW, BVW, DOT_PREC)


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


def _diag_cap(dtype: torch.dtype, ops_16bit: bool) -> float:
    """The largest exponent of a diagonal block's row factor in the off-diagonal kernel's dots (``diag_impl =
    "dots"``): e^60 ~ 1e26 leaves fp32 and bf16 room for any product and sum of them; fp16 operands (largest
    65504) take e^6 ~ 403, so more of their blocks go to the element-wise fallback."""
    return 6.0 if ops_16bit and dtype == torch.float16 else 60.0


def _launch_diag(q, k, G, beta, Aqk, Tinv, scale, layout, H, K, BK, prec, diag_unsafe=None):
    """The diagonal pair blocks of ``pairs_impl = "chunk"`` (``FWD_CONFIG["diag_impl"]``), from the stored G; for
    "dots" only the blocks the off-diagonal kernel flagged in ``diag_unsafe``."""
    c = FWD_CONFIG
    if c["diag_impl"] in ("tokens", "dots"):
        BH = min(triton.next_power_of_2(H), c["diag_heads"] if diag_unsafe is None else c["diag_fallback_heads"])
        rows = CHUNK // SUB_CHUNK if diag_unsafe is not None else CHUNK  # programs per chunk
        chunk_kda_fwd_diag_token_kernel[(layout.NT * rows, triton.cdiv(H, BH))](
            q, k, G, beta, Aqk, Tinv, layout.cu_seqlens, layout.chunk_indices, scale,
            H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, BH=BH, INTERPRET=interpreting(),
            UNSAFE_ONLY=diag_unsafe is not None, diag_unsafe=diag_unsafe, num_warps=c["diag_token_warps"],
            num_stages=1,
        )
    else:
        chunk_kda_fwd_diag_kernel[(CHUNK // SUB_CHUNK, layout.NT, H)](
            q, k, G, beta, Aqk, Tinv, layout.cu_seqlens, layout.chunk_indices, scale,
            H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, LEVELS=c["diag_levels"],
            OPS_16BIT=c["pairs_ops_16bit"], DOT_PREC=prec, num_warps=c["diag_warps"], num_stages=1,
        )


def chunk_fwd(q, k, v, g, beta, scale, h0, output_final_state, layout):
    """Forward launcher: packed q, k [TT, H, K], v [TT, H, V], g fp32, beta [TT, H] -> (o, final state or None,
    the intermediates the backward reads: G, A_qk, T, W, U, q~ exp(G), K exp(G_last - G))."""
    TT, H, K = q.shape
    V = v.shape[-1]
    BK, BVf = pad_dim(K), pad_dim(V)
    dev, dt = q.device, q.dtype
    prec = dot_precision(dt)
    G = new_buffer(TT, H, K, device=dev, dtype=torch.float32)
    Aqk = new_buffer(TT, H, CHUNK, device=dev, dtype=dt)
    Tinv = new_buffer(TT, H, CHUNK, device=dev, dtype=torch.float32)  # also the UT transform's scratch
    w = new_buffer(TT, H, K, device=dev, dtype=dt)
    u = new_buffer(TT, H, V, device=dev, dtype=dt)
    qg = new_buffer(TT, H, K, device=dev, dtype=dt)
    kd = new_buffer(TT, H, K, device=dev, dtype=dt)
    if layout.NT > 0:
        c = FWD_CONFIG
        # with 16-bit W / U products after the solve kernel, T rounded to the inputs' dtype is stored by it once
        ops16 = c["wy_ops_16bit"] and dt != torch.float32
        T16 = (new_buffer(TT, H, CHUNK, device=dev, dtype=dt)
               if ops16 and c["wy_t16"] and c["pairs_impl"] == "chunk" and c["solve_impl"] == "kernel" else None)
        qgkd_done = c["pairs_impl"] == "chunk" and c["offdiag_qgkd"]  # the off-diagonal kernel stores qg, kd
        if c["pairs_impl"] == "subblock":
            chunk_kda_fwd_pairs_kernel[(CHUNK // SUB_CHUNK, layout.NT, H)](
                q, k, g, beta, G, Aqk, Tinv, layout.cu_seqlens, layout.chunk_indices, scale,
                H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, BKS=min(BK, c["pairs_bks"]),
                OPS_16BIT=c["pairs_ops_16bit"], DIAG_ROWS=c["pairs_diag_rows"],
                DOT_PREC=prec, num_warps=c["pairs_warps"], num_stages=c["pairs_stages"],
            )
        elif c["pairs_impl"] == "chunk":
            solve = c["solve_impl"]
            if solve not in ("wy", "kernel", "offdiag"):
                raise ValueError(f"FWD_CONFIG['solve_impl'] must be 'wy', 'kernel' or 'offdiag', got {solve!r}")
            if c["diag_impl"] not in ("blocks", "tokens", "dots"):
                raise ValueError(f"FWD_CONFIG['diag_impl'] must be 'blocks', 'tokens' or 'dots', "
                                 f"got {c['diag_impl']!r}")
            dots = c["diag_impl"] == "dots"
            diag_unsafe = (torch.empty(layout.NT, H, CHUNK // SUB_CHUNK, device=dev, dtype=torch.int32)
                           if dots else None)
            if solve == "offdiag" and c["offdiag_cumsum"]:
                raise ValueError("FWD_CONFIG: solve_impl 'offdiag' needs the diagonal blocks before the off-diagonal "
                                 "kernel, offdiag_cumsum needs them after it; set one of them otherwise")
            if not c["offdiag_cumsum"]:
                BKG = min(BK, c["cumsum_block"])
                chunk_kda_fwd_cumsum_kernel[(layout.NT, H, triton.cdiv(K, BKG))](
                    g, G, layout.cu_seqlens, layout.chunk_indices, H=H, K=K, BT=CHUNK, BKG=BKG, num_warps=4,
                )
            if solve == "offdiag":
                _launch_diag(q, k, G, beta, Aqk, Tinv, scale, layout, H, K, BK, prec)
            if solve == "offdiag" and c["offdiag_split"]:
                raise ValueError("FWD_CONFIG: offdiag_split builds A_kk and A_qk in different programs; "
                                 "solve_impl 'offdiag' needs the whole A_kk in one, set one of them otherwise")
            if dots and (solve == "offdiag" or c["offdiag_split"]):
                raise ValueError("FWD_CONFIG: diag_impl 'dots' builds the diagonal blocks in the off-diagonal kernel "
                                 "with both matrices in one program, before the diagonal fallback; it cannot take "
                                 "solve_impl 'offdiag' or offdiag_split")
            chunk_kda_fwd_offdiag_kernel[(layout.NT, H, 2 if c["offdiag_split"] else 1)](
                q, k, g, G, beta, Aqk, Tinv, layout.cu_seqlens, layout.chunk_indices, scale,
                H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, BKS=min(BK, c["offdiag_bks"]), CUMSUM=c["offdiag_cumsum"],
                OPS_16BIT=c["pairs_ops_16bit"], DOT_PREC=prec, SOLVE=solve == "offdiag",
                SOLVE_REGS=c["wy_solve_regs"], SPLIT=c["offdiag_split"], ZERO_DIAG=solve != "offdiag",
                DIAG_DOTS=dots, diag_unsafe=diag_unsafe, DIAG_CAP=_diag_cap(dt, c["pairs_ops_16bit"]),
                STORE_QGKD=c["offdiag_qgkd"], qg_out=qg, kd_out=kd,
                num_warps=c["offdiag_warps"],
                num_stages=c["offdiag_stages"],
            )
            if solve != "offdiag":
                _launch_diag(q, k, G, beta, Aqk, Tinv, scale, layout, H, K, BK, prec, diag_unsafe)
            if solve == "kernel":
                chunk_kda_fwd_solve_kernel[(layout.NT, H)](
                    Tinv, T16 if T16 is not None else Tinv, layout.cu_seqlens, layout.chunk_indices, H=H, BT=CHUNK,
                    BC=SUB_CHUNK, SOLVE_REGS=c["wy_solve_regs"], STORE16=T16 is not None,
                    num_warps=c["solve_warps"], num_stages=1,
                )
        elif c["pairs_impl"] != "fused":
            raise ValueError(f"FWD_CONFIG['pairs_impl'] must be 'subblock', 'chunk' or 'fused', "
                             f"got {c['pairs_impl']!r}")
        if c["pairs_impl"] == "fused":
            chunk_kda_fwd_intra_kernel[(layout.NT, H)](
                q, k, v, g, beta, G, Aqk, Tinv, w, u, qg, kd, layout.cu_seqlens, layout.chunk_indices, scale,
                H=H, K=K, V=V, BT=CHUNK, BC=SUB_CHUNK, BK=BK, BKS=min(BK, c["intra_bks"]),
                BKW=min(BK, c["wy_block"]), BVW=min(BVf, c["wy_block"]), OPS_16BIT=c["pairs_ops_16bit"],
                DIAG_LEVELS=c["diag_levels"], DOT_PREC=prec, num_warps=c["intra_warps"], num_stages=c["intra_stages"],
            )
        elif c["wy_split"] and c["pairs_impl"] == "chunk" and c["solve_impl"] != "wy":
            BKW, BVW = min(BK, c["wy_split_block"]), min(BVf, c["wy_split_block"])
            chunk_kda_fwd_wy_block_kernel[(triton.cdiv(K, BKW) + triton.cdiv(V, BVW), layout.NT, H)](
                q, k, v, beta, G, Tinv, T16 if T16 is not None else Tinv, w, u, qg, kd, layout.cu_seqlens,
                layout.chunk_indices, scale, H=H, K=K, V=V, BT=CHUNK, BKW=BKW, BVW=BVW, OPS_16BIT=ops16,
                DOT_PREC=prec, LOAD16=T16 is not None, STORE_QGKD=not qgkd_done, num_warps=c["wy_split_warps"],
                num_stages=1,
            )
        else:
            chunk_kda_fwd_wy_kernel[(layout.NT, H)](
                q, k, v, beta, G, Tinv, T16 if T16 is not None else Tinv, w, u, qg, kd, layout.cu_seqlens,
                layout.chunk_indices, scale,
                H=H, K=K, V=V, BT=CHUNK, BC=SUB_CHUNK, BKW=min(BK, c["wy_block"]), BVW=min(BVf, c["wy_block"]),
                SOLVE=c["pairs_impl"] != "chunk" or c["solve_impl"] == "wy", SOLVE_REGS=c["wy_solve_regs"],
                DOT_PREC=prec, LOAD16=T16 is not None, STORE_QGKD=not qgkd_done, num_warps=c["wy_warps"],
                num_stages=c["wy_stages"],
            )
    o = new_buffer(TT, H, V, device=dev, dtype=dt)
    ht = new_buffer(layout.N, H, K, V, device=dev, dtype=torch.float32) if output_final_state else None
    BV = _bv(V, "state_bv")
    fused = CONFIG["fused_output"] or layout.NT == 0
    h = o if fused else new_buffer(layout.NT, H, K, V, device=dev, dtype=dt)
    vn = o if fused else new_buffer(TT, H, V, device=dev, dtype=dt)
    launch_fitting(
        chunk_kda_fwd_state_kernel, lambda bv: (triton.cdiv(V, bv), layout.N * H), BV, state_stages(dt),
        qg, kd, w, u, G, Aqk, o, h0 if h0 is not None else o, ht if ht is not None else o, h, vn,
        layout.cu_seqlens, layout.chunk_offsets, dtype=dt,
        H=H, K=K, V=V, BT=CHUNK, BK=BK, USE_H0=h0 is not None, STORE_HT=ht is not None, STORE_O=fused,
        STORE_H=not fused, DOT_PREC=prec, INTERPRET=interpreting(), num_warps=CONFIG["state_warps"],
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
    c, f = CONFIG, FWD_CONFIG
    BK, BVf = pad_dim(K), pad_dim(V)
    common = dict(H=H, K=K, V=V, BT=CHUNK, BK=BK, DOT_PREC="tf32")
    return [
        (chunk_kda_fwd_pairs_kernel, dict(H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, BKS=min(BK, f["pairs_bks"]),
                                          OPS_16BIT=f["pairs_ops_16bit"], DIAG_ROWS=f["pairs_diag_rows"],
                                          DOT_PREC="tf32"), f["pairs_warps"],
         f["pairs_stages"]),
        (chunk_kda_fwd_cumsum_kernel, dict(H=H, K=K, BT=CHUNK, BKG=min(BK, f["cumsum_block"])), 4, 1),
        (chunk_kda_fwd_diag_kernel, dict(H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, LEVELS=f["diag_levels"],
                                         OPS_16BIT=f["pairs_ops_16bit"], DOT_PREC="tf32"), f["diag_warps"], 1),
        (chunk_kda_fwd_diag_token_kernel, dict(H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK,
                                               BH=min(triton.next_power_of_2(H), f["diag_heads"]),
                                               UNSAFE_ONLY=f["diag_impl"] == "dots"),
         f["diag_token_warps"], 1),
        (chunk_kda_fwd_offdiag_kernel, dict(H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, BKS=min(BK, f["offdiag_bks"]),
                                            CUMSUM=f["offdiag_cumsum"], OPS_16BIT=f["pairs_ops_16bit"],
                                            DOT_PREC="tf32", SOLVE=f["solve_impl"] == "offdiag",
                                            SOLVE_REGS=f["wy_solve_regs"], SPLIT=f["offdiag_split"],
                                            ZERO_DIAG=f["solve_impl"] != "offdiag",
                                            DIAG_DOTS=f["diag_impl"] == "dots", STORE_QGKD=f["offdiag_qgkd"]),
         f["offdiag_warps"], f["offdiag_stages"]),
        (chunk_kda_fwd_solve_kernel, dict(H=H, BT=CHUNK, BC=SUB_CHUNK, SOLVE_REGS=f["wy_solve_regs"]),
         f["solve_warps"], 1),
        (chunk_kda_fwd_intra_kernel, dict(H=H, K=K, V=V, BT=CHUNK, BC=SUB_CHUNK, BK=BK, BKS=min(BK, f["intra_bks"]),
                                          BKW=min(BK, f["wy_block"]), BVW=min(BVf, f["wy_block"]),
                                          OPS_16BIT=f["pairs_ops_16bit"], DIAG_LEVELS=f["diag_levels"],
                                          DOT_PREC="tf32"), f["intra_warps"], f["intra_stages"]),
        (chunk_kda_fwd_wy_kernel, dict(H=H, K=K, V=V, BT=CHUNK, BC=SUB_CHUNK, BKW=min(BK, f["wy_block"]),
                                       BVW=min(BVf, f["wy_block"]), SOLVE=f["solve_impl"] == "wy",
                                       SOLVE_REGS=f["wy_solve_regs"], DOT_PREC="tf32"),
         f["wy_warps"], f["wy_stages"]),
        (chunk_kda_fwd_wy_block_kernel, dict(H=H, K=K, V=V, BT=CHUNK, BKW=min(BK, f["wy_split_block"]),
                                             BVW=min(BVf, f["wy_split_block"]), OPS_16BIT=f["wy_ops_16bit"],
                                             DOT_PREC="tf32"), f["wy_split_warps"], 1),
        (chunk_kda_fwd_state_kernel, dict(common, BV=min(BVf, c["state_bv"]), USE_H0=True, STORE_HT=True,
                                          STORE_O=c["fused_output"], STORE_H=not c["fused_output"],
                                          INTERPRET=False), c["state_warps"], c["state_stages"]),
        (chunk_kda_fwd_output_kernel, dict(common, BV=min(BVf, c["output_bv"])), 4, 1),
    ]
