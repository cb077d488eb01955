"""The stages of the Triton chunk KDA backward, one at a time, against their float64 definitions.

Each stage (``chunk_bwd.py`` lists them) gets its inputs from the float64 definitions (rounded to the kernels'
dtypes), not from the stage before it, and its outputs are compared with the definitions, so a fault points at the
stage that made it. The definitions come from autograd in float64 through one chunk of the chunked form
(``_chunk_forward``) with the state entering the chunk held fixed: its gradients are those of the whole backward,
the gradients w.r.t. its intermediates (V_new, A, A_qk, S) are what the stages pass on, and the same with the pair
matrices held fixed gives the partial gradients the state stages leave to the pair stage. ``chunk_bwd`` itself is
then checked end to end on the same definitions. Sizes are awkward on purpose: K = 96 (a partial second K block of
the state-gradient stage), V not a power of two, chunks cut short, an empty sequence. Without CUDA every dtype runs
in Triton's interpreter (bf16 as the GPU computes it: ``tests/triton_interpreter.py``). Every buffer the kernels
write is NaN-poisoned first. The whole op against the recurrence: ``test_kda_chunk_triton.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kimi_linear.ops.kda import chunk_bwd  # noqa: E402
from kimi_linear.ops.kda.chunk_bwd import bwd_launch  # noqa: E402
from kimi_linear.ops.kda.chunk_bwd_dh import bwd_state_grads  # noqa: E402
from kimi_linear.ops.kda.chunk_bwd_inter import bwd_through_states  # noqa: E402
from kimi_linear.ops.kda.chunk_bwd_intra import bwd_pairs  # noqa: E402
from kimi_linear.ops.kda.chunk_bwd_wy import bwd_wy  # noqa: E402
from kimi_linear.ops.kda.chunk_common import CHUNK, layout_for  # noqa: E402
from tests.utils import kda_inputs, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

SCALE = 0.3
FP32_TOL = 2e-5  # the order of summation only (measured <= 1e-6)
# 16-bit inputs: the stages read 16-bit copies of S, dS', V_new, dV_new, dO, W, A_qk, ... (each rounded to 2^-11
# relative for fp16, 2^-8 for bf16) and multiply them with fp32 accumulation; fp16 measured <= 3.2e-4
HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _chunk_forward(qs, k, v, beta, G, S, pairs=None):
    """One chunk of the chunked form, per head: qs = scale q, k ``[H, n, K]``, v ``[H, n, V]``, beta ``[H, n]``, G
    the cumulative log-decay ``[H, n, K]``, S the state entering ``[H, K, V]`` -> the intermediates by name. With
    ``pairs`` = (A_qk, A) those pair matrices are taken as given (held fixed) instead of computed."""
    n = qs.shape[1]
    if pairs is None:
        lower = torch.ones(n, n, dtype=torch.bool, device=qs.device).tril()
        decay = torch.where(lower[None, :, :, None], G[:, :, None] - G[:, None], -torch.inf).exp()  # exp(G_t - G_j)
        Aqk = torch.einsum("htc,hjc,htjc->htj", qs, k, decay)
        A = beta[..., None] * torch.einsum("htc,hjc,htjc->htj", k, k, decay).tril(-1)
    else:
        Aqk, A = pairs
    T = torch.linalg.inv(torch.eye(n, dtype=qs.dtype) + A)
    w = T @ (beta[..., None] * k * G.exp())
    u = T @ (beta[..., None] * v)
    vn = u - w @ S
    qg = qs * G.exp()
    kd = k * (G[:, -1:] - G).exp()
    o = qg @ S + Aqk @ vn
    S_out = G[:, -1, :, None].exp() * S + kd.transpose(1, 2) @ vn
    return dict(G=G, Aqk=Aqk, A=A, Tinv=T, w=w, u=u, qg=qg, kd=kd, vn=vn, o=o, S_out=S_out)


def definitions(x: dict, do, dht, bounds):
    """Every tensor the backward's stages read or write, by its definition in float64, packed ``[TT, H, *]`` (per
    chunk ``[NT, H, K, V]``; pair matrices ``[TT, H, CHUNK]``, zero-padded). ``x``: packed q, k, v, g, beta, h0."""
    q, k, v, g, beta, do = (t.double() for t in (x["q"], x["k"], x["v"], x["g"], x["beta"], do))
    h0 = x["h0"]
    TT, H, K = q.shape
    V = v.shape[-1]
    per_token = {"G": K, "Aqk": CHUNK, "Tinv": CHUNK, "w": K, "u": V, "qg": K, "kd": K, "vn": V, "dvn": V,
                 "dA": CHUNK, "dAqk": CHUNK, "dq_p": K, "dk_p": K, "dG_p": K, "db_p": None,
                 "dq": K, "dk": K, "dv": V, "dg": K, "db": None}
    out = {n: torch.zeros(TT, H, *([d] if d else []), dtype=torch.float64) for n, d in per_token.items()}
    h, dh = [], []
    out["dh0"] = torch.zeros(len(bounds) - 1, H, K, V, dtype=torch.float64)
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        S = h0[i].double() if h0 is not None else torch.zeros(H, K, V, dtype=torch.float64)
        chunks = [(c, min(c + CHUNK, e)) for c in range(s, e, CHUNK)]
        states = []
        for c, c_end in chunks:  # forward: the state entering each chunk
            states.append(S)
            args = [t[c:c_end].transpose(0, 1) for t in (q * SCALE, k, v, beta)]
            S = _chunk_forward(*args, g[c:c_end].transpose(0, 1).cumsum(1), S)["S_out"]
        dS = dht[i].double() if dht is not None else torch.zeros(H, K, V, dtype=torch.float64)
        h_seq, dh_seq = [], []
        for (c, c_end), S in reversed(list(zip(chunks, states))):  # backward, holding S fixed in each chunk
            sl = slice(c, c_end)
            qs, kc, vc, bc = (t[sl].transpose(0, 1).clone().requires_grad_() for t in (q * SCALE, k, v, beta))
            G = g[sl].transpose(0, 1).cumsum(1).requires_grad_()
            Sc = S.clone().requires_grad_()
            f = _chunk_forward(qs, kc, vc, bc, G, Sc)
            loss = (f["o"] * do[sl].transpose(0, 1)).sum() + (f["S_out"] * dS).sum()
            leaves = [qs, kc, vc, bc, G, Sc, f["vn"], f["A"], f["Aqk"]]
            dqs, dk, dv, db, dG, dSin, dvn, dA, dAqk = torch.autograd.grad(loss, leaves)
            # the same with the pair matrices held fixed: what the state stages leave to the pair stage
            pq, pk, pb, pG = (t.detach().clone().requires_grad_() for t in (qs, kc, bc, G))
            f_p = _chunk_forward(pq, pk, vc.detach(), pb, pG, S, pairs=(f["Aqk"].detach(), f["A"].detach()))
            loss_p = (f_p["o"] * do[sl].transpose(0, 1)).sum() + (f_p["S_out"] * dS).sum()
            dq_p, dk_p, db_p, dG_p = torch.autograd.grad(loss_p, [pq, pk, pb, pG])
            n = c_end - c
            low, strict = torch.ones(n, n, dtype=torch.bool).tril(), torch.ones(n, n, dtype=torch.bool).tril(-1)
            rows = {**{m: f[m].detach() for m in ("G", "Aqk", "Tinv", "w", "u", "qg", "kd", "vn")},
                    "dvn": dvn, "dA": dA * strict, "dAqk": dAqk * low, "dq_p": dq_p, "dk_p": dk_p, "dG_p": dG_p,
                    "db_p": db_p, "dq": dqs * SCALE, "dk": dk, "dv": dv, "db": db, "dg": dG.flip(1).cumsum(1).flip(1)}
            for m, t in rows.items():
                t = t.transpose(0, 1)
                out[m][sl] = torch.nn.functional.pad(t, (0, CHUNK - n)) if out[m].shape[-1] == CHUNK else t
            h_seq.append(S)
            dh_seq.append(dS)
            dS = dSin
        out["dh0"][i] = dS
        h += h_seq[::-1]
        dh += dh_seq[::-1]
    out["h"] = torch.stack(h) if h else torch.zeros(0, H, K, V, dtype=torch.float64)
    out["dh"] = torch.stack(dh) if dh else torch.zeros(0, H, K, V, dtype=torch.float64)
    return out


@functools.cache
def case(T_total, H, K, V, cu, dtype, with_state=True, seed=0, steep=()):
    """Packed inputs, the layout, dO, dS_T and the definitions (for the 16-bit-rounded inputs); ``steep``: (row,
    head, column) entries of g set to -100. Cached: the tests share them and must not write to them."""
    gen = torch.Generator().manual_seed(seed)
    N = len(cu) - 1
    x = kda_inputs(1, T_total, H, K, V, N=N, with_state=with_state, generator=gen)
    for t, h, c in steep:
        x["g"][0, t, h, c] = -100.0
    packed = {n: x[n][0].to(dtype) for n in ("q", "k", "v", "beta")}
    packed["g"], packed["h0"] = x["g"][0], x["initial_state"]
    do = torch.randn(T_total, H, V, generator=gen).to(dtype)
    dht = torch.randn(N, H, K, V, generator=gen)
    layout = layout_for(torch.tensor(cu, dtype=torch.int32, device=DEVICE), 1, T_total, torch.device(DEVICE))
    return packed, layout, do, dht, definitions(packed, do, dht, cu)


def _on(d: dict, dtype, *names, fp32=()):
    """Definitions as the kernels take them: ``names`` in the inputs' dtype, ``fp32`` in fp32, on the device."""
    return [d[n].to(DEVICE, dtype) for n in names] + [d[n].to(DEVICE, torch.float32) for n in fp32]


