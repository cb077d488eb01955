"""Public chunkwise-parallel KDA: ``chunk_kda`` (FLA 0.6.0's signature). Dispatches to the Triton kernels on CUDA,
the PyTorch path otherwise."""

from __future__ import annotations

import os

import torch

from kimi_linear.ops import TRITON_INSTALLED
from kimi_linear.ops.kda.common import (
    BACKENDS,
    adapt_fla_args,
    check_lower_bound,
    check_model_call_keywords,
    pack_to_batch,
    preprocess,
    state_layout_alias,
    unpack_from_batch,
    validate_kda_args,
)
from kimi_linear.ops.kda.naive import CHUNK_SIZE, math_dtype, naive_chunk_kda
from kimi_linear.ops.varlen import sequence_lengths

FLA_CHUNK_SIZES = (32, 64)


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """'auto' -> 'triton' for CUDA tensors when Triton is installed, 'torch' otherwise.

    'triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter).
    """
    if backend == "auto":
        return "triton" if x.is_cuda and TRITON_INSTALLED else "torch"
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
    return backend


def refuse_float64_on_triton(backend: str, *xs: torch.Tensor | None) -> None:
    if backend == "triton" and torch.float64 in [x.dtype for x in xs if x is not None]:
        raise TypeError("float64 inputs run on the torch backend only (backend='torch'): the Triton kernels "
                        "compute in fp32")


