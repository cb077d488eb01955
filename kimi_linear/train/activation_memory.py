"""What a forward keeps for its backward: every saved tensor, by module and autograd node, in bytes.

``saved_activations(model, forward)`` runs ``forward()`` (which returns the tensor to differentiate, e.g. the
loss) under ``torch.autograd.graph.saved_tensors_hooks`` that note the module each tensor was saved in, then walks
the autograd graph from the result and reads every node's saved tensors (``_saved_*`` of the built-in nodes,
``saved_tensors`` of custom ``autograd.Function``\\s). A storage saved several times (one input read by several
projections) is counted once, for the first module that saved it; a saved view counts its whole storage (that is
what stays allocated); parameters are listed apart (they are not activations). Works on any device; the numbers
are exact byte counts of what the graph holds, not allocator statistics. Inside a ``torch.utils.checkpoint`` region
its own hooks take over: what that region keeps (its inputs) is not seen, so measure without activation
checkpointing (``layers.memory.recompute`` is an ordinary autograd Function and is counted).

``format_saved(report)`` prints a table per layer and per tensor (Markdown).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SavedTensor:
    """One saved storage: the module (qualified name) that saved it first, the node and field it was read from,
    shape and dtype of the saved tensor, the bytes of its whole storage, and what it is. Parameters and their
    autocast copies are listed but not counted as activations (``is_parameter``): their size does not grow with
    the tokens."""

    module: str
    node: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    kind: str = "activation"  # or "parameter", or "weight copy" (autocast's low-precision copy of a parameter)

    @property
    def is_parameter(self) -> bool:
        return self.kind != "activation"


@dataclass
class SavedReport:
    tensors: list[SavedTensor] = field(default_factory=list)

    def activation_bytes(self, prefix: str = "") -> int:
        """Bytes of saved activations (parameters excluded) of the modules under ``prefix``."""
        return sum(t.nbytes for t in self.tensors if not t.is_parameter and _under(t.module, prefix))

    def by_module(self, depth: int) -> dict[str, int]:
        """Activation bytes per module, names cut to ``depth`` dotted parts (``model.layers.3`` is depth 3)."""
        out: dict[str, int] = {}
        for t in self.tensors:
            if not t.is_parameter:
                key = ".".join(t.module.split(".")[:depth]) if t.module else "(top)"
                out[key] = out.get(key, 0) + t.nbytes
        return out


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


class _Packed:
    """What the pack hook stores in place of a tensor: the tensor and the module active when it was saved."""

    __slots__ = ("tensor", "module", "order", "kind")

    def __init__(self, tensor: torch.Tensor, module: str, order: int, kind: str):
        self.tensor, self.module, self.order, self.kind = tensor, module, order, kind


_active_stack: list[str] | None = None  # the module stack of the recording in progress, if any


@contextlib.contextmanager
def scope(name: str):
    """Inside ``saved_activations``: tensors saved in this block are attributed to ``<current module>.<name>``
    (e.g. the op call inside a layer); a no-op otherwise."""
    stack = _active_stack
    if stack is None:
        yield
        return
    stack.append(f"{stack[-1]}.{name}" if stack and stack[-1] else name)
    try:
        yield
    finally:
        stack.pop()


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr(), s.nbytes())


def saved_activations(model: nn.Module, forward: Callable[[], torch.Tensor]) -> SavedReport:
    """Run ``forward()`` (it must return a tensor with a grad_fn) and report what its graph saves.

    The graph is released before returning (no backward is run).
    """
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def enter(module, _args) -> None:
        stack.append(names[module])

    def leave(_module, _args, _out) -> None:
        stack.pop()

    for module in names:
        hooks.append(module.register_forward_pre_hook(enter))
        hooks.append(module.register_forward_hook(leave))
    # a saved tensor that is a view of a low-precision copy of a parameter (autocast's cast, as the matmul's
    # operand) is told by the view's base at pack time: the graph hands back the tensor without its base
    params = {_storage_key(p) for p in model.parameters()}
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for p in model.parameters():
        by_shape.setdefault(tuple(p.shape), []).append(p)

    def kind_of(t: torch.Tensor) -> str:
        if _storage_key(t) in params:
            return "parameter"
        base = t if t._base is None else t._base
        for p in by_shape.get(tuple(base.shape), ()):
            if p.dtype != base.dtype and torch.equal(base, p.detach().to(base.dtype)):
                return "weight copy"
        return "activation"

    counter = [0]
    unpacked: list[_Packed] = []

    def pack(t: torch.Tensor) -> _Packed:
        counter[0] += 1
        return _Packed(t, stack[-1] if stack else "", counter[0], kind_of(t))

    def unpack(p: _Packed) -> torch.Tensor:
        unpacked.append(p)
        return p.tensor

    global _active_stack
    _active_stack = stack
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = forward()
    finally:
        _active_stack = None
        for h in hooks:
            h.remove()
    if not isinstance(out, torch.Tensor) or out.grad_fn is None:
        raise ValueError("forward() must return a tensor that has a grad_fn")

    seen: dict[tuple, tuple[int, SavedTensor]] = {}
    visited, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        todo.extend(fn for fn, _ in node.next_functions)
        for attr in dir(node):
            if not (attr.startswith("_saved_") or attr == "saved_tensors"):
                continue
            unpacked.clear()
            try:
                value = getattr(node, attr)
            except RuntimeError:  # already freed, or not a tensor field
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            tensors = [v for v in values if isinstance(v, torch.Tensor)]
            records = list(unpacked)
            for i, t in enumerate(tensors):
                rec = records[i] if len(records) == len(tensors) else None
                if rec is None and t.dim() == 0:
                    continue  # a Python number autograd wrapped (saved without the hooks), not an activation
                key = _storage_key(t)
                order = rec.order if rec else 1 << 62
                entry = SavedTensor(
                    module=rec.module if rec else "?", node=f"{type(node).__name__}.{attr}",
                    shape=tuple(t.shape), dtype=t.dtype, nbytes=t.untyped_storage().nbytes(),
                    kind=rec.kind if rec else kind_of(t),
                )
                if key not in seen or order < seen[key][0]:
                    seen[key] = (order, entry)
    del out
    return SavedReport([e for _, e in sorted(seen.values(), key=lambda x: x[0])])


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def format_saved(report: SavedReport, prefix: str = "", per_tensor: bool = True, depth: int | None = None) -> str:
    """A Markdown table of the activations saved under ``prefix``: one row per tensor (module, node, shape,
    dtype, bytes) and the total; with ``depth``, one row per module cut at that depth instead."""
    rows = [t for t in report.tensors if not t.is_parameter and _under(t.module, prefix)]
    total = sum(t.nbytes for t in rows)
    copies = sum(t.nbytes for t in report.tensors if t.kind == "weight copy" and _under(t.module, prefix))
    if depth is not None:
        lines = ["| module | saved | share |", "|---|---|---|"]
        for name, n in report.by_module(depth).items():
            if _under(name, prefix):
                lines.append(f"| {name} | {_fmt_bytes(n)} | {100 * n / max(total, 1):.1f}% |")
        lines.append(f"| total | {_fmt_bytes(total)} | 100% |")
        return "\n".join(lines)
    lines = ["| module | saved by | shape | dtype | bytes |", "|---|---|---|---|---|"]
    if per_tensor:
        for t in rows:
            module = t.module[len(prefix) + 1:] if prefix else t.module
            lines.append(f"| {module or '(self)'} | {t.node} | {list(t.shape)} | {str(t.dtype).replace('torch.', '')} | "
                         f"{t.nbytes:,} |")
    lines.append(f"| total | | | | {total:,} |")
    if copies:
        lines.append(f"| (autocast weight copies, not counted) | | | | {copies:,} |")
    return "\n".join(lines)
