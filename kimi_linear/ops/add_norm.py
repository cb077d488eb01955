"""The pre-norm residual step of every decoder block: add a sublayer's output to the residual stream, then RMSNorm.

    s = x + delta                 (in the promoted dtype of x and delta, as torch's add: the new residual stream)
    y = rmsnorm(s) * weight       (fp32 inside, y in s's dtype)

``add_rms_norm_reference`` is the specification in PyTorch, the same ops the model runs unfused (``x + delta``, then
``ops.norm.rms_norm``). ``add_rms_norm`` runs it as one Triton kernel (``add_norm_triton``: one read of x and delta,
one write of s and y, instead of an add kernel and a norm kernel) on CUDA tensors outside autograd, the case of
generation and serving, where a decode step at batch 1 is dozens of such tiny launches; elsewhere the reference.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.norm import rms_norm

BACKENDS = ("auto", "torch", "triton")
MAX_D = 8192  # the widest row the Triton kernel holds in one program


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Args: x, delta ``[..., D]`` (same shape); weight ``[D]``. Returns ``(s, y)`` in s's dtype."""
    s = x + delta
    return s, rms_norm(s, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm_reference``'s function. ``backend``: "auto" (the Triton kernel for CUDA tensors of one dtype
    and D <= ``MAX_D`` when autograd does not record, PyTorch otherwise), "torch" or "triton" (on CPU tensors only through Triton's
    interpreter; never differentiable). Under ``torch.compile`` it is the specification, which Inductor fuses
    itself.

    Raises:
        ValueError: an unknown backend; x and delta of different shapes; weight not ``[D]``; on the Triton
            backend, float64, x and delta of different dtypes, D > ``MAX_D``, or a graph autograd records.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if x.shape != delta.shape:
        raise ValueError(f"x and delta must have one shape, got {tuple(x.shape)} and {tuple(delta.shape)}")
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight must be [D] = [{D}], got {tuple(weight.shape)}")
    records = torch.is_grad_enabled() and (x.requires_grad or delta.requires_grad or weight.requires_grad)
    if backend == "auto":
        fits = x.is_cuda and x.dtype == delta.dtype and x.dtype != torch.float64 and D <= MAX_D
        backend = "triton" if fits and not records else "torch"
    if backend == "torch" or torch.compiler.is_compiling():
        return add_rms_norm_reference(x, delta, weight, eps)
    if x.dtype == torch.float64 or x.dtype != delta.dtype:
        raise ValueError(f"the Triton add_rms_norm takes x and delta of one dtype, float16/bfloat16/float32, got "
                         f"{x.dtype} and {delta.dtype}; backend='torch' takes any")
    if D > MAX_D:
        raise ValueError(f"the Triton add_rms_norm takes D <= {MAX_D}, got D={D}; backend='torch' takes any")
    if records:
        raise ValueError("the Triton add_rms_norm has no backward; use backend='torch' (or 'auto') under autograd")
    from kimi_linear.ops.add_norm_triton import add_rms_norm_triton

    return add_rms_norm_triton(x, delta, weight, eps)
