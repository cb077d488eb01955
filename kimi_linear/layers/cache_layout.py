"""How a mixer layer states its inference-cache layout: a tuple of ``CacheEntry``.

A mixer that can decode has a classmethod ``cache_layout(config, layer_idx) -> tuple[CacheEntry, ...]``.
``kimi_linear.cache`` allocates every entry from it; nothing else knows the shapes. An entry is one of:

* ``per="slot"``: fixed size per sequence, whatever its length (KDA conv tails and recurrent states). Stored
  as a pool ``[num_slots, *shape]``; a sequence owns one slot.
* ``per="token"``: one row per cached token (the MLA latents). Stored paged, ``[num_blocks, block_size,
  *shape]``; a sequence owns a list of blocks (its block-table row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheEntry:
    """One cache tensor of a layer.

    Attributes:
        name: key in the layer's cache dict (e.g. "state", "latent").
        per: "slot" (fixed per sequence) or "token" (one row per cached token).
        shape: the trailing shape of one slot / one token.
        dtype: a fixed dtype (KDA states are fp32), or None for the model's dtype.
    """

    name: str
    per: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.per not in ("slot", "token"):
            raise ValueError(f"CacheEntry.per must be 'slot' or 'token', got {self.per!r}")

    def nbytes(self, model_dtype_bytes: int) -> int:
        """Bytes of one slot (per="slot") or one token (per="token")."""
        n = 1
        for d in self.shape:
            n *= d
        size = model_dtype_bytes if self.dtype is None else torch.empty((), dtype=self.dtype).element_size()
        return n * size
