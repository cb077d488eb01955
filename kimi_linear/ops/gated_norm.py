"""The KDA layer's output norm: per-head RMSNorm (one weight shared by the heads) times a sigmoid output gate.

    y[..., h, :] = rmsnorm(o[..., h, :]) * weight * sigmoid(gate[..., h, :])      (fp32 inside, y in o's dtype)

``gated_rms_norm_reference`` is the specification in PyTorch. ``gated_rms_norm`` runs it on the fused Triton kernels
(``gated_norm_triton``: one pass forward, one backward, instead of about six element-wise passes over fp32
temporaries) on CUDA tensors, and the reference elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "triton")


def gated_rms_norm_reference(o: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """Args: o ``[..., H, V]``; gate ``[..., H * V]`` (pre-sigmoid) or None for no gate; weight ``[V]``.
    Returns ``[..., H * V]`` in o's dtype (fp32 inside)."""
    *lead, H, V = o.shape
    out = F.rms_norm(o.float(), (V,), weight.float(), eps)
    if gate is not None:
        out = out * torch.sigmoid(gate.float().reshape(*lead, H, V))
    return out.to(o.dtype).reshape(*lead, H * V)


def gated_rms_norm(o: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float,
                   backend: str = "auto") -> torch.Tensor:
    """``gated_rms_norm_reference``'s function, differentiable in o, gate and weight. ``backend``: "auto" (the
    Triton kernels on CUDA tensors, PyTorch otherwise), "torch" or "triton" (on CPU tensors only through Triton's
    interpreter). Under ``torch.compile`` it is the specification, which Inductor fuses into its own kernels.

    Raises:
        ValueError: an unknown backend, shapes that do not match (gate not ``[..., H * V]``, weight not ``[V]``),
            float64 on the Triton backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    *lead, H, V = o.shape
    if weight.shape != (V,):
        raise ValueError(f"weight must be [V] = [{V}], got {tuple(weight.shape)}")
    if gate is not None and tuple(gate.shape) != (*lead, H * V):
        raise ValueError(f"gate must be [..., H * V] = {[*lead, H * V]}, got {list(gate.shape)}")
    if backend == "auto":
        backend = "triton" if o.is_cuda and o.dtype != torch.float64 else "torch"
    if backend == "torch" or torch.compiler.is_compiling():  # traced, the specification: Inductor fuses it itself
        return gated_rms_norm_reference(o, gate, weight, eps)
    if o.dtype == torch.float64:
        raise ValueError("the Triton gated_rms_norm takes float16/bfloat16/float32; float64 runs on backend='torch'")
    from kimi_linear.ops.gated_norm_triton import gated_rms_norm_triton

    return gated_rms_norm_triton(o, gate, weight, eps)
