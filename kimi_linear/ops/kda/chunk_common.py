"""Host-side pieces shared by the chunk KDA launchers: the chunk sizes, the packed layout, and the shared-memory
fallback of the sequential passes (``launch_fitting``)."""

from __future__ import annotations

import functools

import torch


CHUNK = 64
SUB_CHUNK = 16


class _Layout:
    """Where each sequence and chunk lives in the packed ``[T_total, ...]`` tensors."""

    def __init__(self, cu_seqlens: torch.Tensor | None, B: int, T: int, device: torch.device):
        if cu_seqlens is None:
            lengths = [T] * B
        else:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        counts = torch.tensor([-(-n // CHUNK) for n in lengths], dtype=torch.int64)
        self.N = len(lengths)
        self.NT = int(counts.sum())
        starts = torch.cumsum(torch.tensor([0] + lengths), 0)
        self.cu_seqlens = starts.to(device=device, dtype=torch.int32)
        self.chunk_offsets = torch.cumsum(torch.cat([counts.new_zeros(1), counts]), 0).to(device, torch.int32)
        seq = torch.repeat_interleave(torch.arange(self.N), counts)  # [NT]
        within = torch.arange(self.NT) - torch.repeat_interleave(self.chunk_offsets.cpu()[:-1].long(), counts)
        self.chunk_indices = torch.stack([seq, within], 1).to(device=device, dtype=torch.int32).contiguous()


@functools.lru_cache(maxsize=64)
def _fixed_layout(B: int, T: int, device: torch.device) -> _Layout:
    return _Layout(None, B, T, device)


def layout_for(cu_seqlens: torch.Tensor | None, B: int, T: int, device: torch.device) -> _Layout:
    """The packed layout of a call. Equal-length batches reuse one cached layout per (B, T, device): building it
    copies small host tensors to the device, and each such copy from pageable memory waits for the stream to
    drain (so every call would stall the GPU while the host launches the next kernels). Varlen layouts read
    ``cu_seqlens`` on the host and are built per call."""
    if cu_seqlens is None:
        return _fixed_layout(B, T, device)
    return _Layout(cu_seqlens, B, T, device)


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
