"""The Triton causal depthwise conv (+ SiLU) against the PyTorch path of ``causal_conv1d``, with every gradient.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set below before Triton is imported)
at small sizes: W in {2, 3, 4, 8}, C not a multiple of the channel block, batches without cu_seqlens, varlen batches
with empty, 1-token and shorter-than-W segments and blocks straddling boundaries, initial state on/off, SiLU and
no activation, the final state and its gradient, and a non-default launch (small row and channel blocks, passed as
a ``ConvLaunch``). Every buffer the kernels write is poisoned with NaN first.

fp32: the kernels and the reference differ only in summation order, rel. RMS error <= 1e-6 on y, final state, dx,
dweight and d initial_state. 16-bit inputs: each output and gradient of the kernels, measured against the reference
run in fp64 on the same (rounded) inputs, must be within 2x the error of the PyTorch path run in that 16-bit dtype.
With CUDA: the same cases compiled, plus the layer's shape (T = 32k, C = 4096, bf16).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kimi_linear.ops.conv import causal_conv1d, naive_causal_conv1d  # noqa: E402
from kimi_linear.ops.conv_triton import _layout, causal_conv1d_triton, conv_launch  # noqa: E402
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

FP32_TOL = 1e-6  # same products, only the order of the (at most W-term, or per-block) sums differs
NAMES = ("y", "final", "dx", "dweight", "dh0")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_inputs(B, T, C, W, lengths, with_state, dtype, seed, weight_3d=False):
    gen = torch.Generator().manual_seed(seed)
    if lengths is not None:
        B, T = 1, sum(lengths)
    N = B if lengths is None else len(lengths)
    x = torch.randn(B, T, C, generator=gen)
    w = torch.randn(C, 1, W, generator=gen) / W**0.5
    h0 = torch.randn(N, C, W - 1, generator=gen) if with_state else None
    cu = None if lengths is None else torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    gy = torch.randn(B, T, C, generator=gen)
    gf = torch.randn(N, C, W - 1, generator=gen)
    x, gy, gf = (t.to(device=DEVICE, dtype=dtype) for t in (x, gy, gf))
    w = w.to(DEVICE) if weight_3d else w[:, 0].to(DEVICE)
    h0 = None if h0 is None else h0.to(device=DEVICE, dtype=dtype)
    cu = None if cu is None else cu.to(DEVICE)
    return x, w, h0, cu, gy, gf


def run(backend, x, w, h0, cu, gy, gf, activation, dtype=None):
    """Outputs and gradients (y, final, dx, dweight, dh0) of causal_conv1d, inputs cast to ``dtype`` if given."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    x, w = cast(x).detach().requires_grad_(), cast(w).detach().requires_grad_()
    h0 = None if h0 is None else cast(h0).detach().requires_grad_()
    y, final = causal_conv1d(x, w, initial_state=h0, cu_seqlens=cu, activation=activation, output_final_state=True,
                             backend=backend)
    loss = (y.double() * gy.double()).sum() + (final.double() * gf.double()).sum()
    leaves = [t for t in (x, w, h0) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    out = [y, final, grads[0], grads[1]]
    out.append(grads[2] if h0 is not None else None)
    return out


CASES = [
    # B, T, C, W, lengths, with_state, activation
    (2, 37, 12, 4, None, True, "silu"),
    (3, 9, 7, 3, None, False, "silu"),
    (1, 1, 5, 4, None, True, "silu"),
    (2, 2, 6, 4, None, True, None),
    (1, 70, 130, 2, None, True, "silu"),  # C > one channel block, not a multiple of it; T > one row block
    (1, None, 9, 4, [5, 0, 1, 2, 17], True, "silu"),
    (1, None, 9, 3, [0, 3, 1, 60, 2, 0], False, None),  # the 60-token segment straddles the 64-row block
    (1, None, 10, 2, [1, 64, 1, 3], True, None),
    (1, None, 11, 8, [3, 7, 0, 20, 1], True, "silu"),  # the widest supported filter, all segments < 2W
]
IDS = [
    "B2-T37-C12-W4-h0", "B3-T9-C7-W3", "B1-T1-C5-W4-h0", "B2-T2-C6-W4-h0-noact", "B1-T70-C130-W2-h0",
    "varlen-5.0.1.2.17-W4-h0", "varlen-0.3.1.60.2.0-W3-noact", "varlen-1.64.1.3-W2-h0-noact",
    "varlen-3.7.0.20.1-W8-h0",
]


@pytest.mark.parametrize("B,T,C,W,lengths,with_state,activation", CASES, ids=IDS)
def test_fp32_matches_torch_path(B, T, C, W, lengths, with_state, activation):
    x, w, h0, cu, gy, gf = make_inputs(B, T, C, W, lengths, with_state, torch.float32, seed=W * 100 + C)
    ours = run("triton", x, w, h0, cu, gy, gf, activation)
    ref = run("torch", x, w, h0, cu, gy, gf, activation)
    for name, a, b in zip(NAMES, ours, ref, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel_err(a, b) <= FP32_TOL, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("B,T,C,W,lengths,with_state,activation", [CASES[0], CASES[5], CASES[6]],
                         ids=[IDS[0], IDS[5], IDS[6]])
def test_fp32_strided_rows_read_in_place(B, T, C, W, lengths, with_state, activation):
    """x as the column slice of a wider projection (rows 3 C + 5 elements apart, as the KDA layer's packed
    projection hands it over): the kernels read it where it lies, no contiguous copy, and every output and gradient
    equals the contiguous input's."""
    x, w, h0, cu, gy, gf = make_inputs(B, T, C, W, lengths, with_state, torch.float32, seed=W * 100 + C)
    wide = torch.randn(*x.shape[:2], 3 * C + 5, device=DEVICE)
    wide[..., C + 2 : 2 * C + 2] = x
    strided = wide[..., C + 2 : 2 * C + 2]
    assert not strided.is_contiguous()
    rows = _layout(strided, cu)[0]
    assert rows.data_ptr() == strided.data_ptr() and rows.stride() == (3 * C + 5, 1)  # no copy
    with torch.no_grad():
        y, final = causal_conv1d(strided, w, initial_state=h0, cu_seqlens=cu, activation=activation,
                                 output_final_state=True, backend="triton")
    ours = run("triton", strided, w, h0, cu, gy, gf, activation)
    ref = run("torch", x, w, h0, cu, gy, gf, activation)
    assert rel_err(y, ref[0]) <= FP32_TOL and rel_err(final, ref[1]) <= FP32_TOL
    for name, a, b in zip(NAMES, ours, ref, strict=True):
        if b is not None:
            assert rel_err(a, b) <= FP32_TOL, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no-h0"])
def test_fp32_explicit_launch(with_state):
    """A launch passed down explicitly (4-row forward, 2-row backward, 4-channel blocks) is the one the kernels use
    in both directions: blocks straddle every boundary of a varlen batch and the channels span 3 blocks."""
    lengths, C, W = [5, 0, 1, 2, 9], 9, 4
    x, w, h0, cu, gy, gf = make_inputs(1, None, C, W, lengths, with_state, torch.float32, seed=5)
    launch = dataclasses.replace(conv_launch(C, with_state), fwd_bt=4, bwd_bt=2, bc=4)
    leaves = [t.detach().requires_grad_() for t in (x, w, h0) if t is not None]
    y, final = causal_conv1d_triton(leaves[0], leaves[1], leaves[2] if with_state else None, cu, "silu", True,
                                    launch=launch)
    loss = (y.double() * gy.double()).sum() + (final.double() * gf.double()).sum()
    ours = [y, final, *torch.autograd.grad(loss, leaves)]
    ref = [t for t in run("torch", x, w, h0, cu, gy, gf, "silu") if t is not None]
    for name, a, b in zip(NAMES[: len(ref)], ours, ref, strict=True):
        assert rel_err(a, b) <= FP32_TOL, f"{name}: {rel_err(a, b):.2e}"


def test_fp32_matches_token_by_token_reference():
    """Against the sliding-window loop too (not only the other fast path), per segment of a varlen batch."""
    lengths, C, W = [4, 0, 1, 2, 9], 13, 4
    x, w, h0, cu, _, _ = make_inputs(1, None, C, W, lengths, True, torch.float32, seed=3)
    y, final = causal_conv1d(x, w, initial_state=h0, cu_seqlens=cu, output_final_state=True, backend="triton")
    for n, (s, L) in enumerate(zip(cu[:-1].tolist(), lengths, strict=False)):
        y_ref, final_ref = naive_causal_conv1d(x[:, s : s + L], w, initial_state=h0[n : n + 1])
        if L:
            assert rel_err(y[:, s : s + L], y_ref) <= FP32_TOL
        assert rel_err(final[n : n + 1], final_ref) <= FP32_TOL, f"final state of segment {n} (length {L})"


def test_checkpoint_weight_layout_and_no_final_state():
    """weight as [C, 1, W] (dweight keeps that shape); output_final_state=False returns None."""
    x, w, h0, _, gy, _ = make_inputs(2, 20, 6, 4, None, True, torch.float32, seed=11, weight_3d=True)
    grads = []
    for backend in ("triton", "torch"):
        xl, wl, hl = (t.detach().requires_grad_() for t in (x, w, h0))
        y, final = causal_conv1d(xl, wl, initial_state=hl, backend=backend)
        assert final is None
        grads.append((y, *torch.autograd.grad((y * gy).sum(), (xl, wl, hl))))
    assert grads[0][2].shape == w.shape
    for name, a, b in zip(("y", "dx", "dweight", "dh0"), grads[0], grads[1], strict=True):
        assert rel_err(a, b) <= FP32_TOL, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "lengths,W,with_state,activation",
    [(None, 4, True, "silu"), ([5, 0, 1, 2, 70], 4, True, "silu"), ([3, 40, 1], 3, False, None)],
    ids=["B2-T80-W4-h0", "varlen-W4-h0", "varlen-W3-noact"],
)
def test_16bit_within_twice_the_torch_path_error(dtype, lengths, W, with_state, activation):
    x, w, h0, cu, gy, gf = make_inputs(2, 80, 20, W, lengths, with_state, dtype, seed=7 + W)
    w = w.to(dtype)  # the model's filters are in the model's dtype
    exact = run("torch", x, w, h0, cu, gy, gf, activation, dtype=torch.float64)
    ours = run("triton", x, w, h0, cu, gy, gf, activation)
    torch16 = run("torch", x, w, h0, cu, gy, gf, activation)
    for name, a, t, e in zip(NAMES, ours, torch16, exact, strict=True):
        if e is None:
            continue
        assert a.dtype == t.dtype, name
        err, err_torch = rel_err(a, e), rel_err(t, e)
        assert err <= 2 * err_torch, f"{name}: {err:.2e} vs the torch path's {err_torch:.2e}"


def test_rejects_unknown_backend_and_wide_filters():
    x = torch.randn(1, 4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="backend"):
        causal_conv1d(x, torch.randn(6, 4, device=DEVICE), backend="cuda")
    with pytest.raises(ValueError, match="W <= 8"):
        causal_conv1d(x, torch.randn(6, 9, device=DEVICE), backend="triton")


def test_auto_is_the_torch_path_on_cpu():
    x = torch.randn(1, 5, 4, requires_grad=True)
    y, _ = causal_conv1d(x, torch.randn(4, 4))
    assert "CausalConv1dFunction" not in type(y.grad_fn).__name__


@gpu
def test_layer_shape_bf16_on_gpu():
    """T = 32k packed as 4 sequences with initial states, C = 4096, bf16: kernels within 2x the torch path's error
    against the fp32 torch path, for y, the final state and every gradient."""
    lengths = [1, 3, 12284, 20480]
    x, w, h0, cu, gy, gf = make_inputs(1, None, 4096, 4, lengths, True, torch.bfloat16, seed=0)
    w = w.to(torch.bfloat16)
    exact = run("torch", x, w, h0, cu, gy, gf, "silu", dtype=torch.float32)
    ours = run("triton", x, w, h0, cu, gy, gf, "silu")
    torch16 = run("torch", x, w, h0, cu, gy, gf, "silu")
    for name, a, t, e in zip(NAMES, ours, torch16, exact, strict=True):
        err, err_torch = rel_err(a, e), rel_err(t, e)
        assert err <= 2 * err_torch, f"{name}: {err:.2e} vs the torch path's {err_torch:.2e}"
