"""KDA's gate activations: the forget gate (log-decay), and the beta sigmoid. Paper §4."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kda_gate(x: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Forget gate in log space: g = -exp(A_log[h]) * softplus(x + dt_bias), in fp32.

    Args:
        x: gate pre-activation, ``[B, T, H, K]`` for KDA (per channel) or ``[B, T, H]`` for a scalar (GDN) gate.
        A_log: ``[H]`` (any shape with H elements, e.g. the checkpoint's ``[1, 1, H, 1]``), one rate per head.
        dt_bias: ``[H * K]`` / ``[H, K]`` for KDA, ``[H]`` for GDN; None for no bias.
    Returns:
        g with x's shape, fp32, every entry <= 0.
    """
    H = x.shape[2]
    x = x.float()
    if dt_bias is not None:
        x = x + dt_bias.float().reshape(x.shape[2:])
    rate = A_log.float().reshape(H).exp()
    rate = rate[:, None] if x.dim() == 4 else rate  # [H, 1] per channel, [H] scalar
    return -rate * F.softplus(x)


def beta_activation(beta_logits: torch.Tensor) -> torch.Tensor:
    """beta = sigmoid(logits) in fp32: the delta rule's step size in (0, 1)."""
    return torch.sigmoid(beta_logits.float())
