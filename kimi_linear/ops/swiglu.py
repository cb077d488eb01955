"""The gated activation of every SwiGLU MLP: ``silu(gate) * up``.

``silu_mul_reference`` is the specification in PyTorch, the ops the MLP runs unfused (``F.silu(gate) * up`` in the
inputs' dtype). ``silu_mul`` runs it as one Triton kernel (``swiglu_triton``: one read of gate and up, one write,
instead of a SiLU kernel and a multiply kernel with the SiLU's output written and read back between them) on CUDA
tensors outside autograd, the case of generation and serving, where a decode step at batch 1 is made of such tiny
launches; elsewhere the reference.

``swiglu_down`` is the MLP's gated activation and down projection under autograd: the same values as
``F.linear(silu_mul_reference(gate, up), weight)``, keeping gate and up for the backward but not the SiLU or the
product (the backward makes them again, element-wise).
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


class _SwiGLUDown(torch.autograd.Function):
    """``F.linear(silu(gate) * up, weight)`` keeping gate, up and the weight in the product's dtype; each step
    computed by the op autograd would run on the unfused ops (``silu_backward`` for the SiLU)."""

    @staticmethod
    def forward(ctx, gate, up, weight):
        device_type = gate.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else gate.dtype
        gate, up, weight_c = gate.to(dtype), up.to(dtype), weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            y = F.linear(silu_mul_reference(gate, up), weight_c)
        ctx.save_for_backward(gate, up, weight_c)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up, weight = ctx.saved_tensors
        silu = F.silu(gate)
        dh = dy.matmul(weight)  # [..., I]
        dweight = dy.reshape(-1, dy.shape[-1]).t().matmul((silu * up).reshape(-1, up.shape[-1]))
        dgate = torch.ops.aten.silu_backward(dh * up, gate)
        return dgate, dh * silu, dweight


def swiglu_down(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(silu_mul_reference(gate, up), weight)`` (under autocast, in its dtype), differentiable in all
    three, keeping for the backward gate and up but neither silu(gate) nor the product, which it makes again.

    Args: gate, up ``[..., I]`` (same shape); weight ``[D, I]``. Returns ``[..., D]``.

    Raises:
        ValueError: gate and up of different shapes, or a weight whose last dim is not I.
    """
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if weight.dim() != 2 or weight.shape[-1] != gate.shape[-1]:
        raise ValueError(f"weight must be [D, {gate.shape[-1]}], got {tuple(weight.shape)}")
    return _SwiGLUDown.apply(gate, up, weight)
