"""The chunkwise KDA backward: launch settings and the order of its stages.

With the per-chunk quantities of the forward (``chunk_fwd.py``; q~ = scale q, G the cumulative decay, gamma = G of
the chunk's last row, T = (I + A)^-1 with A = beta A_kk, W = T (beta K exp G), U = T (beta V), A_qk) and the
recomputed states S (entering each chunk) and V_new:

    V_new = U - W S,   O = (q~ exp(G)) S + A_qk V_new,   S' = exp(gamma) S + (K exp(gamma - G))^T V_new

the backward runs, each stage in a file of its own:

0. the state pass of the forward again, storing S per chunk and V_new (nothing per chunk is kept from the forward);
1. ``chunk_bwd_dh``: the reverse pass over the chunks, dS' per chunk, dV_new and dh0;
2. ``chunk_bwd_inter``: per chunk, the gradients through S and dS' (partial dq~, dk, dG and K-block shares of dbeta);
3. ``chunk_bwd_wy``: per chunk, the reductions over V only: dA_qk, dv and the UT-transform gradient dA;
4. ``chunk_bwd_intra``: per sub-block, the gradients through the pair matrices A_qk and A_kk, completing dq, dk,
   dbeta and dG; then dg as the reverse cumulative sum of dG within each chunk.

Products take 16-bit operands where the inputs are 16-bit (states, V_new, dV_new, dO) with fp32 accumulation; the
products with T and the fp32 gradients take fp32 operands (tf32 for 16-bit inputs, full fp32 for fp32 inputs).
Numerics as in the forward: G fp32, only differences <= 0 are exponentiated. Launch settings: ``bwd_launch``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton

from kimi_linear.ops.kda.chunk_bwd_dh import bwd_state_grads, chunk_kda_bwd_dh_kernel
from kimi_linear.ops.kda.chunk_bwd_inter import bwd_through_states, chunk_kda_bwd_inter_kernel
from kimi_linear.ops.kda.chunk_bwd_intra import bwd_pairs, chunk_kda_bwd_dg_kernel, chunk_kda_bwd_intra_kernel
from kimi_linear.ops.kda.chunk_bwd_wy import bwd_wy, chunk_kda_bwd_wy_kernel
from kimi_linear.ops.kda.chunk_common import CHUNK, SUB_CHUNK
from kimi_linear.ops.kda.chunk_state import StateLaunch, state_launch, state_pass_recompute
from kimi_linear.ops.triton_helpers import new_buffer, pad_dim


@dataclasses.dataclass(frozen=True)
class BwdLaunch:
    """Launch settings of the backward's kernels (the state recompute takes the forward's). Blocks are in elements;
    ``*_warps`` / ``*_stages`` are Triton's num_warps / num_stages."""

    dh_bv: int  # V block of the reverse state pass (stage 1): N * H * V / dh_bv programs
    dh_warps: int
    dh_stages: int  # its prefetch depth; launch_fitting steps down where it does not fit (K = 256, 16-bit)
    inter_bk: int  # K block of the state-gradient stage (stage 2): one program per (chunk, head, K block)
    inter_bv: int  # its V block
    inter_warps: int  # 4 spill
    inter_stages: int
    wy_bv: int  # V block of the WY / UT stage (stage 3)
    wy_warps: int
    wy_stages: int
    intra_warps: int  # pair-matrix stage (stage 4), one program per (chunk, head, sub-block)
    intra_stages: int
    # the pairs inside a sub-block by fp32 products where its decay range max(G_t - G_exit) is at most this (the
    # factors reach e^cap: 60 leaves fp32 room), element-wise where it is larger
    intra_diag_cap: float
    dg_warps: int  # reverse cumulative sum of dg


