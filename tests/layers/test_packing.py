"""Inference packing of the MLA and SwiGLU input projections (``layers.packing``; the KDA layer's is tested in
test_kda_layer.py): the same function as the unpacked layer, one matmul for the packed weights, re-packed after
a cast, undone by a replaced weight, and autograd still reaching every weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.cache import KimiLinearCache
from kimi_linear.layers import mla as mla_module
from kimi_linear.layers import mlp as mlp_module
from kimi_linear.layers.mlp import SwiGLUMLP
from tests.layers.test_mla import randomised_layer as mla_layer
from tests.layers.test_mla import small_config as mla_config
from tests.utils import rel_err

TOL = 1e-5


def mlp_pair():
    torch.manual_seed(5)
    a = SwiGLUMLP(24, 40)
    b = SwiGLUMLP(24, 40)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 7, 24)
    run = lambda m, dtype=torch.float32: m(x.to(dtype))  # noqa: E731
    return a, b, mlp_module, run, run, 80


def mla_pair(q_lora_rank):
    config = mla_config(q_lora_rank=q_lora_rank)
    a, b = mla_layer(config, seed=3), mla_layer(config, seed=3)
    x = torch.randn(2, 9, config.hidden_size)

    def run(m, dtype=torch.float32):  # a prefill into a cache, then two one-token (absorbed) steps
        cache = KimiLinearCache(config, batch_size=2, max_length=12, dtype=dtype)
        out = [m(x[:, :7].to(dtype), cache=cache)]
        cache.lengths += 7
        for t in (7, 8):
            out.append(m(x[:, t : t + 1].to(dtype), cache=cache))
            cache.lengths += 1
        return torch.cat(out, 1)

    first = (q_lora_rank or 3 * (12 + 6)) + 24 + 6
    return a, b, mla_module, run, (lambda m, dtype: m(x.to(dtype))), first


@pytest.mark.parametrize("case", ["mlp", "mla", "mla-q-lora"])
def test_packed_projections_same_function_one_matmul(case, monkeypatch):
    layer, ref, module, run, train, rows = {"mlp": mlp_pair, "mla": lambda: mla_pair(None),
                                     "mla-q-lora": lambda: mla_pair(16)}[case]()
    params = [m.weight for m in layer._input_projections()]
    before = {n: p.clone() for n, p in layer.state_dict().items()}
    layer.pack_input_projections()
    packed = layer._packed_weight()
    assert packed is not None and packed.shape[0] == rows
    assert all(torch.equal(layer.state_dict()[n], before[n]) for n in before)
    calls = []
    real_linear = F.linear

    def counting(x, w, *args):
        calls.append(tuple(w.shape))
        return real_linear(x, w, *args)

    with torch.no_grad():
        want = run(ref)
        monkeypatch.setattr(F, "linear", counting)
        got = run(layer)
        monkeypatch.setattr(F, "linear", real_linear)
    assert rel_err(got, want) < TOL
    assert calls.count(tuple(packed.shape)) == (1 if case == "mlp" else 3)  # one per forward
    layer.double()  # a cast packs the new weights
    assert layer._packed_weight() is not None and layer._packed_weight().dtype == torch.float64
    with torch.no_grad():
        assert rel_err(run(layer, torch.float64), run(ref.double(), torch.float64)) < TOL
        params[0].data = params[0].data * 2  # replaced, not updated in place: packing undone, new values used
        first = ref._input_projections()[0]
        first.weight.data = first.weight.data * 2
        assert layer._packed_weight() is None
        assert rel_err(run(layer, torch.float64), run(ref, torch.float64)) < TOL
    layer.pack_input_projections()
    assert [m.weight for m in layer._input_projections()] == params  # the same Parameter objects
    train(layer, torch.float64).square().sum().backward()  # autograd: one by one, as in training
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
