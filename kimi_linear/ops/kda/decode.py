"""A KDA layer's whole decode step between the input projections and o_proj: ``kda_decode_step``.

For one new token per row n (N rows, H heads, head dims K and V, low rank R, conv filter width W), with s = slots[n]
the row's slot in both pools (paper §4; DESIGN.md §3):

    q, k, v = SiLU(ShortConv(qkv[n]))             conv tails conv_pool[s] shifted in place (or SiLU alone)
    q, k    = l2norm(q), l2norm(k)
    g       = -exp(A_log) softplus(f_b @ f_low[n] + dt_bias)          (per channel, or one scalar per head)
    beta    = sigmoid(beta_logits[n])
    S       = (I - beta k k^T) Diag(exp g) S + beta k v^T,  o = S^T (scale q)    S = state_pool[s, h] (paper Eq. 1)
    out[n]  = RMSNorm_V(o) * o_norm.weight * sigmoid(g_b @ g_low[n])             (the gate only with g_low)

Two backends: "triton" (``decode_triton``: all of it in one launch, one program per (row, head)) and "torch"
(``kda_decode_step_reference``: the existing ops composed, the readable spec). "auto" picks Triton on CUDA tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kimi_linear.ops.conv import causal_conv1d_update
from kimi_linear.ops.kda.chunk import refuse_float64_on_triton, resolve_backend
from kimi_linear.ops.kda.common import BACKENDS, FLOAT_DTYPES, MAX_HEAD_DIM
from kimi_linear.ops.kda.recurrent import fused_recurrent_kda

MAX_CONV_WIDTH = 16
STATE_DTYPES = (torch.float32, torch.bfloat16)  # dtypes of a decode state pool


def kda_decode_step(
    qkv: torch.Tensor,
    f_low: torch.Tensor,
    beta_logits: torch.Tensor,
    *,
    state_pool: torch.Tensor,
    slots: torch.Tensor,
    f_b_weight: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    conv_pool: torch.Tensor | None = None,
    conv_weights: Sequence[torch.Tensor] | None = None,
    g_low: torch.Tensor | None = None,
    g_b_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step of a KDA (or scalar-gate GDN) layer after its input projections, pools updated in place.

    Everything the layer does between its projections and o_proj: the short conv + SiLU of q, k, v, the q/k L2
    norm, the forget-gate GEMV and activation, the beta sigmoid, the recurrent state update and readout, the
    per-head RMSNorm and the sigmoid output gate (its GEMV included). On the Triton backend it is one launch with
    no host sync (CUDA-graph capturable once compiled); forward only.

    Args:
        qkv: ``[N, 2*H*K + H*V]`` the q, k, v projections of each row's new token, in that order (the layer's
            ``[N, 3*H*K]``), float16/bfloat16/float32; unit last stride. The output has its dtype.
        f_low: ``[N, R]`` the forget gate's low-rank input (``f_a_proj`` output), float.
        beta_logits: ``[N, H]`` (``b_proj`` output), float.
        state_pool: ``[P, H, K, V]`` float32 or bfloat16, contiguous: the recurrent states, row n's at
            ``slots[n]``; updated in place. A bf16 pool halves the state traffic: each step reads it widened to
            fp32, computes in fp32 and stores the new state rounded to nearest bf16 (the step equals the fp32
            step from the bf16 state, rounded once on store). K, V <= 256.
        slots: int32/int64 ``[N]``, each row's slot in ``state_pool`` and ``conv_pool`` (0..P-1, values trusted:
            see Raises). Rows naming the same slot (CUDA-graph padding rows on one scratch slot) race on it: that
            slot's contents and those rows' outputs are then unspecified; other rows and slots are unaffected.
        f_b_weight: ``[H*K, R]`` (per-channel KDA gate) or ``[H, R]`` (scalar GDN gate), float.
        A_log: ``H`` elements (``[H]`` or the checkpoint's ``[1, 1, H, 1]``), float.
        dt_bias: ``[H*K]`` (``[H]`` for the scalar gate), float.
        norm_weight: ``[V]`` the RMSNorm weight shared by the heads (``o_norm.weight``), float.
        conv_pool: ``[P, 2*H*K + H*V, W-1]`` the last W-1 conv inputs of each slot, oldest first (any float dtype,
            contiguous); updated in place. None together with ``conv_weights`` for a layer without the short conv
            (q, k, v are then SiLU of the projections).
        conv_weights: the q, k and v depthwise filters, ``([H*K, W] or [H*K, 1, W], same for k, [H*V, W] or
            [H*V, 1, W])``, float, 2 <= W <= 16 — passed as they are, no concatenation per step.
        g_low: ``[N, R_g]`` the output gate's low-rank input (``g_a_proj`` output); None (with ``g_b_weight``) for
            a layer without the output gate.
        g_b_weight: ``[H*V, R_g]``, float.
        eps: the RMSNorm's epsilon (the config's ``rms_norm_eps``), > 0.
        scale: query scale, default K ** -0.5.
        backend: "auto" (Triton on CUDA tensors, PyTorch otherwise), "triton" (on CPU only under
            TRITON_INTERPRET=1) or "torch".

    Returns:
        ``[N, H*V]`` in qkv's dtype: the input of o_proj.

    Raises:
        TypeError: a tensor argument that is not a tensor, a non-float tensor, a state pool that is neither
            float32 nor bfloat16, int slots of another dtype, float64 on the Triton backend.
        ValueError: shapes that do not agree (the message names the argument and the expected shape), tensors on
            another device than qkv, pools that are not contiguous, conv_pool / conv_weights or g_low /
            g_b_weight given one without the other, K or V outside 1..256, W outside 2..16, eps <= 0, an unknown
            backend. Slot values are not checked (that would sync): the torch backend raises IndexError for a
            slot outside 0..P-1, the Triton kernel treats it as "no slot" (zero state and tails in, nothing
            written).
    """
    _, K, _, _ = _validate(qkv, f_low, beta_logits, state_pool, slots, f_b_weight, A_log, dt_bias, norm_weight,
                           conv_pool, conv_weights, g_low, g_b_weight, eps, scale, backend)
    backend = resolve_backend(backend, qkv)
    tensors = (qkv, f_low, beta_logits, state_pool, f_b_weight, A_log, dt_bias, norm_weight, conv_pool, g_low,
               g_b_weight, *(conv_weights or ()))
    refuse_float64_on_triton(backend, *tensors)
    scale = K**-0.5 if scale is None else float(scale)
    w_q, w_k, w_v = conv_weights if conv_weights is not None else (None, None, None)
    args = (qkv, f_low, beta_logits, g_low, conv_pool, w_q, w_k, w_v, f_b_weight, A_log, dt_bias, state_pool,
            slots, norm_weight, g_b_weight, float(eps), scale, backend)
    if torch.compiler.is_compiling():
        return torch.ops.kimi_linear.kda_decode_step_(*args)
    return kda_decode_step_core(*args)


