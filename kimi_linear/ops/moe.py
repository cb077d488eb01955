"""Mixture-of-Experts as pure functions: the router, the grouped expert computation and their dense reference.

Shape legend (this file):
    N  tokens (batch and time flattened)      D  hidden size
    E  routed experts                         F  expert intermediate size
    K  experts chosen per token (top-k)       S  token-slots, S = N * K

The routed output of a token is  sum_k w_k * w2_e (silu(w1_e x) * (w3_e x)),  e = the k-th chosen expert.

Decode (a few tokens, no autograd, CUDA): one Triton matrix-vector product per token-slot reads the chosen
expert's rows directly (``kimi_linear.ops.moe_triton``). Otherwise (``grouped_experts``): the N*K token-slots
are sorted by expert id, so each expert's tokens form one contiguous run; the three expert matmuls then run as
grouped GEMMs over those runs (``torch._grouped_mm`` where the build has it and the operands satisfy its
alignment rules, else a loop over only the experts that received tokens). The routing weight is applied to the
intermediate activation (w2 is linear, so w2(w * h) = w * w2(h)), and the K slots of a token are summed by a
reshape, not by atomics: results are deterministic and the sum is taken in the reduction's fp32 accumulator.
Under autograd the grouped GEMMs run in one Function (``_GroupedExperts``) that keeps each token's row once and
the gate and up products, and makes the K slot copies of the row and the SwiGLU output again in backward.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kimi_linear.ops import TRITON_INSTALLED
from kimi_linear.ops.custom_ops import grads_by_recompute

ROUTER_ACTIVATIONS = ("sigmoid", "softmax")
EXPERT_BACKENDS = ("auto", "grouped_mm", "loop", "gemv")
# "auto" takes the decode kernels (``moe_triton.moe_experts_gemv_triton``) up to this many token-slots
# N*K: beyond, experts start to see several tokens each and a grouped GEMM reads each expert's weights once,
# not once per slot.
GEMV_MAX_SLOTS = 64

# Denominator guard of the renormalisation: chosen scores are positive, so it only matters for exact zeros.
RENORM_EPS = 1e-20


def route_tokens(
    x_ND: torch.Tensor,
    router_weight_ED: torch.Tensor,
    correction_bias_E: torch.Tensor | None,
    top_k: int,
    *,
    renormalize: bool = True,
    scaling_factor: float = 1.0,
    activation: str = "sigmoid",
    num_groups: int = 1,
    top_k_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose K experts per token and their weights (auxiliary-loss-free routing, as the release).

    logits = x.float() @ router_weight.float().T (fp32 even under autocast); scores = sigmoid(logits) (or
    softmax over E); the K experts with the largest scores + correction_bias are chosen; their weights are the
    *unbiased* scores, renormalised to sum 1 when ``renormalize``, times ``scaling_factor``. With
    ``num_groups`` G > 1 the choice is first limited to the ``top_k_groups`` groups of E/G consecutive experts
    whose two best biased scores sum highest (the release uses G = 1: no limit).

    Args:
        x_ND: ``[N, D]`` any float dtype.
        router_weight_ED: ``[E, D]`` (used in fp32).
        correction_bias_E: ``[E]`` or None; shifts the choice only, never the weights.
        top_k: K, 1 <= K <= E (and <= the experts of the kept groups).
        renormalize, scaling_factor, activation: as above; activation is "sigmoid" or "softmax".
        num_groups, top_k_groups: group-limited choice, E divisible by num_groups.

    Returns:
        ``(weights_NK float32, experts_NK int64)``; differentiable in x and router_weight through the weights.
    """
    with torch.autocast(x_ND.device.type, enabled=False):
        logits_NE = x_ND.float() @ router_weight_ED.float().t()
    scores_NE = logits_NE.sigmoid() if activation == "sigmoid" else logits_NE.softmax(dim=-1)
    choice_NE = scores_NE.detach()
    if correction_bias_E is not None:
        choice_NE = choice_NE + correction_bias_E.float()
    if num_groups > 1:
        N, E = choice_NE.shape
        choice_NGX = choice_NE.view(N, num_groups, E // num_groups)
        group_score_NG = choice_NGX.topk(min(2, E // num_groups), dim=-1).values.sum(dim=-1)
        kept_NG = group_score_NG.topk(top_k_groups, dim=-1).indices
        group_mask_NG = torch.zeros_like(group_score_NG, dtype=torch.bool).scatter_(1, kept_NG, True)
        choice_NE = choice_NGX.masked_fill(~group_mask_NG[..., None], float("-inf")).view(N, E)
    experts_NK = choice_NE.topk(top_k, dim=-1, sorted=False).indices
    weights_NK = scores_NE.gather(1, experts_NK)
    if renormalize:
        weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return weights_NK * scaling_factor, experts_NK


class _DispatchSlots(torch.autograd.Function):
    """x_SD = x_ND[token of each sorted slot]; backward sums the K slot gradients of a token (no atomics)."""

    @staticmethod
    def forward(ctx, x_ND, order_S, inverse_S, top_k):
        ctx.save_for_backward(order_S, inverse_S)
        ctx.top_k = top_k
        return x_ND.index_select(0, order_S // top_k)

    @staticmethod
    def backward(ctx, dx_SD):
        order_S, inverse_S = ctx.saved_tensors
        return _CombineSlots.apply(dx_SD, order_S, inverse_S, ctx.top_k), None, None, None


class _CombineSlots(torch.autograd.Function):
    """y_ND = the sum of a token's K slots of y_SD (sorted by expert); backward sends dy to the slots."""

    @staticmethod
    def forward(ctx, y_SD, order_S, inverse_S, top_k):
        ctx.save_for_backward(order_S, inverse_S)
        ctx.top_k = top_k
        return y_SD.index_select(0, inverse_S).view(-1, top_k, y_SD.shape[-1]).sum(dim=1)  # [N, D]

    @staticmethod
    def backward(ctx, dy_ND):
        order_S, inverse_S = ctx.saved_tensors
        return _DispatchSlots.apply(dy_ND, order_S, inverse_S, ctx.top_k), None, None, None


def _grouped_mm_aligned(x_ND: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch._grouped_mm exists and its layout rule holds: 16-byte aligned data pointers and strides. The products
    read x's slot copies, gathered into a new contiguous tensor, so of x only the row width counts. While
    torch.compile traces, data pointers do not exist (fake tensors) and only the strides are checked: the
    compiled graph's buffers and the parameters are allocated 16-byte aligned."""
    if not hasattr(torch, "_grouped_mm") or x_ND.shape[-1] % (16 // x_ND.element_size()):
        return False
    tracing = torch.compiler.is_compiling()
    for t in weights:
        align = 16 // t.element_size()
        if (not tracing and t.data_ptr() % 16) or any(stride % align for stride in t.stride() if stride != 1):
            return False
    return True


def _grouped_mm_traceable(x_ND: torch.Tensor) -> bool:
    """torch._grouped_mm's fake (meta) kernel, which torch.compile runs to trace it, accepts bf16 only (its CUDA
    kernel's rule), though the eager CPU kernel takes fp32 too."""
    return not torch.compiler.is_compiling() or x_ND.dtype == torch.bfloat16


def _grouped_mm_preferred(x_ND: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether "auto" takes torch._grouped_mm: aligned operands, and on CUDA only bf16 on sm90+, which has the
    fused kernel; other CUDA dtypes go through torch's own loop, which copies the offsets to the host anyway.
    Under torch.compile only bf16 (``_grouped_mm_traceable``).
    """
    if x_ND.is_cuda:
        if x_ND.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x_ND.device)[0] < 9:
            return False
    return _grouped_mm_traceable(x_ND) and _grouped_mm_aligned(x_ND, *weights)


def swiglu_weighted(gate_SF: torch.Tensor, up_SF: torch.Tensor, weights_S: torch.Tensor) -> torch.Tensor:
    """``silu(gate_SF) * up_SF * weights_S[:, None]`` computed in fp32, returned in gate's dtype.

    On CUDA with Triton installed this is one fused kernel each way (``kimi_linear.ops.moe_triton``);
    elsewhere plain PyTorch, which is also its reference.
    """
    if gate_SF.is_cuda and TRITON_INSTALLED:
        from kimi_linear.ops.moe_triton import swiglu_weighted_triton

        return swiglu_weighted_triton(gate_SF, up_SF, weights_S)
    return (F.silu(gate_SF.float()) * up_SF.float() * weights_S.float()[:, None]).to(gate_SF.dtype)


def _swiglu_weighted_grads(gate_SF, up_SF, weights_S, dh_SF):
    """(dgate_SF, dup_SF in gate's dtype, dweights_S fp32) of ``swiglu_weighted`` for ``dh_SF``, outside
    autograd: the fused kernel on CUDA, else these formulas in fp32 (d silu(g)/dg = s (1 + g (1 - s)), s the
    sigmoid of g)."""
    if gate_SF.is_cuda and TRITON_INSTALLED:
        from kimi_linear.ops.moe_triton import swiglu_weighted_bwd_triton

        return swiglu_weighted_bwd_triton(gate_SF, up_SF, weights_S, dh_SF)
    g, u, dh = gate_SF.float(), up_SF.float(), dh_SF.float()
    sig = torch.sigmoid(g)
    silu = g * sig
    dhw = dh * weights_S.float()[:, None]
    dgate = dhw * u * sig * (1.0 + g * (1.0 - sig))
    return dgate.to(gate_SF.dtype), (dhw * silu).to(up_SF.dtype), (dh * silu * u).sum(dim=-1)


def _experts_grouped_mm(x_SD, weights_S, offsets_E, w1_EFD, w3_EFD, w2_EDF):
    """The routed experts on token-slots sorted by expert: three grouped GEMMs around the weighted SwiGLU.
    Returns (y_SD, gate_SF, up_SF)."""
    gate_SF = torch._grouped_mm(x_SD, w1_EFD.transpose(-2, -1), offs=offsets_E)
    up_SF = torch._grouped_mm(x_SD, w3_EFD.transpose(-2, -1), offs=offsets_E)
    h_SF = swiglu_weighted(gate_SF, up_SF, weights_S)
    return torch._grouped_mm(h_SF, w2_EDF.transpose(-2, -1), offs=offsets_E), gate_SF, up_SF  # [S, D]


class _GroupedExperts(torch.autograd.Function):
    """The grouped-GEMM experts from the tokens, not their slot copies: x_ND ``[N, D]`` (one row per token),
    ``order_S`` / ``inverse_S`` (the sorted slots' source slot / each slot's place in the sort), weights_S
    (sorted), offsets_E (each expert's run end) -> y_SD ``[S, D]``, sorted by expert.

    For its backward it keeps x_ND, the sort, weights_S and the gate and up products, and makes again what is
    cheap to make: the K copies of each token's row (a gather; K times x_ND's bytes) and the SwiGLU output
    (element-wise from gate and up). Autograd through the plain ops would keep both: for K = 4, 2.5 times x_ND
    plus F / D of it per slot, more than everything this keeps besides gate and up."""

    @staticmethod
    def forward(ctx, x_ND, order_S, inverse_S, weights_S, offsets_E, top_k, w1_EFD, w3_EFD, w2_EDF):
        x_SD = x_ND.index_select(0, order_S // top_k)
        y_SD, gate_SF, up_SF = _experts_grouped_mm(x_SD, weights_S, offsets_E, w1_EFD, w3_EFD, w2_EDF)
        ctx.save_for_backward(x_ND, order_S, inverse_S, weights_S, offsets_E, gate_SF, up_SF, w1_EFD, w3_EFD,
                              w2_EDF)
        ctx.top_k = top_k
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD):
        x_ND, order_S, inverse_S, weights_S, offsets_E, gate_SF, up_SF, w1_EFD, w3_EFD, w2_EDF = ctx.saved_tensors
        dy_SD = dy_SD.contiguous()
        h_SF = swiglu_weighted(gate_SF, up_SF, weights_S)
        dw2_EDF = torch._grouped_mm(dy_SD.t(), h_SF, offs=offsets_E)
        del h_SF
        dh_SF = torch._grouped_mm(dy_SD, w2_EDF, offs=offsets_E)
        dgate_SF, dup_SF, dweights_S = _swiglu_weighted_grads(gate_SF, up_SF, weights_S, dh_SF)
        del dh_SF
        x_SD = x_ND.index_select(0, order_S // ctx.top_k)
        dw1_EFD = torch._grouped_mm(dgate_SF.t(), x_SD, offs=offsets_E)
        dw3_EFD = torch._grouped_mm(dup_SF.t(), x_SD, offs=offsets_E)
        del x_SD
        dx_SD = torch._grouped_mm(dgate_SF, w1_EFD, offs=offsets_E) + torch._grouped_mm(dup_SF, w3_EFD,
                                                                                         offs=offsets_E)
        # each token's K slot gradients summed by a reshape (deterministic, no atomics), as _CombineSlots sums
        dx_ND = dx_SD.index_select(0, inverse_S).view(-1, ctx.top_k, dx_SD.shape[-1]).sum(dim=1)
        return dx_ND, None, None, dweights_S, None, None, dw1_EFD, dw3_EFD, dw2_EDF


def _experts_loop(x_SD, weights_S, offsets_E, w1_EFD, w3_EFD, w2_EDF):
    """One matmul triple per expert that received tokens; reads the run boundaries on the host."""
    ends = offsets_E.tolist()
    # unbind once: indexing the stacked weights per expert would make autograd build a full [E, ...] gradient
    # for every expert it visits.
    w1_FD, w3_FD, w2_DF = w1_EFD.unbind(0), w3_EFD.unbind(0), w2_EDF.unbind(0)
    outs = []
    start = 0
    for e, end in enumerate(ends):
        if end == start:
            continue
        x_TD = x_SD[start:end]
        h_TF = swiglu_weighted(F.linear(x_TD, w1_FD[e]), F.linear(x_TD, w3_FD[e]), weights_S[start:end])
        outs.append(F.linear(h_TF, w2_DF[e]))
        start = end
    return torch.cat(outs) if outs else x_SD.new_zeros(0, w2_EDF.shape[1])


@torch.library.custom_op("kimi_linear::moe_experts_loop", mutates_args=())
def _experts_loop_op(x_SD: torch.Tensor, weights_S: torch.Tensor, offsets_E: torch.Tensor, w1_EFD: torch.Tensor,
                     w3_EFD: torch.Tensor, w2_EDF: torch.Tensor) -> torch.Tensor:
    """``_experts_loop`` as an op opaque to torch.compile: the loop reads the run boundaries on the host, which
    Dynamo cannot trace without a graph break. Its backward (``moe_experts_loop_backward``) runs the loop again
    under autograd."""
    return _experts_loop(x_SD, weights_S, offsets_E, w1_EFD, w3_EFD, w2_EDF)


@_experts_loop_op.register_fake
def _(x_SD, weights_S, offsets_E, w1_EFD, w3_EFD, w2_EDF):
    return x_SD.new_empty(x_SD.shape[0], w2_EDF.shape[1])


@torch.library.custom_op("kimi_linear::moe_experts_loop_backward", mutates_args=())
def _experts_loop_backward_op(dy_SD: torch.Tensor, x_SD: torch.Tensor, weights_S: torch.Tensor,
                              offsets_E: torch.Tensor, w1_EFD: torch.Tensor, w3_EFD: torch.Tensor,
                              w2_EDF: torch.Tensor) -> list[torch.Tensor]:
    def run(x_SD, weights_S, w1_EFD, w3_EFD, w2_EDF):
        return [_experts_loop(x_SD, weights_S, offsets_E, w1_EFD, w3_EFD, w2_EDF)]

    return grads_by_recompute(run, [x_SD, weights_S, w1_EFD, w3_EFD, w2_EDF], [dy_SD])


@_experts_loop_backward_op.register_fake
def _(dy_SD, x_SD, weights_S, offsets_E, w1_EFD, w3_EFD, w2_EDF):
    return [torch.empty_like(t) for t in (x_SD, weights_S, w1_EFD, w3_EFD, w2_EDF)]


def _experts_loop_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _experts_loop_backward(ctx, dy_SD):
    x_SD, weights_S, offsets_E, w1_EFD, w3_EFD, w2_EDF = ctx.saved_tensors
    dx, dw, dw1, dw3, dw2 = torch.ops.kimi_linear.moe_experts_loop_backward(dy_SD, x_SD, weights_S, offsets_E,
                                                                             w1_EFD, w3_EFD, w2_EDF)
    return dx, dw, None, dw1, dw3, dw2


_experts_loop_op.register_autograd(_experts_loop_backward, setup_context=_experts_loop_setup)


def _compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's where it is on (torch._grouped_mm does not autocast itself), else w's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return w.dtype


def grouped_experts(
    x_ND: torch.Tensor,
    weights_NK: torch.Tensor,
    experts_NK: torch.Tensor,
    w1_EFD: torch.Tensor,
    w3_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed-expert output, tokens grouped by expert; differentiable in x, the weights and w1/w3/w2.

    Args:
        x_ND: ``[N, D]`` float32/bfloat16/float16, the expert weights' dtype (or any, under autocast).
        weights_NK: ``[N, K]`` routing weights (float32 recommended).
        experts_NK: ``[N, K]`` int expert ids in [0, E).
        w1_EFD, w3_EFD: ``[E, F, D]`` gate and up projections; w2_EDF: ``[E, D, F]`` down projection.
        backend: "grouped_mm" (torch._grouped_mm), "loop" (one matmul triple per expert that has tokens;
            reads the per-expert counts on the host), "gemv" (CUDA + Triton, inference only: one matrix-vector
            product per token-slot, no sort), or "auto": gemv for up to ``GEMV_MAX_SLOTS`` slots on CUDA
            when no gradient is needed, else grouped_mm where ``_grouped_mm_preferred``, else loop.

    Returns:
        ``(y_ND [N, D] in the compute dtype, tokens_per_expert_E int64)`` — the second is the number of
        slots routed to each expert, computed on the device without a host sync.

    Raises:
        ValueError: unknown backend, "grouped_mm" where torch has no ``_grouped_mm`` or the sizes break its
            16-byte alignment rule, "gemv" without Triton or where a gradient is needed.
        TypeError: x's dtype differs from the weights' outside autocast.
    """
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"backend must be one of {EXPERT_BACKENDS}, got {backend!r}")
    dtype = _compute_dtype(x_ND, w1_EFD)
    if not torch.is_autocast_enabled(x_ND.device.type) and x_ND.dtype != dtype:
        raise TypeError(f"x_ND must have the expert weights' dtype {dtype}, got {x_ND.dtype}")
    N, K = experts_NK.shape
    E = w1_EFD.shape[0]
    experts_S = experts_NK.reshape(-1)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_ND, weights_NK, w1_EFD, w3_EFD, w2_EDF))
    decode_sized = x_ND.is_cuda and N * K <= GEMV_MAX_SLOTS
    if backend == "auto" and decode_sized and not needs_grad and TRITON_INSTALLED:
        backend = "gemv"
    if backend == "gemv":
        runnable = x_ND.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
        if needs_grad or not TRITON_INSTALLED or not runnable:
            raise ValueError("backend='gemv' needs CUDA tensors and Triton, and runs without autograd "
                             "(torch.no_grad / inference_mode)")
        from kimi_linear.ops.moe_triton import moe_experts_gemv_triton

        # A one-hot count: deterministic and no host sync, and S x E is small at decode sizes.
        tokens_per_expert_E = (experts_S[:, None] == torch.arange(E, device=experts_S.device)).sum(dim=0)
        # The kernels read any float dtype and compute in fp32, so the weights are used as stored (no copy
        # under autocast); x is cast only to fix the output dtype.
        weights = [t.contiguous() for t in (w1_EFD, w3_EFD, w2_EDF)]
        y_ND = moe_experts_gemv_triton(x_ND.to(dtype).contiguous(), weights_NK, experts_NK, *weights)
        return y_ND, tokens_per_expert_E

    sorted_experts_S, order_S = torch.sort(experts_S, stable=True)
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    # End of each expert's run in the sorted slots; a binary search, so no atomics and no host sync.
    ends_E = torch.searchsorted(sorted_experts_S, torch.arange(E, device=experts_S.device), right=True)
    tokens_per_expert_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))

    x_ND = x_ND.to(dtype)
    weights_S = weights_NK.reshape(-1).index_select(0, order_S).float()
    w1_EFD, w3_EFD, w2_EDF = w1_EFD.to(dtype), w3_EFD.to(dtype), w2_EDF.to(dtype)
    if backend == "auto":
        backend = "grouped_mm" if _grouped_mm_preferred(x_ND, w1_EFD, w3_EFD, w2_EDF) else "loop"
    elif backend == "grouped_mm" and not _grouped_mm_traceable(x_ND):
        raise ValueError(f"backend='grouped_mm' under torch.compile needs bfloat16 operands (torch._grouped_mm's "
                         f"fake kernel takes no other dtype), got {x_ND.dtype}: use backend='auto' or 'loop'")
    elif backend == "grouped_mm" and not _grouped_mm_aligned(x_ND, w1_EFD, w3_EFD, w2_EDF):
        raise ValueError(
            f"backend='grouped_mm' needs torch._grouped_mm (torch {torch.__version__}: "
            f"{'present' if hasattr(torch, '_grouped_mm') else 'absent'}) and 16-byte aligned operands: "
            f"hidden size {x_ND.shape[-1]} and expert intermediate size {w1_EFD.shape[1]} must be multiples "
            f"of {16 // x_ND.element_size()} for {x_ND.dtype}"
        )
    offsets_E = ends_E.to(torch.int32)
    # The explicit casts above did autocast's job; below, every matmul sees one dtype.
    with torch.autocast(x_ND.device.type, enabled=False):
        if backend == "grouped_mm" and needs_grad:
            y_SD = _GroupedExperts.apply(x_ND, order_S, inverse_S, weights_S, offsets_E, K, w1_EFD, w3_EFD, w2_EDF)
            return _CombineSlots.apply(y_SD, order_S, inverse_S, K), tokens_per_expert_E
        x_SD = _DispatchSlots.apply(x_ND, order_S, inverse_S, K)
        if backend == "grouped_mm":
            y_SD = _experts_grouped_mm(x_SD, weights_S, offsets_E, w1_EFD, w3_EFD, w2_EDF)[0]
        elif torch.compiler.is_compiling():
            y_SD = torch.ops.kimi_linear.moe_experts_loop(x_SD, weights_S, ends_E, w1_EFD, w3_EFD, w2_EDF)
        else:
            y_SD = _experts_loop(x_SD, weights_S, ends_E, w1_EFD, w3_EFD, w2_EDF)
    return _CombineSlots.apply(y_SD, order_S, inverse_S, K), tokens_per_expert_E


def swiglu_reference(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with nn.Linear-layout weights ``[out, in]``."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def moe_reference(
    x_ND: torch.Tensor,
    router_weight_ED: torch.Tensor,
    correction_bias_E: torch.Tensor | None,
    w1_EFD: torch.Tensor,
    w3_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    *,
    top_k: int,
    renormalize: bool = True,
    scaling_factor: float = 1.0,
    activation: str = "sigmoid",
    num_groups: int = 1,
    top_k_groups: int = 1,
) -> torch.Tensor:
    """The MoE layer written densely, as the spec: every expert runs on every token; a [N, E] gate masks them.

    Routing follows the release: fp32 logits, scores = sigmoid(logits) (or softmax), choice by
    scores + correction_bias, gate = the unbiased chosen scores (renormalised, scaled), zero elsewhere.

    Args:
        x_ND: ``[N, D]``; router_weight_ED: ``[E, D]``; correction_bias_E: ``[E]`` or None;
        w1_EFD, w3_EFD: ``[E, F, D]``; w2_EDF: ``[E, D, F]``;
        shared: (gate ``[Fs, D]``, up ``[Fs, D]``, down ``[D, Fs]``) of the shared expert, or None.
        top_k, renormalize, scaling_factor, activation, num_groups, top_k_groups: as in ``route_tokens``.

    Returns:
        ``[N, D]`` in x's dtype (the routed sum is accumulated in fp32).
    """
    E = router_weight_ED.shape[0]
    logits_NE = x_ND.float() @ router_weight_ED.float().t()
    if activation == "sigmoid":
        scores_NE = torch.sigmoid(logits_NE)
    else:
        scores_NE = torch.softmax(logits_NE, dim=-1)
    bias_E = torch.zeros(E, device=x_ND.device) if correction_bias_E is None else correction_bias_E.float()
    remaining_NE = scores_NE.detach() + bias_E
    if num_groups > 1:
        # Keep the top_k_groups groups ranked by the sum of their two best biased scores; the rest are out.
        group_size = E // num_groups
        group_score = []
        for g in range(num_groups):
            members_NX = remaining_NE[:, g * group_size : (g + 1) * group_size]
            group_score.append(members_NX.sort(dim=-1, descending=True).values[:, :2].sum(dim=-1))
        group_rank_NG = torch.stack(group_score, dim=-1).argsort(dim=-1, descending=True)
        for g in range(num_groups):
            dropped_N = (group_rank_NG[:, :top_k_groups] != g).all(dim=-1)
            remaining_NE[dropped_N, g * group_size : (g + 1) * group_size] = float("-inf")
    # The K largest biased scores, taken one at a time so the rule reads plainly: mask each pick, repeat.
    chosen_NE = torch.zeros_like(scores_NE, dtype=torch.bool)
    for _ in range(top_k):
        best_N = remaining_NE.argmax(dim=-1, keepdim=True)
        chosen_NE.scatter_(1, best_N, True)
        remaining_NE.scatter_(1, best_N, float("-inf"))
    gate_NE = torch.where(chosen_NE, scores_NE, torch.zeros_like(scores_NE))
    if renormalize:
        gate_NE = gate_NE / (gate_NE.sum(dim=-1, keepdim=True) + RENORM_EPS)
    gate_NE = gate_NE * scaling_factor

    out_ND = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
    for e in range(E):
        y_ND = swiglu_reference(x_ND, w1_EFD[e], w3_EFD[e], w2_EDF[e])
        out_ND = out_ND + gate_NE[:, e : e + 1] * y_ND.float()
    out_ND = out_ND.to(x_ND.dtype)
    if shared is not None:
        out_ND = out_ND + swiglu_reference(x_ND, *shared)
    return out_ND
