"""Our KDA ops as a drop-in for FLA's inside transformers' native ``kimi_linear`` (issue 24).

transformers looks its KDA ops up as the module-level names ``chunk_kimi_delta_attention`` and
``recurrent_kimi_delta_attention`` of ``modeling_kimi_linear``: each is FLA's ``chunk_kda`` / ``fused_recurrent_kda``
when FLA is installed (through ``use_kernel_func_from_hub_with_fallback``, which drops keywords the op does not
name), else its own PyTorch fallback. Two ways a user swaps ours in, both checked against the fallback on a
left-padded prefill and greedy decode steps (chunk op for the prefill, recurrent op for each decode step):

* assigning our ops to those names (what a user without FLA does by hand);
* transformers' own resolution, with ``kimi_linear`` standing where it looks for ``fla`` (what it does with FLA).

By the first route the keywords of the model call reach the op unfiltered (the layer forwards its ``**kwargs``):
FLA's ops swallow any keyword, ours accept the ones that do not change the computation (``output_attentions``,
``output_hidden_states``, ``output_router_logits``, ``num_items_in_batch``; see ``MODEL_CALL_NO_OP_KEYWORDS``), so
the first route runs with them set; packed-sequence keywords without ``cu_seqlens`` are refused by name.
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


def counted(op, calls, seen_keywords=None):
    @functools.wraps(op)  # keeps op's signature: transformers filters keywords by it
    def wrapper(*args, **kwargs):
        calls[op.__name__] += 1
        if seen_keywords is not None:
            seen_keywords.update(kwargs)
        return op(*args, **kwargs)

    return wrapper


def assert_same_logits(got, want, mask):
    real = torch.cat([mask, torch.ones(mask.shape[0], DECODE_STEPS, dtype=mask.dtype)], dim=1).bool()
    assert rel_err(got[real], want[real]) < TOL


def test_our_ops_assigned_to_hf_names_match_its_fallback(hf_model, monkeypatch):
    """Assigned by hand, the ops receive the model call's keywords too: the output flags change nothing."""
    ids, mask = left_padded_batch(seed=0)
    want = prefill_and_decode(hf_model, ids, mask)
    calls = {name: 0 for name in HF_NAMES}
    seen = set()
    for ours, hf_name in HF_NAMES.items():
        monkeypatch.setattr(modeling_kimi_linear, hf_name, counted(getattr(kda_ops, ours), calls, seen))
    got = prefill_and_decode(hf_model, ids, mask, output_hidden_states=True, output_attentions=True,
                             output_router_logits=True)
    assert {"output_hidden_states", "output_attentions", "output_router_logits"} <= seen  # they reached the ops
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


def test_assigned_ops_refuse_packed_sequences_without_cu_seqlens(hf_model, monkeypatch):
    """A flattened batch described only by FlashAttention's keywords (DataCollatorWithFlattening): FLA's op would
    run the recurrence across the sequences' boundaries; ours names the keyword and cu_seqlens."""
    for ours, hf_name in HF_NAMES.items():
        monkeypatch.setattr(modeling_kimi_linear, hf_name, getattr(kda_ops, ours))
    ids = torch.randint(1, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q describes packed sequences.*pass cu_seqlens"), torch.no_grad():
        hf_model(input_ids=ids, position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None],
                 cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
