"""Triton backend of ``chunk_kda``: the autograd.Function that drives the chunkwise kernels.

Forward (``chunk_fwd.py``): an intra-chunk stage (cumulative decays, pair matrices, UT transform, WY factors, and the
decayed q/k the state pass reads), then a sequential state pass per (sequence, head, V block) that also writes the
output (or, with ``CONFIG["fused_output"] = False``, writes the states and a parallel pass computes the output).
Backward (``chunk_bwd.py``): the state pass again, writing the state entering each chunk (recomputed, not kept from
the forward), a reverse pass for the state gradients, then two per-chunk stages for dq, dk, dv, dg, dbeta. The
forward keeps its per-token intermediates for the backward (G fp32, A_qk, T fp32, W, U, q~ exp(G), K exp(G_last - G):
about seven tensors the size of q), but no per-chunk states. The optional activations (q/k L2 norm, the gate, the
beta sigmoid) run in PyTorch around the kernels, so autograd differentiates them; a scalar (GDN) gate is broadcast
over K and runs through the same kernels.

Inside, batches are packed: ``[B, T, H, D]`` becomes ``[B * T, H, D]`` with sequence boundaries every T rows, the
same path as ``cu_seqlens`` varlen input. Dot products take the inputs' dtype (bf16/fp16 on tensor cores, fp32
accumulate); fp32 inputs run fp32 products throughout. ``benchmarks/kda_chunk_build.py`` builds the kernels for
sm_90 offline and reports their registers, spills and shared memory.
"""

from __future__ import annotations

import os

import torch
import triton

from kimi_linear.ops.kda.chunk_bwd import (
    chunk_kda_bwd_dg_kernel,
    chunk_kda_bwd_dh_kernel,
    chunk_kda_bwd_inter_kernel,
    chunk_kda_bwd_intra_kernel,
)
from kimi_linear.ops.kda.chunk_fwd import (
    chunk_kda_fwd_intra_kernel,
    chunk_kda_fwd_output_kernel,
    chunk_kda_fwd_state_kernel,
)
from kimi_linear.ops.kda.common import preprocess

CHUNK = 64
SUB_CHUNK = 16

# Tests set this to fill every buffer a kernel is meant to write with NaN first, so an element the kernels leave
# unwritten shows up in the results instead of passing as stale memory.
POISON_BUFFERS = False


def _empty(*shape, device, dtype):
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(*shape, device=device, dtype=dtype)


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


