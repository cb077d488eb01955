"""The bf16 fixes the tests install in Triton's interpreter (``tests/triton_interpreter.py``) against PyTorch's bf16:
a dot of bf16 tiles, and the fp32 -> bf16 cast bit for bit (ties, subnormals, infinities, NaN)."""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the interpreter runs only without CUDA, with TRITON_INTERPRET=1", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _dot_and_cast(a, b, out, out_bf16, x, x_bf16, N: tl.constexpr, M: tl.constexpr):
    o = tl.arange(0, N)
    tile = o[:, None] * N + o[None, :]
    c = tl.dot(tl.load(a + tile), tl.load(b + tile))
    tl.store(out + tile, c)
    tl.store(out_bf16 + tile, c.to(tl.bfloat16))
    m = tl.arange(0, M)
    tl.store(x_bf16 + m, tl.load(x + m).to(tl.bfloat16))


def test_bf16_dot_and_cast_match_pytorch():
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=gen).bfloat16() for _ in range(2))
    x = torch.randn(4096, generator=gen) * 10.0 ** torch.randint(-40, 38, (4096,), generator=gen)
    one = torch.tensor(1.0).view(torch.int32)
    specials = [1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 1e-40, -1e-45, float("inf"), float("-inf"),
                3.4e38, 0.0, -0.0]  # ties to even both ways, subnormals, overflow to inf
    x[: len(specials)] = torch.tensor(specials)
    x[len(specials)] = (one + 0x7FFF).view(torch.float32)  # just below a tie: rounds down
    x[-1] = float("nan")
    out, out_bf16 = torch.empty(16, 16), torch.empty(16, 16, dtype=torch.bfloat16)
    x_bf16 = torch.empty_like(x, dtype=torch.bfloat16)
    _dot_and_cast[(1,)](a, b, out, out_bf16, x, x_bf16, N=16, M=4096)
    want = a.float() @ b.float()  # exact products, fp32 sums
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(out_bf16, out.bfloat16())
    got, ref = x_bf16[:-1].view(torch.int16), x[:-1].bfloat16().view(torch.int16)
    assert torch.equal(got, ref), (x[:-1][got != ref][:5], x_bf16[:-1][got != ref][:5])
    assert x_bf16[-1].isnan()
