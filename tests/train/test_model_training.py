"""The model's training paths: the loss computed from the hidden states in chunks (``labels=``) equals the loss of
the full logits, with every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.config import KimiLinearConfig
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.train.data import IGNORE_INDEX
from kimi_linear.train.trainer import causal_lm_loss
from tests.utils import rel_err


def packed_batch(vocab: int, lengths=(13, 1, 30, 20), seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    ids = torch.randint(0, vocab, (1, T), generator=gen)
    labels = torch.randint(0, vocab, (1, T), generator=gen)
    labels[torch.rand(1, T, generator=gen) < 0.2] = IGNORE_INDEX
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids, "labels": labels, "cu_seqlens": cu}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one thread is faster and steadier on a shared 2-core machine."""


@pytest.fixture(scope="module")
def debug_model():
    torch.manual_seed(0)
    return KimiLinearForCausalLM(KimiLinearConfig.from_preset("debug"))


def test_labels_give_the_loss_of_the_full_logits_with_every_gradient(debug_model):
    model, batch = debug_model, packed_batch(debug_model.config.vocab_size)
    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"]).logits
    ref = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                          reduction="sum")
    ref.backward()
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)
    out = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], labels=batch["labels"])
    assert out.logits is None
    out.loss_sum.backward()
    ours = grads(model)
    assert rel_err(out.loss_sum, ref) < 1e-6
    assert ours.keys() == ref_grads.keys() and "lm_head.weight" in ours
    for name in ref_grads:
        assert rel_err(ours[name], ref_grads[name]) < 1e-5, name
    # the trainer's loss takes this path for the model
    loss, n = causal_lm_loss(model, batch)
    assert rel_err(loss.detach(), ref) < 1e-6 and n == (batch["labels"] != IGNORE_INDEX).sum()


def test_labels_must_match_the_input_shape(debug_model):
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        debug_model(ids, labels=torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("spec", ["full", "kda,mlp", "mla,moe", "kda,mla,mlp,moe"])
def test_activation_checkpointing_keeps_the_loss_and_every_gradient(debug_model, spec):
    model, batch = debug_model, packed_batch(debug_model.config.vocab_size, seed=1)
    results = []
    for setting in ("none", spec):
        model.set_activation_checkpointing(setting)
        model.zero_grad(set_to_none=True)
        loss = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], labels=batch["labels"]).loss_sum
        loss.backward()
        loads = [layer.block_sparse_moe.last_expert_load.clone() for layer in model.model.layers if layer.is_moe]
        results.append((loss.detach(), grads(model), loads))
    model.set_activation_checkpointing("none")
    (ref, ref_grads, ref_loads), (loss, ours, loads) = results
    assert rel_err(loss, ref) < 1e-6
    assert ours.keys() == ref_grads.keys()
    for name in ref_grads:
        assert rel_err(ours[name], ref_grads[name]) < 1e-6, name
    for a, b in zip(loads, ref_loads, strict=True):  # the recomputed routing is the forward's
        assert torch.equal(a, b)


def test_activation_checkpointing_flags_follow_the_spec(debug_model):
    layers = debug_model.model.layers  # debug: 0 KDA+dense, 1 MLA+dense, 2 KDA+MoE, 3 MLA+MoE
    debug_model.set_activation_checkpointing("mla, moe")
    assert [(la.checkpoint_mixer, la.checkpoint_ffn, la.checkpoint_block) for la in layers] == [
        (False, False, False), (True, False, False), (False, True, False), (True, True, False)]
    debug_model.set_activation_checkpointing("full")
    assert all(la.checkpoint_block and not la.checkpoint_mixer for la in layers)
    debug_model.set_activation_checkpointing("none")
    assert not any(la.checkpoint_block or la.checkpoint_mixer or la.checkpoint_ffn for la in layers)
    for bad in ("attention", "full,mla", "none,moe"):
        with pytest.raises(ValueError, match="activation checkpointing"):
            debug_model.set_activation_checkpointing(bad)


def test_checkpointed_forward_without_grad_or_with_a_cache_is_plain(debug_model, monkeypatch):
    import kimi_linear.model as model_module

    calls = []
    monkeypatch.setattr(model_module, "_recompute_in_backward", lambda fn, *a: calls.append(fn) or fn(*a))
    debug_model.set_activation_checkpointing("full")
    ids = torch.randint(0, debug_model.config.vocab_size, (1, 9))
    try:
        with torch.no_grad():
            debug_model(ids)
        debug_model(ids, cache=debug_model.allocate_cache(1, 16))
        assert calls == []
        debug_model(ids)
        assert len(calls) == len(debug_model.model.layers)
    finally:
        debug_model.set_activation_checkpointing("none")
