"""Triton chunkwise KDA (forward + backward) against the token-by-token reference of paper Eq. 1.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set by tests/ops/conftest.py before
Triton is imported) at small sizes: outputs, final states and every gradient (dq, dk, dv, dg, dbeta, dh0, and dA_log,
ddt_bias through the fused gate) against autograd through ``naive_recurrent_kda``. Every buffer the kernels write is
poisoned with NaN first. With CUDA the same cases run compiled, plus real sizes (H=32, K=V=128, bf16, T up to 8192)
against ``naive_chunk_kda`` in fp32 on the GPU (the CPU cases and tests/ops/test_kda.py establish that it equals the
recurrence to ~1e-6).

Error budget for 16-bit inputs: the kernel's relative RMS error against the fp32 reference on the original fp32
inputs must be at most twice the error of that same reference fed the 16-bit-rounded inputs (output and gradients
returned in the 16-bit dtype), and below an absolute bound per tensor (BF16_ABS).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

import pytest
import torch

import kimi_linear.ops.kda.chunk_common as chunk_common
from kimi_linear.ops.kda import beta_activation, chunk_kda, kda_gate, naive_chunk_kda, naive_recurrent_kda
from kimi_linear.ops.kda.chunk_fwd import fwd_launch
from kimi_linear.ops.kda.chunk_triton import chunk_kda_triton, chunk_kda_triton_recomputing
from kimi_linear.ops.norm import l2norm
from tests.utils import kda_inputs, leaves, loss_of, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

FP32_TOL = 2e-5  # fp32 on both sides; only the order of summation differs (measured ~1e-6)
BF16_ABS = {"o": 1e-2, "ht": 1e-2, "grad": 2e-2}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def reference(q, k, v, g, beta, scale=None, initial_state=None, cu_seqlens=None, *, l2norm_qk=False,
              A_log=None, dt_bias=None, beta_sigmoid=False):
    """Activations by their references, then paper Eq. 1 one sequence at a time, in fp32; differentiable.

    Returns o ``[B, T, H, V]`` fp32 and the final states ``[N, H, K, V]``.
    """
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if l2norm_qk:
        q, k = l2norm(q), l2norm(k)
    if A_log is not None:
        g = kda_gate(g, A_log, dt_bias)
    if beta_sigmoid:
        beta = beta_activation(beta)
    if g.dim() == 3:
        g = g[..., None].expand_as(q)
    if cu_seqlens is None:
        return naive_recurrent_kda(q, k, v, g, beta, scale, initial_state, output_final_state=True)
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        h0 = None if initial_state is None else initial_state[i : i + 1]
        o_i, h_i = naive_recurrent_kda(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], scale, h0,
                                       output_final_state=True)
        if h_i is None or e == s:  # an empty sequence passes its state through
            h_i = h0 if h0 is not None else q.new_zeros(1, *q.shape[2:], v.shape[-1])
        outs.append(o_i)
        states.append(h_i)
    return torch.cat(outs, dim=1), torch.cat(states)


def decay_tol(g: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> float:
    """fp32 tolerance of a chunked form for these gates: FP32_TOL, or more where the cumulative log-decay G inside a
    64-token chunk grows large (after g = -1000, or many strong gates): fp32 resolves G - G' only to ~2^-24 |G|,
    and every exp(G_t - G_i) inherits that absolute error. The PyTorch chunked reference shows the same loss."""
    g = g.detach().float().cpu()
    if g.dim() == 3:
        g = g[..., None]
    bounds = [0, g.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    worst = 0.0
    for s, e in zip(bounds, bounds[1:]):
        for c in range(s, e, 64):
            G = g[:, c:min(c + 64, e)].cumsum(dim=1)
            worst = max(worst, G.abs().max().item() if G.numel() else 0.0)
    return max(FP32_TOL, 6 * 2.0**-24 * worst)


def check_fwd_bwd(x: dict, **kwargs):
    """Run the Triton op and the reference on copies of x (leaves), compare outputs, states and all gradients."""
    a = leaves({n: t.to(DEVICE) if t is not None else None for n, t in x.items()})
    b = leaves(x)
    o, ht = chunk_kda(**a, output_final_state=True, backend="triton", **kwargs)
    cu = kwargs.get("cu_seqlens")
    cu = None if cu is None else cu.cpu()
    o_ref, ht_ref = reference(**b, scale=kwargs.get("scale"), cu_seqlens=cu)
    assert o.shape == o_ref.shape and o.dtype == x["v"].dtype
    loss_of(o, ht).backward()
    loss_of(o_ref, ht_ref).backward()
    got = {"o": o, "ht": ht, **{"d" + n: t.grad for n, t in a.items() if t is not None}}
    want = {"o": o_ref, "ht": ht_ref, **{"d" + n: t.grad for n, t in b.items() if t is not None}}
    tol = decay_tol(x["g"], cu)
    for n in want:
        assert got[n] is not None, f"no {n}"
        assert rel_err(got[n].cpu(), want[n]) < tol, n


SHAPES = [(1, 70, 1, 16, 32, True), (2, 63, 2, 32, 16, False), (1, 1, 1, 16, 16, True)]


@pytest.mark.parametrize(
    "B,T,H,K,V,with_state", SHAPES, ids=[f"B{b}-T{t}-H{h}-K{k}-V{v}-{'h0' if s else 'no-h0'}" for b, t, h, k, v, s in SHAPES]
)
def test_matches_recurrence_with_gradients(B, T, H, K, V, with_state):
    x = kda_inputs(B, T, H, K, V, with_state=with_state)
    check_fwd_bwd(x, scale=0.3 if K == 32 else None)


def test_varlen_with_empty_and_single_token_segments():
    cu = torch.tensor([0, 0, 1, 66, 100], dtype=torch.int32)
    x = kda_inputs(1, 100, 1, 16, 16, N=4)
    check_fwd_bwd(x, cu_seqlens=cu.to(DEVICE))


def test_layouts_are_cached_per_sequence_lengths_and_right():
    """One device layout per (sequence lengths, device), equal-length batch or varlen (building one copies host
    tensors to the device); an equal-length batch and its cu_seqlens describe the same packing."""
    dev = torch.device(DEVICE)
    a = chunk_common.layout_for(None, 3, 130, dev)
    assert chunk_common.layout_for(None, 3, 130, dev) is a
    cu = torch.tensor([0, 130, 260, 390], dtype=torch.int32, device=DEVICE)
    b = chunk_common.layout_for(cu, 1, 390, dev)
    assert b is a
    c = chunk_common.layout_for(torch.tensor([0, 100, 390], dtype=torch.int32, device=DEVICE), 1, 390, dev)
    assert c is not a and (c.N, c.NT) == (2, 2 + 5)
    assert (a.N, a.NT) == (3, 9)
    assert a.cu_seqlens.tolist() == [0, 130, 260, 390] and a.chunk_offsets.tolist() == [0, 3, 6, 9]
    assert a.chunk_indices.tolist() == [[i, j] for i in range(3) for j in range(3)]


@pytest.mark.parametrize("dtype,depth", [(torch.float16, 1), (torch.float32, 0)], ids=["fp16", "fp32"])
def test_state_stages_below_the_minimum_are_refused(dtype, depth):
    """The state pass's prefetch depth per input dtype; below min_stages (1 stage faulted for 16-bit inputs on the
    H200) it is refused by name."""
    launch = fwd_launch(16, 16, dtype)
    assert launch.state.stages >= chunk_common.min_stages(dtype)
    launch = dataclasses.replace(launch, state=dataclasses.replace(launch.state, stages=depth))
    x = kda_inputs(1, 8, 1, 16, 16, with_state=False)
    x = {n: (t if n == "g" else t.to(dtype)).to(DEVICE) for n, t in x.items() if t is not None}
    with pytest.raises(ValueError, match="StateLaunch.stages"):
        chunk_kda_triton(**x, fwd=launch)


class _SharedMemoryBound:
    """Stands in for a Triton kernel whose build needs more shared memory than the GPU has: ``BV * num_stages``
    units, of which ``fits`` are there. Records the settings tried and the grids launched."""

    __name__ = "shared_memory_bound"

    def __init__(self, fits):
        self.fits, self.tried, self.grids = fits, [], []

    def __getitem__(self, grid):
        def launch(*args, BV, num_stages, **kwargs):
            self.tried.append((BV, num_stages))
            if BV * num_stages > self.fits:
                from triton.runtime.errors import OutOfResources

                raise OutOfResources(1000 * BV * num_stages, 1000 * self.fits, "shared memory")
            self.grids.append(grid)
            return BV, num_stages

        return launch


def test_fitting_launch_steps_down_to_what_fits_and_remembers(monkeypatch):
    monkeypatch.setattr(chunk_common, "_FITTING", {})

    def grid(bv):
        return (256 // bv, 4)

    # 16-bit: depth 3, 2, then the V block halved (depth back at 3, then 2)
    kernel = _SharedMemoryBound(fits=40)
    assert chunk_common.launch_fitting(kernel, grid, 32, 3, dtype=torch.bfloat16, K=256) == (16, 2)
    assert kernel.tried == [(32, 3), (32, 2), (16, 3), (16, 2)]
    assert kernel.grids == [(16, 4)]  # the grid follows the V block
    # the setting that fits is remembered per constexprs ...
    assert chunk_common.launch_fitting(kernel, grid, 32, 3, dtype=torch.bfloat16, K=256) == (16, 2)
    assert kernel.tried[4:] == [(16, 2)]
    kernel.tried.clear()
    assert chunk_common.launch_fitting(kernel, grid, 32, 1, dtype=torch.bfloat16, K=128) == (32, 1)
    assert kernel.tried == [(32, 1)]  # ... a launch that fits as configured is not changed
    # fp32 may go down to one stage before the V block is narrowed
    kernel = _SharedMemoryBound(fits=32)
    assert chunk_common.launch_fitting(kernel, grid, 32, 2, dtype=torch.float32, K=256) == (32, 1)
    # 16-bit never goes below two stages; the error reaches the caller when nothing fits
    from triton.runtime.errors import OutOfResources

    kernel = _SharedMemoryBound(fits=16)
    with pytest.raises(OutOfResources):
        chunk_common.launch_fitting(kernel, grid, 32, 3, dtype=torch.bfloat16, K=512)
    assert kernel.tried == [(32, 3), (32, 2), (16, 3), (16, 2)]


def test_kernels_fit_the_h200_at_the_largest_head_size():
    """Every kernel of a forward + backward at K = V = 256, bf16 and fp32, compiled for sm_90 offline (Triton's
    compiler and ptxas, no GPU) as the launchers would launch it, fits in the H200's shared memory."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"} | {"PYTHONPATH": str(root)}
    for dtype in ("bf16", "fp32"):
        p = subprocess.run([sys.executable, "-m", "benchmarks", "kda_chunk_build", "--K", "256", "--dtype", dtype,
                            "--check"], capture_output=True, text=True, env=env, cwd=root)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert re.search(r"^\d+ builds, 0 over the shared-memory limit$", p.stdout, re.M), p.stdout[-3000:]


