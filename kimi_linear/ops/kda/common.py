"""Shared plumbing of the public KDA ops: argument validation, the optional in-op activations, varlen packing.

Validation happens once, here, at the public boundary; backends trust their inputs.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from kimi_linear.ops.kda.gate import beta_activation, kda_gate
from kimi_linear.ops.kda.naive import expand_qk_heads
from kimi_linear.ops.norm import l2norm
from kimi_linear.ops.varlen import host_values

MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "torch", "triton")

# Keywords model code forwards to its attention op among the rest of a model call's keywords (transformers'
# ``kimi_linear`` KDA layer hands its ``**kwargs``, the model call's TransformersKwargs, to the op). They ask the model
# for extra outputs or normalise its loss and do not change what KDA computes: the ops accept and ignore them.
MODEL_CALL_NO_OP_KEYWORDS = ("num_items_in_batch", "output_attentions", "output_hidden_states", "output_router_logits")
# Model-call keywords describing packed sequences (transformers' DataCollatorWithFlattening). Beside cu_seqlens, or
# None, they add nothing and are ignored; alone they would be the only record of where sequences end, which the ops
# do not read, so they are refused rather than run the recurrence across the boundaries.
PACKED_SEQUENCE_KEYWORDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def _is_capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def values_readable(t: torch.Tensor) -> bool:
    """Whether the host may read t's values: not while torch.compile traces (fake tensors) nor while a CUDA graph
    is being captured (the read would sync)."""
    return not torch.compiler.is_compiling() and not _is_capturing(t)


def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 (or float64 on the torch backend), got {x.dtype}")


def _shape(*dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def check_model_call_keywords(op_name: str, extra: dict, cu_seqlens: torch.Tensor | None) -> None:
    """Keywords beyond an op's own parameters: those of ``MODEL_CALL_NO_OP_KEYWORDS`` pass (ignored), as do those of
    ``PACKED_SEQUENCE_KEYWORDS`` when None or given beside ``cu_seqlens``, and ``is_causal`` when True or None (KDA
    is causal). Anything else raises: TypeError for an unknown keyword (a typo must not pass silently, as it does
    in FLA), ValueError for a known one whose value the op cannot honour."""
    for name, value in extra.items():
        if name in MODEL_CALL_NO_OP_KEYWORDS:
            continue
        if name in PACKED_SEQUENCE_KEYWORDS:
            if value is None or cu_seqlens is not None:
                continue
            raise ValueError(
                f"{op_name}: {name} describes packed sequences, and this op keeps sequences apart only by cu_seqlens "
                f"(int [N + 1] boundaries, B = 1): pass cu_seqlens as well. (FLA ignores {name} and runs the "
                "recurrence across the packed sequences' boundaries.)"
            )
        if name == "is_causal":
            if value is None or value is True:
                continue
            raise ValueError(f"{op_name}: is_causal={value!r} cannot be honoured: KDA is a causal recurrence")
        raise TypeError(
            f"{op_name}() got an unexpected keyword argument {name!r}. Beyond its own parameters it accepts only the "
            f"model-call keywords {', '.join(MODEL_CALL_NO_OP_KEYWORDS)} (ignored), "
            f"{', '.join(PACKED_SEQUENCE_KEYWORDS)} (ignored beside cu_seqlens) and is_causal=True."
        )


def check_lower_bound(lower_bound, safe_gate: bool = False) -> None:
    """lower_bound: None, or a finite negative number (FLA's safe range [-5, 0) with ``safe_gate``)."""
    if lower_bound is None:
        return
    if isinstance(lower_bound, bool) or not isinstance(lower_bound, (int, float)):
        raise TypeError(f"lower_bound must be a float, got {type(lower_bound).__name__}")
    if not (-float("inf") < lower_bound < 0):
        raise ValueError(f"lower_bound must be a finite negative number (the gate's log-decay floor), got {lower_bound}")
    if safe_gate and not (-5 <= lower_bound < 0):
        raise ValueError(f"lower_bound must be in the safe range [-5, 0) with safe_gate=True, got {lower_bound}")


def validate_kda_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    use_gate_in_kernel: bool,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    backend: str,
    state_indices: torch.Tensor | None = None,
    *,
    lower_bound: float | None = None,
    state_v_first: bool = False,
    per_channel_beta: bool = False,
) -> int:
    """Raise ValueError/TypeError naming the offending argument. Returns N, the number of sequences.

    Shapes: q, k ``[B, T, H, K]``; v ``[B, T, HV, V]`` with HV a multiple of H (GVA); g ``[B, T, HV, K]`` or
    ``[B, T, HV]``; beta ``[B, T, HV]`` (or ``[B, T, HV, V]`` where ``per_channel_beta``); initial_state
    ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first``; any leading size with ``state_indices``, which is
    int ``[N]`` or ``[N, T']``). NaN/inf in g or beta is not checked (that would cost a device sync); it propagates
    into the outputs. Values of cu_seqlens are checked only where the host may read them (``values_readable``).
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        _check_float(name, x)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {_shape(B, T, H, K)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:2] != q.shape[:2] or H == 0 or v.shape[2] % H or v.shape[2] < H:
        raise ValueError(f"v must be {_shape(B, T, 'HV', 'V')} with HV a multiple of H={H} (GVA when HV > H), "
                         f"got shape {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[-1]
    if not (1 <= K <= MAX_HEAD_DIM):
        raise ValueError(f"head dim K={K} of q/k is outside the supported range 1..{MAX_HEAD_DIM}")
    if not (1 <= V <= MAX_HEAD_DIM):
        raise ValueError(f"head dim V={V} of v is outside the supported range 1..{MAX_HEAD_DIM}")
    if g.shape not in ((B, T, HV, K), (B, T, HV)):
        raise ValueError(
            f"g must be {_shape(B, T, HV, K)} (per-channel KDA gate) or {_shape(B, T, HV)} (scalar GDN gate), "
            f"got {tuple(g.shape)}"
        )
    if beta.shape != (B, T, HV) and not (per_channel_beta and beta.shape == (B, T, HV, V)):
        extra = f" or {_shape(B, T, HV, V)} (one per value channel)" if per_channel_beta else ""
        raise ValueError(f"beta must be {_shape(B, T, HV)}{extra}, got {tuple(beta.shape)}")
    for name, x in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    check_lower_bound(lower_bound)
    if use_gate_in_kernel:
        if A_log is None and lower_bound is None:
            raise ValueError(f"use_gate_in_kernel=True needs A_log ([HV]=[{HV}]) unless lower_bound is set")
        if A_log is not None:
            _check_float("A_log", A_log)
            if A_log.numel() != HV:
                raise ValueError(f"A_log must have HV={HV} elements ([HV] or [1, 1, HV, 1]), "
                                 f"got shape {tuple(A_log.shape)}")
        if dt_bias is not None:
            _check_float("dt_bias", dt_bias)
            want = HV * K if g.dim() == 4 else HV
            if dt_bias.numel() != want:
                raise ValueError(f"dt_bias must have {want} elements for g of shape {tuple(g.shape)}, "
                                 f"got shape {tuple(dt_bias.shape)}")
        for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
            if x is not None and x.device != q.device:
                raise ValueError(f"{name} is on {x.device} but q is on {q.device}")

    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError("cu_seqlens must be an int32/int64 tensor of sequence boundaries [N + 1]")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with N + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={B}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
        if values_readable(cu_seqlens):
            c = host_values(cu_seqlens)
            if c[0] != 0:
                raise ValueError(f"cu_seqlens must start at 0, got {c[0]}")
            if any(b < a for a, b in zip(c, c[1:])):
                raise ValueError(f"cu_seqlens must be non-decreasing, got {c}")
            if c[-1] != T:
                raise ValueError(f"cu_seqlens must end at T={T}, got {c[-1]}")
        N = cu_seqlens.numel() - 1
    else:
        N = B

    if state_indices is not None:
        if not isinstance(state_indices, torch.Tensor) or state_indices.dtype not in (torch.int32, torch.int64):
            raise TypeError("state_indices must be an int32/int64 tensor [N] (or [N, T'] per token)")
        if state_indices.device != q.device:
            raise ValueError(f"state_indices is on {state_indices.device} but q is on {q.device}")
        if state_indices.dim() not in (1, 2) or state_indices.shape[0] != N:
            raise ValueError(f"state_indices must be [N]=[{N}] (one slot per sequence) or [N, T'] (one per token), "
                             f"got {tuple(state_indices.shape)}")
        if initial_state is None:
            raise ValueError("state_indices needs initial_state: the state pool [S, HV, K, V]")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise TypeError(f"initial_state must be a torch.Tensor, got {type(initial_state).__name__}")
        if initial_state.dtype not in FLOAT_DTYPES[:3] and not (
            initial_state.dtype == torch.float64 and torch.float64 in (q.dtype, k.dtype, v.dtype, g.dtype, beta.dtype)
        ):
            raise TypeError(f"initial_state must be float32 (float16/bfloat16 are cast to it; float64 only with "
                            f"float64 inputs on the torch backend), got {initial_state.dtype}")
        lead = "S" if state_indices is not None else N
        tail = (HV, V, K) if state_v_first else (HV, K, V)
        if initial_state.dim() != 4 or initial_state.shape[1:] != tail or (
            state_indices is None and initial_state.shape[0] != N
        ):
            raise ValueError(f"initial_state must be {_shape(lead, *tail)}, got {tuple(initial_state.shape)}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    return N


def _fused_preprocess_runs(x: torch.Tensor) -> bool:
    """Whether the fused Triton kernels can run on x: CUDA tensors, or CPU ones under Triton's interpreter."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def preprocess(
    q: torch.Tensor,
    k: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    use_qk_l2norm_in_kernel: bool,
    use_gate_in_kernel: bool,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    use_beta_sigmoid_in_kernel: bool,
    head_dim: int,
    operand_dtype: torch.dtype | None = None,
    fused: bool = False,
):
    """The optional in-op activations (fp32 math), and the scalar gate broadcast over K.

    l2norm of q and k, the forget gate ``kda_gate`` and the beta sigmoid, each when its flag is set. With ``fused``
    they run in the fused Triton kernels of ``preprocess_triton`` (one launch each way, recomputing in backward)
    where those can run (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1); otherwise, and without
    ``fused``, in PyTorch (autograd then keeps fp32 ``[T, H, K]`` temporaries). Normalised q, k come back in
    ``operand_dtype`` (fp32 when None); g and beta, when activated, in fp32. A scalar gate ``[B, T, H]`` comes back
    as a fp32 ``[B, T, H, K]`` view.
    """
    if (use_qk_l2norm_in_kernel or use_gate_in_kernel or use_beta_sigmoid_in_kernel) and (
        fused and _fused_preprocess_runs(q)
    ):
        from kimi_linear.ops.kda.preprocess_triton import preprocess_fused

        q, k, g, beta = preprocess_fused(q, k, g, beta, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias,
                                         use_beta_sigmoid_in_kernel, operand_dtype)
    else:
        if use_qk_l2norm_in_kernel:
            q, k = l2norm(q), l2norm(k)
            if operand_dtype is not None:
                q, k = q.to(operand_dtype), k.to(operand_dtype)
        if use_gate_in_kernel:
            g = kda_gate(g, A_log, dt_bias)
        if use_beta_sigmoid_in_kernel:
            beta = beta_activation(beta)
    if g.dim() == 3:
        g = g.to(torch.promote_types(g.dtype, torch.float32))[..., None].expand(*g.shape, head_dim)
    return q, k, g, beta


