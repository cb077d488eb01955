"""MLA with NoPE: vs a readable reference (all gradients), absorbed decode, varlen, padding, RoPE ablation.

The absorbed decode's attention (``kimi_linear.ops.mla_decode``) is checked here at the layer level: its Triton
kernel (Triton's interpreter without CUDA, at small sizes) against the PyTorch path, and on a GPU at the release's
MLA shape in bf16.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    # before anything imports the kernel module: its kernels are defined for the interpreter then
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kimi_linear.cache import KimiLinearCache
from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.mla import MultiheadLatentAttention
from tests.utils import rel_err


def small_config(**overrides) -> KimiLinearConfig:
    values = dict(
        hidden_size=40,
        num_attention_heads=3,
        kv_lora_rank=24,
        qk_nope_head_dim=12,
        qk_rope_head_dim=6,
        v_head_dim=10,
        num_hidden_layers=1,
        kda_layers=[],
        full_attn_layers=[0],
    )
    values.update(overrides)
    return KimiLinearConfig.from_preset("debug", **values)


def randomised_layer(config, seed=0) -> MultiheadLatentAttention:
    torch.manual_seed(seed)
    layer = MultiheadLatentAttention(config, 0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0) + (1.0 if p.dim() == 1 else 0.0))
    return layer


def fp32_and_bf16_layers(config, seed):
    """The same randomised layer on the GPU in fp32 and in bf16, with unit-gain weights: scaled scores of std ~1,
    a softmax neither flat nor one-hot."""
    layer32 = randomised_layer(config, seed=seed).cuda()
    with torch.no_grad():
        for p in layer32.parameters():
            if p.dim() > 1:
                p.mul_(1.0 / (p.std() * math.sqrt(p.shape[1])))
    layer16 = randomised_layer(config, seed=seed).cuda().bfloat16()
    layer16.load_state_dict(layer32.state_dict())
    return layer32, layer16


def rope_complex(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as a complex rotation of the pairs (x_i, x_{i + d/2}): an independent form of rotate-half."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[..., None] * freq  # [T, d/2]
    while angle.dim() < x.dim():  # broadcast over the head dims between T and d
        angle = angle[..., None, :]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * torch.polar(
        torch.ones_like(angle), angle
    )
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def reference_mla(layer: MultiheadLatentAttention, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """MLA (paper §4) written out for one sequence ``x [T, D]``; ``visible [T, T]`` bool: the keys each query may see."""
    T = x.shape[0]
    H, dn, dr, dv, r = layer.num_heads, layer.nope_dim, layer.rope_dim, layer.v_dim, layer.kv_lora_rank
    q = (x @ layer.q_proj.weight.T).view(T, H, dn + dr)
    ckv = x @ layer.kv_a_proj_with_mqa.weight.T
    latent, k_pe = ckv[:, :r], ckv[:, r:]
    latent = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + layer.config.rms_norm_eps)
    latent = latent * layer.kv_a_layernorm.weight
    kv = (latent @ layer.kv_b_proj.weight.T).view(T, H, dn + dv)
    q_nope, q_pe = q[..., :dn], q[..., dn:]
    if layer.use_rope:
        pos = torch.arange(T)
        q_pe = rope_complex(q_pe, pos, layer.config.rope_theta)
        k_pe = rope_complex(k_pe[:, None], pos, layer.config.rope_theta)[:, 0]
    scores = torch.einsum("thd,shd->hts", q_nope, kv[..., :dn]) + torch.einsum("thd,sd->hts", q_pe, k_pe)
    scores = (scores / math.sqrt(dn + dr)).masked_fill(~visible, float("-inf"))
    o = torch.einsum("hts,shv->thv", scores.softmax(-1), kv[..., dn:])
    return o.reshape(T, H * dv) @ layer.o_proj.weight.T


def causal(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


@pytest.mark.parametrize("use_nope", [True, False], ids=["nope", "rope"])
def test_mla_matches_reference_with_all_gradients(use_nope):
    layer = randomised_layer(small_config(mla_use_nope=use_nope), seed=int(use_nope))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 19, layer.config.hidden_size, generator=gen, requires_grad=True)
    y = layer(x)
    y_ref = torch.stack([reference_mla(layer, x[b], causal(19)) for b in range(2)])
    assert rel_err(y, y_ref) < 1e-5
    gy = torch.randn(y.shape, generator=gen)
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad((y * gy).sum(), [x, *params.values()])
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), [x, *params.values()])
    for name, g, g_ref in zip(["x", *params], grads, grads_ref, strict=False):
        assert g_ref.norm() > 0, name
        assert rel_err(g, g_ref) < 1e-4, name


@pytest.mark.parametrize("use_nope", [True, False], ids=["nope", "rope"])
def test_absorbed_decode_and_cached_prefill_match_full_forward(use_nope):
    config = small_config(mla_use_nope=use_nope)
    layer = randomised_layer(config, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 21, config.hidden_size, generator=gen)
    with torch.no_grad():
        full = layer(x)
        cache = KimiLinearCache(config, batch_size=3, max_length=30)
        outs = []
        for chunk in (x[:, :7], x[:, 7:12]):  # prefill, then a multi-token continuation
            outs.append(layer(chunk, cache=cache))
            cache.lengths += chunk.shape[1]
        for t in range(12, 21):  # absorbed one-token steps
            outs.append(layer(x[:, t : t + 1], cache=cache))
            cache.lengths += 1
        assert rel_err(torch.cat(outs, 1), full) < 1e-5
        latent = layer._queries_and_latents(x)[1]
        assert rel_err(cache.layers[0]["latent"][:, :21], latent) < 1e-6  # the cache holds latents, not K/V
        assert cache.layers[0]["latent"].shape[-1] + cache.layers[0]["k_pe"].shape[-1] == 24 + 6


@pytest.mark.parametrize("lengths", [[5, 0, 5, 5, 12, 2], [6, 6, 6], [7]])
def test_packed_equal_lengths_are_attended_without_a_gather(lengths):
    """Equal-length sequences back to back (an empty one between them) are one reshaped batch; with other
    buckets beside them, or covering the whole pack, or alone: each sequence's output is its own."""
    config = small_config()
    layer = randomised_layer(config, seed=7)
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(L, config.hidden_size, generator=gen) for L in lengths]
    with torch.no_grad():
        separate = [layer(x[None])[0] for x in xs if len(x)]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        packed = layer(torch.cat(xs)[None], cu_seqlens=cu)[0]
    assert rel_err(packed, torch.cat(separate)) < 1e-5


