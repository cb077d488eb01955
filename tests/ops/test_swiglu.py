"""The fused SwiGLU activation (``ops.swiglu_triton``) against its PyTorch specification.

Without CUDA the kernel runs in Triton's interpreter. It rounds as the unfused ops do (the SiLU to the inputs'
dtype, then the product), so it differs from them only where its exp and torch's differ in the last bit of fp32
and that flips a rounding: in fp32 rel. RMS error <= 1e-6, in 16 bits within twice the error of the PyTorch path
run in that dtype against the fp32 specification, and bit-equal to it almost everywhere.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kimi_linear.ops.swiglu import silu_mul, silu_mul_reference, swiglu_down  # noqa: E402
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)


def inputs(lead, I, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate = 4 * torch.randn(*lead, I, generator=gen)  # both tails of the SiLU and its bend
    up = torch.randn(*lead, I, generator=gen)
    return (t.to(device=DEVICE, dtype=dtype) for t in (gate, up))


@pytest.mark.parametrize("lead,I", [((2, 7), 40), ((1,), 5632), ((37,), 1000), ((3, 1), 5000), ((0,), 64)],
                         ids=["B2-T7-I40", "R1-I5632", "R37-I1000", "R3-I5000", "empty"])
def test_fp32_matches_the_specification(lead, I):
    gate, up = inputs(lead, I, seed=I)
    y = silu_mul(gate, up, backend="triton")
    y_ref = silu_mul_reference(gate, up)
    assert y.shape == gate.shape and y.dtype == gate.dtype and y.is_contiguous()
    assert rel_err(y, y_ref) <= 1e-6


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp, as intended
def test_extreme_gates():
    """Gates far in either tail: silu(-100) is -0 (exp overflows to inf, no NaN), silu(100) is 100."""
    gate = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]], device=DEVICE)
    up = torch.full_like(gate, 2.0)
    y = silu_mul(gate, up, backend="triton")
    assert torch.isfinite(y).all()
    assert torch.allclose(y, silu_mul_reference(gate, up), rtol=1e-6, atol=1e-30)


def test_halves_of_a_packed_projection_are_read_in_place():
    """The MLP's packed gate-and-up output chunked in two: row-strided views, the same as their contiguous
    copies."""
    gate, up = inputs((3, 5), 96, seed=1)
    packed = torch.cat([gate, up], dim=-1)  # [3, 5, 192]
    g, u = packed.chunk(2, dim=-1)
    assert g.stride(-2) == 192
    y = silu_mul(g, u, backend="triton")
    assert rel_err(y, silu_mul_reference(gate, up)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_within_twice_the_torch_path_error(dtype):
    gate, up = inputs((9, 11), 256, dtype=dtype, seed=3)
    y = silu_mul(gate, up, backend="triton")
    y_torch = silu_mul(gate, up, backend="torch")
    assert y.dtype == dtype
    exact = silu_mul_reference(gate.float(), up.float())
    assert rel_err(y, exact) <= 2 * rel_err(y_torch, exact) + 1e-6, (rel_err(y, exact), rel_err(y_torch, exact))
    assert (y == y_torch).float().mean() >= 0.99


def test_auto_takes_the_specification_under_autograd_and_on_mixed_dtypes():
    gate, up = inputs((4,), 32)
    gate.requires_grad_()
    y = silu_mul(gate, up)  # differentiable: the PyTorch path
    y.sum().backward()
    assert gate.grad is not None and y.grad_fn is not None
    y2 = silu_mul(gate.detach(), up.bfloat16())  # promotes as torch's mul
    assert y2.dtype == torch.float32 and torch.equal(y2, silu_mul_reference(gate.detach(), up.bfloat16()))


def test_rejects_bad_arguments():
    gate, up = inputs((2,), 16)
    with pytest.raises(ValueError, match="backend"):
        silu_mul(gate, up, backend="cuda")
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(gate, up[:, :8])
    with pytest.raises(ValueError, match="one dtype"):
        silu_mul(gate.double(), up.double(), backend="triton")
    with pytest.raises(ValueError, match="one dtype"):
        silu_mul(gate, up.half(), backend="triton")
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul(gate.t(), up.t(), backend="triton")
    with pytest.raises(ValueError, match="no backward"):
        silu_mul(gate.requires_grad_(), up, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 8192])
def test_gpu_model_shape_bf16(rows):
    """The 0.75b model's MLP (I = 5632), bf16, as the packed projection's halves: a decode row and a prefill
    step's rows; and the MLP's inference forward (which runs it) against its autograd forward."""
    from kimi_linear.layers.mlp import SwiGLUMLP

    gate, up = inputs((rows,), 5632, dtype=torch.bfloat16, seed=rows)
    g, u = torch.cat([gate, up], dim=-1).chunk(2, dim=-1)
    y = silu_mul(g, u)
    y_torch = silu_mul(g, u, backend="torch")
    exact = silu_mul_reference(gate.float(), up.float())
    assert rel_err(y, exact) <= 2 * rel_err(y_torch, exact) + 1e-6
    assert (y == y_torch).float().mean() >= 0.99
    torch.manual_seed(rows)
    mlp = SwiGLUMLP(256, 704).cuda().bfloat16()
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    w_gate, w_up, w_down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    with torch.no_grad():
        fused = mlp(x)
        unfused = F.linear(silu_mul_reference(F.linear(x, w_gate), F.linear(x, w_up)), w_down)
        exact = F.linear(silu_mul_reference(F.linear(x.float(), w_gate.float()), F.linear(x.float(), w_up.float())),
                         w_down.float())
    assert rel_err(fused, exact) <= 2 * rel_err(unfused, exact) + 1e-6
    assert torch.equal(mlp(x.requires_grad_()), unfused)  # under autograd: the unfused ops themselves


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_swiglu_down_equals_the_unfused_ops_and_keeps_gate_and_up(autocast):
    """``swiglu_down`` against ``F.linear(silu_mul_reference(gate, up), weight)`` on the same tensors, in fp32 and
    under bf16 autocast with an fp32 weight: the output and the gradients of gate, up and the weight are those of
    the unfused ops, and of [..., I] tensors it keeps only gate and up (the unfused ops keep the SiLU's input, its
    output, up and the product)."""
    gen = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(2, 7, 40, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    weight = (torch.randn(24, 40, generator=gen) / 40**0.5).to(DEVICE).requires_grad_()
    dy = torch.randn(2, 7, 24, generator=gen).to(DEVICE)
    results = []
    for fn in (swiglu_down, lambda g, u, w: F.linear(silu_mul_reference(g, u), w)):
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, saved=saved: saved.setdefault(t.untyped_storage().data_ptr(), t), lambda t: t):
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
                g, u = (t.to(torch.bfloat16) if autocast else t for t in (gate, up))
                y = fn(g, u, weight)
        grads = torch.autograd.grad(y, (gate, up, weight), dy.to(y.dtype))
        wide = sum(1 for t in saved.values() if t.shape[-1:] == (40,) and t.numel() == 2 * 7 * 40)
        results.append((y, grads, wide))
    (y, grads, wide), (y_ref, grads_ref, wide_ref) = results
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    for name, a, b in zip(("gate", "up", "weight"), grads, grads_ref):
        assert a.dtype == b.dtype and rel_err(a, b) <= (1e-6 if not autocast else 2.0**-8), name
    assert wide == 2 and wide_ref == 4, (wide, wide_ref)