def resolve_kda_backend(backend: str, q: torch.Tensor, *xs: torch.Tensor | None) -> str:
    """The backend of a KDA op call: ``resolve_backend``, except that "auto" picks "torch" when an input is float64
    (FLA's ops take float64 tensors on the GPU, so such a call must not fail; the Triton kernels compute in fp32,
    the torch path in float64). An explicit "triton" with float64 inputs raises TypeError."""
    if backend == "auto" and torch.float64 in [x.dtype for x in (q, *xs) if x is not None]:
        return "torch"
    backend = resolve_backend(backend, q)
    refuse_float64_on_triton(backend, q, *xs)
    return backend


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    safe_gate: bool = False,
    lower_bound: float | None = None,
    disable_recompute: bool = False,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    cp_context=None,
    use_graph: bool = False,
    max_num_seqs: int | None = None,
    *,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
    transpose_state_layout: bool | None = None,
    backend: str = "auto",
    preprocess_backend: str = "auto",
    **model_call_kwargs,
):
    """Kimi Delta Attention over whole sequences, chunkwise-parallel (paper §3.1); differentiable.

    S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale q_t)   (paper Eq. 1)

    The positional order is FLA 0.6.0's; ``A_log``, ``dt_bias`` and ``chunk_size`` are keyword-only there too (FLA
    reads them from ``**kwargs``), and this library's ``backend`` / ``preprocess_backend`` come last. FLA swallows
    any other keyword; this op accepts only those model code forwards without meaning a change in the computation
    (``**model_call_kwargs`` below) and raises TypeError naming any other, so a typo does not pass silently.

    From vLLM's copy of FLA: its ``chunk_kda`` calls mean the same here, with ``state_v_first=True`` for the
    ``[N, H, V, K]`` states its current copy keeps. Its ``chunk_kda_with_fused_gate(q, k, v, raw_g, beta, A_log,
    g_bias, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, safe_gate,
    lower_bound)`` is ``chunk_kda(q, k, v, g=raw_g, beta=beta, A_log=A_log, dt_bias=g_bias, use_gate_in_kernel=True,
    ...)``, the softplus gate; where that call applies the bounded gate, add its ``lower_bound`` (and
    ``safe_gate=True``). Its variant taking ``raw_beta`` logits adds ``use_beta_sigmoid_in_kernel=True``.
    tests/test_interop_vllm_calls.py runs these calls as vLLM's layer makes them.

    Args:
        q, k: ``[B, T, H, K]`` float16/bfloat16/float32 (float64 on the torch backend). L2-normalised by the caller
            unless ``use_qk_l2norm_in_kernel``.
        v: ``[B, T, HV, V]``; HV a multiple of H (grouped value heads, GVA: value head hv reads query/key head
            hv // (HV // H)). The output has v's dtype (FLA returns q's; the same when they match).
        g: log-decay ``[B, T, HV, K]`` (per channel, KDA) or ``[B, T, HV]`` (one scalar per head, GDN), <= 0; with
            ``use_gate_in_kernel`` the gate pre-activation (see ``lower_bound``).
        beta: ``[B, T, HV]`` step size in (0, 1); logits when ``use_beta_sigmoid_in_kernel``.
        scale: query scale, default K ** -0.5.
        initial_state: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first``), N = B, or the number of
            sequences with ``cu_seqlens``. float32; float16/bfloat16 are cast to it (FLA 0.6.0 refuses them here;
            its recurrent op casts); float64 only with float64 inputs.
        output_final_state: also return the state after the last token of each sequence.
        use_qk_l2norm_in_kernel: L2-normalise q and k (eps 1e-6 inside the square root) first.
        use_gate_in_kernel: g is the gate pre-activation: g = -exp(A_log) softplus(g + dt_bias), or with
            ``lower_bound`` the bounded gate lower_bound * sigmoid(exp(A_log) (g + dt_bias)) (A_log None:
            lower_bound * sigmoid(g + dt_bias)), computed in PyTorch before the kernels.
        use_beta_sigmoid_in_kernel: beta is logits: beta = sigmoid(beta).
        allow_neg_eigval: beta = 2 sigmoid(beta), in (0, 2); needs ``use_beta_sigmoid_in_kernel`` (as in FLA).
        safe_gate: FLA's switch to its faster kernels for gates bounded below by ``lower_bound``. With
            ``use_gate_in_kernel`` it requires ``lower_bound`` in [-5, 0) (FLA's rule, checked). The result does
            not depend on it here: these kernels are exact for any gate <= 0, so it is otherwise a no-op (and
            precomputed gates are not checked against a bound, as in FLA).
        lower_bound: the bounded gate's floor, a finite negative float; used only with ``use_gate_in_kernel``
            (FLA ignores it otherwise, and so does this op).
        disable_recompute: FLA's memory/time trade-off for its backward; accepted, no effect (these kernels keep
            their own fixed set of intermediates). The result is the same.
        return_intermediate_states: also return ``h``, the state entering each chunk of ``chunk_size`` tokens
            (the first is the initial state), ``[B, NT, HV, K, V]`` (``[.., V, K]`` with ``state_v_first``),
            NT = ceil(T / chunk_size); with ``cu_seqlens`` ``[1, NT_total, ...]``, sequence after sequence, each
            with ceil(len / chunk_size) chunks. In k's dtype, as FLA. Inference only, like FLA's: it raises where
            a gradient would be needed (use torch.inference_mode() or torch.no_grad()).
        state_v_first: states (initial, final, intermediate) are ``[..., V, K]`` instead of ``[..., K, V]``.
        cu_seqlens: int ``[N + 1]`` boundaries of N sequences packed along T (B must be 1); empty sequences are
            allowed and pass their initial state through.
        cu_seqlens_cpu: FLA's host copy of ``cu_seqlens`` (saves it a device sync); accepted, not used: the result
            is the same.
        cp_context: FLA's context parallelism (sequences split across GPUs). Not supported: anything but None
            raises NotImplementedError.
        use_graph: FLA's varlen CUDA-graph mode; the result is the same, and it is accepted. It does not make a
            varlen call capturable here: the chunk path reads ``cu_seqlens`` on the host, so a call with
            ``cu_seqlens`` made during a CUDA-graph capture raises ValueError (calls without it can be captured).
        max_num_seqs: with ``use_graph`` and ``cu_seqlens``, cu_seqlens must have exactly max_num_seqs + 1 entries
            (FLA's check); no effect otherwise.
        A_log: ``[HV]`` (or ``[1, 1, HV, 1]``), used only with ``use_gate_in_kernel``, required unless
            ``lower_bound``.
        dt_bias: ``[HV * K]`` (``[HV]`` for a scalar gate), used only with ``use_gate_in_kernel``.
        chunk_size: 32 or 64 (FLA's choices, checked). Only ``h`` of ``return_intermediate_states`` depends on it;
            the Triton kernels always run 64-token chunks (the output is the same function).
        transpose_state_layout: FLA's deprecated name of ``state_v_first`` (warns).
        backend: "auto" (Triton on CUDA tensors, PyTorch otherwise and for float64 inputs), "torch" or "triton".
        preprocess_backend: where the in-op activations (``use_*_in_kernel``) run: "auto" (on the chunk's backend:
            the fused Triton kernels of ``preprocess_triton`` with "triton", PyTorch with "torch"), "torch" or
            "triton" (either with either chunk backend; same results up to rounding). The bounded gate and
            ``allow_neg_eigval`` always run in PyTorch.
        **model_call_kwargs: keywords that model code forwards to its attention op with a model call's own
            (transformers' ``kimi_linear`` passes its TransformersKwargs on), accepted as no-ops: those of
            ``common.MODEL_CALL_NO_OP_KEYWORDS`` (``num_items_in_batch``, ``output_attentions``,
            ``output_hidden_states``, ``output_router_logits``) always; the packed-sequence keywords of
            ``common.PACKED_SEQUENCE_KEYWORDS`` (``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``,
            ``max_length_k``, ``seq_idx``) when None or beside ``cu_seqlens`` (alone they raise ValueError: the op
            would run across the sequences' boundaries, as FLA silently does); ``is_causal`` when True or None
            (False raises ValueError). Any other keyword raises TypeError.

    Returns:
        ``(o [B, T, HV, V] in v's dtype, final_state [N, HV, K, V] float32 or None)`` (float64 for float64 inputs;
        ``[N, HV, V, K]`` with ``state_v_first``), and ``h`` third with ``return_intermediate_states``. With no
        tokens (T = 0 or B = 0) o is empty and each final state is its initial state (zeros without one). A
        log-decay of -inf (or anything below ``LOG_DECAY_FLOOR`` = -1000) resets the state exactly, as the
        recurrence does.

    Raises:
        ValueError / TypeError naming the argument on wrong shapes, dtypes, devices, K or V > 256, bad cu_seqlens,
        flag combinations FLA refuses (``allow_neg_eigval`` without ``use_beta_sigmoid_in_kernel``, ``safe_gate``
        with the in-op gate but no lower_bound, ``use_gate_in_kernel`` without A_log or lower_bound), a chunk_size
        other than 32 / 64, float64 on the Triton backend, a keyword outside the signature and the accepted
        model-call keywords (TypeError). NotImplementedError for ``cp_context``. NaN in g or beta
        is not checked and propagates.
    """
    check_model_call_keywords("chunk_kda", model_call_kwargs, cu_seqlens)
    state_v_first = state_layout_alias(state_v_first, transpose_state_layout)
    if cp_context is not None:
        raise NotImplementedError("cp_context (FLA's context parallelism across GPUs) is not supported: run each "
                                  "sequence on one device, passing its initial_state")
    if chunk_size not in FLA_CHUNK_SIZES:
        # FLA's wording, so callers (and FLA's own test) matching its message keep working
        raise ValueError(f"`chunk_size` must be either 32 or 64 for KDA, got {chunk_size}")
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True (as in FLA)")
    if use_gate_in_kernel:
        if safe_gate and lower_bound is None:
            raise ValueError("lower_bound must be given when safe_gate=True and use_gate_in_kernel=True")
        check_lower_bound(lower_bound, safe_gate)
    else:
        lower_bound = None  # ignored without the in-op gate, as FLA does
    validate_kda_args(
        q, k, v, g, beta, initial_state, cu_seqlens, use_gate_in_kernel, A_log, dt_bias, backend,
        lower_bound=lower_bound, state_v_first=state_v_first,
    )
    if preprocess_backend not in BACKENDS:
        raise ValueError(f"preprocess_backend must be one of {BACKENDS}, got {preprocess_backend!r}")
    if use_graph and cu_seqlens is not None:
        if max_num_seqs is not None and cu_seqlens.numel() - 1 != max_num_seqs:
            raise ValueError(f"with use_graph, cu_seqlens must have max_num_seqs + 1 = {max_num_seqs + 1} entries "
                             f"(pad with empty sequences), got {cu_seqlens.numel()}")
    if cu_seqlens is not None and not torch.compiler.is_compiling() and cu_seqlens.is_cuda and (
        torch.cuda.is_current_stream_capturing()
    ):
        raise ValueError("chunk_kda with cu_seqlens cannot be captured in a CUDA graph: it reads cu_seqlens on the "
                         "host (FLA's use_graph mode has no counterpart here); capture fixed-length calls instead")
    backend = resolve_kda_backend(backend, q, k, v, g, beta, initial_state)
    preprocess_backend = backend if preprocess_backend == "auto" else resolve_backend(preprocess_backend, q)
    if return_intermediate_states and torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, beta, initial_state, A_log, dt_bias)
    ):
        raise ValueError("return_intermediate_states is inference only (its states carry no gradient): call under "
                         "torch.inference_mode() or torch.no_grad(), as FLA requires")
    k_dtype = k.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, g, beta, initial_state, use_gate_in_kernel, use_beta_sigmoid_in_kernel = adapt_fla_args(
        q, k, v, g, beta, initial_state, use_gate_in_kernel, A_log, dt_bias, lower_bound, use_beta_sigmoid_in_kernel,
        allow_neg_eigval, state_v_first,
    )
    core_args = (q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, scale, output_final_state,
                 use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, backend, preprocess_backend,
                 chunk_size)
    if return_intermediate_states:
        if torch.compiler.is_compiling():
            o, final_state, h = torch.ops.kimi_linear.chunk_kda_with_states(*core_args)
            final_state = final_state if output_final_state else None
        else:
            o, final_state, h = chunk_kda_with_states(*core_args)
        h = h.to(k_dtype)
        if state_v_first:
            h = h.transpose(-1, -2).contiguous()  # [B, NT, HV, V, K]
    elif torch.compiler.is_compiling():
        o, final_state = torch.ops.kimi_linear.chunk_kda(*core_args)
        final_state = final_state if output_final_state else None
    else:
        o, final_state = chunk_kda_core(*core_args)
    if final_state is not None and state_v_first:
        final_state = final_state.transpose(-1, -2).contiguous()  # [N, HV, V, K]
    if return_intermediate_states:
        return o, final_state, h
    return o, final_state


