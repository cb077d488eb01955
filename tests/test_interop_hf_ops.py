"""Our KDA ops as a drop-in for FLA's inside transformers' native ``kimi_linear`` (issue 24).

transformers looks its KDA ops up as the module-level names ``chunk_kimi_delta_attention`` and
``recurrent_kimi_delta_attention`` of ``modeling_kimi_linear``: each is FLA's ``chunk_kda`` / ``fused_recurrent_kda``
when FLA is installed (through ``use_kernel_func_from_hub_with_fallback``, which drops keywords the op does not
name), else its own PyTorch fallback. Two ways a user swaps ours in, both checked against the fallback on a
left-padded prefill and greedy decode steps (chunk op for the prefill, recurrent op for each decode step):

* assigning our ops to those names (what a user without FLA does by hand);
* transformers' own resolution, with ``kimi_linear`` standing where it looks for ``fla`` (what it does with FLA).

Noted difference: by the first route, keywords transformers forwards from the model call (``output_attentions``,
``output_hidden_states``) reach the op unfiltered; FLA's ops swallow unknown keywords, ours raise TypeError naming
them, so use the second route (or drop those keywords) for such calls.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "KimiLinearForCausalLM"):
    pytest.skip("this transformers has no kimi_linear", allow_module_level=True)

from transformers.integrations.hub_kernels import use_kernel_func_from_hub_with_fallback  # noqa: E402
from transformers.models.kimi_linear import modeling_kimi_linear  # noqa: E402

import kimi_linear.ops.kda as kda_ops  # noqa: E402
from kimi_linear.config import KimiLinearConfig  # noqa: E402
from tests.test_interop_hf import randomised_hf_model  # noqa: E402
from tests.utils import rel_err  # noqa: E402

TOL = 1e-5  # fp32; both sides compute the KDA recurrence in fp32
DECODE_STEPS = 3
HF_NAMES = {"chunk_kda": "chunk_kimi_delta_attention", "fused_recurrent_kda": "recurrent_kimi_delta_attention"}


@pytest.fixture(scope="module")
def hf_model():
    return randomised_hf_model(KimiLinearConfig.from_preset("debug"), seed=5)


def left_padded_batch(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 256, (3, 21), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    mask[2, :13] = 0
    return ids * mask, mask


@torch.no_grad()
def prefill_and_decode(model, ids, mask, **call_kwargs):
    """Logits of a prefill and DECODE_STEPS greedy steps through the model's cache: ``[B, T + steps, vocab]``."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, **call_kwargs)
    logits, cache = [out.logits], out.cache
    for _ in range(DECODE_STEPS):
        token = logits[-1][:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True, **call_kwargs)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def counted(op, calls):
    @functools.wraps(op)  # keeps op's signature: transformers filters keywords by it
    def wrapper(*args, **kwargs):
        calls[op.__name__] += 1
        return op(*args, **kwargs)

    return wrapper


def assert_same_logits(got, want, mask):
    real = torch.cat([mask, torch.ones(mask.shape[0], DECODE_STEPS, dtype=mask.dtype)], dim=1).bool()
    assert rel_err(got[real], want[real]) < TOL


def test_our_ops_assigned_to_hf_names_match_its_fallback(hf_model, monkeypatch):
    ids, mask = left_padded_batch(seed=0)
    want = prefill_and_decode(hf_model, ids, mask)
    calls = {name: 0 for name in HF_NAMES}
    for ours, hf_name in HF_NAMES.items():
        monkeypatch.setattr(modeling_kimi_linear, hf_name, counted(getattr(kda_ops, ours), calls))
    got = prefill_and_decode(hf_model, ids, mask)
    linear_layers = hf_model.config.layer_types.count("linear_attention")
    assert calls == {"chunk_kda": linear_layers, "fused_recurrent_kda": linear_layers * DECODE_STEPS}
    assert_same_logits(got, want, mask)


def test_transformers_resolves_our_ops_in_place_of_fla(hf_model, monkeypatch):
    """transformers' own lookup (``<package>.ops.kda.<op>``) with package "kimi_linear": the same wrapper, keyword
    filter included, that it builds around FLA's ops; model-call keywords such as output_hidden_states pass."""
    ids, mask = left_padded_batch(seed=1)
    want = prefill_and_decode(hf_model, ids, mask)
    calls = {name: 0 for name in HF_NAMES}
    for ours, hf_name in HF_NAMES.items():
        monkeypatch.setattr(kda_ops, ours, counted(getattr(kda_ops, ours), calls))  # seen by the lookup below
        fallback = inspect.unwrap(getattr(modeling_kimi_linear, hf_name))  # transformers' PyTorch function
        resolved = use_kernel_func_from_hub_with_fallback(ours, "kimi_linear")(fallback)
        monkeypatch.setattr(modeling_kimi_linear, hf_name, resolved)
    got = prefill_and_decode(hf_model, ids, mask, output_hidden_states=True)
    linear_layers = hf_model.config.layer_types.count("linear_attention")
    assert calls == {"chunk_kda": linear_layers, "fused_recurrent_kda": linear_layers * DECODE_STEPS}
    assert_same_logits(got, want, mask)
