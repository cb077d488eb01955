"""Absorbed MLA decode attention: one query token per sequence against its cached latents (DESIGN.md §3).

With kv_b_proj absorbed into the query and the output, every head of a sequence attends over the same cache
rows — the normalised latent ``c_s [r]`` and the shared ``k_pe_s [dr]`` — so decode is MQA over a 576-wide key
(r = 512, dr = 64 in the release) whose values are the first r columns of that key:

    score[h, s] = q_latent[h] · c_s + q_pe[h] · k_pe_s              for s < length
    o_latent[h] = sum_s softmax_s(scale · score[h, :])  c_s           [H, r]

``mla_decode_attention`` dispatches to a Triton flash-decoding kernel on CUDA and to the readable PyTorch
reference ``mla_decode_attention_reference`` elsewhere.

The Triton path is two launches, both with grids that depend on shapes only (no host sync, no allocation
whose size depends on tensor values: CUDA-graph capturable once compiled):

1. ``_mla_decode_split_kernel``, grid ``(B, num_splits)``. Program (b, j) takes the j-th of num_splits equal
   pieces of sequence b's ``length`` valid positions (split-K, so a single long sequence still fills the GPU).
   It keeps all heads' queries on chip (in shared memory) and walks its piece in tiles of BLOCK_S positions:
   each ``[BLOCK_S, r]`` latent tile is loaded once and shared by every head. Both dots put the heads on the
   N axis — scores ``[BLOCK_S, r] x [r, H]`` (plus the rope part), output ``[r, BLOCK_S] x [BLOCK_S, H]``
   accumulated transposed as ``[r, H]`` — so M = BLOCK_S or r >= 64 and Hopper's wgmma reads the tile straight
   from shared memory (with the heads on M, M = 32 would force mma.sync and replicate the query in every
   warp's registers). Softmax is online in fp32 (base-2 exponentials, the scale folded in).
   It writes its partial output, normalised by its own sum, and its log-sum-exp. A piece past the length
   writes lse = -inf and zeros. With num_splits = 1 the program writes the final output directly and the
   second launch is skipped.
2. ``_mla_decode_combine_kernel``, grid ``(B * H, r / BLOCK_R)``: the log-sum-exp merge of the partial
   outputs.

Limits and caveats:

* Caches are read in their dtype (bf16 on the GPU; fp16 and fp32 work too); the query is cast to the cache
  dtype for the dots (as the reference does), and the probabilities to the cache dtype for the value dot.
  Scores, softmax statistics and accumulators are fp32. fp32 caches use exact fp32 dots (no TF32).
* Tuned and checked offline for sm_90 at the release shape (H = 32, r = 512, dr = 64, 16-bit caches: see
  ``CONFIG``). Other sizes work (the tests run H = 2..4, r = 32..64) but one program holds ``[r, H]`` fp32
  accumulators and two ``[BLOCK_S, r]`` tiles, so much larger H * r needs a new build report
  (``benchmarks/mla_decode.py --build-report``).
* ``lengths`` values are trusted, not checked on the host (that would sync): they are clamped to [0, L_max]
  on the device. A row of length 0 returns zeros (both backends).
* Offsets into the caches are int64, so caches over 2^31 elements work.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from kimi_linear.ops.kda.chunk import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference works without Triton
    triton = None

LOG2E = math.log2(math.e)
# Split-K only while each piece keeps at least this many positions (two 64-position tiles): a piece also
# writes an [H, r] fp32 partial (64 KiB at the release shape) that the merge reads back.
MIN_TOKENS_PER_SPLIT = 128
MAX_SPLITS = 512
# Tests set this to fill every buffer the kernels write with NaN first, so an unwritten element shows.
POISON_BUFFERS = False


def mla_decode_attention_reference(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    latent_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The spec: absorbed MLA decode attention in plain PyTorch (DESIGN.md §3, "absorb kv_b_proj").

    Same arguments and result as ``mla_decode_attention``. The dots run in the caches' dtype (the query is
    cast to it), the softmax in fp32 over the whole ``L_max`` axis with positions ``>= lengths[b]`` masked
    out, and the probabilities are cast back to the cache dtype for the value dot. Memory: an fp32
    ``[B, H, L_max]`` score tensor (and the softmax's copy of it).
    """
    scores = torch.einsum("bhr,bsr->bhs", q_latent.to(latent_cache.dtype), latent_cache).float()
    scores = scores + torch.einsum("bhd,bsd->bhs", q_pe.to(pe_cache.dtype), pe_cache).float()  # [B, H, L_max]
    key_pos = torch.arange(latent_cache.shape[1], device=latent_cache.device)
    valid = key_pos[None, None, :] < lengths[:, None, None]  # [B, 1, L_max]
    probs = torch.softmax((scores * scale).masked_fill(~valid, float("-inf")), dim=-1)
    o_latent = torch.einsum("bhs,bsr->bhr", probs.to(latent_cache.dtype), latent_cache)  # [B, H, r]
    # an empty row's softmax is 0/0: its output is defined as zeros, as the kernel writes
    return torch.where((lengths > 0)[:, None, None], o_latent, 0.0)


