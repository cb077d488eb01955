"""Causal depthwise convolution (the KDA layer's ShortConv), its one-token decode update, and its reference.

y[t, c] = act(sum_{j=0}^{W-1} w[c, j] * x[t - (W-1) + j, c])

Inputs before the start of a sequence come from ``initial_state`` (the last W-1 inputs of what came before,
oldest first) or are zero. With ``cu_seqlens`` several sequences are packed along T (B = 1) and no input
crosses a boundary. Computed in fp32, returned in x's dtype.

Two backends compute ``causal_conv1d``: "torch" (the code below, also the reference) and "triton"
(``conv_triton``: fused forward and backward kernels). "auto", the default, picks "triton" on CUDA tensors and
"torch" elsewhere; a caller that wants the other one on CUDA passes ``backend``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu")
BACKENDS = ("auto", "torch", "triton")


def _check(x: torch.Tensor, weight: torch.Tensor, activation: str | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError("weight must be a floating-point torch.Tensor")
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]  # the checkpoint's [C, 1, W] -> [C, W]
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must be [C, W] or [C, 1, W] with C={x.shape[-1]}, got {tuple(weight.shape)}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return weight


def _act(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation == "silu" else y


def _positions(B: int, T: int, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(position of each token inside its sequence [B, T], sequence index of each token [B, T])."""
    t = torch.arange(T, device=device)
    if cu_seqlens is None:
        return t.expand(B, T), torch.arange(B, device=device)[:, None].expand(B, T)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    seq = torch.searchsorted(cu[1:], t, right=True)  # [T]
    return (t - cu[seq])[None], seq[None]


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    activation: str | None = "silu",
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal convolution over whole sequences; differentiable.

    Args:
        x: ``[B, T, C]`` float.
        weight: ``[C, W]`` (or the checkpoint's ``[C, 1, W]``).
        initial_state: ``[N, C, W-1]`` the previous W-1 inputs of each sequence, oldest first; None for zeros.
        cu_seqlens: int ``[N + 1]`` boundaries of N sequences packed along T (B must be 1).
        activation: "silu" or None.
        output_final_state: also return the last W-1 inputs of each sequence (what ``initial_state`` of a
            continuation needs), ``[N, C, W-1]`` in x's dtype.
        backend: "torch" (this module's PyTorch code), "triton" (``conv_triton``; W <= 8; on CPU only through
            Triton's interpreter), or "auto": "triton" on CUDA tensors, "torch" elsewhere.

    Returns:
        ``(y [B, T, C] in x's dtype, final_state [N, C, W-1] or None)``.

    Raises:
        ValueError / TypeError naming the argument on wrong shapes or dtypes.
    """
    weight = _check(x, weight, activation)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, C], got shape {tuple(x.shape)}")
    B, T, C = x.shape
    W = weight.shape[-1]
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1, got B={B}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (N, C, W - 1):
        raise ValueError(
            f"initial_state must be [N, C, W-1] = [{N}, {C}, {W - 1}], got {tuple(initial_state.shape)}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    if backend == "triton":
        from kimi_linear.ops.conv_triton import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, initial_state, cu_seqlens, activation, output_final_state)

    # Bulk: one depthwise convolution with zero history (a fused kernel, in x's dtype, fp32 accumulation).
    y = F.conv1d(x.transpose(1, 2), weight.to(x.dtype)[:, None, :], padding=W - 1, groups=C)[..., :T]
    y = _act(y, activation).transpose(1, 2)  # [B, T, C]
    xf = x.float()
    w = weight.float()
    state = None if initial_state is None else initial_state.float()
    if cu_seqlens is not None or state is not None:
        # The first W-1 tokens of each sequence reach before its start: into the state (or zeros), not into
        # the previous sequence. Recompute just those rows, in fp32.
        pos, seq = _positions(B, T, cu_seqlens, x.device)  # [B, T] each
        if cu_seqlens is None:
            rows_t = torch.arange(min(T, W - 1), device=x.device)
            b_idx, t_idx = torch.arange(B, device=x.device).repeat_interleave(len(rows_t)), rows_t.repeat(B)
        else:
            b_idx, t_idx = (pos < W - 1).nonzero(as_tuple=True)
        p, n = pos[b_idx, t_idx], seq[b_idx, t_idx]  # [R] position in its sequence, sequence index
        acc = xf[b_idx, t_idx] * w[:, W - 1]  # [R, C]
        for shift in range(1, W):
            from_x = xf[b_idx, (t_idx - shift).clamp(min=0)]
            if state is None:
                from_before = torch.zeros_like(from_x)
            else:
                # x[t - shift] lies before the start: index W-1 - (shift - p) of that sequence's state
                from_before = state[n, :, (W - 1 - shift + p).clamp(min=0, max=W - 2)]
            acc = acc + torch.where((p >= shift)[:, None], from_x, from_before) * w[:, W - 1 - shift]
        y = y.index_put((b_idx, t_idx), _act(acc, activation).to(y.dtype))
    y = y.contiguous()
    if not output_final_state:
        return y, None

    # Last W-1 inputs of each sequence: absolute positions end - (W-1) .. end - 1, reaching into the state
    # (or zeros) where the sequence is shorter than W-1.
    if cu_seqlens is None:
        starts = torch.zeros(B, dtype=torch.long, device=x.device)
        ends = torch.full((B,), T, dtype=torch.long, device=x.device)
        rows = torch.arange(B, device=x.device)
    else:
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        starts, ends = cu[:-1], cu[1:]
        rows = torch.zeros(N, dtype=torch.long, device=x.device)
    j = torch.arange(W - 1, device=x.device)
    t_abs = ends[:, None] - (W - 1) + j  # [N, W-1]
    inside = t_abs >= starts[:, None]
    from_x = xf[rows[:, None], t_abs.clamp(min=0)]  # [N, W-1, C]
    if state is None:
        from_state = torch.zeros_like(from_x)
    else:
        s_idx = (W - 1 + t_abs - starts[:, None]).clamp(min=0, max=W - 2)  # [N, W-1]
        from_state = state.gather(2, s_idx[:, None, :].expand(N, C, W - 1)).transpose(1, 2)
    final = torch.where(inside[..., None], from_x, from_state).transpose(1, 2)  # [N, C, W-1]
    return y, final.to(x.dtype).contiguous()


def causal_conv1d_update(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, activation: str | None = "silu"
) -> torch.Tensor:
    """One decoding step: convolve the new input with the cached W-1 previous ones; shift the cache in place.

    Args:
        x: ``[B, C]`` the new input of each sequence.
        conv_state: ``[B, C, W-1]`` the previous inputs, oldest first; updated in place (no host sync, so the
            step can be captured in a CUDA graph).
        weight: ``[C, W]`` or ``[C, 1, W]``.
        activation: "silu" or None.

    Returns:
        ``[B, C]`` in x's dtype.
    """
    weight = _check(x, weight, activation)
    W = weight.shape[-1]
    if x.dim() != 2 or conv_state.shape != (x.shape[0], x.shape[1], W - 1):
        raise ValueError(
            f"x must be [B, C] and conv_state [B, C, W-1]; got {tuple(x.shape)} and "
            f"{tuple(conv_state.shape)} with W={W}"
        )
    # In the state's dtype (the model's): few kernels per decode step; the sum accumulates in fp32.
    window = torch.cat([conv_state, x[..., None].to(conv_state.dtype)], dim=-1)  # [B, C, W]
    conv_state.copy_(window[..., 1:])
    y = (window * weight.to(window.dtype)).sum(-1)
    return _act(y, activation).to(x.dtype)


def naive_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one sequence batch ``[B, T, C]`` at a time, token by token through a sliding window, fp32.

    Returns ``(y [B, T, C] fp32, final window [B, C, W-1] fp32)``.
    """
    B, T, C = x.shape
    w = weight.reshape(C, -1).float()
    W = w.shape[-1]
    window = x.new_zeros(B, C, W - 1, dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    for t in range(T):
        full = torch.cat([window, x[:, t].float()[..., None]], dim=-1)  # [B, C, W]
        ys.append(_act((full * w).sum(-1), activation))
        window = full[..., 1:]
    y = torch.stack(ys, dim=1) if T else x.new_zeros(B, 0, C, dtype=torch.float32)
    return y, window
