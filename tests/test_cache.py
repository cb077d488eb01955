"""The inference cache: layouts stated by the mixers, the dense layout, pooled slots and paged blocks."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.cache import KimiLinearCache, cache_bytes_per_sequence, layer_cache_layout
from kimi_linear.config import KimiLinearConfig
from kimi_linear.generate import decode_step
from tests.test_model import make_model
from tests.utils import rel_err


def test_layouts_come_from_the_mixers():
    config = KimiLinearConfig.from_preset("debug")
    H, K, W = config.kda_num_heads, config.kda_head_dim, config.short_conv_kernel_size
    cache = KimiLinearCache(config, batch_size=3, max_length=21, dtype=torch.float16)
    for i, layer_type in enumerate(config.layer_types):
        names = {e.name: e for e in layer_cache_layout(config, i)}
        entry = cache.layers[i]
        assert set(entry) == set(names)
        if layer_type == "kda":
            assert entry["conv"].shape == (3, 3 * H * K, W - 1) and entry["conv"].dtype == torch.float16
            assert entry["state"].shape == (3, H, K, K) and entry["state"].dtype == torch.float32
        else:
            assert entry["latent"].shape == (3, 21, config.kv_lora_rank)
            assert entry["k_pe"].shape == (3, 21, config.qk_rope_head_dim)
    assert cache.slots.tolist() == [0, 1, 2] and cache.block_table.tolist() == [[0], [1], [2]]
    assert cache.max_length == 21 and cache.batch_size == 3
    # bytes per sequence from the layouts == what the dense cache allocates per row
    per_seq = cache_bytes_per_sequence(config, context=21, dtype_bytes=2)
    assert per_seq["hybrid"] * 3 == cache.nbytes()


def test_state_dtype_applies_to_the_kda_states_only():
    """``state_dtype=bfloat16`` stores the KDA recurrent states in bf16 (dense and pooled caches, and views of
    them); conv tails and MLA latents keep the model's dtype; the bytes follow; other dtypes are refused."""
    config = KimiLinearConfig.from_preset("debug")
    dense = KimiLinearCache(config, batch_size=2, max_length=9, dtype=torch.float16, state_dtype=torch.bfloat16)
    pooled = KimiLinearCache.pooled(config, num_slots=3, num_blocks=2, block_size=64, state_dtype=torch.bfloat16)
    rows = pooled.view(torch.tensor([2]), torch.tensor([[1]]), torch.zeros(1, dtype=torch.long))
    for cache, dtype in ((dense, torch.float16), (pooled, torch.float32), (rows, torch.float32)):
        assert cache.state_dtype == torch.bfloat16
        for i, layer_type in enumerate(config.layer_types):
            entry = cache.layers[i]
            if layer_type == "kda":
                assert entry["state"].dtype == torch.bfloat16 and entry["conv"].dtype == dtype
            else:
                assert entry["latent"].dtype == entry["k_pe"].dtype == dtype
    assert cache_bytes_per_sequence(config, 9, dtype_bytes=2, state_dtype_bytes=2)["hybrid"] * 2 == dense.nbytes()
    assert KimiLinearCache(config, 1, 4).state_dtype == torch.float32
    for bad in (torch.float16, torch.float64, "bfloat16"):
        with pytest.raises(ValueError, match="state_dtype must be torch.float32 or torch.bfloat16"):
            KimiLinearCache(config, 1, 4, state_dtype=bad)
        with pytest.raises(ValueError, match="state_dtype"):
            KimiLinearCache.pooled(config, 1, 1, 64, state_dtype=bad)


def test_mamba2_layers_cannot_decode():
    config = KimiLinearConfig.from_preset("debug", mixer="mamba2")
    with pytest.raises(ValueError, match="cannot decode"):
        KimiLinearCache(config, 1, 8)


def test_host_lengths_follow_every_change():
    cache = KimiLinearCache(KimiLinearConfig.from_preset("debug"), 2, 10)
    assert cache.host_lengths() == [0, 0]
    cache.lengths.fill_(3)
    assert cache.host_lengths() == [3, 3]
    cache.lengths += torch.tensor([1, 2])
    assert cache.host_lengths() == [4, 5]
    cache.lengths[0] = 0
    assert cache.host_lengths() == [0, 5]
    cache.lengths = torch.tensor([7, 7])
    assert cache.host_lengths() == [7, 7]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread beats two contending ones
    yield
    torch.set_num_threads(before)


