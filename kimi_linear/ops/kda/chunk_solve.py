"""The UT transform of chunkwise KDA (paper §3.1): T = (I + A)^-1 per chunk, A = beta A_kk strictly lower.

``chunk_kda_fwd_solve_kernel``, one program per (chunk, head), in place on the fp32 buffer the pair stage wrote A
into (``chunk_pairs.py``): the four 16x16 diagonal blocks are inverted in registers as a finite Neumann product
(``_inv_unit_lower``), then the blocks below the diagonal follow from the block merge
T_ij = -T_ii sum_{j <= m < i} A_im T_mj. All products are full fp32 (``dot_exact``): T steers the whole chunk.
A short dependent chain of small products with little memory traffic, so it runs at few warps, with many programs
per SM hiding each other's latency. For 16-bit inputs it also stores T rounded to their dtype, which the WY stage's
16-bit products read (half the bytes per program).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_common import CHUNK, SUB_CHUNK
from kimi_linear.ops.triton_helpers import chunk_rows, dot_exact, load_block, new_buffer, store_block


@triton.jit
def _inv_unit_lower(A, BC: tl.constexpr):
    """(I + A)^-1 of a strictly lower [BC, BC] block held in registers (BC = 16), as the finite Neumann product
    (I - A)(I + A^2)(I + A^4)(I + A^8): A is nilpotent (A^16 = 0), so the product is exact in exact arithmetic.
    Six fp32 products of [BC, BC] blocks instead of sixteen dependent substitution steps."""
    o_c = tl.arange(0, BC)
    eye = tl.where(o_c[:, None] == o_c[None, :], 1.0, 0.0)
    A2 = dot_exact(A, A)
    A4 = dot_exact(A2, A2)
    A8 = dot_exact(A4, A4)
    X = eye - A
    X += dot_exact(X, A2)
    X += dot_exact(X, A4)
    X += dot_exact(X, A8)
    return X


@triton.jit
def _merge(T00, T11, T22, T33, A10, A20, A21, A30, A31, A32):
    """The blocks below the diagonal of T = (I + A)^-1 from its inverted diagonal blocks T_ii and A's blocks below
    the diagonal: T_ij = -T_ii sum_{j <= m < i} A_im T_mj, in fp32."""
    T10 = -dot_exact(T11, dot_exact(A10, T00))
    T21 = -dot_exact(T22, dot_exact(A21, T11))
    T20 = -dot_exact(T22, dot_exact(A20, T00) + dot_exact(A21, T10))
    T32 = -dot_exact(T33, dot_exact(A32, T22))
    T31 = -dot_exact(T33, dot_exact(A31, T11) + dot_exact(A32, T21))
    T30 = -dot_exact(T33, dot_exact(A30, T00) + dot_exact(A31, T10) + dot_exact(A32, T20))
    return T10, T20, T21, T30, T31, T32


@triton.jit
def _store_lower(ptr, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33, t0, n_rows, i_h, H: tl.constexpr,
                 BT: tl.constexpr, BC: tl.constexpr):
    """The ten blocks on and below the diagonal of one chunk of T into ``ptr`` [T_total, H, BT]."""
    store_block(ptr, T00, t0, 0, 0, n_rows, i_h, H, BT, BC)
    store_block(ptr, T10, t0, BC, 0, n_rows, i_h, H, BT, BC)
    store_block(ptr, T11, t0, BC, BC, n_rows, i_h, H, BT, BC)
    store_block(ptr, T20, t0, 2 * BC, 0, n_rows, i_h, H, BT, BC)
    store_block(ptr, T21, t0, 2 * BC, BC, n_rows, i_h, H, BT, BC)
    store_block(ptr, T22, t0, 2 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    store_block(ptr, T30, t0, 3 * BC, 0, n_rows, i_h, H, BT, BC)
    store_block(ptr, T31, t0, 3 * BC, BC, n_rows, i_h, H, BT, BC)
    store_block(ptr, T32, t0, 3 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    store_block(ptr, T33, t0, 3 * BC, 3 * BC, n_rows, i_h, H, BT, BC)


@triton.jit
def _store_upper_zeros(ptr, t0, n_rows, i_h, H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """The six zero blocks above the diagonal of one chunk of ``ptr`` [T_total, H, BT]."""
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    store_block(ptr, zero, t0, 0, BC, n_rows, i_h, H, BT, BC)
    store_block(ptr, zero, t0, 0, 2 * BC, n_rows, i_h, H, BT, BC)
    store_block(ptr, zero, t0, 0, 3 * BC, n_rows, i_h, H, BT, BC)
    store_block(ptr, zero, t0, BC, 2 * BC, n_rows, i_h, H, BT, BC)
    store_block(ptr, zero, t0, BC, 3 * BC, n_rows, i_h, H, BT, BC)
    store_block(ptr, zero, t0, 2 * BC, 3 * BC, n_rows, i_h, H, BT, BC)


@triton.jit
def chunk_kda_fwd_solve_kernel(Tinv, T16, cu_seqlens, chunk_indices, H: tl.constexpr, BT: tl.constexpr,
                               BC: tl.constexpr, STORE16: tl.constexpr):
    """Per (chunk, head) — grid (NT, H): in place on one chunk of ``Tinv`` [T_total, H, BT] fp32, A = beta A_kk
    (strictly lower, every block written, zeros above the diagonal) on entry, T = (I + A)^-1 on exit (the zeros
    above the diagonal blocks left as they are). With STORE16 T is also written to ``T16``, rounded to its dtype,
    every block (the zeros above the diagonal included)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, n_rows = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    A10 = load_block(Tinv, t0, BC, 0, n_rows, i_h, H, BT, BC)
    A20 = load_block(Tinv, t0, 2 * BC, 0, n_rows, i_h, H, BT, BC)
    A21 = load_block(Tinv, t0, 2 * BC, BC, n_rows, i_h, H, BT, BC)
    A30 = load_block(Tinv, t0, 3 * BC, 0, n_rows, i_h, H, BT, BC)
    A31 = load_block(Tinv, t0, 3 * BC, BC, n_rows, i_h, H, BT, BC)
    A32 = load_block(Tinv, t0, 3 * BC, 2 * BC, n_rows, i_h, H, BT, BC)
    T00 = _inv_unit_lower(load_block(Tinv, t0, 0, 0, n_rows, i_h, H, BT, BC), BC)
    T11 = _inv_unit_lower(load_block(Tinv, t0, BC, BC, n_rows, i_h, H, BT, BC), BC)
    T22 = _inv_unit_lower(load_block(Tinv, t0, 2 * BC, 2 * BC, n_rows, i_h, H, BT, BC), BC)
    T33 = _inv_unit_lower(load_block(Tinv, t0, 3 * BC, 3 * BC, n_rows, i_h, H, BT, BC), BC)
    tl.debug_barrier()  # every read of A is done before T overwrites it
    T10, T20, T21, T30, T31, T32 = _merge(T00, T11, T22, T33, A10, A20, A21, A30, A31, A32)
    _store_lower(Tinv, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33, t0, n_rows, i_h, H, BT, BC)
    if STORE16:
        _store_lower(T16, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33, t0, n_rows, i_h, H, BT, BC)
        _store_upper_zeros(T16, t0, n_rows, i_h, H, BT, BC)