def kda_decode_step_core(qkv, f_low, beta_logits, g_low, conv_pool, w_q, w_k, w_v, f_b_weight, A_log, dt_bias,
                         state_pool, slots, norm_weight, g_b_weight, eps, scale, backend):
    """``kda_decode_step`` on validated arguments, a float scale and a resolved backend (the three filters
    separate: what the ``torch.library`` op takes)."""
    conv_weights = None if w_q is None else (w_q, w_k, w_v)
    if backend == "triton":
        from kimi_linear.ops.kda.decode_triton import kda_decode_step_triton

        return kda_decode_step_triton(qkv, f_low, beta_logits, g_low, conv_pool, conv_weights, f_b_weight, A_log,
                                      dt_bias, state_pool, slots, norm_weight, g_b_weight, eps, scale)
    return kda_decode_step_reference(
        qkv, f_low, beta_logits, state_pool=state_pool, slots=slots, f_b_weight=f_b_weight, A_log=A_log,
        dt_bias=dt_bias, norm_weight=norm_weight, conv_pool=conv_pool, conv_weights=conv_weights, g_low=g_low,
        g_b_weight=g_b_weight, eps=eps, scale=scale,
    )


def kda_decode_step_reference(
    qkv: torch.Tensor,
    f_low: torch.Tensor,
    beta_logits: torch.Tensor,
    *,
    state_pool: torch.Tensor,
    slots: torch.Tensor,
    f_b_weight: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    conv_pool: torch.Tensor | None = None,
    conv_weights: Sequence[torch.Tensor] | None = None,
    g_low: torch.Tensor | None = None,
    g_b_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    scale: float | None = None,
) -> torch.Tensor:
    """The spec: the layer's decode step as the existing ops compose it (``kda_decode_step``'s arguments and
    result, unvalidated). The conv runs in the pool's dtype and the GEMVs in the operands' (as the layer's
    unfused step did); the gate, recurrence, norm and output gate in fp32, the new state stored in the pool's
    dtype (rounded to nearest)."""
    N = qkv.shape[0]
    _, H, K, V = state_pool.shape
    if conv_pool is not None:
        rows = slots.long()  # index_copy_ takes int64 only
        tails = conv_pool.index_select(0, rows)  # [N, C, W-1]
        filters = torch.cat([w.reshape(w.shape[0], -1) for w in conv_weights])  # [C, W]
        qkv = causal_conv1d_update(qkv, tails, filters)  # shifts tails in place
        conv_pool.index_copy_(0, rows, tails)
    else:
        qkv = F.silu(qkv)
    q, k, v = qkv.split([H * K, H * K, H * V], dim=-1)
    q, k, v = q.reshape(N, 1, H, K), k.reshape(N, 1, H, K), v.reshape(N, 1, H, V)
    g = F.linear(f_low, f_b_weight)
    g = g.view(N, 1, H) if f_b_weight.shape[0] == H and K > 1 else g.view(N, 1, H, K)
    o, _ = fused_recurrent_kda(
        q, k, v, g, beta_logits[:, None], A_log=A_log, dt_bias=dt_bias, scale=scale, initial_state=state_pool,
        state_indices=slots, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
        use_beta_sigmoid_in_kernel=True, backend="torch",
    )  # [N, 1, H, V]
    out = F.rms_norm(o.float(), (V,), norm_weight.float(), eps)
    if g_low is not None:
        out = out * torch.sigmoid(F.linear(g_low, g_b_weight).view(N, 1, H, V).float())
    return out.to(qkv.dtype).reshape(N, H * V)


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 (or float64 on the torch backend), got {x.dtype}")


