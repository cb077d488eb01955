"""Triton recurrent KDA for decoding: paper Eq. 1 token by token, forward only, with a state pool.

One program owns one ``[K, BV]`` block of one (sequence, head) state: it loads the block once from HBM into
registers (fp32), loops over that sequence's tokens, writes the output slice ``o[t, h, BV]`` after each token,
and stores the block once at the end. Decoding is bound by the state traffic (K x V x 4 bytes read and written
per head and layer), so everything else is fused in: the L2 norm of q and k, the forget-gate activation, the
beta sigmoid, the scalar (GDN) gate broadcast, the state-pool gather/scatter and the varlen boundaries. Every
program reads the full K-vectors of q, k and g (tiny next to the state) because the delta rule needs k^T S
over the whole K axis.

Per token, with S the ``[K, BV]`` block (reference: ``naive.naive_recurrent_kda``):

    S <- exp(g_t)[:, None] * S;   S <- S + k_t (beta_t (v_t - k_t^T S))^T;   o_t = S^T (scale q_t)

Limits and caveats:

* K, V <= 256 (the whole K axis of a block lives in registers; BK is K rounded up to a power of two).
* CUDA-graph capturable: no host sync, no allocation whose size depends on tensor values; the launch
  configuration depends on shapes only. Compile (call once) before capturing.
* With ``state_indices`` the pool is read and written in place; two sequences naming the same non-negative
  slot in one call race (the result is one of them, unspecified), as in every serving engine's slot pool.
* Offsets into the state pool and the token axis are computed in int64, so pools over 2^31 elements work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.norm import L2NORM_EPS

# softplus(x) = x above this, as torch.nn.functional.softplus (threshold=20) does.
SOFTPLUS_THRESHOLD = 20.0


@triton.jit
def _fused_recurrent_kda_fwd_kernel(
    q, k, v, g, beta, o,
    h0, ht, cu_seqlens, state_indices, A_log, dt_bias,
    scale, T, num_slots,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_g_t, stride_g_h, stride_b_t, stride_b_h,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SCALAR_GATE: tl.constexpr, USE_QK_L2NORM: tl.constexpr, USE_GATE: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    USE_BETA_SIGMOID: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    USE_STATE_INDICES: tl.constexpr, IS_VARLEN: tl.constexpr,
    L2_EPS: tl.constexpr, SP_THRESHOLD: tl.constexpr,
):
    # One flat axis (limit 2^31 - 1; N * H alone can exceed the 65535 of axes 1 and 2), V-blocks fastest:
    # programs running side by side then cover whole rows of one head's state, as in FLA's kernel (heads fastest
    # was slower: benchmarks/RESULTS.md, "Measured and dropped").
    NV = (V + BV - 1) // BV
    i_nh, i_v = tl.program_id(0) // NV, tl.program_id(0) % NV
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]

    if USE_STATE_INDICES:
        slot = tl.load(state_indices + i_n).to(tl.int64)
        # Slots outside the pool count as "no slot": the indices cannot be checked on the host without a sync,
        # and a wrong one must not read or write memory outside the pool.
        has_slot = (slot >= 0) & (slot < num_slots)
        p_h0 = h0 + (tl.where(has_slot, slot, 0) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h = tl.load(p_h0, mask=m_h & has_slot, other=0.0).to(tl.float32)  # [BK, BV]
    elif USE_INITIAL_STATE:
        p_h0 = h0 + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h = tl.load(p_h0, mask=m_h, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BK, BV], dtype=tl.float32)

    if USE_GATE:
        b_rate = tl.exp(tl.load(A_log + i_h).to(tl.float32))
        if HAS_DT_BIAS:
            if SCALAR_GATE:
                b_bias = tl.load(dt_bias + i_h).to(tl.float32)
            else:
                b_bias = tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]

    # A while loop, not range(bos, eos): Triton's interpreter cannot range over loaded values (numpy 2).
    t = bos
    while t < eos:
        b_q = tl.load(q + t * stride_q_t + i_h * stride_q_h + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
        b_k = tl.load(k + t * stride_k_t + i_h * stride_k_h + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
        b_v = tl.load(v + t * stride_v_t + i_h * stride_v_h + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
        b_beta = tl.load(beta + t * stride_b_t + i_h * stride_b_h).to(tl.float32)
        if SCALAR_GATE:
            b_g = tl.load(g + t * stride_g_t + i_h * stride_g_h).to(tl.float32)
        else:
            b_g = tl.load(g + t * stride_g_t + i_h * stride_g_h + o_k, mask=m_k, other=0.0).to(tl.float32)

        if USE_QK_L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 0) + L2_EPS)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 0) + L2_EPS)
        if USE_GATE:
            if HAS_DT_BIAS:
                b_g = b_g + b_bias
            # log(1 + exp(x)) overflows for large x; torch's softplus switches to x above the threshold too.
            b_softplus = tl.log(1.0 + tl.exp(tl.minimum(b_g, SP_THRESHOLD)))
            b_g = -b_rate * tl.where(b_g > SP_THRESHOLD, b_g, b_softplus)
        if USE_BETA_SIGMOID:
            b_beta = 1.0 / (1.0 + tl.exp(-b_beta))
        b_q = b_q * scale

        if SCALAR_GATE:
            b_h = b_h * tl.exp(b_g)
        else:
            b_h = b_h * tl.exp(b_g)[:, None]
        # The delta rule: replace what the state predicts for k_t by v_t, with step size beta_t.
        b_delta = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))  # [BV]
        b_h = b_h + b_k[:, None] * b_delta[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0)  # [BV]
        tl.store(o + (t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        t += 1

    if USE_STATE_INDICES:
        tl.store(p_h0, b_h, mask=m_h & has_slot)
    elif STORE_FINAL_STATE:
        p_ht = ht + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        tl.store(p_ht, b_h, mask=m_h)


def _token_strides(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(x', token stride, head stride) for x ``[B, T, H, ...]`` read as a flat token axis of B*T rows.

    Views with a unit last stride whose batch and time axes merge into one token axis (the usual slices of a
    fused projection) are passed as they are; anything else is made contiguous.
    """
    B, T, H = x.shape[:3]
    last_ok = x.dim() == 3 or x.shape[-1] == 1 or x.stride(-1) == 1
    if last_ok:
        if T == 1:
            return x, x.stride(0), x.stride(2)
        if B == 1 or x.stride(0) == T * x.stride(1):
            return x, x.stride(1), x.stride(2)
    x = x.contiguous()
    return x, x.stride(1), x.stride(2)


