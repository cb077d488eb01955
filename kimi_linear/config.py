"""The one model configuration: ``KimiLinearConfig``.

Field names are the released checkpoint's ``config.json`` names, so ``from_hf`` / ``to_hf`` are
mostly a copy. The release stores the layer layout as 1-based lists inside ``linear_attn_config``; here the
lists are 0-based (``kda_layers``, ``full_attn_layers``) and ``__post_init__`` derives one ``layer_types``
entry per layer:

* ``"kda"``    Kimi Delta Attention (per-channel gate)            — the linear layers of Kimi Linear
* ``"gdn"``    the same layer with one scalar gate per head        — the paper's Gated DeltaNet baseline
* ``"mla"``    Multi-head Latent Attention (NoPE by default)       — the full-attention layers
* ``"mamba2"`` a Mamba2 mixer                                      — a baseline of the synthetic tasks

Without explicit lists the layout follows ``mixer`` and ``hybrid_ratio``: with ratio r, layer i is MLA when
(i + 1) is a multiple of r + 1, and the last layer is always MLA (the release's 27-layer stack ends on one:
0-based MLA layers 3, 7, ..., 23, 26). ``hybrid_ratio=0`` gives a pure linear stack; ``mixer="mla"`` full
attention everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

LAYER_TYPES = ("kda", "gdn", "mla", "mamba2")
# config.json key for layouts beyond the release's ("gdn" / "mamba2" layers); absent for release layouts.
PROJECT_LAYER_TYPES_KEY = "kimi_linear_layer_types"
MIXERS = ("kda", "gdn", "mla", "mamba2")

# Keys of the release's config.json that carry no information for this implementation (or restate a field);
# they are accepted by from_hf and written back by to_hf so the file round-trips.
_RELEASE_CONSTANTS = {
    "architectures": ["KimiLinearForCausalLM"],
    "model_type": "kimi_linear",
    "moe_layer_freq": 1,
    "num_nextn_predict_layers": 0,
    "rope_scaling": None,
    "use_cache": True,
    "use_grouped_topk": True,
}


# config.json keys that set a tensor shape and have no default (``from_hf`` names any that is missing).
REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "num_experts",
)
# Keys from_hf turns into the layer layout (not kept as extra keys).
_LAYOUT_KEYS = ("model_type", "linear_attn_config", "layer_types", "mlp_layer_types", PROJECT_LAYER_TYPES_KEY)


def _check_required(d: dict, values: dict, where: str) -> None:
    """Raise ValueError naming the shape-setting keys a config.json lacks (see ``KimiLinearConfig.from_hf``)."""
    missing = [k for k in REQUIRED_HF_KEYS if values.get(k) is None]
    lac = d.get("linear_attn_config")
    if lac is not None and not isinstance(lac, dict):
        raise ValueError(f"{where}: linear_attn_config must be an object, got {lac!r}")
    lac = lac or {}
    has_layout = (
        "kda_layers" in lac
        or "full_attn_layers" in lac
        or isinstance(d.get("layer_types"), list)
        or isinstance(d.get(PROJECT_LAYER_TYPES_KEY), list)
    )
    if not has_layout:
        missing.append("linear_attn_config.kda_layers / full_attn_layers (or layer_types)")
    elif values.get("num_hidden_layers") is not None:
        types = d.get(PROJECT_LAYER_TYPES_KEY) or d.get("layer_types")
        L = values["num_hidden_layers"]
        linear_layers = (
            any(t not in ("mla", "full_attention") for t in types)
            if isinstance(types, list)
            else bool(lac.get("kda_layers")) or len(lac.get("full_attn_layers") or []) < L
        )
        if linear_layers:
            for src, alias in (("num_heads", "linear_num_heads"), ("head_dim", "linear_head_dim")):
                if src not in lac and alias not in d:
                    missing.append(f"linear_attn_config.{src}")
    if isinstance(values.get("num_experts"), int) and values["num_experts"] > 0:
        missing += [
            k
            for k in ("num_experts_per_token", "moe_intermediate_size", "num_shared_experts")
            if values.get(k) is None
        ]
    if missing:
        raise ValueError(
            f"{where} is missing {', '.join(missing)}: these set the model's tensor shapes and have no default"
        )


@dataclass
class KimiLinearConfig:
    """Hyper-parameters of the Kimi Linear hybrid LM. Defaults are the released Kimi-Linear-48B-A3B.

    Layer lists are 0-based here (the release's config.json is 1-based; ``from_hf``/``to_hf`` convert).

    Raises:
        ValueError: on inconsistent values (layer lists that do not cover every layer exactly once, unknown
            layer types or mixer, non-positive sizes, top-k larger than the number of experts, ...).
    """

    # Model shape
    vocab_size: int = 163840
    hidden_size: int = 2304
    num_hidden_layers: int = 27
    num_attention_heads: int = 32
    intermediate_size: int = 9216
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    model_max_length: int = 1048576
    initializer_range: float = 0.02
    dtype: str = "bfloat16"
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163586
    pad_token_id: int | None = 163839

    # Mixture of Experts (layers >= first_k_dense_replace)
    moe_intermediate_size: int = 1024
    num_experts: int = 256
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 2.446
    moe_renormalize: bool = True
    moe_router_activation_func: str = "sigmoid"
    num_expert_group: int = 1
    topk_group: int = 1

    # MLA
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    num_key_value_heads: int = 32
    mla_use_nope: bool = True
    rope_theta: float = 10000.0

    # KDA (the release's linear_attn_config)
    kda_num_heads: int = 32
    kda_head_dim: int = 128
    short_conv_kernel_size: int = 4
    kda_layers: list[int] | None = None
    full_attn_layers: list[int] | None = None

    # Layout and ablation knobs (not in the release's config.json)
    # mixer and hybrid_ratio only derive layer_types; two configs with the same layer_types are equal.
    mixer: str = field(default="kda", compare=False)
    hybrid_ratio: int = field(default=3, compare=False)
    use_output_gate: bool = True
    use_short_conv: bool = True
    layer_types: list[str] | None = field(default=None)

    # Keys of the config.json this config was read from that no field holds (auto_map, transformers_version,
    # head_dim, quantization_config, ...): to_hf writes them back unchanged.
    hf_extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "v_head_dim",
            "kda_num_heads",
            "kda_head_dim",
            "short_conv_kernel_size",
            "model_max_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.qk_rope_head_dim < 0:
            raise ValueError(f"qk_rope_head_dim must be >= 0, got {self.qk_rope_head_dim}")
        if not self.mla_use_nope and self.qk_rope_head_dim % 2:
            raise ValueError(
                f"qk_rope_head_dim must be even for RoPE (mla_use_nope=False), got {self.qk_rope_head_dim}"
            )
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        if not isinstance(self.hybrid_ratio, int) or self.hybrid_ratio < 0:
            raise ValueError(
                f"hybrid_ratio must be an int >= 0 (3 = three linear layers per MLA layer, "
                f"0 = no MLA), got {self.hybrid_ratio!r}"
            )
        if self.num_experts > 0 and not (1 <= self.num_experts_per_token <= self.num_experts):
            raise ValueError(
                f"num_experts_per_token must be in 1..num_experts={self.num_experts}, "
                f"got {self.num_experts_per_token}"
            )
        if self.moe_router_activation_func not in ("sigmoid", "softmax"):
            raise ValueError(
                f"moe_router_activation_func must be 'sigmoid' or 'softmax', "
                f"got {self.moe_router_activation_func!r}"
            )
        L = self.num_hidden_layers
        linear = "kda" if self.mixer == "mla" else self.mixer

        if self.layer_types is not None:
            types = list(self.layer_types)
            if len(types) != L or any(t not in LAYER_TYPES for t in types):
                raise ValueError(f"layer_types must list {L} entries from {LAYER_TYPES}, got {types}")
        elif self.kda_layers is not None or self.full_attn_layers is not None:
            types = self._types_from_lists(L, linear)
        elif self.mixer == "mla":
            types = ["mla"] * L
        else:
            r = self.hybrid_ratio
            types = ["mla" if r > 0 and ((i + 1) % (r + 1) == 0 or i == L - 1) else linear for i in range(L)]
        self.layer_types = types
        self.full_attn_layers = [i for i, t in enumerate(types) if t == "mla"]
        self.kda_layers = [i for i, t in enumerate(types) if t != "mla"]

    def _types_from_lists(self, L: int, linear: str) -> list[str]:
        kda = list(self.kda_layers or [])
        full = list(self.full_attn_layers or [])
        if self.kda_layers is None:
            kda = [i for i in range(L) if i not in full]
        if self.full_attn_layers is None:
            full = [i for i in range(L) if i not in kda]
        if sorted(kda + full) != list(range(L)):
            raise ValueError(
                f"kda_layers {kda} and full_attn_layers {full} (0-based) must together name each of the "
                f"{L} layers exactly once"
            )
        return ["mla" if i in full else linear for i in range(L)]

    # ---- derived sizes -------------------------------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width of MLA: nope + rope dims (192 in the release)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` (0-based) has the MoE MLP (else the dense SwiGLU)."""
        return self.num_experts > 0 and layer_idx >= self.first_k_dense_replace

    # ---- presets -------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> KimiLinearConfig:
        """A named configuration, with field overrides.

        Presets: "debug" (4 layers, tiny dims; covers KDA+dense, KDA+MoE, MLA+dense, MLA+MoE), "tiny" (~3M
        parameters, byte-level vocab; a few CPU minutes of training), "small" (~30M, byte-level vocab),
        "48b-a3b" (the released Kimi-Linear-48B-A3B).

        A ``mixer`` override keeps the preset's layer layout, its linear layers becoming that mixer ("mla":
        every layer MLA); ``hybrid_ratio`` or ``num_hidden_layers`` re-derive the layout.

        Raises:
            ValueError: unknown preset (the message lists the presets) or unknown override field.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets are: {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}")
        values = dict(PRESETS[name])
        values.update(overrides)
        relayout = any(k in overrides for k in ("hybrid_ratio", "num_hidden_layers"))
        if (relayout or overrides.get("mixer") == "mla") and not (
            "kda_layers" in overrides or "full_attn_layers" in overrides or "layer_types" in overrides
        ):
            # A preset's explicit layout would override the knob the caller just set; re-derive it instead.
            # A linear mixer keeps the preset's layout: its linear layers take that mixer.
            for key in ("kda_layers", "full_attn_layers", "layer_types"):
                values.pop(key, None)
        return cls(**values)

    # ---- HF config.json ------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, source: dict | str | os.PathLike) -> KimiLinearConfig:
        """Read a ``config.json`` (a dict, a file path, or a checkpoint folder holding config.json).

        Understands the release's format (1-based ``linear_attn_config`` lists) and the one HF transformers
        writes (``layer_types`` of "linear_attention"/"full_attention", ``linear_num_heads``,
        ``num_local_experts``, ...). Keys no field holds are kept in ``hf_extra`` and written back by ``to_hf``.

        Every key that sets a tensor shape must be present (``REQUIRED_HF_KEYS``; the layer layout —
        ``linear_attn_config.kda_layers``/``full_attn_layers`` or ``layer_types``; with linear layers, the KDA
        ``num_heads``/``head_dim``; with ``num_experts`` > 0, ``num_experts_per_token``,
        ``moe_intermediate_size`` and ``num_shared_experts``): the 48B defaults of the dataclass are never taken
        for a file that omits them. Missing keys that do not set a shape, or whose default is the only layout
        the release and HF transformers know, take these documented defaults: ``short_conv_kernel_size`` 4,
        ``first_k_dense_replace`` 1, ``num_key_value_heads`` = ``num_attention_heads``, ``q_lora_rank`` null,
        ``mla_use_nope`` true, ``tie_word_embeddings`` false, ``rms_norm_eps`` 1e-5, ``routed_scaling_factor``
        2.446, ``moe_renormalize`` true, ``moe_router_activation_func`` sigmoid, ``model_max_length`` 1048576,
        ``dtype`` bfloat16, and no bos/eos/pad token ids.

        Raises:
            FileNotFoundError: no such file / no config.json in the folder.
            ValueError: not a kimi_linear config, a missing required key (named), or inconsistent values.
        """
        where = "config"
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"config file not found: {path}")
            with open(path, encoding="utf-8") as f:
                try:
                    d = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} is not valid JSON: {e}") from None
            if not isinstance(d, dict):
                raise ValueError(f"{path} must hold a JSON object")
            where = path
        elif isinstance(source, dict):
            d = dict(source)
        else:
            raise TypeError(f"source must be a dict or a path, got {type(source).__name__}")
        if d.get("model_type", "kimi_linear") != "kimi_linear":
            raise ValueError(f"model_type must be 'kimi_linear', got {d.get('model_type')!r}")

        aliases = {  # HF transformers' attribute names -> the release's
            "num_local_experts": "num_experts",
            "num_experts_per_tok": "num_experts_per_token",
            "n_shared_experts": "num_shared_experts",
            "norm_topk_prob": "moe_renormalize",
            "max_position_embeddings": "model_max_length",
            "n_group": "num_expert_group",
            "linear_num_heads": "kda_num_heads",
            "linear_head_dim": "kda_head_dim",
            "linear_conv_kernel_dim": "short_conv_kernel_size",
            "torch_dtype": "dtype",
        }
        fields = {f.name for f in dataclasses.fields(cls)} - {"hf_extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in d.items():
            name = aliases.get(key, key)
            if name in fields and name not in ("layer_types", "kda_layers", "full_attn_layers"):
                values[name] = value
            elif name not in fields and key not in _LAYOUT_KEYS:
                extra[key] = value
        _check_required(d, values, where)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            values.setdefault(key, None)
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values.get("num_attention_heads", cls.num_attention_heads)
        if values.get("v_head_dim") is None:
            values.pop("v_head_dim", None)

        lac = d.get("linear_attn_config") or {}
        for src, dst in (
            ("num_heads", "kda_num_heads"),
            ("head_dim", "kda_head_dim"),
            ("short_conv_kernel_size", "short_conv_kernel_size"),
        ):
            if src in lac:
                values[dst] = lac[src]
        L = values.get("num_hidden_layers", cls.num_hidden_layers)
        if "kda_layers" in lac or "full_attn_layers" in lac:
            for key in ("kda_layers", "full_attn_layers"):
                one_based = lac.get(key, [])
                bad = [i for i in one_based if not (isinstance(i, int) and 1 <= i <= L)]
                if bad:
                    raise ValueError(
                        f"linear_attn_config.{key} holds 1-based layer numbers 1..{L}, got {bad}"
                    )
                values[key] = [i - 1 for i in one_based]
        elif isinstance(d.get("layer_types"), list):
            hf_types = d["layer_types"]
            mapping = {"linear_attention": "kda", "full_attention": "mla"}
            if any(t not in mapping for t in hf_types):
                raise ValueError(
                    f"layer_types entries must be 'linear_attention' or 'full_attention', got {hf_types}"
                )
            values["layer_types"] = [mapping[t] for t in hf_types]
        if isinstance(d.get(PROJECT_LAYER_TYPES_KEY), list):
            values["layer_types"] = list(d[PROJECT_LAYER_TYPES_KEY])
        if isinstance(d.get("mlp_layer_types"), list) and "first_k_dense_replace" not in d:
            values["first_k_dense_replace"] = sum(1 for t in d["mlp_layer_types"] if t == "dense")
        if "kda_layers" in values or "layer_types" in values:
            values["hybrid_ratio"] = cls.hybrid_ratio
        return cls(**values, hf_extra=extra)

    def to_hf(self) -> dict:
        """The ``config.json`` dict as the release writes it (1-based ``linear_attn_config`` layer lists), with
        the keys of the file this config was read from that no field holds (``hf_extra``) unchanged.

        A configuration the release cannot express (a "gdn" or "mamba2" layer, the output-gate or short-conv
        ablations) adds project keys — ``kimi_linear_layer_types`` (one type per layer), ``use_output_gate``,
        ``use_short_conv`` — that ``from_hf`` reads back; other tools fail on such a checkpoint's tensor names
        or shapes rather than misread it. The release's own layouts get exactly the release's keys.
        """
        d: dict[str, Any] = dict(_RELEASE_CONSTANTS)
        for f in dataclasses.fields(self):
            if f.name in (
                "hf_extra",
                "kda_layers",
                "full_attn_layers",
                "layer_types",
                "mixer",
                "hybrid_ratio",
                "kda_num_heads",
                "kda_head_dim",
                "short_conv_kernel_size",
                "use_output_gate",
                "use_short_conv",
            ):
                continue
            d[f.name] = getattr(self, f.name)
        d["head_dim"] = self.qk_rope_head_dim
        d["linear_attn_config"] = {
            "full_attn_layers": [i + 1 for i in self.full_attn_layers],
            "head_dim": self.kda_head_dim,
            "kda_layers": [i + 1 for i in self.kda_layers],
            "num_heads": self.kda_num_heads,
            "short_conv_kernel_size": self.short_conv_kernel_size,
        }
        d.update(self.hf_extra)  # only keys no field holds: constants, head_dim, auto_map, ...
        if any(t not in ("kda", "mla") for t in self.layer_types):
            d[PROJECT_LAYER_TYPES_KEY] = list(self.layer_types)
        for knob in ("use_output_gate", "use_short_conv"):
            if not getattr(self, knob):
                d[knob] = False
        return dict(sorted(d.items()))

    def to_dict(self) -> dict:
        """All fields, 0-based lists (for logs and the project's own checkpoints' metadata)."""
        return dataclasses.asdict(self)


_BYTE_VOCAB = dict(vocab_size=256 + 3, bos_token_id=256, eos_token_id=257, pad_token_id=258, dtype="float32")

PRESETS: dict[str, dict[str, Any]] = {
    # 0 KDA+dense, 1 MLA+dense, 2 KDA+MoE, 3 MLA+MoE: all four branches in four layers.
    "debug": dict(
        _BYTE_VOCAB,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_token=2,
        num_shared_experts=1,
        first_k_dense_replace=2,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        kda_num_heads=2,
        kda_head_dim=32,
        model_max_length=4096,
        kda_layers=[0, 2],
        full_attn_layers=[1, 3],
    ),
    "tiny": dict(
        _BYTE_VOCAB,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=768,
        moe_intermediate_size=128,
        num_experts=8,
        num_experts_per_token=2,
        num_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        kda_num_heads=4,
        kda_head_dim=64,
        model_max_length=8192,
    ),
    "small": dict(
        _BYTE_VOCAB,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1536,
        moe_intermediate_size=256,
        num_experts=8,
        num_experts_per_token=2,
        num_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        kda_num_heads=8,
        kda_head_dim=64,
        model_max_length=32768,
    ),
    "48b-a3b": dict(
        kda_layers=[i for i in range(27) if i not in (3, 7, 11, 15, 19, 23, 26)],
        full_attn_layers=[3, 7, 11, 15, 19, 23, 26],
    ),
}
