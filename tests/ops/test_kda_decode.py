"""The fused decode step of a KDA layer (``kda_decode_step``): the Triton kernel against the PyTorch reference.

Without CUDA the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, set below before Triton is first
imported) at small sizes; with CUDA the same cases run compiled, plus the real size (H=32, K=V=128, bf16 and fp32,
B = 1 and 256) and a CUDA-graph capture. Every configuration of the layer: short conv on/off, output gate on/off,
the per-channel (KDA) and the scalar (GDN) gate. The reference itself is checked against the step written out from
the paper's equations.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kimi_linear.cache import KimiLinearCache  # noqa: E402
from kimi_linear.ops.kda import kda_decode_step, kda_gate, naive_recurrent_kda  # noqa: E402
from kimi_linear.ops.kda.decode_triton import DecodeLaunch, default_launch, kda_decode_step_triton  # noqa: E402
from kimi_linear.ops.norm import l2norm  # noqa: E402
from tests.layers.test_kda_layer import randomised_layer, small_config  # noqa: E402
from tests.utils import rel_err, rounded_to_nearest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET != 1: the Triton kernel cannot run", allow_module_level=True)

FP32_TOL = 1e-5  # fp32 math on both sides; only the summation order differs
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# name -> (short conv, output gate, scalar gate)
CONFIGS = {
    "kda": (True, True, False),
    "kda-no-conv": (False, True, False),
    "kda-no-gate": (True, False, False),
    "gdn": (True, True, True),
    "gdn-no-conv-no-gate": (False, False, True),
}
# (N, H, K, V, R, W, P, slots): rows out of slot order; where a slot repeats, it is the scratch slot P - 1 that
# CUDA-graph padding rows point at
SHAPES = {
    "N1-H2-K16-V16-R16-W4": (1, 2, 16, 16, 16, 4, 3, [1]),
    "N5-H3-K32-V32-R32-W4-scratch": (5, 3, 32, 32, 32, 4, 8, [6, 2, 0, 7, 7]),
    "N4-H4-K24-V40-R20-W3-scratch": (4, 4, 24, 40, 20, 3, 6, [5, 3, 1, 5]),
}


def weights(H, K, V, R, W, config, dtype=torch.float32, gen=None, gate_scale=0.3):
    """The layer's parameters for one step (what stays fixed from step to step)."""
    conv, out_gate, scalar = config
    gate_width = H if scalar else H * K
    w = dict(
        f_b_weight=torch.randn(gate_width, R, generator=gen) * gate_scale,
        A_log=torch.randn(H, generator=gen) * 0.3,
        dt_bias=torch.randn(gate_width, generator=gen),
        norm_weight=1 + torch.randn(V, generator=gen) * 0.3,
    )
    if conv:
        w["conv_weights"] = tuple(torch.randn(c, 1, W, generator=gen) * 0.5 for c in (H * K, H * K, H * V))
    if out_gate:
        w["g_b_weight"] = torch.randn(H * V, R, generator=gen) * 0.3
    return {n: (tuple(x.to(dtype) for x in t) if isinstance(t, tuple)
                else t if n in ("A_log", "dt_bias") else t.to(dtype)) for n, t in w.items()}


def pools(P, H, K, V, W, config, dtype=torch.float32, gen=None):
    p = dict(state_pool=torch.randn(P, H, K, V, generator=gen))
    if config[0]:
        p["conv_pool"] = torch.randn(P, 2 * H * K + H * V, W - 1, generator=gen).to(dtype)
    return p


def token(N, H, K, V, R, config, dtype=torch.float32, gen=None):
    """One step's projections: qkv, f_low, beta_logits (and g_low)."""
    x = dict(qkv=torch.randn(N, 2 * H * K + H * V, generator=gen) * 2, f_low=torch.randn(N, R, generator=gen),
             beta_logits=torch.randn(N, H, generator=gen))
    if config[1]:
        x["g_low"] = torch.randn(N, R, generator=gen)
    return {n: t.to(dtype) for n, t in x.items()}


def on(x: dict, device) -> dict:
    return {n: (tuple(w.to(device) for w in t) if isinstance(t, tuple) else t.to(device)) for n, t in x.items()}


