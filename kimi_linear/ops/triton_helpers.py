"""What every Triton kernel and launcher in ``kimi_linear.ops`` shares.

* ``interpreting()``: whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1`` before triton is imported);
  ``runs_triton(x)``: whether a kernel can take tensor ``x`` (CUDA, or CPU under the interpreter).
* ``new_buffer`` / ``poisoned``: output buffers. With ``KIMI_LINEAR_POISON_BUFFERS=1`` in the environment they
  start as NaN, so an element a kernel was meant to write and did not shows up in the results instead of passing
  as stale memory (the tests run every kernel this way). An environment switch, like ``TRITON_INTERPRET``, because
  it must also reach the threads autograd runs CUDA backward passes on.
* ``pad_dim``: a head dimension padded to a power of two >= 16 (a Triton block); ``dot_precision``: the
  ``tl.dot`` input precision for a dtype (fp32 asks for fp32 products; for 16-bit inputs tf32 is already finer
  than the inputs).
* ``cast_to`` (device): an fp32 block in a pointer's element type, rounded to nearest even also under the
  interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

POISON_ENV = "KIMI_LINEAR_POISON_BUFFERS"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or interpreting()


def poisoned(buffer: torch.Tensor) -> torch.Tensor:
    """``buffer`` filled with NaN when ``KIMI_LINEAR_POISON_BUFFERS=1``, else unchanged."""
    return buffer.fill_(float("nan")) if os.environ.get(POISON_ENV) == "1" else buffer


def new_buffer(*shape: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised buffer a kernel writes (NaN when poisoning)."""
    return poisoned(torch.empty(*shape, device=device, dtype=dtype))


def pad_dim(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def cast_to(b, ptr, INTERPRET: tl.constexpr):
    """b (fp32) in the element type of ``ptr``, rounded to nearest even. Triton's interpreter truncates fp32 to
    bf16 (its cast ignores the rounding mode), so there the rounding is done by hand on the bits."""
    if INTERPRET:
        if ptr.dtype.element_ty == tl.bfloat16:
            u = b.to(tl.uint32, bitcast=True)
            u = u + 0x7FFF + ((u >> 16) & 1)
            b = (u & 0xFFFF0000).to(tl.float32, bitcast=True)
    return b.to(ptr.dtype.element_ty)