def chunk_kda_core(
    q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, scale, output_final_state, use_qk_l2norm_in_kernel,
    use_gate_in_kernel, use_beta_sigmoid_in_kernel, backend, preprocess_backend, chunk_size=CHUNK_SIZE,
):
    """The plain problem (q, k with the HV heads of v, the state ``[N, HV, K, V]``, only the in-op activations the
    kernels fuse) on a resolved backend; ``scale`` a float. Returns ``(o, final_state or None)``; differentiable."""
    K = q.shape[-1]
    if q.shape[0] * q.shape[1] == 0:  # no tokens: nothing to compute, each state passes through
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        o = v * 0  # [B, T, HV, V] with no elements, on v's autograd graph
        if not output_final_state:
            return o, None
        ct = math_dtype(q, k, v, g, beta, initial_state)
        if initial_state is None:
            return o, q.new_zeros(N, v.shape[2], K, v.shape[-1], dtype=ct)
        return o, initial_state.to(ct) + 0  # a copy, differentiable
    if backend == "triton":
        from kimi_linear.ops.kda.chunk_triton import chunk_kda_triton

        if preprocess_backend == "torch":
            # The activations in PyTorch here, q and k in the operand dtype the Triton path picks (the widest of
            # q, k, v): the kernels then see what their own (fused) preprocessing would have given them.
            dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
            q, k, g, beta = preprocess(q, k, g, beta, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias,
                                       use_beta_sigmoid_in_kernel, K, operand_dtype=dt)
            use_qk_l2norm_in_kernel = use_gate_in_kernel = use_beta_sigmoid_in_kernel = False
        return chunk_kda_triton(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
            use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        )

    q, k, g, beta = preprocess(
        q, k, g, beta, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, K,
        fused=preprocess_backend == "triton",
    )
    if cu_seqlens is None:
        return naive_chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
    (q, k, v, g, beta), lengths = pack_to_batch([q, k, v, g, beta], cu_seqlens)
    o, final_state = naive_chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
    return unpack_from_batch(o, lengths), final_state