def _expect(name: str, x: torch.Tensor, shape: tuple, what: str = "") -> None:
    if tuple(x.shape) != tuple(shape):
        dims = ", ".join(str(d) for d in shape)
        raise ValueError(f"{name} must be [{dims}]{what}, got {tuple(x.shape)}")


def _validate(qkv, f_low, beta_logits, state_pool, slots, f_b_weight, A_log, dt_bias, norm_weight, conv_pool,
              conv_weights, g_low, g_b_weight, eps, scale, backend) -> tuple[int, int, int, int]:
    """Raise TypeError/ValueError naming the offending argument; returns (H, K, V, W) (W = 0 without the conv)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, x in (("qkv", qkv), ("f_low", f_low), ("beta_logits", beta_logits), ("state_pool", state_pool),
                    ("f_b_weight", f_b_weight), ("A_log", A_log), ("dt_bias", dt_bias),
                    ("norm_weight", norm_weight)):
        _check_tensor(name, x)
    if state_pool.dtype not in STATE_DTYPES:
        raise TypeError(f"state_pool must be float32 or bfloat16 (the recurrent states), got {state_pool.dtype}")
    if state_pool.dim() != 4:
        raise ValueError(f"state_pool must be [P, H, K, V], got {tuple(state_pool.shape)}")
    P, H, K, V = state_pool.shape
    if H < 1 or not (1 <= K <= MAX_HEAD_DIM and 1 <= V <= MAX_HEAD_DIM):
        raise ValueError(f"state_pool [P, H, K, V] = {tuple(state_pool.shape)}: need H >= 1 and K, V in "
                         f"1..{MAX_HEAD_DIM}")
    if not state_pool.is_contiguous():
        raise ValueError("state_pool must be contiguous: it is updated in place")
    if qkv.dim() != 2:
        raise ValueError(f"qkv must be [N, 2*H*K + H*V] = [N, {2 * H * K + H * V}], got {tuple(qkv.shape)}")
    N, C = qkv.shape
    _expect("qkv", qkv, (N, 2 * H * K + H * V), f" (q, k, v of H={H} heads, K={K}, V={V})")
    if f_low.dim() != 2 or f_low.shape[0] != N:
        raise ValueError(f"f_low must be [N, R] = [{N}, R], got {tuple(f_low.shape)}")
    R = f_low.shape[1]
    if f_b_weight.shape not in ((H * K, R), (H, R)):
        raise ValueError(f"f_b_weight must be [H*K, R] = [{H * K}, {R}] (per-channel gate) or [H, R] = [{H}, {R}] "
                         f"(scalar gate), got {tuple(f_b_weight.shape)}")
    gate_width = f_b_weight.shape[0]
    _expect("beta_logits", beta_logits, (N, H))
    if A_log.numel() != H:
        raise ValueError(f"A_log must have H={H} elements ([H] or [1, 1, H, 1]), got {tuple(A_log.shape)}")
    if dt_bias.numel() != gate_width:
        raise ValueError(f"dt_bias must have {gate_width} elements (f_b_weight's rows), got {tuple(dt_bias.shape)}")
    _expect("norm_weight", norm_weight, (V,))
    if not isinstance(slots, torch.Tensor) or slots.dtype not in (torch.int32, torch.int64):
        raise TypeError("slots must be an int32/int64 tensor [N]")
    _expect("slots", slots, (N,))

    W = 0
    if (conv_pool is None) != (conv_weights is None):
        raise ValueError("conv_pool and conv_weights go together: both for the short conv, neither without it")
    if conv_weights is not None:
        if not isinstance(conv_weights, (tuple, list)) or len(conv_weights) != 3:
            raise ValueError("conv_weights must be the three filters (q, k, v): a tuple of 3 tensors")
        for name, w, rows in zip(("q", "k", "v"), conv_weights, (H * K, H * K, H * V)):
            _check_tensor(f"conv_weights[{name}]", w)
            if w.dim() not in (2, 3) or w.shape[0] != rows or (w.dim() == 3 and w.shape[1] != 1):
                raise ValueError(f"conv_weights[{name}] must be [{rows}, W] or [{rows}, 1, W], got {tuple(w.shape)}")
        W = conv_weights[0].shape[-1]
        if any(w.shape[-1] != W for w in conv_weights) or not 2 <= W <= MAX_CONV_WIDTH:
            raise ValueError(f"conv_weights must share one filter width W in 2..{MAX_CONV_WIDTH}, got "
                             f"{[tuple(w.shape) for w in conv_weights]}")
        _check_tensor("conv_pool", conv_pool)
        _expect("conv_pool", conv_pool, (P, C, W - 1), " (state_pool's P slots, qkv's channels, W-1 tails)")
        if not conv_pool.is_contiguous():
            raise ValueError("conv_pool must be contiguous: it is updated in place")
    if (g_low is None) != (g_b_weight is None):
        raise ValueError("g_low and g_b_weight go together: both for the output gate, neither without it")
    if g_low is not None:
        _check_tensor("g_low", g_low)
        _check_tensor("g_b_weight", g_b_weight)
        if g_low.dim() != 2 or g_low.shape[0] != N:
            raise ValueError(f"g_low must be [N, R_g] = [{N}, R_g], got {tuple(g_low.shape)}")
        _expect("g_b_weight", g_b_weight, (H * V, g_low.shape[1]))

    named = (("f_low", f_low), ("beta_logits", beta_logits), ("state_pool", state_pool), ("slots", slots),
             ("f_b_weight", f_b_weight), ("A_log", A_log), ("dt_bias", dt_bias), ("norm_weight", norm_weight),
             ("conv_pool", conv_pool), ("g_low", g_low), ("g_b_weight", g_b_weight),
             *((f"conv_weights[{i}]", w) for i, w in enumerate(conv_weights or ())))
    for name, x in named:
        if x is not None and x.device != qkv.device:
            raise ValueError(f"{name} is on {x.device} but qkv is on {qkv.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return H, K, V, W
