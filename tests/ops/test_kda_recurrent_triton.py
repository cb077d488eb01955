"""Triton recurrent KDA (decode) against the token-by-token reference of paper Eq. 1.

Without CUDA the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, set below before Triton is
first imported by the kernel module) at small sizes; with CUDA the same cases run compiled, plus real decode
sizes (H=32, K=V=128, bf16, B up to 256) and a CUDA-graph capture + replay.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kimi_linear.ops.kda import (  # noqa: E402
    beta_activation,
    fused_recurrent_kda,
    kda_gate,
    naive_recurrent_kda,
)
from kimi_linear.ops.kda.recurrent_triton import fused_recurrent_kda_triton  # noqa: E402
from kimi_linear.ops.norm import l2norm  # noqa: E402
from tests.utils import kda_inputs, rel_err, rounded_to_nearest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET != 1: the Triton kernel cannot run", allow_module_level=True)

FP32_TOL = 1e-5  # fp32 math on both sides, only the summation order differs
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def to(x: dict, device=DEVICE) -> dict:
    return {n: (None if t is None else t.to(device)) for n, t in x.items()}


def reference(q, k, v, g, beta, scale=None, initial_state=None, cu_seqlens=None, *, l2norm_qk=False,
              A_log=None, dt_bias=None, beta_sigmoid=False):
    """Activations by their references, then paper Eq. 1 one sequence at a time (fp32, on the CPU).

    Returns o ``[B, T, H, V]`` float32 and the final states ``[N, H, K, V]``.
    """
    q, k, v, g, beta = (x.detach().float().cpu() for x in (q, k, v, g, beta))
    if l2norm_qk:
        q, k = l2norm(q), l2norm(k)
    if A_log is not None:
        g = kda_gate(g, A_log.cpu(), None if dt_bias is None else dt_bias.cpu())
    if beta_sigmoid:
        beta = beta_activation(beta)
    if g.dim() == 3:
        g = g[..., None].expand_as(q)
    h0 = None if initial_state is None else initial_state.detach().cpu()
    if cu_seqlens is None:
        o, ht = naive_recurrent_kda(q, k, v, g, beta, scale, h0, output_final_state=True)
        return o, ht
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        o_i, h_i = naive_recurrent_kda(
            q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], scale,
            None if h0 is None else h0[i : i + 1], output_final_state=True,
        )
        outs.append(o_i)
        states.append(h_i)
    return torch.cat(outs, dim=1), torch.cat(states)


# ------------------------------------------------------------------------------------------------------------
# Small sizes: the interpreter on CPU, compiled on CUDA.

SHAPES = [(1, 1, 1, 16, 16), (2, 7, 2, 32, 16), (3, 20, 2, 16, 32), (1, 13, 2, 24, 20), (4, 1, 2, 32, 32)]


@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("B,T,H,K,V", SHAPES, ids=[f"B{b}-T{t}-H{h}-K{k}-V{v}" for b, t, h, k, v in SHAPES])
def test_matches_reference(B, T, H, K, V, with_state):
    x = to(kda_inputs(B, T, H, K, V, with_state=with_state))
    scale = 0.7 if K == 24 else None
    o, ht = fused_recurrent_kda(**x, scale=scale, output_final_state=True, backend="triton")
    o_ref, ht_ref = reference(**x, scale=scale)
    assert o.dtype == torch.float32 and o.shape == (B, T, H, V)
    assert rel_err(o.cpu(), o_ref) < FP32_TOL
    assert rel_err(ht.cpu(), ht_ref) < FP32_TOL
    o2, none = fused_recurrent_kda(**x, scale=scale, backend="triton")
    assert none is None and rel_err(o2.cpu(), o_ref) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_within_twice_reference_rounding(dtype):
    """Half inputs, fp32 math, output rounded to v's dtype: the kernel's error against fp32 is bounded by
    twice what the reference itself loses when it returns that dtype (rounded to nearest, as the kernel's store
    rounds: compiled, and in the interpreter through ``tests/triton_interpreter.py``)."""
    x = to(kda_inputs(2, 9, 2, 32, 32, dtype=dtype))
    o, ht = fused_recurrent_kda(**x, output_final_state=True, backend="triton")
    assert o.dtype == dtype and ht.dtype == torch.float32
    o_ref, ht_ref = reference(**x)
    err_ref_half = rel_err(o_ref.to(dtype), o_ref)
    assert rel_err(o.cpu(), o_ref) <= 2 * err_ref_half + 1e-6
    assert rel_err(ht.cpu(), ht_ref) < FP32_TOL


def test_varlen_with_empty_segment():
    lengths = [3, 0, 11, 1]
    cu_seqlens = torch.tensor([0, 3, 3, 14, 15], dtype=torch.int32)
    T, H, K, V = sum(lengths), 2, 16, 32
    x = to(kda_inputs(1, T, H, K, V, N=len(lengths)))
    o, ht = fused_recurrent_kda(
        **x, cu_seqlens=cu_seqlens.to(DEVICE), output_final_state=True, backend="triton"
    )
    o_ref, ht_ref = reference(**x, cu_seqlens=cu_seqlens)
    assert rel_err(o.cpu(), o_ref) < FP32_TOL
    assert rel_err(ht.cpu(), ht_ref) < FP32_TOL
    assert torch.equal(ht[1].cpu(), x["initial_state"][1].cpu()), "an empty sequence passes its state through"


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_state_slots_in_place(index_dtype, varlen):
    """Sequence i reads and writes pool slot state_indices[i]; -1 starts from zeros and writes nothing; every
    slot not named is bit-identical afterwards."""
    S, H, K, V = 7, 2, 16, 16
    slots = torch.tensor([4, -1, 0, 2], dtype=index_dtype)
    N = slots.numel()
    if varlen:
        cu_seqlens = torch.tensor([0, 2, 3, 3, 8])
        x = kda_inputs(1, 8, H, K, V, with_state=False)
    else:
        cu_seqlens = None
        x = kda_inputs(N, 3, H, K, V, with_state=False)
    del x["initial_state"]
    pool = torch.randn(S, H, K, V)
    before = pool.clone()
    h0 = torch.where((slots >= 0)[:, None, None, None], pool[slots.clamp(min=0).long()], 0.0)
    o_ref, ht_ref = reference(**x, initial_state=h0, cu_seqlens=cu_seqlens)

    pool_dev = pool.clone().to(DEVICE)
    o, returned = fused_recurrent_kda(
        **to(x), initial_state=pool_dev, state_indices=slots.to(DEVICE),
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(DEVICE), backend="triton",
    )
    assert returned is pool_dev
    after = pool_dev.cpu()
    assert rel_err(o.cpu(), o_ref) < FP32_TOL
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert rel_err(after[s], ht_ref[i]) < FP32_TOL
    untouched = [s for s in range(S) if s not in slots.tolist()]
    assert torch.equal(after[untouched], before[untouched])


def test_state_slot_beyond_the_pool_touches_nothing():
    """An index >= S cannot be checked without a host sync; the kernel treats it as "no slot"."""
    S, H, K, V = 3, 2, 16, 16
    x = kda_inputs(2, 2, H, K, V, with_state=False)
    del x["initial_state"]
    pool = torch.randn(S, H, K, V)
    slots = torch.tensor([1, S + 5])
    pool_dev = pool.clone().to(DEVICE)
    o, _ = fused_recurrent_kda(
        **to(x), initial_state=pool_dev, state_indices=slots.to(DEVICE), backend="triton"
    )
    o_ref, ht_ref = reference(**x, initial_state=torch.stack([pool[1], torch.zeros(H, K, V)]))
    assert rel_err(o.cpu(), o_ref) < FP32_TOL
    assert rel_err(pool_dev[1].cpu(), ht_ref[0]) < FP32_TOL
    assert torch.equal(pool_dev.cpu()[[0, 2]], pool[[0, 2]])


def test_empty_time_axis_passes_the_state_through():
    x = to(kda_inputs(2, 0, 2, 16, 16))
    o, ht = fused_recurrent_kda(**x, output_final_state=True, backend="triton")
    assert o.shape == (2, 0, 2, 16)
    assert torch.equal(ht, x["initial_state"])


@pytest.mark.parametrize("dt_bias_on", [True, False], ids=["dt_bias", "no-dt_bias"])
@pytest.mark.parametrize("scalar_gate", [False, True], ids=["kda", "gdn"])
def test_fused_activations(scalar_gate, dt_bias_on):
    """L2 norm of q/k, the forget gate from logits (some beyond softplus's threshold) and beta from logits."""
    B, T, H, K, V = 2, 6, 2, 32, 16
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(B, T, H, K, generator=gen) * 3
    k = torch.randn(B, T, H, K, generator=gen) * 3
    v = torch.randn(B, T, H, V, generator=gen)
    g = torch.randn(*((B, T, H) if scalar_gate else (B, T, H, K)), generator=gen) * 12  # |x| > 20 occurs
    beta = torch.randn(B, T, H, generator=gen) * 2
    A_log = torch.randn(1, 1, H, 1, generator=gen) * 0.5
    dt_bias = torch.randn(H if scalar_gate else H * K, generator=gen) if dt_bias_on else None
    h0 = torch.randn(B, H, K, V, generator=gen)
    x = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0)
    o, ht = fused_recurrent_kda(
        **to(x), output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
        A_log=A_log.to(DEVICE), dt_bias=None if dt_bias is None else dt_bias.to(DEVICE),
        use_beta_sigmoid_in_kernel=True, backend="triton",
    )
    o_ref, ht_ref = reference(**x, l2norm_qk=True, A_log=A_log, dt_bias=dt_bias, beta_sigmoid=True)
    assert rel_err(o.cpu(), o_ref) < FP32_TOL
    assert rel_err(ht.cpu(), ht_ref) < FP32_TOL


