"""The KDA ops registered with ``torch.library``: what ``torch.compile`` sees in place of ``chunk_kda`` and
``fused_recurrent_kda``.

Dynamo cannot trace into the ops' bodies (Triton launches with host-side layouts, ``tolist()`` of cu_seqlens, a
Python loop per chunk or token on the PyTorch path), so under ``torch.compile`` the public functions validate and
adapt their arguments as usual (plain PyTorch, traced) and then call these opaque custom ops, whose fake (meta)
implementations give the output shapes without running anything. In eager mode the public functions call the same
implementations directly: a custom op's dispatch costs tens of microseconds per call, more than a whole decode
step of the Triton recurrent kernel.

Ops (namespace ``kimi_linear``):

* ``chunk_kda`` -> (o, final state or an empty placeholder); differentiable: its backward is the op
  ``chunk_kda_backward``, which runs the forward again under autograd and differentiates it (the forward's
  intermediates are not kept across the opaque boundary).
* ``chunk_kda_with_states`` -> (o, final state, h): ``return_intermediate_states``, inference only. With
  ``cu_seqlens`` the number of chunks depends on its values (a data-dependent size for the compiler).
* ``fused_recurrent_kda`` -> (o, final or per-token states, or an empty placeholder); differentiable on the torch
  backend through ``fused_recurrent_kda_backward`` (recompute, as above); the Triton backend is forward-only.
* ``fused_recurrent_kda_pool_`` -> o; updates the state pool (``initial_state``) in place. Not differentiable
  (a mutating op cannot have an autograd formula).
* ``kda_decode_step_`` -> the layer's fused decode output; updates the conv and state pools in place. Not
  differentiable.

The ops take the arguments the public functions have already validated and reduced (``scale`` a float, the
backend resolved, GVA and the bounded gate of ``chunk_kda`` already applied); call the public functions, not these.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kimi_linear.ops.custom_ops import grads_by_recompute
from kimi_linear.ops.kda.chunk import chunk_kda_core, chunk_kda_with_states
from kimi_linear.ops.kda.decode import kda_decode_step_core
from kimi_linear.ops.kda.naive import math_dtype
from kimi_linear.ops.kda.recurrent import fused_recurrent_kda_core

_CHUNK_DIFF = ("q", "k", "v", "g", "beta", "initial_state", "A_log", "dt_bias")  # differentiable inputs, in order


def _placeholder(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An empty tensor standing for an absent output (custom ops return tensors only)."""
    return like.new_empty(0, dtype=dtype or like.dtype)


# --- chunk_kda -----------------------------------------------------------------------------------------------------


@torch.library.custom_op("kimi_linear::chunk_kda", mutates_args=())
def _chunk_kda_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None,
    cu_seqlens: Tensor | None, A_log: Tensor | None, dt_bias: Tensor | None, scale: float, output_final_state: bool,
    use_qk_l2norm_in_kernel: bool, use_gate_in_kernel: bool, use_beta_sigmoid_in_kernel: bool, backend: str,
    preprocess_backend: str, chunk_size: int,
) -> tuple[Tensor, Tensor]:
    o, final_state = chunk_kda_core(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, scale,
                                    output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel,
                                    use_beta_sigmoid_in_kernel, backend, preprocess_backend, chunk_size)
    # contiguous, as the fake kernel says (the PyTorch path's o is a permuted view)
    return o.contiguous(), (final_state if final_state is not None else _placeholder(q, torch.float32))


def _chunk_state_like(q, v, initial_state, cu_seqlens, g, beta, k) -> Tensor:
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return q.new_empty(N, v.shape[2], q.shape[-1], v.shape[-1], dtype=math_dtype(q, k, v, g, beta, initial_state))


@_chunk_kda_op.register_fake
def _(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, scale, output_final_state,
      use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, backend, preprocess_backend,
      chunk_size):
    o = v.new_empty(v.shape)
    if not output_final_state:
        return o, _placeholder(q, torch.float32)
    return o, _chunk_state_like(q, v, initial_state, cu_seqlens, g, beta, k)


@torch.library.custom_op("kimi_linear::chunk_kda_backward", mutates_args=())
def _chunk_kda_backward_op(
    do: Tensor, dht: Tensor | None, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
    initial_state: Tensor | None, cu_seqlens: Tensor | None, A_log: Tensor | None, dt_bias: Tensor | None,
    scale: float, output_final_state: bool, use_qk_l2norm_in_kernel: bool, use_gate_in_kernel: bool,
    use_beta_sigmoid_in_kernel: bool, backend: str, preprocess_backend: str, chunk_size: int,
) -> list[Tensor]:
    def run(q, k, v, g, beta, initial_state, A_log, dt_bias):
        return chunk_kda_core(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, scale, output_final_state,
                              use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, backend,
                              preprocess_backend, chunk_size)

    return grads_by_recompute(run, [q, k, v, g, beta, initial_state, A_log, dt_bias], [do, dht])


