"""KDA's gate activations: the forget gate (log-decay), its bounded variant, and the beta sigmoid. Paper §4.

Each is its own reference (plain PyTorch). Math runs in fp32, or in fp64 for fp64 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for 16-bit and fp32 inputs, fp64 for fp64 ones."""
    return torch.promote_types(x.dtype, torch.float32)


def kda_gate(
    x: torch.Tensor,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
) -> torch.Tensor:
    """Forget gate in log space, in fp32 (fp64 for fp64 x).

    * ``lower_bound`` None (the released model): g = -exp(A_log[h]) * softplus(x + dt_bias), every entry <= 0.
    * ``lower_bound`` set (FLA's bounded "safe" gate): g = lower_bound * sigmoid(exp(A_log[h]) * (x + dt_bias)),
      or g = lower_bound * sigmoid(x + dt_bias) when ``A_log`` is None; every entry in (lower_bound, 0).

    Args:
        x: gate pre-activation, ``[B, T, H, K]`` for KDA (per channel) or ``[B, T, H]`` for a scalar (GDN) gate.
        A_log: ``[H]`` (any shape with H elements, e.g. the checkpoint's ``[1, 1, H, 1]``), one rate per head;
            may be None only with ``lower_bound``.
        dt_bias: ``[H * K]`` / ``[H, K]`` for KDA, ``[H]`` for GDN; None for no bias.
        lower_bound: a negative float, or None for the softplus gate.
    Returns:
        g with x's shape, fp32 (fp64 for fp64 x).
    Raises:
        ValueError: A_log is None without lower_bound.
    """
    H = x.shape[2]
    x = x.to(_math_dtype(x))
    if dt_bias is not None:
        x = x + dt_bias.to(x.dtype).reshape(x.shape[2:])
    rate = None
    if A_log is not None:
        rate = A_log.to(x.dtype).reshape(H).exp()
        rate = rate[:, None] if x.dim() == 4 else rate  # [H, 1] per channel, [H] scalar
    if lower_bound is None:
        if rate is None:
            raise ValueError("kda_gate needs A_log unless lower_bound is given")
        return -rate * F.softplus(x)
    return lower_bound * torch.sigmoid(x if rate is None else rate * x)


def beta_activation(beta_logits: torch.Tensor, allow_neg_eigval: bool = False) -> torch.Tensor:
    """beta = sigmoid(logits) in fp32 (fp64 for fp64 logits): the delta rule's step size in (0, 1).

    With ``allow_neg_eigval`` it is 2 * sigmoid(logits), in (0, 2): the transition I - beta k k^T may then have
    a negative eigenvalue (FLA's ``allow_neg_eigval``).
    """
    beta = torch.sigmoid(beta_logits.to(_math_dtype(beta_logits)))
    return 2 * beta if allow_neg_eigval else beta
