"""The chunk KDA backward's K-block splits, against the token-by-token recurrence.

``tests/ops/test_kda_chunk_triton.py`` covers the default launch at K <= 32, where the state-gradient stage runs one
K block per chunk. Here: K above one K block (K = 96, a partial second block of the 64-column split) and a narrower K
block, each with every gradient checked on NaN-poisoned buffers. Without CUDA the kernels run in Triton's interpreter.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kimi_linear.ops.kda.chunk_bwd as chunk_bwd  # noqa: E402
from tests.ops.test_kda_chunk_triton import DEVICE, check_fwd_bwd  # noqa: E402
from kimi_linear.ops.kda.chunk_common import _Layout  # noqa: E402
from kimi_linear.ops.kda.chunk_fwd import chunk_fwd  # noqa: E402
from tests.utils import kda_inputs, rel_err  # noqa: E402

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)


def test_two_k_blocks_varlen():
    """K = 96: two K blocks of the state-gradient stage, the second one partial; a chunk shorter than 64."""
    cu = torch.tensor([0, 70, 100], dtype=torch.int32)
    check_fwd_bwd(kda_inputs(1, 100, 1, 96, 48, N=2), cu_seqlens=cu.to(DEVICE))


def test_narrow_k_block():
    """The state-gradient stage in K blocks of 16 (K = 32: two), through ``dataclasses.replace`` of the shipped
    launch: every gradient equals the shipped launch's (checked against the recurrence elsewhere) to fp32 rounding."""
    cu = torch.tensor([0, 5, 5, 90], dtype=torch.int32, device=DEVICE)
    x = {n: t.to(DEVICE) for n, t in kda_inputs(1, 90, 1, 32, 16, N=3).items()}
    q, k, v, g = (x[n][0].contiguous() for n in ("q", "k", "v", "g"))
    beta, h0 = x["beta"][0].contiguous(), x["initial_state"]
    layout = _Layout(cu, 1, 90, q.device)
    o, ht, saved = chunk_fwd(q, k, v, g, beta, 0.3, h0, True, layout)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    want = chunk_bwd.chunk_bwd(q, k, v, beta, saved, 0.3, h0, do, dht, layout)
    launch = dataclasses.replace(chunk_bwd.bwd_launch(32, 16, torch.float32), inter_bk=16)
    got = chunk_bwd.chunk_bwd(q, k, v, beta, saved, 0.3, h0, do, dht, layout, launch)
    for a, b in zip(got, want):
        assert rel_err(a.cpu(), b.cpu()) < 1e-5
