"""The hybrid model: all four branches, decode == forward, varlen == padded == separate, gradients, errors."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.cache import KimiLinearCache
from kimi_linear.config import PRESETS, KimiLinearConfig
from kimi_linear.model import KimiLinearForCausalLM, count_parameters
from tests.utils import rel_err

TOL = 2e-5  # fp32; only summation order differs between the paths compared


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and the router bias drawn at random, O(1) activations (no init-time zeros or ones)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("A_log", "dt_bias")):
            continue  # keep the gate in its working range
        fan_in = p.shape[-1] if p.dim() > 1 else 1
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        elif "conv1d" in name:
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * fan_in**-0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def make_model(seed=0, **overrides) -> KimiLinearForCausalLM:
    torch.manual_seed(seed)
    return randomise(KimiLinearForCausalLM(KimiLinearConfig.from_preset("debug", **overrides)), seed).eval()


def random_ids(B, T, config, seed=0):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


VARIANTS = {
    "kda-nope": {},
    "gdn-rope": dict(mixer="gdn", mla_use_nope=False, kda_layers=[0, 2], full_attn_layers=[1, 3]),
    "ablated": dict(use_output_gate=False, use_short_conv=False, q_lora_rank=12),
}


def test_debug_model_has_all_four_branches_and_every_gradient():
    model = make_model().train()
    kinds = {(layer.layer_type, layer.is_moe) for layer in model.model.layers}
    assert kinds == {("kda", False), ("kda", True), ("mla", False), ("mla", True)}
    ids = random_ids(2, 29, model.config)
    logits = model(ids).logits
    assert logits.shape == (2, 29, model.config.vocab_size) and torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_then_decode_matches_full_forward(variant):
    model = make_model(seed=1, **VARIANTS[variant])
    ids = random_ids(2, 27, model.config, seed=1)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2, 40)
        parts = [model(ids[:, :11], cache=cache).logits, model(ids[:, 11:16], cache=cache).logits]
        parts += [model(ids[:, t : t + 1], cache=cache).logits for t in range(16, 27)]
    assert cache.lengths.tolist() == [27, 27]
    assert rel_err(torch.cat(parts, 1), full) < TOL


def test_varlen_padding_and_separate_agree():
    model = make_model(seed=2)
    config = model.config
    lengths = [9, 0, 21, 1]
    seqs = [random_ids(1, max(L, 1), config, seed=10 + i)[0, :L] for i, L in enumerate(lengths)]
    with torch.no_grad():
        separate = [model(s[None]).logits[0] for s in seqs if len(s)]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        packed = model(torch.cat(seqs)[None], cu_seqlens=cu).logits[0]
        assert rel_err(packed, torch.cat(separate)) < TOL
        T = 21
        padded = torch.full((3, T), 5)
        mask = torch.zeros(3, T, dtype=torch.long)
        padded[0, T - 9 :], mask[0, T - 9 :] = seqs[0], 1  # left padding
        padded[1], mask[1] = seqs[2], 1
        padded[2, :1], mask[2, :1] = seqs[3], 1  # right padding
        out = model(padded, attention_mask=mask).logits
        assert rel_err(out[0, T - 9 :], separate[0]) < TOL
        assert rel_err(out[1], separate[1]) < TOL
        assert rel_err(out[2, :1], separate[2]) < TOL


def test_packed_training_gradients_equal_separate_documents():
    model = make_model(seed=3).train()
    docs = [random_ids(1, 20, model.config, seed=5)[0], random_ids(1, 13, model.config, seed=6)[0]]
    weights = torch.randn(33, model.config.vocab_size, generator=torch.Generator().manual_seed(7))
    cu = torch.tensor([0, 20, 33])
    packed = (model(torch.cat(docs)[None], cu_seqlens=cu).logits[0] * weights).sum()
    grads = torch.autograd.grad(packed, list(model.parameters()))
    separate = sum(
        (model(d[None]).logits[0] * w).sum() for d, w in zip(docs, weights.split([20, 13]), strict=False)
    )
    grads_ref = torch.autograd.grad(separate, list(model.parameters()))
    for (name, _), g, g_ref in zip(model.named_parameters(), grads, grads_ref, strict=False):
        assert rel_err(g, g_ref) < 1e-4, name


def test_bf16_keeps_gate_and_router_fp32():
    model = make_model().to(torch.bfloat16)
    layers = model.model.layers
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert (
        layers[0].self_attn.A_log.dtype == torch.float32
        and layers[0].self_attn.dt_bias.dtype == torch.float32
    )
    assert layers[2].block_sparse_moe.gate.weight.dtype == torch.float32
    ids = random_ids(1, 9, model.config)
    assert torch.isfinite(model(ids).logits.float()).all()


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_the_module(name):
    overrides = [{}, dict(mixer="gdn")] if name != "48b-a3b" else [{}]
    for kw in overrides:
        config = KimiLinearConfig.from_preset(name, **kw)
        with torch.device("meta"):
            model = KimiLinearForCausalLM(config)
        actual = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
        total, active = count_parameters(config)
        assert total == actual and active < total
    if name == "48b-a3b":
        assert 47e9 < total < 50e9 and 2.8e9 < active < 3.6e9  # "48B total, 3B active"


def test_mamba2_mixer_comes_from_the_registry():
    model = make_model(layer_types=["mamba2", "mla", "kda", "mla"])
    assert type(model.model.layers[0].self_attn).__name__ == "Mamba2Mixer"
    assert model(random_ids(1, 7, model.config)).logits.shape == (1, 7, model.config.vocab_size)


def test_bad_input_raises_clear_errors():
    model = make_model()
    V = model.config.vocab_size
    ids = random_ids(2, 6, model.config)
    with pytest.raises(ValueError, match="input_ids must be in"):
        model(torch.full((1, 3), V))
    with pytest.raises(TypeError, match="input_ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="input_ids must be"):
        model(ids[0])
    with pytest.raises(ValueError, match="batch size|B=2"):
        model(ids, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="cache"):
        model(ids, cache=model.allocate_cache(2, 8), attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="rows"):
        model(ids, cache=model.allocate_cache(3, 8))
    with pytest.raises(ValueError, match="holds 5 tokens"):
        model(ids, cache=model.allocate_cache(2, 5))
    with pytest.raises(ValueError, match="unknown layer type"):
        from kimi_linear.layers import mixer_class

        mixer_class("lstm")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["kda-nope", "gdn-rope"])
def test_gpu_matches_cpu_and_decodes_like_forward(variant):
    cpu = make_model(seed=41, **VARIANTS[variant])
    gpu = make_model(seed=41, **VARIANTS[variant]).cuda()
    ids = random_ids(2, 150, cpu.config, seed=41)
    cu = torch.tensor([0, 70, 70, 300])
    with torch.no_grad():
        want = cpu(ids).logits
        # Triton kernels: fp32 inputs, tf32-class dots inside
        assert rel_err(gpu(ids.cuda()).logits.cpu(), want) < 3e-3
        flat = ids.reshape(1, -1)  # documents [0, 70), [70, 70) (empty), [70, 300)
        packed = gpu(flat.cuda(), cu_seqlens=cu.cuda()).logits[0].cpu()
        assert rel_err(packed[:70], want[0, :70]) < 3e-3
        assert rel_err(packed[70:], cpu(flat[:, 70:]).logits[0]) < 3e-3
        cache = gpu.allocate_cache(2, 160)
        parts = [gpu(ids[:, :130].cuda(), cache=cache).logits]
        parts += [gpu(ids[:, t : t + 1].cuda(), cache=cache).logits for t in range(130, 150)]
        assert rel_err(torch.cat(parts, 1).cpu(), want) < 3e-3


def test_forward_refuses_ids_outside_the_vocabulary_and_more_tokens_than_the_cache_holds():
    model = make_model(seed=0)
    V = model.config.vocab_size
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[0, V]]))
    cache = KimiLinearCache(model.config, 2, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="are needed"):
        model(torch.zeros(2, cache.max_length + 1, dtype=torch.long), cache=cache)
    packed = KimiLinearCache(model.config, 2, 64, dtype=torch.float32)
    cu = torch.tensor([0, 3, 3 + packed.max_length + 1])
    with pytest.raises(ValueError, match="are needed"):
        model(torch.zeros(1, int(cu[-1]), dtype=torch.long), cache=packed, cu_seqlens=cu)
