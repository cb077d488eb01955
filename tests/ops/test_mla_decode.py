"""Absorbed MLA decode attention: the Triton split-K kernel against the PyTorch reference.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set below before the kernel module
imports Triton) at small sizes: H 2..4, r 32..64 (a non-power of two included), rope 16, L_max up to 300, one batch
mixing lengths 0, 1, 37, L_max and beyond L_max, several split counts (so that some pieces are empty), strided
inputs, int32 and int64 lengths. Every buffer the kernels write is poisoned with NaN first. With CUDA the same cases
run compiled, plus the release shape (H=32, r=512, rope 64, bf16, L up to 64k) and a CUDA-graph capture.

Error budget for 16-bit caches: the kernel's relative RMS error against the fp32 reference on the original fp32
inputs must be at most twice the error of that same reference run on the 16-bit-rounded inputs (which also rounds
its scores and output to 16 bits), and below BF16_ABS.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kimi_linear.ops.mla_decode as mla_decode  # noqa: E402
from kimi_linear.ops.mla_decode import (  # noqa: E402
    default_launch,
    default_num_splits,
    mla_decode_attention,
    mla_decode_attention_reference,
)
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

FP32_TOL = 2e-6  # exact fp32 dots on both sides, only the order of summation differs (measured ~1e-7)
BF16_ABS = 2e-2
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_inputs(B, H, R, DR, L_max, seed=0, device="cpu"):
    """fp32 queries and caches whose scaled scores spread over a few units (a softmax that is neither flat nor
    one-hot); the softmax scale is (R + DR) ** -0.5, as MLA's (dn + dr) ** -0.5 at the release shape."""
    gen = torch.Generator().manual_seed(seed)
    x = dict(
        q_latent=torch.randn(B, H, R, generator=gen),
        q_pe=torch.randn(B, H, DR, generator=gen),
        latent_cache=torch.randn(B, L_max, R, generator=gen),
        pe_cache=torch.randn(B, L_max, DR, generator=gen),
    )
    return {n: t.to(device) for n, t in x.items()}, (R + DR) ** -0.5 * 1.5


def to_dtype(x: dict, dtype) -> dict:
    return {n: t.to(dtype) for n, t in x.items()}


def run_triton(x, lengths, scale, **kw):
    """The Triton path with every buffer it writes poisoned with NaN first."""
    launch = replace(default_launch(x["latent_cache"].element_size()), poison_outputs=True)
    return mla_decode_attention(**x, lengths=lengths, scale=scale, backend="triton", launch=launch, **kw)


def to_paged(x: dict, block_size: int, num_blocks: int, seed: int):
    """The dense caches scattered into a shuffled block pool of ``num_blocks`` (random filler elsewhere);
    returns (inputs with the pools, block_table [B, L_max / block_size])."""
    B, L_max, _ = x["latent_cache"].shape
    M = L_max // block_size
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=gen)[: B * M].view(B, M).to(x["latent_cache"].device)
    paged = dict(x)
    for name in ("latent_cache", "pe_cache"):
        dense = x[name]
        pool = torch.randn(num_blocks, block_size, dense.shape[-1], generator=gen).to(dense)
        pool[order.reshape(-1)] = dense.reshape(B * M, block_size, -1)
        paged[name] = pool
    return paged, order


CASES = [  # B, H, R, DR, lengths (L_max = the last one unless given), num_splits
    (3, 2, 32, 16, [1, 37, 300], 300, [1, 2, 7, 40]),  # 40: the merge loops over its pieces in blocks
    (5, 3, 40, 16, [0, 1, 37, 300, 450], 300, [1, 4, None]),
    (2, 4, 64, 16, [65, 128], 128, [3, 16]),
]