def test_extreme_gates_are_exact_and_finite():
    """g = -1000 (the state is wiped) next to gates near 0, across sub-block and chunk boundaries (G reaches ~-1000
    inside the chunk, so the tolerance is ~3.6e-4: see decay_tol; measured errors up to ~1.1e-4)."""
    x = kda_inputs(1, 80, 1, 16, 16, gate_scale=1e-3)
    g = x["g"]
    g[:, 5] = -1000.0
    g[:, 17:19, :, :8] = -1000.0
    g[:, 64] = -1000.0
    check_fwd_bwd(x)


def test_fused_activations_with_gate_gradients():
    """L2 norm of q/k, the gate -exp(A_log) softplus(x + dt_bias) and the beta sigmoid in the op."""
    B, T, H, K, V = 1, 40, 2, 16, 16
    x = kda_inputs(B, T, H, K, V)
    x["q"], x["k"] = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    x["g"] = torch.randn(B, T, H, K)
    x["beta"] = torch.randn(B, T, H)
    x["A_log"], x["dt_bias"] = torch.randn(H) * 0.5, torch.randn(H * K) * 0.5
    kw = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)

    def grads(run, inputs):
        lv = leaves(inputs)
        o, ht = run(lv)
        loss_of(o, ht).backward()
        return {"o": o, "ht": ht, **{"d" + n: t.grad for n, t in lv.items()}}

    got = grads(lambda lv: chunk_kda(**lv, output_final_state=True, backend="triton", **kw),
                {n: t.to(DEVICE) for n, t in x.items()})
    want = grads(lambda lv: reference(lv["q"], lv["k"], lv["v"], lv["g"], lv["beta"], None, lv["initial_state"],
                                      l2norm_qk=True, A_log=lv["A_log"], dt_bias=lv["dt_bias"], beta_sigmoid=True), x)
    tol = decay_tol(kda_gate(x["g"], x["A_log"], x["dt_bias"]))
    # dA_log and ddt_bias are sums over tokens of terms of both signs, so their relative error is the per-token
    # error times the cancellation ||sum |c||| / ||sum c||, computed here from the reference's per-token terms:
    # ddt_bias sums dx (x = the gate pre-activation), dA_log sums dx * softplus(x + b) / sigmoid(x + b).
    dx = want["dg"]  # [B, T, H, K]
    z = x["g"] + x["dt_bias"].reshape(H, K)
    terms = {"ddt_bias": dx, "dA_log": dx * torch.nn.functional.softplus(z) / torch.sigmoid(z)}
    sums = {"ddt_bias": (0, 1), "dA_log": (0, 1, 3)}
    for n in want:
        t = tol
        if n in terms:
            c = terms[n]
            t = tol * (c.abs().sum(sums[n]).norm() / c.sum(sums[n]).norm()).item()
        assert rel_err(got[n].cpu(), want[n]) < t, n


