"""SwiGLUMLP against the formula down(silu(gate x) * up x), outputs and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.layers.mlp import SwiGLUMLP
from tests.utils import rel_err


def swiglu_by_hand(x, w_gate, w_up, w_down):
    """The formula spelled with matmuls in fp64: x @ Wg^T -> silu, times x @ Wu^T, then @ Wd^T."""
    x, w_gate, w_up, w_down = (t.double() for t in (x, w_gate, w_up, w_down))
    a = x @ w_gate.t()
    return (a * torch.sigmoid(a) * (x @ w_up.t())) @ w_down.t()


def random_mlp(D, I, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    mlp = SwiGLUMLP(D, I)
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.normal_(0.0, lin.weight.shape[1] ** -0.5)
    return mlp.to(dtype)


def test_layout_matches_checkpoint_names():
    mlp = SwiGLUMLP(24, 40)
    shapes = {n: tuple(p.shape) for n, p in mlp.state_dict().items()}
    assert shapes == {"gate_proj.weight": (40, 24), "up_proj.weight": (40, 24), "down_proj.weight": (24, 40)}


@pytest.mark.parametrize("shape", [(1, 1, 24), (3, 17, 24), (5, 24)], ids=["B1-T1", "B3-T17", "N5"])
def test_forward_and_grads_match_formula(shape):
    mlp = random_mlp(24, 37)
    x = torch.randn(shape, requires_grad=True)
    y = mlp(x)
    ref = swiglu_by_hand(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-6

    dy = torch.randn_like(y)
    params = [x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    grads = torch.autograd.grad(y, params, dy)
    leaves = [p.detach().double().requires_grad_() for p in params]
    ref_grads = torch.autograd.grad(swiglu_by_hand(*leaves), leaves, dy.double())
    for name, g, r in zip(["x", "gate", "up", "down"], grads, ref_grads):
        assert rel_err(g, r) < 1e-6, name


def test_bf16_error_matches_bf16_formula():
    mlp = random_mlp(64, 96, dtype=torch.bfloat16, seed=1)
    x = torch.randn(4, 9, 64).bfloat16()
    exact = swiglu_by_hand(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    bf16_formula = F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight),
                            mlp.down_proj.weight)
    err = rel_err(mlp(x), exact)
    assert err < 2e-2
    assert err <= 2 * rel_err(bf16_formula, exact) + 1e-3


def test_bad_input_raises():
    mlp = SwiGLUMLP(8, 16)
    with pytest.raises(ValueError, match="hidden_size=8"):
        mlp(torch.randn(2, 3, 9))
    with pytest.raises(TypeError, match="floating-point"):
        mlp(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="intermediate_size"):
        SwiGLUMLP(8, 0)
    with pytest.raises(ValueError, match="hidden_size"):
        SwiGLUMLP(8.0, 4)
