"""Model layers (nn.Modules), each owning its parameters and its cache layout.

``MIXERS`` maps a layer type of ``config.layer_types`` to its token mixer: kda.KimiDeltaAttention (also the
scalar-gate "gdn"), mla.MultiheadLatentAttention, mamba2.Mamba2Mixer. Each is built as ``cls(config,
layer_idx)`` and called as ``mixer(hidden_states [B, T, D], cache=None, cu_seqlens=None, attention_mask=None)
-> [B, T, D]``. The MLPs are mlp.SwiGLUMLP and moe.MoE; norm.RMSNorm is the blocks' norm.
"""

from kimi_linear.layers.kda import KimiDeltaAttention
from kimi_linear.layers.mamba2 import Mamba2Mixer
from kimi_linear.layers.mla import MultiheadLatentAttention

MIXERS: dict[str, type] = {
    "kda": KimiDeltaAttention,
    "gdn": KimiDeltaAttention,
    "mla": MultiheadLatentAttention,
    "mamba2": Mamba2Mixer,
}


def mixer_class(layer_type: str) -> type:
    """The mixer class for ``layer_type``. Raises ValueError if unknown."""
    if layer_type not in MIXERS:
        raise ValueError(f"unknown layer type {layer_type!r}; known: {sorted(MIXERS)}")
    return MIXERS[layer_type]
