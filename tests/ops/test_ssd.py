"""Chunked SSD (Mamba2) against its token-by-token recurrence: output, final state and every gradient."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops.ssd import chunk_ssd, naive_recurrent_ssd
from tests.utils import leaves, loss_of, rel_err


def ssd_inputs(batch, T, H, G, N, P, *, dt_scale=1.0, with_state=True, with_D=True, seed=0):
    """Random SSD inputs: dt > 0 (softplus of a normal), A < 0, fresh B/C/x, optional D and fp32 state."""
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(
        x=torch.randn(batch, T, H, P, generator=gen),
        dt=torch.nn.functional.softplus(torch.randn(batch, T, H, generator=gen)) * dt_scale,
        A=-torch.rand(H, generator=gen) * 2 - 0.1,
        B=torch.randn(batch, T, G, N, generator=gen) / N**0.5,
        C=torch.randn(batch, T, G, N, generator=gen) / N**0.5,
        D=torch.randn(H, generator=gen) if with_D else None,
        initial_state=torch.randn(batch, H, N, P, generator=gen) if with_state else None,
    )
    return inputs


CASES = [
    # (batch, T, H, G, N, P, chunk_size)
    (2, 63, 2, 1, 16, 8, 16),
    (1, 65, 4, 2, 8, 12, 16),
    (2, 130, 2, 2, 16, 16, 64),
    (1, 1, 2, 1, 4, 4, 16),
    (1, 37, 3, 3, 5, 7, 8),
]


@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-H{}-G{}-N{}-P{}-C{}".format(*c))
def test_chunk_matches_recurrence_with_gradients(case, with_state):
    batch, T, H, G, N, P, chunk = case
    inputs = ssd_inputs(batch, T, H, G, N, P, with_state=with_state, seed=hash(case) % 1000)
    results = []
    for fn in (
        lambda **a: chunk_ssd(**a, output_final_state=True, chunk_size=chunk),
        lambda **a: naive_recurrent_ssd(**a, output_final_state=True),
    ):
        args = leaves(inputs)
        y, state = fn(**args)
        loss_of(y, state).backward()
        results.append((y.detach(), state.detach(), {n: t.grad for n, t in args.items() if t is not None}))
    (y_c, s_c, g_c), (y_r, s_r, g_r) = results
    assert rel_err(y_c, y_r) < 1e-5
    assert rel_err(s_c, s_r) < 1e-5
    for name in g_r:
        assert rel_err(g_c[name], g_r[name]) < 1e-4, name


def test_reference_matches_hand_computed_two_steps():
    """The recurrence itself, checked against the definition written out for T = 2, one head, one group."""
    inputs = ssd_inputs(1, 2, 1, 1, 3, 2, seed=7)
    x, dt, A, B, C, D, S0 = (inputs[n] for n in ("x", "dt", "A", "B", "C", "D", "initial_state"))
    S = S0[0, 0]
    expected = []
    for t in range(2):
        S = torch.exp(dt[0, t, 0] * A[0]) * S + dt[0, t, 0] * torch.outer(B[0, t, 0], x[0, t, 0])
        expected.append(S.T @ C[0, t, 0] + D[0] * x[0, t, 0])
    y, state = naive_recurrent_ssd(**inputs, output_final_state=True)
    assert rel_err(y[0, :, 0], torch.stack(expected)) < 1e-6
    assert rel_err(state[0, 0], S) < 1e-6


def test_huge_decay_gives_zeros_not_nan():
    """dt·|A| of order 1e4 must decay the state to exact zeros in the chunked form, with finite gradients."""
    inputs = ssd_inputs(1, 40, 2, 1, 8, 8, dt_scale=1e4, seed=3)
    args = leaves(inputs)
    y, state = chunk_ssd(**args, output_final_state=True, chunk_size=16)
    y_ref, state_ref = naive_recurrent_ssd(**inputs, output_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    assert rel_err(y.detach(), y_ref) < 1e-5
    loss_of(y, state).backward()
    for name, t in args.items():
        assert torch.isfinite(t.grad).all(), name


def test_bf16_input_gives_bf16_output_close_to_fp32():
    inputs = ssd_inputs(1, 70, 2, 1, 8, 8, seed=5)
    y32, _ = chunk_ssd(**inputs)
    y16, _ = chunk_ssd(**{n: (t.bfloat16() if n == "x" else t) for n, t in inputs.items()})
    assert y16.dtype == torch.bfloat16
    assert rel_err(y16, y32) < 2e-2


def test_chunked_state_carries_across_calls():
    """Running two halves with the state handed over equals one call on the whole sequence."""
    inputs = ssd_inputs(2, 50, 2, 1, 8, 8, seed=11)
    y_full, s_full = chunk_ssd(**inputs, output_final_state=True, chunk_size=16)
    first = {n: (t[:, :23] if n in ("x", "dt", "B", "C") else t) for n, t in inputs.items()}
    second = {n: (t[:, 23:] if n in ("x", "dt", "B", "C") else t) for n, t in inputs.items()}
    y1, s1 = chunk_ssd(**first, output_final_state=True, chunk_size=16)
    second["initial_state"] = s1
    y2, s2 = chunk_ssd(**second, output_final_state=True, chunk_size=16)
    assert rel_err(torch.cat([y1, y2], dim=1), y_full) < 1e-5
    assert rel_err(s2, s_full) < 1e-5


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(x=torch.randn(2, 5, 2)), ValueError),
        (dict(dt=torch.rand(2, 6, 2)), ValueError),
        (dict(A=-torch.rand(3)), ValueError),
        (dict(B=torch.randn(2, 5, 3, 4), C=torch.randn(2, 5, 3, 4)), ValueError),
        (dict(C=torch.randn(2, 5, 1, 5)), ValueError),
        (dict(D=torch.randn(1)), ValueError),
        (dict(initial_state=torch.randn(2, 2, 4, 4)), ValueError),
        (dict(x=torch.randint(0, 3, (2, 5, 2, 3))), TypeError),
        (dict(A=[-1.0, -1.0]), TypeError),
        (dict(chunk_size=0), ValueError),
    ],
    ids=["x-3d", "dt-T", "A-H", "G-not-dividing-H", "C-N", "D-H", "state-P", "x-int", "A-list", "chunk-0"],
)
def test_bad_arguments_raise(change, error):
    args = dict(
        x=torch.randn(2, 5, 2, 3),
        dt=torch.rand(2, 5, 2),
        A=-torch.rand(2),
        B=torch.randn(2, 5, 1, 4),
        C=torch.randn(2, 5, 1, 4),
        D=torch.randn(2),
        initial_state=torch.randn(2, 2, 4, 3),
    )
    chunk_ssd(**args)
    args.update(change)
    with pytest.raises(error):
        chunk_ssd(**args)


def test_autocast_does_not_lower_the_state_recurrence_to_bf16():
    inputs = ssd_inputs(1, 130, 2, 1, 16, 16, seed=13)
    ref, _ = chunk_ssd(**inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = chunk_ssd(**inputs)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-6