@functools.lru_cache(maxsize=None)
def bwd_launch(K: int, V: int, dtype: torch.dtype) -> BwdLaunch:
    """The shipped launch settings for head sizes K, V and input dtype ``dtype``. Blocks are clipped to the padded
    head size; fp32 inputs take half the V block in stages 2 and 3 (their operands take twice the shared memory).
    The dh pass of fp32 inputs wider than K = 128 prefetches one stage: 2 and 3 do not fit at K = 256, and each
    build that cannot load costs the first call seconds (``benchmarks/kda_chunk_build.py --K 256 --dtype fp32``)."""
    BK, BV = pad_dim(K), pad_dim(V)
    halve = 2 if dtype == torch.float32 else 1
    wide_fp32 = dtype == torch.float32 and BK > 128
    return BwdLaunch(
        dh_bv=min(BV, 32), dh_warps=4, dh_stages=1 if wide_fp32 else 3,
        inter_bk=min(BK, 64), inter_bv=min(BV, 64 // halve), inter_warps=8, inter_stages=2,
        wy_bv=min(BV, 64 // halve), wy_warps=4, wy_stages=2,
        intra_warps=4, intra_stages=1, intra_diag_cap=60.0,
        dg_warps=4,
    )


def _recompute_states(qg, kd, w, u, G, Aqk, h0, layout, state: StateLaunch):
    """The forward's state pass again: the state entering each chunk ``[NT, H, K, V]`` and V_new ``[TT, H, V]``."""
    TT, H, K = qg.shape
    V = u.shape[-1]
    h = new_buffer(layout.NT, H, K, V, device=qg.device, dtype=qg.dtype)
    vn = new_buffer(TT, H, V, device=qg.device, dtype=qg.dtype)
    state_pass_recompute(qg, kd, w, u, G, Aqk, h0, h, vn, layout, state)
    return h, vn


def chunk_bwd(q, k, v, beta, saved, scale, h0, do, dht, layout, launch: BwdLaunch | None = None,
              state: StateLaunch | None = None):
    """The forward's inputs and saved intermediates, dO (and dS_T) -> dq, dk, dv, dg, dbeta, dh0.

    q, k ``[TT, H, K]``, v ``[TT, H, V]`` and ``do`` in one dtype; beta ``[TT, H]``; h0, dht ``[N, H, K, V]`` fp32
    or None. Returns dq, dk in q's dtype, dv in v's, dg and dbeta fp32, dh0 fp32 (None without h0). ``launch``:
    this pass's settings (None: ``bwd_launch``); ``state``: the state recompute's, the forward's (None:
    ``state_launch``).
    """
    G, Aqk, Tinv, w, u, qg, kd = saved
    TT, H, K = q.shape
    V = v.shape[-1]
    launch = launch or bwd_launch(K, V, q.dtype)
    h, vn = _recompute_states(qg, kd, w, u, G, Aqk, h0, layout, state or state_launch(K, V, q.dtype))
    dh, dvn, dh0 = bwd_state_grads(qg, kd, w, G, Aqk, do, dht, h0 is not None, layout, launch)
    if layout.NT == 0:  # no tokens, so no chunk to launch a program for
        dq, dk, dg = (new_buffer(TT, H, K, device=q.device, dtype=d) for d in (q.dtype, q.dtype, torch.float32))
        dv = new_buffer(TT, H, V, device=q.device, dtype=v.dtype)
        return dq, dk, dv, dg, new_buffer(TT, H, device=q.device, dtype=torch.float32), dh0
    dq, dk, dG, dbk = bwd_through_states(q, k, beta, G, Tinv, h, dh, vn, dvn, do, scale, layout, launch)
    dA, dAqk, dv, db = bwd_wy(v, beta, Tinv, vn, dvn, do, dbk, layout, launch)
    dq, dk, dg = bwd_pairs(q, k, beta, G, dq, dk, dG, dA, dAqk, db, scale, layout, launch)
    return dq, dk, dv, dg, db, dh0


def sm90_build_jobs(H: int, K: int, V: int, launch: BwdLaunch | None = None) -> list:
    """(kernel, constexprs, num_warps, num_stages) as the launcher uses them (16-bit inputs unless ``launch`` says
    otherwise), for ``benchmarks/kda_chunk_build.py``."""
    c = launch or bwd_launch(K, V, torch.bfloat16)
    BK = pad_dim(K)
    common = dict(H=H, K=K, V=V, BT=CHUNK, BK=BK, DOT_PREC="tf32")  # the 16-bit inputs' dot precision
    return [
        (chunk_kda_bwd_dh_kernel, dict(common, BV=c.dh_bv, USE_DHT=True, STORE_DH0=True, INTERPRET=False),
         c.dh_warps, c.dh_stages),
        (chunk_kda_bwd_inter_kernel, dict(common, BK=c.inter_bk, BV=c.inter_bv), c.inter_warps, c.inter_stages),
        (chunk_kda_bwd_wy_kernel, dict(H=H, V=V, BT=CHUNK, BV=c.wy_bv, NK=triton.cdiv(K, c.inter_bk),
                                       DOT_PREC="tf32"), c.wy_warps, c.wy_stages),
        (chunk_kda_bwd_intra_kernel, dict(H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, BK=BK, DOT_PREC="tf32",
                                          DIAG_CAP=c.intra_diag_cap), c.intra_warps, c.intra_stages),
        (chunk_kda_bwd_dg_kernel, dict(H=H, K=K, BT=CHUNK, BK=BK), c.dg_warps, 1),
    ]