def test_scalar_gate_equals_broadcast_gate():
    x = to(kda_inputs(2, 5, 2, 16, 32, scalar_gate=True))
    o, ht = fused_recurrent_kda(**x, output_final_state=True, backend="triton")
    o_ref, ht_ref = reference(**x)
    assert rel_err(o.cpu(), o_ref) < FP32_TOL
    assert rel_err(ht.cpu(), ht_ref) < FP32_TOL


def test_extreme_gates():
    """g = -1000 wipes the state exactly (no NaN); g near 0 keeps it."""
    x = kda_inputs(2, 4, 2, 16, 16)
    g = -torch.rand(x["g"].shape) * 1e-4
    g[:, 2] = -1000.0
    x["g"] = g
    o, ht = fused_recurrent_kda(**to(x), output_final_state=True, backend="triton")
    o_ref, ht_ref = reference(**x)
    assert rel_err(o.cpu(), o_ref) < FP32_TOL
    assert rel_err(ht.cpu(), ht_ref) < FP32_TOL


def test_strided_views_of_a_fused_projection():
    """q, k, v sliced from one [B, T, 3 * H * D] projection (not contiguous) give the contiguous result."""
    B, T, H, D = 3, 4, 2, 16
    parts = kda_inputs(B, T, H, D, D)
    qkv = torch.cat([parts[n].reshape(B, T, H * D) for n in ("q", "k", "v")], dim=-1).to(DEVICE)
    q, k, v = (t.view(B, T, H, D) for t in qkv.split(H * D, dim=-1))  # [B, T, H, D] views, token stride 3*H*D
    g = parts["g"].to(DEVICE)
    beta = torch.rand(B, T, H, 2, device=DEVICE)[..., 0]  # strided too
    assert not q.is_contiguous() and not beta.is_contiguous()
    o, ht = fused_recurrent_kda(q, k, v, g, beta, output_final_state=True, backend="triton")
    o_c, ht_c = fused_recurrent_kda(q.contiguous(), k.contiguous(), v.contiguous(), g, beta.contiguous(),
                                    output_final_state=True, backend="triton")
    assert rel_err(o, o_c) < FP32_TOL and rel_err(ht, ht_c) < FP32_TOL
    o_ref, _ = reference(q, k, v, g, beta)
    assert rel_err(o.cpu(), o_ref) < FP32_TOL