def step(args: dict, pool: dict, slots, backend, device=DEVICE, launch=None):
    """One call on fresh copies of the pools: ``(out, pools after)`` on the CPU. With ``launch`` the Triton
    launcher is called directly with those settings."""
    pool = on({n: t.clone() for n, t in pool.items()}, device)
    a = on(args, device)
    slots = slots.to(device)
    if launch is None:
        out = kda_decode_step(**a, **pool, slots=slots, backend=backend)
    else:
        out = kda_decode_step_triton(
            a["qkv"], a["f_low"], a["beta_logits"], a.get("g_low"), pool.get("conv_pool"), a.get("conv_weights"),
            a["f_b_weight"], a["A_log"], a["dt_bias"], pool["state_pool"], slots, a["norm_weight"],
            a.get("g_b_weight"), 1e-5, pool["state_pool"].shape[2] ** -0.5, launch=launch,
        )
    return out.cpu(), {n: t.cpu() for n, t in pool.items()}


def check(out, after, out_ref, after_ref, before, slots, tol=FP32_TOL):
    """Outputs of rows with a slot of their own, every slot but a shared one (raced on) against the reference;
    slots no row names are untouched; every output entry written (the buffer starts as NaN)."""
    counts = torch.bincount(slots, minlength=before["state_pool"].shape[0])
    own = counts[slots] == 1
    assert torch.isfinite(out).all(), "an output entry was not written"
    assert rel_err(out[own], out_ref[own]) < tol
    checked = counts <= 1
    untouched = counts == 0
    for name in after:
        assert rel_err(after[name][checked], after_ref[name][checked]) < tol, name
        assert torch.equal(after[name][untouched], before[name][untouched]), f"{name}: a slot no row names changed"


# ------------------------------------------------------------------------------------------------------------
# Small sizes: the interpreter on CPU, compiled on CUDA.


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_step_matches_reference(shape, config):
    N, H, K, V, R, W, P, slots = shape
    gen = torch.Generator().manual_seed(N * 100 + K)
    args = {**weights(H, K, V, R, W, config, gen=gen), **token(N, H, K, V, R, config, gen=gen)}
    before = pools(P, H, K, V, W, config, gen=gen)
    slots = torch.tensor(slots)
    out, after = step(args, before, slots, "triton")
    out_ref, after_ref = step(args, before, slots, "torch", device="cpu")
    assert out.shape == (N, H * V) and out.dtype == torch.float32
    check(out, after, out_ref, after_ref, before, slots)
    if config[0]:  # the conv tails are copies: exact
        own = torch.bincount(slots, minlength=P) == 1
        assert torch.equal(after["conv_pool"][own], after_ref["conv_pool"][own])


@pytest.mark.parametrize("config", [CONFIGS["kda"], CONFIGS["gdn-no-conv-no-gate"]], ids=["kda", "gdn-no-conv-no-gate"])
def test_several_v_blocks_and_rank_slices(config):
    """V = 40 in three 16-wide blocks (a padded fourth row of the output accumulator) and R = 20 in three 8-wide
    slices: the loops the release size does not take (K = V = 256 does)."""
    N, H, K, V, R, W, P = 3, 2, 24, 40, 20, 4, 5
    gen = torch.Generator().manual_seed(17)
    args = {**weights(H, K, V, R, W, config, gen=gen), **token(N, H, K, V, R, config, gen=gen)}
    before = pools(P, H, K, V, W, config, gen=gen)
    slots = torch.tensor([4, 0, 2])
    out, after = step(args, before, slots, "triton", launch=DecodeLaunch(block_v=16, block_r=8, num_warps=2))
    out_ref, after_ref = step(args, before, slots, "torch", device="cpu")
    check(out, after, out_ref, after_ref, before, slots)


@pytest.mark.parametrize("config", [CONFIGS["kda"], CONFIGS["gdn"]], ids=["kda", "gdn"])
def test_consecutive_steps(config):
    """Four steps on the same pools: each reads what the previous one wrote (conv tails and states); int32 slots."""
    N, H, K, V, R, W, P = 3, 2, 32, 32, 16, 4, 4
    gen = torch.Generator().manual_seed(23)
    w = weights(H, K, V, R, W, config, gen=gen)
    start = pools(P, H, K, V, W, config, gen=gen)
    slots = torch.tensor([3, 1, 0], dtype=torch.int32)
    kernel_pools = on({n: t.clone() for n, t in start.items()}, DEVICE)
    ref_pools = {n: t.clone() for n, t in start.items()}
    for _ in range(4):
        args = {**w, **token(N, H, K, V, R, config, gen=gen)}
        out = kda_decode_step(**on(args, DEVICE), **kernel_pools, slots=slots.to(DEVICE), backend="triton")
        out_ref = kda_decode_step(**args, **ref_pools, slots=slots, backend="torch")
        check(out.cpu(), {n: t.cpu() for n, t in kernel_pools.items()}, out_ref, ref_pools, start, slots)


