"""The short convolution op and the KDA layer, against readable references, with every gradient."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # before anything imports the kernel modules: their kernels are defined for the interpreter then
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kimi_linear.layers.kda as kda_module  # noqa: E402
from kimi_linear.cache import KimiLinearCache  # noqa: E402
from kimi_linear.config import KimiLinearConfig  # noqa: E402
from kimi_linear.layers.kda import KimiDeltaAttention  # noqa: E402
from kimi_linear.ops.conv import causal_conv1d, causal_conv1d_update, naive_causal_conv1d  # noqa: E402
from kimi_linear.ops.gated_norm import gated_rms_norm  # noqa: E402
from kimi_linear.ops.kda import naive_recurrent_kda  # noqa: E402
from tests.utils import rel_err  # noqa: E402

TOL = 1e-5  # fp32 throughout; differences are only summation order


# ---- causal_conv1d -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "B,T,C,W,with_state",
    [(2, 37, 12, 4, True), (1, 1, 5, 4, True), (3, 9, 7, 3, False), (1, 2, 6, 4, True)],
    ids=["B2-T37-C12-W4-h0", "B1-T1-C5-W4-h0", "B3-T9-C7-W3", "B1-T2-C6-W4-h0"],
)
def test_conv_matches_reference_with_grads(B, T, C, W, with_state):
    gen = torch.Generator().manual_seed(T * 31 + C)
    x = torch.randn(B, T, C, generator=gen, requires_grad=True)
    w = torch.randn(C, 1, W, generator=gen, requires_grad=True)
    h0 = torch.randn(B, C, W - 1, generator=gen, requires_grad=True) if with_state else None
    y, final = causal_conv1d(x, w, initial_state=h0, output_final_state=True)
    y_ref, final_ref = naive_causal_conv1d(x, w, initial_state=h0)
    assert rel_err(y, y_ref) < TOL and rel_err(final, final_ref) < TOL
    gy = torch.randn(y.shape, generator=gen)
    leaves = [t for t in (x, w, h0) if t is not None]
    grads = torch.autograd.grad((y * gy).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), leaves)
    for name, g, g_ref in zip(("dx", "dw", "dh0"), grads, grads_ref, strict=False):
        assert rel_err(g, g_ref) < TOL, name


def test_conv_varlen_is_per_sequence_with_empty_and_short_segments():
    gen = torch.Generator().manual_seed(5)
    lengths = [5, 0, 1, 2, 17]
    C, W = 9, 4
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    x = torch.randn(1, sum(lengths), C, generator=gen, requires_grad=True)
    w = torch.randn(C, W, generator=gen, requires_grad=True)
    h0 = torch.randn(len(lengths), C, W - 1, generator=gen, requires_grad=True)
    y, final = causal_conv1d(x, w, initial_state=h0, cu_seqlens=cu, output_final_state=True)
    refs, finals = [], []
    for n, (s, L) in enumerate(zip(cu[:-1].tolist(), lengths, strict=False)):
        y_ref, final_ref = naive_causal_conv1d(x[:, s : s + L], w, initial_state=h0[n : n + 1])
        if L:
            assert rel_err(y[:, s : s + L], y_ref) < TOL
        assert rel_err(final[n : n + 1], final_ref) < TOL, f"final state of segment {n} (length {L})"
        refs.append(y_ref)
        finals.append(final_ref)
    gy, gf = torch.randn(y.shape, generator=gen), torch.randn(final.shape, generator=gen)
    loss = (y * gy).sum() + (final * gf).sum()
    loss_ref = (torch.cat(refs, 1) * gy).sum() + (torch.cat(finals) * gf).sum()
    grads = torch.autograd.grad(loss, [x, w, h0])
    grads_ref = torch.autograd.grad(loss_ref, [x, w, h0])
    for name, g, g_ref in zip(("dx", "dw", "dh0"), grads, grads_ref, strict=False):
        assert rel_err(g, g_ref) < TOL, name


def test_conv_update_steps_match_reference():
    gen = torch.Generator().manual_seed(9)
    B, T, C, W = 3, 6, 10, 4
    x = torch.randn(B, T, C, generator=gen)
    w = torch.randn(C, 1, W, generator=gen)
    state = torch.randn(B, C, W - 1, generator=gen)
    y_ref, final_ref = naive_causal_conv1d(x, w, initial_state=state)
    ys = [causal_conv1d_update(x[:, t], state, w) for t in range(T)]  # updates state in place
    assert rel_err(torch.stack(ys, 1), y_ref) < TOL and rel_err(state, final_ref) < TOL


def test_conv_bad_input():
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(torch.randn(1, 4, 6), torch.randn(5, 4))
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(torch.randn(2, 4, 6), torch.randn(6, 4), initial_state=torch.randn(1, 6, 3))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(torch.randn(1, 4, 6), torch.randn(6, 4), activation="relu")
    with pytest.raises(TypeError, match="x"):
        causal_conv1d(torch.ones(1, 4, 6, dtype=torch.long), torch.randn(6, 4))


# ---- KDA layer ---------------------------------------------------------------------------------------------


def small_config(**overrides) -> KimiLinearConfig:
    values = dict(
        hidden_size=48,
        kda_num_heads=2,
        kda_head_dim=16,
        num_hidden_layers=1,
        kda_layers=[0],
        full_attn_layers=[],
    )
    values.update(overrides)
    return KimiLinearConfig.from_preset("debug", **values)


def randomised_layer(config, seed=0) -> KimiDeltaAttention:
    torch.manual_seed(seed)
    layer = KimiDeltaAttention(config, 0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name not in ("A_log", "dt_bias"):
                p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0))
        layer.o_norm.weight.add_(1.0)
    return layer


def reference_layer(layer: KimiDeltaAttention, x: torch.Tensor) -> torch.Tensor:
    """The KDA layer (paper §4) written out with plain torch ops and the recurrent spec of paper Eq. 1."""
    B, T, _ = x.shape
    H, K = layer.num_heads, layer.head_dim
    W = layer.conv_size

    def short_conv(h, weight):
        if not layer.use_short_conv:
            return F.silu(h)
        h = F.pad(h.transpose(1, 2), (W - 1, 0))  # [B, C, T + W - 1]
        return F.silu(F.conv1d(h, weight, groups=weight.shape[0])).transpose(1, 2)

    def l2(t):
        return t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6)

    q = l2(
        short_conv(x @ layer.q_proj.weight.T, layer.q_conv1d.weight if layer.use_short_conv else None).view(
            B, T, H, K
        )
    )
    k = l2(
        short_conv(x @ layer.k_proj.weight.T, layer.k_conv1d.weight if layer.use_short_conv else None).view(
            B, T, H, K
        )
    )
    v = short_conv(x @ layer.v_proj.weight.T, layer.v_conv1d.weight if layer.use_short_conv else None)
    v = v.view(B, T, H, K)
    f = x @ layer.f_a_proj.weight.T @ layer.f_b_proj.weight.T + layer.dt_bias
    rate = layer.A_log.view(H).exp()
    if layer.scalar_gate:
        g = (-rate * F.softplus(f.view(B, T, H)))[..., None].expand(B, T, H, K)
    else:
        g = -rate[:, None] * F.softplus(f.view(B, T, H, K))
    beta = torch.sigmoid(x @ layer.b_proj.weight.T)
    o, _ = naive_recurrent_kda(q, k, v, g, beta)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.config.rms_norm_eps) * layer.o_norm.weight
    if layer.use_output_gate:
        o = o * torch.sigmoid((x @ layer.g_a_proj.weight.T @ layer.g_b_proj.weight.T).view(B, T, H, K))
    return o.reshape(B, T, H * K) @ layer.o_proj.weight.T


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(mixer="gdn"), dict(use_output_gate=False, use_short_conv=False)],
    ids=["kda", "gdn", "no-gate-no-conv"],
)
def test_kda_layer_matches_reference_with_all_gradients(overrides):
    config = small_config(**overrides)
    layer = randomised_layer(config, seed=len(overrides))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 41, config.hidden_size, generator=gen, requires_grad=True)
    y, y_ref = layer(x), reference_layer(layer, x)
    assert rel_err(y, y_ref) < 1e-5
    gy = torch.randn(y.shape, generator=gen)
    params = dict(layer.named_parameters())
    names = ["x", *params]
    grads = torch.autograd.grad((y * gy).sum(), [x, *params.values()])
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), [x, *params.values()])
    for name, g, g_ref in zip(names, grads, grads_ref, strict=False):
        assert g_ref.norm() > 0, f"{name}: reference gradient is zero, the check would be vacuous"
        assert rel_err(g, g_ref) < 1e-4, name


def test_kda_layer_decode_and_varlen_match_full_forward():
    config = small_config()
    layer = randomised_layer(config, seed=7)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 23, config.hidden_size, generator=gen)
    with torch.no_grad():
        full = layer(x)
        cache = KimiLinearCache(config, batch_size=2, max_length=32)
        steps = [layer(x[:, :9], cache=cache)]
        for t in range(9, 23):
            steps.append(layer(x[:, t : t + 1], cache=cache))
        assert rel_err(torch.cat(steps, 1), full) < 1e-5
        packed = layer(torch.cat([x[0, :5], x[1]])[None], cu_seqlens=torch.tensor([0, 5, 28]))
        assert rel_err(packed[0, :5], full[0, :5]) < 1e-5
        assert rel_err(packed[0, 5:], full[1]) < 1e-5


@pytest.mark.parametrize("overrides", [{}, {"use_output_gate": False}, {"mixer": "gdn"}],
                         ids=["kda", "no-output-gate", "gdn"])
def test_packed_input_projections_same_layer_one_matmul(overrides):
    """pack_input_projections: the projections' weights become views of one matrix (same names, values and
    storage size); inference forwards (prefill + decode steps) then match the unpacked layer; a cast re-packs,
    a replaced weight undoes the packing (its new values are used); autograd still reaches every weight."""
    config = small_config(**overrides)
    layer = randomised_layer(config, seed=17)
    ref = randomised_layer(config, seed=17)
    before = {n: p.clone() for n, p in layer.state_dict().items()}
    layer.pack_input_projections()
    packed = layer._packed_weight()
    assert packed is not None and packed.shape == (3 * 2 * 16 + 16 + 2 + (16 if config.use_output_gate else 0), 48)
    after = layer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert all(m.weight.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
               for m in layer._input_projections())
    calls = []
    real_linear = kda_module.F.linear

    def counting(x, w, *args):
        calls.append(tuple(w.shape))
        return real_linear(x, w, *args)

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 20, 48, generator=gen)

    def prefill_and_decode(m):
        with torch.no_grad():
            cache = KimiLinearCache(config, batch_size=2, max_length=24)
            out = [m(x[:, :13], cache=cache)]
            out += [m(x[:, t : t + 1], cache=cache) for t in range(13, 20)]
        return torch.cat(out, 1)

    want = prefill_and_decode(ref)
    kda_module.F.linear = counting
    try:
        got = prefill_and_decode(layer)
    finally:
        kda_module.F.linear = real_linear
    assert rel_err(got, want) < TOL
    assert calls.count(tuple(packed.shape)) == 8  # one packed matmul per forward: the prefill and 7 steps
    layer.double()
    assert layer._packed_weight() is not None and layer._packed_weight().dtype == torch.float64
    with torch.no_grad():
        assert rel_err(layer(x.double()), ref.double()(x.double())) < TOL
        layer.q_proj.weight.data = layer.q_proj.weight.data * 2  # replaced, not updated in place
        ref.q_proj.weight.data = ref.q_proj.weight.data * 2
    assert layer._packed_weight() is None
    with torch.no_grad():
        assert rel_err(layer(x.double()), ref(x.double())) < TOL
    params = [m.weight for m in layer._input_projections()]
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.pack_input_projections()
    assert [m.weight for m in layer._input_projections()] == params  # the same Parameter objects
    layer(x.double()).square().sum().backward()  # with autograd: the projections one by one, as in training
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    optimizer.step()  # updates the weights in place: the packed matrix follows
    packed = layer._packed_weight()
    assert packed is not None and torch.equal(packed[: params[0].shape[0]], params[0])


def test_kda_gate_parameters_stay_fp32():
    layer = randomised_layer(small_config())
    A_log, dt_bias = layer.A_log.detach().clone(), layer.dt_bias.detach().clone()
    layer = layer.to(torch.bfloat16)
    assert layer.A_log.dtype == torch.float32 and layer.dt_bias.dtype == torch.float32
    assert torch.equal(layer.A_log, A_log) and torch.equal(
        layer.dt_bias, dt_bias
    )  # no round trip through bf16
    assert layer.q_proj.weight.dtype == torch.bfloat16
    assert tuple(layer.A_log.shape) == (1, 1, 2, 1) and tuple(layer.dt_bias.shape) == (32,)
    assert tuple(layer.q_conv1d.weight.shape) == (32, 1, 4) and tuple(layer.o_norm.weight.shape) == (16,)
    y = layer(torch.randn(1, 5, 48, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_kda_layer_passes_its_backends_to_the_ops(monkeypatch):
    """conv_backend reaches causal_conv1d and preprocess_backend ("auto" by default) decides, as chunk_kda would,
    whether the activations before the op run in the fused kernels; with and without a cache."""
    seen = []

    def spy(name, fn, keys, **replace):
        def wrapped(*args, **kwargs):
            seen.append((name, *(kwargs[k] for k in keys)))
            return fn(*args, **{**kwargs, **replace})

        monkeypatch.setattr(kda_module, name, wrapped)

    spy("causal_conv1d", kda_module.causal_conv1d, ["backend"])
    # the spy records where the activations were asked to run and then runs them in PyTorch (no interpreter here)
    spy("preprocess", kda_module.preprocess, ["fused", "operand_dtype"], fused=False)
    config = small_config()
    layer = randomised_layer(config)
    x = torch.randn(1, 5, config.hidden_size)
    with torch.no_grad():
        layer(x)
        assert seen == [("causal_conv1d", "auto"), ("preprocess", False, None)]
        seen.clear()
        layer.conv_backend, layer.preprocess_backend = "torch", "torch"
        layer(x, cache=KimiLinearCache(config, batch_size=1, max_length=8))
        assert seen == [("causal_conv1d", "torch"), ("preprocess", False, None)]
        seen.clear()
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        layer.preprocess_backend = "triton"
        layer(x)
        assert seen == [("causal_conv1d", "torch"), ("preprocess", True, None)]


# ---- what the layer keeps for its backward -----------------------------------------------------------------


def stored_layer(layer: KimiDeltaAttention, x: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
    """The layer as it was before it recomputed its glue: every step's result kept by autograd, the activations
    applied inside chunk_kda (``use_*_in_kernel``). Same ops, so the same numbers: the recomputing layer must
    match it in the output and every gradient."""
    B, T, _ = x.shape
    H, K = layer.num_heads, layer.head_dim
    qkv = torch.cat([layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)], dim=-1)
    if layer.use_short_conv:
        qkv, _ = causal_conv1d(qkv, layer.conv_weight(), cu_seqlens=cu_seqlens, backend=layer.conv_backend)
    else:
        qkv = F.silu(qkv)
    q, k, v = qkv.view(B, T, 3, H, K).unbind(2)
    g = layer.f_b_proj(layer.f_a_proj(x))
    g = g.view(B, T, H) if layer.scalar_gate else g.view(B, T, H, K)
    o, _ = kda_module.chunk_kda(q, k, v, g, layer.b_proj(x), cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True,
                                use_gate_in_kernel=True, A_log=layer.A_log, dt_bias=layer.dt_bias,
                                use_beta_sigmoid_in_kernel=True, backend=layer.chunk_backend,
                                preprocess_backend=layer.preprocess_backend)
    gate = layer.g_b_proj(layer.g_a_proj(x)) if layer.use_output_gate else None
    # the output norm and gate on the op the layer runs them on (tests/ops/test_gated_norm.py holds it to its spec)
    o = gated_rms_norm(o, gate, layer.o_norm.weight, layer.config.rms_norm_eps, backend=layer.preprocess_backend)
    return layer.o_proj(o.to(x.dtype))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# the Triton path on the CPU: Triton's interpreter, which must have been on when the kernels were defined
INTERPRETER = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton kernels in the interpreter (CPU only)")


def use_triton(layer: KimiDeltaAttention) -> KimiDeltaAttention:
    """The conv, the activations and chunk_kda on their Triton kernels, as "auto" picks them on CUDA."""
    layer.conv_backend = layer.preprocess_backend = layer.chunk_backend = "triton"
    return layer


@pytest.mark.parametrize(
    "overrides,packed,autocast,device,triton",
    [({}, True, False, "cpu", False), (dict(mixer="gdn"), False, False, "cpu", False),
     (dict(use_output_gate=False, use_short_conv=False), True, False, "cpu", False), ({}, True, True, "cpu", False),
     pytest.param({}, True, False, "cpu", True, marks=INTERPRETER),
     pytest.param(dict(mixer="gdn"), False, False, "cpu", True, marks=INTERPRETER),
     pytest.param(dict(use_output_gate=False, use_short_conv=False), True, False, "cpu", True, marks=INTERPRETER),
     pytest.param({}, True, True, "cuda", False, marks=CUDA),
     pytest.param(dict(mixer="gdn"), True, True, "cuda", False, marks=CUDA)],
    ids=["kda-packed", "gdn", "no-gate-no-conv-packed", "kda-packed-bf16-autocast", "kda-packed-triton-interp",
         "gdn-triton-interp", "no-gate-no-conv-packed-triton-interp", "kda-packed-bf16-cuda", "gdn-packed-bf16-cuda"],
)
def test_recomputing_layer_matches_the_stored_one_in_every_gradient(overrides, packed, autocast, device, triton):
    """On CUDA (and with ``triton`` on the CPU, through the interpreter, in fp32: its emulation of 16-bit dots
    is not what the GPU computes) the conv, the activations and chunk_kda run their Triton kernels: there the op
    reruns the glue in its own backward (``chunk_kda_triton_recomputing``) while the stored layer keeps everything
    and differentiates the glue inside chunk_kda."""
    config = small_config(**overrides)
    layer = randomised_layer(config, seed=5).to(device)
    if triton:
        use_triton(layer)
    gen = torch.Generator().manual_seed(8)
    B, T = (1, 45) if packed else (2, 30)
    cu = torch.tensor([0, 13, 14, 45], device=device) if packed else None
    x = torch.randn(B, T, config.hidden_size, generator=gen).to(device).requires_grad_()
    gy = torch.randn(B, T, config.hidden_size, generator=gen).to(device)
    params = dict(layer.named_parameters())
    results = []
    for forward in (layer, lambda x, cu_seqlens: stored_layer(layer, x, cu_seqlens)):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            y = forward(x, cu_seqlens=cu)
        results.append((y, torch.autograd.grad((y.float() * gy).sum(), [x, *params.values()])))
    (y, grads), (y_ref, grads_ref) = results
    # The same ops on the same values: on the CPU equal up to GEMM blocking (1e-6, bf16 autocast included); on CUDA
    # bf16 results may differ where a kernel sums in a run-dependent order, by an ulp here and there (1e-3), far
    # below what a missing or doubled gradient term does (> 1e-1).
    tol = 1e-6 if device == "cpu" else 1e-3
    assert rel_err(y, y_ref) < tol
    for name, g, g_ref in zip(["x", *params], grads, grads_ref, strict=True):
        assert g_ref.norm() > 0, f"{name}: reference gradient is zero, the check would be vacuous"
        assert rel_err(g, g_ref) < tol, name


def test_training_forward_keeps_only_inputs_projections_and_the_op_output(monkeypatch):
    """Beyond chunk_kda's own saved tensors, the layer keeps exactly: x, the q/k/v projections (the conv's input),
    the two low-rank inputs and the beta logits, the stacked conv filters and the op's output. The conv output,
    SiLU, the L2 norms, gate, beta, the output norm and gate (o_proj's input) are recomputed."""
    from kimi_linear.train import activation_memory

    op = kda_module.chunk_kda

    def scoped(*args, **kwargs):
        with activation_memory.scope("op"):
            return op(*args, **kwargs)

    monkeypatch.setattr(kda_module, "chunk_kda", scoped)
    config = small_config()
    layer = randomised_layer(config)
    T, D, H, K = 37, config.hidden_size, config.kda_num_heads, config.kda_head_dim
    E = H * K
    x = torch.randn(1, T, D, requires_grad=True)
    report = activation_memory.saved_activations(layer, lambda: layer(x, cu_seqlens=torch.tensor([0, 20, T])))
    glue = report.activation_bytes() - report.activation_bytes("op")
    expected = 4 * (T * D + T * 3 * E + T * K + T * H + 3 * E * layer.conv_size + T * E + T * K)
    assert glue == expected, activation_memory.format_saved(report)
    assert report.activation_bytes("op") > 0


@INTERPRETER
def test_kda_layer_keeps_less_than_an_mla_layer_per_token():
    """What a KDA layer keeps for its backward on the path training takes on the GPU (Triton kernels; here the
    interpreter), bf16 autocast, packed documents, at the 1.2B benchmark's proportions scaled down (H·K = hidden,
    K = 128, MLA heads of 128 + 64 over a latent of hidden / 4): exactly x, the q/k/v projections, the low-rank
    inputs, the beta logits, the conv filters, the op output and the chunk kernels' two matrix products (A_qk,
    T fp32; W and U are made again in backward), and at most 0.7x the bytes per token of an MLA layer of the same
    hidden size measured the same way (0.64x; 0.81x while the op kept W and U, 1.47x before it reran the glue).
    The CPU's MLA runs SDPA's math path, which keeps fp32 copies of q, k, v and the softmax where the GPU's flash
    kernel keeps bf16 q, k, v, output and the log-sum-exp, so on the GPU the two are closer
    (benchmarks/RESULTS.md, Training, has both counted at the 1.2B shape)."""
    from kimi_linear.layers.mla import MultiheadLatentAttention
    from kimi_linear.train import activation_memory

    D, H, K, T = 256, 2, 128, 128
    config = KimiLinearConfig.from_preset(
        "debug", hidden_size=D, kda_num_heads=H, kda_head_dim=K, num_attention_heads=H, num_key_value_heads=H,
        kv_lora_rank=D // 4, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_hidden_layers=2,
        kda_layers=[0], full_attn_layers=[1], layer_types=None,
    )
    cu = torch.tensor([0, 32, 64, T])  # packed documents, as training feeds them
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(2), requires_grad=True)
    per_token = {}
    layers = {"kda": use_triton(KimiDeltaAttention(config, 0)), "mla": MultiheadLatentAttention(config, 1)}
    for name, layer in layers.items():
        def forward(layer=layer):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return layer(x, cu_seqlens=cu).float().sum()

        report = activation_memory.saved_activations(layer, forward)
        per_token[name] = report.activation_bytes() / T
        if name == "kda":
            E, C, W = H * K, 64, config.short_conv_kernel_size  # C: the chunk, the width of A_qk and T
            bf16 = D + 3 * E + K + H + E + K + H * C  # x, qkv, f_low, beta logits, o, g_low, A_qk
            expected = T * (2 * bf16 + 4 * H * C) + 4 * 3 * E * W  # T fp32; the conv filters do not grow with T
            assert report.activation_bytes() == expected, activation_memory.format_saved(report)
    assert per_token["kda"] <= 0.7 * per_token["mla"], per_token


