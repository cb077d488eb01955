"""KDA reference and CPU path: the chunked form and the public ops against the recurrence of paper Eq. 1."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.ops.kda import (
    chunk_kda,
    fused_recurrent_kda,
    kda_gate,
    naive_chunk_kda,
    naive_recurrent_dplr,
    naive_recurrent_kda,
)
from tests.utils import kda_inputs, leaves, loss_of, rel_err

GRAD_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def _triton_runs() -> bool:
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def against_recurrence(x, tol, grad_tol, **kwargs):
    """chunk_kda (``kwargs``: its backend) and the recurrence on ``x``, each with its gradients: every tensor of the
    chunk form finite, o and the final state within ``tol``, the q, k, v, beta, h0 gradients within ``grad_tol``.
    Returns both gradient dicts."""
    o_c, s_c, g_c = run_with_grads(chunk_kda, x, **kwargs)
    o_r, s_r, g_r = run_with_grads(naive_recurrent_kda, x)
    for t in (o_c, s_c, *g_c.values()):
        assert torch.isfinite(t).all()
    assert rel_err(o_c, o_r) < tol
    assert rel_err(s_c, s_r) < tol
    for name in ("q", "k", "v", "beta", "initial_state"):
        assert rel_err(g_c[name], g_r[name]) < grad_tol, name
    return g_c, g_r


def run_with_grads(fn, inputs, **kwargs):
    x = leaves(inputs)
    o, state = fn(**x, output_final_state=True, **kwargs)
    loss_of(o, state).backward()
    grads = {n: x[n].grad for n in GRAD_NAMES if x.get(n) is not None}
    return o.detach(), state.detach(), grads


# ---------------------------------------------------------------------------------------------------------------
# The specification itself: the recurrence is paper Eq. 1 written with explicit K x K matrices.


def test_recurrence_is_eq1_with_explicit_matrices():
    """S_t = (I - b k k^T) Diag(exp g) S_{t-1} + b k v^T and o_t = S_t^T (scale q), built from dense matrices."""
    torch.manual_seed(0)
    B, T, H, K, V = 1, 7, 1, 5, 3
    x = kda_inputs(B, T, H, K, V, dtype=torch.float64)
    S = x["initial_state"][0, 0].double()
    scale = 0.37
    expected = []
    for t in range(T):
        k_t, q_t = x["k"][0, t, 0], x["q"][0, t, 0]
        b_t = x["beta"][0, t, 0]
        transition = (torch.eye(K, dtype=torch.float64) - b_t * torch.outer(k_t, k_t)) @ torch.diag(x["g"][0, t, 0].exp())
        S = transition @ S + b_t * torch.outer(k_t, x["v"][0, t, 0])
        expected.append(S.T @ (scale * q_t))
    o, state = naive_recurrent_kda(**x, scale=scale, output_final_state=True)
    assert rel_err(o[0, :, 0].double(), torch.stack(expected)) < 1e-6
    assert rel_err(state[0, 0].double(), S) < 1e-6


def test_dplr_reference_contains_kda():
    """KDA = DPLR with a = beta k, b = exp(g) k and written key beta k."""
    torch.manual_seed(1)
    x = kda_inputs(2, 37, 3, 16, 8)
    beta = x["beta"][..., None]
    o_dplr, s_dplr = naive_recurrent_dplr(
        x["q"], beta * x["k"], x["v"], a=beta * x["k"], b=x["g"].exp() * x["k"], g=x["g"],
        initial_state=x["initial_state"], output_final_state=True,
    )
    o, s = naive_recurrent_kda(**x, output_final_state=True)
    assert rel_err(o_dplr, o) < 1e-5
    assert rel_err(s_dplr, s) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Chunked form == recurrence: output, final state and every gradient.

SHAPES = [  # B, T, H, K, V
    (1, 1, 1, 16, 16),
    (2, 63, 2, 32, 16),
    (1, 64, 4, 16, 32),
    (2, 65, 3, 32, 24),
    (1, 500, 2, 16, 16),
]


@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}-T{t}-H{h}-K{k}-V{v}" for b, t, h, k, v in SHAPES])
def test_chunk_matches_recurrence_with_grads(shape, with_state):
    B, T, H, K, V = shape
    torch.manual_seed(T * 7 + K)
    x = kda_inputs(B, T, H, K, V, with_state=with_state)
    o_c, s_c, g_c = run_with_grads(chunk_kda, x, backend="torch")
    o_r, s_r, g_r = run_with_grads(naive_recurrent_kda, x)
    assert rel_err(o_c, o_r) < 1e-5
    assert rel_err(s_c, s_r) < 1e-5
    assert set(g_c) == set(g_r) == {n for n in GRAD_NAMES if x.get(n) is not None}
    for name in g_r:
        assert rel_err(g_c[name], g_r[name]) < 1e-4, name


@pytest.mark.parametrize("gate", ["zero", "minus1000", "mixed"])
def test_extreme_gates_stay_finite_and_correct(gate):
    torch.manual_seed(3)
    x = kda_inputs(1, 130, 2, 16, 16)
    if gate == "zero":
        x["g"] = torch.zeros_like(x["g"])
    elif gate == "minus1000":
        x["g"] = torch.full_like(x["g"], -1000.0)
    else:  # channels that forget everything next to channels that keep everything
        x["g"] = torch.where(torch.rand_like(x["g"]) < 0.5, -1000.0, 0.0)
    g_c, _ = against_recurrence(x, 1e-5, 1e-4, backend="torch")
    if gate == "minus1000":
        # Every state is wiped at each step: the initial state cannot reach the output.
        assert g_c["initial_state"].abs().max() == 0


def test_decay_and_gate_order_matter():
    """Guards against a silently missing decay or a decay applied after the delta update."""
    torch.manual_seed(4)
    x = kda_inputs(1, 40, 2, 16, 16, gate_scale=0.5)
    o, _ = chunk_kda(**x, backend="torch")
    o_no_decay, _ = naive_recurrent_kda(**{**x, "g": torch.zeros_like(x["g"])})
    assert rel_err(o_no_decay, o) > 1e-2

    def decay_after_update(q, k, v, g, beta, initial_state):
        S = initial_state.clone()
        out = []
        for t in range(q.shape[1]):
            pred = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
            S = S + k[:, t, ..., None] * (beta[:, t, :, None] * (v[:, t] - pred))[..., None, :]
            S = S * g[:, t].exp()[..., None]
            out.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * q.shape[-1] ** -0.5, S))
        return torch.stack(out, 1)

    assert rel_err(decay_after_update(**x), o) > 1e-2


def test_state_continuation():
    """Running T1 then T2 carrying the state equals running T1 + T2 at once."""
    torch.manual_seed(5)
    x = kda_inputs(2, 150, 2, 16, 24)
    o_full, s_full = chunk_kda(**x, output_final_state=True, backend="torch")
    cut = 77
    first = {n: (t[:, :cut] if n != "initial_state" else t) for n, t in x.items()}
    o1, s1 = chunk_kda(**first, output_final_state=True, backend="torch")
    second = {n: t[:, cut:] for n, t in x.items() if n != "initial_state"}
    o2, s2 = chunk_kda(**second, initial_state=s1, output_final_state=True, backend="torch")
    assert rel_err(torch.cat([o1, o2], 1), o_full) < 1e-5
    assert rel_err(s2, s_full) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Varlen: packed sequences == separate runs, no leakage across boundaries.

LENGTHS = [[5, 0, 1, 70, 64], [1], [0, 130], [63, 65]]


@pytest.mark.parametrize("op", ["chunk", "recurrent"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=["-".join(map(str, x)) for x in LENGTHS])
def test_varlen_equals_separate_runs(lengths, op):
    torch.manual_seed(sum(lengths))
    fn = chunk_kda if op == "chunk" else fused_recurrent_kda
    T, N, H, K, V = sum(lengths), len(lengths), 2, 16, 8
    x = kda_inputs(1, T, H, K, V, N=N)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    xs = leaves(x)
    o, s = fn(**xs, cu_seqlens=cu, output_final_state=True, backend="torch")
    loss_of(o, s).backward()

    ys = leaves(x)
    outs, states = [], []
    for i in range(N):
        seg = {n: t[:, cu[i] : cu[i + 1]] for n, t in ys.items() if n != "initial_state"}
        o_i, s_i = naive_recurrent_kda(**seg, initial_state=ys["initial_state"][i : i + 1], output_final_state=True)
        outs.append(o_i)
        states.append(s_i)
    o_ref, s_ref = torch.cat(outs, 1), torch.cat(states, 0)
    loss_of(o_ref, s_ref).backward()
    assert o.shape == (1, T, H, V)
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5
    for name in GRAD_NAMES:
        assert rel_err(xs[name].grad, ys[name].grad) < 1e-4, name
    for i, n in enumerate(lengths):  # an empty sequence passes its initial state through
        if n == 0:
            assert torch.equal(s[i], x["initial_state"][i])


def test_varlen_boundary_does_not_leak():
    """Changing one sequence's tokens leaves the other sequences' outputs and states bit-for-bit unchanged."""
    torch.manual_seed(6)
    lengths = [40, 30, 50]
    x = kda_inputs(1, sum(lengths), 2, 16, 16, N=3)
    cu = torch.tensor([0, 40, 70, 120])
    o, s = chunk_kda(**x, cu_seqlens=cu, output_final_state=True, backend="torch")
    y = {n: (t.clone() if t is not None else None) for n, t in x.items()}
    y["v"][:, 40:70] += 1.0
    y["k"][:, 40:70] = F.normalize(torch.randn_like(y["k"][:, 40:70]), dim=-1)
    o2, s2 = chunk_kda(**y, cu_seqlens=cu, output_final_state=True, backend="torch")
    assert torch.allclose(o2[:, :40], o[:, :40], atol=1e-6) and torch.allclose(o2[:, 70:], o[:, 70:], atol=1e-6)
    assert torch.allclose(s2[0], s[0], atol=1e-6) and torch.allclose(s2[2], s[2], atol=1e-6)
    assert rel_err(o2[:, 40:70], o[:, 40:70]) > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# In-op activations, scalar gate, dtypes.


@pytest.mark.parametrize("op", ["chunk", "recurrent"])
def test_in_kernel_activations_equal_outside(op):
    torch.manual_seed(7)
    fn = chunk_kda if op == "chunk" else fused_recurrent_kda
    B, T, H, K, V = 2, 70, 2, 16, 16
    raw = {
        "q": torch.randn(B, T, H, K), "k": torch.randn(B, T, H, K), "v": torch.randn(B, T, H, V),
        "g": torch.randn(B, T, H, K), "beta": torch.randn(B, T, H), "A_log": torch.randn(H) * 0.5,
        "dt_bias": torch.randn(H * K), "initial_state": torch.randn(B, H, K, V),
    }
    a = leaves(raw)
    o1, s1 = fn(**a, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                output_final_state=True, backend="torch")
    loss_of(o1, s1).backward()
    b = leaves(raw)
    g = -b["A_log"].exp()[:, None] * F.softplus(b["g"] + b["dt_bias"].view(H, K))
    o2, s2 = naive_recurrent_kda(
        F.normalize(b["q"], dim=-1, eps=0), F.normalize(b["k"], dim=-1, eps=0), b["v"], g, b["beta"].sigmoid(),
        initial_state=b["initial_state"], output_final_state=True,
    )
    loss_of(o2, s2).backward()
    assert rel_err(o1, o2) < 1e-5
    assert rel_err(s1, s2) < 1e-5
    for name in raw:
        assert rel_err(a[name].grad, b[name].grad) < 1e-4, name


def test_gate_function():
    torch.manual_seed(8)
    x, A_log, dt_bias = torch.randn(2, 5, 3, 4), torch.randn(3), torch.randn(12)
    g = kda_gate(x, A_log.view(1, 1, 3, 1), dt_bias)
    for h in range(3):
        expected = -A_log[h].exp() * F.softplus(x[:, :, h] + dt_bias.view(3, 4)[h])
        assert torch.allclose(g[:, :, h], expected, atol=1e-6)
    assert (g <= 0).all() and g.dtype == torch.float32
    scalar = kda_gate(x[..., 0], A_log, dt_bias[:3])
    assert scalar.shape == (2, 5, 3)


def test_scalar_gate_is_broadcast_over_k():
    torch.manual_seed(9)
    x = kda_inputs(1, 80, 2, 16, 16, scalar_gate=True)
    o, s = chunk_kda(**x, output_final_state=True, backend="torch")
    o_ref, s_ref = naive_recurrent_kda(**{**x, "g": x["g"][..., None].expand(-1, -1, -1, 16)}, output_final_state=True)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_inputs(dtype):
    """Low-precision inputs: output in v's dtype, error within 2x of the reference's own rounding error."""
    torch.manual_seed(10)
    x = kda_inputs(1, 100, 2, 32, 32, dtype=dtype)
    o, s = chunk_kda(**x, output_final_state=True, backend="torch")
    assert o.dtype == dtype and s.dtype == torch.float32
    exact = {n: (t.float() if t is not None else None) for n, t in x.items()}
    o_exact, s_exact = naive_recurrent_kda(**exact, output_final_state=True)
    o_ref_lp, _ = naive_recurrent_kda(**x)  # the reference, returning the same dtype
    assert rel_err(o.float(), o_exact) <= 2 * rel_err(o_ref_lp.float(), o_exact) + 1e-6
    assert rel_err(s, s_exact) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Recurrent op with a state pool.


def test_recurrent_op_matches_reference_multi_token():
    torch.manual_seed(11)
    x = kda_inputs(3, 9, 2, 16, 8)
    o, s = fused_recurrent_kda(**x, output_final_state=True, backend="torch")
    o_ref, s_ref = naive_recurrent_kda(**x, output_final_state=True)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)


def test_state_pool_slots():
    torch.manual_seed(12)
    N, S, H, K, V = 3, 6, 2, 16, 8
    x = kda_inputs(N, 4, H, K, V, with_state=False)
    del x["initial_state"]
    pool = torch.randn(S, H, K, V)
    before = pool.clone()
    slots = torch.tensor([4, -1, 1])
    o, returned = fused_recurrent_kda(**x, initial_state=pool, state_indices=slots, backend="torch")
    assert returned is pool
    for slot in (0, 2, 3, 5):
        assert torch.equal(pool[slot], before[slot])
    h0 = torch.stack([before[4], torch.zeros(H, K, V), before[1]])
    o_ref, s_ref = naive_recurrent_kda(**x, initial_state=h0, output_final_state=True)
    assert rel_err(o, o_ref) < 1e-6
    assert rel_err(pool[4], s_ref[0]) < 1e-6 and rel_err(pool[1], s_ref[2]) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Bad input.


def _good(**overrides):
    x = kda_inputs(1, 8, 2, 16, 16)
    x.update(overrides)
    return x


BAD_INPUTS = {
    "q-rank": (lambda: _good(q=torch.randn(8, 2, 16)), ValueError, "q must be"),
    "k-shape": (lambda: _good(k=torch.randn(1, 8, 2, 8)), ValueError, "k must"),
    "v-T": (lambda: _good(v=torch.randn(1, 9, 2, 16)), ValueError, "v must"),
    "g-shape": (lambda: _good(g=torch.randn(1, 8, 2, 4)), ValueError, "g must"),
    "beta-shape": (lambda: _good(beta=torch.rand(1, 8, 3)), ValueError, "beta must"),
    "int-q": (lambda: _good(q=torch.ones(1, 8, 2, 16, dtype=torch.int64)), TypeError, "q must be float"),
    "K-too-big": (lambda: _good(q=torch.randn(1, 8, 2, 300), k=torch.randn(1, 8, 2, 300), g=torch.randn(1, 8, 2, 300)),
                  ValueError, "K=300"),
    "h0-dtype": (lambda: _good(initial_state=torch.randn(1, 2, 16, 16, dtype=torch.float64)), TypeError,
                 "initial_state must be float32"),
    "h0-shape": (lambda: _good(initial_state=torch.randn(1, 2, 16, 8)), ValueError, "initial_state must be"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
@pytest.mark.parametrize("fn", [chunk_kda, fused_recurrent_kda], ids=["chunk", "recurrent"])
def test_bad_input_is_named(fn, case):
    make, exc, message = BAD_INPUTS[case]
    with pytest.raises(exc, match=message):
        fn(**make(), backend="torch")


@pytest.mark.parametrize(
    "cu, B, message",
    [
        ([0, 3, 8], 2, "batch size must be 1"),
        ([1, 3, 8], 1, "start at 0"),
        ([0, 5, 3, 8], 1, "non-decreasing"),
        ([0, 3, 7], 1, "end at T=8"),
    ],
    ids=["B>1", "not-from-0", "decreasing", "not-to-T"],
)
def test_bad_cu_seqlens(cu, B, message):
    x = kda_inputs(B, 8, 2, 16, 16, with_state=False)
    with pytest.raises(ValueError, match=message):
        chunk_kda(**x, cu_seqlens=torch.tensor(cu), backend="torch")


def test_bad_misc_arguments():
    x = kda_inputs(1, 8, 2, 16, 16, with_state=False)
    with pytest.raises(TypeError, match="cu_seqlens must be an int"):
        chunk_kda(**x, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match="needs A_log"):
        chunk_kda(**x, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        chunk_kda(**x, backend="cuda")
    with pytest.raises(ValueError, match="preprocess_backend must be one of"):
        chunk_kda(**x, preprocess_backend="fused")
    with pytest.raises(ValueError, match="state_indices needs initial_state"):
        fused_recurrent_kda(**x, state_indices=torch.tensor([0]))


def test_naive_chunk_any_length_and_chunk_sizes():
    torch.manual_seed(13)
    x = kda_inputs(1, 50, 1, 16, 16)
    o64, _ = naive_chunk_kda(**x)
    o32, _ = naive_chunk_kda(**x, chunk_size=32)
    assert rel_err(o32, o64) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("B,T,cu", [(2, 0, None), (0, 5, None), (1, 0, (0, 0, 0))], ids=["T0", "B0", "varlen-empty"])
def test_no_tokens_return_empty_outputs_and_the_initial_states(backend, B, T, cu):
    if backend == "triton" and not _triton_runs():
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    N = B if cu is None else len(cu) - 1
    x = kda_inputs(max(B, 1), T, 2, 16, 8, N=max(N, 1))
    x = {n: t[:N] if n == "initial_state" else t[:B] for n, t in x.items()}
    x = {n: t.requires_grad_(True) for n, t in x.items()}
    kwargs = {} if cu is None else {"cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
    o, ht = chunk_kda(**x, output_final_state=True, backend=backend, **kwargs)
    assert o.shape == (B, T, 2, 8) and o.dtype == x["v"].dtype
    assert torch.equal(ht, x["initial_state"]) and ht is not x["initial_state"]
    w = torch.randn_like(ht)
    ((ht * w).sum() + o.sum()).backward()
    assert torch.equal(x["initial_state"].grad, w)
    o, ht = chunk_kda(*(x[n] for n in ("q", "k", "v", "g", "beta")), output_final_state=True, backend=backend,
                      **kwargs)
    assert ht.shape == (N, 2, 16, 8) and not ht.any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_minus_inf_gates_reset_the_state_as_the_recurrence_does(backend):
    """g = -inf in some channels and at some steps (inside a sub-block, at a chunk start): outputs, final state and
    every gradient equal the recurrence's (exp(-inf) = 0 there) and stay finite."""
    if backend == "triton" and not _triton_runs():
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    torch.manual_seed(5)
    x = kda_inputs(1, 80, 2, 16, 16)
    x["g"][:, 5] = -torch.inf
    x["g"][:, 30, :, :8] = -torch.inf
    x["g"][:, 64, 1] = -torch.inf
    # the chunk forms take -inf as -1000, so G reaches ~-1000 inside a chunk: fp32 resolves differences of G to
    # ~2^-24 * 1000 ~ 6e-5 (the recurrence exponentiates each g alone)
    g_c, g_r = against_recurrence(x, 6e-5, 6e-5, backend=backend)
    m = torch.isfinite(x["g"])
    assert rel_err(g_c["g"][m], g_r["g"][m]) < 6e-5
    assert g_c["g"][~m].abs().max() < 1e-4 * g_c["g"][m].abs().max()  # the true gradient there is 0
