"""Public chunkwise-parallel KDA: ``chunk_kda``. Dispatches to the Triton kernels on CUDA, the PyTorch path otherwise."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from kimi_linear.ops.kda.common import BACKENDS, pack_to_batch, preprocess, unpack_from_batch, validate_kda_args
from kimi_linear.ops.kda.naive import naive_chunk_kda


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """'auto' -> 'triton' for CUDA tensors when Triton is installed, 'torch' otherwise.

    'triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter).
    """
    if backend == "auto":
        return "triton" if x.is_cuda and _triton_installed() else "torch"
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
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
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    backend: str = "auto",
    preprocess_backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention over whole sequences, chunkwise-parallel (paper §3.1); differentiable.

    S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale q_t)   (paper Eq. 1)

    Args:
        q, k: ``[B, T, H, K]`` float16/bfloat16/float32. L2-normalised by the caller unless
            ``use_qk_l2norm_in_kernel``.
        v: ``[B, T, H, V]``, same dtype family; the output has v's dtype.
        g: log-decay ``[B, T, H, K]`` (per channel, KDA) or ``[B, T, H]`` (one scalar per head, GDN), <= 0;
            with ``use_gate_in_kernel`` it is the gate pre-activation and g = -exp(A_log) softplus(g + dt_bias).
        beta: ``[B, T, H]`` step size in (0, 1); logits when ``use_beta_sigmoid_in_kernel``.
        scale: query scale, default K ** -0.5.
        initial_state: ``[N, H, K, V]`` float32, N = B, or the number of sequences with ``cu_seqlens``.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: int ``[N + 1]`` boundaries of N sequences packed along T (B must be 1); empty sequences
            are allowed and pass their initial state through.
        A_log: ``[H]`` (or ``[1, 1, H, 1]``), dt_bias: ``[H * K]`` (``[H]`` for a scalar gate) — used only with
            ``use_gate_in_kernel``.
        backend: "auto" (Triton on CUDA tensors, PyTorch otherwise), "torch" or "triton".
        preprocess_backend: where the in-op activations (``use_*_in_kernel``) run: "auto" (on the chunk's backend:
            the fused Triton kernels of ``preprocess_triton`` with "triton", PyTorch with "torch"), "torch" or
            "triton" (either with either chunk backend; same results up to rounding).

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``. With no tokens (T = 0 or
        B = 0) o is empty and each final state is its initial state (zeros without one). A log-decay of -inf (or
        anything below ``LOG_DECAY_FLOOR`` = -1000) resets the state exactly, as the recurrence does.

    Raises:
        ValueError / TypeError naming the argument on wrong shapes, dtypes, devices, K or V > 256, or bad
        cu_seqlens. NaN in g or beta is not checked and propagates.
    """
    validate_kda_args(q, k, v, g, beta, initial_state, cu_seqlens, use_gate_in_kernel, A_log, dt_bias, backend)
    if preprocess_backend not in BACKENDS:
        raise ValueError(f"preprocess_backend must be one of {BACKENDS}, got {preprocess_backend!r}")
    backend = resolve_backend(backend, q)
    preprocess_backend = backend if preprocess_backend == "auto" else resolve_backend(preprocess_backend, q)
    K = q.shape[-1]
    if q.shape[0] * q.shape[1] == 0:  # no tokens: nothing to compute, each state passes through
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        o = v * 0  # [B, T, H, V] with no elements, on v's autograd graph
        if not output_final_state:
            return o, None
        if initial_state is None:
            return o, q.new_zeros(N, q.shape[2], K, v.shape[-1], dtype=torch.float32)
        return o, initial_state.float() + 0  # a copy, differentiable
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

    scale = K**-0.5 if scale is None else scale
    q, k, g, beta = preprocess(
        q, k, g, beta, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, K,
        fused=preprocess_backend == "triton",
    )
    if cu_seqlens is None:
        o, final_state = naive_chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state)
        return o, final_state
    (q, k, v, g, beta), lengths = pack_to_batch([q, k, v, g, beta], cu_seqlens)
    o, final_state = naive_chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state)
    return unpack_from_batch(o, lengths), final_state
