"""Inference state of the hybrid model, allocated in one place.

Per sequence (a cache row) and per layer:

* KDA / GDN layer: ``conv`` ``[N, 3·H·K, W-1]`` — the last W-1 inputs of the q, k, v short convolutions (model
  dtype) — and ``state`` ``[N, H, K, V]`` fp32. Fixed size, whatever the context length.
* MLA layer: ``latent`` ``[N, L_max, kv_lora_rank]`` and ``k_pe`` ``[N, L_max, qk_rope_head_dim]`` (model
  dtype), filled up to ``lengths``.
* other mixers (e.g. "mamba2"): whatever the mixer class's ``allocate_cache(config, layer_idx, batch_size,
  max_length, dtype, device) -> dict`` returns.

``lengths [N]`` (long, on the device) counts the tokens each row holds; the model advances it after every
forward.
"""

from __future__ import annotations

import torch

from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers import mixer_class

LINEAR_TYPES = ("kda", "gdn")


class KimiLinearCache:
    """Preallocated cache for ``batch_size`` sequences of up to ``max_length`` tokens.

    Args:
        config: the model's config.
        batch_size: number of rows N (>= 1).
        max_length: tokens per row the MLA layers can hold (>= 1).
        dtype: dtype of the conv tails and MLA latents (the model's); KDA states are always fp32.
        device: where to allocate.

    Raises:
        ValueError: batch_size or max_length < 1, or max_length beyond config.model_max_length.
    """

    def __init__(
        self,
        config: KimiLinearConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        if max_length > config.model_max_length:
            raise ValueError(
                f"max_length={max_length} exceeds the model's model_max_length={config.model_max_length}"
            )
        self.config = config
        self.batch_size = batch_size
        self.max_length = max_length
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        # The KDA state pool is the cache itself: row i is slot i of fused_recurrent_kda's state_indices.
        self.slots = torch.arange(batch_size, dtype=torch.long, device=self.device)
        self.layers: list[dict[str, torch.Tensor]] = [
            self._allocate(i, t) for i, t in enumerate(config.layer_types)
        ]

    def _allocate(self, layer_idx: int, layer_type: str) -> dict[str, torch.Tensor]:
        c, N, dev = self.config, self.batch_size, self.device
        if layer_type in LINEAR_TYPES:
            H, K = c.kda_num_heads, c.kda_head_dim
            return {
                "conv": torch.zeros(N, 3 * H * K, c.short_conv_kernel_size - 1, dtype=self.dtype, device=dev),
                "state": torch.zeros(N, H, K, K, dtype=torch.float32, device=dev),
            }
        if layer_type == "mla":
            return {
                "latent": torch.zeros(N, self.max_length, c.kv_lora_rank, dtype=self.dtype, device=dev),
                "k_pe": torch.zeros(N, self.max_length, c.qk_rope_head_dim, dtype=self.dtype, device=dev),
            }
        cls = mixer_class(layer_type)
        if not hasattr(cls, "allocate_cache"):
            raise ValueError(
                f"layer type {layer_type!r} ({cls.__name__}) has no allocate_cache(); it cannot decode"
            )
        return cls.allocate_cache(c, layer_idx, N, self.max_length, self.dtype, dev)

    def reset(self) -> None:
        """Empty every row (zeros everywhere, lengths 0) without reallocating."""
        self.lengths.zero_()
        for entry in self.layers:
            for t in entry.values():
                t.zero_()

    def nbytes(self) -> int:
        """Bytes held by the cache tensors."""
        return sum(t.numel() * t.element_size() for entry in self.layers for t in entry.values())


def cache_bytes_per_sequence(config: KimiLinearConfig, context: int, dtype_bytes: int = 2) -> dict[str, int]:
    """Cache bytes of one sequence at ``context`` tokens, and of an MLA-only model of the same shape.

    KDA layers hold the conv tails (dtype) and an fp32 K×V state per head; MLA layers hold r + dr values per
    token.

    Returns:
        ``{"hybrid": bytes, "mla_only": bytes, "kda_layer": bytes per KDA layer, "mla_layer": bytes per MLA
        layer}``.
    """
    H, K = config.kda_num_heads, config.kda_head_dim
    kda_layer = 3 * H * K * (config.short_conv_kernel_size - 1) * dtype_bytes + H * K * K * 4
    mla_layer = context * (config.kv_lora_rank + config.qk_rope_head_dim) * dtype_bytes
    n_mla = sum(1 for t in config.layer_types if t == "mla")
    n_linear = sum(1 for t in config.layer_types if t in LINEAR_TYPES)
    return {
        "hybrid": n_mla * mla_layer + n_linear * kda_layer,
        "mla_only": config.num_hidden_layers * mla_layer,
        "kda_layer": kda_layer,
        "mla_layer": mla_layer,
    }
