"""Triton fused decode step of a KDA layer: everything between the input projections and o_proj in one launch.

``decode.kda_decode_step`` holds the contract and the PyTorch reference (``kda_decode_step_reference``); this module
is imported only when the Triton path runs.

One program per (row n, head h), grid ``(N * H,)``, heads fastest (the programs of one row share its f_low, g_low
and beta loads). With s = slots[n] the program computes, in fp32 (the reference of each step in parentheses):

1. short conv + SiLU of the head's q and k channels from the tails ``conv_pool[s, c, :]`` and the new input;
   the tails shift by one in place (``conv.causal_conv1d_update``). Without the short conv: SiLU only.
2. q, k L2-normalised (eps 1e-6 inside the square root), q times ``scale`` (``norm.l2norm``).
3. the forget gate g = -exp(A_log[h]) softplus(f_b[h] @ f_low[n] + dt_bias[h]) over the head's K channels, the
   GEMV over the low rank R in BR-wide slices; the scalar (GDN) gate reads one row of f_b and one bias, broadcast
   over K (``gate.kda_gate``). beta = sigmoid(beta_logits[n, h]).
4. for each [BK, BV] block of the head's state (one block up to K * V = 16384, i.e. K = V = 128; K = V = 256
   takes four [256, 64] blocks): short conv + SiLU of the block's v channels; the block loaded once from
   ``state_pool[s, h]`` (fp32 or bf16, widened to fp32), decayed, the delta-rule update, stored once rounded to
   nearest in the pool's dtype (paper Eq. 1, ``naive.naive_recurrent_kda``);
   o = S^T q for the block; y = o * o_norm.weight * sigmoid(g_b[h] @ g_low[n]) for the block, kept in
   registers; sum(o^2) accumulated.
5. out[n, h*V : (h+1)*V] = y * rsqrt(sum(o^2) / V + eps): the per-head RMSNorm (``F.rms_norm``) times the gate,
   in qkv's dtype.

Why one program per (n, h) and not V-blocks in parallel: the RMSNorm needs the whole V row of o, and o needs the
whole state of the head. Programs splitting V would need a cross-program reduction (a second launch, or a
semaphore and a last-arriver pass); a program that owns the head gets the row's RMS from a running sum in
registers, and the state is still read once and written once. The price is parallelism at small batch: B = 1,
H = 32 is 32 programs, each moving 64 KiB of state in and 64 KiB out (32 KiB each with a bf16 pool) plus its slices of f_b and g_b (32 KiB each
in bf16 at R = K = 128; every row's program of a head reads the same slices, so they stay in L2 across rows).

Register budget (sm_90, bf16 activations, offline build: ``python -m benchmarks kda_decode --build-report``):
at K = V = 128 the [128, 128] fp32 block is 64 registers a thread at 8 warps; the kernel builds to 128 registers,
no spills, in every configuration with the short conv (two programs per SM), to about 190 without it; 4 warps
needs ~254, 16 warps ~90. At K = V = 256 ([256, 64] blocks) 8 warps reach ~250 registers, 16 warps 128.
``default_launch`` nevertheless takes 4 warps for the [128, 128] block: measured faster than 8 and 16 at B = 1
and at B = 256 (``python -m benchmarks kda_decode --layer-sweep``; benchmarks/RESULTS.md, "Decode"); 16 when
K = 256, 2 below 2048 elements.

Limits and caveats:

* K, V <= 256; any rank R of f_low / g_low (looped in BR slices); filter width W <= 16; V = K is what the layer
  has, but any V works.
* CUDA-graph capturable: no host sync, no allocation whose size depends on tensor values; the launch
  configuration depends on shapes only. Compile (call once) before capturing.
* The pools are updated in place. Two rows naming the same slot (CUDA-graph padding rows all pointing at one
  scratch slot) race: that slot ends up with some mix of the rows' writes and those rows' outputs are
  unspecified; other slots and rows are not affected. A slot outside 0..P-1 counts as "no slot": the row reads
  zeros for its conv tails and state and writes nothing to the pools (checking on the host would need a sync;
  the torch backend raises).
* A program reads each conv tail and writes it back shifted by one element, so the element it writes at j was
  read as element j + 1, possibly by another thread: a barrier separates the tails' reads from their writes.
* Offsets into the pools and the row-major activations are int64, so pools over 2^31 elements work.
* Forward only (inference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda.recurrent_triton import SOFTPLUS_THRESHOLD
from kimi_linear.ops.norm import L2NORM_EPS
from kimi_linear.ops.triton_helpers import cast_to, interpreting, new_buffer

MAX_STATE_BLOCK = 16384  # fp32 state elements one program holds at a time
MAX_WEIGHT_SLICE = 8192  # elements of one [BK or BV, BR] weight slice of the GEMVs


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch settings of the fused decode kernel (``default_launch`` picks them from the shapes).

    Attributes:
        block_v: V columns of the state per block (a power of two); the program loops over cdiv(V, block_v).
        block_r: low-rank columns per GEMV slice (a power of two).
        num_warps: warps per program.
    """

    block_v: int
    block_r: int
    num_warps: int


