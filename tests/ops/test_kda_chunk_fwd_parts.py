"""The stages of the Triton chunk KDA forward, one intermediate at a time, against a float64 reference.

``chunk_fwd`` returns, besides the output, what the backward reads: G (chunk-local cumulative log-decay, fp32),
A_qk, T = (I + A)^-1 (fp32), W, U, scale q exp(G) and K exp(G_last - G). Each is checked here against its definition
(paper §3.1) computed per chunk in float64, so a fault points at the stage that made it (pairs, UT solve, WY) rather
than at the output; the end-to-end checks against the recurrence are in test_kda_chunk_triton.py. Without CUDA the
kernels run through Triton's interpreter, every buffer poisoned with NaN first (tests/ops/conftest.py).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from kimi_linear.ops.kda import chunk_pairs, chunk_wy
from kimi_linear.ops.kda.chunk_common import CHUNK, layout_for
from kimi_linear.ops.kda.chunk_fwd import chunk_fwd, fwd_launch
from tests.utils import kda_inputs, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

NAMES = ("G", "Aqk", "Tinv", "w", "u", "qg", "kd")


def reference_parts(q, k, v, g, beta, scale, bounds):
    """The forward's intermediates by their definitions, chunk by chunk, in float64.

    q, k ``[TT, H, K]``, v ``[TT, H, V]``, g ``[TT, H, K]``, beta ``[TT, H]`` packed; ``bounds`` the sequence
    boundaries. Returns a dict of ``[TT, H, *]`` tensors (the matrices ``[TT, H, CHUNK]``, one row per token).
    """
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    TT, H, K = q.shape
    out = {n: torch.zeros(TT, H, CHUNK if n in ("Aqk", "Tinv") else (v.shape[-1] if n == "u" else K),
                          dtype=torch.float64) for n in NAMES}
    for s, e in zip(bounds, bounds[1:]):
        for c in range(s, e, CHUNK):
            n = min(CHUNK, e - c)
            sl = slice(c, c + n)
            qc, kc, vc, bc = (x[sl].transpose(0, 1) for x in (q, k, v, beta))  # [H, n, *]
            G = g[sl].transpose(0, 1).cumsum(1)  # [H, n, K]
            diff = G[:, :, None, :] - G[:, None, :, :]  # [H, t, j, K]
            lower = torch.ones(n, n, dtype=torch.bool).tril()
            decay = torch.where(lower[None, :, :, None], diff, -torch.inf).exp()  # exp(G_t - G_j), j <= t
            Aqk = scale * torch.einsum("htc,hjc,htjc->htj", qc, kc, decay)
            A = bc[..., None] * torch.einsum("htc,hjc,htjc->htj", kc, kc, decay).tril(-1)
            T = torch.linalg.inv(torch.eye(n, dtype=torch.float64) + A)
            parts = {
                "G": G,
                "Aqk": Aqk,
                "Tinv": T,
                "w": T @ (bc[..., None] * kc * G.exp()),
                "u": T @ (bc[..., None] * vc),
                "qg": scale * qc * G.exp(),
                "kd": kc * (G[:, -1:] - G).exp(),
            }
            for name, x in parts.items():
                x = x.transpose(0, 1)  # [n, H, *]
                if name in ("Aqk", "Tinv"):
                    x = torch.nn.functional.pad(x, (0, CHUNK - n))
                out[name][sl] = x
    return out


def _packed(x, cu_seqlens=None):
    B, T, H, K = x["q"].shape
    q, k, v = (x[n].reshape(B * T, H, -1).contiguous().to(DEVICE) for n in ("q", "k", "v"))
    g = x["g"].float().reshape(B * T, H, K).contiguous().to(DEVICE)
    beta = x["beta"].reshape(B * T, H).contiguous().to(DEVICE)
    layout = layout_for(None if cu_seqlens is None else cu_seqlens.to(DEVICE), B, T, q.device)
    return (q, k, v, g, beta), layout


def definitions_of(x, scale):
    """The float64 intermediates of ``x`` (equal-length sequences) without running the kernels."""
    (q, k, v, g, beta), layout = _packed(x)
    return reference_parts(q.cpu(), k.cpu(), v.cpu(), g.cpu(), beta.cpu(), scale, layout.cu_seqlens.tolist())


def assert_remade(name, remade, kept):
    """What the backward makes again against what the forward made. Under the interpreter every sum runs in one
    order, so the two must be equal bit for bit. Compiled, the order of G's cumulative sum follows the register
    layout the compiler picks for each kernel variant (the backward's also loads the 16-bit q and k), so there G
    may differ by the rounding of a sum of CHUNK terms, and what is made from it by one rounding of its dtype."""
    if DEVICE == "cpu":
        assert torch.equal(remade, kept), f"the backward's {name} is not the forward's"
        return
    eps = torch.finfo(kept.dtype).eps
    if kept.dtype == torch.float32:
        bound = CHUNK * eps * kept.abs().max().item()
        assert (remade - kept).abs().max().item() <= bound, f"the backward's {name} is not the forward's"
    else:
        assert rel_err(remade, kept) <= eps, f"the backward's {name} is not the forward's"


def run_parts(x, scale, cu_seqlens=None, launch=None):
    (q, k, v, g, beta), layout = _packed(x, cu_seqlens)
    launch = launch or fwd_launch(q.shape[-1], v.shape[-1], q.dtype)
    _, _, saved = chunk_fwd(q, k, v, g, beta, scale, None, False, layout, launch)
    # the backward's recomputation of the element-wise parts gives the forward's
    recomputed = chunk_pairs.decay_operands(q, k, g, scale, layout, launch)
    for name, t in zip(("G", "qg", "kd"), recomputed):
        assert_remade(name, t, saved[NAMES.index(name)])
    # and so does its WY stage on the fp32 T the forward keeps (the forward's own ran on the solve's rounded copy)
    remade = chunk_wy.wy_factors(k, v, beta, recomputed[0], saved[NAMES.index("Tinv")], layout, launch)
    for name, t in zip(("w", "u"), remade):
        assert_remade(name, t, saved[NAMES.index(name)])
    bounds = layout.cu_seqlens.tolist()
    want = reference_parts(q.cpu(), k.cpu(), v.cpu(), g.cpu(), beta.cpu(), scale, bounds)
    got = dict(zip(NAMES, (t.cpu() for t in saved)))
    assert got["G"].dtype == torch.float32 and got["Tinv"].dtype == torch.float32
    assert all(got[n].dtype == q.dtype for n in ("Aqk", "w", "u", "qg", "kd"))
    return got, want


CASES = [  # B, T, H, K, V
    (1, 64, 1, 16, 16),
    (2, 63, 2, 32, 16),
    (1, 130, 1, 48, 80),
    (1, 1, 1, 16, 32),
]


@pytest.mark.parametrize("B,T,H,K,V", CASES, ids=[f"B{b}-T{t}-H{h}-K{k}-V{v}" for b, t, h, k, v in CASES])
def test_parts_match_definitions_fp32(B, T, H, K, V):
    x = kda_inputs(B, T, H, K, V, with_state=False)
    got, want = run_parts(x, 0.3)
    for n in NAMES:
        assert rel_err(got[n], want[n]) < 2e-5, n


def test_parts_over_several_k_slices():
    """The off-diagonal kernel walks K in slices (one slice at K <= 64 by default): 16 columns per slice at K = 48
    gives four (the last one past K, masked), the decay references and the unsafe-block range carried across them;
    the cumsum and WY kernels then take several column blocks too."""
    x = kda_inputs(1, 130, 2, 48, 16, with_state=False)
    x["g"][:, 20, 1, 40] = -100.0  # a flagged block whose range comes from the last slice
    launch = dataclasses.replace(fwd_launch(48, 16, torch.float32), offdiag_bks=16, cumsum_block=16, wy_block=16)
    got, want = run_parts(x, 0.3, launch=launch)
    for n in NAMES:
        assert rel_err(got[n], want[n]) < 5e-5, n


def test_parts_varlen_and_extreme_gates():
    """Packed sequences (one empty, one of a single token, chunks cut short) and g = -1000 inside sub-blocks, at
    sub-block starts and across a chunk: every exponential stays finite and the wiped pairs are exact zeros."""
    cu = torch.tensor([0, 0, 1, 70, 100], dtype=torch.int32)
    x = kda_inputs(1, 100, 2, 32, 16, N=4, with_state=False)
    g = x["g"]
    g[:, 5] = -1000.0
    g[:, 16, :, :8] = -1000.0
    g[:, 40:42, 1] = -1000.0
    g[:, 65] = -1000.0
    got, want = run_parts(x, 0.25, cu)
    for n in NAMES:
        # G reaches ~-2000; fp32 resolves differences of G to ~2^-24 |G| (see decay_tol in test_kda_chunk_triton)
        assert rel_err(got[n], want[n]) < 5e-4, n
    # the sequence at packed rows 1..69 starts a chunk at row 1; g = -1000 at packed row 5 (chunk row 4) cuts every
    # pair (t >= 4, j < 4) of that chunk: exact zeros in A_qk and in T
    for n in ("Aqk", "Tinv"):
        assert got[n][5:65, :, :4].eq(0).all(), n


class _NoLaunch:
    """Stands in for the element-wise diagonal kernel: launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_diag_dots_fast_path_and_fallback(monkeypatch):
    """The diagonal blocks come from the off-diagonal kernel's dots, the element-wise kernel only recomputes the
    blocks whose decay range passes the cap. Steep gates just under the cap (-3.8 per step: a range of 57 < 60 over
    a block's fifteen steps) are right with the element-wise kernel switched off, so the dots did them; one gate of
    -100 flags its block, which is then wrong without the element-wise kernel and right with it."""
    x = kda_inputs(1, 130, 2, 32, 16, with_state=False)
    x["g"][:, :, 0, :4] = -3.8
    with monkeypatch.context() as m:
        m.setattr(chunk_pairs, "chunk_kda_fwd_diag_token_kernel", _NoLaunch())
        got, want = run_parts(x, 0.3)
        for n in NAMES:
            # G reaches ~-250 in the steep channels; fp32 resolves its differences to ~2^-24 |G|
            assert rel_err(got[n], want[n]) < 5e-5, n
        x["g"][:, 20, 1, 7] = -100.0  # chunk 0, block 1, head 1: range > 60
        got, want = run_parts(x, 0.3)
        assert rel_err(got["Aqk"][16:32, 1], want["Aqk"][16:32, 1]) > 1e-2
        assert rel_err(got["Aqk"][:16], want["Aqk"][:16]) < 5e-5  # the blocks not flagged stay right
    got, want = run_parts(x, 0.3)
    for n in NAMES:
        assert rel_err(got[n], want[n]) < 5e-5, n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_parts_half_inputs(dtype):
    """16-bit q, k, v, beta (g stays fp32): each intermediate within a small multiple of the inputs' own rounding,
    measured as the error of the float64 definitions fed the rounded inputs against the unrounded ones."""
    x32 = kda_inputs(1, 100, 2, 64, 32, with_state=False)
    x16 = {n: (t if t is None or n == "g" else t.to(dtype)) for n, t in x32.items()}
    got, want_lowp = run_parts(x16, 0.125)
    exact = definitions_of(x32, 0.125)
    for n in NAMES:
        e_kernel = rel_err(got[n], exact[n])
        e_inputs = rel_err(want_lowp[n], exact[n])
        eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # the unit roundoff of storing the result
        assert e_kernel <= 2 * e_inputs + eps, f"{n}: {e_kernel:.2e} vs inputs' {e_inputs:.2e}"
