import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is imported: without CUDA the kernels run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kimi_linear.ops.triton_helpers import POISON_ENV  # noqa: E402  (imports triton)


@pytest.fixture(autouse=True)
def poison_buffers(monkeypatch):
    """Every kernel output buffer starts as NaN: an element a kernel leaves unwritten fails the comparison."""
    monkeypatch.setenv(POISON_ENV, "1")