@pytest.mark.parametrize("block_v,num_warps", [(16, 1), (32, 2)])
def test_launch_overrides_agree(block_v, num_warps):
    x = to(kda_inputs(2, 3, 2, 32, 32))
    o, ht = fused_recurrent_kda_triton(**x, output_final_state=True, block_v=block_v, num_warps=num_warps)
    o_ref, ht_ref = reference(**x)
    assert rel_err(o.cpu(), o_ref) < FP32_TOL
    assert rel_err(ht.cpu(), ht_ref) < FP32_TOL


def test_matches_torch_backend_of_the_public_op():
    """The two backends of fused_recurrent_kda implement one contract (here: varlen + state pool)."""
    cu_seqlens = torch.tensor([0, 1, 4, 5])
    x = kda_inputs(1, 5, 2, 16, 16, with_state=False)
    del x["initial_state"]
    pool = torch.randn(5, 2, 16, 16)
    slots = torch.tensor([3, 1, -1])
    pool_t = pool.clone()
    o_t, _ = fused_recurrent_kda(**x, initial_state=pool_t, state_indices=slots, cu_seqlens=cu_seqlens,
                                 backend="torch")
    pool_k = pool.clone().to(DEVICE)
    o_k, _ = fused_recurrent_kda(**to(x), initial_state=pool_k, state_indices=slots.to(DEVICE),
                                 cu_seqlens=cu_seqlens.to(DEVICE), backend="triton")
    assert rel_err(o_k.cpu(), o_t) < FP32_TOL
    assert rel_err(pool_k.cpu(), pool_t) < FP32_TOL
    assert torch.equal(pool_k.cpu()[[0, 2, 4]], pool[[0, 2, 4]])