def check(got: dict, want: dict, tol: float):
    for n, t in got.items():
        assert t is not None, n
        assert rel_err(t.cpu(), want[n]) < tol, f"{n}: {rel_err(t.cpu(), want[n]):.2e}"


def run_stages(x, layout, do, dht, d, dtype, launch):
    """Each stage on the definitions of its inputs -> its outputs by the names of ``definitions``."""
    qg, kd, w, Aqk, h, dh, vn, dvn = _on(d, dtype, "qg", "kd", "w", "Aqk", "h", "dh", "vn", "dvn")
    G, Tinv, dq_p, dk_p, dG_p, dA, dAqk, db_p = _on(d, dtype, fp32=("G", "Tinv", "dq_p", "dk_p", "dG_p", "dA",
                                                                        "dAqk", "db_p"))
    q, k, v, beta = (x[n].to(DEVICE) for n in ("q", "k", "v", "beta"))
    do, dht = do.to(DEVICE), dht.to(DEVICE)
    got = {}
    got["dh"], got["dvn"], got["dh0"] = bwd_state_grads(qg, kd, w, G, Aqk, do, dht, True, layout, launch)
    got["dq_p"], got["dk_p"], got["dG_p"], dbk = bwd_through_states(q, k, beta, G, Tinv, h, dh, vn, dvn, do, SCALE,
                                                                      layout, launch)
    got["dA"], got["dAqk"], got["dv"], got["db_p"] = bwd_wy(v, beta, Tinv, vn, dvn, do, dbk, layout, launch)
    db = db_p.clone()
    got["dq"], got["dk"], got["dg"] = bwd_pairs(q, k, beta, G, dq_p, dk_p, dG_p, dA, dAqk, db, SCALE, layout,
                                                launch)
    got["db"] = db
    return got


