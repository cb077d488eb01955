"""How a mixer layer states its inference-cache layout: a tuple of ``CacheEntry``.

A mixer that can decode has a classmethod ``cache_layout(config, layer_idx) -> tuple[CacheEntry, ...]``.
``kimi_linear.cache`` allocates every entry from it; nothing else knows the shapes. An entry is one of:

* ``per="slot"``: fixed size per sequence, whatever its length (KDA conv tails and recurrent states). Stored
  as a pool ``[num_slots, *shape]``; a sequence owns one slot. Recurrent states (``recurrent=True``) are stored in
  the cache's ``state_dtype`` (fp32 by default, or bf16).
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
        dtype: a fixed dtype, or None for the model's dtype.
        recurrent: a recurrent state (KDA's ``[H, K, V]``): stored in the cache's ``state_dtype`` (fp32 unless
            the cache is asked for bf16), whatever the model's dtype; ``dtype`` must then be None.
    """

    name: str
    per: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None
    recurrent: bool = False

    def __post_init__(self):
        if self.per not in ("slot", "token"):
            raise ValueError(f"CacheEntry.per must be 'slot' or 'token', got {self.per!r}")
        if self.recurrent and self.dtype is not None:
            raise ValueError(f"CacheEntry {self.name!r}: a recurrent state takes the cache's state_dtype, not a "
                             f"fixed dtype ({self.dtype})")

    def storage_dtype(self, model_dtype: torch.dtype, state_dtype: torch.dtype = torch.float32) -> torch.dtype:
        """The dtype the cache stores this entry in."""
        if self.recurrent:
            return state_dtype
        return model_dtype if self.dtype is None else self.dtype

    def nbytes(self, model_dtype_bytes: int, state_dtype_bytes: int = 4) -> int:
        """Bytes of one slot (per="slot") or one token (per="token")."""
        n = 1
        for d in self.shape:
            n *= d
        if self.recurrent:
            size = state_dtype_bytes
        else:
            size = model_dtype_bytes if self.dtype is None else torch.empty((), dtype=self.dtype).element_size()
        return n * size
