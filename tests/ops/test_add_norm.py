"""The fused residual add + RMSNorm (``ops.add_norm_triton``) against its PyTorch specification.

Without CUDA the kernel runs in Triton's interpreter. The sum s is the add of torch in the inputs' dtype (equal,
bit for bit); y differs from the specification only in the order of one row's sum of squares: rel. RMS error
<= 1e-6 in fp32, and in 16 bits within twice the error of the PyTorch path run in that dtype, both against the
fp32 specification on the same rounded sums. The model's inference forward, which runs it, equals its autograd
forward.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kimi_linear.ops.add_norm import add_rms_norm, add_rms_norm_reference  # noqa: E402
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

EPS = 1e-5


def inputs(lead, D, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(*lead, D, generator=gen)
    delta = torch.randn(*lead, D, generator=gen)
    weight = 1 + 0.3 * torch.randn(D, generator=gen)
    return (t.to(device=DEVICE, dtype=dtype) for t in (x, delta, weight))


@pytest.mark.parametrize("lead,D", [((2, 7), 40), ((1,), 2048), ((37,), 1000), ((3, 1), 5000), ((0,), 64)],
                         ids=["B2-T7-D40", "R1-D2048", "R37-D1000", "R3-D5000", "empty"])
def test_fp32_matches_the_specification(lead, D):
    x, delta, weight = inputs(lead, D, seed=D)
    s, y = add_rms_norm(x, delta, weight, EPS, backend="triton")
    s_ref, y_ref = add_rms_norm_reference(x, delta, weight, EPS)
    assert s.shape == y.shape == x.shape and s.dtype == y.dtype == x.dtype
    assert torch.equal(s, s_ref)
    assert rel_err(y, y_ref) <= 1e-6


def test_strided_inputs():
    """Rows of wider tensors (the model's sublayer outputs can be views): the same as their contiguous copies."""
    x, delta, weight = inputs((9,), 96, seed=1)
    wide = torch.cat([x, delta], dim=-1)  # [9, 192]
    s, y = add_rms_norm(wide[:, :96], wide[:, 96:], weight, EPS, backend="triton")
    s_ref, y_ref = add_rms_norm_reference(x, delta, weight, EPS)
    assert torch.equal(s, s_ref) and rel_err(y, y_ref) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_sum_exact_norm_within_twice_the_torch_path_error(dtype):
    x, delta, weight = inputs((5, 11), 256, dtype=dtype, seed=3)
    s, y = add_rms_norm(x, delta, weight, EPS, backend="triton")
    s_torch, y_torch = add_rms_norm(x, delta, weight, EPS, backend="torch")
    assert s.dtype == y.dtype == dtype and torch.equal(s, s_torch)
    exact = add_rms_norm_reference(s.float(), torch.zeros_like(s, dtype=torch.float32), weight.float(), EPS)[1]
    assert rel_err(y, exact) <= 2 * rel_err(y_torch, exact) + 1e-6, (rel_err(y, exact), rel_err(y_torch, exact))


def test_auto_takes_the_specification_under_autograd_and_on_mixed_dtypes():
    x, delta, weight = inputs((4,), 32)
    x.requires_grad_()
    s, y = add_rms_norm(x, delta, weight, EPS)  # differentiable: the PyTorch path
    y.sum().backward()
    assert x.grad is not None and s.grad_fn is not None
    s2, _ = add_rms_norm(x.detach(), delta.bfloat16(), weight, EPS)  # promotes as torch's add
    assert s2.dtype == torch.float32 and torch.equal(s2, x.detach() + delta.bfloat16())


def test_rejects_bad_arguments():
    x, delta, weight = inputs((2,), 16)
    with pytest.raises(ValueError, match="backend"):
        add_rms_norm(x, delta, weight, EPS, backend="cuda")
    with pytest.raises(ValueError, match="one shape"):
        add_rms_norm(x, delta[:, :8], weight, EPS)
    with pytest.raises(ValueError, match=r"weight must be \[D\]"):
        add_rms_norm(x, delta, weight[:8], EPS)
    with pytest.raises(ValueError, match="one dtype"):
        add_rms_norm(x.double(), delta.double(), weight, EPS, backend="triton")
    with pytest.raises(ValueError, match="one dtype"):
        add_rms_norm(x, delta.half(), weight, EPS, backend="triton")
    wide = torch.zeros(1, 8193)
    with pytest.raises(ValueError, match="D <= 8192"):
        add_rms_norm(wide, wide, torch.ones(8193), EPS, backend="triton")
    with pytest.raises(ValueError, match="no backward"):
        add_rms_norm(x.requires_grad_(), delta, weight, EPS, backend="triton")


def test_model_inference_forward_equals_autograd_forward():
    """Without autograd the model runs its blocks in the residual form (``DecoderLayer`` with ``residual_form``): the
    same additions in the same order, so on the CPU the same logits to the bit; with a cache as well."""
    from kimi_linear.cache import KimiLinearCache
    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM

    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig.from_preset("debug"))
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    with_grad = model(ids).logits
    with torch.no_grad():
        assert torch.equal(model(ids).logits, with_grad)
        cache = KimiLinearCache(model.config, batch_size=2, max_length=32)
        assert torch.equal(model(ids, cache=cache).logits, with_grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 8192])
def test_gpu_model_shape_bf16(rows):
    """The 0.75b model's residual stream (D = 2048), bf16: a decode row and a prefill step's rows."""
    x, delta, weight = inputs((rows,), 2048, dtype=torch.bfloat16, seed=rows)
    s, y = add_rms_norm(x, delta, weight, EPS)
    s_torch, y_torch = add_rms_norm(x, delta, weight, EPS, backend="torch")
    assert torch.equal(s, s_torch)
    exact = add_rms_norm_reference(s.float(), torch.zeros_like(s, dtype=torch.float32), weight.float(), EPS)[1]
    assert rel_err(y, exact) <= 2 * rel_err(y_torch, exact) + 1e-6