def test_extreme_gates_and_strided_rows():
    """Gate pre-activations past softplus's threshold (|x| > 20: decays of exactly 0 and near 1); qkv and f_low as
    column slices of wider projections (row stride > width)."""
    N, H, K, V, R, W, P = 2, 2, 16, 16, 16, 4, 3
    config = CONFIGS["kda"]
    gen = torch.Generator().manual_seed(29)
    args = {**weights(H, K, V, R, W, config, gen=gen, gate_scale=8.0), **token(N, H, K, V, R, config, gen=gen)}
    for name in ("qkv", "f_low"):
        wide = torch.randn(N, args[name].shape[1] + 5, generator=gen)
        wide[:, : args[name].shape[1]] = args[name]
        args[name] = wide[:, : args[name].shape[1]]
    pre = F.linear(args["f_low"], args["f_b_weight"]) + args["dt_bias"]
    assert (pre > 20).any() and (pre < -20).any()
    before = pools(P, H, K, V, W, config, gen=gen)
    slots = torch.tensor([2, 0])
    out, after = step(args, before, slots, "triton")
    out_ref, after_ref = step(args, before, slots, "torch", device="cpu")
    check(out, after, out_ref, after_ref, before, slots)


def test_bf16_within_twice_the_reference_rounding():
    """bf16 projections, weights and conv pool, fp32 state: the kernel (fp32 math, one rounding of the output) is
    within twice the error the reference makes against itself in fp32 when it runs on the same bf16 values."""
    N, H, K, V, R, W, P = 3, 2, 32, 32, 32, 4, 4
    config = CONFIGS["kda"]
    gen = torch.Generator().manual_seed(31)
    args = {**weights(H, K, V, R, W, config, torch.bfloat16, gen), **token(N, H, K, V, R, config, torch.bfloat16, gen)}
    before = pools(P, H, K, V, W, config, torch.bfloat16, gen)
    slots = torch.tensor([1, 3, 0])
    out, after = step(args, before, slots, "triton")
    out_16, after_16 = step(args, before, slots, "torch", device="cpu")
    as_fp32 = {n: (tuple(w.float() for w in t) if isinstance(t, tuple) else t.float()) for n, t in args.items()}
    out_32, after_32 = step(as_fp32, {n: t.float() for n, t in before.items()}, slots, "torch", device="cpu")
    assert out.dtype == torch.bfloat16 and after["conv_pool"].dtype == torch.bfloat16
    assert rel_err(out, out_32) <= 2 * rel_err(out_16, out_32) + 1e-6
    assert rel_err(after["state_pool"], after_32["state_pool"]) <= 2 * rel_err(after_16["state_pool"],
                                                                               after_32["state_pool"]) + 1e-6
    assert torch.equal(after["conv_pool"], after_16["conv_pool"])  # bf16 values shifted, the bf16 input appended


def _widened(pool: dict) -> dict:
    """The pools with the state widened to fp32 (the conv tails as they are)."""
    return {n: (t.float() if n == "state_pool" else t) for n, t in pool.items()}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("config", [CONFIGS["kda"], CONFIGS["gdn-no-conv-no-gate"]], ids=["kda", "gdn-no-conv-no-gate"])
