"""The per-chunk stages of the Triton chunk KDA forward, one intermediate at a time, against a float64 reference.

``chunk_fwd`` returns, besides the output, what the backward reads: G (chunk-local cumulative log-decay, fp32),
A_qk, T = (I + A)^-1 (fp32), W, U, scale q exp(G) and K exp(G_last - G). Each is checked here against its definition
(paper §3.1) computed per chunk in float64, so a fault points at the stage that made it rather than at the output.
Without CUDA the kernels run through Triton's interpreter; every buffer is poisoned with NaN first. Every case runs
for each way of building G and the pair matrices (``FWD_CONFIG["pairs_impl"]``: "subblock", one kernel per
sub-block; "chunk", a cumsum kernel, a diagonal-block kernel and an off-diagonal kernel per chunk, also with the
cumsum fused into the off-diagonal kernel; "fused", one kernel per chunk for the pair matrices, the UT transform and
the WY factors), and the "chunk" and "fused" ways also end to end (forward and every gradient)
against the token-by-token recurrence.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kimi_linear.ops.kda.chunk_common as chunk_common  # noqa: E402
from kimi_linear.ops.kda.chunk_common import CHUNK, _Layout  # noqa: E402
from kimi_linear.ops.kda.chunk_fwd import FWD_CONFIG, chunk_fwd  # noqa: E402
from tests.ops.test_kda_chunk_triton import check_fwd_bwd  # noqa: E402
from tests.utils import kda_inputs, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

NAMES = ("G", "Aqk", "Tinv", "w", "u", "qg", "kd")


_VARIANTS = {  # FWD_CONFIG overrides on top of a neutral base (see the fixture)
    "subblock": {"pairs_impl": "subblock"},
    "chunk": {},
    "chunk-fused-cumsum": {"offdiag_cumsum": True},
    "chunk-diag-levels": {"diag_levels": True},
    "chunk-solve-regs": {"wy_solve_regs": True},
    "chunk-default": {"diag_impl": "dots", "wy_solve_regs": True, "solve_impl": "kernel", "wy_split": True,
                      "offdiag_bks": 64, "offdiag_qgkd": True},
    "chunk-tokens": {"diag_impl": "tokens", "wy_solve_regs": True, "solve_impl": "kernel", "wy_split": True,
                     "offdiag_bks": 64},
    "chunk-wy-per-chunk": {"diag_impl": "tokens", "wy_solve_regs": True, "solve_impl": "kernel"},
    "chunk-solve-wy": {"diag_impl": "tokens", "wy_solve_regs": True, "solve_impl": "wy"},
    "chunk-solve-offdiag": {"diag_impl": "tokens", "wy_solve_regs": True, "solve_impl": "offdiag"},
    "chunk-wy-split-16bit": {"diag_impl": "tokens", "wy_solve_regs": True, "solve_impl": "kernel", "wy_split": True,
                             "wy_ops_16bit": True},
    "chunk-wy-split-16bit-regs": {"diag_impl": "tokens", "wy_solve_regs": True, "solve_impl": "kernel",
                                  "wy_split": True, "wy_ops_16bit": True, "wy_t16": False},
    "chunk-wy-per-chunk-16bit": {"diag_impl": "tokens", "wy_solve_regs": True, "solve_impl": "kernel",
                                 "wy_ops_16bit": True},
    "chunk-diag-dots": {"diag_impl": "dots", "wy_solve_regs": True, "solve_impl": "kernel", "wy_split": True},
    "chunk-qgkd-offdiag-cumsum-split": {"offdiag_qgkd": True, "offdiag_cumsum": True, "offdiag_split": True},
    "chunk-offdiag-split": {"diag_impl": "tokens", "wy_solve_regs": True, "solve_impl": "kernel",
                            "offdiag_split": True},
    "fused": {"pairs_impl": "fused"},
}


# Forward launch options that differ from their neighbours only in launch geometry: the half-input test runs
# them with 16-bit pair-dot operands only.
_PARTS_ONLY = {"chunk-wy-per-chunk", "chunk-wy-split-16bit", "chunk-wy-split-16bit-regs", "chunk-wy-per-chunk-16bit",
               "chunk-offdiag-split"}
# The variants that also run end to end (every gradient against the recurrence): the shipped setting and the fused
# kernel. The others write the same intermediates, each checked against its definition by the part tests here, and
# the backward reads nothing else, so their end-to-end runs would repeat the shipped one (interpreter time in CI).
_END_TO_END = {"chunk-default", "fused"}


def _skip_end_to_end(request):
    if request.node.callspec.params["pairs_impl"] not in _END_TO_END:
        pytest.skip("same intermediates as the shipped setting, checked by the part tests")


@pytest.fixture(autouse=True, params=list(_VARIANTS), ids=list(_VARIANTS))
def pairs_impl(request, monkeypatch):
    """Every test of this file runs with each implementation of the pair-matrix stage: "subblock"; "chunk" with G
    from the cumsum kernel or from the off-diagonal kernel, with the diagonal blocks one column per step or by
    levels on the tensor cores (the helper the fused kernel also takes), and with the WY kernel's diagonal inverses
    by forward substitution or from registers; "chunk-default", the shipped setting: diagonal blocks from the
    off-diagonal kernel's dots (the element-wise fallback for flagged blocks), scale q exp(G) and K exp(G_last - G)
    from the off-diagonal kernel, inverses from registers, the UT transform in a kernel of its own, the WY factors
    one program per column block; "chunk-tokens", the same with the diagonal blocks per row (lower triangle only);
    with one WY program per chunk, with the transform at the start of the WY kernel or at the end of the
    off-diagonal kernel, with 16-bit W / U products; with A_kk and A_qk in separate off-diagonal programs (also
    with G and the state pass's operands from that kernel); "chunk-diag-dots" over two K slices; "fused"."""
    base = {"pairs_impl": "chunk", "offdiag_cumsum": False, "diag_impl": "blocks", "diag_levels": False,
            "wy_solve_regs": False, "solve_impl": "wy", "wy_split": False, "wy_ops_16bit": False,
            "offdiag_split": False, "offdiag_bks": 32,  # two K slices per off-diagonal program at K = 64
            "wy_t16": True, "offdiag_qgkd": False}
    for key, value in {**base, **_VARIANTS[request.param]}.items():
        monkeypatch.setitem(FWD_CONFIG, key, value)
    return FWD_CONFIG["pairs_impl"]


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
    layout = _Layout(None if cu_seqlens is None else cu_seqlens.to(DEVICE), B, T, q.device)
    return (q, k, v, g, beta), layout


def definitions_of(x, scale):
    """The float64 intermediates of ``x`` (equal-length sequences) without running the kernels."""
    (q, k, v, g, beta), layout = _packed(x)
    return reference_parts(q.cpu(), k.cpu(), v.cpu(), g.cpu(), beta.cpu(), scale, layout.cu_seqlens.tolist())


def run_parts(x, scale, cu_seqlens=None):
    (q, k, v, g, beta), layout = _packed(x, cu_seqlens)
    _, _, saved = chunk_fwd(q, k, v, g, beta, scale, None, False, layout)
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


@pytest.mark.parametrize("diag_rows", [True, False], ids=["diag-rows", "diag-broadcast"])
def test_parts_varlen_and_extreme_gates(diag_rows, pairs_impl, monkeypatch):
    """Both ways of computing the diagonal pair blocks (of pairs_impl "subblock"; "chunk" has one). Packed
    sequences (one empty, one of a single token, chunks cut short) and g = -1000 inside sub-blocks, at
    sub-block starts and across a chunk: every exponential stays finite and the wiped pairs are exact zeros."""
    if pairs_impl == "chunk" and not diag_rows:
        pytest.skip("pairs_diag_rows is a setting of the subblock kernel only")
    monkeypatch.setitem(FWD_CONFIG, "pairs_diag_rows", diag_rows)
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


def test_diag_dots_fast_path_and_fallback(pairs_impl, monkeypatch, request):
    """diag_impl "dots": the diagonal blocks from the off-diagonal kernel's dots, the element-wise kernel only for
    the blocks whose decay range passes the cap. Steep gates just under the cap (-3.8 per step: a range of 57 < 60
    over a block's fifteen steps) are right with the element-wise kernel switched off, so the dots did them; one
    gate of -100 flags its block, which is then wrong without the element-wise kernel and right with it."""
    if request.node.callspec.params["pairs_impl"] != "chunk-diag-dots":
        pytest.skip("a setting of diag_impl 'dots' only")
    from kimi_linear.ops.kda import chunk_fwd as chunk_fwd_module

    launch_diag = chunk_fwd_module._launch_diag
    x = kda_inputs(1, 130, 2, 32, 16, with_state=False)
    x["g"][:, :, 0, :4] = -3.8
    monkeypatch.setattr(chunk_fwd_module, "_launch_diag", lambda *args: None)
    got, want = run_parts(x, 0.3)
    for n in NAMES:
        # G reaches ~-250 in the steep channels; fp32 resolves its differences to ~2^-24 |G|
        assert rel_err(got[n], want[n]) < 5e-5, n
    x["g"][:, 20, 1, 7] = -100.0  # chunk 0, block 1, head 1: range > 60
    got, want = run_parts(x, 0.3)
    assert rel_err(got["Aqk"][16:32, 1], want["Aqk"][16:32, 1]) > 1e-2
    assert rel_err(got["Aqk"][:16], want["Aqk"][:16]) < 5e-5  # the blocks not flagged stay right
    monkeypatch.setattr(chunk_fwd_module, "_launch_diag", launch_diag)
    got, want = run_parts(x, 0.3)
    for n in NAMES:
        assert rel_err(got[n], want[n]) < 5e-5, n


# Triton 3.6's interpreter multiplies bf16 tl.dot operands wrongly (errors ~1e10 on a plain 16x16 dot; fp16 and fp32
# are right), so bf16 runs only compiled
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE == "cpu", reason="interpreter's bf16 tl.dot"))


