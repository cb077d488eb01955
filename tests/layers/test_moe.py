"""MoE layer vs the dense reference (outputs and every gradient), routing rules, load statistics and
balancing, HF transformers' router as an independent check, and the grouped GPU path at release shapes."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from types import SimpleNamespace

import pytest
import torch

from kimi_linear.layers.moe import MoE
from kimi_linear.ops.moe import moe_reference, route_tokens
from tests.utils import rel_err

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
NEEDS_GROUPED_MM = pytest.mark.skipif(not HAS_GROUPED_MM, reason="no torch._grouped_mm")
BACKENDS = [pytest.param("grouped_mm", marks=NEEDS_GROUPED_MM), "loop"]


def make_config(**overrides):
    values = dict(hidden_size=24, num_experts=13, num_experts_per_token=3, moe_intermediate_size=20,
                  num_shared_experts=1, routed_scaling_factor=2.446, moe_renormalize=True,
                  moe_router_activation_func="sigmoid", num_expert_group=1, topk_group=1,
                  initializer_range=0.02)
    values.update(overrides)
    return SimpleNamespace(**values)


def random_moe(config, dtype=torch.float32, device="cpu", seed=0, bias_scale=0.05):
    """Every parameter and the correction bias random (not left at init), scaled so activations stay O(1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        moe = MoE(config)

    def randn(t, scale):
        return torch.randn(t.shape, generator=gen, device=device) * scale

    D, F = config.hidden_size, config.moe_intermediate_size
    with torch.no_grad():
        moe.gate.weight.copy_(randn(moe.gate.weight, 2 * D**-0.5))
        moe.gate.e_score_correction_bias.copy_(randn(moe.gate.e_score_correction_bias, bias_scale))
        moe.experts.w1.copy_(randn(moe.experts.w1, D**-0.5))
        moe.experts.w3.copy_(randn(moe.experts.w3, D**-0.5))
        moe.experts.w2.copy_(randn(moe.experts.w2, F**-0.5))
        if moe.shared_experts is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                weight = getattr(moe.shared_experts, name).weight
                weight.copy_(randn(weight, weight.shape[1] ** -0.5))
    return moe.to(dtype)


def named_params(moe):
    """Every trainable tensor of the layer by name (the correction bias is a buffer, not among them)."""
    return dict(moe.named_parameters())


def reference_output(moe, x, params=None):
    """moe_reference with the layer's routing settings and correction bias, on ``params`` (default: its own).
    """
    p = named_params(moe) if params is None else params
    shared = None
    if moe.shared_experts is not None:
        shared = tuple(p[f"shared_experts.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
    out = moe_reference(
        x.reshape(-1, moe.hidden_size), p["gate.weight"], moe.gate.e_score_correction_bias,
        p["experts.w1"], p["experts.w3"], p["experts.w2"], shared,
        top_k=moe.top_k, renormalize=moe.renormalize, scaling_factor=moe.routed_scaling_factor,
        activation=moe.activation, num_groups=moe.num_groups, top_k_groups=moe.top_k_groups,
    )
    return out.view(x.shape)


def detached_leaves(tensors: dict, dtype) -> dict:
    return {n: t.detach().to(dtype).requires_grad_() for n, t in tensors.items()}


def grads_of(out, dy, tensors):
    return torch.autograd.grad(out, list(tensors), dy, allow_unused=False)


CASES = {
    "E13-K3-B2-T37": (make_config(), 2, 37),
    "T1": (make_config(), 1, 1),
    "softmax-norenorm-scale1": (make_config(moe_router_activation_func="softmax", moe_renormalize=False,
                                            routed_scaling_factor=1.0), 3, 11),
    "no-shared": (make_config(num_shared_experts=0), 2, 9),
    "two-shared": (make_config(num_shared_experts=2), 2, 9),
    "groups4-top2": (make_config(num_experts=12, num_expert_group=4, topk_group=2, num_experts_per_token=4),
                     2, 21),
    "K-equals-E": (make_config(num_experts=5, num_experts_per_token=5), 1, 8),
    "D22-F19-unaligned": (make_config(hidden_size=22, moe_intermediate_size=19), 2, 13),
}


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_all_grads_match_reference(case, backend):
    config, B, T = CASES[case]
    if backend == "grouped_mm" and "unaligned" in case:
        pytest.skip("torch._grouped_mm needs 16-byte aligned sizes (the error is tested separately)")
    moe = random_moe(config, seed=zlib.crc32(case.encode()) % 1000)
    moe.expert_backend = backend
    x = torch.randn(B, T, config.hidden_size, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype

    # The reference in float64 (routing itself is fp32 in both) is the exact answer here.
    params = named_params(moe)
    leaves = detached_leaves({"x": x, **params}, torch.float64)
    ref = reference_output(moe, leaves["x"], leaves)
    assert rel_err(y, ref) < 1e-5

    dy = torch.randn_like(y)
    got = grads_of(y, dy, [x, *params.values()])
    want = grads_of(ref, dy.double(), list(leaves.values()))
    for name, g, r in zip(leaves, got, want):
        assert rel_err(g, r) < 1e-5, name
    assert moe.last_expert_load.sum().item() == B * T * config.num_experts_per_token


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_error_within_twice_bf16_reference(backend):
    config = make_config(hidden_size=32, moe_intermediate_size=24, num_experts=11, num_experts_per_token=4)
    moe = random_moe(config, dtype=torch.bfloat16, seed=3)
    moe.expert_backend = backend
    assert moe.gate.weight.dtype == torch.float32 and moe.experts.w1.dtype == torch.bfloat16
    x = torch.randn(3, 19, 32).bfloat16().requires_grad_()
    y = moe(x)
    assert y.dtype == torch.bfloat16

    params = named_params(moe)
    dy = torch.randn_like(y)
    got = grads_of(y, dy, [x, *params.values()])
    # "exact": the same bf16 values in fp32; "bf16 reference": the readable reference run in bf16.
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        leaves = detached_leaves({"x": x, **params}, dtype)
        leaves["gate.weight"] = params["gate.weight"].detach().clone().requires_grad_()
        ref = reference_output(moe, leaves["x"], leaves)
        outs.append((ref, grads_of(ref, dy.to(dtype), list(leaves.values()))))
    (exact, exact_grads), (ref16, ref16_grads) = outs
    names = ["x", *params]
    err, err_ref = rel_err(y, exact), rel_err(ref16, exact)
    assert err < 2e-2 and err <= 2 * err_ref + 1e-4, (err, err_ref)
    for name, g, e, r in zip(names, got, exact_grads, ref16_grads):
        err, err_ref = rel_err(g, e), rel_err(r, e)
        assert err < 3e-2 and err <= 2 * err_ref + 1e-4, (name, err, err_ref)


def test_correction_bias_changes_choice_not_weights():
    torch.manual_seed(5)
    N, D, E, K, scale = 40, 16, 9, 3, 2.446
    x = torch.randn(N, D)
    router = torch.randn(E, D) * 0.5
    scores = torch.sigmoid(x.double() @ router.double().t())
    favoured = torch.tensor([7, 2, 4])
    bias = torch.full((E,), -0.3)
    bias[favoured] = 5.0  # larger than any score gap: every token must pick exactly these

    weights, experts = route_tokens(x, router, bias, K, scaling_factor=scale)
    assert all(set(row.tolist()) == set(favoured.tolist()) for row in experts)
    want = scores.gather(1, experts)
    want = want / want.sum(-1, keepdim=True) * scale
    assert rel_err(weights, want) < 1e-6

    # A bias that reorders nothing within the chosen set leaves the weights unchanged token by token.
    unbiased_w, unbiased_e = route_tokens(x, router, None, K, scaling_factor=scale)
    small = torch.full((E,), 1e-9)
    w_small, e_small = route_tokens(x, router, small, K, scaling_factor=scale)
    assert torch.equal(e_small.sort(-1).values, unbiased_e.sort(-1).values)
    assert torch.equal(w_small.gather(1, e_small.argsort(-1)), unbiased_w.gather(1, unbiased_e.argsort(-1)))

    # Through the module: load statistic and output follow the biased choice.
    config = make_config(hidden_size=D, num_experts=E, num_experts_per_token=K)
    moe = random_moe(config)
    with torch.no_grad():
        moe.gate.weight.copy_(router)
        moe.gate.e_score_correction_bias.copy_(bias)
    y = moe(x.view(1, N, D))
    load = torch.zeros(E)
    load[favoured] = N
    assert torch.equal(moe.last_expert_load, load)
    assert rel_err(y, reference_output(moe, x.view(1, N, D))) < 1e-5


def test_renormalisation_and_scaling():
    torch.manual_seed(6)
    x, router = torch.randn(17, 12), torch.randn(10, 12)
    scores = torch.sigmoid(x @ router.t())
    w_raw, e_raw = route_tokens(x, router, None, 4, renormalize=False, scaling_factor=1.0)
    assert rel_err(w_raw, scores.gather(1, e_raw)) < 1e-6
    assert torch.equal(e_raw.sort(-1).values, scores.topk(4).indices.sort(-1).values)
    w_norm, e_norm = route_tokens(x, router, None, 4, renormalize=True, scaling_factor=3.5)
    assert torch.equal(e_norm, e_raw)
    assert rel_err(w_norm.sum(-1), torch.full((17,), 3.5)) < 1e-6
    assert rel_err(w_norm, w_raw / w_raw.sum(-1, keepdim=True) * 3.5) < 1e-6
    w_soft, e_soft = route_tokens(x, router, None, 4, renormalize=False, activation="softmax")
    assert rel_err(w_soft, torch.softmax(x @ router.t(), -1).gather(1, e_soft)) < 1e-6


def test_tied_scores_pick_distinct_experts():
    config = make_config(num_experts=7, num_experts_per_token=3)
    moe = random_moe(config, seed=8, bias_scale=0.0)
    with torch.no_grad():
        # Experts 0, 1 and 2 are exact copies (router rows and weights): their scores tie on every token, and
        # any choice among them gives the same output.
        for e in (1, 2):
            moe.gate.weight[e] = moe.gate.weight[0]
            for w in (moe.experts.w1, moe.experts.w3, moe.experts.w2):
                w[e] = w[0]
    x = torch.randn(2, 23, config.hidden_size)
    y = moe(x)
    _, experts = moe.route(x.view(-1, config.hidden_size))
    assert all(len(set(row.tolist())) == 3 for row in experts)
    assert moe.last_expert_load.sum().item() == 2 * 23 * 3
    assert rel_err(y, reference_output(moe, x)) < 1e-5


def test_matches_hf_transformers_moe():
    hf = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    from transformers.models.kimi_linear.configuration_kimi_linear import KimiLinearConfig as HFConfig

    for groups, top_groups in ((1, 1), (4, 2)):
        D, E, K, F = 32, 16, 4, 24
        config = make_config(hidden_size=D, num_experts=E, num_experts_per_token=K, moe_intermediate_size=F,
                             num_expert_group=groups, topk_group=top_groups)
        moe = random_moe(config, seed=groups)
        hf_config = HFConfig(hidden_size=D, num_experts=E, num_experts_per_token=K, moe_intermediate_size=F,
                             num_shared_experts=1, routed_scaling_factor=config.routed_scaling_factor,
                             moe_renormalize=True, num_expert_group=groups, topk_group=top_groups,
                             num_hidden_layers=2, vocab_size=64)
        theirs = hf.KimiLinearMoE(hf_config)
        with torch.no_grad():
            theirs.gate.weight.copy_(moe.gate.weight)
            theirs.gate.e_score_correction_bias.copy_(moe.gate.e_score_correction_bias)
            theirs.experts.gate_up_proj.copy_(torch.cat([moe.experts.w1, moe.experts.w3], dim=1))
            theirs.experts.down_proj.copy_(moe.experts.w2)
            for n in ("gate_proj", "up_proj", "down_proj"):
                getattr(theirs.shared_experts, n).weight.copy_(getattr(moe.shared_experts, n).weight)
        x = torch.randn(3, 14, D)
        _, hf_weights, hf_experts = theirs.gate(x)
        weights, experts = moe.route(x.view(-1, D))
        order, hf_order = experts.argsort(-1), hf_experts.argsort(-1)
        assert torch.equal(experts.gather(1, order), hf_experts.gather(1, hf_order))
        assert rel_err(weights.gather(1, order), hf_weights.gather(1, hf_order)) < 1e-6
        with torch.no_grad():
            y, y_hf = moe(x), theirs(x)
        assert rel_err(y, y_hf) < 1e-5
        hf_load = torch.bincount(hf_experts.flatten(), minlength=E).float()
        assert torch.equal(moe.last_expert_load, hf_load)


def test_update_correction_bias_step():
    config = make_config(num_experts=5)
    moe = random_moe(config, bias_scale=0.0)
    with pytest.raises(RuntimeError, match="forward"):
        moe.update_correction_bias(0.1)
    moe.update_correction_bias(0.1, load=torch.tensor([6.0, 1.0, 3.0, 2.0, 3.0]))  # mean 3
    assert torch.allclose(moe.gate.e_score_correction_bias, torch.tensor([-0.1, 0.1, 0.0, 0.1, 0.0]))
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    with pytest.raises(ValueError, match="rate"):
        moe.update_correction_bias(-1.0)
    with pytest.raises(ValueError, match="load"):
        moe.update_correction_bias(0.1, load=torch.ones(4))


def test_balancing_evens_out_a_skewed_router():
    torch.manual_seed(9)
    D, E, K = 16, 8, 2
    config = make_config(hidden_size=D, num_experts=E, num_experts_per_token=K)
    moe = random_moe(config, bias_scale=0.0)
    direction = torch.nn.functional.normalize(torch.randn(D), dim=0)
    with torch.no_grad():
        # Experts with a larger component along the inputs' common direction win most tokens.
        moe.gate.weight.mul_(0.3).add_(torch.linspace(-2, 2, E)[:, None] * direction)

    def imbalance():
        with torch.no_grad():
            moe(torch.randn(1, 256, D) + 2 * direction)
        return (moe.last_expert_load.max() / moe.last_expert_load.mean()).item()

    before = imbalance()
    for _ in range(80):
        imbalance()
        moe.update_correction_bias(0.02)
    after = imbalance()
    assert before > 2.5, before
    assert after < 1.6, (before, after)


def test_deterministic_and_decode_sized():
    config = make_config()
    moe = random_moe(config, seed=11)
    x = torch.randn(4, 1, config.hidden_size)
    assert torch.equal(moe(x), moe(x))
    assert rel_err(moe(x), reference_output(moe, x)) < 1e-5
    assert int((moe.last_expert_load > 0).sum()) <= 4 * config.num_experts_per_token


@NEEDS_GROUPED_MM
def test_grouped_training_path_keeps_tokens_not_slot_copies():
    """Training's grouped path (bf16 autocast, fp32 weights) keeps each token's bf16 row once (shared with the
    shared expert) and, per slot, the gate and up products and the routing weight, but neither the K slot copies
    of the row [N*K, D] nor the SwiGLU output [N*K, F]: the backward makes those again."""
    config = make_config(hidden_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_token=4)
    moe = random_moe(config, seed=4)
    moe.expert_backend = "grouped_mm"
    N, D, F, K = 40, config.hidden_size, config.moe_intermediate_size, config.num_experts_per_token
    x = torch.randn(1, N, D, requires_grad=True)
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t),
                                                  lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = moe(x)
    slot_rows = [(tuple(t.shape), t.dtype) for t in saved.values() if t.is_floating_point() and t.shape[0] == N * K]
    # gate and up (bf16), and the sorted routing weights (fp32): nothing else is kept per slot
    assert sorted(slot_rows, key=str) == sorted([((N * K, F), torch.bfloat16)] * 2 + [((N * K,), torch.float32)],
                                                key=str), slot_rows
    token_rows = [(tuple(t.shape), t.dtype) for t in saved.values() if t.is_floating_point() and t.shape[0] == N]
    assert ((N, D), torch.bfloat16) in token_rows and token_rows.count(((N, D), torch.bfloat16)) == 1
    y.float().pow(2).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in moe.parameters())


@NEEDS_GROUPED_MM
def test_grouped_training_path_compiles_whole():
    """torch.compile(fullgraph=True) traces the grouped experts' autograd Function, forward and backward (AOT
    autograd, no code generation): the same loss and input gradient as eager."""
    config = make_config(hidden_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_token=4)
    moe = random_moe(config, dtype=torch.bfloat16, seed=5)
    moe.expert_backend = "grouped_mm"
    x = torch.randn(1, 40, 32, dtype=torch.bfloat16, requires_grad=True)

    def loss(x):
        return moe(x).float().pow(2).sum()

    want = loss(x)
    (dx_want,) = torch.autograd.grad(want, x)
    got = torch.compile(loss, backend="aot_eager", fullgraph=True)(x)
    (dx,) = torch.autograd.grad(got, x)
    assert torch.equal(got, want) and torch.equal(dx, dx_want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_with_fp32_weights(backend):
    config = make_config(hidden_size=32, moe_intermediate_size=16)
    moe = random_moe(config, seed=12)
    moe.expert_backend = backend
    x = torch.randn(2, 10, 32, requires_grad=True)
    y32 = moe(x)
    load32 = moe.last_expert_load
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert torch.equal(moe.last_expert_load, load32)  # routing stays fp32 under autocast
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y32) < 2e-2
    y.float().pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in moe.parameters())


def test_layout_names_dtypes():
    config = make_config(num_shared_experts=2)
    moe = MoE(config)
    shapes = {n: tuple(t.shape) for n, t in moe.state_dict().items()}
    E, D, F = 13, 24, 20
    assert shapes == {
        "gate.weight": (E, D), "gate.e_score_correction_bias": (E,),
        "experts.w1": (E, F, D), "experts.w3": (E, F, D), "experts.w2": (E, D, F),
        "shared_experts.gate_proj.weight": (2 * F, D), "shared_experts.up_proj.weight": (2 * F, D),
        "shared_experts.down_proj.weight": (D, 2 * F),
    }
    assert "gate.e_score_correction_bias" not in dict(moe.named_parameters())
    moe.to(torch.bfloat16)
    assert moe.gate.weight.dtype == torch.float32 and moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.experts.w2.dtype == torch.bfloat16
    assert moe.shared_experts.up_proj.weight.dtype == torch.bfloat16
    moe.half()
    assert moe.gate.weight.dtype == torch.float32 and moe.experts.w1.dtype == torch.float16


def test_bad_input_raises():
    moe = random_moe(make_config())
    with pytest.raises(ValueError, match="hidden_size=24"):
        moe(torch.randn(2, 3, 25))
    with pytest.raises(ValueError, match="B, T"):
        moe(torch.randn(24))
    with pytest.raises(TypeError, match="floating-point"):
        moe(torch.ones(1, 2, 24, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype"):
        moe(torch.randn(1, 2, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match="expert_backend"):
        moe.expert_backend = "triton"
    moe.expert_backend = "gemv"
    with pytest.raises(ValueError, match="gemv"):
        moe(torch.randn(1, 2, 24))  # the parameters require grad: the decode kernels have no backward
    moe.expert_backend = "auto"
    with pytest.raises(ValueError, match="num_experts_per_token"):
        MoE(make_config(num_experts_per_token=14))
    with pytest.raises(ValueError, match="moe_router_activation_func"):
        MoE(make_config(moe_router_activation_func="relu"))
    with pytest.raises(ValueError, match="num_expert_group"):
        MoE(make_config(num_expert_group=4))
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        MoE(make_config(moe_intermediate_size=0))
    if HAS_GROUPED_MM:
        unaligned = random_moe(make_config(hidden_size=22, moe_intermediate_size=19))
        unaligned.expert_backend = "grouped_mm"
        with pytest.raises(ValueError, match="multiples of 4"):
            unaligned(torch.randn(1, 3, 22))


FUSED_CASES = [(37, 19, torch.float32), (5, 300, torch.bfloat16), (130, 64, torch.bfloat16),
               (0, 8, torch.float32)]


def check_fused_swiglu_kernel(device: str) -> None:
    """The Triton kernels of the weighted SwiGLU step against the formula in fp64: h, dgate, dup, dweights."""
    from kimi_linear.ops.moe_triton import swiglu_weighted_triton

    for S, F, dtype in FUSED_CASES:
        g = torch.randn(S, F, device=device).to(dtype).requires_grad_()
        u = torch.randn(S, F, device=device).to(dtype).requires_grad_()
        w = torch.rand(S, device=device).add(0.1).requires_grad_()
        h = swiglu_weighted_triton(g, u, w)
        dh = torch.randn_like(h)
        got = torch.autograd.grad(h, [g, u, w], dh)
        exact = [t.detach().double().requires_grad_() for t in (g, u, w)]
        ref = torch.nn.functional.silu(exact[0]) * exact[1] * exact[2][:, None]
        want = torch.autograd.grad(ref, exact, dh.double())
        assert h.dtype == dtype and got[2].dtype == torch.float32
        if S == 0:
            continue
        tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16: one rounding of each stored result
        assert rel_err(h, ref) < tol, (S, F, dtype)
        for name, a, b in zip(("gate", "up", "weights"), got, want):
            assert rel_err(a, b) < tol, (S, F, dtype, name)


def check_decode_gemv_kernels(device: str) -> None:
    """The decode kernels (one expert matrix-vector product per token-slot) against the dense reference."""
    from kimi_linear.ops.moe_triton import moe_experts_gemv_triton

    cases = [(3, 40, 7, 3, 24, torch.float32, torch.float32),
             (2, 64, 9, 4, 300, torch.bfloat16, torch.bfloat16),
             (1, 48, 5, 2, 16, torch.bfloat16, torch.float32)]  # the last: fp32 weights under bf16 autocast
    for N, D, E, K, F, dtype, w_dtype in cases:
        gen = torch.Generator(device=device).manual_seed(N + D)
        x = torch.randn(N, D, generator=gen, device=device).to(dtype)
        router = torch.randn(E, D, generator=gen, device=device)
        bias = torch.randn(E, generator=gen, device=device) * 0.05
        w1 = (torch.randn(E, F, D, generator=gen, device=device) * D**-0.5).to(w_dtype)
        w3 = (torch.randn(E, F, D, generator=gen, device=device) * D**-0.5).to(w_dtype)
        w2 = (torch.randn(E, D, F, generator=gen, device=device) * F**-0.5).to(w_dtype)
        weights, experts = route_tokens(x, router, bias, K, scaling_factor=2.446)
        y = moe_experts_gemv_triton(x, weights, experts, w1, w3, w2)
        exact = moe_reference(x.double(), router, bias, w1.double(), w3.double(), w2.double(), None, top_k=K,
                              scaling_factor=2.446)
        tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: x and the weights are exact, y is rounded once
        assert y.dtype == dtype and y.shape == (N, D)
        assert rel_err(y, exact) < tol, (N, D, E, K, F, dtype, rel_err(y, exact))


def run_in_interpreter(*checks: str) -> None:
    """Runs ``check('cpu')`` for each named check of this module in a fresh process with TRITON_INTERPRET=1.

    Triton binds its own library functions to the interpreter when it is first imported, so the CPU run needs
    a process where the variable is set before that.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root}
    code = "import tests.layers.test_moe as t; " + "; ".join(f"t.{check}('cpu')" for check in checks)
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_triton_kernels_match_reference():
    """The fused SwiGLU step and the decode kernels: compiled on CUDA, through Triton's interpreter on CPU."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        check_fused_swiglu_kernel("cuda")
        check_decode_gemv_kernels("cuda")
        return
    run_in_interpreter("check_fused_swiglu_kernel", "check_decode_gemv_kernels")


# ---- GPU: the grouped path at the release's shapes (D=2304, E=256, K=8, F=1024), bf16 ----

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
RELEASE = dict(hidden_size=2304, num_experts=256, num_experts_per_token=8, moe_intermediate_size=1024)


def _release_moe(seed=0):
    return random_moe(make_config(**RELEASE), dtype=torch.bfloat16, device="cuda", seed=seed)


@pytest.mark.gpu
@gpu
def test_gpu_grouped_matches_reference_at_release_shapes():
    moe = _release_moe()
    moe.expert_backend = "grouped_mm"
    torch.manual_seed(0)
    x = torch.randn(1, 4096, 2304, device="cuda").bfloat16().requires_grad_()
    y = moe(x)
    params = named_params(moe)
    dy = torch.randn_like(y)
    got = grads_of(y, dy, [x, *params.values()])
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        leaves = detached_leaves({"x": x, **params}, dtype)
        leaves["gate.weight"] = params["gate.weight"].detach().clone().requires_grad_()
        ref = reference_output(moe, leaves["x"], leaves)
        outs.append((ref, grads_of(ref, dy.to(dtype), list(leaves.values()))))
        del ref, leaves
    (exact, exact_grads), (ref16, ref16_grads) = outs
    err, err_ref = rel_err(y, exact), rel_err(ref16, exact)
    assert err < 2e-2 and err <= 2 * err_ref + 1e-4, (err, err_ref)
    for name, g, e, r in zip(["x", *params], got, exact_grads, ref16_grads):
        err, err_ref = rel_err(g, e), rel_err(r, e)
        assert err < 3e-2 and err <= 2 * err_ref + 1e-4, (name, err, err_ref)
    assert moe.last_expert_load.sum().item() == 4096 * 8


@pytest.mark.gpu
@gpu
def test_gpu_decode_step_is_sync_free_and_graph_capturable():
    moe = _release_moe(seed=1)
    x = torch.randn(8, 1, 2304, device="cuda").bfloat16()
    with torch.no_grad():
        eager = moe(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe(x)  # raises if any op of the forward waits on the host
        finally:
            torch.cuda.set_sync_debug_mode("default")
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            moe(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = moe(static_x)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(static_y, eager) < 1e-6
        fresh = torch.randn_like(x)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(static_y, moe(fresh)) < 1e-6
        assert rel_err(static_y, reference_output(moe, fresh)) < 2e-2


@pytest.mark.gpu
@gpu
def test_gpu_autocast_training_step_matches_loop():
    config = make_config(hidden_size=256, num_experts=32, num_experts_per_token=4, moe_intermediate_size=128)
    grads = {}
    for backend in ("grouped_mm", "loop"):
        moe = random_moe(config, device="cuda", seed=2)
        moe.expert_backend = backend
        x = torch.randn(4, 300, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = moe(x)
        y.float().pow(2).mean().backward()
        grads[backend] = [p.grad for p in moe.parameters()]
    for g, r in zip(grads["grouped_mm"], grads["loop"]):
        assert rel_err(g, r) < 2e-2