def test_bf16_state_pool_stores_the_fp32_step_rounded(config, backend):
    """A bf16 state pool: the step reads the state widened to fp32, computes in fp32 and stores the new state
    rounded to nearest bf16. Reference: the torch step on the same states in an fp32 pool. The output matches it
    to fp32 precision, every written state is its state rounded to nearest, the conv tails are exact and slots
    no row names stay bit-identical."""
    N, H, K, V, R, W, P = 3, 2, 32, 32, 16, 4, 5
    gen = torch.Generator().manual_seed(53)
    args = {**weights(H, K, V, R, W, config, gen=gen), **token(N, H, K, V, R, config, gen=gen)}
    before = pools(P, H, K, V, W, config, gen=gen)
    before["state_pool"] = before["state_pool"].bfloat16()
    slots = torch.tensor([4, 0, 2])
    out, after = step(args, before, slots, backend)
    out_ref, after_ref = step(args, _widened(before), slots, "torch", device="cpu")
    assert after["state_pool"].dtype == torch.bfloat16
    assert rel_err(out, out_ref) < FP32_TOL
    assert rounded_to_nearest(after["state_pool"][slots], after_ref["state_pool"][slots])
    untouched = torch.bincount(slots, minlength=P) == 0
    assert torch.equal(after["state_pool"][untouched], before["state_pool"][untouched])
    if config[0]:
        assert torch.equal(after["conv_pool"], after_ref["conv_pool"])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_state_pool_steps_follow_the_rounded_reference(backend):
    """Eight steps on one bf16 state pool against the reference chain that rounds its fp32 state to bf16 after
    every step: equal up to the rare element whose rounding an fp32 summation-order difference flips (measured
    on the CPU: ~1e-6 relative on the outputs). The reference chain with its state kept in fp32 differs from the
    rounded one by ~2e-3 (outputs) and ~1e-3 (states), truncating by ~4e-3: 1e-4 tells the contract apart."""
    N, H, K, V, R, W, P = 3, 2, 32, 32, 16, 4, 4
    config = CONFIGS["kda"]
    gen = torch.Generator().manual_seed(59)
    w = weights(H, K, V, R, W, config, gen=gen)
    start = pools(P, H, K, V, W, config, gen=gen)
    start["state_pool"] = start["state_pool"].bfloat16()
    slots = torch.tensor([3, 1, 0], dtype=torch.int32)
    kernel_pools = on({n: t.clone() for n, t in start.items()}, DEVICE)
    ref_pools = _widened(start)
    outs, outs_ref = [], []
    for _ in range(8):
        args = {**w, **token(N, H, K, V, R, config, gen=gen)}
        outs.append(kda_decode_step(**on(args, DEVICE), **kernel_pools, slots=slots.to(DEVICE), backend=backend))
        outs_ref.append(kda_decode_step(**args, **ref_pools, slots=slots, backend="torch"))
        ref_pools["state_pool"] = ref_pools["state_pool"].bfloat16().float()
    assert rel_err(torch.stack(outs).cpu(), torch.stack(outs_ref)) < 1e-4
    assert rel_err(kernel_pools["state_pool"].cpu().float(), ref_pools["state_pool"]) < 1e-4


def test_no_rows():
    config = CONFIGS["kda"]
    args = {**weights(2, 16, 16, 16, 4, config), **token(0, 2, 16, 16, 16, config)}
    before = pools(3, 2, 16, 16, 4, config)
    out, after = step(args, before, torch.zeros(0, dtype=torch.long), "triton")
    assert out.shape == (0, 32)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_reference_is_the_step_written_out():
    """The torch backend against paper Eq. 1 and the layer's equations spelled out (DESIGN.md §3): conv window,
    SiLU, L2 norm, the gate, the beta sigmoid, the recurrence, RMSNorm and the sigmoid output gate."""
    N, H, K, V, R, W, P = 3, 2, 8, 12, 6, 4, 4
    for name in ("kda", "gdn"):
        config = CONFIGS[name]
        gen = torch.Generator().manual_seed(37)
        a = {**weights(H, K, V, R, W, config, gen=gen), **token(N, H, K, V, R, config, gen=gen)}
        before = pools(P, H, K, V, W, config, gen=gen)
        slots = torch.tensor([2, 0, 3])
        out, after = step(a, before, slots, "torch", device="cpu")

        window = torch.cat([before["conv_pool"][slots], a["qkv"][..., None]], dim=-1)  # [N, C, W]
        filters = torch.cat([w[:, 0] for w in a["conv_weights"]])  # [C, W]
        x = F.silu((window * filters).sum(-1))
        q, k, v = x.split([H * K, H * K, H * V], dim=-1)
        q, k = l2norm(q.view(N, 1, H, K)), l2norm(k.view(N, 1, H, K))
        pre = (a["f_low"] @ a["f_b_weight"].T).view(N, 1, H, -1)
        g = kda_gate(pre[..., 0] if config[2] else pre, a["A_log"], a["dt_bias"])
        g = g[..., None].expand(N, 1, H, K) if config[2] else g
        o, state = naive_recurrent_kda(q, k, v.view(N, 1, H, V), g, torch.sigmoid(a["beta_logits"])[:, None],
                                       initial_state=before["state_pool"][slots], output_final_state=True)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * a["norm_weight"]
        o = o * torch.sigmoid((a["g_low"] @ a["g_b_weight"].T).view(N, 1, H, V))
        assert rel_err(out, o.reshape(N, H * V)) < FP32_TOL, name
        assert rel_err(after["state_pool"][slots], state) < FP32_TOL, name
        assert torch.equal(after["conv_pool"][slots], window[..., 1:]), name