def test_non_contiguous_pool_is_refused():
    x = to(kda_inputs(2, 1, 2, 16, 16, with_state=False))
    del x["initial_state"]
    pool = torch.randn(2, 16, 16, 4, device=DEVICE).permute(3, 0, 1, 2)  # [4, H, K, V], not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        fused_recurrent_kda(**x, initial_state=pool, state_indices=torch.tensor([0, 1], device=DEVICE),
                            backend="triton")


@pytest.mark.parametrize("per_token", [False, True], ids=["slot-per-sequence", "slot-per-token"])
def test_paged_pool_and_strided_slots(per_token):
    """A serving engine's cache: pool slots spaced wider than one state (a page holding more than this layer's
    state) and slots read from a column of a wider table. Same result as a contiguous pool and index tensor;
    nothing between the slots is touched."""
    H, D, S, N = 2, 16, 6, 3
    x = kda_inputs(1, 2 * N, H, D, D, with_state=False)
    del x["initial_state"]
    cu_seqlens = torch.tensor([0, 2, 4, 6])
    pages = torch.randn(S, H * D * D + 5)  # 5 elements of something else after each slot's state
    table = torch.tensor([[4, 7, 7], [-1, 7, 7], [1, 7, 7]]) if not per_token else torch.tensor(
        [[4, 0, 9], [-1, 3, 9], [1, 5, 9]])
    slots = table[:, 0] if not per_token else table[:, :2]  # strided views of the table
    assert not slots.is_contiguous() or slots.dim() == 1 and slots.stride(0) != 1
    pool = pages[:, : H * D * D].view(S, H, D, D)  # [S, H, K, V], slot stride H*D*D + 5
    assert not pool.is_contiguous()
    pool_ref = pool.clone()
    o_ref, _ = fused_recurrent_kda(**x, initial_state=pool_ref, state_indices=slots.contiguous(),
                                   cu_seqlens=cu_seqlens, backend="torch")
    pages_k = pages.clone().to(DEVICE)
    pool_k = pages_k[:, : H * D * D].view(S, H, D, D)
    o_k, ret = fused_recurrent_kda(**to(x), initial_state=pool_k, state_indices=slots.to(DEVICE),
                                   cu_seqlens=cu_seqlens.to(DEVICE), backend="triton")
    assert ret is pool_k
    assert rel_err(o_k.cpu(), o_ref) < FP32_TOL
    assert rel_err(pool_k.cpu(), pool_ref) < FP32_TOL
    assert torch.equal(pages_k.cpu()[:, H * D * D :], pages[:, H * D * D :])


def _truncated(x: torch.Tensor) -> torch.Tensor:
    """fp32 x cut to bf16 precision (low 16 bits dropped), as fp32: what a store without rounding would keep."""
    return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