def solve_ut(Tinv, dtype, layout, launch):
    """The UT transform in place on ``Tinv`` [TT, H, BT] fp32 (A = beta A_kk in, T out). Returns the T the WY
    stage reads: a copy rounded to ``dtype`` for 16-bit inputs, else ``Tinv`` itself. ``launch``: the forward's
    ``FwdLaunch``."""
    TT, H, _ = Tinv.shape
    store16 = dtype != torch.float32
    T = new_buffer(TT, H, CHUNK, device=Tinv.device, dtype=dtype) if store16 else Tinv
    if layout.NT > 0:
        chunk_kda_fwd_solve_kernel[(layout.NT, H)](
            Tinv, T, layout.cu_seqlens, layout.chunk_indices, H=H, BT=CHUNK, BC=SUB_CHUNK, STORE16=store16,
            num_warps=launch.solve_warps, num_stages=1,
        )
    return T


def sm90_build_jobs(H: int, dtype: torch.dtype, launch) -> list:
    """(kernel, constexprs, num_warps, num_stages) as ``solve_ut`` launches it."""
    return [(chunk_kda_fwd_solve_kernel, dict(H=H, BT=CHUNK, BC=SUB_CHUNK, STORE16=dtype != torch.float32),
             launch.solve_warps, 1)]