def test_varlen_and_padding_match_separate_sequences():
    config = small_config()
    layer = randomised_layer(config, seed=5)
    gen = torch.Generator().manual_seed(6)
    # buckets of one and of several sequences (1, 1 / 3, 4 / 9, 11), an empty one
    lengths = [4, 0, 11, 1, 3, 9, 1]
    xs = [torch.randn(L, config.hidden_size, generator=gen) for L in lengths]
    with torch.no_grad():
        separate = [layer(x[None])[0] for x in xs if len(x)]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        packed = layer(torch.cat(xs)[None], cu_seqlens=cu)[0]
        assert rel_err(packed, torch.cat(separate)) < 1e-5
        # varlen prefill into a cache (one row per sequence, the empty one included), then one absorbed step
        cache = KimiLinearCache(config, batch_size=len(lengths), max_length=16)
        packed_cached = layer(torch.cat(xs)[None], cu_seqlens=cu, cache=cache)[0]
        assert rel_err(packed_cached, torch.cat(separate)) < 1e-5
        # a second packed piece on top of that history (one row gets no new token) == each sequence whole
        cache.lengths += cu[1:] - cu[:-1]
        more = [2, 3, 0, 4, 1, 2, 5]
        ys = [torch.randn(n, config.hidden_size, generator=gen) for n in more]
        cu2 = torch.tensor([0, *torch.tensor(more).cumsum(0).tolist()])
        second = layer(torch.cat(ys)[None], cu_seqlens=cu2, cache=cache)[0]
        whole = [layer(torch.cat([x, y])[None])[0, len(x):] for x, y in zip(xs, ys, strict=True) if len(y)]
        assert rel_err(second, torch.cat(whole)) < 1e-5
        # left and right padding: real positions unchanged
        T = 11
        batch = torch.randn(2, T, config.hidden_size, generator=gen)
        mask = torch.ones(2, T, dtype=torch.long)
        mask[0, :6] = 0  # left padding
        mask[1, 8:] = 0  # right padding
        padded = layer(batch, attention_mask=mask)
        assert rel_err(padded[0, 6:], layer(batch[:1, 6:])[0]) < 1e-5
        assert rel_err(padded[1, :8], layer(batch[1:, :8])[0]) < 1e-5


