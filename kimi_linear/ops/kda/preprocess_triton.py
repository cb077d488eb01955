"""Triton kernels for chunk_kda's optional in-op activations (``common.preprocess``), forward and backward.

What they compute, per row (token t, head h) of the packed ``[T_total, H, K]`` inputs, each part only when its
flag is set (paper §4; the readable reference is ``common.preprocess`` on its PyTorch path):

    NORM_QK:       q_n = q * rsqrt(sum_K q^2 + eps),  k_n likewise           (``norm.l2norm``, eps inside the sqrt)
    GATE:          g   = -exp(A_log[h]) * softplus(g_raw + dt_bias[h, :])    (``gate.kda_gate``), fp32
    SIGMOID_BETA:  beta = sigmoid(beta_raw)                                   (``gate.beta_activation``), fp32

All arithmetic is fp32. q_n and k_n are stored in the operand dtype the chunk kernel uses (rounded to nearest
even), so the chunk path needs no extra cast and no fp32 copy of them exists. The gate is per channel
(g_raw ``[T_total, H, K]``) or one scalar per head (GDN, g_raw ``[T_total, H]``: the result stays ``[T_total, H]``
and the caller broadcasts it over K as a view). softplus is evaluated as max(x, 0) + log1p(exp(-|x|)), with log1p
done by hand so that it neither overflows for large x nor rounds to 0 for very negative x; sigmoid likewise from
exp(-|x|).

Backward recomputes everything from the raw inputs (the autograd Function saves only q, k, g_raw, beta_raw, A_log,
dt_bias, no fp32 [T, H, K] temporaries):

    dq        = r * dq_n - q * r^3 * sum_K(dq_n * q),   r = rsqrt(sum_K q^2 + eps)      (dk likewise)
    dg_raw    = dg * (-exp(A_log[h]) * sigmoid(g_raw + dt_bias))
    dA_log[h] = sum over t, K of dg * g
    ddt_bias  = sum over t of dg_raw                  ([H, K], or [H] for the scalar gate)
    dbeta_raw = dbeta * sigmoid'(beta_raw)            (as exp(-|x|) / (1 + exp(-|x|))^2, no cancellation)

The sums over t are deterministic: each program writes its block's fp32 partial sums, and PyTorch adds the
``[NT, ...]`` partials in a fixed order.

Kernels (grid ``(cdiv(T_total, BT), H)``: BT tokens of one head per program, so the per-head parameters are scalars
or one K-vector per program and the partial sums over t are plain block reductions):
    preprocess_fwd_kernel   the activations above.
    preprocess_bwd_kernel   their gradients, plus the block partials of dA_log and ddt_bias.

Launch settings are a ``PreprocessLaunch`` value, ``preprocess_launch(T_total, K)`` unless the caller passes one.

Limits: K <= 256 (one row of K channels per block row). Under Triton's interpreter fp32 -> bf16 casts truncate, so
there the rounding to nearest even is done by hand on the bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kimi_linear.ops.norm import L2NORM_EPS
from kimi_linear.ops.triton_helpers import cast_to, interpreting, poisoned


@dataclass(frozen=True)
class PreprocessLaunch:
    """Launch settings of the two kernels: tokens per program of the forward (``fwd_bt``) and of the backward
    (``bwd_bt``), powers of two (each program holds BT x next_pow2(K) elements per tensor), and warps per program."""

    fwd_bt: int
    bwd_bt: int
    warps: int


def preprocess_launch(T_total: int, K: int) -> PreprocessLaunch:
    """The shipped launch: 4096 elements per forward program and 2048 per backward program (which holds about twice
    as many live tiles), i.e. 16-32 fp32 values per thread and tensor at 4 warps; never more tokens than T_total
    rounded up to a power of two, and at least one."""
    BK = triton.next_power_of_2(K)
    most = triton.next_power_of_2(max(T_total, 1))
    return PreprocessLaunch(fwd_bt=max(1, min(4096 // BK, most)), bwd_bt=max(1, min(2048 // BK, most)), warps=4)


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(z), z = exp(-|x|) in (0, 1]; log1p(z) = log(u) * z / (u - 1) with
    u = 1 + z rounded (exact to a few ulp), and = z where u rounds to 1."""
    z = tl.exp(-tl.abs(x))
    u = 1.0 + z
    tiny = u == 1.0
    log1p = tl.where(tiny, z, tl.log(u) * (z / tl.where(tiny, 1.0, u - 1.0)))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _sigmoid_parts(x):
    """(sigmoid(x), sigmoid'(x)) from z = exp(-|x|), which never overflows."""
    z = tl.exp(-tl.abs(x))
    s = 1.0 / (1.0 + z)
    return tl.where(x >= 0, s, z * s), z * s * s