def test_default_launch():
    assert default_launch(128, 128, 128) == DecodeLaunch(block_v=128, block_r=64, num_warps=4)
    assert default_launch(256, 256, 256) == DecodeLaunch(block_v=64, block_r=32, num_warps=16)
    assert default_launch(16, 16, 16).num_warps == 2


def test_registered_op_and_torch_compile():
    """The ``torch.library`` op torch.compile sees (opcheck: schema, fake kernel, mutation of both pools), and a
    compiled call (aot_eager) equal to the eager one, pools included."""
    N, H, K, V, R, W, P = 2, 2, 8, 8, 8, 4, 3
    config = CONFIGS["kda"]
    gen = torch.Generator().manual_seed(43)
    a = {**weights(H, K, V, R, W, config, gen=gen), **token(N, H, K, V, R, config, gen=gen)}
    before = pools(P, H, K, V, W, config, gen=gen)
    slots = torch.tensor([2, 0])
    op_args = (a["qkv"], a["f_low"], a["beta_logits"], a["g_low"], before["conv_pool"].clone(), *a["conv_weights"],
               a["f_b_weight"], a["A_log"], a["dt_bias"], before["state_pool"].clone(), slots, a["norm_weight"],
               a["g_b_weight"], 1e-5, K**-0.5, "torch")
    torch.library.opcheck(torch.ops.kimi_linear.kda_decode_step_, op_args)

    def decode(conv_pool, state_pool):
        return kda_decode_step(**a, conv_pool=conv_pool, state_pool=state_pool, slots=slots)

    compiled = {n: t.clone() for n, t in before.items()}
    eager = {n: t.clone() for n, t in before.items()}
    out_c = torch.compile(decode, fullgraph=True, backend="aot_eager")(compiled["conv_pool"], compiled["state_pool"])
    out_e = decode(eager["conv_pool"], eager["state_pool"])
    assert torch.equal(out_c, out_e)
    assert all(torch.equal(compiled[n], eager[n]) and not torch.equal(eager[n], before[n]) for n in before)


def _bad(**change):
    config = CONFIGS["kda"]
    a = {**weights(2, 8, 8, 8, 4, config), **token(3, 2, 8, 8, 8, config), **pools(4, 2, 8, 8, 4, config),
         "slots": torch.tensor([0, 1, 2]), "backend": "torch"}
    a.update(change)
    return a


