"""bf16 in Triton's CPU interpreter, as the GPU computes it; installed by ``tests/conftest.py`` when the tests run
the kernels through the interpreter (no CUDA).

Triton 3.6's interpreter keeps bf16 values as their raw 16 bits in numpy ``uint16`` arrays (numpy has no bf16), and
two of its operations take those bits for numbers:

* ``tl.dot`` of bf16 operands multiplies the integers (errors of ~1e10 on a 16 x 16 product). The GPU's tensor cores
  multiply the bf16 values exactly and add in fp32; here the operands are widened to fp32 (exact) first.
* A cast from fp32 to bf16 drops the low 16 bits (rounds toward zero); the GPU rounds to nearest even.

Each fix applies only where the interpreter holds bf16 as ``uint16``, so a Triton that fixes these itself is left
alone. With them the bf16 kernel tests run in CI as they run on the GPU, up to the order of fp32 sums.
"""

from __future__ import annotations

import numpy as np


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 values held as their uint16 bits -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> the uint16 bits of bf16, rounded to nearest even; NaN stays a (quiet) NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), ((u >> 16) | np.uint32(0x40)).astype(np.uint16), rounded)


def install() -> None:
    """Patch the interpreter's dot and fp32 -> bf16 cast (once; later calls do nothing)."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_kimi_linear_bf16", False):
        return
    dot, cast = builder.create_dot, builder.cast_impl

    def widened(x):
        if x.dtype.scalar == tl.bfloat16 and x.data.dtype == np.uint16:
            return interpreter.TensorHandle(bf16_bits_to_f32(x.data), tl.float32)
        return x

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16 and src.data.dtype == np.float32:
            return interpreter.TensorHandle(f32_to_bf16_bits(src.data), dst_type.scalar)
        return cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    builder._kimi_linear_bf16 = True