@pytest.mark.parametrize(
    "B,H,R,DR,lengths,L_max,splits", CASES, ids=[f"B{c[0]}-H{c[1]}-R{c[2]}-DR{c[3]}-L{c[5]}" for c in CASES]
)
def test_fp32_matches_reference(B, H, R, DR, lengths, L_max, splits):
    x, scale = make_inputs(B, H, R, DR, L_max, seed=B * 7 + H, device=DEVICE)
    lengths = torch.tensor(lengths, device=DEVICE)
    ref = mla_decode_attention_reference(**x, lengths=lengths, scale=scale)
    for num_splits in splits:
        out = run_triton(x, lengths, scale, num_splits=num_splits)
        assert out.dtype == torch.float32 and out.shape == (B, H, R)
        assert rel_err(out, ref) < FP32_TOL, f"num_splits={num_splits}"
    empty = lengths <= 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))  # a row of length 0 is zeros, not NaN


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_within_error_budget(dtype):
    B, H, R, DR, L_max = 4, 4, 64, 16, 300
    x, scale = make_inputs(B, H, R, DR, L_max, seed=11, device=DEVICE)
    lengths = torch.tensor([300, 1, 37, 170], device=DEVICE)
    ref = mla_decode_attention_reference(**x, lengths=lengths, scale=scale)
    x16 = to_dtype(x, dtype)
    err_half = rel_err(mla_decode_attention_reference(**x16, lengths=lengths, scale=scale), ref)
    for num_splits in (1, 5):
        out = run_triton(x16, lengths, scale, num_splits=num_splits)
        assert out.dtype == dtype
        err = rel_err(out, ref)
        assert err <= 2 * err_half and err < BF16_ABS, (num_splits, err, err_half)


def test_strided_inputs_and_int32_lengths():
    """Queries as transposed views, caches as column slices of wider buffers (row stride > r), int32 lengths."""
    B, H, R, DR, L_max = 3, 3, 32, 16, 100
    x, scale = make_inputs(B, H, R, DR, L_max, seed=5, device=DEVICE)
    lengths = torch.tensor([100, 2, 64], device=DEVICE, dtype=torch.int32)
    ref = mla_decode_attention_reference(**x, lengths=lengths.long(), scale=scale)
    wide = torch.cat([x["latent_cache"], x["pe_cache"]], dim=-1)  # [B, L_max, R + DR], as one fused projection
    strided = dict(
        q_latent=x["q_latent"].transpose(0, 1).contiguous().transpose(0, 1),  # [B, H, R], strides (R, B R, 1)
        q_pe=x["q_pe"].transpose(0, 1).contiguous().transpose(0, 1),
        latent_cache=wide[..., :R],
        pe_cache=wide[..., R:],
    )
    assert not strided["q_latent"].is_contiguous() and not strided["latent_cache"].is_contiguous()
    out = run_triton(strided, lengths, scale, num_splits=3)
    assert rel_err(out, ref) < FP32_TOL


def test_only_valid_positions_count():
    """Changing cache rows at positions >= length (to huge values, even NaN) changes nothing."""
    B, H, R, DR, L_max = 2, 2, 32, 16, 200
    x, scale = make_inputs(B, H, R, DR, L_max, seed=6, device=DEVICE)
    lengths = torch.tensor([70, 129], device=DEVICE)
    before = run_triton(x, lengths, scale, num_splits=4)
    for b, n in enumerate(lengths.tolist()):
        x["latent_cache"][b, n:] = float("nan")
        x["pe_cache"][b, n:] = 1e30
    after = run_triton(x, lengths, scale, num_splits=4)
    assert torch.equal(before, after)