@triton.jit
def _strided_rows(T_total, SQ, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """Offsets (int64) of this program's BT tokens of head i_h in a [T_total, H, K] tensor whose tokens lie SQ
    elements apart (heads K apart, channels contiguous)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    return o_t.to(tl.int64)[:, None] * SQ + (i_h * K + tl.arange(0, BK))[None, :]


@triton.jit
def _rows(T_total, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """Row indices (int64, into [T_total * H]) of this program's BT tokens of head i_h, the K offsets and masks."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_t = o_t < T_total
    m_k = o_k < K
    o_row = o_t.to(tl.int64) * H + i_h
    o_tk = o_row[:, None] * K + o_k[None, :]
    return i_t, i_h, o_row, o_k, o_tk, m_t, m_k, m_t[:, None] & m_k[None, :]


@triton.jit
def preprocess_fwd_kernel(q, k, g, beta, A_log, dt_bias, q_out, k_out, g_out, beta_out, T_total, SQ,
                          H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          NORM_QK: tl.constexpr, GATE: tl.constexpr, G_SCALAR: tl.constexpr,
                          HAS_DT_BIAS: tl.constexpr, SIGMOID_BETA: tl.constexpr, EPS: tl.constexpr,
                          INTERPRET: tl.constexpr):
    """Grid (cdiv(T_total, BT), H). q, k: [T_total, H, K], rows SQ elements apart -> q_out, k_out (operand dtype,
    contiguous); g: [T_total, H, K] or [T_total, H] -> g_out fp32 of the same shape; beta: [T_total, H] ->
    beta_out fp32. A_log [H], dt_bias [H * K] or [H]."""
    i_t, i_h, o_row, o_k, o_tk, m_t, m_k, m_tk = _rows(T_total, H, K, BT, BK)
    if NORM_QK:
        o_in = _strided_rows(T_total, SQ, K, BT, BK)
        b_q = tl.load(q + o_in, mask=m_tk, other=0.0).to(tl.float32)
        b_q = b_q * tl.math.rsqrt(tl.sum(b_q * b_q, axis=1) + EPS)[:, None]
        tl.store(q_out + o_tk, cast_to(b_q, q_out, INTERPRET), mask=m_tk)
        b_k = tl.load(k + o_in, mask=m_tk, other=0.0).to(tl.float32)
        b_k = b_k * tl.math.rsqrt(tl.sum(b_k * b_k, axis=1) + EPS)[:, None]
        tl.store(k_out + o_tk, cast_to(b_k, k_out, INTERPRET), mask=m_tk)
    if GATE:
        b_rate = tl.exp(tl.load(A_log + i_h).to(tl.float32))
        if G_SCALAR:
            b_x = tl.load(g + o_row, mask=m_t, other=0.0).to(tl.float32)
            if HAS_DT_BIAS:
                b_x += tl.load(dt_bias + i_h).to(tl.float32)
            tl.store(g_out + o_row, -b_rate * _softplus(b_x), mask=m_t)
        else:
            b_x = tl.load(g + o_tk, mask=m_tk, other=0.0).to(tl.float32)
            if HAS_DT_BIAS:
                b_x += tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]
            tl.store(g_out + o_tk, -b_rate * _softplus(b_x), mask=m_tk)
    if SIGMOID_BETA:
        b_b = tl.load(beta + o_row, mask=m_t, other=0.0).to(tl.float32)
        b_s, _ = _sigmoid_parts(b_b)
        tl.store(beta_out + o_row, b_s, mask=m_t)