@_chunk_kda_backward_op.register_fake
def _(do, dht, q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, *rest):
    return [_placeholder(q) if x is None else torch.empty_like(x)
            for x in (q, k, v, g, beta, initial_state, A_log, dt_bias)]


def _chunk_setup_context(ctx, inputs, output):
    (q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, *static) = inputs
    ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias)
    ctx.static = static


def _chunk_backward(ctx, do, dht):
    q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias = ctx.saved_tensors
    output_final_state = ctx.static[1]
    if do is None:
        do = torch.zeros_like(v)
    dht = dht if output_final_state and dht is not None and dht.numel() else None
    grads = torch.ops.kimi_linear.chunk_kda_backward(do, dht, q, k, v, g, beta, initial_state, cu_seqlens, A_log,
                                                     dt_bias, *ctx.static)
    present = (q, k, v, g, beta, initial_state, A_log, dt_bias)
    dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias = (None if x is None else d for x, d in zip(present, grads))
    return (dq, dk, dv, dg, dbeta, dh0, None, dA_log, ddt_bias) + (None,) * len(ctx.static)


_chunk_kda_op.register_autograd(_chunk_backward, setup_context=_chunk_setup_context)


@torch.library.custom_op("kimi_linear::chunk_kda_with_states", mutates_args=())
def _chunk_kda_with_states_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None,
    cu_seqlens: Tensor | None, A_log: Tensor | None, dt_bias: Tensor | None, scale: float, output_final_state: bool,
    use_qk_l2norm_in_kernel: bool, use_gate_in_kernel: bool, use_beta_sigmoid_in_kernel: bool, backend: str,
    preprocess_backend: str, chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    o, final_state, h = chunk_kda_with_states(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, scale,
                                              output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel,
                                              use_beta_sigmoid_in_kernel, backend, preprocess_backend, chunk_size)
    return o.contiguous(), (final_state if final_state is not None else _placeholder(q, torch.float32)), h.contiguous()