@pytest.mark.parametrize("block_size,num_splits", [(16, 1), (32, 3), (64, None)], ids=["bs16-s1", "bs32-s3", "bs64-sauto"])
def test_paged_matches_dense_reference(block_size, num_splits):
    """A block-table read of a shuffled pool equals the reference on the dense caches (reference and kernel)."""
    B, H, R, DR, L_max = 3, 2, 32, 16, 192
    x, scale = make_inputs(B, H, R, DR, L_max, seed=block_size, device=DEVICE)
    lengths = torch.tensor([192, 1, 70], device=DEVICE)
    ref = mla_decode_attention_reference(**x, lengths=lengths, scale=scale)
    paged, table = to_paged(x, block_size, num_blocks=3 * L_max // block_size + 5, seed=block_size)
    ref_paged = mla_decode_attention_reference(**paged, lengths=lengths, scale=scale, block_table=table)
    assert rel_err(ref_paged, ref) < 1e-6
    out = run_triton(paged, lengths, scale, num_splits=num_splits, block_table=table)
    assert rel_err(out, ref) < FP32_TOL


def test_paged_block_size_must_fit_the_tile():
    x, scale = make_inputs(2, 2, 32, 16, 48, seed=3, device=DEVICE)
    paged, table = to_paged(x, 24, num_blocks=6, seed=3)  # 24 is not a multiple of the fp32 tile (16)
    with pytest.raises(ValueError, match="block size"):
        run_triton(paged, torch.tensor([48, 5], device=DEVICE), scale, block_table=table)
    with pytest.raises(ValueError, match="block_table"):
        mla_decode_attention(**paged, lengths=torch.tensor([48, 5]), scale=scale, block_table=table[:1].cpu())


def test_auto_backend_on_cpu_is_the_reference():
    x, scale = make_inputs(2, 3, 24, 6, 30, seed=7)
    lengths = torch.tensor([30, 4])
    assert torch.equal(
        mla_decode_attention(**x, lengths=lengths, scale=scale),
        mla_decode_attention_reference(**x, lengths=lengths, scale=scale),
    )


def test_reference_is_the_plain_softmax():
    """The reference against a per-row, per-head loop over the valid prefix only (no mask), in float64."""
    B, H, R, DR, L_max = 3, 2, 16, 8, 20
    x, scale = make_inputs(B, H, R, DR, L_max, seed=8)
    lengths = torch.tensor([20, 1, 9])
    out = mla_decode_attention_reference(**x, lengths=lengths, scale=scale)
    for b, n in enumerate(lengths.tolist()):
        for h in range(H):
            c, pe = x["latent_cache"][b, :n].double(), x["pe_cache"][b, :n].double()
            score = (c @ x["q_latent"][b, h].double() + pe @ x["q_pe"][b, h].double()) * scale  # [n]
            expected = torch.softmax(score, 0) @ c  # [R]
            assert rel_err(out[b, h], expected) < 1e-6


def test_validation_errors():
    x, scale = make_inputs(2, 3, 24, 6, 30, seed=9)
    lengths = torch.tensor([30, 4])
    with pytest.raises(ValueError, match="latent_cache"):
        mla_decode_attention(**{**x, "latent_cache": x["latent_cache"][:, :, :20]}, lengths=lengths, scale=scale)
    with pytest.raises(ValueError, match="pe_cache"):
        mla_decode_attention(**{**x, "pe_cache": x["pe_cache"][:, :10]}, lengths=lengths, scale=scale)
    with pytest.raises(ValueError, match="q_pe"):
        mla_decode_attention(**{**x, "q_pe": x["q_pe"][:1]}, lengths=lengths, scale=scale)
    with pytest.raises(ValueError, match="lengths"):
        mla_decode_attention(**x, lengths=lengths[:1], scale=scale)
    with pytest.raises(TypeError, match="lengths"):
        mla_decode_attention(**x, lengths=lengths.float(), scale=scale)
    with pytest.raises(TypeError, match="share a dtype"):
        mla_decode_attention(**{**x, "pe_cache": x["pe_cache"].double()}, lengths=lengths, scale=scale)
    with pytest.raises(ValueError, match="backend"):
        mla_decode_attention(**x, lengths=lengths, scale=scale, backend="cuda")
    x_dev = {n: t.to(DEVICE) for n, t in x.items()}
    with pytest.raises(ValueError, match="num_splits"):
        run_triton(x_dev, lengths.to(DEVICE), scale, num_splits=0)


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_registered_op_under_torch_compile(paged):
    """torch.compile(fullgraph=True) sees the registered op (Dynamo does not trace the kernel launch): its output
    equals the eager call's; the op passes torch.library.opcheck (schema, fake implementation)."""
    x, scale = make_inputs(3, 2, 32, 16, 128, seed=9, device=DEVICE)
    lengths = torch.tensor([5, 128, 0], device=DEVICE)
    table = None
    if paged:
        x, table = to_paged(x, 32, 16, seed=10)
    backend = "triton" if DEVICE == "cuda" else "torch"
    call = lambda x, lengths, table: mla_decode_attention(**x, lengths=lengths, scale=scale, backend=backend,
                                                         block_table=table)
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="eager" if DEVICE == "cpu" else "inductor")
    assert torch.equal(compiled(x, lengths, table), call(x, lengths, table))
    torch.library.opcheck(
        torch.ops.kimi_linear.mla_decode_attention.default,
        (x["q_latent"], x["q_pe"], x["latent_cache"], x["pe_cache"], lengths, scale, backend, table, None),
    )


