"""Triton recurrent KDA for decoding: paper Eq. 1 token by token, forward only, with a state pool.

One program owns one ``[K, BV]`` block of one (sequence, head) state: it loads the block once from HBM into
registers (fp32), loops over that sequence's tokens, writes the output slice ``o[t, h, BV]`` after each token,
and stores the block once at the end. Decoding is bound by the state traffic (K x V x 4 bytes read and written
per head and layer), so everything else is fused in: the L2 norm of q and k, the forget-gate activation, the
beta sigmoid, the scalar (GDN) gate broadcast, the state-pool gather/scatter and the varlen boundaries. Every
program reads the full K-vectors of q, k and g (tiny next to the state) because the delta rule needs k^T S
over the whole K axis. FLA 0.6.0's decode arguments are handled in the kernel too, without copies: grouped value
heads (GVA: the program of value head hv reads query/key head hv // (HV // H)), the bounded gate
(``lower_bound``), beta in (0, 2) (``allow_neg_eigval``), a beta per value channel, the V-first state layout
(element (k, v) at v * K + k), a slot per token (``state_indices`` ``[N, C]``, speculative decoding: start from
column ``num_accepted_tokens - 1``, write the state after token t into column t), and the state after every
token into a new tensor (``inplace_final_state=False``).

Per token, with S the ``[K, BV]`` block (reference: ``naive.naive_recurrent_kda``):

    S <- exp(g_t)[:, None] * S;   S <- S + k_t (beta_t (v_t - k_t^T S))^T;   o_t = S^T (scale q_t)

Limits and caveats:

* K, V <= 256 (the whole K axis of a block lives in registers; BK is K rounded up to a power of two).
* CUDA-graph capturable: no host sync, no allocation whose size depends on tensor values; the launch
  configuration depends on shapes only. Compile (call once) before capturing.
* With ``state_indices`` the pool is read and written in place; two sequences naming the same non-negative
  slot in one call race (the result is one of them, unspecified), as in every serving engine's slot pool.
* A pool (or initial state) of any float dtype is read widened to fp32; the state stays fp32 in registers across
  the call's tokens and each store into the pool rounds it to nearest in the pool's dtype (a bf16 pool halves the
  decode traffic). The new tensors of final / per-token states are fp32.
* Offsets into the state pool and the token axis are computed in int64, so pools over 2^31 elements work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.norm import L2NORM_EPS
from kimi_linear.ops.triton_helpers import cast_to, interpreting

# softplus(x) = x above this, as torch.nn.functional.softplus (threshold=20) does.
SOFTPLUS_THRESHOLD = 20.0


@triton.jit
def _fused_recurrent_kda_fwd_kernel(
    q, k, v, g, beta, o,
    h0, ht, cu_seqlens, state_indices, num_accepted, A_log, dt_bias,
    scale, lower_bound, T, num_slots, index_cols, stride_idx_n, stride_pool_s,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_g_t, stride_g_h, stride_b_t, stride_b_h,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SCALAR_GATE: tl.constexpr, USE_QK_L2NORM: tl.constexpr, USE_GATE: tl.constexpr, HAS_A_LOG: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, USE_LOWER_BOUND: tl.constexpr, USE_BETA_SIGMOID: tl.constexpr,
    ALLOW_NEG_EIGVAL: tl.constexpr, BETA_PER_CHANNEL: tl.constexpr, STATE_V_FIRST: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    USE_STATE_INDICES: tl.constexpr, INDEX_PER_TOKEN: tl.constexpr, USE_NUM_ACCEPTED: tl.constexpr,
    STORE_EVERY_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    L2_EPS: tl.constexpr, SP_THRESHOLD: tl.constexpr, INTERPRET: tl.constexpr,
):
    # One flat axis (limit 2^31 - 1; N * HV alone can exceed the 65535 of axes 1 and 2), V-blocks fastest:
    # programs running side by side then cover whole rows of one head's state, as in FLA's kernel (heads fastest
    # was slower: benchmarks/RESULTS.md, "Measured and dropped").
    NV = (V + BV - 1) // BV
    i_nh, i_v = tl.program_id(0) // NV, tl.program_id(0) % NV
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)  # GVA: the query/key head this value head reads
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
    # Where element (k, v) of a [K, V] state lives: k * V + v, or v * K + k in the V-first layout.
    if STATE_V_FIRST:
        o_kv = o_k[:, None] + o_v[None, :] * K
    else:
        o_kv = o_k[:, None] * V + o_v[None, :]

    if USE_STATE_INDICES:
        if INDEX_PER_TOKEN:
            # [N, cols] slots: the initial state is in column num_accepted - 1 (speculative decoding) or 0.
            if USE_NUM_ACCEPTED:
                col = tl.load(num_accepted + i_n).to(tl.int64) - 1
            else:
                col = tl.zeros([], dtype=tl.int64)
            col_ok = (col >= 0) & (col < index_cols)
            slot = tl.load(state_indices + i_n * stride_idx_n + tl.where(col_ok, col, 0)).to(tl.int64)
            slot = tl.where(col_ok, slot, -1)
        else:
            slot = tl.load(state_indices + i_n * stride_idx_n).to(tl.int64)
        # Slots outside the pool count as "no slot": the indices cannot be checked on the host without a sync,
        # and a wrong one must not read or write memory outside the pool.
        has_slot = (slot >= 0) & (slot < num_slots)
        p_h0 = h0 + tl.where(has_slot, slot, 0) * stride_pool_s + i_hv * K * V + o_kv
        b_h = tl.load(p_h0, mask=m_h & has_slot, other=0.0).to(tl.float32)  # [BK, BV]
    elif USE_INITIAL_STATE:
        p_h0 = h0 + i_nh.to(tl.int64) * K * V + o_kv
        b_h = tl.load(p_h0, mask=m_h, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BK, BV], dtype=tl.float32)

    if USE_GATE:
        if HAS_A_LOG:
            b_rate = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        if HAS_DT_BIAS:
            if SCALAR_GATE:
                b_bias = tl.load(dt_bias + i_hv).to(tl.float32)
            else:
                b_bias = tl.load(dt_bias + i_hv * K + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]

    # A while loop, not range(bos, eos): Triton's interpreter cannot range over loaded values (numpy 2).
    t = bos
    while t < eos:
        b_q = tl.load(q + t * stride_q_t + i_h * stride_q_h + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
        b_k = tl.load(k + t * stride_k_t + i_h * stride_k_h + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
        b_v = tl.load(v + t * stride_v_t + i_hv * stride_v_h + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
        if BETA_PER_CHANNEL:
            b_beta = tl.load(beta + t * stride_b_t + i_hv * stride_b_h + o_v, mask=m_v, other=0.0).to(tl.float32)
        else:
            b_beta = tl.load(beta + t * stride_b_t + i_hv * stride_b_h).to(tl.float32)
        if SCALAR_GATE:
            b_g = tl.load(g + t * stride_g_t + i_hv * stride_g_h).to(tl.float32)
        else:
            b_g = tl.load(g + t * stride_g_t + i_hv * stride_g_h + o_k, mask=m_k, other=0.0).to(tl.float32)

        if USE_QK_L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 0) + L2_EPS)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 0) + L2_EPS)
        if USE_GATE:
            if HAS_DT_BIAS:
                b_g = b_g + b_bias
            if USE_LOWER_BOUND:
                # FLA's bounded gate: lower_bound * sigmoid(exp(A_log) x), in (lower_bound, 0)
                if HAS_A_LOG:
                    b_g = b_g * b_rate
                b_g = lower_bound / (1.0 + tl.exp(-b_g))
            else:
                # log(1 + exp(x)) overflows for large x; torch's softplus switches to x above the threshold too.
                b_softplus = tl.log(1.0 + tl.exp(tl.minimum(b_g, SP_THRESHOLD)))
                b_g = -b_rate * tl.where(b_g > SP_THRESHOLD, b_g, b_softplus)
        if USE_BETA_SIGMOID:
            b_beta = 1.0 / (1.0 + tl.exp(-b_beta))
            if ALLOW_NEG_EIGVAL:
                b_beta = 2.0 * b_beta
        b_q = b_q * scale

        if SCALAR_GATE:
            b_h = b_h * tl.exp(b_g)
        else:
            b_h = b_h * tl.exp(b_g)[:, None]
        # The delta rule: replace what the state predicts for k_t by v_t, with step size beta_t.
        b_delta = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))  # [BV]
        b_h = b_h + b_k[:, None] * b_delta[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0)  # [BV]
        tl.store(o + (t * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        if STORE_EVERY_STATE:  # the state after each token, to its own row (not in place)
            tl.store(ht + (t * HV + i_hv) * K * V + o_kv, b_h, mask=m_h)
        elif INDEX_PER_TOKEN:  # the state after each token, in place into that token's slot
            col_t = t - bos
            slot_t = tl.load(state_indices + i_n * stride_idx_n + col_t, mask=col_t < index_cols, other=-1)
            slot_t = slot_t.to(tl.int64)
            ok_t = (slot_t >= 0) & (slot_t < num_slots)
            p_t = h0 + tl.where(ok_t, slot_t, 0) * stride_pool_s + i_hv * K * V + o_kv
            tl.store(p_t, cast_to(b_h, h0, INTERPRET), mask=m_h & ok_t)
        t += 1

    if USE_STATE_INDICES:
        if not STORE_EVERY_STATE and not INDEX_PER_TOKEN:
            tl.store(p_h0, cast_to(b_h, h0, INTERPRET), mask=m_h & has_slot)
    elif STORE_FINAL_STATE:
        p_ht = ht + i_nh.to(tl.int64) * K * V + o_kv
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
    *,
    lower_bound: float | None = None,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    num_accepted_tokens: torch.Tensor | None = None,
    inplace_final_state: bool = True,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent KDA in one Triton launch (forward only). Called by ``fused_recurrent_kda(backend="triton")``,
    which validates the arguments; see its docstring for the full contract.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]`` (HV a multiple of H: GVA, value head hv reads query/key
            head hv // (HV // H)); g: ``[B, T, HV, K]`` or ``[B, T, HV]`` (scalar gate); beta: ``[B, T, HV]`` or
            ``[B, T, HV, V]`` (one per value channel) — float16/bfloat16/float32, any mix; math is fp32.
        scale: query scale, default K ** -0.5.
        initial_state: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first``), any float dtype (read as
            fp32), or with ``state_indices`` the pool ``[S, HV, K, V]`` (each slot contiguous, any stride between
            slots, as in a serving engine's paged cache; updated in place unless ``inplace_final_state`` is False;
            stores round to its dtype).
        cu_seqlens: int ``[N + 1]`` on q's device, B == 1; values are trusted (not read on the host).
        state_indices: int ``[N]`` on q's device (any stride: a column of a block table works), a slot per sequence (start there, write the final state back),
            or ``[N, C]``, a slot per token (start from column ``num_accepted_tokens - 1``, or 0, and write the
            state after token t into column t). A negative index, or one >= S, means "no slot": start from zeros
            and write nothing there (the torch backend raises IndexError for one >= S; checking here would need a
            host sync). Tokens past column C - 1 write nothing.
        num_accepted_tokens: int ``[N]`` (with ``[N, C]`` state_indices): the column to start from, plus one.
        inplace_final_state: with ``state_indices``, False writes the state after every token into a new
            ``[B * T, HV, K, V]`` fp32 tensor (row = token) instead of the pool.
        use_qk_l2norm_in_kernel, use_gate_in_kernel (with A_log ``[HV]``, dt_bias ``[HV*K]`` or ``[HV]``,
            ``lower_bound``), use_beta_sigmoid_in_kernel (``allow_neg_eigval``: 2 sigmoid): the in-op activations
            of ``common.preprocess`` and ``gate.kda_gate``, fused.
        out: ``[B, T, HV, V]``, written in place (contiguous, else the result is copied into it).
        block_v, num_warps: launch overrides for benchmarking (default: chosen from the shapes).

    Returns:
        ``(o [B, T, HV, V] in v's dtype (``out`` when given), states)``: with ``state_indices`` the pool itself
        (in place) or the per-token states; else a new ``[N, HV, K, V]`` float32 tensor (``[N, HV, V, K]`` with
        ``state_v_first``) if ``output_final_state``, else None.

    Raises:
        ValueError: a slot of the state pool is not contiguous (it could not be updated in place), or cu_seqlens /
            state_indices / A_log / dt_bias are not on q's device.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    scale = K**-0.5 if scale is None else float(scale)
    for name, x in (("cu_seqlens", cu_seqlens), ("state_indices", state_indices), ("A_log", A_log),
                    ("dt_bias", dt_bias), ("num_accepted_tokens", num_accepted_tokens)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")

    use_state_indices = state_indices is not None
    per_token_index = use_state_indices and state_indices.dim() == 2
    every_state = use_state_indices and not inplace_final_state
    if use_state_indices and initial_state.shape[0] and not initial_state[0].is_contiguous():
        raise ValueError("each slot of the state pool initial_state [S, HV, K, V] must be contiguous (any stride "
                         f"between slots is fine): it is updated in place; got strides {initial_state.stride()}")
    if initial_state is not None and not use_state_indices:
        initial_state = initial_state.contiguous()
    store_final = output_final_state and not use_state_indices
    state_shape = (HV, V, K) if state_v_first else (HV, K, V)
    ht = None
    if store_final:
        ht = q.new_empty(N, *state_shape, dtype=torch.float32)
    elif every_state:
        ht = q.new_empty(B * T, *state_shape, dtype=torch.float32)
    o = out if out is not None and out.is_contiguous() and out.dtype == v.dtype else None
    o_buffer = torch.empty(B, T, HV, V, dtype=v.dtype, device=v.device) if o is None else o  # [B, T, HV, V]
    if use_state_indices:
        final_state = ht if every_state else initial_state
    else:
        final_state = ht
    if N * HV == 0 or B * T == 0 and (per_token_index or every_state):
        return _into(out, o_buffer), final_state

    q, s_qt, s_qh = _token_strides(q)
    k, s_kt, s_kh = _token_strides(k)
    v, s_vt, s_vh = _token_strides(v)
    g, s_gt, s_gh = _token_strides(g)
    beta, s_bt, s_bh = _token_strides(beta)
    use_gate = bool(use_gate_in_kernel)
    if use_gate:
        A_log = None if A_log is None else A_log.reshape(-1).contiguous()
        dt_bias = None if dt_bias is None else dt_bias.reshape(-1).contiguous()
    if per_token_index and state_indices.stride(1) != 1:
        state_indices = state_indices.contiguous()

    BK = triton.next_power_of_2(K)
    BV = block_v or _default_block_v(N * HV, BK, V)
    grid = (N * HV * triton.cdiv(V, BV),)
    _fused_recurrent_kda_fwd_kernel[grid](
        q, k, v, g, beta, o_buffer,
        initial_state, ht, cu_seqlens, state_indices, num_accepted_tokens,
        A_log if use_gate else None, dt_bias if use_gate else None,
        scale, 0.0 if lower_bound is None else float(lower_bound), T,
        initial_state.shape[0] if use_state_indices else 0,
        state_indices.shape[1] if per_token_index else 1,
        state_indices.stride(0) if use_state_indices else 1,
        initial_state.stride(0) if use_state_indices else 0,
        s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_gt, s_gh, s_bt, s_bh,
        H=H, HV=HV, K=K, V=V, BK=BK, BV=BV,
        SCALAR_GATE=g.dim() == 3, USE_QK_L2NORM=bool(use_qk_l2norm_in_kernel), USE_GATE=use_gate,
        HAS_A_LOG=use_gate and A_log is not None, HAS_DT_BIAS=use_gate and dt_bias is not None,
        USE_LOWER_BOUND=use_gate and lower_bound is not None, USE_BETA_SIGMOID=bool(use_beta_sigmoid_in_kernel),
        ALLOW_NEG_EIGVAL=bool(allow_neg_eigval), BETA_PER_CHANNEL=beta.dim() == 4, STATE_V_FIRST=bool(state_v_first),
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=store_final,
        USE_STATE_INDICES=use_state_indices, INDEX_PER_TOKEN=per_token_index,
        USE_NUM_ACCEPTED=per_token_index and num_accepted_tokens is not None,
        STORE_EVERY_STATE=every_state, IS_VARLEN=cu_seqlens is not None,
        L2_EPS=L2NORM_EPS, SP_THRESHOLD=SOFTPLUS_THRESHOLD, INTERPRET=interpreting(),
        num_warps=num_warps or _default_num_warps(BK, BV),
    )
    return _into(out, o_buffer), final_state


def _into(out: torch.Tensor | None, o: torch.Tensor) -> torch.Tensor:
    """o, copied into ``out`` when the kernel could not write there directly."""
    if out is None or out is o:
        return o
    return out.copy_(o)
