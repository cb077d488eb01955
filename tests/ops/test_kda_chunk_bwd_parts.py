"""The chunk KDA backward's launch variants and block splits, against the token-by-token recurrence.

``tests/ops/test_kda_chunk_triton.py`` covers the default launch at K <= 32, where the state-gradient stage runs one
K block per chunk. Here: K above one K block (K = 96, a partial second block of the 64-column split), the intra-chunk
stage with and without its split over sub-blocks, and a narrower K block, each with every gradient checked on
NaN-poisoned buffers. Without CUDA the kernels run in Triton's interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kimi_linear.ops.kda.chunk_bwd as chunk_bwd  # noqa: E402
import kimi_linear.ops.kda.chunk_common as chunk_common  # noqa: E402
from tests.ops.test_kda_chunk_triton import DEVICE, check_fwd_bwd  # noqa: E402
from kimi_linear.ops.kda import chunk_kda  # noqa: E402
from tests.utils import kda_inputs, leaves, loss_of  # noqa: E402

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)


def test_two_k_blocks_varlen():
    """K = 96: two K blocks of the state-gradient stage, the second one partial; a chunk shorter than 64."""
    cu = torch.tensor([0, 70, 100], dtype=torch.int32)
    check_fwd_bwd(kda_inputs(1, 100, 1, 96, 48, N=2), cu_seqlens=cu.to(DEVICE))


@pytest.mark.parametrize("split", [False, True], ids=["intra-one-program", "intra-split"])
def test_intra_variants_and_narrow_k_block(monkeypatch, split):
    """Both launches of the intra-chunk stage, with the state-gradient stage in K blocks of 16 (K = 32: two)."""
    monkeypatch.setitem(chunk_bwd.BWD_CONFIG, "intra_split", split)
    monkeypatch.setitem(chunk_bwd.BWD_CONFIG, "inter_bk", 16)
    cu = torch.tensor([0, 5, 5, 90], dtype=torch.int32)
    check_fwd_bwd(kda_inputs(1, 90, 1, 32, 16, N=3), cu_seqlens=cu.to(DEVICE))


def _grads(x, **kwargs):
    xs = leaves({n: t.to(DEVICE) if t is not None else None for n, t in x.items()})
    o, state = chunk_kda(xs["q"], xs["k"], xs["v"], xs["g"], xs["beta"], initial_state=xs["initial_state"],
                         output_final_state=True, backend="triton", **kwargs)
    loss_of(o, state).backward()
    return {n: t.grad for n, t in xs.items() if t is not None}


@pytest.mark.parametrize("split", [False, True], ids=["intra-one-program", "intra-split"])
def test_intra_diag_dots(monkeypatch, split):
    """BWD_CONFIG["intra_diag_dots"]: the pairs inside a sub-block by small products where its decay range allows,
    element-wise where it does not. Every gradient against the recurrence with moderate gates, g = -1000 in some
    blocks (those take the element-wise branch) and a varlen cut; then, on moderate gates, the products really ran:
    the gradients are not bit-identical to the element-wise branch's (cap -1 forces it), though both are right."""
    monkeypatch.setitem(chunk_bwd.BWD_CONFIG, "intra_split", split)
    monkeypatch.setitem(chunk_bwd.BWD_CONFIG, "intra_diag_dots", True)
    cu = torch.tensor([0, 5, 90], dtype=torch.int32)
    x = kda_inputs(1, 90, 2, 32, 16, N=2)
    x["g"][:, 20, 0, :3] = -1000.0
    x["g"][:, 70, 1] = -1000.0
    check_fwd_bwd(x, cu_seqlens=cu.to(DEVICE))
    y = kda_inputs(1, 70, 1, 16, 16)
    dots = _grads(y)
    check_fwd_bwd(y)
    real_cap = chunk_bwd.chunk_kda_bwd_intra_kernel
    monkeypatch.setattr(chunk_bwd, "chunk_kda_bwd_intra_kernel", _with_cap(real_cap, -1.0))
    loops = _grads(y)
    assert any(not torch.equal(dots[n], loops[n]) for n in ("q", "k", "g", "beta"))


class _with_cap:
    """The intra kernel launched with a given DIAG_CAP (a negative one sends every block to the element-wise loops)."""

    def __init__(self, kernel, cap):
        self.kernel, self.cap = kernel, cap

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **{**kwargs, "DIAG_CAP": self.cap})
