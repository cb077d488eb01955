"""Triton kernels of ``gated_norm.gated_rms_norm``: the KDA layer's output RMSNorm times its sigmoid gate.

Rows are the ``R = prod(lead) * H`` (token, head) pairs of ``o [..., H, V]`` and of ``gate [..., H * V]`` viewed as
``[R, V]``; each program takes ``BR`` rows, all V columns (V <= 1024), and computes in fp32:

    forward   r = rsqrt(mean(x^2) + eps), n = x r, y = n w s,   s = sigmoid(gate) (1 without a gate)
    backward  dt = dy s, dgate = dy n w s (1 - s), dw = sum over rows of dt n,
              dx = r (dt w - n mean(dt w n))

The backward recomputes r, n and s from the inputs (nothing is saved but o, gate and the weight), writes dx and
dgate, and this program's partial dw ``[V]``; the partials are summed afterwards in a fixed order (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.triton_helpers import cast_to, interpreting, poisoned

MAX_V = 1024


def _block_rows(V: int) -> int:
    """Rows per program: 2048 elements a program, 16 per thread and tensor at 4 warps (the backward holds about
    six such tiles; at 4096 elements it spilled in the sm_90 build)."""
    return max(1, min(64, 2048 // triton.next_power_of_2(V)))


@triton.jit
def _load_rows(o, gate, w, R, V, BR: tl.constexpr, BV: tl.constexpr, EPS: tl.constexpr, GATE: tl.constexpr):
    """(row offsets, mask, x, r, n, w, s) of this program's rows, fp32."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_v = tl.arange(0, BV)
    m = (o_r < R)[:, None] & (o_v < V)[None, :]
    offs = o_r[:, None] * V + o_v[None, :]
    b_x = tl.load(o + offs, mask=m, other=0.0).to(tl.float32)
    b_r = tl.math.rsqrt(tl.sum(b_x * b_x, axis=1) / V + EPS)
    b_n = b_x * b_r[:, None]
    b_w = tl.load(w + o_v, mask=o_v < V, other=0.0).to(tl.float32)
    if GATE:
        b_g = tl.load(gate + offs, mask=m, other=0.0).to(tl.float32)
        b_s = 1.0 / (1.0 + tl.exp(-b_g))
    else:
        b_s = tl.full([BR, BV], 1.0, tl.float32)
    return offs, m, b_r, b_n, b_w, b_s


@triton.jit
def gated_norm_fwd_kernel(o, gate, w, y, R, V, BR: tl.constexpr, BV: tl.constexpr, EPS: tl.constexpr,
                          GATE: tl.constexpr, INTERPRET: tl.constexpr):
    """y = rmsnorm(o) w sigmoid(gate) for BR rows. Grid (cdiv(R, BR),)."""
    offs, m, b_r, b_n, b_w, b_s = _load_rows(o, gate, w, R, V, BR, BV, EPS, GATE)
    tl.store(y + offs, cast_to(b_n * b_w[None, :] * b_s, y, INTERPRET), mask=m)


@triton.jit
def gated_norm_bwd_kernel(o, gate, w, dy, dx, dgate, dw_part, R, V, BR: tl.constexpr, BV: tl.constexpr,
                          EPS: tl.constexpr, GATE: tl.constexpr, INTERPRET: tl.constexpr):
    """dx, dgate for BR rows and this program's partial dw (row i_p of dw_part [cdiv(R, BR), V], fp32)."""
    offs, m, b_r, b_n, b_w, b_s = _load_rows(o, gate, w, R, V, BR, BV, EPS, GATE)
    b_dy = tl.load(dy + offs, mask=m, other=0.0).to(tl.float32)
    b_dt = b_dy * b_s  # gradient of t = n w
    if GATE:
        b_dg = b_dy * b_n * b_w[None, :] * b_s * (1.0 - b_s)
        tl.store(dgate + offs, cast_to(b_dg, dgate, INTERPRET), mask=m)
    o_v = tl.arange(0, BV)
    tl.store(dw_part + tl.program_id(0).to(tl.int64) * V + o_v, tl.sum(b_dt * b_n, axis=0), mask=o_v < V)
    b_dn = b_dt * b_w[None, :]
    b_dx = b_r[:, None] * (b_dn - b_n * (tl.sum(b_dn * b_n, axis=1) / V)[:, None])
    tl.store(dx + offs, cast_to(b_dx, dx, INTERPRET), mask=m)


class GatedRMSNormFunction(torch.autograd.Function):
    """o ``[R, V]``, gate ``[R, V]`` or None, weight ``[V]`` -> y ``[R, V]`` in o's dtype; saves only the inputs."""

    @staticmethod
    def forward(ctx, o, gate, weight, eps):
        R, V = o.shape
        y = poisoned(torch.empty_like(o))
        BR, BV = _block_rows(V), triton.next_power_of_2(V)
        if R > 0:
            gated_norm_fwd_kernel[(triton.cdiv(R, BR),)](
                o, gate if gate is not None else o, weight, y, R, V, BR=BR, BV=BV, EPS=eps, GATE=gate is not None,
                INTERPRET=interpreting(), num_warps=4)
        ctx.save_for_backward(o, gate, weight)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        o, gate, weight = ctx.saved_tensors
        R, V = o.shape
        BR, BV = _block_rows(V), triton.next_power_of_2(V)
        n_prog = triton.cdiv(R, BR)
        dy = dy.contiguous()
        dx = poisoned(torch.empty_like(o))
        dgate = None if gate is None else poisoned(torch.empty_like(gate))
        dw_part = poisoned(torch.empty(n_prog, V, dtype=torch.float32, device=o.device))
        if R > 0:
            gated_norm_bwd_kernel[(n_prog,)](
                o, gate if gate is not None else o, weight, dy, dx, dgate if dgate is not None else dx, dw_part, R, V,
                BR=BR, BV=BV, EPS=ctx.eps, GATE=gate is not None, INTERPRET=interpreting(), num_warps=4)
        dw = dw_part.sum(0).to(weight.dtype)  # fixed-order sum of the partials
        return dx, dgate, dw, None


def gated_rms_norm_triton(o: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor,
                          eps: float) -> torch.Tensor:
    """Triton path of ``gated_norm.gated_rms_norm`` (shapes checked there): o ``[..., H, V]``, gate ``[..., H * V]``
    or None, weight ``[V]`` -> ``[..., H * V]`` in o's dtype."""
    *lead, H, V = o.shape
    if V > MAX_V:
        raise ValueError(f"the Triton gated_rms_norm takes V <= {MAX_V}, got V={V}")
    rows = o.reshape(-1, V).contiguous()
    g = None if gate is None else gate.reshape(-1, V).contiguous()
    y = GatedRMSNormFunction.apply(rows, g, weight.contiguous(), float(eps))
    return y.reshape(*lead, H * V)