def _sequence_lengths(cu_seqlens: torch.Tensor | None, B: int, T: int) -> list[int]:
    return [T] * B if cu_seqlens is None else sequence_lengths(cu_seqlens)


def chunk_kda_with_states(
    q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, scale, output_final_state, use_qk_l2norm_in_kernel,
    use_gate_in_kernel, use_beta_sigmoid_in_kernel, backend, preprocess_backend, chunk_size=CHUNK_SIZE,
):
    """``chunk_kda_core`` plus the state entering each chunk of ``chunk_size`` tokens (inference only): returns
    ``(o, final_state or None, h)`` with h ``[B, NT, HV, K, V]`` (``[1, NT_total, ...]`` with cu_seqlens) in the
    compute dtype (fp32; fp64 for fp64 inputs)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[-1]
    lengths = _sequence_lengths(cu_seqlens, B, T)
    counts = [-(-n // chunk_size) for n in lengths]
    lead = 1 if cu_seqlens is not None else B
    if B * T == 0:
        o, final_state = chunk_kda_core(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, scale,
                                        output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel,
                                        use_beta_sigmoid_in_kernel, backend, preprocess_backend, chunk_size)
        ct = math_dtype(q, k, v, g, beta, initial_state)
        return o, final_state, q.new_zeros(lead, 0, HV, K, V, dtype=ct)
    if backend == "triton":
        from kimi_linear.ops.kda.chunk_states_triton import chunk_kda_states_triton

        dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, g, beta = preprocess(q, k, g, beta, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias,
                                   use_beta_sigmoid_in_kernel, K, operand_dtype=dt,
                                   fused=preprocess_backend == "triton")
        o, final_state, h = chunk_kda_states_triton(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                    cu_seqlens, lengths, chunk_size)
        return o, final_state, h.reshape(lead, -1, HV, K, V)

    q, k, g, beta = preprocess(
        q, k, g, beta, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, K,
        fused=preprocess_backend == "triton",
    )
    if cu_seqlens is None:
        return naive_chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size,
                               return_chunk_states=True)
    (q, k, v, g, beta), _ = pack_to_batch([q, k, v, g, beta], cu_seqlens)
    o, final_state, h = naive_chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size,
                                        return_chunk_states=True)  # h: [N, NT_max, HV, K, V]
    h = torch.cat([h[i, :n] for i, n in enumerate(counts)])[None]  # [1, NT_total, HV, K, V]
    return unpack_from_batch(o, lengths), final_state, h
