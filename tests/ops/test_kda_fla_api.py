"""FLA 0.6.0's KDA op API on our ``chunk_kda`` / ``fused_recurrent_kda`` (issue 24): argument order, grouped value
heads, the bounded gate, negative eigenvalues, the V-first state layout, intermediate states, speculative decoding,
state dtypes, the accepted no-ops and refusals, and the torch.library registration torch.compile sees.

Every case is compared with the reference of ``naive.py`` (the recurrence of paper Eq. 1, GVA included) after the
activations' own references, with every gradient where the op is differentiable, on the PyTorch path and on the
Triton path (Triton's interpreter on CPU at small sizes, fp32; GPU-only cases at real sizes are marked).
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from kimi_linear.ops.kda import (
    beta_activation,
    chunk_kda,
    fused_recurrent_kda,
    kda_gate,
    naive_chunk_kda,
    naive_recurrent_kda,
)
from kimi_linear.ops.kda.common import MODEL_CALL_NO_OP_KEYWORDS
from kimi_linear.ops.norm import l2norm
from tests.utils import leaves, loss_of, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="no CUDA and TRITON_INTERPRET is not 1")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
TOL = 2e-5  # fp32 on both sides, only the order of summation differs
GRAD_TOL = 1e-4

# FLA 0.6.0's signatures (fla/ops/kda/chunk.py, fused_recurrent.py): the parameters before **kwargs, in order.
FLA_CHUNK_PARAMS = [
    "q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state", "use_qk_l2norm_in_kernel",
    "use_gate_in_kernel", "use_beta_sigmoid_in_kernel", "allow_neg_eigval", "safe_gate", "lower_bound",
    "disable_recompute", "return_intermediate_states", "state_v_first", "cu_seqlens", "cu_seqlens_cpu", "cp_context",
    "use_graph", "max_num_seqs",
]
FLA_CHUNK_KWARGS = ["A_log", "dt_bias", "chunk_size", "transpose_state_layout"]
FLA_RECURRENT_PARAMS = [
    "q", "k", "v", "g", "beta", "A_log", "dt_bias", "scale", "initial_state", "output_final_state",
    "use_qk_l2norm_in_kernel", "use_gate_in_kernel", "use_beta_sigmoid_in_kernel", "allow_neg_eigval", "lower_bound",
    "state_v_first", "cu_seqlens",
]
FLA_RECURRENT_KWARGS = ["ssm_state_indices", "num_accepted_tokens", "inplace_final_state", "out",
                        "transpose_state_layout"]


def inputs(B, T, H, K, V, HV=None, *, N=None, raw=False, seed=0, dtype=torch.float32, device="cpu"):
    """Random inputs with HV value heads: normalised q/k, g <= 0 and beta in (0, 1) (pre-activations when
    ``raw``), an fp32 state [N, HV, K, V]."""
    gen = torch.Generator().manual_seed(seed)
    HV = HV or H
    x = dict(
        q=torch.randn(B, T, H, K, generator=gen),
        k=torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
        v=torch.randn(B, T, HV, V, generator=gen),
        g=torch.randn(B, T, HV, K, generator=gen) if raw else -torch.rand(B, T, HV, K, generator=gen),
        beta=torch.randn(B, T, HV, generator=gen) if raw else torch.rand(B, T, HV, generator=gen).clamp(0.02, 0.98),
    )
    x = {n: t.to(device=device, dtype=dtype) for n, t in x.items()}
    x["initial_state"] = torch.randn(N or B, HV, K, V, generator=gen).to(device)
    return x


def reference(q, k, v, g, beta, initial_state=None, cu_seqlens=None, *, scale=None, l2norm_qk=False,
              gate=False, A_log=None, dt_bias=None, lower_bound=None, beta_sigmoid=False, neg_eigval=False):
    """The activations by their references, then paper Eq. 1 (``naive_recurrent_kda``) one sequence at a time;
    differentiable. Returns o and the final states [N, HV, K, V]."""
    if l2norm_qk:
        q, k = l2norm(q), l2norm(k)
    if gate:
        g = kda_gate(g, A_log, dt_bias, lower_bound)
    if beta_sigmoid:
        beta = beta_activation(beta, neg_eigval)
    if cu_seqlens is None:
        return naive_recurrent_kda(q, k, v, g, beta, scale, initial_state, output_final_state=True)
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        h0 = initial_state[i : i + 1]
        o_i, h_i = naive_recurrent_kda(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], scale, h0,
                                       output_final_state=True)
        outs.append(o_i)
        states.append(h_i)
    return torch.cat(outs, dim=1), torch.cat(states)


def with_grads(fn, x: dict, **kwargs):
    """fn(**x, **kwargs) -> (o, state, {name: grad}) for every float tensor of x."""
    xs = leaves(x)
    o, state = fn(**xs, **kwargs)[:2]
    loss_of(o, state).backward()
    return o.detach(), state.detach(), {n: t.grad for n, t in xs.items() if t is not None and t.grad is not None}


def assert_close(got, want, tol=TOL, grad_tol=GRAD_TOL):
    o, s, grads = got
    o_ref, s_ref, grads_ref = want
    assert rel_err(o, o_ref) < tol
    assert rel_err(s, s_ref) < tol
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) < grad_tol, name


# ---------------------------------------------------------------------------------------------------------------
# Argument order: FLA's positional calls mean the same thing here; our callers' keywords still work.


@pytest.mark.parametrize("fn, params, kwargs", [
    (chunk_kda, FLA_CHUNK_PARAMS, FLA_CHUNK_KWARGS),
    (fused_recurrent_kda, FLA_RECURRENT_PARAMS, FLA_RECURRENT_KWARGS),
], ids=["chunk", "recurrent"])
def test_signature_is_flas(fn, params, kwargs):
    sig = inspect.signature(fn).parameters
    positional = [n for n, p in sig.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    keyword_only = [n for n, p in sig.items() if p.kind == p.KEYWORD_ONLY]
    assert positional == params
    assert set(kwargs) <= set(keyword_only)
    assert {"backend"} <= set(keyword_only)  # ours, last and by keyword only
    with pytest.raises(TypeError):
        fn(**inputs(1, 2, 1, 8, 8), not_an_argument=True)  # FLA swallows unknown keywords; we name them


def test_fla_positional_calls_take_the_scale_where_fla_puts_it():
    x = inputs(2, 9, 2, 16, 8)
    qkvgb = [x[n] for n in ("q", "k", "v", "g", "beta")]
    o_ref, s_ref = reference(**x, scale=0.3)
    o, s = chunk_kda(*qkvgb, 0.3, x["initial_state"], True)
    assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL
    o, s = fused_recurrent_kda(*qkvgb, None, None, 0.3, x["initial_state"], True)
    assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL


# ---------------------------------------------------------------------------------------------------------------
# Grouped value heads (GVA).


def test_reference_gva_is_one_query_key_head_per_group():
    """naive's GVA: value head hv computes with query/key head hv // (HV // H), checked head by head."""
    x = inputs(2, 11, 2, 8, 4, HV=6)
    o, s = naive_recurrent_kda(**x, output_final_state=True)
    for hv in range(6):
        h = hv // 3
        o_h, s_h = naive_recurrent_kda(x["q"][:, :, h : h + 1], x["k"][:, :, h : h + 1], x["v"][:, :, hv : hv + 1],
                                       x["g"][:, :, hv : hv + 1], x["beta"][:, :, hv : hv + 1],
                                       initial_state=x["initial_state"][:, hv : hv + 1], output_final_state=True)
        assert rel_err(o[:, :, hv : hv + 1], o_h) < 1e-6 and rel_err(s[:, hv : hv + 1], s_h) < 1e-6
    o_c, s_c = naive_chunk_kda(**x, output_final_state=True)
    assert rel_err(o_c, o) < TOL and rel_err(s_c, s) < TOL


