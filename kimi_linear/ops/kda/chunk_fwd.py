"""The chunkwise KDA forward (paper §3.1) on Triton: the per-chunk stages, then the sequential state pass.

For each chunk of BT = 64 rows (four sub-blocks of BC = 16), with G the chunk-local cumulative log-decay:

1. pairs (``chunk_pairs.py``): G, the pair matrices A_kk (times beta) and A_qk (times scale), and the state pass's
   operands scale q exp(G) and K exp(G_last - G);
2. UT solve (``chunk_solve.py``): T = (I + beta A_kk)^-1;
3. WY (``chunk_wy.py``): W = T (beta exp(G) K), U = T (beta V);
4. state pass (``chunk_state.py``), sequential over each sequence's chunks: V_new = U - W S,
   O = (scale q exp(G)) S + A_qk V_new, S <- exp(G_last) S + (K exp(G_last - G))^T V_new.

The launch settings of all four are one ``FwdLaunch`` value, chosen by ``fwd_launch`` from the problem and passed
down. Layout: every sequence tensor is packed ``[T_total, H, D]`` (contiguous); sequences are delimited by
``cu_seqlens`` and each per-chunk program finds its sequence and chunk in ``chunk_indices`` ``[NT, 2]``.
Limits: K, V <= 256 (padded to powers of two >= 16 inside); BT = 64 and BC = 16 are fixed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from kimi_linear.ops.kda import chunk_pairs, chunk_solve, chunk_state, chunk_wy
from kimi_linear.ops.kda.chunk_pairs import build_pairs
from kimi_linear.ops.kda.chunk_solve import solve_ut
from kimi_linear.ops.kda.chunk_state import StateLaunch, state_launch, state_pass_output
from kimi_linear.ops.kda.chunk_wy import wy_factors
from kimi_linear.ops.triton_helpers import new_buffer


@dataclass(frozen=True)
class FwdLaunch:
    """Launch settings of the forward's kernels (the measured alternatives are in benchmarks/RESULTS.md)."""

    cumsum_block: int = 64  # K columns per program of the cumsum kernel
    offdiag_bks: int = 64  # K columns per step of the off-diagonal kernel
    offdiag_warps: int = 4  # one warpgroup: the [64, BKS] x [BKS, 64] dots are one wgmma tile
    offdiag_stages: int = 1
    fallback_heads: int = 1  # heads per program of the element-wise diagonal fallback
    fallback_warps: int = 1
    solve_warps: int = 2
    wy_block: int = 64  # K / V columns per program of the WY kernel
    wy_warps: int = 4
    state: StateLaunch = field(default_factory=StateLaunch)


@functools.lru_cache(maxsize=None)
def fwd_launch(K: int, V: int, dtype: torch.dtype) -> FwdLaunch:
    """The forward's launch settings for heads of K, V columns and inputs of ``dtype``."""
    return FwdLaunch(state=state_launch(K, V, dtype))


def chunk_fwd(q, k, v, g, beta, scale, h0, output_final_state, layout, launch: FwdLaunch | None = None):
    """Packed q, k [TT, H, K], v [TT, H, V] (one dtype), g [TT, H, K] fp32, beta [TT, H], h0 [N, H, K, V] fp32 or
    None -> (o [TT, H, V], final state [N, H, K, V] fp32 or None, the intermediates the backward reads:
    (G, A_qk, T fp32, W, U, scale q exp(G), K exp(G_last - G)))."""
    TT, H, K = q.shape
    V = v.shape[-1]
    launch = fwd_launch(K, V, q.dtype) if launch is None else launch
    G, Aqk, Tinv, qg, kd = build_pairs(q, k, g, beta, scale, layout, launch)
    T = solve_ut(Tinv, q.dtype, layout, launch)
    w, u = wy_factors(k, v, beta, G, T, layout, launch)
    o = new_buffer(TT, H, V, device=q.device, dtype=q.dtype)
    ht = new_buffer(layout.N, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
    state_pass_output(qg, kd, w, u, G, Aqk, o, h0, ht, layout, launch.state)
    return o, ht, (G, Aqk, Tinv, w, u, qg, kd)


def sm90_build_jobs(H: int, K: int, V: int, dtype: torch.dtype = torch.bfloat16,
                    launch: FwdLaunch | None = None) -> list:
    """(kernel, constexprs, num_warps, num_stages) of every forward kernel as ``chunk_fwd`` launches it, for
    ``benchmarks/kda_chunk_build.py``."""
    launch = fwd_launch(K, V, dtype) if launch is None else launch
    return (chunk_pairs.sm90_build_jobs(H, K, dtype, launch) + chunk_solve.sm90_build_jobs(H, dtype, launch)
            + chunk_wy.sm90_build_jobs(H, K, V, dtype, launch) + chunk_state.sm90_build_jobs(H, K, V, dtype, launch.state))
