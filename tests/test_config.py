"""KimiLinearConfig: presets, derived layer types, the release's config.json format, bad input."""

from __future__ import annotations

import json

import pytest

from kimi_linear.config import PRESETS, KimiLinearConfig

RELEASE_MLA_1BASED = [4, 8, 12, 16, 20, 24, 27]


def release_config_json() -> dict:
    """The released Kimi-Linear-48B-A3B config.json fields that matter."""
    return {
        "model_type": "kimi_linear",
        "architectures": ["KimiLinearForCausalLM"],
        "vocab_size": 163840,
        "hidden_size": 2304,
        "num_hidden_layers": 27,
        "intermediate_size": 9216,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "kv_lora_rank": 512,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "mla_use_nope": True,
        "num_experts": 256,
        "num_experts_per_token": 8,
        "num_shared_experts": 1,
        "moe_intermediate_size": 1024,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.446,
        "moe_router_activation_func": "sigmoid",
        "moe_renormalize": True,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "model_max_length": 1048576,
        "bos_token_id": 163584,
        "eos_token_id": 163586,
        "pad_token_id": 163839,
        "dtype": "bfloat16",
        "linear_attn_config": {
            "kda_layers": [i for i in range(1, 28) if i not in RELEASE_MLA_1BASED],
            "full_attn_layers": RELEASE_MLA_1BASED,
            "num_heads": 32,
            "head_dim": 128,
            "short_conv_kernel_size": 4,
        },
    }


def test_release_preset_matches_release_config():
    preset = KimiLinearConfig.from_preset("48b-a3b")
    loaded = KimiLinearConfig.from_hf(release_config_json())
    assert preset == loaded
    assert preset.full_attn_layers == [i - 1 for i in RELEASE_MLA_1BASED]
    assert preset.layer_types.count("mla") == 7 and preset.layer_types.count("kda") == 20
    # The default layout rule reproduces the release's (every 4th layer, and the last).
    assert KimiLinearConfig().layer_types == preset.layer_types


def test_to_hf_writes_the_release_format():
    d = KimiLinearConfig.from_preset("48b-a3b").to_hf()
    want = release_config_json()
    for key, value in want.items():
        assert d[key] == value, key
    json.dumps(d)  # serialisable
    for internal in ("kda_layers", "full_attn_layers", "layer_types", "mixer", "hybrid_ratio"):
        assert internal not in d


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_config_json(name, tmp_path):
    config = KimiLinearConfig.from_preset(name)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    assert KimiLinearConfig.from_hf(tmp_path) == config
    assert KimiLinearConfig.from_hf(tmp_path / "config.json") == config


def test_debug_preset_covers_all_four_branches():
    c = KimiLinearConfig.from_preset("debug")
    branches = {(t, c.is_moe_layer(i)) for i, t in enumerate(c.layer_types)}
    assert branches == {("kda", False), ("kda", True), ("mla", False), ("mla", True)}
    assert c.num_hidden_layers <= 4


def test_mixer_and_hybrid_ratio_knobs():
    assert KimiLinearConfig.from_preset("tiny", mixer="mla").layer_types == ["mla"] * 4
    assert KimiLinearConfig.from_preset("tiny", mixer="gdn").layer_types == ["gdn", "gdn", "gdn", "mla"]
    assert KimiLinearConfig.from_preset("tiny", hybrid_ratio=0).layer_types == ["kda"] * 4
    assert KimiLinearConfig.from_preset("tiny", hybrid_ratio=1).layer_types == ["kda", "mla", "kda", "mla"]
    c = KimiLinearConfig.from_preset("tiny", num_hidden_layers=7, hybrid_ratio=2)
    assert c.layer_types == ["kda", "kda", "mla", "kda", "kda", "mla", "mla"]
    c = KimiLinearConfig.from_preset("tiny", mixer="mamba2", hybrid_ratio=0)
    assert c.layer_types == ["mamba2"] * 4
    c = KimiLinearConfig.from_preset("tiny", layer_types=["kda", "mla", "mamba2", "gdn"])
    assert c.full_attn_layers == [1] and c.kda_layers == [0, 2, 3]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(mixer="gdn"),
        dict(layer_types=["mamba2", "mla", "kda", "gdn"]),
        dict(use_output_gate=False),
        dict(use_short_conv=False, mla_use_nope=False),
    ],
    ids=["gdn", "mixed", "no-output-gate", "no-conv-rope"],
)
def test_project_layouts_round_trip_with_extra_keys(overrides):
    config = KimiLinearConfig.from_preset("tiny", **overrides)
    d = config.to_hf()
    assert KimiLinearConfig.from_hf(json.loads(json.dumps(d))) == config
    release_keys = set(KimiLinearConfig.from_preset("tiny").to_hf())
    extra = set(d) - release_keys
    assert extra <= {"kimi_linear_layer_types", "use_output_gate", "use_short_conv"} and (
        extra or "mla_use_nope" in overrides
    )