def on_cpu(result):
    o, s, grads = result
    return o.cpu(), s.cpu(), {n: d.cpu() for n, d in grads.items()}


GVA_CASES = {  # backend, inputs, cu_seqlens
    "torch-B2-HV6": ("torch", dict(B=2, T=70, H=2, K=16, V=8, HV=6), None),
    "torch-varlen-HV4": ("torch", dict(B=1, T=70, H=2, K=16, V=8, HV=4, N=3), [0, 30, 30, 70]),
    "triton-HV2": ("triton", dict(B=1, T=40, H=1, K=16, V=16, HV=2), None),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=needs_triton) if c.startswith("triton") else c
                                  for c in GVA_CASES])
def test_chunk_gva_with_grads(case):
    backend, shape, cu = GVA_CASES[case]
    x = inputs(**shape)
    cu = None if cu is None else torch.tensor(cu)
    got = with_grads(chunk_kda, {n: t.to(DEVICE) for n, t in x.items()}, output_final_state=True,
                     cu_seqlens=None if cu is None else cu.to(DEVICE), backend=backend)
    assert_close(on_cpu(got), with_grads(reference, x, cu_seqlens=cu))


@pytest.mark.parametrize("backend", BACKENDS)
def test_recurrent_gva_and_per_channel_beta(backend):
    x = inputs(2, 5, 2, 16, 8, HV=4)
    x["beta"] = torch.rand(2, 5, 4, 8)  # FLA's kernel also takes a beta per value channel
    o_ref, s_ref = naive_recurrent_kda(**x, output_final_state=True)
    o, s = fused_recurrent_kda(**{n: t.to(DEVICE) for n, t in x.items()}, output_final_state=True, backend=backend)
    assert rel_err(o.cpu(), o_ref) < TOL and rel_err(s.cpu(), s_ref) < TOL
    if backend == "torch":
        assert_close(with_grads(fused_recurrent_kda, x, output_final_state=True, backend="torch"),
                     with_grads(naive_recurrent_kda, x, output_final_state=True))


