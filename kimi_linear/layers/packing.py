"""Inference packing: the weights of several ``nn.Linear`` that read the same input become row blocks (views) of
one matrix, so a forward without autograd makes one matmul for all of them. At decode an M = 1 matmul of a small
matrix reads its weights at a fraction of the copy bandwidth, and one launch replaces several
(benchmarks/RESULTS.md, "Serving"). The parameters, their names and values stay as they are, and no memory is
added: each weight is the same ``Parameter`` object with its data now a view, so optimizers and hooks holding it
stay valid and in-place updates of a weight update the packed matrix. A weight replaced later (not updated in
place) undoes the packing: ``packed_weight`` then returns None and the layer computes the projections one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


@torch.no_grad()
def pack_linears(linears: Sequence[nn.Linear]) -> torch.Tensor | None:
    """Make the weights of ``linears`` row blocks of one new ``[ΣN, D]`` matrix, returned (None, and nothing
    changed, for sharded (DTensor) or otherwise wrapped weights)."""
    if any(type(m.weight.data) is not torch.Tensor for m in linears):
        return None
    packed = torch.cat([m.weight.detach() for m in linears])
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = packed[row : row + n]
        row += n
    return packed


def packed_weight(packed: torch.Tensor | None, linears: Sequence[nn.Linear]) -> torch.Tensor | None:
    """``packed`` while every weight of ``linears`` is still its row block, else None (host-side checks only)."""
    if packed is None or torch.compiler.is_compiling():  # Dynamo cannot trace storage pointers
        return packed
    base, row = packed.untyped_storage().data_ptr(), 0
    for m in linears:
        w = m.weight
        if (w.untyped_storage().data_ptr() != base or w.storage_offset() != row * packed.shape[1]
                or w.dtype != packed.dtype):
            return None
        row += w.shape[0]
    return packed


class PackedInputProjections:
    """Mixin of an ``nn.Module`` whose ``_input_projections()`` (a list of ``nn.Linear``) all read one input:
    ``pack_input_projections()`` packs them (``pack_linears``), ``_packed_weight()`` is the packed matrix while
    it still holds every weight (else None), and a cast or move of the module (``.to``, ``.half()``) packs the
    new weights again. The module's forward takes ``_forward_packed_weight()``: the packed matrix when autograd
    is off."""

    _packed_input: torch.Tensor | None = None

    def _input_projections(self) -> list[nn.Linear]:
        raise NotImplementedError

    def _apply(self, fn, *args, **kwargs):
        packed = self._packed_input is not None
        super()._apply(fn, *args, **kwargs)
        if packed:  # the cast gave each weight its own tensor: pack the new ones
            self.pack_input_projections()
        return self

    def pack_input_projections(self) -> None:
        """Pack the input projections' weights into one matrix, one matmul for all of them in forwards
        without autograd (with autograd they run one by one, as in training)."""
        self._packed_input = pack_linears(self._input_projections())

    def _packed_weight(self) -> torch.Tensor | None:
        """The packed matrix, while every input projection's weight is still its view."""
        return packed_weight(self._packed_input, self._input_projections())

    def _forward_packed_weight(self) -> torch.Tensor | None:
        """The packed matrix for this forward: None when autograd is on (training computes the projections one by
        one) or the packing was undone."""
        return None if torch.is_grad_enabled() else self._packed_weight()
