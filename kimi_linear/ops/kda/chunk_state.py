"""The sequential state pass of chunkwise KDA (paper §3.1, the inter-chunk recurrence).

One program per (V block, sequence, head) walks the sequence's chunks carrying the fp32 state S [K, BV]:

    V_new = U - W S,    O = (scale Q exp(G)) S + A_qk V_new,    S <- exp(G_last) S + (K exp(G_last - G))^T V_new

with W, U, A_qk, scale Q exp(G) and K exp(G_last - G) from the per-chunk stages (``chunk_pairs.py``,
``chunk_solve.py``, ``chunk_wy.py``). The forward writes O (and the final state); the backward runs the same pass
again writing the state entering each chunk and V_new instead of keeping them from the forward.

Products take the inputs' dtype on the tensor cores (the state rounded to it), fp32 accumulation; the state itself
stays fp32. The prefetch depth (``StateLaunch.stages``) holds [BT, K] tiles of three or four operands per stage, so
where the chosen depth or V block does not fit the GPU's shared memory (K = 256, fp32 inputs) ``launch_fitting``
takes a shallower depth or a narrower V block that does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_common import CHUNK, launch_fitting, min_stages
from kimi_linear.ops.triton_helpers import (
    dot,
    dot_precision,
    interpreting,
    load_last,
    load_rows_raw,
    pad_dim,
    sequence_prologue,
    tile,
)


@dataclass(frozen=True)
class StateLaunch:
    """Launch settings of the state pass: V block (its parallelism is V / bv * N * H programs), warps, prefetch
    depth over the chunk loop."""

    bv: int = 32
    warps: int = 4
    stages: int = 3


@functools.lru_cache(maxsize=None)
def state_launch(K: int, V: int, dtype: torch.dtype) -> StateLaunch:
    """The state pass's settings for a problem: 3 stages for 16-bit inputs, 2 for fp32 ones (3 would need 256 KB
    of shared memory at K = V = 128), 1 for fp32 ones wider than K = 128 (2 needs 248 KB at K = 256, over the
    limit: ``benchmarks/kda_chunk_build.py --K 256 --dtype fp32``). Starting where it fits spares the first call
    a build that cannot load, which for these fp32 kernels takes seconds to tens of seconds.
    ``launch_fitting`` narrows further where a setting does not fit (16-bit inputs at K = 256)."""
    if dtype == torch.float32:
        return StateLaunch(stages=1 if pad_dim(K) > 128 else 2)
    return StateLaunch(stages=3)


@triton.jit
def _state_step(S, i_t, bos, eos, c0, i_h, qg, kd, w, u, G, Aqk, o, h_out, vnew_out, o_v, m_kv, o_kv,
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
    b_w = load_rows_raw(w, t0, n_rows, i_h, H, K, BT, BK)
    b_u = tl.load(tile(u, t0, i_h, o_v, H, V, BT), mask=m_tv, other=0.0).to(tl.float32)
    b_kd = load_rows_raw(kd, t0, n_rows, i_h, H, K, BT, BK)
    b_S = S.to(dt)
    b_vn = b_u - dot(b_w, b_S, DOT_PREC)  # [BT, BV]
    if STORE_O:
        b_qg = load_rows_raw(qg, t0, n_rows, i_h, H, K, BT, BK)
        b_A = load_rows_raw(Aqk, t0, n_rows, i_h, H, BT, BT, BT)  # [BT, BT]
        b_o = dot(b_qg, b_S, DOT_PREC) + dot(b_A, b_vn.to(dt), DOT_PREC)
        tl.store(tile(o, t0, i_h, o_v, H, V, BT), b_o.to(o.dtype.element_ty), mask=m_tv)
    if STORE_H:
        tl.store(tile(vnew_out, t0, i_h, o_v, H, V, BT), b_vn.to(vnew_out.dtype.element_ty), mask=m_tv)
    G_last = load_last(G, t0, n_rows, i_h, H, K, BK)
    return S * tl.exp(G_last)[:, None] + dot(tl.trans(b_kd), b_vn.to(dt), DOT_PREC)


@triton.jit
def chunk_kda_fwd_state_kernel(
    qg, kd, w, u, G, Aqk, o, h0, ht, h_out, vnew_out, cu_seqlens, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_O: tl.constexpr, STORE_H: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Per (V block, sequence, head) — grid (cdiv(V, BV), N * H): the state pass over the sequence's chunks, from
    h0 (USE_H0) or zero. STORE_O writes O, STORE_HT the final state to ``ht`` [N, H, K, V] fp32, STORE_H the state
    entering each chunk to ``h_out`` [NT, H, K, V] and V_new to ``vnew_out``."""
    i_n, i_h, bos, eos, n_chunks, c0, o_v, m_kv, o_kv = sequence_prologue(
        cu_seqlens, chunk_offsets, tl.program_id(0), tl.program_id(1), H, K, V, BT, BK, BV)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + (i_n * H + i_h) * K * V + o_kv, mask=m_kv, other=0.0)

    if INTERPRET:  # the interpreter cannot take a run-time bound in range()
        i_t = 0
        while i_t < n_chunks:
            S = _state_step(S, i_t, bos, eos, c0, i_h, qg, kd, w, u, G, Aqk, o, h_out, vnew_out, o_v, m_kv,
                            o_kv, H, K, V, BT, BK, BV, STORE_O, STORE_H, DOT_PREC)
            i_t += 1
    else:
        for i_t in range(n_chunks):
            S = _state_step(S, i_t, bos, eos, c0, i_h, qg, kd, w, u, G, Aqk, o, h_out, vnew_out, o_v, m_kv,
                            o_kv, H, K, V, BT, BK, BV, STORE_O, STORE_H, DOT_PREC)

    if STORE_HT:
        tl.store(ht + (i_n * H + i_h) * K * V + o_kv, S, mask=m_kv)