def test_scalar_gate_gdn():
    x = kda_inputs(2, 50, 2, 16, 16, scalar_gate=True)
    check_fwd_bwd(x)


def test_zero_length_passes_the_state_through():
    x = leaves({n: t.to(DEVICE) for n, t in kda_inputs(2, 0, 1, 16, 16).items()})
    o, ht = chunk_kda(**x, output_final_state=True, backend="triton")
    assert o.shape == (2, 0, 1, 16) and torch.equal(ht, x["initial_state"])
    ws = torch.randn(ht.shape, device=DEVICE)
    (ht * ws).sum().backward()
    assert torch.equal(x["initial_state"].grad, ws)


def test_no_final_state_and_no_grad():
    x = {n: (t.to(DEVICE) if t is not None else None) for n, t in kda_inputs(1, 20, 1, 16, 16).items()}
    with torch.no_grad():
        o, ht = chunk_kda(**x, backend="triton")
    o_ref, _ = reference(**{n: (t.cpu() if t is not None else None) for n, t in x.items()})
    assert ht is None
    assert rel_err(o.cpu(), o_ref) < FP32_TOL



def prepare_op_inputs(xq, xk, xv, f, b, scale_f):
    """Element-wise glue a layer runs before the op: SiLU, the q/k L2 norm, a gate and the beta sigmoid."""
    q = l2norm(torch.nn.functional.silu(xq))
    k = l2norm(torch.nn.functional.silu(xk))
    scale_f = scale_f[:, None] if f.dim() == 4 else scale_f  # per head
    return q, k, torch.nn.functional.silu(xv), -torch.nn.functional.softplus(f) * scale_f, torch.sigmoid(b)