def state_layout_alias(state_v_first: bool, transpose_state_layout: bool | None) -> bool:
    """FLA's deprecated ``transpose_state_layout`` is ``state_v_first``: warn, and refuse both at once."""
    if transpose_state_layout is None:
        return state_v_first
    if state_v_first:
        raise ValueError("pass state_v_first or the deprecated transpose_state_layout, not both")
    warnings.warn("transpose_state_layout is deprecated: it is state_v_first", DeprecationWarning, stacklevel=3)
    return bool(transpose_state_layout)


def adapt_fla_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    use_gate_in_kernel: bool,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    lower_bound: float | None,
    use_beta_sigmoid_in_kernel: bool,
    allow_neg_eigval: bool,
    state_v_first: bool,
):
    """FLA's extras reduced to the plain problem the chunk and recurrent cores solve (in PyTorch, differentiable):

    * the bounded gate (``use_gate_in_kernel`` with ``lower_bound``) computed here by ``gate.kda_gate``;
    * ``allow_neg_eigval``: beta = 2 sigmoid(logits) computed here;
    * GVA: q, k repeated to the HV value heads (``naive.expand_qk_heads``);
    * the initial state in the ``[N, HV, K, V]`` layout (a transposed view with ``state_v_first``) and fp32 (16-bit
      states are cast, as FLA does; fp64 stays).

    Each step runs only where its argument asks for it: the plain call passes through without a copy. Returns
    ``(q, k, g, beta, initial_state, use_gate_in_kernel, use_beta_sigmoid_in_kernel)``.
    """
    if use_gate_in_kernel and lower_bound is not None:
        g = kda_gate(g, A_log, dt_bias, lower_bound)
        use_gate_in_kernel = False
    if use_beta_sigmoid_in_kernel and allow_neg_eigval:
        beta = beta_activation(beta, allow_neg_eigval=True)
        use_beta_sigmoid_in_kernel = False
    q, k = expand_qk_heads(q, k, v.shape[2])
    if initial_state is not None:
        if state_v_first:
            initial_state = initial_state.transpose(-1, -2)  # [N, HV, K, V] view
        if initial_state.dtype in (torch.float16, torch.bfloat16):
            initial_state = initial_state.float()
    return q, k, g, beta, initial_state, use_gate_in_kernel, use_beta_sigmoid_in_kernel


def pack_to_batch(xs: list[torch.Tensor], cu_seqlens: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Varlen ``[1, T, H, ...]`` tensors -> zero-padded ``[N, T_max, H, ...]`` batches.

    Zero padding at the end of a sequence (k = v = beta = g = 0) leaves its state unchanged.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    starts = cu_seqlens[:-1].tolist()
    t_max = max(max(lengths), 1)
    out = []
    for x in xs:
        parts = [F.pad(x[0, s : s + n], (0,) * (2 * (x.dim() - 2)) + (0, t_max - n)) for s, n in zip(starts, lengths)]
        out.append(torch.stack(parts))
    return out, lengths


def unpack_from_batch(o: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """``[N, T_max, H, V]`` -> packed ``[1, sum(lengths), H, V]`` (inverse of pack_to_batch)."""
    return torch.cat([o[i, :n] for i, n in enumerate(lengths)], dim=0)[None]
