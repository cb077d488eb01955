"""recompute(): the same values and gradients as calling the function, only its inputs kept, autocast replayed;
recompute_linear(): the same as F.linear of the function, keeping only the weight and the function's inputs;
autocast_input(): one cast under autocast, none otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.layers.memory import autocast_input, recompute, recompute_linear
from tests.utils import rel_err


def glue(x, w, scale, unused):
    """Cheap element-wise work around a small matmul: several intermediates autograd would keep."""
    h = F.silu(x) * torch.sigmoid(x @ w)
    return h / (h.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt() * scale, (x > 0).sum(-1)


def leaves(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen).requires_grad_() for shape in ((7, 16), (16, 16), (16,))]


def test_values_and_gradients_equal_the_plain_call_with_only_inputs_kept():
    x, w, scale = leaves(0)
    gy = torch.randn(7, 16)
    y_ref, count_ref = glue(x, w, scale, None)
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), [x, w, scale])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, count = recompute(glue, x, w, scale, None)
    assert {id(t) for t in saved} == {id(x), id(w), id(scale)}  # nothing computed inside is kept
    assert torch.equal(count, count_ref) and not count.requires_grad  # integer outputs pass through
    assert torch.equal(y, y_ref)
    grads = torch.autograd.grad((y * gy).sum(), [x, w, scale])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < 1e-6


def test_inputs_without_grad_and_unused_outputs():
    x, w, scale = leaves(1)
    frozen = w.detach()
    y, _ = recompute(glue, x, frozen, scale, None)
    gx, gs = torch.autograd.grad(y.sum(), [x, scale])
    y_ref, _ = glue(x, frozen, scale, None)
    gx_ref, gs_ref = torch.autograd.grad(y_ref.sum(), [x, scale])
    assert rel_err(gx, gx_ref) < 1e-6 and rel_err(gs, gs_ref) < 1e-6


def test_backward_replays_the_forwards_autocast():
    x, w, scale = leaves(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = recompute(glue, x, w, scale, None)
        y_ref, _ = glue(x, w, scale, None)
    assert torch.equal(y, y_ref)
    # backward outside autocast: the recomputation must still run the matmul in bf16 to give the same gradients
    grads = torch.autograd.grad(y.float().sum(), [x, w, scale])
    grads_ref = torch.autograd.grad(y_ref.float().sum(), [x, w, scale])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < 1e-6


def test_without_grad_it_is_a_plain_call():
    x, w, scale = leaves(3)
    with torch.no_grad():
        y, _ = recompute(glue, x, w, scale, None)
    assert y.grad_fn is None
    y, _ = recompute(glue, x.detach(), w.detach(), scale.detach(), None)
    assert y.grad_fn is None


def test_autocast_input_casts_once_and_only_under_autocast():
    x = torch.randn(3, 4)
    assert autocast_input(x) is x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_input(x).dtype == torch.bfloat16
        low = x.to(torch.bfloat16)
        assert autocast_input(low) is low


@pytest.mark.parametrize("layer", ["mlp", "moe", "mla"])
def test_layers_keep_one_low_precision_copy_of_their_input_under_autocast(layer):
    """Several projections read the same fp32 input: autocast would cast (and keep) it once per projection."""
    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.layers.mla import MultiheadLatentAttention
    from kimi_linear.layers.mlp import SwiGLUMLP
    from kimi_linear.layers.moe import MoE
    from kimi_linear.train.activation_memory import saved_activations

    config = KimiLinearConfig.from_preset("debug")
    torch.manual_seed(0)
    module = {"mlp": lambda: SwiGLUMLP(config.hidden_size, 96), "moe": lambda: MoE(config),
              "mla": lambda: MultiheadLatentAttention(config, 1)}[layer]()
    leaf = torch.randn(1, 12, config.hidden_size, requires_grad=True)
    x = leaf * 1.0  # not a leaf, as in the model (autocast caches the casts of leaves only)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = saved_activations(module, lambda: module(x).float().sum())
    copies = [t for t in report.tensors if t.dtype == torch.bfloat16 and t.nbytes == 2 * x.numel()
              and t.kind == "activation" and t.shape[-1] == config.hidden_size
              and not t.module.endswith(("o_proj", "down_proj"))]
    assert len(copies) == 1, [(t.module, t.node, t.shape) for t in copies]


def norm_gate(x, gate, w):
    """An RMSNorm times a sigmoid gate, in fp32, back in x's dtype: what a layer feeds its output projection."""
    return (F.rms_norm(x.float(), (x.shape[-1],), w.float()) * torch.sigmoid(gate.float())).to(x.dtype)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_recompute_linear_equals_the_plain_linear_keeping_only_weight_and_inputs(autocast):
    gen = torch.Generator().manual_seed(4)
    x, gate = (torch.randn(2, 5, 16, generator=gen).requires_grad_() for _ in range(2))
    w = (torch.rand(16, generator=gen) + 0.5).requires_grad_()
    weight = torch.randn(12, 16, generator=gen).requires_grad_()
    gy = torch.randn(2, 5, 12, generator=gen)
    leaves = [x, gate, w, weight]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y_ref = F.linear(norm_gate(x, gate, w), weight)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = recompute_linear(norm_gate, weight, x, gate, w)
    assert {id(t) for t in saved} == {id(weight), id(x), id(gate), id(w)}
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    # backward outside autocast: the recomputation and the products run as the forward's autocast had them
    grads = torch.autograd.grad((y.float() * gy).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref.float() * gy).sum(), leaves)
    for name, g, g_ref in zip(["x", "gate", "w", "weight"], grads, grads_ref, strict=True):
        assert g.dtype == g_ref.dtype and torch.equal(g, g_ref), name


def test_recompute_linear_with_a_frozen_weight_or_inputs():
    gen = torch.Generator().manual_seed(5)
    x, gate = torch.randn(3, 8, generator=gen).requires_grad_(), torch.randn(3, 8, generator=gen)
    w, weight = torch.ones(8), torch.randn(4, 8, generator=gen)
    y = recompute_linear(norm_gate, weight, x, gate, w)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    (gx_ref,) = torch.autograd.grad(F.linear(norm_gate(x, gate, w), weight).sum(), [x])
    assert torch.equal(gx, gx_ref)
    weight.requires_grad_()
    y = recompute_linear(norm_gate, weight, x.detach(), gate, w)
    (gw,) = torch.autograd.grad(y.sum(), [weight])
    (gw_ref,) = torch.autograd.grad(F.linear(norm_gate(x.detach(), gate, w), weight).sum(), [weight])
    assert torch.equal(gw, gw_ref)
    with torch.no_grad():
        assert recompute_linear(norm_gate, weight, x, gate, w).grad_fn is None
