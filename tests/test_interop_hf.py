"""Interop with HF transformers' native ``kimi_linear`` (its PyTorch fallback runs on CPU): checkpoints saved
by either side load in the other with the same fp32 logits on a batch of different lengths and the same greedy
tokens.

Noted difference: transformers 5.24 saves the dense MLP of the first layers as
``block_sparse_moe.{gate,up,down}_proj`` (it renames every ``.mlp.`` of its model on save); the release and
this project write ``mlp.*``. Our loader accepts both; transformers loads ours.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "KimiLinearForCausalLM"):
    pytest.skip("this transformers has no kimi_linear", allow_module_level=True)

from kimi_linear.config import KimiLinearConfig  # noqa: E402
from kimi_linear.generate import generate  # noqa: E402
from kimi_linear.model import KimiLinearForCausalLM  # noqa: E402
from tests.test_model import make_model  # noqa: E402
from tests.utils import rel_err  # noqa: E402

LENGTHS = [23, 15, 8]
TOL = 1e-4
NEW_TOKENS = 6


def batch(config, seed=0):
    """Left-padded ids/mask for HF, and the list of prompts (ids below 256: no special token inside)."""
    gen = torch.Generator().manual_seed(seed)
    T = max(LENGTHS)
    ids = torch.full((len(LENGTHS), T), config.pad_token_id)
    mask = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    prompts = []
    for b, L in enumerate(LENGTHS):
        p = torch.randint(0, 256, (L,), generator=gen)
        ids[b, T - L :], mask[b, T - L :] = p, 1
        prompts.append(p.tolist())
    return ids, mask, prompts


def hf_greedy(hf_model, prompt):
    out = hf_model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=hf_model.config.pad_token_id,
    )
    return out[0, len(prompt) :].tolist()


def compare(ours: KimiLinearForCausalLM, theirs, seed):
    ids, mask, prompts = batch(ours.config, seed)
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits
        got_padded = ours(ids, attention_mask=mask).logits
        cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
        got_packed = ours(torch.tensor(sum(prompts, []))[None], cu_seqlens=cu).logits[0]
    real = mask.bool()
    assert rel_err(got_padded[real], want[real]) < TOL
    assert rel_err(got_packed, want[real]) < TOL
    ours_tokens = generate(ours, prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[])
    assert ours_tokens == [hf_greedy(theirs, p) for p in prompts]


@torch.no_grad()
def randomised_hf_model(config: KimiLinearConfig, seed: int):
    torch.manual_seed(seed)
    hf_config = transformers.KimiLinearConfig(**config.to_hf())
    model = transformers.KimiLinearForCausalLM(hf_config).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("A_log", "dt_bias")):
            continue
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        elif "conv1d" in name:
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def test_theirs_saved_ours_loaded(tmp_path):
    config = KimiLinearConfig.from_preset("debug")
    theirs = randomised_hf_model(config, seed=11)
    theirs.save_pretrained(tmp_path)
    ours = KimiLinearForCausalLM.from_pretrained(tmp_path).eval()
    assert ours.config.layer_types == config.layer_types
    compare(ours, theirs, seed=1)


def test_ours_saved_theirs_loaded(tmp_path):
    ours = make_model(seed=12)
    ours.save_pretrained(tmp_path, max_shard_size="150KB")
    theirs = transformers.KimiLinearForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    compare(ours, theirs, seed=2)
