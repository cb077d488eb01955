"""Triton kernels of the absorbed MLA decode attention (``mla_decode`` holds the contract, the reference and
the launch settings; this module is imported only when the Triton path runs).

``_mla_decode_split_kernel`` (grid ``(B, num_splits)``) and ``_mla_decode_combine_kernel`` (grid ``(B * H, r /
BLOCK_R)``): see ``mla_decode``'s module docstring for the algorithm. A paged cache (``PAGED``) is read through
the block table one tile at a time: a tile's BLOCK_S positions start at a multiple of BLOCK_S, and the block
size is a multiple of BLOCK_S, so each tile lies inside one block whose index is loaded once per tile.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kimi_linear.ops.mla_decode import MAX_SPLITS, MLADecodeLaunch, _num_sms, default_launch, default_num_splits

LOG2E = math.log2(math.e)
COMBINE_BLOCK_R = 128


def _new_buffer(shape: tuple, dtype: torch.dtype, device: torch.device, poison: bool) -> torch.Tensor:
    buffer = torch.empty(shape, dtype=dtype, device=device)
    return buffer.fill_(float("nan")) if poison else buffer


def _pad(n: int) -> int:
    """A power of two >= n and >= 16 (tl.dot needs every dim >= 16)."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b in fp32. Triton 3.6's interpreter multiplies bf16 operands as their raw 16-bit
    patterns, so there the operands are widened to fp32 first: the same result, as bf16 x bf16 products
    are exact in fp32 (the GPU's tensor cores accumulate them in fp32 too)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PREC)

@triton.jit
def _mla_decode_tile(
    b_m, b_l, b_accT, b_qT, b_qpT, latent, k_pe, bt_row, i_b64, s, end, o_r, o_d, m_r, m_d,
    scale_log2, stride_lb, stride_ls, stride_kb, stride_ks,
    BLOCK_S: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, DOT_PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One online-softmax step over positions [s, min(s + BLOCK_S, end)) of a sequence, all heads at once.

    b_m, b_l: ``[BH]`` running max and sum (base 2); b_accT: ``[BR, BH]`` running output, transposed.
    Dense caches: row ``i_b64``; paged: the block ``bt_row[s // PAGE]`` holds the whole tile.
    """
    if PAGED:
        blk = tl.load(bt_row + s // PAGE).to(tl.int64)
        latent_row = latent + blk * stride_lb
        pe_row = k_pe + blk * stride_kb
        s_in = s % PAGE
    else:
        latent_row = latent + i_b64 * stride_lb
        pe_row = k_pe + i_b64 * stride_kb
        s_in = s
    o_s = s + tl.arange(0, BLOCK_S)
    m_s = o_s < end
    o_s64 = (s_in + tl.arange(0, BLOCK_S)).to(tl.int64)
    p_lat = latent_row + o_s64[:, None] * stride_ls + o_r[None, :]
    b_lat = tl.load(p_lat, mask=m_s[:, None] & m_r[None, :], other=0.0)  # [BLOCK_S, BR]
    p_pe = pe_row + o_s64[:, None] * stride_ks + o_d[None, :]
    b_pe = tl.load(p_pe, mask=m_s[:, None] & m_d[None, :], other=0.0)  # [BLOCK_S, BDR]
    b_sT = _dot(b_lat, b_qT, tl.zeros([BLOCK_S, b_qT.shape[1]], dtype=tl.float32), DOT_PREC, INTERPRET)
    b_sT = _dot(b_pe, b_qpT, b_sT, DOT_PREC, INTERPRET)  # [BLOCK_S, BH] fp32
    b_sT = tl.where(m_s[:, None], b_sT * scale_log2, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_sT, 0))
    b_alpha = tl.exp2(b_m - b_m_new)  # 0 on the first tile
    b_pT = tl.exp2(b_sT - b_m_new[None, :])  # [BLOCK_S, BH], 0 at masked positions
    b_l = b_l * b_alpha + tl.sum(b_pT, 0)
    b_accT = b_accT * b_alpha[None, :]
    b_accT = _dot(tl.trans(b_lat), b_pT.to(b_lat.dtype), b_accT, DOT_PREC, INTERPRET)  # [BR, BH]
    return b_m_new, b_l, b_accT

@triton.jit
def _mla_decode_split_kernel(
    q_latent, q_pe, latent, k_pe, lengths, block_table, o_part, lse_part, o,
    scale_log2, L_max, num_splits,
    stride_qb, stride_qh, stride_pb, stride_ph,
    stride_lb, stride_ls, stride_kb, stride_ks, stride_bt,
    H: tl.constexpr, R: tl.constexpr, DR: tl.constexpr,
    BH: tl.constexpr, BR: tl.constexpr, BDR: tl.constexpr, BLOCK_S: tl.constexpr,
    PAGE: tl.constexpr, PAGED: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Program (b, j): online-softmax attention of all H heads of sequence b over its j-th piece.

    Writes ``o_part[b, j] [H, R]`` fp32, the piece's output divided by its own softmax sum, and
    ``lse_part[b, j] [H]`` fp32, the piece's log2-sum-exp2 of the base-2 scaled scores (-inf for an empty
    piece, whose o_part is zeros); or, with SINGLE_SPLIT (num_splits == 1), the final ``o[b] [H, R]`` in
    o's dtype.
    """
    i_b, i_j = tl.program_id(0), tl.program_id(1)
    i_b64 = i_b.to(tl.int64)
    length = tl.minimum(tl.maximum(tl.load(lengths + i_b).to(tl.int32), 0), L_max)
    # Equal pieces of the valid prefix, rounded up to whole tiles; the last ones may be short or empty.
    piece = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_S) * BLOCK_S
    start = i_j * piece
    end = tl.minimum(start + piece, length)

    o_h = tl.arange(0, BH)
    o_r = tl.arange(0, BR)
    o_d = tl.arange(0, BDR)
    m_h, m_r, m_d = o_h < H, o_r < R, o_d < DR
    dtype = latent.dtype.element_ty
    # Heads on the N axis of both dots and positions / latent channels on M: the tiles are then the
    # A operands (from shared memory) and M >= 64 allows Hopper's wgmma; heads on M (M = H = 32) would
    # force mma.sync with the whole query replicated in every warp's registers.
    p_q = q_latent + i_b64 * stride_qb + o_h[None, :] * stride_qh + o_r[:, None]
    b_qT = tl.load(p_q, mask=m_h[None, :] & m_r[:, None], other=0.0).to(dtype)  # [BR, BH]
    p_qp = q_pe + i_b64 * stride_pb + o_h[None, :] * stride_ph + o_d[:, None]
    b_qpT = tl.load(p_qp, mask=m_h[None, :] & m_d[:, None], other=0.0).to(dtype)  # [BDR, BH]

    b_m = tl.full([BH], float("-inf"), dtype=tl.float32)  # running max of the base-2 scores
    b_l = tl.zeros([BH], dtype=tl.float32)  # running sum of exp2(score - max)
    b_accT = tl.zeros([BR, BH], dtype=tl.float32)
    bt_row = block_table + i_b64 * stride_bt
    # Every tile holds at least one valid position, so b_m is finite after the first: no -inf - (-inf).
    n_tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_S)
    if INTERPRET:  # the interpreter cannot take a loaded run-time bound in range() (numpy 2)
        i_t = 0
        while i_t < n_tiles:
            b_m, b_l, b_accT = _mla_decode_tile(
                b_m, b_l, b_accT, b_qT, b_qpT, latent, k_pe, bt_row, i_b64, start + i_t * BLOCK_S, end, o_r,
                o_d, m_r, m_d, scale_log2, stride_lb, stride_ls, stride_kb, stride_ks, BLOCK_S, PAGE, PAGED,
                DOT_PREC, INTERPRET)
            i_t += 1
    else:  # a for loop, which Triton software-pipelines (the next tiles' loads overlap this tile's math)
        for i_t in range(n_tiles):
            b_m, b_l, b_accT = _mla_decode_tile(
                b_m, b_l, b_accT, b_qT, b_qpT, latent, k_pe, bt_row, i_b64, start + i_t * BLOCK_S, end, o_r,
                o_d, m_r, m_d, scale_log2, stride_lb, stride_ls, stride_kb, stride_ks, BLOCK_S, PAGE, PAGED,
                DOT_PREC, INTERPRET)

    b_outT = b_accT / tl.where(b_l > 0, b_l, 1.0)[None, :]  # an empty piece: zeros, not 0/0
    m_out = m_r[:, None] & m_h[None, :]
    if SINGLE_SPLIT:
        p_o = o + (i_b64 * H + o_h[None, :]) * R + o_r[:, None]
        tl.store(p_o, b_outT.to(o.dtype.element_ty), mask=m_out)
    else:
        i_bj = i_b64 * num_splits + i_j
        p_o = o_part + (i_bj * H + o_h[None, :]) * R + o_r[:, None]
        tl.store(p_o, b_outT, mask=m_out)
        b_lse = tl.where(b_l > 0, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), float("-inf"))
        tl.store(lse_part + i_bj * H + o_h, b_lse, mask=m_h)