@pytest.mark.parametrize("scalar_gate", [False, True], ids=["kda", "gdn"])
def test_recomputing_op_equals_the_op_on_the_glue_and_keeps_only_inputs_and_products(scalar_gate):
    """``chunk_kda_triton_recomputing`` against ``chunk_kda_triton`` on the glue's results (same kernels, so the
    same numbers up to fp32 summation order): output and the gradients of every input; it keeps the inputs and
    two products (A_qk, T), not q, k, v, g, beta, W, U or any element-wise intermediate."""
    gen = torch.Generator().manual_seed(21)
    B, T, H, K, V = 1, 90, 2, 16, 32
    shapes = [(B, T, H, K), (B, T, H, K), (B, T, H, V), (B, T, H) if scalar_gate else (B, T, H, K), (B, T, H), (H,)]
    x = {n: torch.randn(*shape, generator=gen) for n, shape in zip(("xq", "xk", "xv", "f", "b", "scale_f"), shapes)}
    x["scale_f"] = x["scale_f"].abs() + 0.1
    cu = torch.tensor([0, 30, 31, 90], device=DEVICE)
    a = {n: t.to(DEVICE) for n, t in leaves(x).items()}
    b = {n: t.to(DEVICE) for n, t in leaves(x).items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        o = chunk_kda_triton_recomputing(prepare_op_inputs, *a.values(), cu_seqlens=cu)
    inputs = {id(t) for t in a.values()}
    products = [t for t in saved if id(t) not in inputs]
    assert inputs <= {id(t) for t in saved} and len(products) == 2
    assert sorted(tuple(t.shape) for t in products) == [(T, H, 64)] * 2
    o_ref, _ = chunk_kda_triton(*prepare_op_inputs(*b.values()), cu_seqlens=cu)
    assert torch.equal(o, o_ref)
    loss_of(o, None).backward()
    loss_of(o_ref, None).backward()
    for n in x:
        assert b[n].grad.norm() > 0, n
        assert rel_err(a[n].grad, b[n].grad) < 1e-6, n


def half_budget(x32: dict, dtype, n_check=None, **kwargs):
    """Errors of the kernel on ``dtype`` inputs and of the fp32 reference fed the same rounded inputs, both against
    the fp32 reference on the original inputs. Returns {tensor name: (kernel error, reference-rounding error)}."""

    def rounded(x):
        out = {}
        for n, t in x.items():
            if t is None or n in ("g", "initial_state"):  # gates and states stay fp32, as in the model
                out[n] = t
            else:
                out[n] = t.to(dtype)
        return out

    def run(fn, x, out_dtype):
        lv = leaves(x)
        o, ht = fn(lv)
        loss_of(o.float(), ht).backward()
        grads = {n: t.grad.to(out_dtype if x[n].dtype != torch.float32 else torch.float32)
                 for n, t in lv.items() if t is not None}
        return {"o": o.to(out_dtype).float(), "ht": ht, **{"d" + n: gr.float() for n, gr in grads.items()}}

    def ref_fn(lv):
        return naive_chunk_kda(*(lv[n].float() for n in ("q", "k", "v", "g", "beta")),
                               initial_state=lv["initial_state"], output_final_state=True, **kwargs)

    def kernel_fn(lv):
        return chunk_kda(**lv, output_final_state=True, backend="triton", **kwargs)

    exact = run(ref_fn, x32, torch.float32)
    ref_lowp = run(ref_fn, rounded(x32), dtype)
    kern = run(kernel_fn, rounded(x32), dtype)
    return {n: (rel_err(kern[n], exact[n]), rel_err(ref_lowp[n], exact[n])) for n in exact}


def assert_half_budget(errs: dict):
    for n, (e_kernel, e_ref) in errs.items():
        bound = BF16_ABS["o"] if n == "o" else BF16_ABS["ht"] if n == "ht" else BF16_ABS["grad"]
        assert e_kernel <= 2 * e_ref + 1e-6, f"{n}: kernel {e_kernel:.2e} > 2 x reference rounding {e_ref:.2e}"
        assert e_kernel < bound, f"{n}: kernel {e_kernel:.2e} >= {bound}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_every_gradient(dtype):
    """16-bit inputs through every kernel, forward and backward, three chunks with a partial one: output, final
    state and every gradient within the half-precision budget (in the interpreter without CUDA, bf16 computed as
    the GPU computes it: ``tests/triton_interpreter.py``)."""
    x = kda_inputs(1, 150, 2, 32, 32, generator=torch.Generator().manual_seed(0))  # dh0 at 1.7-1.9x over seeds
    x = {n: (t.to(DEVICE) if t is not None else None) for n, t in x.items()}
    assert_half_budget(half_budget(x, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_the_models_call(dtype):
    """The call the KDA layer makes (raw q, k, gate pre-activation and beta logits in 16 bits; the q/k L2 norm, the
    gate with A_log and dt_bias and the beta sigmoid in the op), three chunks: output, state and every gradient
    (A_log's and dt_bias's included) within twice the error of the PyTorch path on the same rounded inputs, both
    against the PyTorch path on the unrounded ones (dA_log and ddt_bias: see below). The op stores the normalised q
    and k in the inputs' dtype (its dot operands), so the rounded reference rounds them there too."""
    gen = torch.Generator().manual_seed(3)
    B, T, H, K, V = 1, 150, 2, 32, 32
    x = {n: torch.randn(*shape, generator=gen) for n, shape in
         (("q", (B, T, H, K)), ("k", (B, T, H, K)), ("v", (B, T, H, V)), ("g", (B, T, H, K)), ("beta", (B, T, H)))}
    x["A_log"], x["dt_bias"] = torch.randn(H, generator=gen) * 0.5, torch.randn(H * K, generator=gen) - 2.0
    x["initial_state"] = torch.randn(B, H, K, V, generator=gen)
    kw = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)
    fp32_only = ("A_log", "dt_bias", "initial_state")

    def run(backend, inputs, out_dtype):
        lv = leaves({n: t.to(DEVICE if backend == "triton" else "cpu") for n, t in inputs.items()})
        if backend == "triton":
            o, ht = chunk_kda(**lv, output_final_state=True, backend=backend, **kw)
        else:  # the L2 norm outside, its result rounded to the dtype the op's kernels store it in
            qk = {n: l2norm(lv[n].float()).to(out_dtype).float() for n in ("q", "k")}
            o, ht = chunk_kda(**{**lv, **qk}, output_final_state=True, backend=backend,
                              **{**kw, "use_qk_l2norm_in_kernel": False})
        loss_of(o.float(), ht).backward()
        return {"o": o.to(out_dtype).float(), "ht": ht,
                **{"d" + n: t.grad.to(torch.float32 if n in fp32_only else out_dtype).float() for n, t in lv.items()}}

    rounded = {n: t if n in fp32_only else t.to(dtype) for n, t in x.items()}
    exact = run("torch", x, torch.float32)
    ref_lowp = run("torch", {n: t.float() for n, t in rounded.items()}, dtype)
    kern = run("triton", rounded, dtype)
    errs = {n: (rel_err(kern[n].cpu(), exact[n]), rel_err(ref_lowp[n], exact[n])) for n in exact}
    # dA_log (H values) and ddt_bias are sums of per-token terms of both signs: a relative error of a few such sums
    # measures their cancellation more than the kernel. Each is held instead to its error over the sum of its
    # terms' magnitudes, against twice the reference's error on the terms themselves (dg, the raw gate's gradient).
    z = x["g"] + x["dt_bias"].reshape(H, K)
    terms = {"ddt_bias": exact["dg"], "dA_log": exact["dg"] * torch.nn.functional.softplus(z) / torch.sigmoid(z)}
    for n, dims in (("ddt_bias", (0, 1)), ("dA_log", (0, 1, 3))):
        scale = terms[n].abs().sum(dims).reshape(-1).norm()
        errs[n] = ((kern[n].cpu() - exact[n]).norm().item() / scale.item(), errs["dg"][1])
    assert_half_budget(errs)


@gpu
@pytest.mark.gpu
# fp16 dg was at 2.1x the reference rounding (H200) while fp16 dots of fp32 operands took one TF32 pass; with three
# (``dot_precision``) it is within 2x (H100)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_half_inputs_small(dtype):
    x = {n: (t.cuda() if t is not None else None) for n, t in kda_inputs(2, 300, 4, 64, 64).items()}
    assert_half_budget(half_budget(x, dtype))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1000, 8192])