def default_launch(K: int, V: int, rank: int) -> DecodeLaunch:
    """The whole V row in one block up to K * V = 16384 (K = V = 128), else V-blocks of 16384 // BK; weight slices
    of at most 8192 elements; warps by the block size (see the module docstring): 4 for a [128, 128] block, 16 for
    [256, 64]."""
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), max(16, MAX_STATE_BLOCK // BK))
    BR = min(triton.next_power_of_2(rank), max(16, MAX_WEIGHT_SLICE // max(BK, BV)))
    size = BK * BV
    warps = 16 if BK >= 256 else 4 if size >= 2048 else 2
    return DecodeLaunch(block_v=BV, block_r=BR, num_warps=warps)


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _conv_silu(x, tails, w, o_c, m_c, has_slot, W: tl.constexpr, BW: tl.constexpr):
    """SiLU of the short conv of channels ``o_c`` (fp32 ``[BC]``) and their window ``[BC, BW]`` (tail in columns
    0..W-2, the new input in column W-1: what ``_store_tails`` writes back). ``x``: the row's inputs, ``tails``:
    the slot's ``[C, W-1]`` tails, ``w``: the ``[C, W]`` filters, each already offset to the channel block."""
    b_x = tl.load(x + o_c, mask=m_c, other=0.0).to(tl.float32)  # [BC]
    o_w = tl.arange(0, BW)
    m_tail = m_c[:, None] & (o_w < W - 1)[None, :] & has_slot
    b_tail = tl.load(tails + o_c[:, None] * (W - 1) + o_w[None, :], mask=m_tail, other=0.0).to(tl.float32)
    b_win = tl.where((o_w == W - 1)[None, :], b_x[:, None], b_tail)  # [BC, BW]
    m_w = m_c[:, None] & (o_w < W)[None, :]
    b_w = tl.load(w + o_c[:, None] * W + o_w[None, :], mask=m_w, other=0.0).to(tl.float32)
    return _silu(tl.sum(b_win * b_w, 1)), b_win


@triton.jit
def _load_silu(x, o_c, m_c):
    """SiLU of the row's inputs at channels ``o_c`` (no short conv): fp32 ``[BC]``."""
    return _silu(tl.load(x + o_c, mask=m_c, other=0.0).to(tl.float32))


@triton.jit
def _store_tails(tails, b_win, o_c, m_c, has_slot, W: tl.constexpr, BW: tl.constexpr, INTERPRET: tl.constexpr):
    """The window shifted by one into the slot's tails: column j (1..W-1) of the window goes to tail j - 1."""
    o_w = tl.arange(0, BW)
    m = m_c[:, None] & ((o_w >= 1) & (o_w < W))[None, :] & has_slot
    tl.store(tails + o_c[:, None] * (W - 1) + (o_w - 1)[None, :], cast_to(b_win, tails, INTERPRET), mask=m)


@triton.jit
def _gemv(w, x, o_rows, m_rows, R: tl.constexpr, BR: tl.constexpr):
    """fp32 ``sum_j w[o_rows, j] * x[j]`` for a row-major ``[*, R]`` weight: ``[len(o_rows)]``."""
    b_acc = tl.zeros(o_rows.shape, dtype=tl.float32)
    for r0 in tl.static_range(0, R, BR):
        o_r = r0 + tl.arange(0, BR)
        m_r = o_r < R
        b_x = tl.load(x + o_r, mask=m_r, other=0.0).to(tl.float32)  # [BR]
        m = m_rows[:, None] & m_r[None, :]
        b_w = tl.load(w + o_rows[:, None] * R + o_r[None, :], mask=m, other=0.0).to(tl.float32)  # [rows, BR]
        b_acc += tl.sum(b_w * b_x[None, :], 1)
    return b_acc


@triton.jit
def _kda_decode_step_kernel(
    qkv, f_low, beta_logits, g_low, conv_pool, w_q, w_k, w_v, f_b, A_log, dt_bias, state_pool, slots, norm_w,
    g_b, out,
    eps, scale, num_slots, stride_qkv, stride_f, stride_beta, stride_g, stride_out,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr, R_F: tl.constexpr, R_G: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, BNV: tl.constexpr, BW: tl.constexpr, BR: tl.constexpr,
    USE_CONV: tl.constexpr, SCALAR_GATE: tl.constexpr, USE_OUTPUT_GATE: tl.constexpr,
    L2_EPS: tl.constexpr, SP_THRESHOLD: tl.constexpr, INTERPRET: tl.constexpr,
):
    i_n, i_h = tl.program_id(0) // H, tl.program_id(0) % H
    i_n64 = i_n.to(tl.int64)
    slot = tl.load(slots + i_n).to(tl.int64)
    has_slot = (slot >= 0) & (slot < num_slots)
    slot = tl.where(has_slot, slot, 0)
    C: tl.constexpr = 2 * H * K + H * V  # channels of qkv: q, k, v heads in that order
    row = qkv + i_n64 * stride_qkv

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    # 1-2. q, k: conv + SiLU, L2 norm (the windows are written back after the loop)
    q0, k0 = i_h * K, H * K + i_h * K
    if USE_CONV:
        tails = conv_pool + slot * (C * (W - 1))
        b_q, b_win_q = _conv_silu(row + q0, tails + q0 * (W - 1), w_q + i_h * K * W, o_k, m_k, has_slot, W, BW)
        b_k, b_win_k = _conv_silu(row + k0, tails + k0 * (W - 1), w_k + i_h * K * W, o_k, m_k, has_slot, W, BW)
    else:
        b_q, b_k = _load_silu(row + q0, o_k, m_k), _load_silu(row + k0, o_k, m_k)
    b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 0) + L2_EPS) * scale  # [BK]
    b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 0) + L2_EPS)

    # 3. gate and beta; the scalar gate reads row h of f_b in every lane
    o_g = i_h + 0 * o_k if SCALAR_GATE else i_h * K + o_k
    b_g = _gemv(f_b, f_low + i_n64 * stride_f, o_g, m_k, R_F, BR)
    b_g += tl.load(dt_bias + o_g, mask=m_k, other=0.0).to(tl.float32)
    # log(1 + exp(x)) overflows for large x; torch's softplus switches to x above the threshold too
    b_softplus = tl.where(b_g > SP_THRESHOLD, b_g, tl.log(1.0 + tl.exp(tl.minimum(b_g, SP_THRESHOLD))))
    b_decay = tl.exp(-tl.exp(tl.load(A_log + i_h).to(tl.float32)) * b_softplus)  # [BK] exp(g)
    b_beta = tl.sigmoid(tl.load(beta_logits + i_n64 * stride_beta + i_h).to(tl.float32))

    # 4. the state, one [BK, BV] block at a time; y and sum(o^2) of the whole row stay in registers
    p_state = state_pool + (slot * H + i_h) * (K * V)
    o_nv = tl.arange(0, BNV)
    o_bv = tl.arange(0, BV)
    b_y = tl.zeros([BNV, BV], dtype=tl.float32)
    b_ss = tl.zeros([], dtype=tl.float32)
    for i_v in range(NV):
        o_v = i_v * BV + o_bv
        m_v = o_v < V
        v0 = 2 * H * K + i_h * V + i_v * BV
        if USE_CONV:
            b_v, b_win_v = _conv_silu(row + v0, tails + v0 * (W - 1), w_v + (i_h * V + i_v * BV) * W, o_bv, m_v,
                                      has_slot, W, BW)
        else:
            b_v = _load_silu(row + v0, o_bv, m_v)  # [BV]
        m_h = m_k[:, None] & m_v[None, :]
        p_h = p_state + o_k[:, None] * V + o_v[None, :]
        # the pool is fp32 or bf16: the block is computed in fp32 and stored back rounded to the pool's dtype
        b_h = tl.load(p_h, mask=m_h & has_slot, other=0.0).to(tl.float32) * b_decay[:, None]  # [BK, BV]
        # the delta rule: replace what the state predicts for k by v, with step size beta
        b_delta = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))  # [BV]
        b_h += b_k[:, None] * b_delta[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0)  # [BV]
        b_ss += tl.sum(b_o * b_o, 0)
        b_gate = tl.load(norm_w + o_v, mask=m_v, other=0.0).to(tl.float32)
        if USE_OUTPUT_GATE:
            b_gate *= tl.sigmoid(_gemv(g_b, g_low + i_n64 * stride_g, i_h * V + o_v, m_v, R_G, BR))
        b_y = tl.where((o_nv == i_v)[:, None], (b_o * b_gate)[None, :], b_y)
        if USE_CONV:
            tl.debug_barrier()  # every thread has read the v tails before any is overwritten
            _store_tails(tails + v0 * (W - 1), b_win_v, o_bv, m_v, has_slot, W, BW, INTERPRET)
        tl.store(p_h, cast_to(b_h, state_pool, INTERPRET), mask=m_h & has_slot)
    if USE_CONV:
        tl.debug_barrier()
        _store_tails(tails + q0 * (W - 1), b_win_q, o_k, m_k, has_slot, W, BW, INTERPRET)
        _store_tails(tails + k0 * (W - 1), b_win_k, o_k, m_k, has_slot, W, BW, INTERPRET)

    # 5. the RMSNorm's scale, once the whole row is known
    b_y = tl.reshape(b_y, [BNV * BV]) * tl.rsqrt(b_ss / V + eps)
    o_out = tl.arange(0, BNV * BV)  # column within the head
    p_out = out + i_n64 * stride_out + i_h * V + o_out
    tl.store(p_out, cast_to(b_y, out, INTERPRET), mask=o_out < V)