def mla_decode_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    latent_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    backend: str = "auto",
    num_splits: int | None = None,
) -> torch.Tensor:
    """Softmax attention of one query token per sequence over its cached MLA latents (absorbed decode).

    Args:
        q_latent: ``[B, H, r]`` — the no-rope query part already multiplied by W_uk (float dtype).
        q_pe: ``[B, H, dr]`` — the rope query part (NoPE: not rotated, but still part of the key).
        latent_cache: ``[B, L_max, r]`` — the normalised latents of each sequence (bf16/fp16/fp32), unit
            stride on the last dim.
        pe_cache: ``[B, L_max, dr]`` — the shared key part, same dtype as ``latent_cache``, unit last stride.
        lengths: int ``[B]`` — how many leading cache positions of each row are valid, the current token
            included (``MultiheadLatentAttention.decode`` writes the new token at ``cache.lengths`` and passes
            ``cache.lengths + 1``). Values outside ``[0, L_max]`` are clamped; a row of length 0 yields zeros.
        scale: softmax scale (``(dn + dr) ** -0.5`` in MLA).
        backend: "auto" (Triton for CUDA tensors when Triton is installed, torch otherwise), "triton" (CUDA,
            or CPU under TRITON_INTERPRET=1) or "torch" (the reference).
        num_splits: Triton only — pieces each sequence is split into (default: from B, L_max and the SM
            count).

    Returns:
        ``o_latent [B, H, r]`` in the caches' dtype: the softmax-weighted sum of the latents per head.

    Raises:
        ValueError: shapes that do not match, an unknown backend, or backend="triton" without CUDA or the
            interpreter.
        TypeError: non-float queries or caches, caches of different dtypes, or non-integer lengths.
    """
    _validate(q_latent, q_pe, latent_cache, pe_cache, lengths)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    backend = resolve_backend(backend, latent_cache)
    if backend == "triton":
        return mla_decode_attention_triton(q_latent, q_pe, latent_cache, pe_cache, lengths, scale, num_splits)
    return mla_decode_attention_reference(q_latent, q_pe, latent_cache, pe_cache, lengths, scale)