def run_chunk_bwd(x, layout, do, dht, d, dtype, launch=None):
    saved = _on(d, dtype, "Aqk", "w", "u", "qg", "kd", fp32=("G", "Tinv"))
    G, Tinv = saved[-2:]
    saved = [G, saved[0], Tinv, *saved[1:5]]  # the forward's order: G, Aqk, Tinv, w, u, qg, kd
    q, k, v, beta = (x[n].to(DEVICE) for n in ("q", "k", "v", "beta"))
    h0 = None if x["h0"] is None else x["h0"].to(DEVICE)
    out = chunk_bwd.chunk_bwd(q, k, v, beta, saved, SCALE, h0, do.to(DEVICE), dht.to(DEVICE), layout, launch)
    return dict(zip(("dq", "dk", "dv", "dg", "db", "dh0"), out))


# T_total, H, K, V, cu_seqlens. VARLEN: K = 96 is a partial second K block of the state-gradient stage, V = 48 not
# a power of two, a 5-token sequence, an empty one and one of 70 tokens (a full chunk and one of 6, so the reverse
# pass carries across chunks). HEADS: two heads, a full chunk and one of 6.
VARLEN = (75, 1, 96, 48, (0, 5, 5, 75))
HEADS = (70, 2, 32, 16, (0, 70))


