"""The model's projections, ``y = x W^T`` (no bias), with the one-row case of decoding on its own kernel.

``linear_reference`` is ``F.linear``. ``linear`` takes a Triton GEMV (``linear_triton``) for one row of x on CUDA
outside autograd: the batch-1 decode step, where every projection reads its whole weight for one token and the
step's time is the time to stream the weights. cuBLAS's kernels for that shape (GEMV-shaped tiles, split-K with a
separate reduce for long rows) read the narrower matrices well below copy bandwidth; the GEMV gives each program
a few whole rows of W, so there is no reduce. Everywhere else (several rows, CPU, autograd, under
``torch.compile``) it is ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "triton")


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Args: x ``[..., K]``, weight ``[N, K]``. Returns ``[..., N]``."""
    return F.linear(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``linear_reference``'s function. ``backend``: "auto" (the Triton GEMV for one row on CUDA, x and weight
    of one 16-bit dtype, weight contiguous, when autograd does not record; ``F.linear`` otherwise), "torch" or
    "triton" (one row; CPU tensors only through Triton's interpreter; never differentiable).

    Raises:
        ValueError: an unknown backend; on the Triton backend, more than one row, other dtypes than one of
            float16/bfloat16 for both, a weight that is not a contiguous ``[N, K]``, or a graph autograd records.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    K = weight.shape[-1]
    rows = x.numel() // K if K else 0
    records = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    sixteen = (torch.float16, torch.bfloat16)
    if backend == "auto":
        fits = (x.is_cuda and rows == 1 and x.shape[-1] == K and x.dtype == weight.dtype and x.dtype in sixteen
                and weight.dim() == 2 and weight.is_contiguous())
        backend = "triton" if fits and not records else "torch"
    if backend == "torch" or torch.compiler.is_compiling():
        return linear_reference(x, weight)
    if weight.dim() != 2 or not weight.is_contiguous() or x.shape[-1] != K:
        raise ValueError(f"the Triton linear takes a contiguous weight [N, K] and x [..., K]; got weight "
                         f"{tuple(weight.shape)} and x {tuple(x.shape)}")
    if rows != 1:
        raise ValueError(f"the Triton linear takes one row of x, got {rows}; backend='torch' takes any")
    if x.dtype not in sixteen or x.dtype != weight.dtype:
        raise ValueError(f"the Triton linear takes x and weight of one dtype, float16 or bfloat16, got {x.dtype} "
                         f"and {weight.dtype}; backend='torch' takes any")
    if records:
        raise ValueError("the Triton linear has no backward; use backend='torch' (or 'auto') under autograd")
    from kimi_linear.ops.linear_triton import gemv_triton

    return gemv_triton(x, weight)