def test_packed_pieces_mixing_fresh_and_continued_sequences(monkeypatch):
    """A chunked-prefill step: some packed pieces start their sequence, others continue one from the cache.
    Each piece's output is that of its whole sequence; the fresh pieces are attended together (one call per
    length bucket), only the continued ones one by one."""
    config = small_config()
    layer = randomised_layer(config, seed=9)
    gen = torch.Generator().manual_seed(10)
    past = [0, 6, 0, 0, 3, 0]  # tokens each row already holds
    new = [5, 4, 5, 5, 0, 7]  # the step's piece per row (rows 0, 2, 3: equal lengths; row 4: none)
    D = config.hidden_size
    history = [torch.randn(n, D, generator=gen) for n in past]
    pieces = [torch.randn(n, D, generator=gen) for n in new]
    calls = []
    attend = layer._attend
    monkeypatch.setattr(layer, "_attend", lambda *a, **k: calls.append(a[0].shape) or attend(*a, **k))
    with torch.no_grad():
        cache = KimiLinearCache(config, batch_size=len(past), max_length=16)
        cu = torch.tensor([0, *torch.tensor(past).cumsum(0).tolist()])
        layer(torch.cat(history)[None], cu_seqlens=cu, cache=cache)
        cache.lengths += torch.tensor(past)
        calls.clear()
        cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()])
        step = layer(torch.cat(pieces)[None], cu_seqlens=cu, cache=cache)[0]
        step_calls = [tuple(c[:2]) for c in calls]
        whole = [layer(torch.cat([h, x])[None])[0, len(h):] for h, x in zip(history, pieces, strict=True) if len(x)]
    assert rel_err(step, torch.cat(whole)) < 1e-5
    # the fresh rows 0, 2, 3, 5 in one bucket (lengths 5 to 8, padded to 7), then row 1 over its cache
    assert step_calls == [(4, 7), (1, 4)]


def _triton_decode_runs_here() -> bool:
    """CUDA, or Triton's interpreter with the kernel module and Triton's own language helpers (``tl.cdiv``)
    defined under it: the environment variable must have been set before either was first imported, which an
    earlier test file importing Triton prevents."""
    if torch.cuda.is_available():
        return True
    try:
        import triton.language as tl

        import kimi_linear.ops.mla_decode_triton as mla_decode_triton
    except ImportError:
        return False
    kernel = getattr(mla_decode_triton, "_mla_decode_split_kernel", None)
    return all(type(f).__name__ == "InterpretedFunction" for f in (kernel, tl.cdiv))


def _decode_steps(layer, x, cache, prefill_len):
    """Prefill x[:, :prefill_len] into the cache, then decode the rest one token at a time; the decode outputs."""
    layer(x[:, :prefill_len], cache=cache)
    cache.lengths += prefill_len
    outs = []
    for t in range(prefill_len, x.shape[1]):
        outs.append(layer(x[:, t : t + 1], cache=cache))
        cache.lengths += 1
    return torch.cat(outs, 1)


