"""Helpers for the ops registered with ``torch.library`` (opaque to torch.compile): backward by recomputation.

A custom op's backward that torch.compile must trace has to be another custom op. Ours run the forward again
under autograd and differentiate it, so the forward's intermediates never cross the opaque boundary. The
implementation of a custom op runs below the dispatcher's Autograd key (autograd is excluded there, whatever the
grad mode says), so the recomputation re-enables it explicitly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch


@contextlib.contextmanager
def autograd_inside_custom_op():
    """Record autograd graphs inside a custom op's implementation: drop the Autograd functionality from the
    thread's excluded dispatch keys (what ``torch.library`` put there before calling the implementation) and turn
    grad mode on, for the duration."""
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set() - C.DispatchKeySet(C.DispatchKey.AutogradFunctionality)
    with C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def grads_by_recompute(
    run: Callable[..., Sequence[torch.Tensor | None]],
    inputs: Sequence[torch.Tensor | None],
    cotangents: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    """Gradients of ``run(*inputs)`` (a sequence of outputs, None allowed) against ``cotangents`` (one per output,
    None for "no gradient"), one per input: by running it again under autograd. Zeros where a float input does not
    reach the outputs; an empty tensor where the input is absent (None) or not floating point (custom ops return
    tensors only)."""
    with autograd_inside_custom_op():
        leaves = [x.detach().requires_grad_() if x is not None and x.is_floating_point() else x for x in inputs]
        outs = run(*leaves)
        pairs = [(o, c) for o, c in zip(outs, cotangents) if o is not None and c is not None and o.requires_grad]
        wrt = [x for x in leaves if x is not None and x.requires_grad]
        grads = (torch.autograd.grad([o for o, _ in pairs], wrt, [c for _, c in pairs], allow_unused=True)
                 if pairs and wrt else [None] * len(wrt))
    some = next(x for x in inputs if x is not None)
    by_leaf = iter(grads)
    result = []
    for x in leaves:
        if x is None or not x.requires_grad:
            result.append(some.new_empty(0))
            continue
        grad = next(by_leaf)
        result.append(torch.zeros_like(x) if grad is None else grad)
    return result
