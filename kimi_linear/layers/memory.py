"""Keeping a layer's saved activations small: recompute cheap element-wise glue in backward, cast inputs once.

``recompute(fn, *inputs)`` runs ``fn`` without building a graph and keeps only ``inputs`` for the backward, which
runs ``fn`` again (under the same autocast state) to differentiate it. Use it for cheap, memory-bound steps whose
intermediates would otherwise be saved: convolutions and activations, normalisations, gates. Every tensor that
``fn`` differentiates through must be one of ``inputs`` (parameters included: a parameter reached through a
closure would get no gradient); other arguments go in through the closure. ``fn`` must be deterministic and
return a tensor or a tuple of tensors that are new (not one of its inputs).

Unlike ``torch.utils.checkpoint`` it is an ordinary ``autograd.Function``: what it keeps is exactly its
``save_for_backward`` (visible to ``saved_tensors_hooks``, ``kimi_linear.train.activation_memory``), gradients
reach the inputs through the outer graph (so DDP and FSDP see them as usual), and it needs no frame bookkeeping.

``recompute_linear(fn, weight, *inputs)`` is ``F.linear(fn(*inputs), weight)`` keeping only ``inputs`` and the
weight: the matmul's own input (what autograd would keep for the weight's gradient) is recomputed with ``fn`` in
backward. The matmul is not run again.

``autocast_input(x)`` casts ``x`` to autocast's dtype once, when autocast is on: several ``nn.Linear``\\s reading
the same fp32 input would each make (and save) their own low-precision copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kimi_linear.ops.linear import linear


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, autocast_state, *inputs):
        ctx.fn, ctx.autocast_state = fn, autocast_state
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        outputs = fn(*inputs)
        single = isinstance(outputs, torch.Tensor)
        ctx.single = single
        outputs = (outputs,) if single else tuple(outputs)
        ctx.mark_non_differentiable(*(o for o in outputs if not o.is_floating_point()))
        return outputs[0] if single else outputs

    @staticmethod
    def backward(ctx, *grads):
        detached, outputs = _rerun(ctx, ctx.saved_tensors, ctx.needs_input_grad[2:])
        outputs = (outputs,) if ctx.single else tuple(outputs)
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None and o.requires_grad]
        wanted = [t for t in detached if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                   if pairs and wanted else [None] * len(wanted))
        return (None, None, *(next(got) if t is not None and t.requires_grad else None for t in detached))


def recompute(fn: Callable, *inputs: torch.Tensor | None):
    """``fn(*inputs)``, keeping only ``inputs`` for the backward, which recomputes ``fn``.

    Args:
        fn: deterministic function of ``inputs`` returning a tensor or a tuple of tensors (new ones, not inputs).
        inputs: tensors (or None) — every tensor ``fn`` must differentiate through, parameters included.

    Returns:
        What ``fn`` returns. Without grad mode, or when no input requires grad, ``fn`` is simply called.
    """
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in inputs):
        return fn(*inputs)
    device = next(t.device for t in inputs if t is not None)
    state = (device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    return _Recompute.apply(fn, state, *inputs)


def _rerun(ctx, inputs, needs):
    """``ctx.fn`` run again on detached ``inputs`` under the forward's autocast state, with grad: (the detached
    inputs, its outputs as a tuple)."""
    detached = [None if t is None else t.detach().requires_grad_(need and t.is_floating_point())
                for t, need in zip(inputs, needs, strict=True)]
    device_type, enabled, dtype = ctx.autocast_state
    with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
        outputs = ctx.fn(*detached)
    return detached, outputs


class _RecomputeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, autocast_state, weight, *inputs):
        ctx.fn, ctx.autocast_state = fn, autocast_state
        ctx.save_for_backward(weight, *inputs)
        return F.linear(fn(*inputs), weight)

    @staticmethod
    def backward(ctx, dy):
        weight, *inputs = ctx.saved_tensors
        detached, a = _rerun(ctx, inputs, ctx.needs_input_grad[3:])
        device_type, enabled, dtype = ctx.autocast_state
        low = dtype if enabled else weight.dtype  # the matmul's operand dtype, as F.linear ran it
        dy_2d = dy.reshape(-1, dy.shape[-1])  # [N, out]
        # the products autograd's matmul backward forms (the same operand order and layout, so the same numbers)
        dweight = dy_2d.t().mm(a.detach().reshape(-1, a.shape[-1]).to(low)).to(weight.dtype) if (
            ctx.needs_input_grad[2]) else None
        wanted = [t for t in detached if t is not None and t.requires_grad]
        got = iter([])
        if wanted and a.requires_grad:
            da = dy_2d.mm(weight.to(low)).reshape(a.shape).to(a.dtype)
            got = iter(torch.autograd.grad(a, wanted, da, allow_unused=True))
        return (None, None, dweight, *(next(got, None) if t is not None and t.requires_grad else None
                                       for t in detached))


def recompute_linear(fn: Callable, weight: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(fn(*inputs), weight)`` (no bias), keeping only ``weight`` and ``inputs`` for the backward, which
    recomputes ``fn`` for the weight's gradient and differentiates it; the matmul runs once each way, as usual.

    Args:
        fn: deterministic function of ``inputs`` returning one tensor ``[..., in]`` (a new one); as ``recompute``.
        weight: ``[out, in]``.
        inputs: tensors (or None), parameters included, as ``recompute``.

    Returns:
        ``[..., out]``, as F.linear (under autocast in its dtype).
    """
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (weight, *inputs)):
        return linear(fn(*inputs), weight)
    device = weight.device
    state = (device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    return _RecomputeLinear.apply(fn, state, weight, *inputs)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in autocast's dtype when autocast is on for its device and x is a wider float, else ``x``."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype == torch.float32:
        return x.to(torch.get_autocast_dtype(device_type))
    return x