BAD = {
    "qkv-width": (dict(qkv=torch.randn(3, 40)), ValueError, r"qkv must be \[3, 48\]"),
    "qkv-int": (dict(qkv=torch.ones(3, 48, dtype=torch.long)), TypeError, "qkv must be float16"),
    "state-fp16": (dict(state_pool=torch.randn(4, 2, 8, 8).half()), TypeError,
                   "state_pool must be float32 or bfloat16"),
    "state-strided": (dict(state_pool=torch.randn(4, 2, 8, 16)[..., :8]), ValueError, "state_pool must be contiguous"),
    "state-3d": (dict(state_pool=torch.randn(4, 2, 8)), ValueError, r"state_pool must be \[P, H, K, V\]"),
    "head-dim": (dict(state_pool=torch.randn(1, 1, 300, 8)), ValueError, "K, V in 1..256"),
    "conv-pool-alone": (dict(conv_weights=None), ValueError, "conv_pool and conv_weights go together"),
    "conv-two-filters": (dict(conv_weights=(torch.randn(16, 4), torch.randn(16, 4))), ValueError, "three filters"),
    "conv-widths": (dict(conv_weights=(torch.randn(16, 4), torch.randn(16, 4), torch.randn(16, 3))), ValueError,
                    "share one filter width"),
    "conv-rows": (dict(conv_weights=(torch.randn(16, 4), torch.randn(15, 4), torch.randn(16, 4))), ValueError,
                  r"conv_weights\[k\] must be \[16, W\]"),
    "conv-pool-shape": (dict(conv_pool=torch.randn(4, 48, 4)), ValueError, r"conv_pool must be \[4, 48, 3\]"),
    "gate-alone": (dict(g_b_weight=None), ValueError, "g_low and g_b_weight go together"),
    "g-b-shape": (dict(g_b_weight=torch.randn(16, 7)), ValueError, r"g_b_weight must be \[16, 8\]"),
    "f-b-rows": (dict(f_b_weight=torch.randn(15, 8)), ValueError, "f_b_weight must be"),
    "dt-bias": (dict(dt_bias=torch.randn(2)), ValueError, "dt_bias must have 16 elements"),
    "a-log": (dict(A_log=torch.randn(3)), ValueError, "A_log must have H=2"),
    "beta": (dict(beta_logits=torch.randn(3, 3)), ValueError, r"beta_logits must be \[3, 2\]"),
    "norm": (dict(norm_weight=torch.randn(7)), ValueError, r"norm_weight must be \[8\]"),
    "slots-float": (dict(slots=torch.zeros(3)), TypeError, "slots must be an int32/int64"),
    "slots-length": (dict(slots=torch.tensor([0, 1])), ValueError, r"slots must be \[3\]"),
    "f-low-rows": (dict(f_low=torch.randn(2, 8)), ValueError, r"f_low must be \[N, R\]"),
    "eps": (dict(eps=0.0), ValueError, "eps must be a positive float"),
    "backend": (dict(backend="cuda"), ValueError, "backend must be one of"),
    "fp64-triton": (dict(qkv=torch.randn(3, 48, dtype=torch.float64), backend="triton"), TypeError, "float64"),
}


@pytest.mark.parametrize("change,error,match", list(BAD.values()), ids=list(BAD))
def test_bad_input_raises(change, error, match):
    with pytest.raises(error, match=match):
        kda_decode_step(**_bad(**change))


# ------------------------------------------------------------------------------------------------------------
# The layer's decode step through the kernel (the interpreter on CPU).


@pytest.mark.parametrize(
    "overrides", [{}, dict(mixer="gdn"), dict(use_output_gate=False, use_short_conv=False)],
    ids=["kda", "gdn", "no-gate-no-conv"],
)
def test_layer_decode_through_the_kernel_matches_full_forward(overrides):
    """Prefill then token-by-token decode with the fused kernel equals the full forward: on the dense cache (rows
    are slots) and on a pooled cache whose rows sit at slots out of order."""
    config = small_config(**overrides)
    layer = randomised_layer(config, seed=3).to(DEVICE)
    layer.decode_backend = "triton"
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(2, 9, config.hidden_size, generator=gen).to(DEVICE)
    with torch.no_grad():
        full = layer(x)
        dense = KimiLinearCache(config, batch_size=2, max_length=16, device=DEVICE)
        pooled = KimiLinearCache.pooled(config, num_slots=5, num_blocks=2, block_size=16, device=DEVICE)
        rows = pooled.view(torch.tensor([4, 1], device=DEVICE), torch.tensor([[0], [1]], device=DEVICE),
                           torch.zeros(2, dtype=torch.long, device=DEVICE))
        for cache in (dense, rows):
            steps = [layer(x[:, :6], cache=cache)]
            cache.lengths += 6
            for t in range(6, 9):
                steps.append(layer(x[:, t : t + 1], cache=cache))
                cache.lengths += 1
            assert rel_err(torch.cat(steps, 1).cpu(), full.cpu()) < FP32_TOL


# ------------------------------------------------------------------------------------------------------------
# The real size on the GPU.


def _real(N, config, dtype, seed=0):
    H, K, V, R, W = 32, 128, 128, 128, 4
    gen = torch.Generator().manual_seed(seed)
    args = {**weights(H, K, V, R, W, config, dtype, gen), **token(N, H, K, V, R, config, dtype, gen)}
    before = pools(N + 1, H, K, V, W, config, dtype, gen)
    slots = torch.randperm(N + 1, generator=gen)[:N]
    return args, before, slots