def test_paged_view_equals_the_dense_cache(one_thread):
    """The same prefill (two pieces) and decode steps through a pooled cache with shuffled slots and blocks
    give the logits and cache contents of the dense cache."""
    model = make_model(seed=41)
    config = model.config
    gen = torch.Generator().manual_seed(1)
    lengths = [70, 1, 130]
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    dense = model.allocate_cache(3, 200)
    bs, M = 64, 4
    pools = KimiLinearCache.pooled(config, num_slots=7, num_blocks=20, block_size=bs)
    slots = torch.tensor([5, 0, 3])
    table = torch.randperm(20, generator=gen)[: 3 * M].view(3, M)
    paged = pools.view(slots, table, torch.zeros(3, dtype=torch.long))
    with torch.no_grad():
        for piece in (slice(0, 64), slice(64, None)):  # two packed pieces: the second reads history
            chunks = [p[piece] for p in prompts]
            ids = torch.tensor([t for c in chunks for t in c])[None]
            cu = torch.tensor([0, *torch.tensor([len(c) for c in chunks]).cumsum(0).tolist()])
            out = [model(ids, cache=c, cu_seqlens=cu).logits for c in (dense, paged)]
            assert rel_err(out[1], out[0]) < 1e-5
        tokens = torch.tensor([3, 9, 27])
        for _ in range(3):
            got, want = decode_step(model, tokens, paged), decode_step(model, tokens, dense)
            assert rel_err(got, want) < 1e-5
            tokens = want.argmax(-1)
    assert paged.lengths.tolist() == dense.lengths.tolist() == [n + 3 for n in lengths]
    for i, entry in enumerate(dense.layers):
        for name, t in entry.items():
            pool = pools.layers[i][name]
            for row in range(3):
                if name in ("conv", "state"):
                    assert rel_err(pool[slots[row]], t[row]) < 1e-5, (i, name)
                else:
                    n = lengths[row] + 3
                    stored = pool[table[row]].flatten(0, 1)[:n]
                    assert rel_err(stored, t[row, :n]) < 1e-5, (i, name)


def test_view_checks_shapes():
    pools = KimiLinearCache.pooled(KimiLinearConfig.from_preset("debug"), 4, 4, 64)
    with pytest.raises(ValueError, match="agree"):
        pools.view(torch.tensor([0, 1]), torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_blocks"):
        KimiLinearCache.pooled(KimiLinearConfig.from_preset("debug"), 4, 0, 64)


def test_slot_pools_are_views_of_one_tensor_per_entry():
    """Each slot entry's pools, over all layers that have it, are one tensor ``[layers, num_slots, ...]``: an
    indexed op on it reaches the slot in every layer, and nothing else."""
    config = KimiLinearConfig.from_preset("debug")
    cache = KimiLinearCache.pooled(config, num_slots=5, num_blocks=3, block_size=64, state_dtype=torch.bfloat16)
    kda = [i for i, t in enumerate(config.layer_types) if t in ("kda", "gdn")]
    assert len(cache.slot_groups) == 2  # conv tails, states
    conv, state = cache.slot_groups
    assert conv.shape[:2] == state.shape[:2] == (len(kda), 5) and state.dtype == torch.bfloat16
    for j, i in enumerate(kda):
        assert cache.layers[i]["conv"].data_ptr() == conv[j].data_ptr()
        assert cache.layers[i]["state"].data_ptr() == state[j].data_ptr()
    for group in cache.slot_groups:
        group.normal_()
    state.index_fill_(1, torch.tensor([1, 3]), 0)
    for i in kda:
        s = cache.layers[i]["state"]
        assert s[1].abs().sum() == 0 and s[3].abs().sum() == 0 and s[0].abs().sum() > 0 and s[2].abs().sum() > 0
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in cache.slot_groups) + sum(
        t.numel() * t.element_size() for entry in cache.layers for name, t in entry.items() if name not in
        ("conv", "state"))


def test_a_dense_cache_keeps_one_tensor_per_layer():
    """The dense cache (``generate``, a forward with autograd on) has no shared slot tensor to write through."""
    cache = KimiLinearCache(KimiLinearConfig.from_preset("debug"), batch_size=2, max_length=16)
    assert cache.slot_groups == []
    pools = [t for entry in cache.layers for t in entry.values()]
    assert all(t._base is None for t in pools)
