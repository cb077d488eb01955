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
* The chunk prologue and block access of the chunkwise kernels (device): ``chunk_rows`` finds a chunk's first packed
  row and its valid length from ``cu_seqlens`` / ``chunk_indices``, ``sequence_prologue`` the same for the
  sequential passes' programs (one per V block, sequence and head); ``load_rows`` / ``load_cols`` / ``store_cols`` /
  ``load_block`` ... read and write [rows, columns] tiles of packed ``[T_total, H, D]`` tensors, masked at the
  chunk's end (rows past it read 0). ``dot`` / ``dot_exact``: ``tl.dot`` at a given / full fp32 precision.
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
    """``input_precision`` of the dots whose operands are fp32 (products of the kernels' own fp32 intermediates) in
    a problem whose inputs are ``dtype``: IEEE fp32 for fp32 inputs; for fp16 inputs three TF32 passes ("tf32x3",
    near fp32), since one pass truncates each operand to fp16's own 10 mantissa bits, always toward zero, and that
    bias adds up over long reductions such as the gate parameters' gradients; bf16 inputs (7 bits) take one pass.
    Dots of fp16/bf16 operands are exact products whatever this says."""
    if dtype == torch.float32:
        return "ieee"
    return "tf32x3" if dtype == torch.float16 else "tf32"


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


@triton.jit
def chunk_rows(cu_seqlens, chunk_indices, i_c, BT: tl.constexpr):
    """The packed row where chunk i_c starts and its number of valid rows (<= BT): ``chunk_indices`` [NT, 2] holds
    (sequence, chunk within it), ``cu_seqlens`` [N + 1] the sequences' first rows."""
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT
    return t0, tl.minimum(eos - t0, BT)


@triton.jit
def sequence_prologue(cu_seqlens, chunk_offsets, i_v, i_nh, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Where the sequential passes' program (V block i_v, sequence and head i_nh) works: (i_n, i_h, the sequence's
    first and end packed rows bos / eos, its number of chunks, the index of its first chunk, the V offsets o_v,
    the mask m_kv and the offsets o_kv of its [BK, BV] block inside one [K, V] state)."""
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    n_chunks = (eos - bos + BT - 1) // BT
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    return i_n, i_h, bos, eos, n_chunks, c0, o_v, m_kv, o_kv


@triton.jit
def dot(a, b, DOT_PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def dot_exact(a, b):
    """fp32 products (no tf32 rounding), for the small blocks that steer a whole chunk."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def load_rows(ptr, t0, row0, n_rows, i_h, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Rows [row0, row0 + BR) of a chunk starting at packed row t0 of ``ptr`` [T_total, H, D], as fp32 [BR, BD].

    Rows at or past ``n_rows`` (the chunk's valid length) and columns past D read 0.
    """
    o_r = row0 + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < n_rows)[:, None] & (o_d < D)[None, :]
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    return tl.load(p, mask=m, other=0.0).to(tl.float32)


@triton.jit
def load_rows_raw(ptr, t0, n_rows, i_h, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Rows [0, BR) of a chunk in the stored dtype (dot operands stay 16-bit: half the registers of fp32)."""
    o_r = tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < n_rows)[:, None] & (o_d < D)[None, :]
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def store_rows(ptr, x, t0, row0, n_rows, i_h, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
               BD: tl.constexpr):
    o_r = row0 + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < n_rows)[:, None] & (o_d < D)[None, :]
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def load_cols(ptr, t0, row0, col0, n_rows, i_h, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
              BD: tl.constexpr):
    """Rows [row0, row0 + BR), columns [col0, col0 + BD) of a chunk of ``ptr`` [T_total, H, D], in the stored
    dtype; rows at or past ``n_rows`` and columns past D read 0."""
    o_r = row0 + tl.arange(0, BR)
    o_d = col0 + tl.arange(0, BD)
    m = (o_r < n_rows)[:, None] & (o_d < D)[None, :]
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def store_cols(ptr, x, t0, row0, col0, n_rows, i_h, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
               BD: tl.constexpr):
    o_r = row0 + tl.arange(0, BR)
    o_d = col0 + tl.arange(0, BD)
    m = (o_r < n_rows)[:, None] & (o_d < D)[None, :]
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def load_cols_at(ptr, t0, n_rows, i_h, o_d, m_d, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr):
    """Rows [0, BR) and columns o_d of a chunk of ``ptr`` [T_total, H, D], in the stored dtype; zero where the rows
    pass the chunk's end or m_d is false."""
    o_r = tl.arange(0, BR)
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    return tl.load(p, mask=(o_r < n_rows)[:, None] & m_d[None, :], other=0.0)