@pytest.mark.parametrize("ops_16bit", [True, False], ids=["ops16", "ops32"])
@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=["bf16", "fp16"])
def test_parts_half_inputs(dtype, ops_16bit, monkeypatch, request):
    """16-bit q, k, v, beta (g stays fp32): each intermediate within a small multiple of the inputs' own rounding,
    measured as the error of the float64 definitions fed the rounded inputs against the unrounded ones. Both ways
    of feeding the pair kernel's dots (16-bit or fp32 operands; the forward launch options with 16-bit only)."""
    if not ops_16bit and request.node.callspec.params["pairs_impl"] in _PARTS_ONLY:
        pytest.skip("fp32 pair-dot operands are covered by the other variants")
    monkeypatch.setitem(FWD_CONFIG, "pairs_ops_16bit", ops_16bit)
    x32 = kda_inputs(1, 150, 2, 64, 32, with_state=False)
    x16 = {n: (t if t is None or n == "g" else t.to(dtype)) for n, t in x32.items()}
    got, want_lowp = run_parts(x16, 0.125)
    exact = definitions_of(x32, 0.125)
    for n in NAMES:
        e_kernel = rel_err(got[n], exact[n])
        e_inputs = rel_err(want_lowp[n], exact[n])
        eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # the unit roundoff of storing the result
        assert e_kernel <= 2 * e_inputs + eps, f"{n}: {e_kernel:.2e} vs inputs' {e_inputs:.2e}"