def test_gpu_real_size_bf16(T):
    x = {n: (t.cuda() if t is not None else None) for n, t in kda_inputs(1, T, 32, 128, 128).items()}
    errs = half_budget(x, torch.bfloat16)
    print({n: (f"{a:.2e}", f"{b:.2e}") for n, (a, b) in errs.items()})
    assert_half_budget(errs)


@gpu
@pytest.mark.gpu
def test_gpu_real_size_varlen_fp32():
    """Packed sequences at the model's head size, fp32, against the recurrence per sequence on the GPU."""
    cu = torch.tensor([0, 1, 700, 700, 2050], dtype=torch.int32)
    x = kda_inputs(1, 2050, 4, 128, 128, N=4)
    a = leaves({n: t.cuda() for n, t in x.items()})
    b = leaves({n: t.cuda() for n, t in x.items()})
    o, ht = chunk_kda(**a, cu_seqlens=cu.cuda(), output_final_state=True, backend="triton")
    o_ref, ht_ref = reference(**b, cu_seqlens=cu)
    assert rel_err(o, o_ref) < 1e-4 and rel_err(ht, ht_ref) < 1e-4
    loss_of(o, ht).backward()
    loss_of(o_ref, ht_ref).backward()
    for n in a:
        assert rel_err(a[n].grad, b[n].grad) < 1e-4, f"d{n}"


@gpu
@pytest.mark.gpu
@pytest.mark.slow_build
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_largest_head_dim(dtype):
    """K = V = 256, the op's limit: the kernels whose shared memory grows with K (the state pass falls back to a
    shallower prefetch when its default does not fit) build and stay within the budgets of the 128 cases."""
    x = {n: (t.cuda() if t is not None else None) for n, t in kda_inputs(1, 300, 2, 256, 256).items()}
    if dtype == torch.bfloat16:
        assert_half_budget(half_budget(x, dtype))
        return
    a, b = leaves(dict(x)), leaves(dict(x))
    o, ht = chunk_kda(**a, output_final_state=True, backend="triton")
    o_ref, ht_ref = reference(**b)
    assert rel_err(o, o_ref) < 1e-4 and rel_err(ht, ht_ref) < 1e-4
    loss_of(o, ht).backward()
    loss_of(o_ref, ht_ref).backward()
    for n in a:
        if a[n] is not None:
            assert rel_err(a[n].grad, b[n].grad) < 1e-4, f"d{n}"