@triton.jit
def _l2norm_bwd(x, dy, o_in, o_tk, m_tk, EPS: tl.constexpr):
    """dx (fp32) of y = x * rsqrt(sum x^2 + eps) for the rows at o_in (x) and o_tk (dy)."""
    b_x = tl.load(x + o_in, mask=m_tk, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + o_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_r = tl.math.rsqrt(tl.sum(b_x * b_x, axis=1) + EPS)
    b_c = b_r * b_r * b_r * tl.sum(b_dy * b_x, axis=1)
    return b_r[:, None] * b_dy - b_x * b_c[:, None]


@triton.jit
def preprocess_bwd_kernel(q, k, g, beta, A_log, dt_bias, dq_out, dk_out, dg_out, dbeta_out,
                          dq, dk, dg, dbeta, dA_part, ddt_part, T_total, SQ,
                          H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          NORM_QK: tl.constexpr, GATE: tl.constexpr, G_SCALAR: tl.constexpr,
                          HAS_DT_BIAS: tl.constexpr, SIGMOID_BETA: tl.constexpr, EPS: tl.constexpr,
                          INTERPRET: tl.constexpr):
    """Grid (cdiv(T_total, BT), H). From the raw inputs (q, k rows SQ elements apart) and the output gradients
    (dq_out ... dbeta_out) writes dq, dk (q's dtype, contiguous), dg (g's dtype), dbeta (beta's dtype), and this
    block's fp32 partial sums: dA_part [NT, H], ddt_part [NT, H, K] ([NT, H] for the scalar gate)."""
    i_t, i_h, o_row, o_k, o_tk, m_t, m_k, m_tk = _rows(T_total, H, K, BT, BK)
    if NORM_QK:
        o_in = _strided_rows(T_total, SQ, K, BT, BK)
        tl.store(dq + o_tk, cast_to(_l2norm_bwd(q, dq_out, o_in, o_tk, m_tk, EPS), dq, INTERPRET), mask=m_tk)
        tl.store(dk + o_tk, cast_to(_l2norm_bwd(k, dk_out, o_in, o_tk, m_tk, EPS), dk, INTERPRET), mask=m_tk)
    if GATE:
        b_rate = tl.exp(tl.load(A_log + i_h).to(tl.float32))
        i_part = i_t * H + i_h
        if G_SCALAR:
            b_x = tl.load(g + o_row, mask=m_t, other=0.0).to(tl.float32)
            if HAS_DT_BIAS:
                b_x += tl.load(dt_bias + i_h).to(tl.float32)
            b_dgo = tl.load(dg_out + o_row, mask=m_t, other=0.0).to(tl.float32)
            b_sig, _ = _sigmoid_parts(b_x)
            b_dx = b_dgo * (-b_rate * b_sig)
            tl.store(dg + o_row, cast_to(b_dx, dg, INTERPRET), mask=m_t)
            if HAS_DT_BIAS:
                tl.store(ddt_part + i_part, tl.sum(b_dx, axis=0))
        else:
            b_x = tl.load(g + o_tk, mask=m_tk, other=0.0).to(tl.float32)
            if HAS_DT_BIAS:
                b_x += tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]
            b_dgo = tl.load(dg_out + o_tk, mask=m_tk, other=0.0).to(tl.float32)
            b_sig, _ = _sigmoid_parts(b_x)
            b_dx = b_dgo * (-b_rate * b_sig)
            tl.store(dg + o_tk, cast_to(b_dx, dg, INTERPRET), mask=m_tk)
            if HAS_DT_BIAS:
                tl.store(ddt_part + i_part * K + o_k, tl.sum(b_dx, axis=0), mask=m_k)
        # d g / d A_log = g; masked entries have b_dgo = 0 and a finite softplus
        tl.store(dA_part + i_part, tl.sum(b_dgo * (-b_rate * _softplus(b_x))))
    if SIGMOID_BETA:
        b_b = tl.load(beta + o_row, mask=m_t, other=0.0).to(tl.float32)
        b_dbo = tl.load(dbeta_out + o_row, mask=m_t, other=0.0).to(tl.float32)
        _, b_ds = _sigmoid_parts(b_b)
        tl.store(dbeta + o_row, cast_to(b_dbo * b_ds, dbeta, INTERPRET), mask=m_t)