@triton.jit
def store_cols_at(ptr, x, t0, n_rows, i_h, o_d, m_d, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr):
    o_r = tl.arange(0, BR)
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=(o_r < n_rows)[:, None] & m_d[None, :])


@triton.jit
def load_vec(ptr, t0, row0, n_rows, i_h, H: tl.constexpr, BR: tl.constexpr):
    """Per-row scalars (beta) of ``ptr`` [T_total, H] for rows [row0, row0 + BR) of a chunk, fp32 [BR]."""
    o_r = row0 + tl.arange(0, BR)
    return tl.load(ptr + (t0 + o_r).to(tl.int64) * H + i_h, mask=o_r < n_rows, other=0.0).to(tl.float32)


@triton.jit
def load_G(ptr, t0, row0, n_rows, G_last, i_h, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
           BD: tl.constexpr):
    """Stored cumulative decays G; rows past the chunk's end take the last valid row's value, so that every
    difference exponentiated against them stays <= 0."""
    o_r = row0 + tl.arange(0, BR)
    G = load_rows(ptr, t0, row0, n_rows, i_h, H, D, BR, BD)
    return tl.where((o_r < n_rows)[:, None], G, G_last[None, :])


@triton.jit
def load_row(ptr, t0, row, n_rows, i_h, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """Row ``row`` of a chunk of ``ptr`` [T_total, H, D] as fp32 [BD] (zeros past the chunk's end)."""
    o_d = tl.arange(0, BD)
    p = ptr + ((t0 + row).to(tl.int64) * H + i_h) * D + o_d
    return tl.load(p, mask=(o_d < D) & (row < n_rows), other=0.0).to(tl.float32)


@triton.jit
def load_last(ptr, t0, n_rows, i_h, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """The chunk's last valid row of ``ptr`` [T_total, H, D] as fp32 [BD]."""
    o_d = tl.arange(0, BD)
    p = ptr + ((t0 + n_rows - 1).to(tl.int64) * H + i_h) * D + o_d
    return tl.load(p, mask=o_d < D, other=0.0).to(tl.float32)


@triton.jit
def tile(ptr, t0, i_h, o_v, H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr):
    """Pointers to rows [t0, t0 + BT) and columns o_v of ``ptr`` [T_total, H, V]."""
    o_r = tl.arange(0, BT)
    return ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * V + o_v[None, :]


@triton.jit
def load_block(ptr, t0, row0, col0, n_rows, i_h, H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Sub-block [BC, BC] at (row0, col0) of a per-chunk matrix stored as ``ptr`` [T_total, H, BT], fp32."""
    o_r = row0 + tl.arange(0, BC)
    o_c = col0 + tl.arange(0, BC)
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * BT + o_c[None, :]
    return tl.load(p, mask=(o_r < n_rows)[:, None], other=0.0)


@triton.jit
def store_block(ptr, x, t0, row0, col0, n_rows, i_h, H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    o_r = row0 + tl.arange(0, BC)
    o_c = col0 + tl.arange(0, BC)
    p = ptr + ((t0 + o_r).to(tl.int64)[:, None] * H + i_h) * BT + o_c[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=(o_r < n_rows)[:, None])