def _validate(q_latent, q_pe, latent_cache, pe_cache, lengths) -> None:
    if q_latent.dim() != 3 or latent_cache.dim() != 3:
        raise ValueError(
            f"q_latent must be [B, H, r] and latent_cache [B, L_max, r]; got {tuple(q_latent.shape)} and "
            f"{tuple(latent_cache.shape)}"
        )
    B, H, r = q_latent.shape
    L_max = latent_cache.shape[1]
    if latent_cache.shape != (B, L_max, r):
        raise ValueError(f"latent_cache must be [B={B}, L_max, r={r}], got {tuple(latent_cache.shape)}")
    if q_pe.dim() != 3 or q_pe.shape[:2] != (B, H):
        raise ValueError(f"q_pe must be [B={B}, H={H}, dr], got {tuple(q_pe.shape)}")
    dr = q_pe.shape[2]
    if pe_cache.shape != (B, L_max, dr):
        raise ValueError(f"pe_cache must be [B={B}, L_max={L_max}, dr={dr}], got {tuple(pe_cache.shape)}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be [B={B}], got {tuple(lengths.shape)}")
    named = (("q_latent", q_latent), ("q_pe", q_pe), ("latent_cache", latent_cache), ("pe_cache", pe_cache))
    for name, t in named:
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if pe_cache.dtype != latent_cache.dtype:
        raise TypeError(
            f"pe_cache ({pe_cache.dtype}) and latent_cache ({latent_cache.dtype}) must share a dtype"
        )
    if lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lengths must be int32 or int64, got {lengths.dtype}")
    devices = {t.device for t in (q_latent, q_pe, latent_cache, pe_cache, lengths)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


# ---- Triton ------------------------------------------------------------------------------------------------


def default_num_splits(B: int, L_max: int, num_sms: int) -> int:
    """Pieces per sequence, from shapes only (a captured graph stays valid for any lengths).

    A split program holds one SM alone (its shared memory and registers admit one per SM), so B * splits
    programs run in ceil(B * splits / num_sms) waves. Take one wave of B * (num_sms // B) programs when that
    keeps >= 90 % of the SMs busy (B = 1, 8, 64 on 132 SMs); otherwise the split count, up to four waves, that
    wastes the fewest SM slots in the last wave. No piece is made shorter than MIN_TOKENS_PER_SPLIT of L_max.
    """
    cap = max(1, min(MAX_SPLITS, L_max // MIN_TOKENS_PER_SPLIT))

    def busy(splits: int) -> float:  # fraction of the SM slots of all waves that have a program
        programs = B * splits
        return programs / (math.ceil(programs / num_sms) * num_sms)

    one_wave = min(cap, max(1, num_sms // B))
    if busy(one_wave) >= 0.9:
        return one_wave
    candidates = [s for s in range(1, cap + 1) if B * s <= 4 * num_sms] or [1]
    return max(candidates, key=lambda s: (busy(s), -s))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: a few pieces, so the tests exercise the merge
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _new_buffer(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    buffer = torch.empty(shape, dtype=dtype, device=device)
    return buffer.fill_(float("nan")) if POISON_BUFFERS else buffer


def _pad(n: int) -> int:
    """A power of two >= n and >= 16 (tl.dot needs every dim >= 16)."""
    return max(16, triton.next_power_of_2(n))


# Launch settings of the split kernel by cache element size, chosen with the offline sm_90 build report
# (benchmarks/mla_decode.py --build-report) at H = 32, r = 512, dr = 64. 16-bit: 64-position tiles make every
# dot a wgmma (M >= 64), two stages keep the next [64, 512] tile in flight during this one's math: 188
# registers, no spills, 188416 B of shared memory (three stages would need 262144, over the H200's 232448).
# fp32 caches (tests) use exact fp32 dots without tensor cores: 16-position tiles fit in registers there.
CONFIG = {
    2: dict(block_s=64, num_warps=8, num_stages=2),
    4: dict(block_s=16, num_warps=8, num_stages=2),
}
COMBINE_BLOCK_R = 128


if triton is not None:

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
        b_m, b_l, b_accT, b_qT, b_qpT, latent_row, pe_row, s, end, o_r, o_d, m_r, m_d,
        scale_log2, stride_ls, stride_ks,
        BLOCK_S: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """One online-softmax step over positions [s, min(s + BLOCK_S, end)) of a sequence, all heads at once.

        b_m, b_l: ``[BH]`` running max and sum (base 2); b_accT: ``[BR, BH]`` running output, transposed.
        """
        o_s = s + tl.arange(0, BLOCK_S)
        m_s = o_s < end
        o_s64 = o_s.to(tl.int64)
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
        q_latent, q_pe, latent, k_pe, lengths, o_part, lse_part, o,
        scale_log2, L_max, num_splits,
        stride_qb, stride_qh, stride_pb, stride_ph,
        stride_lb, stride_ls, stride_kb, stride_ks,
        H: tl.constexpr, R: tl.constexpr, DR: tl.constexpr,
        BH: tl.constexpr, BR: tl.constexpr, BDR: tl.constexpr, BLOCK_S: tl.constexpr,
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
        latent_row = latent + i_b64 * stride_lb
        pe_row = k_pe + i_b64 * stride_kb
        # Every tile holds at least one valid position, so b_m is finite after the first: no -inf - (-inf).
        n_tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_S)
        if INTERPRET:  # the interpreter cannot take a loaded run-time bound in range() (numpy 2)
            i_t = 0
            while i_t < n_tiles:
                b_m, b_l, b_accT = _mla_decode_tile(
                    b_m, b_l, b_accT, b_qT, b_qpT, latent_row, pe_row, start + i_t * BLOCK_S, end, o_r, o_d,
                    m_r, m_d, scale_log2, stride_ls, stride_ks, BLOCK_S, DOT_PREC, INTERPRET)
                i_t += 1
        else:  # a for loop, which Triton software-pipelines (the next tiles' loads overlap this tile's math)
            for i_t in range(n_tiles):
                b_m, b_l, b_accT = _mla_decode_tile(
                    b_m, b_l, b_accT, b_qT, b_qpT, latent_row, pe_row, start + i_t * BLOCK_S, end, o_r, o_d,
                    m_r, m_d, scale_log2, stride_ls, stride_ks, BLOCK_S, DOT_PREC, INTERPRET)

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
    num_splits: int | None = None,
    block_s: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """The Triton path of ``mla_decode_attention`` (which validates the arguments; see it for the contract).

    ``num_splits``, ``block_s``, ``num_warps``, ``num_stages``: launch overrides for benchmarking (defaults:
    ``default_num_splits`` and ``CONFIG``).
    """
    B, H, R = q_latent.shape
    L_max, DR = latent_cache.shape[1], pe_cache.shape[2]
    if latent_cache.stride(-1) != 1 or pe_cache.stride(-1) != 1:
        raise ValueError("latent_cache and pe_cache need a unit stride on their last dim")
    q_latent = q_latent if q_latent.stride(-1) == 1 else q_latent.contiguous()
    q_pe = q_pe if q_pe.stride(-1) == 1 else q_pe.contiguous()
    if num_splits is None:
        num_splits = default_num_splits(B, L_max, _num_sms(latent_cache.device))
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    config = CONFIG[latent_cache.element_size()]
    block_s = block_s or config["block_s"]
    num_warps = num_warps or config["num_warps"]
    num_stages = num_stages or config["num_stages"]

    dtype = latent_cache.dtype
    o = _new_buffer((B, H, R), dtype, latent_cache.device)
    if num_splits > 1:
        o_part = _new_buffer((B, num_splits, H, R), torch.float32, o.device)
        lse_part = _new_buffer((B, num_splits, H), torch.float32, o.device)
    else:
        o_part = lse_part = o  # not touched with one piece
    _mla_decode_split_kernel[(B, num_splits)](
        q_latent, q_pe, latent_cache, pe_cache, lengths, o_part, lse_part, o,
        scale * LOG2E, L_max, num_splits,
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1),
        latent_cache.stride(0), latent_cache.stride(1), pe_cache.stride(0), pe_cache.stride(1),
        H=H, R=R, DR=DR, BH=_pad(H), BR=_pad(R), BDR=_pad(DR), BLOCK_S=block_s,
        SINGLE_SPLIT=num_splits == 1, DOT_PREC="ieee" if dtype == torch.float32 else "tf32",
        INTERPRET=os.environ.get("TRITON_INTERPRET") == "1", num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        block_r = min(COMBINE_BLOCK_R, triton.next_power_of_2(R))
        _mla_decode_combine_kernel[(B * H, triton.cdiv(R, block_r))](
            o_part, lse_part, o, num_splits, H=H, R=R, BSPLIT=triton.next_power_of_2(num_splits),
            BLOCK_R=block_r, SB=min(16, triton.next_power_of_2(num_splits)),
            INTERPRET=os.environ.get("TRITON_INTERPRET") == "1", num_warps=4, num_stages=2,
        )
    return o


def sm90_build_jobs(H: int, R: int, DR: int, num_splits: int = 132, element_size: int = 2) -> list:
    """(kernel, constexprs, num_warps, num_stages) as the launcher uses them for caches of ``element_size``
    bytes (2: bf16/fp16, 4: fp32), for the offline sm_90 build report of ``benchmarks/mla_decode.py``."""
    config = CONFIG[element_size]
    split = dict(H=H, R=R, DR=DR, BH=_pad(H), BR=_pad(R), BDR=_pad(DR), BLOCK_S=config["block_s"],
                 SINGLE_SPLIT=False, DOT_PREC="ieee" if element_size == 4 else "tf32", INTERPRET=False)
    block_r = min(COMBINE_BLOCK_R, triton.next_power_of_2(R))
    combine = dict(H=H, R=R, BSPLIT=triton.next_power_of_2(num_splits), BLOCK_R=block_r,
                   SB=min(16, triton.next_power_of_2(num_splits)), INTERPRET=False)
    warps, stages = config["num_warps"], config["num_stages"]
    return [
        (_mla_decode_split_kernel, split, warps, stages),
        (_mla_decode_split_kernel, dict(split, SINGLE_SPLIT=True), warps, stages),
        (_mla_decode_combine_kernel, combine, 4, 2),
    ]
