"""The fused Triton in-op activations of chunk_kda (``preprocess_triton``) against the PyTorch path of
``common.preprocess``, outputs and every gradient (dq, dk, dg_raw, dbeta_raw, dA_log, ddt_bias).

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set below before Triton is imported).
Cases: every combination of the three flags (l2norm of q/k, the forget gate, the beta sigmoid), K in {16, 32, 48}
(48: not a power of two), H in {1, 3}, dt_bias present and None, the scalar (GDN) gate, gate pre-activations far
into softplus' overflow and underflow ranges, all-zero q and k rows (the eps inside the square root), launch blocks
small enough that the sums over t for dA_log and ddt_bias span many blocks. Every buffer the kernels write is
poisoned with NaN first.

fp32: rel. RMS error <= 1e-6 against the PyTorch path (for the sums dA_log and ddt_bias: times their cancellation
factor, see ``cancellation``). 16-bit inputs: each output and gradient, measured against a float64 reference on the
same rounded inputs, within 2x the error of the PyTorch path on those inputs (with q_n, k_n cast to the same operand
dtype), or for fp32 results within the fp32 bound. End to end: chunk_kda with all three flags gives the same output,
final state and gradients with preprocess_backend="triton" (the fused activations) as with "torch", on either chunk
backend.
With CUDA: the layer's shape, T = 32k, H = 32, K = 128, bf16.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kimi_linear.ops.kda.common as common  # noqa: E402
import kimi_linear.ops.kda.preprocess_triton as pt  # noqa: E402
from kimi_linear.ops.norm import L2NORM_EPS  # noqa: E402
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

FP32_TOL = 1e-6  # the same fp32 formulas; only rounding of exp/log/rsqrt and the order of sums differ
NAMES = ("q", "k", "g", "beta", "dq", "dk", "dg", "dbeta", "dA_log", "ddt_bias")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_inputs(B, T, H, K, *, dt_bias=True, scalar_gate=False, gate_range=None, zero_rows=False, seed=0):
    """Raw (pre-activation) inputs (with ``zero_rows``, q and k each have an all-zero row); upstream gradients for
    every output."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if zero_rows:  # their gradient is 1/sqrt(eps) = 1000x the others': kept out of the other cases' error norms
        q[0, T // 2, H - 1] = 0.0
        k[-1, T - 1, 0] = 0.0
    g_shape = (B, T, H) if scalar_gate else (B, T, H, K)
    if gate_range is None:
        g = 3 * torch.randn(g_shape, generator=gen)
    else:
        lo, hi = gate_range
        g = lo + (hi - lo) * torch.rand(g_shape, generator=gen)
    beta = 3 * torch.randn(B, T, H, generator=gen)
    A_log = torch.randn(H, generator=gen)
    dt = torch.randn(H if scalar_gate else H * K, generator=gen) if dt_bias else None
    grads = [torch.randn(B, T, H, K, generator=gen) for _ in range(3)] + [torch.randn(B, T, H, generator=gen)]
    out = dict(q=q, k=k, g=g, beta=beta, A_log=A_log, dt_bias=dt)
    return {n: None if t is None else t.to(DEVICE) for n, t in out.items()}, [w.to(DEVICE) for w in grads]


def run(backend, inputs, upstream, flags, operand_dtype=None, dtype=None, param_dtype=None, launch=None):
    """(q, k, g, beta) out of ``common.preprocess`` and the gradients of a weighted sum of them w.r.t. the raw
    q, k, g, beta, A_log, dt_bias (None where the flags leave a parameter unused). Inputs cast to ``dtype``,
    A_log/dt_bias to ``param_dtype``, when given. ``launch``: the fused kernels (``preprocess_fused``) at that
    ``PreprocessLaunch`` (per-channel gate only: there is no scalar gate to broadcast)."""
    norm, gate, sig = flags
    x = {}
    for n, t in inputs.items():
        want = param_dtype if n in ("A_log", "dt_bias") else dtype
        x[n] = None if t is None else (t if want is None else t.to(want)).detach().requires_grad_()
    K = x["q"].shape[-1]
    if launch is not None:
        assert backend == "triton"
        outs = pt.preprocess_fused(x["q"], x["k"], x["g"], x["beta"], norm, gate, x["A_log"], x["dt_bias"], sig,
                                   operand_dtype, launch=launch)
    else:
        outs = common.preprocess(x["q"], x["k"], x["g"], x["beta"], norm, gate, x["A_log"], x["dt_bias"], sig, K,
                                 operand_dtype=operand_dtype, fused=backend == "triton")
    loss = sum((o.double() * w.double()).sum() for o, w in zip(outs, upstream, strict=True))
    leaves = [x[n] for n in ("q", "k", "g", "beta")]
    if gate:
        leaves += [x["A_log"]] + ([x["dt_bias"]] if x["dt_bias"] is not None else [])
    grads = list(torch.autograd.grad(loss, leaves))
    grads += [None] * (6 - len(grads))
    return list(outs) + grads


def exact(inputs, upstream, flags, dtype=None, param_dtype=None):
    """The float64 reference: the formulas of ``norm.l2norm`` and ``gate.kda_gate``/``beta_activation``, with
    autograd, on the inputs rounded to ``dtype`` / ``param_dtype``."""
    norm, gate, sig = flags
    x = {}
    for n, t in inputs.items():
        want = param_dtype if n in ("A_log", "dt_bias") else dtype
        x[n] = None if t is None else (t if want is None else t.to(want)).double().requires_grad_()
    q, k, g, beta = x["q"], x["k"], x["g"], x["beta"]
    K = q.shape[-1]
    if norm:
        q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)
        k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)
    if gate:
        pre = g if x["dt_bias"] is None else g + x["dt_bias"].reshape(g.shape[2:])
        rate = x["A_log"].exp()
        g = -(rate[:, None] if g.dim() == 4 else rate) * F.softplus(pre, threshold=1000)
    if sig:
        beta = torch.sigmoid(beta)
    if g.dim() == 3:
        g = g[..., None].expand(*g.shape, K)
    outs = [q, k, g, beta]
    loss = sum((o * w.double()).sum() for o, w in zip(outs, upstream, strict=True))
    leaves = [x[n] for n in ("q", "k", "g", "beta")]
    if gate:
        leaves += [x["A_log"]] + ([x["dt_bias"]] if x["dt_bias"] is not None else [])
    grads = list(torch.autograd.grad(loss, leaves))
    grads += [None] * (6 - len(grads))
    return outs + grads


