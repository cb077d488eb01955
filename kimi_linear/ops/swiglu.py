"""The gated activation of every SwiGLU MLP: ``silu(gate) * up``.

``silu_mul_reference`` is the specification in PyTorch, the ops the MLP runs unfused (``F.silu(gate) * up`` in the
inputs' dtype). ``silu_mul`` runs it as one Triton kernel (``swiglu_triton``: one read of gate and up, one write,
instead of a SiLU kernel and a multiply kernel with the SiLU's output written and read back between them) on CUDA
tensors outside autograd, the case of generation and serving, where a decode step at batch 1 is made of such tiny
launches; elsewhere the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "triton")


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Args: gate, up ``[..., I]`` (same shape). Returns ``silu(gate) * up`` ``[..., I]``."""
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``silu_mul_reference``'s function. ``backend``: "auto" (the Triton kernel for CUDA tensors of one 16- or
    32-bit float dtype whose last dim is contiguous, when autograd does not record; PyTorch otherwise), "torch"
    or "triton" (on CPU tensors only through Triton's interpreter; never differentiable). Under
    ``torch.compile`` it is the specification, which Inductor fuses itself.

    Raises:
        ValueError: an unknown backend; gate and up of different shapes; on the Triton backend, another dtype
            than float16/bfloat16/float32, gate and up of different dtypes, a last dim that is not contiguous,
            or a graph autograd records.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    records = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if backend == "auto":
        fits = gate.is_cuda and gate.dtype == up.dtype and gate.dtype in floats and gate.dim() > 0
        fits = fits and gate.stride(-1) == 1 and up.stride(-1) == 1
        backend = "triton" if fits and not records else "torch"
    if backend == "torch" or torch.compiler.is_compiling():
        return silu_mul_reference(gate, up)
    if gate.dtype not in floats or gate.dtype != up.dtype:
        raise ValueError(f"the Triton silu_mul takes gate and up of one dtype, float16/bfloat16/float32, got "
                         f"{gate.dtype} and {up.dtype}; backend='torch' takes any")
    if gate.dim() == 0 or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError("the Triton silu_mul takes gate and up whose last dim is contiguous; backend='torch' "
                         "takes any")
    if records:
        raise ValueError("the Triton silu_mul has no backward; use backend='torch' (or 'auto') under autograd")
    from kimi_linear.ops.swiglu_triton import silu_mul_triton

    return silu_mul_triton(gate, up)