def _launch(launch: StateLaunch, dtype: torch.dtype, *args, V: int, N: int, H: int, **kwargs) -> None:
    if launch.stages < min_stages(dtype):
        raise ValueError(f"StateLaunch.stages must be >= {min_stages(dtype)} for {dtype}, got {launch.stages}: "
                         "see min_stages()")
    launch_fitting(
        chunk_kda_fwd_state_kernel, lambda bv: (triton.cdiv(V, bv), N * H), min(pad_dim(V), launch.bv),
        launch.stages, *args, dtype=dtype, H=H, V=V, BT=CHUNK, DOT_PREC=dot_precision(dtype),
        INTERPRET=interpreting(), num_warps=launch.warps, **kwargs,
    )


def state_pass_output(qg, kd, w, u, G, Aqk, o, h0, ht, layout, launch: StateLaunch) -> None:
    """The forward's pass: writes O into ``o`` [TT, H, V] and, if ``ht`` is given, the final states into it
    ([N, H, K, V] fp32), starting from ``h0`` (or zero)."""
    H, K = qg.shape[1], qg.shape[2]
    V = u.shape[-1]
    _launch(launch, qg.dtype, qg, kd, w, u, G, Aqk, o, h0 if h0 is not None else o, ht if ht is not None else o,
            o, o, layout.cu_seqlens, layout.chunk_offsets, V=V, N=layout.N, H=H, K=K, BK=pad_dim(K),
            USE_H0=h0 is not None, STORE_HT=ht is not None, STORE_O=True, STORE_H=False)


def state_pass_recompute(qg, kd, w, u, G, Aqk, h0, h, vn, layout, launch: StateLaunch) -> None:
    """The backward's recompute: writes the state entering each chunk into ``h`` [NT, H, K, V] and V_new into
    ``vn`` [TT, H, V] (both in the inputs' dtype), starting from ``h0`` (or zero)."""
    H, K = qg.shape[1], qg.shape[2]
    V = u.shape[-1]
    _launch(launch, qg.dtype, qg, kd, w, u, G, Aqk, vn, h0 if h0 is not None else vn, vn, h, vn,
            layout.cu_seqlens, layout.chunk_offsets, V=V, N=layout.N, H=H, K=K, BK=pad_dim(K),
            USE_H0=h0 is not None, STORE_HT=False, STORE_O=False, STORE_H=True)


def sm90_build_jobs(H: int, K: int, V: int, dtype: torch.dtype, launch: StateLaunch) -> list:
    """(kernel, constexprs, num_warps, num_stages) of the pass as the forward launches it, for
    ``benchmarks/kda_chunk_build.py``."""
    BK = pad_dim(K)
    return [(chunk_kda_fwd_state_kernel, dict(H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=min(pad_dim(V), launch.bv),
                                              USE_H0=True, STORE_HT=True, STORE_O=True, STORE_H=False,
                                              DOT_PREC=dot_precision(dtype), INTERPRET=False), launch.warps,
             launch.stages)]
