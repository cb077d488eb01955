"""The decode GEMV (``ops.linear_triton``) against ``F.linear``; the model's ``Linear`` and its dispatch.

Without CUDA the kernel runs in Triton's interpreter (16-bit inputs, fp32 sums). It sums each row in another order
than a cuBLAS or CPU matmul, so it is held to the fp32 product of the same 16-bit inputs: within twice the
error of ``F.linear`` in that dtype, plus the output's own rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kimi_linear.ops.linear import linear, linear_reference  # noqa: E402
from kimi_linear.ops.linear_triton import gemv_launch  # noqa: E402
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)


def inputs(lead, N, K, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=gen)
    w = torch.randn(N, K, generator=gen) / K**0.5
    return x.to(device=DEVICE, dtype=dtype), w.to(device=DEVICE, dtype=dtype)


def exact(x, w):
    return F.linear(x.double(), w.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("lead,N,K", [((1,), 40, 64), ((1, 1), 37, 1000), ((1, 1, 1), 4100, 96), ((), 8, 1536)],
                         ids=["N40-K64", "N37-K1000", "N4100-K96", "vector"])
def test_one_row_within_twice_the_matmul_error(lead, N, K, dtype):
    x, w = inputs(lead, N, K, dtype, seed=N + K)
    y = linear(x, w, backend="triton")
    y_mm = linear_reference(x, w)
    assert y.shape == y_mm.shape == (*lead, N) and y.dtype == dtype
    want = exact(x, w)
    assert rel_err(y, want) <= 2 * rel_err(y_mm, want) + 1e-6, (rel_err(y, want), rel_err(y_mm, want))


def test_launch_covers_any_shape():
    """BK is a power of two >= 16 and at most 512; rows per program 4 or 8."""
    for N, K in ((1, 1), (16, 15), (2048, 2048), (32000, 2048), (2048, 5632)):
        cfg = gemv_launch(N, K)
        assert cfg.BN in (4, 8) and 16 <= cfg.BK <= 512 and cfg.BK & (cfg.BK - 1) == 0


def test_auto_is_f_linear_for_several_rows_autograd_and_the_cpu():
    x, w = inputs((3,), 16, 32)
    assert torch.equal(linear(x, w), F.linear(x, w))  # several rows
    x1 = x[:1].clone().requires_grad_()
    y = linear(x1, w)
    y.sum().backward()
    assert x1.grad is not None  # differentiable: F.linear
    if DEVICE == "cpu":
        assert torch.equal(linear(x[:1], w), F.linear(x[:1], w))  # auto never interprets


def test_rejects_bad_arguments():
    x, w = inputs((1,), 16, 32)
    with pytest.raises(ValueError, match="backend"):
        linear(x, w, backend="cuda")
    with pytest.raises(ValueError, match="one row"):
        linear(torch.cat([x, x]), w, backend="triton")
    with pytest.raises(ValueError, match="one dtype"):
        linear(x.float(), w.float(), backend="triton")
    with pytest.raises(ValueError, match="contiguous"):
        linear(x, w.t().contiguous().t(), backend="triton")
    with pytest.raises(ValueError, match="no backward"):
        linear(x, w.requires_grad_(), backend="triton")


def test_model_linear_keeps_nn_linear_names_and_refuses_a_bias():
    from kimi_linear.layers.linear import Linear

    layer = Linear(8, 4)
    assert isinstance(layer, torch.nn.Linear) and list(layer.state_dict()) == ["weight"] and layer.bias is None
    x = torch.randn(2, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    with pytest.raises(ValueError, match="no bias"):
        Linear(8, 4, bias=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N,K", [(6416, 2048), (2048, 2048), (3648, 2048), (11264, 2048), (2048, 5632),
                                 (32000, 2048)])
def test_gpu_decode_shapes_of_the_0_75b_model(N, K):
    """Every projection of the 0.75b model's B = 1 decode step, bf16, auto (the GEMV): within twice cuBLAS's
    error; and a captured CUDA graph replays it."""
    x, w = inputs((1, 1), N, K, seed=N)
    y = linear(x, w)
    want = exact(x, w)
    assert rel_err(y, want) <= 2 * rel_err(F.linear(x, w), want) + 1e-6
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert rel_err(out, exact(x, w)) <= 2 * rel_err(F.linear(x, w), exact(x, w)) + 1e-6
