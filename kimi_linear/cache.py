"""Inference state of the hybrid model, allocated in one place from the layers' own layouts.

Each mixer that can decode states its cache as ``cache_layout(config, layer_idx)`` (``layers.cache_layout``):

* KDA / GDN layer: ``conv`` ``[3·H·K, W-1]`` (the last W-1 inputs of the q, k, v short convolutions, model
  dtype) and ``state`` ``[H, K, V]`` in the cache's ``state_dtype``, per sequence ("slot" entries, fixed size
  whatever the length).
* MLA layer: ``latent`` ``[kv_lora_rank]`` and ``k_pe`` ``[qk_rope_head_dim]`` per token ("token" entries).

Storage. Slot entries are pools ``[num_slots, *shape]``; token entries are paged, ``[num_blocks, block_size,
*shape]``. The rows of a forward (the N sequences it extends) are described by three tensors on the device:

* ``slots [N]`` long — the pool slot of each row (KDA conv tails and states),
* ``block_table [N, blocks_per_row]`` long — the MLA blocks of each row, in order: token p of row n lives in
  block ``block_table[n, p // block_size]`` at offset ``p % block_size``,
* ``lengths [N]`` long — tokens each row holds; the model advances it after every forward.

``KimiLinearCache(config, batch_size, max_length)`` is the dense special case used by ``generate``: one slot
and one block of ``max_length`` tokens per row (``slots = arange(N)``, ``block_table = arange(N)[:, None]``),
so ``layers[i]["latent"]`` is ``[N, max_length, r]``. The serving engine allocates pools with
``KimiLinearCache.pooled`` and runs each step on a ``view`` whose rows are the running sequences.

State dtype. ``state_dtype`` (``STATE_DTYPES``) is float32 by default; bfloat16 halves the KDA state bytes, which
dominate a decode step's memory traffic at large batch. The kernels read a bf16 state widened to fp32, compute in
fp32 and store the new state rounded to nearest bf16 (once per decode step, once per prefill forward), so the
model runs the fp32 recurrence with its state rounded to bf16 between forwards; benchmarks/RESULTS.md ("Decode")
has the measured effect on the logits.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers import mixer_class
from kimi_linear.layers.cache_layout import CacheEntry
from kimi_linear.layers.mla import MultiheadLatentAttention

LINEAR_TYPES = ("kda", "gdn")
STATE_DTYPES = (torch.float32, torch.bfloat16)  # what a cache may store the KDA recurrent states in


@dataclass(frozen=True)
class StateSnapshots:
    """Points inside a packed prefill (``cu_seqlens``) where the KDA layers also copy out their state, for the
    serving engine's prefix cache: point p is ``tokens[p]`` tokens into the forward (a position on a 64-token
    chunk boundary of its sequence, past the sequence's start), the state entering chunk ``chunks[p]`` (counted
    over all sequences, in order). Each KDA layer writes the recurrent state there and the conv tail (the
    W - 1 conv inputs before it) to pool slot ``slots[p]``. All three are long ``[P]`` on the cache's device."""

    chunks: torch.Tensor
    tokens: torch.Tensor
    slots: torch.Tensor


def check_state_dtype(state_dtype) -> torch.dtype:
    """``state_dtype`` if it is one of ``STATE_DTYPES``; raises ValueError naming it otherwise."""
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16 (the KDA recurrent states), got "
                         f"{state_dtype!r}")
    return state_dtype


def layer_cache_layout(config: KimiLinearConfig, layer_idx: int) -> tuple[CacheEntry, ...]:
    """The cache entries of layer ``layer_idx``, as its mixer class states them.

    Raises:
        ValueError: the layer's mixer keeps no decode cache (it cannot decode).
    """
    cls = mixer_class(config.layer_types[layer_idx])
    if not hasattr(cls, "cache_layout"):
        raise ValueError(
            f"layer {layer_idx} ({config.layer_types[layer_idx]!r}, {cls.__name__}) has no cache_layout(); "
            "it cannot decode"
        )
    return cls.cache_layout(config, layer_idx)


