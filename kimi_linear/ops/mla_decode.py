"""Absorbed MLA decode attention: one query token per sequence against its cached latents.

With kv_b_proj absorbed into the query and the output, every head of a sequence attends over the same cache
rows — the normalised latent ``c_s [r]`` and the shared ``k_pe_s [dr]`` — so decode is MQA over a 576-wide key
(r = 512, dr = 64 in the release) whose values are the first r columns of that key:

    score[h, s] = q_latent[h] · c_s + q_pe[h] · k_pe_s              for s < length
    o_latent[h] = sum_s softmax_s(scale · score[h, :])  c_s           [H, r]

``mla_decode_attention`` dispatches to a Triton flash-decoding kernel on CUDA (``mla_decode_triton``,
imported only when it runs) and to the readable PyTorch reference ``mla_decode_attention_reference`` elsewhere.

The caches are either dense, ``[B, L_max, ·]`` (row b is sequence b), or paged: ``[num_blocks, block_size, ·]``
with a ``block_table [B, M]`` naming the blocks of each sequence in order (position p of sequence b lives in
block ``block_table[b, p // block_size]`` at offset ``p % block_size``; L_max = M * block_size).

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
  ``default_launch``). Other sizes work (the tests run H = 2..4, r = 32..64) but one program holds ``[r, H]`` fp32
  accumulators and two ``[BLOCK_S, r]`` tiles, so much larger H * r needs a new build report
  (``benchmarks/mla_decode.py --build-report``).
* ``lengths`` values are trusted, not checked on the host (that would sync): they are clamped to [0, L_max]
  on the device. A row of length 0 returns zeros (both backends).
* Offsets into the caches are int64, so caches over 2^31 elements work.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch

from kimi_linear.ops.kda.chunk import resolve_backend

# Split-K only while each piece keeps at least this many positions (two 64-position tiles): a piece also
# writes an [H, r] fp32 partial (64 KiB at the release shape) that the merge reads back.
MIN_TOKENS_PER_SPLIT = 128
MAX_SPLITS = 512


@dataclass(frozen=True)
class MLADecodeLaunch:
    """Launch settings of the Triton path (``default_launch`` picks them; benchmarks sweep with
    ``dataclasses.replace``).

    Attributes:
        block_s: cache positions per tile of the split kernel (a paged cache's block size must be a multiple).
        num_warps, num_stages: of the split kernel.
        num_splits: pieces each sequence is split into; None = ``default_num_splits`` (shapes only).
        poison_outputs: fill every buffer the kernels write with NaN first (tests: an unwritten element shows).
    """

    block_s: int
    num_warps: int
    num_stages: int
    num_splits: int | None = None
    poison_outputs: bool = False


def default_launch(element_size: int) -> MLADecodeLaunch:
    """Launch settings for caches of ``element_size`` bytes, chosen with the offline sm_90 build report
    (``benchmarks/mla_decode.py --build-report``) at H = 32, r = 512, dr = 64.

    16-bit: 64-position tiles make every dot a wgmma (M >= 64), two stages keep the next [64, 512] tile in
    flight during this one's math (188 registers, no spills, 188416 B of shared memory; three stages would
    need 262144, over the H200's 232448). fp32 caches (tests) use exact fp32 dots without tensor cores:
    16-position tiles fit in registers there.
    """
    if element_size == 4:
        return MLADecodeLaunch(block_s=16, num_warps=8, num_stages=2)
    return MLADecodeLaunch(block_s=64, num_warps=8, num_stages=2)


def mla_decode_attention_reference(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    latent_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """The spec: absorbed MLA decode attention in plain PyTorch (kv_b_proj absorbed).

    Same arguments and result as ``mla_decode_attention``; a paged cache is first gathered into the dense
    ``[B, L_max, ·]`` form through ``block_table``. The dots run in the caches' dtype (the query is
    cast to it), the softmax in fp32 over the whole ``L_max`` axis with positions ``>= lengths[b]`` masked
    out, and the probabilities are cast back to the cache dtype for the value dot. Memory: an fp32
    ``[B, H, L_max]`` score tensor (and the softmax's copy of it).
    """
    if block_table is not None:
        B = block_table.shape[0]
        latent_cache = latent_cache[block_table].reshape(B, -1, latent_cache.shape[-1])  # [B, L_max, r]
        pe_cache = pe_cache[block_table].reshape(B, -1, pe_cache.shape[-1])
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
    block_table: torch.Tensor | None = None,
    launch: MLADecodeLaunch | None = None,
) -> torch.Tensor:
    """Softmax attention of one query token per sequence over its cached MLA latents (absorbed decode).

    Args:
        q_latent: ``[B, H, r]`` — the no-rope query part already multiplied by W_uk (float dtype).
        q_pe: ``[B, H, dr]`` — the rope query part (NoPE: not rotated, but still part of the key).
        latent_cache: ``[B, L_max, r]`` — the normalised latents of each sequence (bf16/fp16/fp32), unit
            stride on the last dim; with ``block_table``, the block pool ``[num_blocks, block_size, r]``.
        pe_cache: ``[B, L_max, dr]`` (or ``[num_blocks, block_size, dr]``) — the shared key part, same dtype
            as ``latent_cache``, unit last stride.
        lengths: int ``[B]`` — how many leading cache positions of each row are valid, the current token
            included (``MultiheadLatentAttention.decode`` writes the new token at ``cache.lengths`` and passes
            ``cache.lengths + 1``). Values outside ``[0, L_max]`` are clamped; a row of length 0 yields zeros.
        scale: softmax scale (``(dn + dr) ** -0.5`` in MLA).
        backend: "auto" (Triton for CUDA tensors when Triton is installed, torch otherwise), "triton" (CUDA,
            or CPU under TRITON_INTERPRET=1) or "torch" (the reference).
        num_splits: Triton only — pieces each sequence is split into (default: from B, L_max and the SM
            count); overrides ``launch.num_splits``.
        block_table: int ``[B, M]`` — the paged layout's blocks of each sequence (L_max = M * block_size;
            block_size a multiple of the launch's ``block_s``, 64 for 16-bit caches, unless M = 1); entries
            past a sequence's length are never read. None: dense caches.
        launch: Triton only — launch settings (default ``default_launch`` of the cache element size).

    Returns:
        ``o_latent [B, H, r]`` in the caches' dtype: the softmax-weighted sum of the latents per head.

    Raises:
        ValueError: shapes that do not match, an unknown backend, or backend="triton" without CUDA or the
            interpreter.
        TypeError: non-float queries or caches, caches of different dtypes, or non-integer lengths.
    """
    _validate(q_latent, q_pe, latent_cache, pe_cache, lengths, block_table)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    backend = resolve_backend(backend, latent_cache)
    if torch.compiler.is_compiling():
        # Opaque to torch.compile (Dynamo cannot trace the Triton launch): the registered op, default launch.
        if launch is not None:
            raise ValueError("launch cannot be given under torch.compile (the registered op takes num_splits only)")
        return torch.ops.kimi_linear.mla_decode_attention(
            q_latent, q_pe, latent_cache, pe_cache, lengths, float(scale), backend, block_table, num_splits
        )
    return _mla_decode_core(q_latent, q_pe, latent_cache, pe_cache, lengths, scale, backend, block_table, num_splits,
                            launch)


def _mla_decode_core(q_latent, q_pe, latent_cache, pe_cache, lengths, scale, backend, block_table, num_splits,
                     launch=None) -> torch.Tensor:
    """``mla_decode_attention`` on validated arguments and a resolved backend."""
    if backend == "triton":
        from kimi_linear.ops.mla_decode_triton import mla_decode_attention_triton

        launch = launch or default_launch(latent_cache.element_size())
        if num_splits is not None:
            launch = replace(launch, num_splits=num_splits)
        return mla_decode_attention_triton(
            q_latent, q_pe, latent_cache, pe_cache, lengths, scale, launch, block_table
        )
    return mla_decode_attention_reference(q_latent, q_pe, latent_cache, pe_cache, lengths, scale, block_table)


@torch.library.custom_op("kimi_linear::mla_decode_attention", mutates_args=())
def _mla_decode_op(
    q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, pe_cache: torch.Tensor,
    lengths: torch.Tensor, scale: float, backend: str, block_table: torch.Tensor | None, num_splits: int | None,
) -> torch.Tensor:
    """What torch.compile sees in place of ``mla_decode_attention`` (called by it while compiling)."""
    return _mla_decode_core(q_latent, q_pe, latent_cache, pe_cache, lengths, scale, backend, block_table, num_splits)


@_mla_decode_op.register_fake
def _(q_latent, q_pe, latent_cache, pe_cache, lengths, scale, backend, block_table, num_splits):
    return q_latent.new_empty(q_latent.shape, dtype=latent_cache.dtype)


def _validate(q_latent, q_pe, latent_cache, pe_cache, lengths, block_table=None) -> None:
    if q_latent.dim() != 3 or latent_cache.dim() != 3:
        raise ValueError(
            f"q_latent must be [B, H, r] and latent_cache [B, L_max, r]; got {tuple(q_latent.shape)} and "
            f"{tuple(latent_cache.shape)}"
        )
    B, H, r = q_latent.shape
    L_max = latent_cache.shape[1]
    rows = B
    if block_table is not None:
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table must be [B={B}, M], got {tuple(block_table.shape)}")
        if block_table.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"block_table must be int32 or int64, got {block_table.dtype}")
        rows = latent_cache.shape[0]
    if latent_cache.shape != (rows, L_max, r):
        raise ValueError(f"latent_cache must be [B={B}, L_max, r={r}], got {tuple(latent_cache.shape)}")
    if q_pe.dim() != 3 or q_pe.shape[:2] != (B, H):
        raise ValueError(f"q_pe must be [B={B}, H={H}, dr], got {tuple(q_pe.shape)}")
    dr = q_pe.shape[2]
    if pe_cache.shape != (rows, L_max, dr):
        raise ValueError(f"pe_cache must be [{rows}, {L_max}, dr={dr}], got {tuple(pe_cache.shape)}")
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
    tensors = (q_latent, q_pe, latent_cache, pe_cache, lengths) + (() if block_table is None else (block_table,))
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


# ---- split count ------------------------------------------------------------------------------------------------


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