def _token_rows(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k ``[T_total, H, K]`` as the kernels read them: tokens any (same) number of elements apart, heads K apart,
    channels contiguous, as the q and k of one conv output are; otherwise contiguous copies."""
    H, K = q.shape[1], q.shape[2]
    if q.stride() == k.stride() and q.stride()[1:] == (K, 1) and q.stride(0) >= H * K:
        return q, k
    return q.contiguous(), k.contiguous()


def _ptr(x: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """x, or a stand-in pointer for a part whose flag is off (the kernel never touches it)."""
    return stand_in if x is None else x


class PreprocessFunction(torch.autograd.Function):
    """The fused activations. Parts whose flag is off take None and return None (the caller passes them through).

    forward(q, k [T_total, H, K] | None, g [T_total, H, K] or [T_total, H] | None, beta [T_total, H] | None,
    A_log [H] | None, dt_bias [H * K] or [H] | None, K, operand_dtype, launch: PreprocessLaunch | None)
    -> (q_n, k_n, g, beta). Saves only the raw inputs; backward relaunches the kernels' recomputation, with the
    forward's launch (``preprocess_launch(T_total, K)`` when None).
    """

    @staticmethod
    def forward(ctx, q, k, g, beta, A_log, dt_bias, K, operand_dtype, launch):
        norm_qk, gate, sigmoid_beta = q is not None, g is not None, beta is not None
        ref = q if norm_qk else g if gate else beta
        T_total, H = ref.shape[:2]
        g_scalar = gate and g.dim() == 2
        q_n = k_n = g_o = b_o = None
        if norm_qk:
            q, k = _token_rows(q, k)
            q_n = poisoned(torch.empty(q.shape, dtype=operand_dtype, device=q.device))
            k_n = poisoned(torch.empty(k.shape, dtype=operand_dtype, device=k.device))
        if gate:
            g, A_log = g.contiguous(), A_log.contiguous()
            dt_bias = None if dt_bias is None else dt_bias.contiguous()
            g_o = poisoned(torch.empty(g.shape, dtype=torch.float32, device=g.device))
        else:
            A_log = dt_bias = None
        if sigmoid_beta:
            beta = beta.contiguous()
            b_o = poisoned(torch.empty(beta.shape, dtype=torch.float32, device=beta.device))
        launch = launch or preprocess_launch(T_total, K)
        BT, BK = launch.fwd_bt, triton.next_power_of_2(K)
        if T_total > 0:
            p = [_ptr(x, ref) for x in (q, k, g, beta, A_log, dt_bias, q_n, k_n, g_o, b_o)]
            preprocess_fwd_kernel[(triton.cdiv(T_total, BT), H)](
                *p, T_total, q.stride(0) if norm_qk else 0, H=H, K=K, BT=BT, BK=BK, NORM_QK=norm_qk, GATE=gate, G_SCALAR=g_scalar,
                HAS_DT_BIAS=dt_bias is not None, SIGMOID_BETA=sigmoid_beta, EPS=L2NORM_EPS,
                INTERPRET=interpreting(), num_warps=launch.warps)
        ctx.save_for_backward(q, k, g, beta, A_log, dt_bias)
        ctx.K = K
        ctx.launch = launch
        return q_n, k_n, g_o, b_o

    @staticmethod
    def backward(ctx, dq_n, dk_n, dg_o, db_o):
        q, k, g, beta, A_log, dt_bias = ctx.saved_tensors
        K = ctx.K
        norm_qk, gate, sigmoid_beta = q is not None, g is not None, beta is not None
        ref = q if norm_qk else g if gate else beta
        T_total, H = ref.shape[:2]
        g_scalar = gate and g.dim() == 2
        launch = ctx.launch
        BT, BK = launch.bwd_bt, triton.next_power_of_2(K)
        NT = triton.cdiv(T_total, BT)
        dq = dk = dg = db = dA = ddt = dA_part = ddt_part = None
        if norm_qk:
            dq_n, dk_n = dq_n.contiguous(), dk_n.contiguous()
            dq = poisoned(torch.empty(q.shape, dtype=q.dtype, device=q.device))
            dk = poisoned(torch.empty(k.shape, dtype=k.dtype, device=k.device))
        if gate:
            dg_o = dg_o.contiguous()
            dg = poisoned(torch.empty_like(g))
            dA_part = poisoned(torch.empty(NT, H, dtype=torch.float32, device=g.device))
            if dt_bias is not None:
                ddt_part = poisoned(torch.empty(NT, H, *(() if g_scalar else (K,)), dtype=torch.float32,
                                            device=g.device))
        if sigmoid_beta:
            db_o = db_o.contiguous()
            db = poisoned(torch.empty_like(beta))
        if T_total > 0:
            p = [_ptr(x, ref) for x in (q, k, g, beta, A_log, dt_bias, dq_n, dk_n, dg_o, db_o,
                                        dq, dk, dg, db, dA_part, ddt_part)]
            preprocess_bwd_kernel[(NT, H)](
                *p, T_total, q.stride(0) if norm_qk else 0, H=H, K=K, BT=BT, BK=BK, NORM_QK=norm_qk, GATE=gate, G_SCALAR=g_scalar,
                HAS_DT_BIAS=dt_bias is not None, SIGMOID_BETA=sigmoid_beta, EPS=L2NORM_EPS,
                INTERPRET=interpreting(), num_warps=launch.warps)
        if gate:
            # fixed-order sums of the per-block partials over t: deterministic
            dA = dA_part.sum(0).to(A_log.dtype)  # [H]
            if dt_bias is not None:
                ddt = ddt_part.sum(0).reshape(dt_bias.shape).to(dt_bias.dtype)  # [H * K] or [H]
        return dq, dk, dg, db, dA, ddt, None, None, None


def preprocess_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    use_qk_l2norm_in_kernel: bool,
    use_gate_in_kernel: bool,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    use_beta_sigmoid_in_kernel: bool,
    operand_dtype: torch.dtype | None = None,
    launch: PreprocessLaunch | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The in-op activations of ``common.preprocess`` in one Triton kernel (forward) and one (backward).

    Args:
        q, k: ``[B, T, H, K]``, any float dtype. g: ``[B, T, H, K]`` (per channel) or ``[B, T, H]`` (scalar gate).
        beta: ``[B, T, H]``. A_log: ``H`` elements, any shape; dt_bias: ``H * K`` (``H`` for a scalar gate)
        elements or None. Only read when ``use_gate_in_kernel``. Arguments already validated by the public op.
        use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel: which parts to compute.
        operand_dtype: the dtype of q_n, k_n (the chunk kernel's operand dtype, rounded to nearest even); None
            keeps fp32, the PyTorch path's dtype.
        launch: the kernels' settings, None for ``preprocess_launch(B * T, K)``.

    Returns:
        ``(q, k, g, beta)``: each activated part in its new dtype (q, k: operand_dtype; g, beta: fp32, shapes
        unchanged), the others passed through untouched. Differentiable in q, k, g, beta, A_log, dt_bias; the
        gradients of A_log and dt_bias keep their shapes and dtypes.
    """
    if not (use_qk_l2norm_in_kernel or use_gate_in_kernel or use_beta_sigmoid_in_kernel):
        return q, k, g, beta
    B, T, H, K = q.shape

    def flat(x: torch.Tensor, on: bool) -> torch.Tensor | None:
        return x.reshape(B * T, *x.shape[2:]) if on else None  # [T_total, H, ...]

    A = dt = None
    if use_gate_in_kernel:
        A = A_log.reshape(H)
        dt = None if dt_bias is None else dt_bias.reshape(-1)
    outs = PreprocessFunction.apply(
        flat(q, use_qk_l2norm_in_kernel), flat(k, use_qk_l2norm_in_kernel), flat(g, use_gate_in_kernel),
        flat(beta, use_beta_sigmoid_in_kernel), A, dt, K, operand_dtype or torch.float32, launch)
    q_n, k_n, g_o, b_o = outs
    if use_qk_l2norm_in_kernel:
        q, k = q_n.view(q.shape), k_n.view(k.shape)
    if use_gate_in_kernel:
        g = g_o.view(g.shape)
    if use_beta_sigmoid_in_kernel:
        beta = b_o.view(beta.shape)
    return q, k, g, beta