def test_stages_match_definitions_fp32():
    x, layout, do, dht, d = case(*VARLEN, torch.float32)
    launch = bwd_launch(96, 48, torch.float32)
    check(run_stages(x, layout, do, dht, d, torch.float32, launch), d, FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_stages_match_definitions_half(dtype):
    """16-bit q, k, v, beta, dO and saved intermediates; the definitions are fed the same rounded inputs."""
    x, layout, do, dht, d = case(*HEADS, dtype)
    launch = bwd_launch(32, 16, dtype)
    check(run_stages(x, layout, do, dht, d, dtype, launch), d, HALF_TOL[dtype])


def test_chunk_bwd_matches_definitions():
    """The orchestrator, state recompute included: every gradient from the forward's saved intermediates, with
    the state-gradient stage in three full K blocks of 32 (``dataclasses.replace`` of the shipped launch)."""
    x, layout, do, dht, d = case(*VARLEN, torch.float32)
    launch = dataclasses.replace(bwd_launch(96, 48, torch.float32), inter_bk=32)
    check(run_chunk_bwd(x, layout, do, dht, d, torch.float32, launch), d, FP32_TOL)


def test_in_block_pairs_by_products_and_element_wise():
    """The pairs inside a sub-block go by fp32 products where its decay range is at most ``intra_diag_cap``,
    element-wise where it passes: g = -100 at row 20 of head 1 sends that block (chunk 0, sub-block 1) to the
    loops, the others take the products, and all match the definitions. With the cap below 0 every block goes
    element-wise: the same values up to rounding, and not bit-equal where the products ran (so they did)."""
    x, layout, do, dht, d = case(*HEADS, torch.float32, steep=((20, 1, 3),))
    launch = bwd_launch(32, 16, torch.float32)
    got = run_stages(x, layout, do, dht, d, torch.float32, launch)
    check(got, d, FP32_TOL)
    loops = run_stages(x, layout, do, dht, d, torch.float32, dataclasses.replace(launch, intra_diag_cap=-1.0))
    check(loops, d, FP32_TOL)
    assert not torch.equal(got["dq"][:16], loops["dq"][:16])  # block 0 of chunk 0: products vs loops
    assert torch.equal(got["dq"][16:32, 1], loops["dq"][16:32, 1])  # the steep block: loops both times


def test_launch_settings():
    """The shipped settings, clipped to the head sizes, fp32 at half the V block of stages 2 and 3; every kernel
    of the sm_90 build list takes the constexprs it is given."""
    wide = bwd_launch(128, 128, torch.bfloat16)
    assert (wide.dh_bv, wide.inter_bk, wide.inter_bv, wide.wy_bv) == (32, 64, 64, 64)
    fp32 = bwd_launch(128, 128, torch.float32)
    assert (fp32.inter_bv, fp32.wy_bv) == (32, 32)
    small = bwd_launch(16, 16, torch.float32)
    assert (small.dh_bv, small.inter_bk, small.inter_bv, small.wy_bv) == (16, 16, 16, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        wide.dh_bv = 64
    for kernel, consts, _, _ in chunk_bwd.sm90_build_jobs(4, 128, 128):
        assert set(consts) <= set(kernel.arg_names), kernel.__name__
