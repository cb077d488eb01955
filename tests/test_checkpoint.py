"""Checkpoints: release names/dtypes, sharding + index, meta-device load, atomic writes, named errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kimi_linear.checkpoint import CheckpointError, checkpoint_files
from kimi_linear.model import KimiLinearForCausalLM
from tests.test_model import make_model, random_ids


def all_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(set(checkpoint_files(str(directory)).values())):
        out.update(load_file(path))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make_model(seed=3)
    directory = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(directory, max_shard_size="150KB")
    return model, directory


def test_release_names_dtypes_and_index(saved):
    model, directory = saved
    files = sorted(os.listdir(directory))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files and "config.json" in files
    assert not any(f.startswith(".tmp") for f in files)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = all_tensors(directory)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    c = model.config
    H, K, E = c.kda_num_heads, c.kda_head_dim, c.num_experts
    kda, mla, moe = "model.layers.0.self_attn", "model.layers.1.self_attn", "model.layers.2.block_sparse_moe"
    assert tensors[f"{kda}.q_conv1d.weight"].shape == (H * K, 1, 4)
    assert tensors[f"{kda}.A_log"].shape == (1, 1, H, 1) and tensors[f"{kda}.A_log"].dtype == torch.float32
    assert tensors[f"{kda}.dt_bias"].shape == (H * K,) and tensors[f"{kda}.o_norm.weight"].shape == (K,)
    for name in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "kv_a_layernorm"):
        assert f"{mla}.{name}.weight" in tensors
    assert "model.layers.0.mlp.gate_proj.weight" in tensors
    assert tensors[f"{moe}.gate.weight"].shape == (E, c.hidden_size)
    assert tensors[f"{moe}.gate.e_score_correction_bias"].shape == (E,)
    experts = model.model.layers[2].block_sparse_moe.experts
    for e in (0, E - 1):
        for w in ("w1", "w2", "w3"):
            assert torch.equal(tensors[f"{moe}.experts.{e}.{w}.weight"], getattr(experts, w)[e].detach())
    assert not any(".experts.w1" in n for n in tensors)
    config = json.loads((directory / "config.json").read_text())
    assert (
        config["linear_attn_config"]["full_attn_layers"] == [2, 4] and config["model_type"] == "kimi_linear"
    )


def test_round_trip_same_logits_and_bf16_load(saved):
    model, directory = saved
    loaded = KimiLinearForCausalLM.from_pretrained(directory)
    ids = random_ids(2, 17, model.config)
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(loaded(ids).logits, want)
        half = KimiLinearForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
        assert half.lm_head.weight.dtype == torch.bfloat16
        assert half.model.layers[0].self_attn.A_log.dtype == torch.float32
        assert half.model.layers[2].block_sparse_moe.gate.weight.dtype == torch.float32
        # loading in bf16 is exactly casting the fp32 model (bf16 vs fp32 logits differ by the gate's
        # sensitivity)
        cast = copy.deepcopy(model).to(torch.bfloat16)
        assert torch.equal(half(ids).logits, cast(ids).logits)


def test_single_file_and_resave_removes_stale_shards(tmp_path):
    model = make_model(seed=4)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    model.save_pretrained(tmp_path)  # now one file: shards and index of the first save must go
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path)
    ids = random_ids(1, 5, model.config)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.self_attn.dt_bias").dtype == torch.float32


def test_a_model_packed_for_inference_saves_and_loads(tmp_path):
    """pack_for_inference makes weights views of one storage; saving writes each tensor and the loaded model
    computes the same logits."""
    model = make_model(seed=12)
    ids = random_ids(2, 9, model.config, seed=1)
    with torch.no_grad():
        want = model(ids).logits
    model.pack_for_inference()
    model.save_pretrained(tmp_path)
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_save_one_tensor(tmp_path):
    model = make_model(seed=5, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in all_tensors(tmp_path)
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = random_ids(1, 5, model.config)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def rewrite(directory, edit):
    path = str(directory / "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.fixture
def single(tmp_path):
    make_model(seed=6).save_pretrained(tmp_path)
    return tmp_path


def test_missing_tensor_is_named(single):
    rewrite(single, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.self_attn\.kv_b_proj\.weight"):
        KimiLinearForCausalLM.from_pretrained(single)


def test_unexpected_tensor_is_named(single):
    rewrite(single, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.ones(2)))
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.extra\.weight"):
        KimiLinearForCausalLM.from_pretrained(single)


def test_config_contradicting_weights_names_the_tensor(single):
    config = json.loads((single / "config.json").read_text())
    config["linear_attn_config"]["head_dim"] = 16
    (single / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"self_attn\.\w+.* has shape .* config\.json implies"):
        KimiLinearForCausalLM.from_pretrained(single)


def test_corrupt_and_truncated_files(single):
    path = single / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        KimiLinearForCausalLM.from_pretrained(single)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        KimiLinearForCausalLM.from_pretrained(single)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        KimiLinearForCausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        KimiLinearForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        KimiLinearForCausalLM.from_pretrained(tmp_path / "f")
    with pytest.raises(ValueError, match="max_shard_size"):
        make_model().save_pretrained(tmp_path / "out", max_shard_size="lots")


def test_failed_write_leaves_the_previous_checkpoint(single, monkeypatch):
    before = (single / "model.safetensors").read_bytes()
    import kimi_linear.checkpoint as ckpt

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_pretrained(make_model(seed=9), single)
    assert (single / "model.safetensors").read_bytes() == before
    assert not any(f.startswith(".tmp") for f in os.listdir(single))


def test_project_layouts_save_and_load(tmp_path):
    # layouts beyond the release (GDN, Mamba2, ablations) still round-trip through config.json + safetensors
    model = make_model(seed=10, layer_types=["mamba2", "mla", "gdn", "mla"], use_output_gate=False)
    model.save_pretrained(tmp_path)
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    ids = random_ids(2, 9, model.config)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_save_pretrained_writes_a_servable_folder(tmp_path):
    """A model loaded from a release-like folder saves a folder with its tokenizer, generation config and remote
    code; config.json keeps the keys the project does not use; transformers loads config + weights."""
    from tests.test_tokenizer import make_folder

    transformers = pytest.importorskip("transformers")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _, config = make_folder(src, generation_config={"eos_token_id": [3, 4], "temperature": 0.6})
    model = make_model(
        seed=11,
        vocab_size=config.vocab_size,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(src)
    release_keys = {
        "auto_map": {"AutoConfig": "configuration_kimi.KimiLinearConfig"},
        "transformers_version": "4.56.0",
        "head_dim": 72,
        "architectures": ["KimiLinearForCausalLM"],
        "quantization_config": {"quant_method": "none"},
    }
    d = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**d, **release_keys}))
    (src / "tokenization_kimi.py").write_text("# remote code\n")
    (src / "special_tokens_map.json").write_text('{"bos_token": "[BOS]"}')

    loaded = KimiLinearForCausalLM.from_pretrained(src)
    loaded.save_pretrained(dst)
    for name in (
        "tiktoken.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "tokenization_kimi.py",
    ):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert not any(f.startswith(".tmp") for f in os.listdir(dst))
    saved = json.loads((dst / "config.json").read_text())
    for key, value in release_keys.items():
        assert saved[key] == value, key
    assert saved["hidden_size"] == model.config.hidden_size and saved["vocab_size"] == config.vocab_size

    hf_model, info = transformers.KimiLinearForCausalLM.from_pretrained(str(dst), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    ids = random_ids(2, 9, model.config, seed=5)
    with torch.no_grad():
        want = hf_model.eval()(input_ids=ids).logits
        got = model(ids).logits
    assert (got - want).norm() / want.norm() < 1e-4

    # Saving again into the folder it came from keeps its files; a model built in memory gets a generation
    # config from its own ids.
    KimiLinearForCausalLM.from_pretrained(dst).save_pretrained(dst)
    assert (dst / "tiktoken.model").read_bytes() == (src / "tiktoken.model").read_bytes()
    fresh = tmp_path / "fresh"
    make_model(seed=12).save_pretrained(fresh)
    generation = json.loads((fresh / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
    assert not (fresh / "tiktoken.model").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_saved_files_follow_the_umask(tmp_path, umask):
    """Atomic writes go through mkstemp (mode 0600); the renamed files get the modes a plain write would."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_model(seed=13).save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    old = os.umask(umask)
    try:
        KimiLinearForCausalLM.from_pretrained(src).save_pretrained(dst, max_shard_size=20_000)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in dst.iterdir()}
    assert "model.safetensors.index.json" in modes and "tokenizer_config.json" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
