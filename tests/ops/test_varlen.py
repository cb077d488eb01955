"""Host copies of cu_seqlens (ops.varlen): registered values are used instead of reading the tensor back, and
any write to the tensor makes them stale. A meta tensor stands for a device tensor: it has no values, so a read
would raise."""

import pytest
import torch

from kimi_linear.ops.kda.chunk_common import layout_for
from kimi_linear.ops.varlen import host_values, known_host_values, remember_host_values


def test_remembered_values_are_used_without_reading_the_tensor():
    cu = torch.empty(4, dtype=torch.int32, device="meta")
    with pytest.raises((NotImplementedError, RuntimeError)):
        host_values(cu)  # nothing registered: it would have to read a tensor with no values
    remember_host_values(cu, [0, 3, 3, 10])
    assert host_values(cu) == (0, 3, 3, 10)


def test_a_write_makes_remembered_values_stale():
    cu = torch.empty(3, dtype=torch.int64, device="meta")
    remember_host_values(cu, [0, 1, 2])
    cu.add_(1)  # in place: the tensor's version moves on
    with pytest.raises((NotImplementedError, RuntimeError)):
        host_values(cu)


def test_cpu_tensors_are_read_directly():
    cu = torch.tensor([0, 2, 5])
    assert host_values(cu) == (0, 2, 5)
    cu[2] = 7
    assert host_values(cu) == (0, 2, 7)


def test_chunk_layout_of_varlen_and_fixed_batches():
    layout = layout_for(torch.tensor([0, 1, 65, 65, 200]), 1, 200, torch.device("cpu"))
    assert layout.N == 4 and layout.NT == 1 + 1 + 0 + 3
    assert layout.cu_seqlens.tolist() == [0, 1, 65, 65, 200]
    assert layout.chunk_offsets.tolist() == [0, 1, 2, 2, 5]
    assert layout.chunk_indices.tolist() == [[0, 0], [1, 0], [3, 0], [3, 1], [3, 2]]
    assert all(t.dtype == torch.int32 for t in (layout.cu_seqlens, layout.chunk_offsets, layout.chunk_indices))
    fixed = layout_for(None, 2, 100, torch.device("cpu"))
    assert fixed.cu_seqlens.tolist() == [0, 100, 200]
    assert fixed.chunk_indices.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert layout_for(None, 2, 100, torch.device("cpu")) is fixed  # one layout per shape, reused


def test_known_values_are_none_unless_registered_and_current():
    ids = torch.empty(1, 3, dtype=torch.long, device="meta")
    assert known_host_values(ids) is None  # not registered: the caller reads the tensor itself
    remember_host_values(ids, [5, 1, 9])
    assert known_host_values(ids) == (5, 1, 9)
    ids.add_(1)
    assert known_host_values(ids) is None
    assert known_host_values(torch.tensor([1, 2])) is None  # a CPU tensor is read directly, as before


def test_inference_mode_tensors_are_read_at_every_use():
    """Tensors made under torch.inference_mode have no version counter, so a write to them could not be seen:
    nothing is remembered for them, and they are read (a meta tensor cannot be: the read raises)."""
    with torch.inference_mode():
        cu = torch.empty(3, dtype=torch.int64, device="meta")
        remember_host_values(cu, [0, 1, 2])
        assert known_host_values(cu) is None
        with pytest.raises((NotImplementedError, RuntimeError)):
            host_values(cu)