def test_default_num_splits_fills_the_sms():
    # one wave of programs on 132 SMs at the benchmark's batches
    assert default_num_splits(1, 2**20, 132) == 132
    assert default_num_splits(8, 2**17, 132) == 16
    assert default_num_splits(64, 2**17, 132) == 2
    # batches that one wave would leave a third idle: several waves with few idle SM slots instead
    for B in (50, 80, 100):
        s = default_num_splits(B, 2**20, 132)
        programs = B * s
        assert programs <= 4 * 132 and programs / (math.ceil(programs / 132) * 132) >= 0.9, (B, s)
    # short caches: no piece below MIN_TOKENS_PER_SPLIT positions of L_max
    assert default_num_splits(1, 4096, 132) == 4096 // mla_decode.MIN_TOKENS_PER_SPLIT
    assert default_num_splits(1, 100, 132) == 1
    assert default_num_splits(1000, 2**20, 132) == 1


# ---- GPU only: the release shape, compiled ------------------------------------------------------------------


def _budget_check(out, x32, lengths, scale):
    ref = mla_decode_attention_reference(**x32, lengths=lengths, scale=scale)
    ref16 = mla_decode_attention_reference(**to_dtype(x32, out.dtype), lengths=lengths, scale=scale)
    err, err_half = rel_err(out, ref), rel_err(ref16, ref)
    assert err <= 2 * err_half and err < BF16_ABS, (err, err_half)


GPU_CASES = [  # B, L_max, lengths, num_splits
    (3, 65536, [1, 4097, 65536], None),
    (3, 65536, [1, 4097, 65536], 1),
    (1, 65536, [65536], None),
    (8, 8192, [8192, 1, 63, 64, 65, 5000, 0, 8191], None),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B,L_max,lengths,num_splits", GPU_CASES,
                         ids=[f"B{c[0]}-L{c[1]}-splits{c[3] or 'auto'}" for c in GPU_CASES])
def test_gpu_release_shape_bf16(B, L_max, lengths, num_splits):
    H, R, DR = 32, 512, 64
    x, _ = make_inputs(B, H, R, DR, L_max, seed=B + L_max, device="cuda")
    x["q_latent"] *= 0.5  # with RMS-normalised latents the real q_latent is of this order
    scale = 192**-0.5
    lengths = torch.tensor(lengths, device="cuda")
    out = mla_decode_attention(**to_dtype(x, torch.bfloat16), lengths=lengths, scale=scale, num_splits=num_splits)
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16
    _budget_check(out, x, lengths, scale)


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_capture_and_replay():
    """One captured call replayed after the lengths and the cache contents change in place."""
    B, H, R, DR, L_max = 4, 32, 512, 64, 4096
    scale = 192**-0.5
    x, _ = make_inputs(B, H, R, DR, L_max, seed=1, device="cuda")
    static = to_dtype(x, torch.bfloat16)
    lengths = torch.tensor([4096, 1, 300, 2000], device="cuda")
    mla_decode_attention(**static, lengths=lengths, scale=scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode_attention(**static, lengths=lengths, scale=scale)
    for seed, new_lengths in ((2, [17, 4096, 1, 1000]), (3, [4000, 64, 65, 0])):
        x, _ = make_inputs(B, H, R, DR, L_max, seed=seed, device="cuda")
        for n, t in to_dtype(x, torch.bfloat16).items():
            static[n].copy_(t)
        lengths.copy_(torch.tensor(new_lengths))
        graph.replay()
        torch.cuda.synchronize()
        _budget_check(out, x, lengths, scale)