def _default_block_v(n_heads: int, BK: int, V: int) -> int:
    """V-block per program, from the GPU sweep of ``python -m benchmarks kda_decode --sweep`` (K = V = 128, H = 32):
    16 when few (sequence, head) pairs must still spread over 132 SMs (B=1), 32 at B=16, 64 from B=64 on,
    where longer rows per program move the state fastest. Capped at 8192 state elements a program."""
    BV = 16 if n_heads < 256 else 32 if n_heads < 2048 else 64
    return max(1, min(BV, max(8192 // BK, 1), triton.next_power_of_2(V)))


def _default_num_warps(BK: int, BV: int) -> int:
    # 2 warps for the small blocks and 4 for the large were the fastest at K = 128; 8 was slower for both.
    return 2 if BK * BV <= 2048 else 4


def fused_recurrent_kda_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    state_indices: torch.Tensor | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent KDA in one Triton launch (forward only). Called by ``fused_recurrent_kda(backend="triton")``,
    which validates the arguments; see its docstring for the full contract.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: ``[B, T, H, K]`` or ``[B, T, H]`` (scalar gate);
            beta: ``[B, T, H]`` — float16/bfloat16/float32, any mix; math is fp32.
        scale: query scale, default K ** -0.5.
        initial_state: ``[N, H, K, V]`` float32, or with ``state_indices`` the pool ``[S, H, K, V]`` float32
            (contiguous, updated in place).
        cu_seqlens: int ``[N + 1]`` on q's device, B == 1; values are trusted (not read on the host).
        state_indices: int ``[N]`` on q's device; slot per sequence, negative = start from zeros and write
            nothing. An index >= S is treated like a negative one (the torch backend raises IndexError there;
            checking here would need a host sync).
        use_qk_l2norm_in_kernel, use_gate_in_kernel (with A_log ``[H]``, dt_bias ``[H*K]`` or ``[H]``),
        use_beta_sigmoid_in_kernel: the in-op activations of ``common.preprocess``, fused.
        block_v, num_warps: launch overrides for benchmarking (default: chosen from the shapes).

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state)``: the pool itself with ``state_indices``, a new
        ``[N, H, K, V]`` float32 tensor if ``output_final_state``, else None.

    Raises:
        ValueError: the state pool is not contiguous (it could not be updated in place), or cu_seqlens /
            state_indices / A_log / dt_bias are not on q's device.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    scale = K**-0.5 if scale is None else float(scale)
    for name, x in (("cu_seqlens", cu_seqlens), ("state_indices", state_indices), ("A_log", A_log),
                    ("dt_bias", dt_bias)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")

    use_state_indices = state_indices is not None
    if use_state_indices and not initial_state.is_contiguous():
        raise ValueError("initial_state (the state pool [S, H, K, V]) must be contiguous: it is updated in "
                         "place")
    if initial_state is not None and not use_state_indices:
        initial_state = initial_state.contiguous()
    store_final = output_final_state and not use_state_indices
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if store_final else None
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=v.device)  # [B, T, H, V]
    final_state = initial_state if use_state_indices else ht
    if N * H == 0:
        return o, final_state

    q, s_qt, s_qh = _token_strides(q)
    k, s_kt, s_kh = _token_strides(k)
    v, s_vt, s_vh = _token_strides(v)
    g, s_gt, s_gh = _token_strides(g)
    beta, s_bt, s_bh = _token_strides(beta)
    use_gate = bool(use_gate_in_kernel)
    if use_gate:
        A_log = A_log.reshape(-1).contiguous()
        dt_bias = None if dt_bias is None else dt_bias.reshape(-1).contiguous()

    BK = triton.next_power_of_2(K)
    BV = block_v or _default_block_v(N * H, BK, V)
    grid = (N * H * triton.cdiv(V, BV),)
    _fused_recurrent_kda_fwd_kernel[grid](
        q, k, v, g, beta, o,
        initial_state, ht, cu_seqlens, state_indices,
        A_log if use_gate else None, dt_bias if use_gate else None,
        scale, T, initial_state.shape[0] if use_state_indices else 0,
        s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_gt, s_gh, s_bt, s_bh,
        H=H, K=K, V=V, BK=BK, BV=BV,
        SCALAR_GATE=g.dim() == 3, USE_QK_L2NORM=bool(use_qk_l2norm_in_kernel), USE_GATE=use_gate,
        HAS_DT_BIAS=use_gate and dt_bias is not None, USE_BETA_SIGMOID=bool(use_beta_sigmoid_in_kernel),
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=store_final,
        USE_STATE_INDICES=use_state_indices, IS_VARLEN=cu_seqlens is not None,
        L2_EPS=L2NORM_EPS, SP_THRESHOLD=SOFTPLUS_THRESHOLD,
        num_warps=num_warps or _default_num_warps(BK, BV),
    )
    return o, final_state
