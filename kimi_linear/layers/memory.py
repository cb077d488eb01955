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

``autocast_input(x)`` casts ``x`` to autocast's dtype once, when autocast is on: several ``nn.Linear``\\s reading
the same fp32 input would each make (and save) their own low-precision copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


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
        inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        detached = [None if t is None else t.detach().requires_grad_(need and t.is_floating_point())
                    for t, need in zip(inputs, needs, strict=True)]
        device_type, enabled, dtype = ctx.autocast_state
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            outputs = ctx.fn(*detached)
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


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in autocast's dtype when autocast is on for its device and x is a wider float, else ``x``."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype == torch.float32:
        return x.to(torch.get_autocast_dtype(device_type))
    return x
