"""Host copies of ``cu_seqlens``: read back from the device once per tensor, not once per op.

A packed (varlen) forward passes the same ``cu_seqlens`` to every layer, and several ops need its values on the
host (chunk layouts, validation, per-sequence attention). Each read of a CUDA tensor waits for the GPU to finish
everything queued before it, so the host stops launching while the GPU drains: host and GPU time add up instead of
overlapping. ``host_values`` reads a tensor once and keeps the values while the tensor lives and is not written
to; a caller that built ``cu_seqlens`` from host values registers them with ``remember_host_values`` and no op
reads it back at all. Tensors made under ``torch.inference_mode`` have no version counter, so a write to them
cannot be seen: they are read back at every use instead (build ``cu_seqlens`` under ``torch.no_grad`` to keep one
read).
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

_HOST: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> (its _version when read, its values)


def host_values(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s values as a tuple of ints (1-D integer tensor), read from the device at most once per version."""
    if t.device.type == "cpu" or torch.compiler.is_compiling():
        return tuple(t.tolist())
    values = known_host_values(t)
    if values is None:
        values = tuple(t.tolist())
        if not t.is_inference():
            _HOST[t] = (t._version, values)
    return values


def sequence_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    """The packed sequences' lengths, from ``cu_seqlens``'s host values (``host_values``)."""
    c = host_values(cu_seqlens)
    return [b - a for a, b in zip(c[:-1], c[1:])]


def remember_host_values(t: torch.Tensor, values) -> None:
    """Record that device tensor ``t`` holds ``values`` (the host list of ints it was copied from, flattened), so
    ``host_values`` and ``known_host_values`` never read it back."""
    if t.device.type != "cpu" and not t.is_inference():
        _HOST[t] = (t._version, tuple(values))


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU tensor ``t`` on ``device``; through pinned memory on CUDA, so the copy does not wait for the stream to
    drain (a copy from pageable memory does, and the GPU idles while the host launches the next kernels)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def known_host_values(t: torch.Tensor) -> tuple[int, ...] | None:
    """The values registered for device tensor ``t`` (flattened) if they are still current, else None: for
    checks that may skip a device read when the caller knows the values, and read otherwise."""
    if t.device.type == "cpu" or torch.compiler.is_compiling() or t.is_inference():
        return None
    known = _HOST.get(t)
    return known[1] if known is not None and known[0] == t._version else None