def cancellation(inputs, ref):
    """dA_log and ddt_bias are sums over tokens of terms of both signs; an fp32 sum's relative error is the per-term
    one times ||sum |c||| / ||sum c||. The factors, from the float64 reference ``ref`` (outputs of ``exact``):
    ddt_bias sums dx (x = the gate pre-activation), dA_log sums dx * softplus(x) / sigmoid(x). Empty without the
    gate."""
    dx = ref[NAMES.index("dg")]
    if ref[NAMES.index("dA_log")] is None:
        return {}
    g = inputs["g"].double()
    z = g if inputs["dt_bias"] is None else g + inputs["dt_bias"].double().reshape(g.shape[2:])
    terms = {"ddt_bias": (dx, (0, 1)), "dA_log": (dx * F.softplus(z) / torch.sigmoid(z), (0, 1, *range(3, g.dim())))}
    return {n: (c.abs().sum(d).norm() / c.sum(d).norm()).item() for n, (c, d) in terms.items()}


def assert_within_twice_torch(ours, torch16, ref, factors):
    """16-bit inputs: each result within 2x the torch path's error against the float64 reference ``ref``. An fp32
    result (g, beta, and dA_log, ddt_bias with fp32 parameters) may instead sit at the fp32 bound, where both paths
    are at rounding level and "2x" is noise."""
    for name, a, t, e in zip(NAMES, ours, torch16, ref, strict=True):
        if e is None:
            assert a is None and t is None, name
            continue
        assert a.dtype == t.dtype and a.shape == t.shape, name
        err, err_torch = rel_err(a, e), rel_err(t, e)
        floor = FP32_TOL * max(1.0, factors.get(name, 1.0)) if a.dtype == torch.float32 else 0.0
        assert err <= max(2 * err_torch, floor), f"{name}: {err:.2e} vs the torch path's {err_torch:.2e}"