def _rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """x ``[N, D]`` with a unit last stride (rows may be strided: slices of a wider projection)."""
    return x if x is None or x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _filters(w: torch.Tensor) -> torch.Tensor:
    """A depthwise filter ``[C, W]`` or ``[C, 1, W]`` as a contiguous ``[C, W]`` (a view of a contiguous one)."""
    return w.reshape(w.shape[0], w.shape[-1]).contiguous()


def kda_decode_step_triton(
    qkv: torch.Tensor,
    f_low: torch.Tensor,
    beta_logits: torch.Tensor,
    g_low: torch.Tensor | None,
    conv_pool: torch.Tensor | None,
    conv_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    f_b_weight: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state_pool: torch.Tensor,
    slots: torch.Tensor,
    norm_weight: torch.Tensor,
    g_b_weight: torch.Tensor | None,
    eps: float,
    scale: float,
    launch: DecodeLaunch | None = None,
) -> torch.Tensor:
    """The fused decode step in one Triton launch. Called by ``kda_decode_step(backend="triton")``, which
    validates the arguments (see its docstring for shapes and dtypes); ``launch`` overrides the shape-chosen
    settings (benchmarks, tests). Returns ``[N, H * V]`` in qkv's dtype; updates ``conv_pool`` and ``state_pool``
    (both contiguous) in place."""
    N = qkv.shape[0]
    _, H, K, V = state_pool.shape
    out = new_buffer(N, H * V, device=qkv.device, dtype=qkv.dtype)
    if N == 0:
        return out
    use_conv = conv_pool is not None
    use_output_gate = g_low is not None
    W = conv_weights[0].shape[-1] if use_conv else 1
    w_q, w_k, w_v = (_filters(w) for w in conv_weights) if use_conv else (None, None, None)
    qkv, f_low, beta_logits, g_low = (_rows(x) for x in (qkv, f_low, beta_logits, g_low))
    R_F = f_low.shape[1]
    R_G = g_low.shape[1] if use_output_gate else 1
    launch = launch or default_launch(K, V, max(R_F, R_G))
    NV = triton.cdiv(V, launch.block_v)
    _kda_decode_step_kernel[(N * H,)](
        qkv, f_low, beta_logits, g_low, conv_pool, w_q, w_k, w_v, f_b_weight.contiguous(),
        A_log.reshape(-1).contiguous(), dt_bias.reshape(-1).contiguous(), state_pool, slots,
        norm_weight.contiguous(), None if g_b_weight is None else g_b_weight.contiguous(), out,
        float(eps), float(scale), state_pool.shape[0], qkv.stride(0), f_low.stride(0), beta_logits.stride(0),
        g_low.stride(0) if use_output_gate else 0, out.stride(0),
        H=H, K=K, V=V, W=W, R_F=R_F, R_G=R_G, BK=triton.next_power_of_2(K), BV=launch.block_v, NV=NV,
        BNV=triton.next_power_of_2(NV), BW=triton.next_power_of_2(W), BR=launch.block_r,
        USE_CONV=use_conv, SCALAR_GATE=f_b_weight.shape[0] == H and K > 1, USE_OUTPUT_GATE=use_output_gate,
        L2_EPS=L2NORM_EPS, SP_THRESHOLD=SOFTPLUS_THRESHOLD, INTERPRET=interpreting(),
        num_warps=launch.num_warps,
    )
    return out