@pytest.mark.parametrize("use_nope", [True, False], ids=["nope", "rope"])
def test_triton_decode_matches_torch_decode(use_nope, monkeypatch):
    """The fused decode kernel inside the layer, against the layer's PyTorch decode, with rows of different
    lengths (left: a short prefill, then steps) and a cache longer than any row; fp32."""
    if not _triton_decode_runs_here():
        pytest.skip("no CUDA, and the decode kernels were defined before TRITON_INTERPRET=1 was set")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = small_config(mla_use_nope=use_nope)
    layer = randomised_layer(config, seed=9).to(device)
    x = torch.randn(3, 10, config.hidden_size, generator=torch.Generator().manual_seed(10)).to(device)
    outs = {}
    with torch.no_grad():
        for backend in ("torch", "triton"):
            monkeypatch.setattr(layer, "decode_backend", backend)
            cache = KimiLinearCache(config, batch_size=3, max_length=300, device=device)
            cache.lengths[1] = 200  # a longer history in row 1 (its zeros are valid cached latents)
            outs[backend] = _decode_steps(layer, x, cache, prefill_len=3)
    assert rel_err(outs["triton"], outs["torch"]) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_release_shape_bf16():
    """The release's MLA shape (32 heads, r 512, rope 64, nope 128, v 128) in bf16 on a synthetic cache of a few
    thousand tokens: the Triton decode within 2x the error of the bf16 PyTorch decode, both against fp32."""
    config = small_config(hidden_size=512, num_attention_heads=32, kv_lora_rank=512, qk_nope_head_dim=128,
                          qk_rope_head_dim=64, v_head_dim=128)
    layer32, layer16 = fp32_and_bf16_layers(config, seed=11)
    B, L_max = 4, 4096
    gen = torch.Generator(device="cuda").manual_seed(12)
    latent = torch.randn(B, L_max, 512, device="cuda", generator=gen)
    k_pe = torch.randn(B, L_max, 64, device="cuda", generator=gen)
    lengths = torch.tensor([4095, 0, 37, 3000], device="cuda")  # cached tokens; the step adds one
    x = torch.randn(B, 1, config.hidden_size, device="cuda", generator=gen)

    def step(layer, dtype, backend):
        cache = KimiLinearCache(config, batch_size=B, max_length=L_max, dtype=dtype, device="cuda")
        cache.layers[0]["latent"].copy_(latent)
        cache.layers[0]["k_pe"].copy_(k_pe)
        cache.lengths.copy_(lengths)
        layer.decode_backend = backend
        with torch.no_grad():
            return layer(x.to(dtype), cache=cache).float()

    ref = step(layer32, torch.float32, "torch")
    err_torch16 = rel_err(step(layer16, torch.bfloat16, "torch"), ref)
    err_triton16 = rel_err(step(layer16, torch.bfloat16, "triton"), ref)
    assert err_triton16 <= 2 * err_torch16 and err_triton16 < 2e-2, (err_triton16, err_torch16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_long_prefill_bf16_with_grads():
    """Calls long enough for cuDNN's attention (``sdpa_backends``): one 4,608-token sequence, then 4,096 and 512
    tokens packed (cuDNN for the first, flash for the second), at the release's head dims: the bf16 layer
    against the fp32 layer (the memory-efficient kernel), output and every gradient within bf16 tolerance."""
    from kimi_linear.layers.mla import CUDNN_MIN_QUERIES

    config = small_config(hidden_size=256, num_attention_heads=4, kv_lora_rank=128, qk_nope_head_dim=128,
                          qk_rope_head_dim=64, v_head_dim=128)
    layer32, layer16 = fp32_and_bf16_layers(config, seed=21)
    T = CUDNN_MIN_QUERIES + 512
    gen = torch.Generator(device="cuda").manual_seed(22)
    x = torch.randn(1, T, config.hidden_size, device="cuda", generator=gen)
    for cu in (None, torch.tensor([0, CUDNN_MIN_QUERIES, T], device="cuda")):
        x32 = x.clone().requires_grad_()
        out32 = layer32(x32, cu_seqlens=cu)
        out32.square().sum().backward()
        x16 = x.bfloat16().requires_grad_()
        out16 = layer16(x16, cu_seqlens=cu)
        out16.float().square().sum().backward()
        assert rel_err(out16.float(), out32) < 2e-2
        assert rel_err(x16.grad.float(), x32.grad) < 3e-2
        for (name, p16), p32 in zip(layer16.named_parameters(), layer32.parameters(), strict=True):
            assert rel_err(p16.grad.float(), p32.grad) < 3e-2, name
        layer16.zero_grad(), layer32.zero_grad()