def test_pairs_impl_is_validated(pairs_impl, monkeypatch):
    monkeypatch.setitem(FWD_CONFIG, "pairs_impl", "blocks")
    with pytest.raises(ValueError, match="pairs_impl"):
        run_parts(kda_inputs(1, 8, 1, 16, 16, with_state=False), 0.5)


E2E = [  # B, T, H, K, V, initial state, cu_seqlens
    (1, 70, 1, 16, 32, True, None),
    (2, 63, 2, 32, 16, False, None),
    (1, 100, 1, 16, 16, True, (0, 0, 1, 66, 100)),
]


@pytest.mark.parametrize("B,T,H,K,V,with_state,cu", E2E,
                         ids=[f"B{b}-T{t}-H{h}-K{k}-V{v}-{'h0' if s else 'no-h0'}{'-varlen' if c else ''}"
                              for b, t, h, k, v, s, c in E2E])
def test_end_to_end_matches_recurrence(B, T, H, K, V, with_state, cu, pairs_impl, request):
    """chunk_kda forward and every gradient against autograd through naive_recurrent_kda (the checks of
    test_kda_chunk_triton.py), with this pair-matrix stage; varlen with an empty and a one-token segment."""
    _skip_end_to_end(request)
    x = kda_inputs(B, T, H, K, V, with_state=with_state, N=None if cu is None else len(cu) - 1)
    kwargs = {} if cu is None else {"cu_seqlens": torch.tensor(cu, dtype=torch.int32, device=DEVICE)}
    check_fwd_bwd(x, scale=0.3 if K == 32 else None, **kwargs)


def test_end_to_end_extreme_gates(pairs_impl, request):
    """g = -1000 next to gates near 0, across sub-block and chunk boundaries, end to end."""
    _skip_end_to_end(request)
    x = kda_inputs(1, 80, 1, 16, 16, gate_scale=1e-3)
    g = x["g"]
    g[:, 5] = -1000.0
    g[:, 17:19, :, :8] = -1000.0
    g[:, 64] = -1000.0
    check_fwd_bwd(x)


def test_solve_impl_is_validated(pairs_impl, monkeypatch):
    """A misspelt UT-transform placement, and the one combination that cannot be ordered, are refused by name."""
    if pairs_impl != "chunk":
        pytest.skip("solve_impl is a setting of pairs_impl 'chunk'")
    x = kda_inputs(1, 8, 1, 16, 16, with_state=False)
    monkeypatch.setitem(FWD_CONFIG, "solve_impl", "registers")
    with pytest.raises(ValueError, match="solve_impl"):
        run_parts(x, 0.5)
    monkeypatch.setitem(FWD_CONFIG, "solve_impl", "offdiag")
    monkeypatch.setitem(FWD_CONFIG, "offdiag_cumsum", True)
    with pytest.raises(ValueError, match="offdiag_cumsum"):
        run_parts(x, 0.5)
    monkeypatch.setitem(FWD_CONFIG, "offdiag_cumsum", False)
    monkeypatch.setitem(FWD_CONFIG, "solve_impl", "offdiag")
    monkeypatch.setitem(FWD_CONFIG, "offdiag_split", True)
    with pytest.raises(ValueError, match="offdiag_split"):
        run_parts(x, 0.5)
