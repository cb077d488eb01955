"""benchmarks/train_speed_gpu.py runs end to end on the CPU at a toy size: both models, an activation-checkpointing
setting, the per-layer profile, the JSON and the table last."""

from __future__ import annotations

import json

import torch

from benchmarks import train_speed_gpu


def test_smoke_run_reports_every_configuration_and_the_layer_profile(tmp_path, capsys, one_thread):
    train_speed_gpu.main(["--device", "cpu", "--smoke", "--out", str(tmp_path), "--seq-len", "32",
                          "--tokens-per-step", "64", "--activation-checkpointing", "mla,moe", "--profile-layers",
                          "--steps", "1", "--warmup", "0"])
    doc = json.loads((tmp_path / "train_speed_gpu.json").read_text())
    rows = doc["rows"]
    assert [(r["mixer"], r["seq_len"], r["docs"], r["activation_checkpointing"]) for r in rows] == [
        ("kda", 32, 2, "mla,moe"), ("mla", 32, 2, "mla,moe")]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["tokens_per_step"] == 64 and len(r["losses"]) == 1
        parts = {p["part"]: p for p in r["profile"]}
        assert "lm_head + loss" in parts and sum(p["count"] for p in r["profile"]) == 4 + 1
        assert all(p["fwd_ms"] > 0 and p["bwd_ms"] > 0 for p in r["profile"])
    assert set(p["part"] for p in rows[0]["profile"]) == {"kda+mlp", "kda+moe", "mla+moe", "lm_head + loss"}
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("| mla MMMM | 32 x 2 | mla,moe |") and out[-1].endswith("| 1.00x |")


def test_profile_counts_saved_bytes_without_activation_checkpointing(one_thread):
    model = train_speed_gpu.KimiLinearForCausalLM(train_speed_gpu.one_b_config("kda", smoke=True))
    batch = train_speed_gpu.make_batch(2, 16, model.config.vocab_size, torch.Generator().manual_seed(0))

    class Args:
        device, autocast, profile_reps = "cpu", False, 1

    rows = train_speed_gpu.profile_layers(model, batch, Args, "")
    assert all(r["saved_bytes_per_token"] > 0 for r in rows)
    assert all(r["saved_bytes_per_token"] is None for r in train_speed_gpu.profile_layers(model, batch, Args, "full"))
