"""Backward stage 1: the reverse pass over the chunks for the state gradients.

Per chunk, with q~ exp(G) (``qg``), K exp(gamma - G) (``kd``), W, A_qk from the forward and dS' the gradient of the
state leaving the chunk (dS_T, or zero, for the last chunk of a sequence):

    dV_new = A_qk^T dO + (K exp(gamma - G)) dS'
    dS     = exp(gamma) dS' + (q~ exp G)^T dO - W^T dV_new        (the gradient of the state entering the chunk)

One program per (V block, sequence, head) walks its chunks from the last, carrying dS [K, BV] in fp32 registers.
It stores dS' of every chunk (``dh``, what the state-gradient stage reads), dV_new, and dS of the first chunk (dh0).
The whole K width is one block (K <= 256); where the configured V block and prefetch depth do not fit the shared
memory (K = 256, fp32), ``launch_fitting`` takes a shallower depth or a narrower V block. Products take the inputs'
dtype (16-bit operands with fp32 accumulation, or fp32 for fp32 inputs); G stays fp32 and only gamma - G <= 0 and
gamma <= 0 are exponentiated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_common import CHUNK, launch_fitting
from kimi_linear.ops.triton_helpers import (
    dot,
    dot_precision,
    interpreting,
    load_last,
    load_rows_raw,
    new_buffer,
    pad_dim,
    sequence_prologue,
    tile,
)

if TYPE_CHECKING:
    from kimi_linear.ops.kda.chunk_bwd import BwdLaunch


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
    b_do = tl.load(tile(do, t0, i_h, o_v, H, V, BT), mask=m_tv, other=0.0).to(dt)  # [BT, BV]
    b_A = load_rows_raw(Aqk, t0, n_rows, i_h, H, BT, BT, BT)  # [BT, BT]
    b_kd = load_rows_raw(kd, t0, n_rows, i_h, H, K, BT, BK)
    b_qg = load_rows_raw(qg, t0, n_rows, i_h, H, K, BT, BK)
    b_w = load_rows_raw(w, t0, n_rows, i_h, H, K, BT, BK)
    b_dvn = dot(tl.trans(b_A), b_do, DOT_PREC) + dot(b_kd, dS.to(dt), DOT_PREC)
    tl.store(tile(dvn_out, t0, i_h, o_v, H, V, BT), b_dvn.to(dvn_out.dtype.element_ty), mask=m_tv)
    G_last = load_last(G, t0, n_rows, i_h, H, K, BK)
    dS = dS * tl.exp(G_last)[:, None]
    dS += dot(tl.trans(b_qg), b_do, DOT_PREC)
    dS -= dot(tl.trans(b_w), b_dvn.to(dt), DOT_PREC)
    return dS


@triton.jit
def chunk_kda_bwd_dh_kernel(
    qg, kd, w, G, Aqk, do, dht, dh_out, dvn_out, dh0, cu_seqlens, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    i_n, i_h, bos, eos, n_chunks, c0, o_v, m_kv, o_kv = sequence_prologue(
        cu_seqlens, chunk_offsets, tl.program_id(0), tl.program_id(1), H, K, V, BT, BK, BV)
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


def bwd_state_grads(qg, kd, w, G, Aqk, do, dht, want_dh0: bool, layout, launch: BwdLaunch):
    """dO ``[TT, H, V]`` and dS_T ``[N, H, K, V]`` fp32 (or None) -> (dS' per chunk ``[NT, H, K, V]`` in the inputs'
    dtype, dV_new ``[TT, H, V]``, dh0 ``[N, H, K, V]`` fp32 or None)."""
    TT, H, K = qg.shape
    V = do.shape[-1]
    dev, dt = do.device, do.dtype
    dh = new_buffer(layout.NT, H, K, V, device=dev, dtype=dt)
    dvn = new_buffer(TT, H, V, device=dev, dtype=dt)
    dh0 = new_buffer(layout.N, H, K, V, device=dev, dtype=torch.float32) if want_dh0 else None
    launch_fitting(
        chunk_kda_bwd_dh_kernel, lambda bv: (triton.cdiv(V, bv), layout.N * H), launch.dh_bv, launch.dh_stages,
        qg, kd, w, G, Aqk, do, dht if dht is not None else do, dh, dvn, dh0 if dh0 is not None else do,
        layout.cu_seqlens, layout.chunk_offsets, dtype=dt,
        H=H, K=K, V=V, BT=CHUNK, BK=pad_dim(K), USE_DHT=dht is not None, STORE_DH0=dh0 is not None,
        DOT_PREC=dot_precision(dt), INTERPRET=interpreting(), num_warps=launch.dh_warps,
    )
    return dh, dvn, dh0
