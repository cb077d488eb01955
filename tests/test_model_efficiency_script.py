"""CPU smoke test of the model_efficiency benchmark suite: its configs, its layer-major prefill (against the model's
own forward), the cache accounting, the batch arithmetic and a tiny end-to-end run (JSON, table, plots)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import model_efficiency


@pytest.fixture(scope="module")
def bench():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and a busy machine stays quick
    yield model_efficiency
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def test_three_models_share_width_and_depth(bench):
    configs = {name: bench.make_config(name) for name in bench.MODELS}
    shapes = {(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.kda_num_heads, c.kda_head_dim,
               c.kv_lora_rank, c.intermediate_size) for c in configs.values()}
    assert shapes == {(2304, 4, 32, 32, 128, 512, 9216)}
    assert configs["kimi_linear"].layer_types == ["kda", "kda", "kda", "mla"]
    assert configs["gdn_hybrid"].layer_types == ["gdn", "gdn", "gdn", "mla"]
    assert configs["mla_only"].layer_types == ["mla"] * 4
    assert not any(c.is_moe_layer(i) for c in configs.values() for i in range(4))
    assert all(c.model_max_length >= 1 << 20 for c in configs.values())


@pytest.mark.parametrize("name", ["kimi_linear", "gdn_hybrid", "mla_only"])
def test_layer_major_prefill_matches_model_forward(bench, name):
    torch.manual_seed(1)
    model = bench.make_model(bench.make_config(name, smoke=True, max_context=512), torch.device("cpu"),
                             torch.float32, seed=3)
    T, piece = 150, 64  # three pieces, the last one short
    ids = torch.randint(0, model.config.vocab_size, (1, T))
    ours_cache, ref_cache = model.allocate_cache(1, T + 4), model.allocate_cache(1, T + 4)
    with torch.no_grad():
        ours = bench.prefill_layer_major(model, ids, ours_cache, piece)
        ref = model.lm_head(model.hidden_states(ids, cache=ref_cache)[:, -1]).float()
    assert rel_err(ours, ref) < 1e-4
    assert torch.equal(ours_cache.lengths, ref_cache.lengths)
    for layer_ours, layer_ref in zip(ours_cache.layers, ref_cache.layers, strict=True):
        for key, tensor in layer_ref.items():
            assert rel_err(layer_ours[key], tensor) < 1e-4, key


def test_cache_bytes_match_the_info_formula(bench):
    for name in bench.MODELS:
        model = bench.make_model(bench.make_config(name, smoke=True, max_context=512), torch.device("cpu"),
                                 torch.float32)
        for T in (64, 320):
            row = bench.cache_bytes(model, T)
            assert row["tensor_bytes"] == row["formula_bytes"], (name, T)
            assert row["allocated_bytes"] is None  # no allocator statistics on the CPU
    model = bench.make_model(bench.make_config("kimi_linear", smoke=True), torch.device("cpu"), torch.float32)
    kimi = bench.cache_bytes(model, 320)
    assert kimi["formula_bytes"] < kimi["formula_mla_only_bytes"]


def test_largest_batch_arithmetic(bench):
    per_seq = dict(cache=100, workspace=20, workspace_fixed=50)
    assert bench.largest_batch(1000, per_seq, reserve_bytes=100) == (1000 - 100 - 50) // 120
    assert bench.largest_batch(100, per_seq, reserve_bytes=100) == 0


def test_smoke_run_writes_json_table_and_plots(bench, tmp_path):
    doc = bench.main(["--smoke", "--out", str(tmp_path), "--contexts", "32,96", "--batch-contexts", "96",
                      "--steps", "2", "--reps", "1", "--piece", "64", "--cpu-budget-mib", "1"])
    with open(tmp_path / "model_efficiency.json") as f:
        saved = json.load(f)
    assert saved["prefill"] == doc["prefill"]
    assert {(r["model"], r["context"]) for r in saved["prefill"]} == {
        (m, T) for m in bench.MODELS for T in (32, 96)}
    decoded = {(r["model"], r["context"]) for r in saved["decode"]}
    assert decoded == {(m, T) for m in bench.MODELS for T in (32, 96)}
    assert all(r["batch"] >= 1 for r in saved["full_batch"])
    # the memory-filling batch of the hybrids is larger than MLA-only's (their cache per sequence is smaller)
    batch = {r["model"]: r["batch"] for r in saved["full_batch"]}
    assert batch["kimi_linear"] > batch["mla_only"] and batch["gdn_hybrid"] > batch["mla_only"]
    for r in saved["prefill"]:
        assert r["ms"] > 0 and "one_pass_ms" in r
        assert set(r["breakdown"]) >= {"mlp", "embed_head", "other", "mla_core"}
    assert not saved["skipped"]
    rows = bench.summary_rows(saved)
    assert [r["context"] for r in rows] == [32, 96]
    assert rows[-1]["kimi_linear.cache_bytes.vs_mla"] < 1
    assert "96" in bench.table(saved, markdown=True)
    for png in ("model_efficiency.png", "model_efficiency_speedup.png"):
        assert (tmp_path / png).stat().st_size > 10_000
