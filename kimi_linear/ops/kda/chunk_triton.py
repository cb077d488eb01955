"""Triton backend of ``chunk_kda``: the autograd.Function that drives the chunkwise kernels.

Forward (``chunk_fwd.py``): the per-chunk stages (cumulative decays and pair matrices, UT transform, WY factors, and
the decayed q/k the state pass reads), then a sequential state pass per (sequence, head, V block) that also writes
the output. Backward (``chunk_bwd.py``): the state pass again, writing the state entering each chunk (recomputed,
not kept from the forward), a reverse pass for the state gradients, then the per-chunk stages for dq, dk, dv, dg,
dbeta. For the backward the forward keeps its inputs and the products of its pair and UT stages (A_qk and T fp32:
one and a half tensors the size of q at K = 128), but no per-chunk states; the element-wise ones (G, q~ exp(G),
K exp(G_last - G)) are recomputed by one kernel at the start of the backward, and W, U by the WY stage again (a
light stage, for two tensors the size of k and v not kept between forward and backward).
``chunk_kda_triton_recomputing`` keeps not even the inputs: it takes a function that makes q, k, v, g, beta from
tensors its caller keeps anyway (a layer's projections) and reruns it in backward. The optional activations (q/k
L2 norm, the gate, the beta sigmoid) run in fused Triton kernels before and after the chunk kernels
(``preprocess_triton.py``, with their own backward); a scalar (GDN) gate is broadcast over K and runs through the
same kernels. Launch settings are values (``FwdLaunch``), chosen from the problem unless a caller passes its own.

Inside, batches are packed: ``[B, T, H, D]`` becomes ``[B * T, H, D]`` with sequence boundaries every T rows, the
same path as ``cu_seqlens`` varlen input. Dot products take the inputs' dtype (bf16/fp16 on tensor cores, fp32
accumulate); fp32 inputs run fp32 products throughout. ``benchmarks/kda_chunk_build.py`` builds the kernels for
sm_90 offline and reports their registers, spills and shared memory.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.kda.chunk_bwd import BwdLaunch, bwd_launch, chunk_bwd
from kimi_linear.ops.kda.chunk_common import CHUNK, SUB_CHUNK, layout_for
from kimi_linear.ops.kda.chunk_fwd import FwdLaunch, chunk_fwd, fwd_launch
from kimi_linear.ops.kda.chunk_pairs import decay_operands
from kimi_linear.ops.kda.chunk_wy import wy_factors
from kimi_linear.ops.kda.common import preprocess

__all__ = ["CHUNK", "SUB_CHUNK", "ChunkKDAFunction", "chunk_kda_triton", "chunk_kda_triton_recomputing"]


def _forward(q, k, v, g, beta, h0, scale, output_final_state, layout, fwd):
    """``chunk_fwd`` -> (o, final state or None, what the backward needs besides the inputs: A_qk, T fp32)."""
    o, ht, (_, Aqk, Tinv, _, _, _, _) = chunk_fwd(q, k, v, g, beta, scale, h0, output_final_state, layout, fwd)
    return o, ht, (Aqk, Tinv)


def _backward(q, k, v, g, beta, h0, kept, do, dht, scale, layout, fwd, bwd):
    """``chunk_bwd`` from the forward's inputs and ``kept`` (``_forward``'s): G, q~ exp(G) and K exp(G_last - G)
    are made again first (element-wise, as the forward made them), then W and U (the WY stage on the kept T, which
    it rounds as the forward's solve did). Returns dq, dk, dv, dg, dbeta, dh0."""
    Aqk, Tinv = kept
    G, qg, kd = decay_operands(q, k, g, scale, layout, fwd)
    w, u = wy_factors(k, v, beta, G, Tinv, layout, fwd)
    return chunk_bwd(q, k, v, beta, (G, Aqk, Tinv, w, u, qg, kd), scale, h0, do.contiguous().to(q.dtype), dht,
                     layout, launch=bwd, state=fwd.state)


def _operands(q, k, v, g, beta):
    """``[B, T, H, ·]`` inputs -> the kernels' packed operands ``[B * T, H, ·]``, contiguous: q, k, v in one dtype
    (the widest of the three), g fp32 (a scalar gate ``[B, T, H]`` broadcast over K), beta as it is."""
    B, T, H, K = q.shape
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if g.dim() == 3:
        g = g[..., None].expand(B, T, H, K)
    q, k, v = (x.to(dt).reshape(B * T, H, x.shape[-1]).contiguous() for x in (q, k, v))
    return q, k, v, g.float().reshape(B * T, H, K).contiguous(), beta.reshape(B * T, H).contiguous()


class ChunkKDAFunction(torch.autograd.Function):
    """Packed inputs q, k ``[TT, H, K]``, v ``[TT, H, V]`` (one dtype), g ``[TT, H, K]`` fp32, beta ``[TT, H]``,
    initial state ``[N, H, K, V]`` fp32 or None -> (o ``[TT, H, V]``, final state ``[N, H, K, V]`` or None), with
    the launch settings ``fwd`` (``FwdLaunch``) and ``bwd`` (``BwdLaunch``)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, output_final_state, layout, fwd, bwd):
        need_bwd = any(ctx.needs_input_grad[:6])
        o, ht, kept = _forward(q, k, v, g, beta, h0, scale, output_final_state, layout, fwd)
        if need_bwd:
            ctx.save_for_backward(q, k, v, g, beta, h0, *kept)
        ctx.scale, ctx.layout, ctx.fwd, ctx.bwd = scale, layout, fwd, bwd
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, *kept = ctx.saved_tensors
        dht = None if dht is None else dht.contiguous().float()
        dq, dk, dv, dg, db, dh0 = _backward(q, k, v, g, beta, h0, kept, do, dht, ctx.scale, ctx.layout, ctx.fwd,
                                            ctx.bwd)
        return dq, dk, dv, dg, db.to(beta.dtype), dh0, None, None, None, None, None


class ChunkKDARecomputingFunction(torch.autograd.Function):
    """o ``[B, T, H, V]`` (v's dtype) of ``prepare(*inputs)`` (no initial or final state), keeping ``inputs`` and
    ``_forward``'s matrix products (A_qk, T); the backward reruns ``prepare`` under the forward's autocast state."""

    @staticmethod
    def forward(ctx, prepare, autocast_state, scale, cu_seqlens, fwd, bwd, *inputs):
        q, k, v, g, beta = prepare(*inputs)
        B, T, H, K = q.shape
        V, out_dtype = v.shape[-1], v.dtype
        q, k, v, g, beta = _operands(q, k, v, g, beta)
        ctx.scale = K**-0.5 if scale is None else float(scale)
        ctx.layout = layout_for(cu_seqlens, B, T, q.device)
        ctx.fwd = fwd_launch(K, V, q.dtype) if fwd is None else fwd
        ctx.bwd = bwd_launch(K, V, q.dtype) if bwd is None else bwd
        o, _, kept = _forward(q, k, v, g, beta, None, ctx.scale, False, ctx.layout, ctx.fwd)
        ctx.save_for_backward(*inputs, *kept)
        ctx.prepare, ctx.autocast_state, ctx.n_inputs = prepare, autocast_state, len(inputs)
        return o.reshape(B, T, H, V).to(out_dtype)

    @staticmethod
    def backward(ctx, do):
        saved = ctx.saved_tensors
        inputs, kept = saved[: ctx.n_inputs], saved[ctx.n_inputs :]
        needs = ctx.needs_input_grad[6:]
        detached = [None if t is None else t.detach().requires_grad_(need and t.is_floating_point())
                    for t, need in zip(inputs, needs, strict=True)]
        device_type, enabled, dtype = ctx.autocast_state
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            operands = _operands(*ctx.prepare(*detached))
        q, k, v, g, beta = (x.detach() for x in operands)
        do = do.reshape(q.shape[0], q.shape[1], -1)  # [TT, H, V]
        grads = _backward(q, k, v, g, beta, None, kept, do, None, ctx.scale, ctx.layout, ctx.fwd, ctx.bwd)[:5]
        del q, k, v, g, beta, do
        pairs = [(x, dx.to(x.dtype)) for x, dx in zip(operands, grads, strict=True) if x.requires_grad]
        wanted = [t for t in detached if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad([x for x, _ in pairs], wanted, [dx for _, dx in pairs], allow_unused=True)
                   if pairs and wanted else [])
        return (None,) * 6 + tuple(next(got) if t is not None and t.requires_grad else None for t in detached)


def chunk_kda_triton_recomputing(prepare, *inputs, scale: float | None = None,
                                 cu_seqlens: torch.Tensor | None = None, fwd: FwdLaunch | None = None,
                                 bwd: BwdLaunch | None = None) -> torch.Tensor:
    """The output of ``chunk_kda_triton(*prepare(*inputs), cu_seqlens=cu_seqlens)`` (no initial or final state),
    keeping for the backward only ``inputs`` and the chunk's matrix products A_qk and T: q, k, v, g and beta
    come back in backward by running ``prepare`` again (under the forward's autocast state), and G, q~ exp(G),
    K exp(G_last - G) from them. For a layer whose op inputs are cheap functions of tensors it keeps anyway.

    Args:
        prepare: deterministic function of ``inputs`` returning ``(q [B, T, H, K], k, v [B, T, H, V], g [B, T, H, K]
            or [B, T, H] (log-decay, fp32), beta [B, T, H])``, activated as ``chunk_kda`` takes them without the
            ``use_*_in_kernel`` flags; run again it must give the same values. Every tensor it differentiates
            through must be one of ``inputs`` (parameters included).
        inputs: tensors (or None).
        scale, cu_seqlens, fwd, bwd: as ``chunk_kda_triton``.

    Returns:
        o ``[B, T, H, V]`` in v's dtype; differentiable in ``inputs``.
    """
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in inputs):
        return chunk_kda_triton(*prepare(*inputs), scale=scale, cu_seqlens=cu_seqlens, fwd=fwd, bwd=bwd)[0]
    device = next(t.device for t in inputs if t is not None)
    state = (device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    return ChunkKDARecomputingFunction.apply(prepare, state, scale, cu_seqlens, fwd, bwd, *inputs)


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
    fwd: FwdLaunch | None = None,
    bwd: BwdLaunch | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise KDA on the Triton kernels; arguments already validated by ``chunk_kda`` (see its docstring).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: ``[B, T, H, K]`` or ``[B, T, H]`` (scalar gate);
        beta: ``[B, T, H]``; initial_state: ``[N, H, K, V]`` fp32; cu_seqlens: int ``[N + 1]`` with B = 1.
        fwd, bwd: the forward's and the backward's launch settings; None takes ``fwd_launch(K, V, dtype)`` /
            ``bwd_launch(K, V, dtype)`` (benchmarks sweep others with ``dataclasses.replace``).

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] fp32 or None)``; differentiable in q, k, v, g,
        beta, initial_state (and A_log, dt_bias through the PyTorch gate).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    scale = K**-0.5 if scale is None else float(scale)
    # one operand dtype for the dot products: the widest of the inputs (the L2 norm's fp32 result is not an input)
    dt = q.dtype
    for d in (k.dtype, v.dtype):
        dt = torch.promote_types(dt, d)
    q, k, g, beta = preprocess(
        q, k, g, beta, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, K,
        operand_dtype=dt, fused=True,
    )
    q, k, v, g, beta = _operands(q, k, v, g, beta)
    layout = layout_for(cu_seqlens, B, T, q.device)
    h0 = None if initial_state is None else initial_state.contiguous()
    fwd = fwd_launch(K, V, dt) if fwd is None else fwd
    bwd = bwd_launch(K, V, dt) if bwd is None else bwd
    o, ht = ChunkKDAFunction.apply(q, k, v, g, beta, h0, scale, output_final_state, layout, fwd, bwd)
    return o.reshape(B, T, H, V).to(out_dtype), ht
