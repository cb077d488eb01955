"""The saved-activation census: exact bytes, one count per storage, parameters and autocast copies apart, scopes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kimi_linear.train.activation_memory import format_saved, saved_activations, scope


class TwoHeads(nn.Module):
    """x is read by two Linears (one storage saved twice), then tanh keeps its output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 6, bias=False)
        self.b = nn.Linear(8, 6, bias=False)

    def forward(self, x):
        with scope("act"):
            y = torch.tanh(self.a(x))
        return (y * self.b(x)).sum()


def test_counts_each_storage_once_for_the_first_module_and_skips_parameters():
    torch.manual_seed(0)
    model = TwoHeads()
    x = torch.randn(5, 8, requires_grad=True)  # the matmuls then keep their weights too (for dx)
    report = saved_activations(model, lambda: model(x))
    by_module = {t.module: t for t in report.tensors if not t.is_parameter}
    # a saves x (5 x 8), act the tanh output y (5 x 6); the product keeps y again (counted once) and b(x);
    # b's x is a's
    assert report.activation_bytes() == 4 * (5 * 8 + 2 * 5 * 6)
    assert by_module["a"].shape == (5, 8) and report.activation_bytes("act") == 4 * 5 * 6
    assert report.activation_bytes("b") == 0
    assert {t.kind for t in report.tensors if t.is_parameter} == {"parameter"}
    table = format_saved(report)
    assert table.splitlines()[-1] == f"| total | | | | {report.activation_bytes():,} |"


def test_autocast_weight_copies_are_told_apart():
    model = TwoHeads()
    x = torch.randn(5, 8, requires_grad=True)  # so the matmuls keep their (bf16) weights for dx
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = saved_activations(model, lambda: model(x))
    copies = [t for t in report.tensors if t.kind == "weight copy"]
    assert len(copies) == 2 and all(t.nbytes == 2 * 6 * 8 for t in copies)
    assert "autocast weight copies" in format_saved(report)


def test_needs_a_differentiable_result():
    model = TwoHeads()
    with pytest.raises(ValueError, match="grad_fn"):
        saved_activations(model, lambda: torch.zeros(()))