class KimiLinearCache:
    """Preallocated cache for ``batch_size`` sequences of up to ``max_length`` tokens (dense layout).

    Args:
        config: the model's config.
        batch_size: number of rows N (>= 1).
        max_length: tokens per row the MLA layers can hold (>= 1).
        dtype: dtype of the conv tails and MLA latents (the model's).
        device: where to allocate.
        state_dtype: dtype of the KDA recurrent states, float32 (default) or bfloat16 (see the module docstring).

    Attributes:
        layers: one dict per layer, entry name -> pool tensor (see the module docstring).
        slot_groups: of a ``pooled`` cache (empty for the dense one), the slot pools as allocated: one tensor
            ``[layers, num_slots, *shape]`` per entry name (and shape and dtype), of which the layers' slot pools
            are views; a slot is zeroed or copied in every layer by one indexed op on each. Such a cache is for
            forwards without autograd (the serving engine's).
        slots, block_table, lengths: the rows (see the module docstring).
        block_size, num_slots, num_blocks: the pool geometry.
        dtype, state_dtype: as given.

    Raises:
        ValueError: batch_size or max_length < 1, max_length beyond config.model_max_length, a state_dtype outside
            ``STATE_DTYPES``, or a layer that cannot decode.
    """

    def __init__(
        self,
        config: KimiLinearConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        state_dtype: torch.dtype = torch.float32,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        if max_length > config.model_max_length:
            raise ValueError(
                f"max_length={max_length} exceeds the model's model_max_length={config.model_max_length}"
            )
        self._allocate(config, batch_size, batch_size, max_length, dtype, device, state_dtype, group_slots=False)
        rows = torch.arange(batch_size, dtype=torch.long, device=self.device)
        with torch.inference_mode(False):  # a normal tensor even under inference_mode: it keeps a version counter
            lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._set_rows(rows, rows[:, None].clone(), lengths)
        # Row i is slot i: the KDA layers update the pools in place without gathering.
        self.identity_rows = True

    @classmethod
    def pooled(
        cls,
        config: KimiLinearConfig,
        num_slots: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        state_dtype: torch.dtype = torch.float32,
    ) -> KimiLinearCache:
        """Pools for a serving engine: ``num_slots`` KDA slots, ``num_blocks`` MLA blocks of ``block_size``
        tokens, and no rows yet (run forwards on ``view``s). ``dtype``, ``device`` and ``state_dtype`` as for the
        dense cache.

        Raises:
            ValueError: a size < 1, a state_dtype outside ``STATE_DTYPES``, or a layer that cannot decode.
        """
        for name, v in (("num_slots", num_slots), ("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        cache = cls.__new__(cls)
        cache._allocate(config, num_slots, num_blocks, block_size, dtype, device, state_dtype, group_slots=True)
        empty = torch.zeros(0, dtype=torch.long, device=cache.device)
        cache._set_rows(empty, empty[:, None], empty)
        cache.identity_rows = False
        return cache

    def _allocate(self, config, num_slots, num_blocks, block_size, dtype, device, state_dtype, group_slots) -> None:
        self.config = config
        self.dtype = dtype
        self.state_dtype = check_state_dtype(state_dtype)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_slots, self.num_blocks, self.block_size = num_slots, num_blocks, block_size
        self.layers: list[dict[str, torch.Tensor]] = [{} for _ in range(config.num_hidden_layers)]
        # Pooled: slot entries of one name, shape and dtype are one tensor [layers, num_slots, ...] and each
        # layer's pool a view of it, so a slot of every layer is zeroed or copied in one indexed op per group.
        # Dense: one tensor per layer, so a forward with autograd on may write its states into them (in-place
        # writes into views of one shared base would join the layers in one autograd history).
        groups: dict[tuple, list[int]] = {}
        for i in range(config.num_hidden_layers):
            for e in layer_cache_layout(config, i):
                storage = e.storage_dtype(dtype, state_dtype)
                if e.per == "slot":
                    groups.setdefault((e.name, tuple(e.shape), storage), []).append(i)
                else:
                    self.layers[i][e.name] = torch.zeros(num_blocks, block_size, *e.shape, dtype=storage,
                                                         device=self.device)
        self.slot_groups: list[torch.Tensor] = []
        for (name, shape, storage), layer_ids in groups.items():
            if group_slots:
                stack = torch.zeros(len(layer_ids), num_slots, *shape, dtype=storage, device=self.device)
                self.slot_groups.append(stack)
            for j, i in enumerate(layer_ids):
                self.layers[i][name] = (stack[j] if group_slots else
                                        torch.zeros(num_slots, *shape, dtype=storage, device=self.device))

    snapshots: StateSnapshots | None = None  # set on a prefill's view by ``view(..., snapshots=)``
    new_tokens: torch.Tensor | None = None  # set by piece_view: real tokens per row of a padded piece

    def _set_rows(self, slots: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor) -> None:
        self.slots = slots
        self.block_table = block_table
        self.lengths = lengths

    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths

    @lengths.setter
    def lengths(self, value: torch.Tensor) -> None:
        self._lengths = value
        self._host_lengths = None

    def host_lengths(self) -> list[int]:
        """``lengths`` as a Python list. Read from the device once and reused until ``lengths`` is replaced
        or changed in place (its version counter moves), so the layers of one forward sync once in all. A
        ``lengths`` made under ``torch.inference_mode`` has no version counter: it is read at every call."""
        if self._lengths.is_inference():
            return self._lengths.tolist()
        key = (id(self._lengths), self._lengths._version)
        if self._host_lengths is None or self._host_key != key:
            self._host_lengths, self._host_key = self._lengths.tolist(), key
        return self._host_lengths

    def set_host_lengths(self, values: list[int]) -> None:
        """Declare the values ``lengths`` holds now (a caller that knows them saves the device read)."""
        if not self._lengths.is_inference():
            self._host_lengths = list(values)
            self._host_key = (id(self._lengths), self._lengths._version)

    @property
    def batch_size(self) -> int:
        """Rows N of the forwards this cache (view) takes."""
        return self.slots.numel()

    @property
    def max_length(self) -> int:
        """Tokens each row can hold: its block-table width times the block size."""
        return self.block_table.shape[1] * self.block_size

    def view(self, slots: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor,
             snapshots: StateSnapshots | None = None) -> KimiLinearCache:
        """A cache over the same pools whose rows are ``slots [N]``, ``block_table [N, M]``, ``lengths [N]``
        (long tensors on the cache's device, used as given, not copied). ``snapshots``: for a packed prefill,
        where its KDA layers also store their states (``StateSnapshots``).

        Raises:
            ValueError: shapes that do not agree.
        """
        N = slots.numel()
        if slots.shape != (N,) or lengths.shape != (N,) or block_table.dim() != 2 or block_table.shape[0] != N:
            raise ValueError(
                f"slots [N], block_table [N, M] and lengths [N] must agree; got {tuple(slots.shape)}, "
                f"{tuple(block_table.shape)}, {tuple(lengths.shape)}"
            )
        out = copy.copy(self)
        out._set_rows(slots, block_table, lengths)
        out.identity_rows = False
        out.snapshots = snapshots
        return out

    def piece_view(self, slots: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor,
                   new_tokens: torch.Tensor) -> KimiLinearCache:
        """``view`` for a forward of ``T`` tokens per row of which the first ``new_tokens [N]`` are real and the
        rest right padding (a prefill piece padded to a fixed size): the layers then read no host values and
        launch the same kernels whatever the lengths, so the forward can be captured in a CUDA graph and replayed
        for other pieces. Padding changes no state: KDA takes it with g = 0 and beta = 0 and its conv tail is
        gathered at each row's real end; MLA writes no latent for it. A row with ``new_tokens`` 0 must be a
        scratch row (its slot and blocks are written)."""
        out = self.view(slots, block_table, lengths)
        if new_tokens.shape != lengths.shape:
            raise ValueError(f"new_tokens must be [N] like lengths, got {tuple(new_tokens.shape)}")
        out.new_tokens = new_tokens
        return out

    def reset(self) -> None:
        """Empty the cache (zeros everywhere, lengths 0) without reallocating."""
        self.lengths.zero_()
        for entry in self.layers:
            for t in entry.values():
                t.zero_()

    def nbytes(self) -> int:
        """Bytes held by the cache pools."""
        return sum(t.numel() * t.element_size() for entry in self.layers for t in entry.values())


def cache_bytes(config: KimiLinearConfig, dtype_bytes: int = 2, state_dtype_bytes: int = 4) -> tuple[int, int]:
    """(bytes per sequence slot, bytes per cached token) of the whole model, summed over its layers
    (``state_dtype_bytes``: 4 for fp32 KDA states, 2 for bf16)."""
    slot = token = 0
    for i in range(config.num_hidden_layers):
        for e in layer_cache_layout(config, i):
            if e.per == "slot":
                slot += e.nbytes(dtype_bytes, state_dtype_bytes)
            else:
                token += e.nbytes(dtype_bytes, state_dtype_bytes)
    return slot, token


def cache_bytes_per_sequence(config: KimiLinearConfig, context: int, dtype_bytes: int = 2,
                             state_dtype_bytes: int = 4) -> dict[str, int]:
    """Cache bytes of one sequence at ``context`` tokens, and of an MLA-only model of the same shape.

    Loops over the layers' own cache layouts (KDA: conv tails in dtype and a K×V state per head in
    ``state_dtype_bytes`` each, fixed; MLA: r + dr values per token).

    Returns:
        ``{"hybrid": bytes, "mla_only": bytes, "kda_layer": bytes per KDA layer, "mla_layer": bytes per MLA
        layer}``.
    """
    per_layer = []
    for i in range(config.num_hidden_layers):
        slot = token = 0
        for e in layer_cache_layout(config, i):
            if e.per == "slot":
                slot += e.nbytes(dtype_bytes, state_dtype_bytes)
            else:
                token += e.nbytes(dtype_bytes, state_dtype_bytes)
        per_layer.append(slot + context * token)
    mla = sum(e.nbytes(dtype_bytes) for e in MultiheadLatentAttention.cache_layout(config, 0)) * context
    linear = [b for b, t in zip(per_layer, config.layer_types, strict=True) if t in LINEAR_TYPES]
    return {
        "hybrid": sum(per_layer),
        "mla_only": config.num_hidden_layers * mla,
        "kda_layer": linear[0] if linear else 0,
        "mla_layer": mla,
    }
