"""Helpers shared by the tests: error measure and random KDA inputs."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error ||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all(), "non-finite values"
    denom = b.norm()
    return (a - b).norm().item() / max(denom.item(), 1e-30)


def rounded_to_nearest(stored: torch.Tensor, exact: torch.Tensor, slack: float = 1e-5) -> bool:
    """Whether ``stored`` (bf16 / fp16) is ``exact`` (fp32, computed independently) rounded to nearest, up to the fp32
    noise of two summation orders: every element within half a unit in the last place of ``exact`` plus ``slack``
    relative to exact's largest magnitude. Truncation misses this on about half the elements (up to one unit), and
    a state that was never rounded (fp32 carried over) is not stored in ``stored``'s dtype to begin with."""
    assert stored.shape == exact.shape, (stored.shape, exact.shape)
    exact = exact.double()
    info = torch.finfo(stored.dtype)  # eps = 2^-7 for bf16, 2^-10 for fp16: one unit at 1.0
    exponent = torch.floor(torch.log2(exact.abs().clamp(min=info.tiny)))
    half_ulp = torch.exp2(exponent) * info.eps / 2
    bound = half_ulp + slack * exact.abs().max()
    return bool(((stored.double() - exact).abs() <= bound).all())


def kda_inputs(B, T, H, K, V, *, dtype=torch.float32, device="cpu", gate_scale=1.0, scalar_gate=False,
               with_state=True, N=None, generator=None):
    """Random KDA inputs: normalised q/k, log-decay g in [-gate_scale, 0), beta in (0, 1), fp32 state [N, H, K, V]."""
    gen = generator
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g_shape = (B, T, H) if scalar_gate else (B, T, H, K)
    g = -torch.rand(*g_shape, generator=gen) * gate_scale
    beta = torch.rand(B, T, H, generator=gen).clamp(0.02, 0.98)
    h0 = torch.randn(N or B, H, K, V, generator=gen) if with_state else None
    out = dict(q=q, k=k, v=v, g=g, beta=beta)
    out = {n: t.to(device=device, dtype=dtype) for n, t in out.items()}
    out["initial_state"] = None if h0 is None else h0.to(device)
    return out


def leaves(inputs: dict) -> dict:
    """Detached copies that require grad (None stays None)."""
    return {n: (None if t is None else t.detach().clone().requires_grad_()) for n, t in inputs.items()}


def loss_of(o: torch.Tensor, state: torch.Tensor | None, seed: int = 1234) -> torch.Tensor:
    """A scalar that weights every output and state entry differently, so wrong gradients can't cancel."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(o.shape, generator=gen).to(o.device)
    loss = (o.float() * w).sum()
    if state is not None:
        ws = torch.randn(state.shape, generator=gen).to(state.device)
        loss = loss + (state * ws).sum()
    return loss
