"""Public recurrent KDA for decoding: ``fused_recurrent_kda``, with a state pool addressed by ``state_indices``."""

from __future__ import annotations

import torch

from kimi_linear.ops.kda.chunk import resolve_backend
from kimi_linear.ops.kda.common import pack_to_batch, preprocess, unpack_from_batch, validate_kda_args
from kimi_linear.ops.kda.naive import naive_recurrent_kda


def fused_recurrent_kda(
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
    backend: str = "auto",
    state_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention token by token (paper Eq. 1): the decoding path. Arguments as ``chunk_kda``, plus:

    Args:
        state_indices: int ``[N]``. When given, ``initial_state`` is a state pool ``[S, H, K, V]`` float32 and
            sequence i starts from slot ``state_indices[i]`` and writes its final state back there, in place;
            a negative index means "start from zeros and write nothing". Slots not named are untouched.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state)`` where final_state is the updated pool itself when
        ``state_indices`` is given, else ``[N, H, K, V]`` float32 if ``output_final_state``, else None.
        The Triton backend is forward-only; the torch backend is differentiable.
    """
    validate_kda_args(
        q, k, v, g, beta, initial_state, cu_seqlens, use_gate_in_kernel, A_log, dt_bias, backend, state_indices
    )
    backend = resolve_backend(backend, q)
    if backend == "triton":
        from kimi_linear.ops.kda.recurrent_triton import fused_recurrent_kda_triton

        return fused_recurrent_kda_triton(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
            use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, state_indices=state_indices,
        )

    K = q.shape[-1]
    q, k, g, beta = preprocess(
        q, k, g, beta, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, K
    )
    pool = None
    if state_indices is not None:
        pool, slots = initial_state, state_indices.long()
        has_state = (slots >= 0)[:, None, None, None]
        initial_state = torch.where(has_state, pool[slots.clamp(min=0)], 0.0)  # [N, H, K, V]
    want_state = output_final_state or pool is not None
    if cu_seqlens is None:
        o, final_state = naive_recurrent_kda(q, k, v, g, beta, scale, initial_state, want_state)
    else:
        (q, k, v, g, beta), lengths = pack_to_batch([q, k, v, g, beta], cu_seqlens)
        o, final_state = naive_recurrent_kda(q, k, v, g, beta, scale, initial_state, want_state)
        o = unpack_from_batch(o, lengths)
    if pool is None:
        return o, final_state
    written = slots >= 0
    with torch.no_grad():
        pool[slots[written]] = final_state[written]
    return o, pool