REAL = [(1, "kda", torch.float32), (256, "kda", torch.float32), (1, "kda", torch.bfloat16),
        (256, "kda", torch.bfloat16), (256, "gdn", torch.bfloat16), (64, "gdn-no-conv-no-gate", torch.bfloat16)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("N,name,dtype", REAL, ids=[f"B{n}-{c}-{str(d)[6:]}" for n, c, d in REAL])
def test_gpu_real_size(N, name, dtype):
    """H = 32, K = V = R = 128, W = 4: fp32 to the reference's precision; bf16 within twice the reference's own
    bf16 error against fp32."""
    args, before, slots = _real(N, CONFIGS[name], dtype)
    out, after = step(args, before, slots, "triton", device="cuda")
    if dtype == torch.float32:
        out_ref, after_ref = step(args, before, slots, "torch", device="cpu")
        check(out, after, out_ref, after_ref, before, slots)
        return
    out_16, after_16 = step(args, before, slots, "torch", device="cpu")
    as_fp32 = {n: (tuple(w.float() for w in t) if isinstance(t, tuple) else t.float()) for n, t in args.items()}
    out_32, after_32 = step(as_fp32, {n: t.float() for n, t in before.items()}, slots, "torch", device="cpu")
    assert torch.isfinite(out).all()
    assert rel_err(out, out_32) <= 2 * rel_err(out_16, out_32) + 1e-6
    state, state_16, state_32 = after["state_pool"][slots], after_16["state_pool"][slots], after_32["state_pool"][slots]
    assert rel_err(state, state_32) <= 2 * rel_err(state_16, state_32) + 1e-6
    if "conv_pool" in after:
        assert torch.equal(after["conv_pool"], after_16["conv_pool"])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("N", [1, 256])
def test_gpu_real_size_bf16_state_pool(N):
    """H = 32, K = V = R = 128, bf16 activations and a bf16 state pool (what ``state_dtype=bfloat16`` serves): the
    output within twice the reference's own bf16 error; every written state is the fp32 step on the same (bf16)
    values rounded to nearest."""
    args, before, slots = _real(N, CONFIGS["kda"], torch.bfloat16, seed=3)
    before["state_pool"] = before["state_pool"].bfloat16()
    out, after = step(args, before, slots, "triton", device="cuda")
    out_16, _ = step(args, _widened(before), slots, "torch", device="cpu")
    as_fp32 = {n: (tuple(w.float() for w in t) if isinstance(t, tuple) else t.float()) for n, t in args.items()}
    out_32, after_32 = step(as_fp32, {n: t.float() for n, t in before.items()}, slots, "torch", device="cpu")
    assert after["state_pool"].dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, out_32) <= 2 * rel_err(out_16, out_32) + 1e-6
    assert rounded_to_nearest(after["state_pool"][slots], after_32["state_pool"][slots])


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_capture_and_replay():
    """Two steps replayed from one captured graph (new projections copied into its static inputs) equal, bit for
    bit, two eager steps on a copy of the pools."""
    N, config = 8, CONFIGS["kda"]
    args, before, slots = _real(N, config, torch.bfloat16, seed=5)
    static = on(args, "cuda")
    live = on({n: t.clone() for n, t in before.items()}, "cuda")
    slots_dev = slots.cuda()
    kda_decode_step(**static, **on({n: t.clone() for n, t in before.items()}, "cuda"), slots=slots_dev)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = kda_decode_step(**static, **live, slots=slots_dev)
    torch.cuda.synchronize()
    assert all(torch.equal(live[n].cpu(), before[n]) for n in before), "capturing must not run the kernel"

    eager_pools = on({n: t.clone() for n, t in before.items()}, "cuda")
    gen = torch.Generator().manual_seed(6)
    for _ in range(2):
        x = on(token(N, 32, 128, 128, 128, config, torch.bfloat16, gen), "cuda")
        for n, t in x.items():
            static[n].copy_(t)
        graph.replay()
        out_eager = kda_decode_step(**{**static, **x}, **eager_pools, slots=slots_dev)
        torch.cuda.synchronize()
        assert torch.equal(out_static, out_eager)
        assert all(torch.equal(live[n], eager_pools[n]) for n in live)
