"""The WY factors of chunkwise KDA (paper §3.1): W = T (beta exp(G) K) and U = T (beta V) per chunk.

``chunk_kda_fwd_wy_block_kernel``, one program per (column block, chunk, head): K blocks first (W), then V blocks
(U), each reloading the chunk's T (from L2: the column blocks of one chunk are neighbours in the grid), for several
times the programs in flight of one program per chunk. T comes from the UT solve (``chunk_solve.py``): for 16-bit
inputs the products take T rounded to their dtype (the forward passes the solve's rounded copy, the backward the
fp32 T it kept, rounded on load the same way) with fp32 accumulation; fp32 inputs take fp32 T and fp32
products. G is measured from the chunk start, so every exponent is <= 0. The backward runs this stage again rather
than keeping W and U (two tensors the size of k and v) from the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_common import CHUNK
from kimi_linear.ops.triton_helpers import (
    chunk_rows,
    dot,
    dot_precision,
    load_cols,
    load_rows_raw,
    load_vec,
    new_buffer,
    pad_dim,
    store_cols,
)


@triton.jit
def chunk_kda_fwd_wy_block_kernel(
    k, v, beta, G, T, w_out, u_out, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BKW: tl.constexpr, BVW: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Per (column block, chunk, head) — grid (cdiv(K, BKW) + cdiv(V, BVW), NT, H): columns [col0, col0 + BKW)
    of W = T (beta exp(G) K), or columns [col0, col0 + BVW) of U = T (beta V), with T [BT, BT] from ``T`` rounded
    to k's dtype (the right-hand operand too)."""
    i_b, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, n_rows = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    b_T = load_rows_raw(T, t0, n_rows, i_h, H, BT, BT, BT).to(k.dtype.element_ty)  # [BT, BT]; 0 past the end
    b_b = load_vec(beta, t0, 0, n_rows, i_h, H, BT)
    NKB: tl.constexpr = (K + BKW - 1) // BKW
    if i_b < NKB:
        col0 = i_b * BKW
        b_G = load_cols(G, t0, 0, col0, n_rows, i_h, H, K, BT, BKW)  # [BT, BKW] fp32; 0 past the end
        b_k = load_cols(k, t0, 0, col0, n_rows, i_h, H, K, BT, BKW).to(tl.float32)
        b_w = dot(b_T, (b_b[:, None] * b_k * tl.exp(b_G)).to(b_T.dtype), DOT_PREC)
        store_cols(w_out, b_w, t0, 0, col0, n_rows, i_h, H, K, BT, BKW)
    else:
        col0 = (i_b - NKB) * BVW
        b_v = load_cols(v, t0, 0, col0, n_rows, i_h, H, V, BT, BVW).to(tl.float32)
        b_u = dot(b_T, (b_b[:, None] * b_v).to(b_T.dtype), DOT_PREC)
        store_cols(u_out, b_u, t0, 0, col0, n_rows, i_h, H, V, BT, BVW)


def wy_factors(k, v, beta, G, T, layout, launch):
    """The WY stage: packed k [TT, H, K], v [TT, H, V] (one dtype), beta [TT, H], G fp32, T [TT, H, BT] fp32 or
    in k's dtype -> (W, U) in k's dtype. ``launch``: the forward's ``FwdLaunch``."""
    TT, H, K = k.shape
    V = v.shape[-1]
    w = new_buffer(TT, H, K, device=k.device, dtype=k.dtype)
    u = new_buffer(TT, H, V, device=k.device, dtype=k.dtype)
    if layout.NT > 0:
        BKW, BVW = min(pad_dim(K), launch.wy_block), min(pad_dim(V), launch.wy_block)
        chunk_kda_fwd_wy_block_kernel[(triton.cdiv(K, BKW) + triton.cdiv(V, BVW), layout.NT, H)](
            k, v, beta, G, T, w, u, layout.cu_seqlens, layout.chunk_indices,
            H=H, K=K, V=V, BT=CHUNK, BKW=BKW, BVW=BVW, DOT_PREC=dot_precision(k.dtype),
            num_warps=launch.wy_warps, num_stages=1,
        )
    return w, u


def sm90_build_jobs(H: int, K: int, V: int, dtype: torch.dtype, launch) -> list:
    """(kernel, constexprs, num_warps, num_stages) as ``wy_factors`` launches it."""
    return [(chunk_kda_fwd_wy_block_kernel, dict(H=H, K=K, V=V, BT=CHUNK, BKW=min(pad_dim(K), launch.wy_block),
                                                 BVW=min(pad_dim(V), launch.wy_block),
                                                 DOT_PREC=dot_precision(dtype)), launch.wy_warps, 1)]