BF16_POOL_LAYOUTS = {  # name -> (cu_seqlens or None, B, T, slots)
    "decode-B3-T1": (None, 3, 1, [4, -1, 1]),
    "varlen-T2-1-4": ([0, 2, 3, 7], 1, 7, [4, -1, 1]),
    "slot-per-token-B2-T2": (None, 2, 2, [[0, 3], [1, 5]]),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", list(BF16_POOL_LAYOUTS.values()), ids=list(BF16_POOL_LAYOUTS))
def test_bf16_pool_stores_the_fp32_recurrence_rounded(layout, backend):
    """A bf16 state pool (the serving cache's ``state_dtype=bfloat16``): a call reads its slots widened to fp32,
    runs the fp32 recurrence over its tokens and stores each state it writes rounded to nearest bf16. Reference:
    paper Eq. 1 in fp32 from the same bf16 states, rounded once per store. The output matches it to fp32
    precision; slots no sequence names stay bit-identical."""
    cu, B, T, slots = layout
    S, H, K, V = 6, 2, 16, 32
    gen = torch.Generator().manual_seed(B * 10 + T)
    x = kda_inputs(B, T, H, K, V, with_state=False, generator=gen)
    del x["initial_state"]
    pool = torch.randn(S, H, K, V, generator=gen).bfloat16()
    slots = torch.tensor(slots)
    first = slots if slots.dim() == 1 else slots[:, 0]
    h0 = torch.where((first >= 0)[:, None, None, None], pool[first.clamp(min=0)].float(), 0.0)
    cu_seqlens = None if cu is None else torch.tensor(cu)
    o_ref, ht_ref = reference(**x, initial_state=h0, cu_seqlens=cu_seqlens)
    if slots.dim() == 2:  # the state after each token goes to that token's slot
        _, _, every = naive_recurrent_kda(**x, initial_state=h0, output_all_states=True)
        written, expected = slots.flatten(), every.flatten(0, 1)  # [B*T], [B*T, H, K, V]
    else:
        written, expected = first[first >= 0], ht_ref[first >= 0]

    pool_dev = pool.clone().to(DEVICE)
    o, returned = fused_recurrent_kda(
        **to(x), initial_state=pool_dev, state_indices=slots.to(DEVICE),
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(DEVICE), backend=backend,
    )
    after = pool_dev.cpu()
    assert returned is pool_dev and after.dtype == torch.bfloat16
    assert rel_err(o.cpu(), o_ref) < FP32_TOL
    assert rounded_to_nearest(after[written], expected)
    assert not rounded_to_nearest(_truncated(expected).bfloat16(), expected), "the check must see truncation"
    untouched = [i for i in range(S) if i not in written.tolist()]
    assert torch.equal(after[untouched], pool[untouched])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_pool_decode_chain_follows_the_rounded_reference(backend):
    """Twelve decode steps on one bf16 pool against the reference chain that rounds its fp32 state to bf16 after
    every step (the contract): equal up to the rare element whose rounding an fp32 summation-order difference
    flips. Measured on the CPU: ~1e-5 relative on the outputs and ~3e-5 on the states; keeping the state in fp32
    instead differs from the rounded chain by ~2e-3 and truncating it by ~4e-3, so 1e-4 tells them apart."""
    S, H, K, V, steps = 6, 2, 32, 32, 12
    gen = torch.Generator().manual_seed(5)
    slots = torch.tensor([4, 1, 3])
    pool = torch.randn(S, H, K, V, generator=gen).bfloat16()
    state_ref = pool[slots].float()
    pool_dev = pool.clone().to(DEVICE)
    outs, outs_ref = [], []
    for _ in range(steps):
        x = kda_inputs(3, 1, H, K, V, with_state=False, generator=gen)
        del x["initial_state"]
        o, _ = fused_recurrent_kda(**to(x), initial_state=pool_dev, state_indices=slots.to(DEVICE), backend=backend)
        o_ref, state_ref = reference(**x, initial_state=state_ref)
        state_ref = state_ref.bfloat16().float()
        outs.append(o.cpu())
        outs_ref.append(o_ref)
    assert rel_err(torch.cat(outs, 1), torch.cat(outs_ref, 1)) < 1e-4
    assert rel_err(pool_dev.cpu()[slots].float(), state_ref) < 1e-4


def test_bad_state_indices_shape_is_refused():
    x = to(kda_inputs(2, 1, 2, 16, 16, with_state=False))
    del x["initial_state"]
    pool = torch.randn(4, 2, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="state_indices"):
        fused_recurrent_kda(**x, initial_state=pool, state_indices=torch.tensor([0, 1, 2], device=DEVICE),
                            backend="triton")


# ------------------------------------------------------------------------------------------------------------
# Real decode sizes on the GPU.


def _decode_case(B, T, H=32, K=128, V=128, S=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = kda_inputs(B, T, H, K, V, dtype=torch.bfloat16, with_state=False, generator=gen)
    del x["initial_state"]
    S = S or B + 16
    pool = torch.randn(S, H, K, V, generator=gen)
    slots = torch.randperm(S, generator=gen)[:B]
    slots[3::7] = -1
    return x, pool, slots


def _check_decode(o, pool_after, x, pool, slots):
    h0 = torch.where((slots >= 0)[:, None, None, None], pool[slots.clamp(min=0)], 0.0)
    o_ref, ht_ref = reference(**x, initial_state=h0)
    err_half = rel_err(o_ref.to(torch.bfloat16), o_ref)
    assert rel_err(o.cpu(), o_ref) <= 2 * err_half + 1e-6
    written = slots >= 0
    assert rel_err(pool_after[slots[written]], ht_ref[written]) < FP32_TOL
    untouched = torch.ones(pool.shape[0], dtype=torch.bool)
    untouched[slots[written]] = False
    assert torch.equal(pool_after[untouched], pool[untouched])


GPU_CASES = [(1, 1), (16, 1), (256, 1), (4, 64)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B,T", GPU_CASES, ids=[f"B{b}-T{t}" for b, t in GPU_CASES])
def test_gpu_decode_sizes(B, T):
    x, pool, slots = _decode_case(B, T)
    pool_dev = pool.cuda()
    o, _ = fused_recurrent_kda(**to(x, "cuda"), initial_state=pool_dev, state_indices=slots.cuda())
    torch.cuda.synchronize()
    _check_decode(o, pool_dev.cpu(), x, pool, slots)


@pytest.mark.gpu
@gpu
def test_gpu_varlen_fused_activations_real_size():
    lengths = [5, 0, 130, 1, 64]
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    T, H, K, V = sum(lengths), 32, 128, 128
    gen = torch.Generator().manual_seed(3)
    x = dict(
        q=torch.randn(1, T, H, K, generator=gen), k=torch.randn(1, T, H, K, generator=gen),
        v=torch.randn(1, T, H, V, generator=gen), g=torch.randn(1, T, H, K, generator=gen),
        beta=torch.randn(1, T, H, generator=gen),
        initial_state=torch.randn(len(lengths), H, K, V, generator=gen),
    )
    x = {n: (t.bfloat16() if n != "initial_state" else t) for n, t in x.items()}
    A_log, dt_bias = torch.randn(H, generator=gen) * 0.3, torch.randn(H * K, generator=gen)
    o, ht = fused_recurrent_kda(
        **to(x, "cuda"), cu_seqlens=cu_seqlens.cuda(), output_final_state=True, use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True, A_log=A_log.cuda(), dt_bias=dt_bias.cuda(), use_beta_sigmoid_in_kernel=True,
    )
    o_ref, ht_ref = reference(**x, cu_seqlens=cu_seqlens, l2norm_qk=True, A_log=A_log, dt_bias=dt_bias,
                              beta_sigmoid=True)
    assert rel_err(o.cpu(), o_ref) <= 2 * rel_err(o_ref.bfloat16(), o_ref) + 1e-6
    assert rel_err(ht.cpu(), ht_ref) < FP32_TOL


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_capture_and_replay():
    """Two decode steps replayed from one captured graph; new inputs are copied into its static buffers."""
    B = 8
    steps = [_decode_case(B, 1, seed=s)[0] for s in (10, 11)]
    _, pool, slots = _decode_case(B, 1, seed=12)
    static = to(steps[0], "cuda")
    pool_dev, slots_dev = pool.cuda(), slots.cuda()
    scratch = pool_dev.clone()
    # Compile outside the capture.
    fused_recurrent_kda(**static, initial_state=scratch, state_indices=slots_dev)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_static, _ = fused_recurrent_kda(**static, initial_state=pool_dev, state_indices=slots_dev)
    torch.cuda.synchronize()
    assert torch.equal(pool_dev.cpu(), pool), "capturing must not run the kernel"

    expected_pool = pool.clone()
    for x in steps:
        for n, t in to(x, "cuda").items():
            if t is not None:
                static[n].copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        _check_decode(o_static, pool_dev.cpu(), x, expected_pool, slots)
        h0 = torch.where((slots >= 0)[:, None, None, None], expected_pool[slots.clamp(min=0)], 0.0)
        _, ht_ref = reference(**x, initial_state=h0)
        written = slots >= 0
        expected_pool[slots[written]] = ht_ref[written]
