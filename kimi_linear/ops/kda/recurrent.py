"""Public recurrent KDA for decoding: ``fused_recurrent_kda`` (FLA 0.6.0's signature), with a state pool addressed
per sequence or per token (speculative decoding)."""

from __future__ import annotations

import torch

from kimi_linear.ops.kda.chunk import resolve_kda_backend
from kimi_linear.ops.kda.common import (
    adapt_fla_args,
    check_model_call_keywords,
    pack_to_batch,
    preprocess,
    state_layout_alias,
    unpack_from_batch,
    validate_kda_args,
)
from kimi_linear.ops.kda.naive import naive_recurrent_kda


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    lower_bound: float | None = None,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    ssm_state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    inplace_final_state: bool = True,
    out: torch.Tensor | None = None,
    transpose_state_layout: bool | None = None,
    safe_gate: bool = False,
    backend: str = "auto",
    state_indices: torch.Tensor | None = None,
    **model_call_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention token by token (paper Eq. 1): the decoding path.

    S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale q_t)

    The positional order is FLA 0.6.0's (``A_log, dt_bias`` before ``scale``); everything after ``cu_seqlens`` is
    keyword-only. Where FLA's public op silently drops its spec-decoding keywords (``ssm_state_indices``,
    ``num_accepted_tokens``, ``inplace_final_state``, ``out``), this op implements them with the semantics of
    FLA's / vLLM's decode kernel (``fused_recurrent_kda_fwd``).
    vLLM's layer calls it by keyword with the state pool, ``ssm_state_indices`` and ``cu_seqlens``; its current FLA
    copy keeps the pool ``[S, H, V, K]``: pass ``state_v_first=True`` (tests/test_interop_vllm_calls.py).

    Args:
        q, k: ``[B, T, H, K]`` float16/bfloat16/float32 (float64 on the torch backend). L2-normalised by the caller
            unless ``use_qk_l2norm_in_kernel``.
        v: ``[B, T, HV, V]``; HV a multiple of H (grouped value heads, GVA: value head hv reads query/key head
            hv // (HV // H)). The output has v's dtype.
        g: log-decay ``[B, T, HV, K]`` (per channel, KDA) or ``[B, T, HV]`` (one scalar per head, GDN), <= 0;
            with ``use_gate_in_kernel`` the gate pre-activation (see ``lower_bound``).
        beta: ``[B, T, HV]`` step size in (0, 1), or ``[B, T, HV, V]`` (one per value channel, as FLA's kernel
            allows); logits when ``use_beta_sigmoid_in_kernel``.
        A_log: ``[HV]`` (or ``[1, 1, HV, 1]``), the gate's log-rate; used only with ``use_gate_in_kernel``, where
            it is required unless ``lower_bound`` is set.
        dt_bias: ``[HV * K]`` (``[HV]`` for a scalar gate) added to g before the activation; used only with
            ``use_gate_in_kernel``; None for no bias.
        scale: query scale, default K ** -0.5.
        initial_state: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first``), float32; float16/bfloat16 are
            read as fp32 (FLA casts too). With state indices it is the state pool ``[S, HV, K, V]`` (any of those
            dtypes; each slot contiguous, any stride between slots, as in vLLM's paged cache; updated in place:
            read widened to fp32, the call's tokens run in fp32, each store rounded to nearest in the pool's
            dtype, so a bf16 pool halves the decode traffic).
        output_final_state: also return the state after the last token of each sequence (without state indices).
        use_qk_l2norm_in_kernel: L2-normalise q and k (eps 1e-6 inside the square root) first.
        use_gate_in_kernel: g is the gate pre-activation: g = -exp(A_log) softplus(g + dt_bias), or with
            ``lower_bound`` the bounded gate lower_bound * sigmoid(exp(A_log) (g + dt_bias)) (A_log None:
            lower_bound * sigmoid(g + dt_bias)).
        use_beta_sigmoid_in_kernel: beta is logits: beta = sigmoid(beta).
        allow_neg_eigval: beta = 2 sigmoid(beta), in (0, 2); needs ``use_beta_sigmoid_in_kernel`` (as in FLA).
        lower_bound: the bounded gate's floor, a finite negative float; used only with ``use_gate_in_kernel`` (FLA
            ignores it otherwise, and so does this op).
        state_v_first: states (initial, final, pool, per-token) are ``[..., V, K]`` instead of ``[..., K, V]``.
        cu_seqlens: int ``[N + 1]`` boundaries of N sequences packed along T (B must be 1).
        ssm_state_indices: FLA/vLLM's name for the state slots: int ``[N]``, one slot per sequence (start from it,
            write the final state back to it, in place), or ``[N, C]``, one per token (start from column 0, or
            column ``num_accepted_tokens - 1``; the state after token t goes to column t, in place). A negative
            slot means "start from zeros / write nothing". Tokens past column C - 1 write nothing. Slots named
            twice in one call race. With ``[N]`` slots and several tokens per sequence, FLA's kernel reads
            misplaced slots; here the sequence's final state goes to its slot.
        num_accepted_tokens: int ``[N]`` in 1..C, with ``[N, C]`` slots: speculative decoding's accepted count,
            which picks the column holding each sequence's initial state. A column outside 0..C-1 reads zeros.
        inplace_final_state: with state indices, True (default) updates the pool in place; False leaves the pool
            untouched and returns the state after every token as a new ``[B * T, HV, K, V]`` float32 tensor (row
            = token, as FLA's kernel writes it). Without state indices it has no effect (FLA's public op ignores
            it too).
        out: ``[B, T, HV, V]`` tensor the output is written to (and returned).
        transpose_state_layout: FLA's deprecated name of ``state_v_first`` (warns).
        safe_gate: accepted for symmetry with ``chunk_kda`` (FLA's recurrent op takes it into ``**kwargs`` and
            ignores it); no effect: the recurrence is exact for any gate.
        backend: "auto" (Triton on CUDA tensors, PyTorch otherwise and for float64 inputs), "torch" or "triton".
        state_indices: this library's name of ``ssm_state_indices`` (the same argument; pass one of the two).
        **model_call_kwargs: keywords model code forwards with a model call's own, accepted as no-ops exactly as by
            ``chunk_kda`` (``common.MODEL_CALL_NO_OP_KEYWORDS`` always: ``num_items_in_batch``,
            ``output_attentions``, ``output_hidden_states``, ``output_router_logits``; the packed-sequence keywords
            when None or beside ``cu_seqlens``; ``is_causal`` when True or None). Any other keyword raises TypeError
            (FLA swallows every unknown keyword).

    Returns:
        ``(o [B, T, HV, V] in v's dtype, states)`` where states is the pool itself (in place) with state indices,
        the per-token states with state indices and ``inplace_final_state=False``, else ``[N, HV, K, V]`` float32
        if ``output_final_state`` (float64 for float64 inputs), else None. The Triton backend is forward-only; the
        torch backend is differentiable (through o and the returned final state, not through pool writes).

    Raises:
        ValueError / TypeError naming the argument on wrong shapes, dtypes, devices, flag combinations FLA refuses
        (``allow_neg_eigval`` without ``use_beta_sigmoid_in_kernel``; ``use_gate_in_kernel`` without A_log or
        lower_bound), float64 on the Triton backend, bad cu_seqlens, or a keyword outside the signature and the
        accepted model-call keywords (TypeError). IndexError (torch backend only) for a slot
        >= S; the Triton backend treats it as "no slot" (checking would need a host sync).
    """
    check_model_call_keywords("fused_recurrent_kda", model_call_kwargs, cu_seqlens)
    state_v_first = state_layout_alias(state_v_first, transpose_state_layout)
    if state_indices is not None and ssm_state_indices is not None:
        raise ValueError("pass state_indices or ssm_state_indices (the same argument), not both")
    indices = ssm_state_indices if ssm_state_indices is not None else state_indices
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True (as in FLA)")
    if not use_gate_in_kernel:
        lower_bound = None  # ignored without the in-op gate, as FLA does
    N = validate_kda_args(
        q, k, v, g, beta, initial_state, cu_seqlens, use_gate_in_kernel, A_log, dt_bias, backend, indices,
        lower_bound=lower_bound, state_v_first=state_v_first, per_channel_beta=True,
    )
    if num_accepted_tokens is not None:
        if indices is None or indices.dim() != 2:
            raise ValueError("num_accepted_tokens needs per-token state indices [N, C] (ssm_state_indices)")
        if not isinstance(num_accepted_tokens, torch.Tensor) or num_accepted_tokens.dtype not in (
            torch.int32, torch.int64
        ):
            raise TypeError("num_accepted_tokens must be an int32/int64 tensor [N]")
        if num_accepted_tokens.shape != (N,) or num_accepted_tokens.device != q.device:
            raise ValueError(f"num_accepted_tokens must be [N]=[{N}] on {q.device}, got "
                             f"{tuple(num_accepted_tokens.shape)} on {num_accepted_tokens.device}")
    if out is not None:
        HV, V = v.shape[2], v.shape[3]
        if not isinstance(out, torch.Tensor) or out.shape != v.shape[:2] + (HV, V) or out.device != v.device:
            raise ValueError(f"out must be a tensor of v's shape {tuple(v.shape)} on {v.device}")
        if not out.is_floating_point():
            raise TypeError(f"out must be a float tensor, got {out.dtype}")
    backend = resolve_kda_backend(backend, q, k, v, g, beta, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    in_place = indices is not None and inplace_final_state

    if torch.compiler.is_compiling():
        args = (q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, indices, num_accepted_tokens, scale,
                output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
                allow_neg_eigval, lower_bound, state_v_first, backend)
        if in_place:
            o, states = torch.ops.kimi_linear.fused_recurrent_kda_pool_(*args), initial_state
        else:
            o, states = torch.ops.kimi_linear.fused_recurrent_kda(*args)
            states = states if (indices is not None or output_final_state) else None
    else:
        o, states = fused_recurrent_kda_core(
            q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, indices, num_accepted_tokens, scale,
            output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
            allow_neg_eigval, lower_bound, state_v_first, backend, inplace_final_state=inplace_final_state, out=out,
        )
    if out is not None and o is not out:
        o = out.copy_(o)
    return o, states


def fused_recurrent_kda_core(
    q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, state_indices, num_accepted_tokens, scale,
    output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval,
    lower_bound, state_v_first, backend, *, inplace_final_state=True, out=None,
):
    """``fused_recurrent_kda`` on validated arguments and a resolved backend (see its docstring); ``scale`` a float.
    Returns ``(o, states)``: the pool with in-place state indices, the per-token states with out-of-place ones,
    else the final states or None."""
    if backend == "triton":
        from kimi_linear.ops.kda.recurrent_triton import fused_recurrent_kda_triton

        return fused_recurrent_kda_triton(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
            use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, state_indices=state_indices,
            lower_bound=lower_bound, allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first,
            num_accepted_tokens=num_accepted_tokens, inplace_final_state=inplace_final_state, out=out,
        )
    return _recurrent_torch(
        q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, state_indices, num_accepted_tokens, scale,
        output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
        allow_neg_eigval, lower_bound, state_v_first, inplace_final_state,
    )


def initial_slots(state_indices: torch.Tensor, num_accepted_tokens: torch.Tensor | None) -> torch.Tensor:
    """The slot each sequence starts from, int64 ``[N]`` (-1: none): ``[N]`` indices as they are; ``[N, C]`` ones
    at column ``num_accepted_tokens - 1`` (0 without), -1 where that column is outside 0..C-1."""
    if state_indices.dim() == 1:
        return state_indices.long()
    N, C = state_indices.shape
    col = (num_accepted_tokens.long() - 1) if num_accepted_tokens is not None else state_indices.new_zeros(N).long()
    inside = (col >= 0) & (col < C)
    slot = state_indices.long().gather(1, col.clamp(0, max(C - 1, 0))[:, None])[:, 0]
    return torch.where(inside, slot, -1)


def _recurrent_torch(
    q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, state_indices, num_accepted_tokens, scale,
    output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval,
    lower_bound, state_v_first, inplace_final_state,
):
    pool = initial_state if state_indices is not None else None
    q, k, g, beta, initial_state, use_gate_in_kernel, use_beta_sigmoid_in_kernel = adapt_fla_args(
        q, k, v, g, beta, None if pool is not None else initial_state, use_gate_in_kernel, A_log, dt_bias,
        lower_bound, use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first,
    )
    B, T, HV, V = v.shape
    K = q.shape[-1]
    q, k, g, beta = preprocess(
        q, k, g, beta, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, K
    )
    pool_kv = None
    every_token = False
    if pool is not None:
        pool_kv = pool.transpose(-1, -2) if state_v_first else pool  # [S, HV, K, V], a view of the pool
        slots = initial_slots(state_indices, num_accepted_tokens)
        has_state = (slots >= 0)[:, None, None, None]
        initial_state = torch.where(has_state, pool_kv[slots.clamp(min=0)], 0.0)  # [N, HV, K, V]
        every_token = state_indices.dim() == 2 or not inplace_final_state
    want_final = output_final_state or (pool is not None and not every_token)
    lengths = None
    if cu_seqlens is None:
        res = naive_recurrent_kda(q, k, v, g, beta, scale, initial_state, want_final, output_all_states=every_token)
        o = res[0]
    else:
        (q, k, v, g, beta), lengths = pack_to_batch([q, k, v, g, beta], cu_seqlens)
        res = naive_recurrent_kda(q, k, v, g, beta, scale, initial_state, want_final, output_all_states=every_token)
        o = unpack_from_batch(res[0], lengths)
    final_state = res[1]
    if pool is None:
        if final_state is not None and state_v_first:
            final_state = final_state.transpose(-1, -2).contiguous()  # [N, HV, V, K]
        return o, final_state

    all_states = res[2] if every_token else None  # [N, T_max, HV, K, V]
    if not inplace_final_state:  # the state after every token, one row per token of the packed batch
        rows = all_states.reshape(B * T, HV, K, V) if lengths is None else unpack_from_batch(all_states, lengths)[0]
        return o, (rows.transpose(-1, -2).contiguous() if state_v_first else rows)
    with torch.no_grad():
        if state_indices.dim() == 1:
            written = slots >= 0
            pool_kv[slots[written]] = final_state[written].to(pool.dtype)
        else:
            n_lengths = torch.tensor(lengths, device=q.device) if lengths is not None else torch.full(
                (B,), T, device=q.device)
            cols = min(all_states.shape[1], state_indices.shape[1])
            token_slots = state_indices[:, :cols].long()  # [N, cols]
            written = (torch.arange(cols, device=q.device)[None] < n_lengths[:, None]) & (token_slots >= 0)
            pool_kv[token_slots[written]] = all_states[:, :cols][written].to(pool.dtype)
    return o, pool