class _Layout:
    """Where each sequence and chunk lives in the packed ``[T_total, ...]`` tensors."""

    def __init__(self, cu_seqlens: torch.Tensor | None, B: int, T: int, device: torch.device):
        if cu_seqlens is None:
            lengths = [T] * B
        else:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        counts = torch.tensor([-(-n // CHUNK) for n in lengths], dtype=torch.int64)
        self.N = len(lengths)
        self.NT = int(counts.sum())
        starts = torch.cumsum(torch.tensor([0] + lengths), 0)
        self.cu_seqlens = starts.to(device=device, dtype=torch.int32)
        self.chunk_offsets = torch.cumsum(torch.cat([counts.new_zeros(1), counts]), 0).to(device, torch.int32)
        seq = torch.repeat_interleave(torch.arange(self.N), counts)  # [NT]
        within = torch.arange(self.NT) - torch.repeat_interleave(self.chunk_offsets.cpu()[:-1].long(), counts)
        self.chunk_indices = torch.stack([seq, within], 1).to(device=device, dtype=torch.int32).contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs ask for fp32 products; for 16-bit inputs tf32 is already finer than the inputs themselves
    return "ieee" if dtype == torch.float32 else "tf32"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Launch settings per kernel; the V block of the sequential passes sets their parallelism (V / BV * N * H programs).
CONFIG = {
    "fused_output": True,  # O inside the sequential state pass, or a parallel pass over stored states
    "output_bv": 64,
    "intra_warps": 8,
    "intra_stages": 1,
    "state_bv": 32,
    "state_warps": 4,
    "state_stages": 2,
    "dh_bv": 32,
    "dh_warps": 4,
    "dh_stages": 2,
    "inter_bv": 64,
    "inter_warps": 8,
    "inter_stages": 1,  # the per-chunk backward holds many dot operands in shared memory; no room to pipeline
    "bwd_intra_split": False,  # one program per sub-block (4x the programs) and a separate reverse cumsum
    "bwd_intra_warps": 8,
    "bwd_intra_stages": 1,
}


def _bv(V: int, key: str) -> int:
    return min(_pad_dim(V), CONFIG[key])


def _fwd(q, k, v, g, beta, scale, h0, output_final_state, layout):
    TT, H, K = q.shape
    V = v.shape[-1]
    BK, BVf = _pad_dim(K), _pad_dim(V)
    dev, dt = q.device, q.dtype
    prec = _dot_precision(dt)
    G = _empty(TT, H, K, device=dev, dtype=torch.float32)
    Aqk = _empty(TT, H, CHUNK, device=dev, dtype=dt)
    Tinv = _empty(TT, H, CHUNK, device=dev, dtype=torch.float32)  # also the UT transform's scratch
    w = _empty(TT, H, K, device=dev, dtype=dt)
    u = _empty(TT, H, V, device=dev, dtype=dt)
    qg = _empty(TT, H, K, device=dev, dtype=dt)
    kd = _empty(TT, H, K, device=dev, dtype=dt)
    if layout.NT > 0:
        chunk_kda_fwd_intra_kernel[(layout.NT, H)](
            q, k, v, g, beta, G, Aqk, Tinv, w, u, qg, kd, layout.cu_seqlens, layout.chunk_indices, scale,
            H=H, K=K, V=V, BT=CHUNK, BC=SUB_CHUNK, BK=BK, BV=BVf, DOT_PREC=prec,
            num_warps=CONFIG["intra_warps"], num_stages=CONFIG["intra_stages"],
        )
    o = _empty(TT, H, V, device=dev, dtype=dt)
    ht = _empty(layout.N, H, K, V, device=dev, dtype=torch.float32) if output_final_state else None
    BV = _bv(V, "state_bv")
    fused = CONFIG["fused_output"] or layout.NT == 0
    h = o if fused else _empty(layout.NT, H, K, V, device=dev, dtype=dt)
    vn = o if fused else _empty(TT, H, V, device=dev, dtype=dt)
    chunk_kda_fwd_state_kernel[(triton.cdiv(V, BV), layout.N * H)](
        qg, kd, w, u, G, Aqk, o, h0 if h0 is not None else o, ht if ht is not None else o, h, vn,
        layout.cu_seqlens, layout.chunk_offsets,
        H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, USE_H0=h0 is not None, STORE_HT=ht is not None, STORE_O=fused,
        STORE_H=not fused, DOT_PREC=prec, INTERPRET=_interpreting(), num_warps=CONFIG["state_warps"],
        num_stages=CONFIG["state_stages"],
    )
    if not fused:
        BVo = _bv(V, "output_bv")
        chunk_kda_fwd_output_kernel[(layout.NT, H, triton.cdiv(V, BVo))](
            qg, Aqk, h, vn, o, layout.cu_seqlens, layout.chunk_indices,
            H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BVo, DOT_PREC=prec, num_warps=4, num_stages=1,
        )
    return o, ht, (G, Aqk, Tinv, w, u, qg, kd)


def _bwd(q, k, v, beta, saved, scale, h0, do, dht, layout):
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


class ChunkKDAFunction(torch.autograd.Function):
    """Packed inputs q, k ``[TT, H, K]``, v ``[TT, H, V]`` (one dtype), g ``[TT, H, K]`` fp32, beta ``[TT, H]``,
    initial state ``[N, H, K, V]`` fp32 or None -> (o ``[TT, H, V]``, final state ``[N, H, K, V]`` or None)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, output_final_state, layout):
        need_bwd = any(ctx.needs_input_grad[:6])
        o, ht, saved = _fwd(q, k, v, g, beta, scale, h0, output_final_state, layout)
        if need_bwd:
            ctx.save_for_backward(q, k, v, beta, h0, *saved)
        ctx.scale, ctx.layout = scale, layout
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, h0, *saved = ctx.saved_tensors
        do = do.contiguous().to(q.dtype)
        dht = None if dht is None else dht.contiguous().float()
        dq, dk, dv, dg, db, dh0 = _bwd(q, k, v, beta, saved, ctx.scale, h0, do, dht, ctx.layout)
        return dq, dk, dv, dg, db.to(beta.dtype), dh0, None, None, None


def chunk_kda_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise KDA on the Triton kernels; arguments already validated by ``chunk_kda`` (see its docstring).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: ``[B, T, H, K]`` or ``[B, T, H]`` (scalar gate);
        beta: ``[B, T, H]``; initial_state: ``[N, H, K, V]`` fp32; cu_seqlens: int ``[N + 1]`` with B = 1.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] fp32 or None)``; differentiable in q, k, v, g,
        beta, initial_state (and A_log, dt_bias through the PyTorch gate).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    scale = K**-0.5 if scale is None else float(scale)
    in_dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, g, beta = preprocess(
        q, k, g, beta, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, K
    )
    # one operand dtype for the dot products: the widest of the inputs (the L2 norm's fp32 result is not an input)
    dt = in_dtypes[0]
    for d in in_dtypes[1:]:
        dt = torch.promote_types(dt, d)
    q, k, v = (x.to(dt).reshape(B * T, H, x.shape[-1]).contiguous() for x in (q, k, v))
    g = g.float().reshape(B * T, H, K).contiguous()
    beta = beta.reshape(B * T, H).contiguous()
    layout = _Layout(cu_seqlens, B, T, q.device)
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = ChunkKDAFunction.apply(q, k, v, g, beta, h0, scale, output_final_state, layout)
    return o.reshape(B, T, H, V).to(out_dtype), ht
