"""Host-side pieces shared by the chunk KDA launchers: the chunk sizes, the packed layout, and the shared-memory
fallback of the sequential passes (``launch_fitting``)."""

from __future__ import annotations

import functools

import torch

from kimi_linear.ops.varlen import host_to_device, sequence_lengths


CHUNK = 64
SUB_CHUNK = 16


class _Layout:
    """Where each sequence and chunk lives in the packed ``[T_total, ...]`` tensors (``lengths``: the sequences'
    token counts, on the host)."""

    def __init__(self, lengths: tuple[int, ...], device: torch.device):
        counts = [-(-n // CHUNK) for n in lengths]
        self.N = len(lengths)
        self.NT = sum(counts)
        starts, chunk_offsets, chunk_indices = [0], [0], []
        for i, (n, c) in enumerate(zip(lengths, counts, strict=True)):
            starts.append(starts[-1] + n)
            chunk_offsets.append(chunk_offsets[-1] + c)
            chunk_indices += [(i, j) for j in range(c)]
        int32 = functools.partial(torch.tensor, dtype=torch.int32)
        self.cu_seqlens = host_to_device(int32(starts), device)
        self.chunk_offsets = host_to_device(int32(chunk_offsets), device)
        self.chunk_indices = host_to_device(int32(chunk_indices).reshape(self.NT, 2), device)


@functools.lru_cache(maxsize=64)
def _layout(lengths: tuple[int, ...], device: torch.device) -> _Layout:
    return _Layout(lengths, device)


def layout_for(cu_seqlens: torch.Tensor | None, B: int, T: int, device: torch.device) -> _Layout:
    """The packed layout of a call, one cached per (sequence lengths, device): every layer of a forward (and its
    backward) reuses it. Varlen lengths come from ``cu_seqlens``'s host copy (``ops.varlen.host_values``), read
    back from the device at most once per tensor."""
    if cu_seqlens is None:
        return _layout((T,) * B, device)
    return _layout(tuple(sequence_lengths(cu_seqlens)), device)


def min_stages(dtype: torch.dtype) -> int:
    """The shallowest prefetch depth the sequential passes may take for inputs of ``dtype``: 2 for 16-bit inputs
    (their products run on wgmma; 1 stage hit an illegal memory access on the H200 with Triton 3.6, at K = V = 128
    and 256, not yet explained), 1 for fp32 ones (no tensor cores; on the H200 1 stage gave results bit-identical to
    2 at K = V = 128, T = 8192, and matched the reference to 1e-6 at K = V = 256)."""
    return 1 if dtype == torch.float32 else 2


def fitting_candidates(bv: int, stages: int, dtype: torch.dtype) -> list[tuple[int, int]]:
    """The (V block, num_stages) settings ``launch_fitting`` tries, in order: the depth from ``stages`` down to
    ``min_stages(dtype)``, then the same with the V block halved, down to 16."""
    depths = range(stages, min(stages, min_stages(dtype)) - 1, -1)
    blocks = [bv]
    while blocks[-1] > 16:
        blocks.append(blocks[-1] // 2)
    return [(b, s) for b in blocks for s in depths]


# (kernel, input dtype, configured BV and depth, other constexprs) -> index into fitting_candidates of the setting
# that fits, once the configured one did not
_FITTING: dict = {}


def launch_fitting(kernel, grid, bv: int, stages: int, *args, dtype: torch.dtype, **kwargs):
    """``kernel[grid(BV)](*args, BV=BV, num_stages=s, **kwargs)`` at the first of ``fitting_candidates`` whose build
    fits in the GPU's shared memory. The sequential passes hold [BT, K] tiles of three or four operands per prefetch
    stage, so at K = 256 (and with fp32 operands) the configured depth may not fit; a shallower one or a narrower V
    block (more programs, each re-reading the K-wide tiles) does. Triton raises OutOfResources when the kernel is
    loaded, before anything runs, so a retry repeats no work; the setting that fits is remembered per kernel,
    dtype and constexprs. ``benchmarks/kda_chunk_build.py`` shows what each shape builds to, offline.

    Raises:
        OutOfResources: when no candidate fits.
    """
    from triton.runtime.errors import OutOfResources

    def key():  # built only once some build has not fit: the common launch pays nothing for it
        return getattr(kernel, "__name__", repr(kernel)), dtype, bv, stages, tuple(sorted(kwargs.items()))

    candidates = fitting_candidates(bv, stages, dtype)
    first = _FITTING.get(key(), 0) if _FITTING else 0
    for n, (b, s) in enumerate(candidates[first:], first):
        try:
            out = kernel[grid(b)](*args, BV=b, num_stages=s, **kwargs)
        except OutOfResources:
            if n + 1 == len(candidates):
                raise
            continue
        if n:
            _FITTING[key()] = n
        return out