def test_gva_shapes_are_checked():
    x = inputs(1, 4, 2, 8, 8, HV=3)  # 3 value heads over 2 query/key heads
    with pytest.raises(ValueError, match="multiple of H=2"):
        chunk_kda(**x)
    x = inputs(1, 4, 2, 8, 8, HV=4)
    with pytest.raises(ValueError, match="A_log must have HV=4"):
        chunk_kda(**x, use_gate_in_kernel=True, A_log=torch.zeros(2))


# ---------------------------------------------------------------------------------------------------------------
# Gates and beta: the bounded gate (safe_gate / lower_bound), allow_neg_eigval.


def test_bounded_gate_reference():
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    A_log, dt_bias = torch.randn(4, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    z = x + dt_bias.view(4, 8)
    want = -5.0 * torch.sigmoid(A_log.exp()[:, None] * z)
    assert torch.allclose(kda_gate(x, A_log, dt_bias, lower_bound=-5.0), want)
    assert torch.allclose(kda_gate(x, None, dt_bias, lower_bound=-2.5), -2.5 * torch.sigmoid(z))
    assert torch.allclose(kda_gate(x, A_log, dt_bias), -A_log.exp()[:, None] * torch.nn.functional.softplus(z))
    with pytest.raises(ValueError, match="needs A_log"):
        kda_gate(x, None, dt_bias)
    assert torch.allclose(beta_activation(x, allow_neg_eigval=True), 2 * torch.sigmoid(x))


GATE_CASES = {  # chunk_kda keywords (besides the gate's tensors) -> the reference's
    "bounded": (dict(use_gate_in_kernel=True, safe_gate=True, lower_bound=-5.0), dict(lower_bound=-5.0)),
    "bounded-no-A": (dict(use_gate_in_kernel=True, lower_bound=-8.0, A_log=None), dict(lower_bound=-8.0)),
    "neg-eigval": (dict(use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True),
                   dict(beta_sigmoid=True, neg_eigval=True)),
    "all": (dict(use_gate_in_kernel=True, lower_bound=-3.0, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True,
                 use_qk_l2norm_in_kernel=True), dict(lower_bound=-3.0, beta_sigmoid=True, neg_eigval=True,
                                                     l2norm_qk=True)),
}


@pytest.mark.parametrize("case", list(GATE_CASES), ids=list(GATE_CASES))
@pytest.mark.parametrize("op", ["chunk", "recurrent"])
def test_gates_and_beta_with_grads_torch(op, case):
    x = inputs(2, 37, 2, 16, 8, HV=4, raw=True, seed=len(case))
    gen = torch.Generator().manual_seed(1)
    x["A_log"], x["dt_bias"] = torch.randn(4, generator=gen) * 0.5, torch.randn(4 * 16, generator=gen)
    ours, theirs = GATE_CASES[case]
    ours = dict(ours)
    if "A_log" in ours:
        x["A_log"] = ours.pop("A_log")
    fn = chunk_kda if op == "chunk" else fused_recurrent_kda
    got = with_grads(fn, x, output_final_state=True, backend="torch", **ours)
    want = with_grads(reference, x, gate=True, **theirs)
    assert_close(got, want)


@pytest.mark.parametrize("op", ["chunk", "recurrent"])
@needs_triton
def test_gates_beta_gva_v_first_on_triton(op):
    """All of FLA's extras at once on the Triton path (chunk: outputs and every gradient; recurrent: forward)."""
    x = inputs(1, 40 if op == "chunk" else 9, 1, 16, 16, HV=2, raw=True, seed=3)
    x["A_log"], x["dt_bias"] = torch.randn(2) * 0.5, torch.randn(2 * 16)
    x["initial_state"] = x["initial_state"].to(torch.bfloat16)  # cast to fp32 like FLA
    kw = dict(use_gate_in_kernel=True, lower_bound=-4.0, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True,
              use_qk_l2norm_in_kernel=True)
    want = reference(**x, gate=True, lower_bound=-4.0, beta_sigmoid=True, neg_eigval=True, l2norm_qk=True)
    dev = {n: t.to(DEVICE) for n, t in x.items()}
    dev["initial_state"] = dev["initial_state"].transpose(-1, -2).contiguous()  # [N, HV, V, K]
    if op == "recurrent":  # forward only
        o, s = fused_recurrent_kda(**dev, output_final_state=True, state_v_first=True, backend="triton", **kw)
        assert rel_err(o.cpu(), want[0]) < TOL and rel_err(s.transpose(-1, -2).cpu(), want[1]) < TOL
        return
    # the loss weights the V-first state: the reference's goes through the same transpose
    want = with_grads(lambda **z: (lambda o, s: (o, s.transpose(-1, -2)))(*reference(**z, gate=True, lower_bound=-4.0,
                      beta_sigmoid=True, neg_eigval=True, l2norm_qk=True)), x)
    o, s, grads = with_grads(chunk_kda, dev, output_final_state=True, state_v_first=True, backend="triton", **kw)
    assert grads["initial_state"].dtype == torch.bfloat16  # a bf16 state's gradient is bf16
    grads["initial_state"] = grads["initial_state"].transpose(-1, -2)
    # both sides round the state's gradient to bf16 (~4e-3)
    d_h0, d_h0_ref = grads.pop("initial_state").float().cpu(), want[2].pop("initial_state").float()
    assert rel_err(d_h0, d_h0_ref) < 1e-2
    assert_close(on_cpu((o, s, grads)), want)


def test_gate_flags_follow_fla():
    x = inputs(1, 8, 2, 16, 8, raw=True)
    A_log = torch.zeros(2)
    with pytest.raises(ValueError, match="lower_bound must be given when safe_gate"):
        chunk_kda(**x, use_gate_in_kernel=True, A_log=A_log, safe_gate=True)
    with pytest.raises(ValueError, match=r"safe range \[-5, 0\)"):
        chunk_kda(**x, use_gate_in_kernel=True, A_log=A_log, safe_gate=True, lower_bound=-6.0)
    with pytest.raises(ValueError, match="finite negative"):
        fused_recurrent_kda(**x, use_gate_in_kernel=True, A_log=A_log, lower_bound=0.5)
    for fn in (chunk_kda, fused_recurrent_kda):
        with pytest.raises(ValueError, match="requires use_beta_sigmoid_in_kernel"):
            fn(**x, allow_neg_eigval=True)
        with pytest.raises(ValueError, match="needs A_log"):
            fn(**x, use_gate_in_kernel=True)
    chunk_kda(**x, use_gate_in_kernel=True, A_log=A_log, lower_bound=-6.0)  # outside the safe range: fine alone
    # precomputed gates: safe_gate and lower_bound change nothing (FLA ignores lower_bound there too)
    y = inputs(1, 8, 2, 16, 8)
    o, _ = chunk_kda(**y)
    for kw in (dict(safe_gate=True), dict(lower_bound=-1.0), dict(safe_gate=True, lower_bound=-5.0)):
        assert torch.equal(chunk_kda(**y, **kw)[0], o)
    o_r, _ = fused_recurrent_kda(**y)
    assert torch.equal(fused_recurrent_kda(**y, lower_bound=-1.0)[0], o_r)


# ---------------------------------------------------------------------------------------------------------------
# States: V-first layout, 16-bit and fp64 states, intermediate states.


@pytest.mark.parametrize("op", ["chunk", "recurrent"])
def test_state_v_first_with_grads(op):
    x = inputs(2, 20, 2, 16, 8)
    fn = chunk_kda if op == "chunk" else fused_recurrent_kda
    y = dict(x, initial_state=x["initial_state"].transpose(-1, -2).contiguous())
    o, s, grads = with_grads(fn, y, output_final_state=True, state_v_first=True, backend="torch")
    assert s.shape == (2, 2, 8, 16)
    grads["initial_state"] = grads["initial_state"].transpose(-1, -2)
    # the loss weights the V-first final state, so compare through the same layout
    want = with_grads(lambda **z: (lambda o, s: (o, s.transpose(-1, -2)))(*reference(**z)), x)
    assert_close((o, s, grads), want)
    with pytest.warns(DeprecationWarning, match="transpose_state_layout"):
        o2, s2 = fn(**y, output_final_state=True, transpose_state_layout=True)
    assert torch.equal(s2, s)
    with pytest.raises(ValueError, match="not both"):
        fn(**y, state_v_first=True, transpose_state_layout=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op", ["chunk", "recurrent"])
def test_16bit_initial_state_is_cast(op, dtype):
    x = inputs(1, 10, 2, 16, 8)
    x["initial_state"] = x["initial_state"].to(dtype)
    fn = chunk_kda if op == "chunk" else fused_recurrent_kda
    o, s, grads = with_grads(fn, x, output_final_state=True, backend="torch")
    assert s.dtype == torch.float32 and grads["initial_state"].dtype == dtype
    want = with_grads(reference, dict(x, initial_state=x["initial_state"].float()))
    assert rel_err(o, want[0]) < TOL and rel_err(s, want[1]) < TOL
    assert rel_err(grads["initial_state"].float(), want[2]["initial_state"]) < 1e-2


@pytest.mark.parametrize("op", ["chunk", "recurrent"])
def test_float64_on_the_torch_path(op):
    x = {n: t.double() for n, t in inputs(2, 70, 2, 16, 8, HV=4).items()}
    fn = chunk_kda if op == "chunk" else fused_recurrent_kda
    o, s, grads = with_grads(fn, x, output_final_state=True)
    assert o.dtype == s.dtype == torch.float64
    assert_close((o, s, grads), with_grads(reference, x), tol=1e-12, grad_tol=1e-10)
    if TRITON_RUNS:
        with pytest.raises(TypeError, match="float64 inputs run on the torch backend only"):
            fn(**x, backend="triton")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("op", ["chunk", "recurrent"])
def test_float64_cuda_inputs_take_the_torch_path_under_auto(op):
    """FLA's ops take float64 CUDA tensors (FLA's own KDA test builds its fp64 gold that way): "auto" runs them on
    the torch path instead of refusing them."""
    x = {n: t.double().cuda() for n, t in inputs(2, 70, 2, 16, 8, HV=4).items()}
    fn = chunk_kda if op == "chunk" else fused_recurrent_kda
    o, s = fn(**x, output_final_state=True)
    o_ref, s_ref = reference(**{n: t.cpu() for n, t in x.items()})
    assert o.dtype == s.dtype == torch.float64
    assert rel_err(o.cpu(), o_ref) < 1e-12 and rel_err(s.cpu(), s_ref) < 1e-12


def _prefix_states(x, chunk, lengths):
    """The state entering each chunk of each sequence, by the reference over the prefix."""
    out, start = [], 0
    for i, n in enumerate(lengths):
        for j in range(-(-n // chunk)):
            seg = {m: t[:, start : start + j * chunk] for m, t in x.items() if m != "initial_state"}
            _, s = reference(**seg, initial_state=x["initial_state"][i : i + 1])
            out.append(s[0])
        start += n
    return torch.stack(out)


@pytest.mark.parametrize("chunk_size", [32, 64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_return_intermediate_states(backend, chunk_size):
    lengths = [70, 0, 33] if backend == "torch" else [70, 5]
    x = inputs(1, sum(lengths), 1, 16, 16, HV=2, N=len(lengths), seed=chunk_size)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    with torch.inference_mode():
        o, s, h = chunk_kda(**{n: t.to(DEVICE) for n, t in x.items()}, output_final_state=True,
                            cu_seqlens=cu.to(DEVICE), return_intermediate_states=True, chunk_size=chunk_size,
                            backend=backend)
    o_ref, s_ref = reference(**x, cu_seqlens=cu)
    h_ref = _prefix_states(x, chunk_size, lengths)
    assert h.shape == (1, sum(-(-n // chunk_size) for n in lengths), 2, 16, 16) and h.dtype == x["k"].dtype
    assert rel_err(o.cpu(), o_ref) < TOL and rel_err(s.cpu(), s_ref) < TOL
    assert rel_err(h[0].cpu(), h_ref) < TOL


def test_intermediate_states_fixed_length_v_first_and_refused_with_grads():
    x = inputs(2, 65, 2, 16, 8)
    y = dict(x, initial_state=x["initial_state"].transpose(-1, -2).contiguous())
    with torch.no_grad():
        o, s, h = chunk_kda(**y, return_intermediate_states=True, state_v_first=True)
    assert s is None and h.shape == (2, 2, 2, 8, 16)
    for b in range(2):
        assert rel_err(h[b].transpose(-1, -2), _prefix_states({n: t[b : b + 1] for n, t in x.items()}, 64, [65])) < TOL
    with pytest.raises(ValueError, match="inference only"):
        chunk_kda(**leaves(x), return_intermediate_states=True)


# ---------------------------------------------------------------------------------------------------------------
# Knobs: chunk_size, the accepted no-ops, the refusals.


def test_chunk_size_and_no_op_knobs():
    x = inputs(1, 50, 2, 16, 8, N=2)
    cu = torch.tensor([0, 20, 50])
    o, s = chunk_kda(**x, cu_seqlens=cu, output_final_state=True)
    for kw in (dict(chunk_size=32), dict(disable_recompute=True), dict(cu_seqlens_cpu=cu.clone()),
               dict(use_graph=True), dict(use_graph=True, max_num_seqs=2)):
        o2, s2 = chunk_kda(**x, cu_seqlens=cu, output_final_state=True, **kw)
        assert rel_err(o2, o) < TOL and rel_err(s2, s) < TOL, kw
    with pytest.raises(ValueError, match=r"`chunk_size` must be either 32 or 64"):  # FLA's message, FLA's test
        chunk_kda(**x, cu_seqlens=cu, chunk_size=16)
    with pytest.raises(ValueError, match="max_num_seqs"):
        chunk_kda(**x, cu_seqlens=cu, use_graph=True, max_num_seqs=3)
    with pytest.raises(NotImplementedError, match="cp_context"):
        chunk_kda(**x, cu_seqlens=cu, cp_context=object())


@pytest.mark.parametrize("op", [chunk_kda, fused_recurrent_kda], ids=["chunk", "recurrent"])
def test_model_call_keywords_are_no_ops_and_others_are_refused(op):
    """What model code forwards with a model call's keywords (transformers' kimi_linear) changes nothing; packing
    keywords pass only beside cu_seqlens; is_causal=False and typos are refused by name."""
    x = inputs(1, 30, 2, 16, 8, N=2)
    cu = torch.tensor([0, 12, 30])
    o, s = op(**x, cu_seqlens=cu, output_final_state=True)
    o_ref, s_ref = reference(**x, cu_seqlens=cu)
    assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL
    packing = dict(cu_seq_lens_q=cu.int(), cu_seq_lens_k=cu.int(), max_length_q=18, max_length_k=18,
                   seq_idx=torch.repeat_interleave(torch.arange(2), torch.tensor([12, 18]))[None].int())
    no_ops = {name: True for name in MODEL_CALL_NO_OP_KEYWORDS} | packing | dict(is_causal=True)
    no_ops["num_items_in_batch"] = torch.tensor(7)
    o2, s2 = op(**x, cu_seqlens=cu, output_final_state=True, **no_ops)
    assert torch.equal(o2, o) and torch.equal(s2, s)
    one = inputs(1, 30, 2, 16, 8)
    o3, _ = op(**one, seq_idx=None, output_attentions=False, is_causal=None)  # None describes nothing
    assert rel_err(o3, reference(**one)[0]) < TOL
    for name, value in packing.items():
        with pytest.raises(ValueError, match=rf"{name} describes packed sequences.*pass cu_seqlens"):
            op(**one, **{name: value})
    with pytest.raises(ValueError, match="is_causal=False"):
        op(**one, is_causal=False)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'output_final_states'.*output_hidden_states"):
        op(**one, output_final_states=True)


# ---------------------------------------------------------------------------------------------------------------
# fused_recurrent_kda for serving: state slots per sequence or per token, num_accepted_tokens, out=.


def _spec_case(seed=0):
    N, Tn, S = 3, 4, 16
    x = inputs(1, N * Tn, 1, 16, 16, HV=2, seed=seed)
    del x["initial_state"]
    pool = torch.randn(S, 2, 16, 16, generator=torch.Generator().manual_seed(seed))
    slots = torch.tensor([[0, 1, 2, 3], [4, 5, -1, 7], [8, 9, 10, 11]])
    accepted = torch.tensor([2, 1, 4])
    cu = torch.arange(0, N * Tn + 1, Tn)
    return x, pool, slots, accepted, cu, Tn


@pytest.mark.parametrize("backend", BACKENDS)
def test_speculative_decoding_slots(backend):
    """[N, C] slots: start from column num_accepted - 1, the state after token t into column t (in place), or
    every token's state returned (inplace_final_state=False); a negative slot is skipped; out= is filled."""
    x, pool, slots, accepted, cu, Tn = _spec_case()
    dev = {n: t.to(DEVICE) for n, t in x.items()}
    pool_in = pool.clone().to(DEVICE)
    out = torch.full_like(dev["v"], float("nan"))
    o, ret = fused_recurrent_kda(**dev, initial_state=pool_in, cu_seqlens=cu.to(DEVICE), out=out,
                                 ssm_state_indices=slots.to(DEVICE), num_accepted_tokens=accepted.to(DEVICE),
                                 backend=backend)
    assert ret is pool_in and o is out
    pool_kept = pool.clone().to(DEVICE)
    o2, rows = fused_recurrent_kda(**dev, initial_state=pool_kept, cu_seqlens=cu.to(DEVICE), backend=backend,
                                   ssm_state_indices=slots.to(DEVICE), num_accepted_tokens=accepted.to(DEVICE),
                                   inplace_final_state=False)
    assert torch.equal(pool_kept.cpu(), pool) and rows.shape == (12, 2, 16, 16)
    expected_pool = pool.clone()
    for n in range(3):
        seg = slice(n * Tn, (n + 1) * Tn)
        o_n, _, every = naive_recurrent_kda(*(x[m][:, seg] for m in ("q", "k", "v", "g", "beta")),
                                            initial_state=pool[slots[n, accepted[n] - 1]][None],
                                            output_all_states=True)
        assert rel_err(o[:, seg].cpu(), o_n) < TOL and rel_err(o2[:, seg].cpu(), o_n) < TOL
        assert rel_err(rows[seg].cpu(), every[0]) < TOL
        for t in range(Tn):
            if slots[n, t] >= 0:
                expected_pool[slots[n, t]] = every[0, t]
    assert rel_err(pool_in.cpu(), expected_pool) < TOL
    assert torch.equal(pool_in.cpu()[12:], pool[12:]) and torch.equal(pool_in.cpu()[6], pool[6])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_slots_v_first_bf16_pool(backend):
    """[N] slots (FLA's / vLLM's decode call) on a V-first bf16 pool: same as our state_indices, in place."""
    x = inputs(3, 1, 1, 16, 16, HV=2)
    del x["initial_state"]
    pool = torch.randn(5, 2, 16, 16).to(torch.bfloat16)  # [S, HV, V, K]
    slots = torch.tensor([3, -1, 0])
    pool_in = pool.clone().to(DEVICE)
    dev = {n: t.to(DEVICE) for n, t in x.items()}
    o, ret = fused_recurrent_kda(**dev, initial_state=pool_in, ssm_state_indices=slots.to(DEVICE),
                                 state_v_first=True, backend=backend)
    h0 = torch.stack([pool[3].float(), torch.zeros(2, 16, 16), pool[0].float()]).transpose(-1, -2)
    o_ref, s_ref = naive_recurrent_kda(**x, initial_state=h0, output_final_state=True)
    assert rel_err(o.cpu(), o_ref) < TOL
    assert rel_err(pool_in[[3, 0]].cpu().float(), s_ref[[0, 2]].transpose(-1, -2)) < 1e-2  # bf16 pool
    assert torch.equal(pool_in[[1, 2, 4]].cpu(), pool[[1, 2, 4]])
    with pytest.raises(ValueError, match="not both"):
        fused_recurrent_kda(**dev, initial_state=pool_in, ssm_state_indices=slots.to(DEVICE),
                            state_indices=slots.to(DEVICE))
    with pytest.raises(ValueError, match=r"num_accepted_tokens needs per-token state indices"):
        fused_recurrent_kda(**dev, initial_state=pool_in, ssm_state_indices=slots.to(DEVICE),
                            num_accepted_tokens=torch.ones(3, dtype=torch.long, device=DEVICE))


# ---------------------------------------------------------------------------------------------------------------
# torch.library: the registered ops (fake kernels, autograd) and torch.compile(fullgraph=True).


def _grad_leaves(args: tuple, differentiable: set[int]) -> tuple:
    return tuple(a.detach().clone().requires_grad_() if i in differentiable else a for i, a in enumerate(args))


def test_registered_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake kernels against the real ones, autograd registration, AOT dispatch."""
    x = inputs(1, 9, 2, 8, 8)
    q, k, v, g, beta, h0 = (x[n] for n in ("q", "k", "v", "g", "beta", "initial_state"))
    chunk_args = (q, k, v, g, beta, h0, None, None, None, 0.5, True, False, False, False, "torch", "torch", 64)
    torch.library.opcheck(torch.ops.kimi_linear.chunk_kda, _grad_leaves(chunk_args, {0, 1, 2, 3, 4, 5}))
    rec_args = (q, k, v, g, beta, None, None, h0, None, None, None, 0.5, True, False, False, False, False, None,
                False, "torch")
    torch.library.opcheck(torch.ops.kimi_linear.fused_recurrent_kda, _grad_leaves(rec_args, {0, 1, 2, 3, 4, 7}))
    pool_args = rec_args[:7] + (torch.randn(4, 2, 8, 8), None, torch.tensor([2])) + rec_args[10:]
    torch.library.opcheck(torch.ops.kimi_linear.fused_recurrent_kda_pool_, pool_args)


def test_compiled_ops_match_eager_with_grads():
    """torch.compile(fullgraph=True) through the ops (aot_eager: the fake kernels, functionalization and the
    registered autograd, without C++ code generation)."""
    x = inputs(1, 12, 1, 8, 8, HV=2, raw=True)
    x["A_log"], x["dt_bias"] = torch.randn(2), torch.randn(16)
    kw = dict(use_gate_in_kernel=True, lower_bound=-3.0, use_qk_l2norm_in_kernel=True, output_final_state=True)

    def step(**z):
        o, s = chunk_kda(**z, **kw)
        o2, _ = fused_recurrent_kda(**z, **kw)
        return o + o2, s

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_close(with_grads(compiled, x), with_grads(step, x))
    pool = torch.randn(4, 2, 8, 8)
    slots = torch.tensor([1])
    dec = {n: t[:, :1] for n, t in x.items() if n not in ("initial_state", "A_log", "dt_bias")}

    def decode(pool):
        return fused_recurrent_kda(**dec, initial_state=pool, ssm_state_indices=slots)[0]

    pool_c, pool_e = pool.clone(), pool.clone()
    o_c = torch.compile(decode, fullgraph=True, backend="aot_eager")(pool_c)
    o_e = decode(pool_e)
    assert torch.equal(o_c, o_e) and torch.equal(pool_c, pool_e) and not torch.equal(pool_c, pool)


def test_compiled_varlen_prefill_with_model_call_keywords():
    """torch.compile(fullgraph=True) of a packed prefill as model code writes it (cu_seqlens, keywords forwarded
    from the model call): no graph break, the reference's result."""
    x = inputs(1, 30, 2, 16, 8, N=2)
    cu = torch.tensor([0, 12, 30])

    def prefill(cu_seqlens, **z):
        return chunk_kda(**z, cu_seqlens=cu_seqlens, output_final_state=True, output_hidden_states=True,
                         output_attentions=False)

    o, s = torch.compile(prefill, fullgraph=True, backend="aot_eager")(cu, **x)
    o_ref, s_ref = reference(**x, cu_seqlens=cu)
    assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL


# ---------------------------------------------------------------------------------------------------------------
# Real sizes on the GPU.


@gpu
@pytest.mark.gpu
def test_gpu_gva_bounded_gate_bf16_with_grads():
    """H=4 query/key heads, HV=16 value heads, K=V=128, T=1000 varlen, bf16: within 2x of the fp32 reference's
    own bf16 error, every gradient."""
    lengths = [300, 0, 700]
    x = inputs(1, 1000, 4, 128, 128, HV=16, N=3, raw=True)
    x["A_log"], x["dt_bias"] = torch.randn(16) * 0.3, torch.randn(16 * 128)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    kw = dict(gate=True, lower_bound=-5.0, l2norm_qk=True, beta_sigmoid=True)
    want = with_grads(reference, x, cu_seqlens=cu, **kw)
    x16 = {n: (t.to(torch.bfloat16) if n in ("q", "k", "v", "g", "beta") else t) for n, t in x.items()}
    ref16 = with_grads(reference, {n: t.float() for n, t in x16.items()}, cu_seqlens=cu, **kw)
    got = with_grads(chunk_kda, {n: t.cuda() for n, t in x16.items()}, cu_seqlens=cu.cuda(), output_final_state=True,
                     use_gate_in_kernel=True, safe_gate=True, lower_bound=-5.0, use_qk_l2norm_in_kernel=True,
                     use_beta_sigmoid_in_kernel=True)
    o, s, grads = got
    assert rel_err(o.float().cpu(), want[0]) <= 2 * rel_err(ref16[0], want[0]) + 1e-3
    assert rel_err(s.cpu(), want[1]) <= 2 * rel_err(ref16[1], want[1]) + 1e-3
    for n, d in grads.items():
        assert rel_err(d.float().cpu(), want[2][n]) <= 2 * rel_err(ref16[2][n], want[2][n]) + 2e-3, n


@gpu
@pytest.mark.gpu
def test_gpu_intermediate_states_and_spec_decode_bf16():
    x = inputs(1, 2000, 32, 128, 128, N=2)
    cu = torch.tensor([0, 1000, 2000])
    xb = {n: (t.to(torch.bfloat16) if n != "initial_state" else t).cuda() for n, t in x.items()}
    with torch.inference_mode():
        o, s, h = chunk_kda(**xb, cu_seqlens=cu.cuda(), output_final_state=True, return_intermediate_states=True)
        o32, s32, h32 = chunk_kda(**{n: t.cuda() for n, t in x.items()}, cu_seqlens=cu.cuda(),
                                  output_final_state=True, return_intermediate_states=True, chunk_size=32)
    assert h.dtype == torch.bfloat16 and h.shape == (1, 32, 32, 128, 128) and h32.shape == (1, 64, 32, 128, 128)
    assert rel_err(h[0, 16].float().cpu(), x["initial_state"][1]) < 1e-2  # sequence 1 starts from its state
    assert rel_err(h.float(), h32[:, ::2].float()) < 2e-2  # every other 32-token chunk starts a 64-token one
    with torch.inference_mode():
        _, s_first = chunk_kda(**{n: (t[:1] if n == "initial_state" else t[:, :32]).cuda() for n, t in x.items()},
                               output_final_state=True)
    assert rel_err(h32[0, 1], s_first[0]) < 1e-4  # a mid-chunk state: after the first 32 tokens
    x2, pool, slots, accepted, cu2, _ = _spec_case()
    pools = {}
    for backend in ("torch", "triton"):
        pools[backend] = pool.clone().cuda()
        fused_recurrent_kda(**{n: t.cuda() for n, t in x2.items()}, initial_state=pools[backend],
                            cu_seqlens=cu2.cuda(), ssm_state_indices=slots.cuda(),
                            num_accepted_tokens=accepted.cuda(), backend=backend)
    assert rel_err(pools["triton"], pools["torch"]) < TOL


@gpu
@pytest.mark.gpu
def test_gpu_compiled_ops_with_inductor():
    """Inductor, fullgraph, on the Triton backend (bf16, GVA, the in-op activations): chunk_kda forward and every
    gradient, and a decode step updating a state pool in place, equal the eager calls."""
    x = {n: t.cuda() for n, t in inputs(2, 200, 2, 64, 64, HV=4, raw=True).items()}
    x.update({n: x[n].to(torch.bfloat16) for n in ("q", "k", "v")})
    x["A_log"], x["dt_bias"] = torch.randn(4, device="cuda") * 0.3, torch.randn(4 * 64, device="cuda")
    kw = dict(output_final_state=True, use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True,
              use_beta_sigmoid_in_kernel=True)

    def prefill(**z):
        return chunk_kda(**z, **kw)

    try:
        got = with_grads(torch.compile(prefill, fullgraph=True), x)
        assert_close(on_cpu(got), on_cpu(with_grads(prefill, x)), tol=1e-3, grad_tol=1e-3)  # same kernels
        dec = {n: x[n][:, :1] for n in ("q", "k", "v", "g", "beta")}
        pool = torch.randn(6, *x["initial_state"].shape[1:], device="cuda")  # [S, HV, K, V]
        slots = torch.tensor([4, 1], device="cuda")

        def decode(pool):
            return fused_recurrent_kda(**dec, A_log=x["A_log"], dt_bias=x["dt_bias"], initial_state=pool,
                                       ssm_state_indices=slots, **{n: v for n, v in kw.items()
                                                                   if n != "output_final_state"})[0]

        pool_c, pool_e = pool.clone(), pool.clone()
        o_c = torch.compile(decode, fullgraph=True)(pool_c)
        assert rel_err(o_c, decode(pool_e)) < 1e-3 and rel_err(pool_c, pool_e) < 1e-5
    finally:
        torch._dynamo.reset()