def test_hf_transformers_style_config_is_understood():
    d = release_config_json()
    del d["linear_attn_config"], d["num_experts"], d["num_experts_per_token"], d["first_k_dense_replace"]
    d.update(
        layer_types=[
            "full_attention" if i + 1 in RELEASE_MLA_1BASED else "linear_attention" for i in range(27)
        ],
        mlp_layer_types=["dense"] + ["sparse"] * 26,
        num_local_experts=256,
        num_experts_per_tok=8,
        linear_num_heads=32,
        linear_head_dim=128,
        linear_conv_kernel_dim=4,
    )
    assert KimiLinearConfig.from_hf(d) == KimiLinearConfig.from_preset("48b-a3b")


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="debug.*tiny.*small.*48b-a3b"):
        KimiLinearConfig.from_preset("huge")
    with pytest.raises(ValueError, match="unknown config field"):
        KimiLinearConfig.from_preset("tiny", hiden_size=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kda_layers=[0, 1], full_attn_layers=[1, 2, 3]), "exactly once"),
        (dict(layer_types=["kda", "rnn", "kda", "mla"]), "layer_types"),
        (dict(mixer="lstm"), "mixer"),
        (dict(hybrid_ratio=-1), "hybrid_ratio"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_experts_per_token=9), "num_experts_per_token"),
        (dict(mla_use_nope=False, qk_rope_head_dim=7), "qk_rope_head_dim"),
    ],
    ids=["overlap", "bad-type", "bad-mixer", "neg-ratio", "zero-hidden", "topk", "odd-rope"],
)
def test_bad_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KimiLinearConfig.from_preset("debug", **kwargs)


def test_from_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        KimiLinearConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        KimiLinearConfig.from_hf(tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        KimiLinearConfig.from_hf({"model_type": "llama"})
    bad = release_config_json()
    bad["linear_attn_config"]["full_attn_layers"] = [0, 4]
    with pytest.raises(ValueError, match="1-based"):
        KimiLinearConfig.from_hf(bad)


def small_config_json() -> dict:
    """A small model's config.json in the release's format, written out by hand."""
    d = KimiLinearConfig.from_preset("debug").to_hf()
    return json.loads(json.dumps(d))


@pytest.mark.parametrize(
    "remove, named",
    [
        (["hidden_size"], "hidden_size"),
        (["vocab_size", "kv_lora_rank"], "vocab_size, kv_lora_rank"),
        (["linear_attn_config"], "linear_attn_config.kda_layers"),
        (["linear_attn_config.num_heads"], "linear_attn_config.num_heads"),
        (["linear_attn_config.head_dim"], "linear_attn_config.head_dim"),
        (["num_experts"], "num_experts"),
        (["moe_intermediate_size"], "moe_intermediate_size"),
        (["num_experts_per_token"], "num_experts_per_token"),
    ],
)
def test_missing_shape_keys_are_named(remove, named):
    d = small_config_json()
    for key in remove:
        head, _, sub = key.partition(".")
        del (d[head] if sub else d)[sub or head]
    with pytest.raises(ValueError, match=f"missing {named}"):
        KimiLinearConfig.from_hf(d)


def test_documented_defaults_fit_the_files_own_shape():
    d = small_config_json()
    for key in (
        "first_k_dense_replace",
        "rms_norm_eps",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "model_max_length",
        "num_key_value_heads",
        "mla_use_nope",
        "q_lora_rank",
        "dtype",
    ):
        d.pop(key)
    del d["linear_attn_config"]["short_conv_kernel_size"]
    config = KimiLinearConfig.from_hf(d)
    want = KimiLinearConfig.from_preset("debug")
    assert (config.hidden_size, config.vocab_size, config.layer_types) == (64, 259, want.layer_types)
    assert config.first_k_dense_replace == 1 and config.short_conv_kernel_size == 4
    assert config.num_key_value_heads == config.num_attention_heads == 4
    assert config.eos_token_id is None and config.bos_token_id is None and config.rms_norm_eps == 1e-5
    # A model without experts needs none of the MoE sizes.
    d = small_config_json()
    d["num_experts"] = 0
    for key in ("moe_intermediate_size", "num_experts_per_token", "num_shared_experts"):
        d.pop(key)
    assert KimiLinearConfig.from_hf(d).num_experts == 0


def test_unknown_keys_round_trip():
    d = release_config_json()
    extra = {
        "auto_map": {"AutoConfig": "configuration_kimi.KimiLinearConfig"},
        "transformers_version": "4.56.0",
        "head_dim": 72,
        "use_cache": False,
        "quantization_config": {"quant_method": "compressed-tensors"},
    }
    d.update(extra)
    config = KimiLinearConfig.from_hf(d)
    assert config == KimiLinearConfig.from_preset("48b-a3b")  # extra keys do not change the model
    out = config.to_hf()
    for key, value in extra.items():
        assert out[key] == value, key
    for key, value in release_config_json().items():
        assert out[key] == value, key
    assert KimiLinearConfig.from_hf(out).to_hf() == out


def test_info_on_a_config_missing_keys_names_them(tmp_path, capsys):
    from kimi_linear.cli import main

    d = small_config_json()
    del d["hidden_size"], d["linear_attn_config"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "hidden_size" in err and "linear_attn_config" in err and "Traceback" not in err
    d = small_config_json()
    del d["first_k_dense_replace"], d["rms_norm_eps"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_total"] < 10**6 and info["layers"] == 4