@INTERPRETER
@pytest.mark.parametrize("overrides", [{}, dict(use_output_gate=False, use_short_conv=False)],
                         ids=["kda", "no-gate-no-conv"])
def test_packed_prefill_on_triton_kernels_matches_torch(overrides):
    """Packed, the projections reach the conv, the preprocessing and the decode kernel as strided column slices of
    one product: a varlen prefill into a cache and a varlen continuation on the Triton kernels (interpreter) equal
    the PyTorch path."""
    config = small_config(**overrides)
    layers = [randomised_layer(config, seed=3), randomised_layer(config, seed=3)]
    for layer in layers:
        layer.pack_input_projections()
    use_triton(layers[0])
    x = torch.randn(1, 40, 48, generator=torch.Generator().manual_seed(2))
    outs = []
    with torch.no_grad():
        for layer in layers:
            cache = KimiLinearCache(config, batch_size=2, max_length=48)
            first = layer(x, cache=cache, cu_seqlens=torch.tensor([0, 13, 40]))
            cache.lengths += torch.tensor([13, 27])
            more = layer(x[:, :10], cache=cache, cu_seqlens=torch.tensor([0, 4, 10]))
            outs.append(torch.cat([first, more], 1))
    assert rel_err(outs[0], outs[1]) < TOL