def assert_fp32_match(ours, ref, factors=None):
    """Every output and gradient within FP32_TOL of ``ref``, the sums within FP32_TOL times their cancellation."""
    factors = factors or {}
    for name, a, b in zip(NAMES, ours, ref, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        err, tol = rel_err(a, b), FP32_TOL * max(1.0, factors.get(name, 1.0))
        assert err <= tol, f"{name}: {err:.2e} > {tol:.2e}"


FLAGS = list(itertools.product((False, True), repeat=3))
FLAG_IDS = ["".join(n if f else "-" for n, f in zip(("N", "G", "S"), fl, strict=True)) for fl in FLAGS]


@pytest.mark.parametrize("dt_bias", [True, False], ids=["dtb", "nodtb"])
@pytest.mark.parametrize("H", [1, 3], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("K", [16, 32, 48], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
def test_fp32_matches_torch_path(flags, K, H, dt_bias):
    inputs, up = make_inputs(2, 37, H, K, dt_bias=dt_bias, seed=K + 7 * H)
    assert_fp32_match(run("triton", inputs, up, flags), run("torch", inputs, up, flags))


@pytest.mark.parametrize("B", [1, 2], ids=["B1", "B2"])
def test_fp32_strided_qk_read_in_place(B):
    """q and k as the conv output's column slices ([B, T, 3, H, K] unbound, as the KDA layer hands them over):
    the kernels read them where they lie (no copy, checked by the pointers the kernel gets) and every output and
    gradient equals the contiguous inputs'."""
    inputs, up = make_inputs(B, 37, 3, 16, seed=11)
    qkv = torch.randn(B, 37, 3, 3, 16, device=DEVICE)
    qkv[:, :, 0], qkv[:, :, 1] = inputs["q"], inputs["k"]
    strided = dict(inputs, q=qkv[:, :, 0], k=qkv[:, :, 1])
    assert not strided["q"].is_contiguous()
    flat = strided["q"].reshape(B * 37, 3, 16)
    assert pt._token_rows(flat, strided["k"].reshape(B * 37, 3, 16))[0].data_ptr() == qkv.data_ptr()
    assert_fp32_match(run("triton", strided, up, (True, True, True)), run("torch", inputs, up, (True, True, True)))


@pytest.mark.parametrize("dt_bias", [True, False], ids=["dtb", "nodtb"])
@pytest.mark.parametrize("flags", [(True, True, True), (False, True, False)], ids=["NGS", "-G-"])
def test_fp32_scalar_gate(flags, dt_bias):
    """GDN: one gate value per head, broadcast over K as a view; dt_bias [H]."""
    inputs, up = make_inputs(3, 21, 3, 32, dt_bias=dt_bias, scalar_gate=True, seed=5)
    ours, ref = run("triton", inputs, up, flags), run("torch", inputs, up, flags)
    assert ours[2].shape == (3, 21, 3, 32)
    assert_fp32_match(ours, ref)


@pytest.mark.parametrize("scalar_gate", [False, True], ids=["channel", "scalar"])
@pytest.mark.parametrize("gate_range", [(30.0, 100.0), (-100.0, -30.0), (-100.0, 100.0)], ids=["pos", "neg", "both"])
def test_fp32_extreme_gate_preactivations(gate_range, scalar_gate):
    """softplus' overflow (exp(100) is inf in fp32) and underflow (log(1 + exp(-60)) is 0 in fp32 unless done as
    log1p) ranges: the gate and its gradients stay accurate, against the torch path and the float64 reference."""
    flags = (True, True, True)
    inputs, up = make_inputs(2, 33, 3, 16, scalar_gate=scalar_gate, gate_range=gate_range, seed=11)
    inputs["dt_bias"] = inputs["dt_bias"].clamp(-1, 1)
    ours = run("triton", inputs, up, flags)
    ref64 = exact(inputs, up, flags)
    factors = cancellation(inputs, ref64)
    assert_fp32_match(ours, run("torch", inputs, up, flags), factors)
    assert_fp32_match(ours, [r if r is None else r.float() for r in ref64], factors)


@pytest.mark.parametrize("flags", [(True, True, True), (True, False, True), (False, True, False)],
                         ids=["NGS", "N-S", "-G-"])
def test_fp32_many_blocks(flags):
    """T = 256 tokens at 4 (forward) / 2 (backward) per program at K = 16, a launch passed down explicitly: 128
    partials per head in the sums."""
    inputs, up = make_inputs(1, 256, 3, 16, seed=3)
    launch = dataclasses.replace(pt.preprocess_launch(256, 16), fwd_bt=4, bwd_bt=2)
    assert_fp32_match(run("triton", inputs, up, flags, launch=launch), run("torch", inputs, up, flags))


def test_fp32_reductions_are_deterministic():
    """One token per program: 72 partials per head, summed in the same order every time."""
    inputs, up = make_inputs(1, 72, 3, 48, seed=4)
    launch = dataclasses.replace(pt.preprocess_launch(72, 48), fwd_bt=1, bwd_bt=1)
    a = run("triton", inputs, up, (True, True, True), launch=launch)
    b = run("triton", inputs, up, (True, True, True), launch=launch)
    for name, x, y in zip(NAMES, a, b, strict=True):
        assert torch.equal(x, y), name


def test_zero_rows_use_eps():
    """All-zero q and k rows normalise to 0 with gradient dq_n / sqrt(eps), as in the torch path."""
    inputs, up = make_inputs(1, 4, 2, 32, zero_rows=True, seed=9)
    ours = run("triton", inputs, up, (True, False, False))
    assert_fp32_match(ours, run("torch", inputs, up, (True, False, False)))
    assert torch.equal(ours[0][0, 2, 1], torch.zeros(32, device=DEVICE))
    assert rel_err(ours[4][0, 2, 1], up[0][0, 2, 1] / L2NORM_EPS**0.5) <= FP32_TOL
    assert rel_err(ours[5][0, 3, 0], up[1][0, 3, 0] / L2NORM_EPS**0.5) <= FP32_TOL


@pytest.mark.parametrize("param_dtype", [None, "same"], ids=["params-fp32", "params-16bit"])
@pytest.mark.parametrize("operand", ["fp32", "same"], ids=["qk-fp32", "qk-16bit"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_within_twice_the_torch_path_error(dtype, operand, param_dtype):
    flags = (True, True, True)
    operand_dtype = dtype if operand == "same" else None
    pdt = dtype if param_dtype == "same" else None
    inputs, up = make_inputs(2, 40, 3, 48, seed=21)
    ref = exact(inputs, up, flags, dtype=dtype, param_dtype=pdt)
    ours = run("triton", inputs, up, flags, operand_dtype=operand_dtype, dtype=dtype, param_dtype=pdt)
    torch16 = run("torch", inputs, up, flags, operand_dtype=operand_dtype, dtype=dtype, param_dtype=pdt)
    assert_within_twice_torch(ours, torch16, ref, cancellation(inputs, ref))


def _fused(t: torch.Tensor) -> bool:
    """Whether t comes (through a view) out of the fused autograd Function."""
    fn = t.grad_fn
    names = [type(fn).__name__] + [type(f).__name__ for f, _ in fn.next_functions if f is not None]
    return any("PreprocessFunction" in n for n in names)


def test_fused_only_where_asked_and_runnable(monkeypatch):
    """Only for callers that ask (the Triton chunk backend does; the PyTorch reference paths do not), and on CPU
    tensors only under the interpreter."""
    q = torch.randn(1, 3, 2, 16, requires_grad=True, device=DEVICE)
    out = common.preprocess(q, q, q, q[..., 0], True, False, None, None, False, 16)
    assert not _fused(out[0])
    out = common.preprocess(q, q, q, q[..., 0], True, False, None, None, False, 16, fused=True)
    assert _fused(out[0])
    if DEVICE == "cpu":  # (the interpreter is chosen when Triton is imported: only then can CPU tensors run)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        out = common.preprocess(q, q, q, q[..., 0], True, False, None, None, False, 16, fused=True)
        assert not _fused(out[0])


def chunk_run(backend, preprocess_backend, seed=0):
    """Outputs, final state and gradients of chunk_kda with all three in-op activations, fp32, on the chunk
    ``backend`` and the ``preprocess_backend``; also the raw inputs."""
    from kimi_linear.ops.kda.chunk import chunk_kda
    from tests.utils import loss_of

    gen = torch.Generator().manual_seed(seed)
    B, T, H, K, V = 2, 70, 2, 32, 16
    raw = dict(q=torch.randn(B, T, H, K, generator=gen), k=torch.randn(B, T, H, K, generator=gen),
               v=torch.randn(B, T, H, V, generator=gen), g=torch.randn(B, T, H, K, generator=gen),
               beta=torch.randn(B, T, H, generator=gen), A_log=torch.randn(H, generator=gen) - 1,
               dt_bias=torch.randn(H * K, generator=gen), initial_state=torch.randn(B, H, K, V, generator=gen))
    x = {n: t.to(DEVICE).requires_grad_() for n, t in raw.items()}
    o, ht = chunk_kda(**x, output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                      use_beta_sigmoid_in_kernel=True, backend=backend, preprocess_backend=preprocess_backend)
    grads = torch.autograd.grad(loss_of(o, ht), list(x.values()))
    names = ("o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias", "dh0")
    return dict(zip(names, [o, ht, *grads], strict=True)), raw


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_chunk_kda_end_to_end_fused_matches_torch_activations(backend):
    """On either chunk backend, with the activations on the fused kernels and on PyTorch. The two sides differ only in the last bits of q_n, k_n, g, beta (<= 1e-6 above), which the chunk kernel
    carries into its outputs and gradients at the same level: FP32_TOL each. dA_log and ddt_bias are sums over
    tokens of terms of both signs, so their relative difference is the per-token one times the cancellation
    ||sum |c||| / ||sum c|| (the rule of test_kda_chunk_triton's fused-activation test), computed from the per-token
    terms: ddt_bias sums dx (x = the gate pre-activation), dA_log sums dx * softplus(x) / sigmoid(x)."""
    on, _ = chunk_run(backend, "triton")
    off, raw = chunk_run(backend, "torch")
    H, K = raw["q"].shape[2:]
    dx = off["dg"].detach().cpu().double()
    z = (raw["g"] + raw["dt_bias"].reshape(H, K)).double()
    terms = {"ddt_bias": (dx, (0, 1)), "dA_log": (dx * F.softplus(z) / torch.sigmoid(z), (0, 1, 3))}
    for name in on:
        a, b = on[name], off[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        tol = FP32_TOL
        if name in terms:
            c, dims = terms[name]
            tol *= (c.abs().sum(dims).norm() / c.sum(dims).norm()).item()
        assert rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.2e} > {tol:.2e}"


@gpu
def test_layer_shape_bf16_on_gpu():
    """T = 32k, H = 32, K = 128, bf16 inputs and q_n/k_n, fp32 A_log/dt_bias: every output and gradient within 2x
    the torch path's error against the float64 reference (fp32 results: or the fp32 bound)."""
    flags = (True, True, True)
    inputs, up = make_inputs(1, 32768, 32, 128, seed=0)
    ref = exact(inputs, up, flags, dtype=torch.bfloat16)
    ours = run("triton", inputs, up, flags, operand_dtype=torch.bfloat16, dtype=torch.bfloat16)
    torch16 = run("torch", inputs, up, flags, operand_dtype=torch.bfloat16, dtype=torch.bfloat16)
    assert_within_twice_torch(ours, torch16, ref, cancellation(inputs, ref))
