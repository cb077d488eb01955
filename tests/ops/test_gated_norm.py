"""The fused gated RMSNorm (``ops.gated_norm_triton``) against its PyTorch specification, with every gradient.

Without CUDA the kernels run in Triton's interpreter. fp32: only the order of the sums differs (rel. RMS error
<= 1e-6 on y, d o, d gate, d weight). 16-bit inputs: within twice the error of the PyTorch path run in that dtype,
both against the fp32 specification on the same rounded inputs.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kimi_linear.ops.gated_norm import gated_rms_norm, gated_rms_norm_reference  # noqa: E402
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

EPS = 1e-5


def inputs(lead, H, V, gated, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    o = torch.randn(*lead, H, V, generator=gen)
    gate = 2 * torch.randn(*lead, H * V, generator=gen) if gated else None
    weight = 1 + 0.3 * torch.randn(V, generator=gen)
    dy = torch.randn(*lead, H * V, generator=gen)
    cast = (lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype))
    return cast(o), cast(gate), cast(weight), dy.to(DEVICE)


def outputs_and_grads(backend, o, gate, weight, dy):
    leaves = [t.detach().requires_grad_() for t in (o, gate, weight) if t is not None]
    o_, gate_, w_ = leaves[0], (leaves[1] if gate is not None else None), leaves[-1]
    if backend == "spec":
        y = gated_rms_norm_reference(o_, gate_, w_, EPS)
    else:
        y = gated_rms_norm(o_, gate_, w_, EPS, backend=backend)
    grads = torch.autograd.grad((y.double() * dy.double()).sum(), leaves)
    return [y, *grads]


@pytest.mark.parametrize("gated", [True, False], ids=["gate", "no-gate"])
@pytest.mark.parametrize("lead,H,V", [((2, 7), 3, 16), ((1, 50), 2, 48), ((3,), 5, 128)],
                         ids=["B2-T7-H3-V16", "T50-H2-V48", "N3-H5-V128"])
def test_fp32_matches_the_specification(lead, H, V, gated):
    o, gate, weight, dy = inputs(lead, H, V, gated, seed=V + H)
    ours = outputs_and_grads("triton", o, gate, weight, dy)
    spec = outputs_and_grads("spec", o, gate, weight, dy)
    assert len(ours) == len(spec) == (4 if gated else 3)
    for name, a, b in zip(("y", "do", "dgate" if gated else "dweight", "dweight"), ours, spec):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel_err(a, b) <= 1e-6, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_within_twice_the_torch_path_error(dtype):
    o, gate, weight, dy = inputs((4, 33), 2, 64, True, seed=3)
    o16, gate16, w16 = (t.to(dtype) for t in (o, gate, weight))
    exact = outputs_and_grads("spec", *(t.to(dtype).float() for t in (o, gate, weight)), dy)
    ours = outputs_and_grads("triton", o16, gate16, w16, dy)
    torch16 = outputs_and_grads("torch", o16, gate16, w16, dy)
    for name, a, t, e in zip(("y", "do", "dgate", "dweight"), ours, torch16, exact):
        assert a.dtype == t.dtype == dtype, name
        assert rel_err(a, e) <= 2 * rel_err(t, e) + 1e-6, f"{name}: {rel_err(a, e):.2e} vs {rel_err(t, e):.2e}"


def test_rejects_bad_arguments():
    o, gate, weight, _ = inputs((2,), 2, 16, True)
    with pytest.raises(ValueError, match="backend"):
        gated_rms_norm(o, gate, weight, EPS, backend="cuda")
    with pytest.raises(ValueError, match=r"weight must be \[V\]"):
        gated_rms_norm(o, gate, weight[:8], EPS)
    with pytest.raises(ValueError, match="gate must be"):
        gated_rms_norm(o, gate[..., :8], weight, EPS)
    with pytest.raises(ValueError, match="float64"):
        gated_rms_norm(o.double(), gate.double(), weight.double(), EPS, backend="triton")
    assert gated_rms_norm(o.double(), gate.double(), weight.double(), EPS).dtype == torch.float64  # torch path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_layer_shape_bf16():
    """The 0.75b model's KDA output norm: 8,192 tokens x 16 heads x 128, bf16, within twice the torch path's
    error in the output and every gradient."""
    o, gate, weight, dy = inputs((1, 8192), 16, 128, True, seed=1)
    o16, gate16, w16 = (t.to(torch.bfloat16) for t in (o, gate, weight))
    exact = outputs_and_grads("spec", *(t.float() for t in (o16, gate16, w16)), dy)
    ours = outputs_and_grads("triton", o16, gate16, w16, dy)
    torch16 = outputs_and_grads("torch", o16, gate16, w16, dy)
    for name, a, t, e in zip(("y", "do", "dgate", "dweight"), ours, torch16, exact):
        assert rel_err(a, e) <= 2 * rel_err(t, e) + 1e-6, f"{name}: {rel_err(a, e):.2e} vs {rel_err(t, e):.2e}"


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile (Dynamo) is unsupported here")
def test_compiles_with_fullgraph_as_the_specification():
    """Traced by torch.compile the op is its specification (no Triton launch for Dynamo to trace): same values."""
    o, gate, weight, _ = inputs((2, 5), 2, 16, True)
    compiled = torch.compile(lambda a, b, c: gated_rms_norm(a, b, c, EPS, backend="triton"), fullgraph=True,
                             backend="aot_eager")
    assert rel_err(compiled(o, gate, weight), gated_rms_norm_reference(o, gate, weight, EPS)) <= 1e-6