@triton.jit
def _combine_block(b_acc, o_part, lse_part, b_norm, j, num_splits, i_b64, i_h, o_r, m_r,
                   H: tl.constexpr, R: tl.constexpr, SB: tl.constexpr):
    """b_acc + the weighted partial outputs of pieces [j, j + SB): one [SB, BLOCK_R] load in flight."""
    o_jb = j + tl.arange(0, SB)
    m_jb = o_jb < num_splits
    i_bj = i_b64 * num_splits + o_jb
    b_w = tl.exp2(tl.load(lse_part + i_bj * H + i_h, mask=m_jb, other=float("-inf")) - b_norm)  # [SB]
    p_o = o_part + (i_bj[:, None] * H + i_h) * R + o_r[None, :]
    b_o = tl.load(p_o, mask=m_jb[:, None] & m_r[None, :], other=0.0)  # [SB, BLOCK_R]
    return b_acc + tl.sum(b_w[:, None] * b_o, 0)

@triton.jit
def _mla_decode_combine_kernel(
    o_part, lse_part, o, num_splits,
    H: tl.constexpr, R: tl.constexpr, BSPLIT: tl.constexpr, BLOCK_R: tl.constexpr, SB: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (b * H + h, i_r): ``o[b, h, i_r-th BLOCK_R slice]`` = sum_j w_j o_part[b, j, h, slice] with
    w_j = exp2(lse_j - lse), lse = log2 sum_j exp2(lse_j): the softmax over all pieces. Empty pieces
    (lse_j = -inf) weigh 0; a row whose pieces are all empty (length 0) gets zeros."""
    i_bh, i_r = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_b64 = i_b.to(tl.int64)
    o_j = tl.arange(0, BSPLIT)
    b_lse = tl.load(lse_part + (i_b64 * num_splits + o_j) * H + i_h, mask=o_j < num_splits,
                    other=float("-inf"))  # [BSPLIT]
    b_max = tl.max(b_lse, 0)
    b_max = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_total = tl.sum(tl.exp2(b_lse - b_max), 0)
    b_norm = b_max + tl.log2(tl.where(b_total > 0, b_total, 1.0))

    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R
    b_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if INTERPRET:  # the interpreter cannot take a run-time bound in range() (numpy 2)
        j = 0
        while j < num_splits:
            b_acc = _combine_block(b_acc, o_part, lse_part, b_norm, j, num_splits, i_b64, i_h, o_r, m_r,
                                   H, R, SB)
            j += SB
    else:  # a for loop, which the compiler pipelines
        for j in range(0, num_splits, SB):
            b_acc = _combine_block(b_acc, o_part, lse_part, b_norm, j, num_splits, i_b64, i_h, o_r, m_r,
                                   H, R, SB)
    tl.store(o + (i_b64 * H + i_h) * R + o_r, b_acc.to(o.dtype.element_ty), mask=m_r)


def mla_decode_attention_triton(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    latent_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    launch: MLADecodeLaunch,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton path of ``mla_decode.mla_decode_attention`` (which validates the arguments; see it for the
    contract), with its launch settings ``launch``."""
    B, H, R = q_latent.shape
    DR = pe_cache.shape[2]
    if latent_cache.stride(-1) != 1 or pe_cache.stride(-1) != 1:
        raise ValueError("latent_cache and pe_cache need a unit stride on their last dim")
    q_latent = q_latent if q_latent.stride(-1) == 1 else q_latent.contiguous()
    q_pe = q_pe if q_pe.stride(-1) == 1 else q_pe.contiguous()
    page = latent_cache.shape[1]
    if block_table is None:
        L_max, paged = page, False
        block_table = lengths  # not read
    else:
        L_max, paged = block_table.shape[1] * page, True
        if block_table.shape[1] > 1 and page % launch.block_s:
            raise ValueError(
                f"a paged cache's block size ({page}) must be a multiple of the tile size block_s "
                f"({launch.block_s})"
            )
    num_splits = launch.num_splits
    if num_splits is None:
        num_splits = default_num_splits(B, L_max, _num_sms(latent_cache.device))
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")

    dtype = latent_cache.dtype
    poison = launch.poison_outputs
    o = _new_buffer((B, H, R), dtype, latent_cache.device, poison)
    if num_splits > 1:
        o_part = _new_buffer((B, num_splits, H, R), torch.float32, o.device, poison)
        lse_part = _new_buffer((B, num_splits, H), torch.float32, o.device, poison)
    else:
        o_part = lse_part = o  # not touched with one piece
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    _mla_decode_split_kernel[(B, num_splits)](
        q_latent, q_pe, latent_cache, pe_cache, lengths, block_table, o_part, lse_part, o,
        scale * LOG2E, L_max, num_splits,
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1),
        latent_cache.stride(0), latent_cache.stride(1), pe_cache.stride(0), pe_cache.stride(1),
        block_table.stride(0),
        H=H, R=R, DR=DR, BH=_pad(H), BR=_pad(R), BDR=_pad(DR), BLOCK_S=launch.block_s,
        PAGE=page if paged else 1, PAGED=paged,
        SINGLE_SPLIT=num_splits == 1, DOT_PREC="ieee" if dtype == torch.float32 else "tf32",
        INTERPRET=interpret, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    if num_splits > 1:
        block_r = min(COMBINE_BLOCK_R, triton.next_power_of_2(R))
        _mla_decode_combine_kernel[(B * H, triton.cdiv(R, block_r))](
            o_part, lse_part, o, num_splits, H=H, R=R, BSPLIT=triton.next_power_of_2(num_splits),
            BLOCK_R=block_r, SB=min(16, triton.next_power_of_2(num_splits)),
            INTERPRET=interpret, num_warps=4, num_stages=2,
        )
    return o


def sm90_build_jobs(H: int, R: int, DR: int, num_splits: int = 132, element_size: int = 2) -> list:
    """(kernel, constexprs, num_warps, num_stages) as the launcher uses them for caches of ``element_size``
    bytes (2: bf16/fp16, 4: fp32), for the offline sm_90 build report of ``benchmarks/mla_decode.py``."""
    config = default_launch(element_size)
    split = dict(H=H, R=R, DR=DR, BH=_pad(H), BR=_pad(R), BDR=_pad(DR), BLOCK_S=config.block_s,
                 PAGE=1, PAGED=False, SINGLE_SPLIT=False, DOT_PREC="ieee" if element_size == 4 else "tf32", INTERPRET=False)
    block_r = min(COMBINE_BLOCK_R, triton.next_power_of_2(R))
    combine = dict(H=H, R=R, BSPLIT=triton.next_power_of_2(num_splits), BLOCK_R=block_r,
                   SB=min(16, triton.next_power_of_2(num_splits)), INTERPRET=False)
    warps, stages = config.num_warps, config.num_stages
    return [
        (_mla_decode_split_kernel, split, warps, stages),
        (_mla_decode_split_kernel, dict(split, SINGLE_SPLIT=True), warps, stages),
        (_mla_decode_combine_kernel, combine, 4, 2),
    ]
