"""Dense SwiGLU MLP: the feed-forward of the first layers and the MoE's shared expert.

Shape legend: D hidden size, I intermediate size; ``...`` any leading dims.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_linear.layers.linear import Linear
from kimi_linear.layers.memory import autocast_input
from kimi_linear.layers.packing import PackedInputProjections
from kimi_linear.ops.linear import linear
from kimi_linear.ops.swiglu import silu_mul, swiglu_down


class SwiGLUMLP(PackedInputProjections, nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases (the checkpoint's names).

    Args:
        hidden_size: D, the input and output width.
        intermediate_size: I, the width of the gated activation.

    Raises:
        ValueError: a size that is not a positive int.
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = Linear(hidden_size, intermediate_size)  # [I, D]
        self.up_proj = Linear(hidden_size, intermediate_size)  # [I, D]
        self.down_proj = Linear(intermediate_size, hidden_size)  # [D, I]

    def _input_projections(self) -> list[nn.Linear]:
        """gate_proj and up_proj: packed (``pack_input_projections``) they are the two row blocks of one
        ``[2·I, D]`` matrix."""
        return [self.gate_proj, self.up_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[..., D]`` floating point. Returns ``[..., D]``.

        Raises:
            TypeError: x is not a floating-point tensor. ValueError: its last dim is not D.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor [..., {self.hidden_size}]")
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [..., hidden_size={self.hidden_size}], got {tuple(x.shape)}")
        x = autocast_input(x)  # one low-precision copy for gate_proj and up_proj, not one each
        packed = self._forward_packed_weight()
        if packed is not None:
            gate, up = linear(x, packed).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled() and (gate.requires_grad or self.down_proj.weight.requires_grad):
            # training: keep gate and up for the backward, not the activation's intermediates or its output
            return swiglu_down(gate, up, self.down_proj.weight)
        return self.down_proj(silu_mul(gate, up))

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"
