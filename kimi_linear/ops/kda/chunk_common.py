"""Host-side pieces shared by the chunk KDA launchers: the packed layout, buffer allocation, launch settings.

Kept apart from the kernels (``chunk_fwd.py``, ``chunk_bwd.py``) and from the autograd wrapper
(``chunk_triton.py``) so each of those imports it without cycles.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

CHUNK = 64
SUB_CHUNK = 16

# Tests set this to fill every buffer a kernel is meant to write with NaN first, so an element the kernels leave
# unwritten shows up in the results instead of passing as stale memory.
POISON_BUFFERS = False


def _empty(*shape, device, dtype):
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(*shape, device=device, dtype=dtype)


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


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


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs ask for fp32 products; for 16-bit inputs tf32 is already finer than the inputs themselves
    return "ieee" if dtype == torch.float32 else "tf32"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Launch settings of the forward's sequential state pass (also the backward's recompute of the states) and of the
# optional separate output pass; the V block sets their parallelism (V / BV * N * H programs). The per-chunk
# kernels' settings are FWD_CONFIG in chunk_fwd.py and BWD_CONFIG in chunk_bwd.py.
CONFIG = {
    "fused_output": True,  # O inside the sequential state pass, or a parallel pass over stored states
    "output_bv": 64,
    "state_bv": 32,
    "state_warps": 4,
    # prefetch depth of the chunk loop for 16-bit inputs; H200 8k fwd 1.121 (3) vs 1.215 ms (2), state kernel
    # 0.217 vs 0.313 (2026-12-03); 4 needs 244 KB of shared memory (the H200 has 227). fp32 inputs take
    # state_stages_fp32 (3 needs 256 KB). 1 stage hit an illegal memory access on the H200: refused, see
    # state_stages() and benchmarks/RESULTS.md. A depth that does not fit (K = 256) falls back to one that does
    # (launch_with_stage_fallback)
    "state_stages": 3,
    "state_stages_fp32": 2,
}


def state_stages(dtype: torch.dtype) -> int:
    """num_stages of the sequential state pass (``chunk_kda_fwd_state_kernel``) for inputs of ``dtype``.

    Raises:
        ValueError: a setting below 2. One stage (no software pipelining of the chunk loop) hit an illegal memory
            access at T = 8192, H = 32, K = V = 128 on the H200 with Triton 3.6, not yet explained.
    """
    stages = CONFIG["state_stages_fp32"] if dtype == torch.float32 else CONFIG["state_stages"]
    if stages < 2:
        key = "state_stages_fp32" if dtype == torch.float32 else "state_stages"
        raise ValueError(f"CONFIG[{key!r}] must be >= 2, got {stages}: the state pass at 1 stage hit an illegal "
                         "memory access on the H200 (Triton 3.6)")
    return stages


# (kernel, input dtype, constexprs) -> the num_stages that fit in shared memory, once a deeper one did not
_STAGES_THAT_FIT: dict = {}


def launch_with_stage_fallback(kernel, grid, stages: int, *args, dtype: torch.dtype, **kwargs):
    """``kernel[grid](*args, num_stages=stages, **kwargs)``, retried one stage shallower (down to 2) while the
    compiled kernel needs more shared memory than the GPU has — larger head sizes (K = 256) or fp32 operands at the
    16-bit settings. Triton raises OutOfResources when the kernel is loaded, before anything runs, so a retry
    repeats no work; the depth that fits is remembered per (kernel, dtype, constexprs)."""
    from triton.runtime.errors import OutOfResources

    def key():  # built only once some build has not fit: the common launch pays nothing for it
        return getattr(kernel, "__name__", repr(kernel)), dtype, tuple(sorted(kwargs.items()))

    if _STAGES_THAT_FIT:
        stages = min(stages, _STAGES_THAT_FIT.get(key(), stages))
    while True:
        try:
            return kernel[grid](*args, num_stages=stages, **kwargs)
        except OutOfResources:
            if stages <= 2:
                raise
            stages -= 1
            _STAGES_THAT_FIT[key()] = stages


def _bv(V: int, key: str) -> int:
    return min(_pad_dim(V), CONFIG[key])