@_chunk_kda_with_states_op.register_fake
def _(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, scale, output_final_state,
      use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, backend, preprocess_backend,
      chunk_size):
    B, T, H, K = q.shape
    ct = math_dtype(q, k, v, g, beta, initial_state)
    if cu_seqlens is None:
        lead, NT = B, -(-T // chunk_size)
    else:
        lead, NT = 1, torch.library.get_ctx().new_dynamic_size()
    h = q.new_empty(lead, NT, v.shape[2], K, v.shape[-1], dtype=ct)
    final = _chunk_state_like(q, v, initial_state, cu_seqlens, g, beta, k) if output_final_state else _placeholder(
        q, torch.float32)
    return v.new_empty(v.shape), final, h


# --- fused_recurrent_kda -------------------------------------------------------------------------------------------


def _recurrent_states_like(q, v, initial_state, cu_seqlens, state_indices, output_final_state, state_v_first,
                           k, g, beta) -> Tensor:
    """The fake of the second output of ``fused_recurrent_kda`` (the op without a pool update)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[-1]
    tail = (HV, V, K) if state_v_first else (HV, K, V)
    ct = math_dtype(q, k, v, g, beta, initial_state)
    if state_indices is not None:  # not in place: the state after every token
        return q.new_empty(B * T, *tail, dtype=ct)
    if not output_final_state:
        return _placeholder(q, torch.float32)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return q.new_empty(N, *tail, dtype=ct)


@torch.library.custom_op("kimi_linear::fused_recurrent_kda", mutates_args=())
def _fused_recurrent_kda_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, A_log: Tensor | None, dt_bias: Tensor | None,
    initial_state: Tensor | None, cu_seqlens: Tensor | None, state_indices: Tensor | None,
    num_accepted_tokens: Tensor | None, scale: float, output_final_state: bool, use_qk_l2norm_in_kernel: bool,
    use_gate_in_kernel: bool, use_beta_sigmoid_in_kernel: bool, allow_neg_eigval: bool, lower_bound: float | None,
    state_v_first: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    o, states = fused_recurrent_kda_core(
        q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, state_indices, num_accepted_tokens, scale,
        output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
        allow_neg_eigval, lower_bound, state_v_first, backend, inplace_final_state=False,
    )
    o = o.contiguous()
    if states is None:
        return o, _placeholder(q, torch.float32)
    # with no tokens the final state may be the initial state itself; a custom op's output must not alias an input
    return o, (states.clone() if _shares_storage(states, initial_state) else states.contiguous())


def _shares_storage(x: Tensor, y: Tensor | None) -> bool:
    return y is not None and x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()


@_fused_recurrent_kda_op.register_fake
def _(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, state_indices, num_accepted_tokens, scale,
      output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval,
      lower_bound, state_v_first, backend):
    return v.new_empty(v.shape), _recurrent_states_like(q, v, initial_state, cu_seqlens, state_indices,
                                                        output_final_state, state_v_first, k, g, beta)


@torch.library.custom_op("kimi_linear::fused_recurrent_kda_backward", mutates_args=())
def _fused_recurrent_kda_backward_op(
    do: Tensor, dstates: Tensor | None, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
    A_log: Tensor | None, dt_bias: Tensor | None, initial_state: Tensor | None, cu_seqlens: Tensor | None,
    state_indices: Tensor | None, num_accepted_tokens: Tensor | None, scale: float, output_final_state: bool,
    use_qk_l2norm_in_kernel: bool, use_gate_in_kernel: bool, use_beta_sigmoid_in_kernel: bool,
    allow_neg_eigval: bool, lower_bound: float | None, state_v_first: bool, backend: str,
) -> list[Tensor]:
    if backend != "torch":
        raise RuntimeError("fused_recurrent_kda's Triton backend is forward-only: use backend='torch' for gradients")

    def run(q, k, v, g, beta, A_log, dt_bias, initial_state):
        return fused_recurrent_kda_core(
            q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, state_indices, num_accepted_tokens, scale,
            output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
            allow_neg_eigval, lower_bound, state_v_first, backend, inplace_final_state=False,
        )

    return grads_by_recompute(run, [q, k, v, g, beta, A_log, dt_bias, initial_state], [do, dstates])


@_fused_recurrent_kda_backward_op.register_fake
def _(do, dstates, q, k, v, g, beta, A_log, dt_bias, initial_state, *rest):
    return [_placeholder(q) if x is None else torch.empty_like(x)
            for x in (q, k, v, g, beta, A_log, dt_bias, initial_state)]


def _recurrent_setup_context(ctx, inputs, output):
    (q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, state_indices, num_accepted_tokens,
     *static) = inputs
    ctx.save_for_backward(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, state_indices,
                          num_accepted_tokens)
    ctx.static = static


def _recurrent_backward(ctx, do, dstates):
    (q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, state_indices,
     num_accepted_tokens) = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    dstates = dstates if dstates is not None and dstates.numel() else None
    grads = torch.ops.kimi_linear.fused_recurrent_kda_backward(
        do, dstates, q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, state_indices,
        num_accepted_tokens, *ctx.static)
    present = (q, k, v, g, beta, A_log, dt_bias, initial_state)
    return tuple(None if x is None else d for x, d in zip(present, grads)) + (None,) * (3 + len(ctx.static))


_fused_recurrent_kda_op.register_autograd(_recurrent_backward, setup_context=_recurrent_setup_context)


@torch.library.custom_op("kimi_linear::fused_recurrent_kda_pool_", mutates_args=("initial_state",))
def _fused_recurrent_kda_pool_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, A_log: Tensor | None, dt_bias: Tensor | None,
    initial_state: Tensor, cu_seqlens: Tensor | None, state_indices: Tensor, num_accepted_tokens: Tensor | None,
    scale: float, output_final_state: bool, use_qk_l2norm_in_kernel: bool, use_gate_in_kernel: bool,
    use_beta_sigmoid_in_kernel: bool, allow_neg_eigval: bool, lower_bound: float | None, state_v_first: bool,
    backend: str,
) -> Tensor:
    with torch.no_grad():
        o, _ = fused_recurrent_kda_core(
            q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, state_indices, num_accepted_tokens, scale,
            output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
            allow_neg_eigval, lower_bound, state_v_first, backend, inplace_final_state=True,
        )
    return o.contiguous()


@_fused_recurrent_kda_pool_op.register_fake
def _(q, k, v, *rest):
    return v.new_empty(v.shape)


# --- kda_decode_step -----------------------------------------------------------------------------------------------


@torch.library.custom_op("kimi_linear::kda_decode_step_", mutates_args=("conv_pool", "state_pool"))
def _kda_decode_step_op(
    qkv: Tensor, f_low: Tensor, beta_logits: Tensor, g_low: Tensor | None, conv_pool: Tensor | None,
    w_q: Tensor | None, w_k: Tensor | None, w_v: Tensor | None, f_b_weight: Tensor, A_log: Tensor, dt_bias: Tensor,
    state_pool: Tensor, slots: Tensor, norm_weight: Tensor, g_b_weight: Tensor | None, eps: float, scale: float,
    backend: str,
) -> Tensor:
    with torch.no_grad():
        return kda_decode_step_core(qkv, f_low, beta_logits, g_low, conv_pool, w_q, w_k, w_v, f_b_weight, A_log,
                                    dt_bias, state_pool, slots, norm_weight, g_b_weight, eps, scale, backend)


@_kda_decode_step_op.register_fake
def _(qkv, f_low, beta_logits, g_low, conv_pool, w_q, w_k, w_v, f_b_weight, A_log, dt_bias, state_pool, *rest):
    _, H, _, V = state_pool.shape
    return qkv.new_empty(qkv.shape[0], H * V)
