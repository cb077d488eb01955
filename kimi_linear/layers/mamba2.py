"""Mamba2 token mixer (the baseline of the paper's synthetic tasks, §5.1) on the readable chunked SSD.

The block follows Mamba2: one input projection produces the gate z, the SSM input x, the projections B and C
and the step size dt; x, B and C go through a depthwise causal conv (kernel 4) and SiLU;
dt = softplus(dt + dt_bias); A = -exp(A_log); the SSD layer (``kimi_linear.ops.ssd``) mixes tokens; the output
is RMSNorm(y · SiLU(z)) (the "gated RMSNorm" of Mamba2) and the output projection.

Sizes are tied to the KDA layer it replaces so that the comparison is of state for state: heads H =
``config.kda_num_heads``, head dim P = ``config.kda_head_dim`` and state size N = P, one group (B and C shared
by the heads), so each head carries an N×P state, the size of KDA's K×V state.

Parameters: ``in_proj`` (hidden → 2·H·P + 2·N + H, no bias), ``conv1d`` (depthwise over H·P + 2·N channels,
kernel 4, with bias), ``dt_bias`` [H], ``A_log`` [H], ``D`` [H], ``norm.weight`` [H·P], ``out_proj`` (H·P →
hidden, no bias). There is no decode cache: this mixer is for training and evaluating whole sequences.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kimi_linear.ops.norm import rms_norm
from kimi_linear.ops.ssd import chunk_ssd
from kimi_linear.ops.varlen import host_values

CONV_KERNEL = 4
N_GROUPS = 1
DT_INIT_RANGE = (1e-3, 1e-1)
A_INIT_RANGE = (1.0, 16.0)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y · SiLU(z)) · weight over the last dim (Mamba2's norm, applied after the gate)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return rms_norm(y * F.silu(z), self.weight, self.eps)


class Mamba2Mixer(nn.Module):
    """Mamba2 as a drop-in token mixer of the Kimi Linear model.

    Args:
        config: a model config with ``hidden_size``, ``kda_num_heads``, ``kda_head_dim`` and (optionally)
            ``rms_norm_eps``.
        layer_idx: this layer's index in the model (kept for the model's bookkeeping).
    """

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = int(config.hidden_size)
        self.num_heads = int(config.kda_num_heads)
        self.head_dim = int(config.kda_head_dim)
        self.state_size = self.head_dim
        self.inner_size = self.num_heads * self.head_dim
        conv_channels = self.inner_size + 2 * N_GROUPS * self.state_size

        self.in_proj = nn.Linear(
            self.hidden_size, self.inner_size + conv_channels + self.num_heads, bias=False
        )
        self.conv1d = nn.Conv1d(conv_channels, conv_channels, CONV_KERNEL, groups=conv_channels, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.inner_size, float(getattr(config, "rms_norm_eps", 1e-5)))
        self.out_proj = nn.Linear(self.inner_size, self.hidden_size, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba2's initialisation of the SSM parameters (a generic Linear init does not cover them).

        dt is drawn log-uniformly in [1e-3, 1e-1] and dt_bias set to its inverse softplus, so that
        softplus(dt_bias) starts there; A is uniform in [1, 16] (stored as its log); D = 1.
        """
        lo, hi = DT_INIT_RANGE
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(hi) - math.log(lo)) + math.log(lo))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.empty(self.num_heads).uniform_(*A_INIT_RANGE).log())
        self.D.fill_(1.0)

    def _mix(self, xBC: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """Conv + SSD over whole sequences: xBC ``[B, T, H·P + 2·N]``, dt ``[B, T, H]`` (fp32, > 0) -> ``[B,
        T, H·P]``."""
        batch, T, _ = xBC.shape
        # Left-pad by kernel - 1 so that output t only sees inputs t-3..t: [B, channels, T]
        xBC = F.conv1d(
            F.pad(xBC.transpose(1, 2), (CONV_KERNEL - 1, 0)),
            self.conv1d.weight,
            self.conv1d.bias,
            groups=self.conv1d.groups,
        )
        xBC = F.silu(xBC.transpose(1, 2))  # [B, T, H·P + 2·N]
        x, B, C = xBC.split([self.inner_size, self.state_size, self.state_size], dim=-1)
        x = x.reshape(batch, T, self.num_heads, self.head_dim)  # [B, T, H, P]
        B = B.reshape(batch, T, N_GROUPS, self.state_size)  # [B, T, G, N]
        C = C.reshape(batch, T, N_GROUPS, self.state_size)  # [B, T, G, N]
        A = -self.A_log.float().exp()  # [H]
        y, _ = chunk_ssd(x, dt, A, B, C, self.D)  # [B, T, H, P]
        return y.reshape(batch, T, self.inner_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mix tokens: ``hidden_states [B, T, hidden] -> [B, T, hidden]``.

        Args:
            hidden_states: ``[B, T, hidden_size]``. cache: must be None (this mixer keeps no decode state).
            cu_seqlens: int ``[N + 1]`` boundaries of N sequences packed along T (B must be 1); neither the
            conv nor
                the state crosses a boundary.
            attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding; padded positions neither write to
            nor
                decay the state, and see nothing through the conv.

        Raises:
            ValueError on wrong shapes or bad cu_seqlens; NotImplementedError if a cache is given.
        """
        if cache is not None:
            raise NotImplementedError("Mamba2Mixer has no decode cache; it runs whole sequences only")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be [B, T, {self.hidden_size}], got {tuple(hidden_states.shape)}"
            )
        batch, T, _ = hidden_states.shape
        z, xBC, dt = self.in_proj(hidden_states).split(
            [self.inner_size, self.inner_size + 2 * self.state_size, self.num_heads], dim=-1
        )
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [B, T, H]
        if attention_mask is not None:
            if attention_mask.shape != (batch, T):
                raise ValueError(
                    f"attention_mask must be [B, T] = {[batch, T]}, got {list(attention_mask.shape)}"
                )
            keep = attention_mask.to(xBC.dtype)[..., None]  # [B, T, 1]
            # dt = 0 means decay 1 and no write: padded positions leave the state as it is.
            xBC, dt = xBC * keep, dt * keep.float()

        if cu_seqlens is None:
            y = self._mix(xBC, dt)
        else:
            bounds = self._check_cu_seqlens(cu_seqlens, batch, T)
            y = torch.cat(
                [
                    self._mix(xBC[:, s:e], dt[:, s:e])
                    for s, e in zip(bounds[:-1], bounds[1:], strict=True)
                    if e > s
                ],
                dim=1,
            )
        if attention_mask is not None:
            y = y * keep
        y = self.norm(y, z)  # [B, T, H·P]
        return self.out_proj(y)

    @staticmethod
    def _check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, T: int) -> list[int]:
        if batch != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1, got {batch}")
        bounds = list(host_values(cu_seqlens))
        if (
            cu_seqlens.dim() != 1
            or len(bounds) < 2
            or bounds[0] != 0
            or bounds[-1] != T
            or any(b > a for a, b in zip(bounds[1:], bounds[:-1], strict=True))
        ):
            raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T = {T}, got {bounds}")
        return bounds
