"""Mamba2Mixer against a token-by-token reference built from its own parameters; varlen, padding,
causality."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.layers.mamba2 import CONV_KERNEL, Mamba2Mixer
from kimi_linear.ops.ssd import naive_recurrent_ssd
from tests.utils import rel_err


def make_mixer(hidden=24, heads=2, head_dim=8, seed=0) -> Mamba2Mixer:
    torch.manual_seed(seed)
    config = SimpleNamespace(
        hidden_size=hidden, kda_num_heads=heads, kda_head_dim=head_dim, rms_norm_eps=1e-5
    )
    mixer = Mamba2Mixer(config, layer_idx=0)
    with torch.no_grad():  # move every parameter off its tidy initial value so that each one matters
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return mixer


def reference_forward(m: Mamba2Mixer, h: torch.Tensor) -> torch.Tensor:
    """The mixer written out token by token: explicit conv window, the SSD recurrence, then the gated norm."""
    batch, T, _ = h.shape
    H, P, N = m.num_heads, m.head_dim, m.state_size
    proj = h @ m.in_proj.weight.T
    z, xBC, dt = proj[..., : H * P], proj[..., H * P : 2 * H * P + 2 * N], proj[..., 2 * H * P + 2 * N :]
    w = m.conv1d.weight[:, 0]  # [channels, kernel]; column -1 multiplies the current token
    conv = []
    for t in range(T):
        acc = m.conv1d.bias.expand(batch, -1)
        for j in range(CONV_KERNEL):
            if t - j >= 0:
                acc = acc + w[:, CONV_KERNEL - 1 - j] * xBC[:, t - j]
        conv.append(acc)
    xBC = F.silu(torch.stack(conv, dim=1))
    x, B, C = xBC[..., : H * P], xBC[..., H * P : H * P + N], xBC[..., H * P + N :]
    dt = F.softplus(dt + m.dt_bias)
    y, _ = naive_recurrent_ssd(
        x.reshape(batch, T, H, P), dt, -m.A_log.exp(), B[:, :, None], C[:, :, None], m.D
    )
    y = y.reshape(batch, T, H * P) * F.silu(z)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + m.norm.eps) * m.norm.weight
    return y @ m.out_proj.weight.T


@pytest.mark.parametrize("T", [1, 5, 70], ids=lambda t: f"T{t}")
def test_forward_and_every_parameter_gradient_match_reference(T):
    mixer = make_mixer(seed=T)
    h = torch.randn(2, T, mixer.hidden_size, requires_grad=True)
    w = torch.randn(2, T, mixer.hidden_size)
    out = mixer(h)
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    dh = h.grad.clone()
    mixer.zero_grad()
    h.grad = None
    ref = reference_forward(mixer, h)
    (ref * w).sum().backward()
    assert out.shape == h.shape
    assert rel_err(out.detach(), ref.detach()) < 1e-5
    assert rel_err(dh, h.grad) < 1e-4
    for name, p in mixer.named_parameters():
        assert rel_err(grads[name], p.grad) < 1e-4, name


def test_causal_future_tokens_do_not_change_the_past():
    mixer = make_mixer(seed=1)
    h = torch.randn(1, 40, mixer.hidden_size)
    h2 = h.clone()
    h2[:, 25:] = torch.randn(1, 15, mixer.hidden_size)
    with torch.no_grad():
        a, b = mixer(h), mixer(h2)
    assert rel_err(a[:, :25], b[:, :25]) < 1e-6
    assert rel_err(a[:, 25:], b[:, 25:]) > 1e-2


def test_varlen_equals_separate_sequences_with_empty_segment():
    mixer = make_mixer(seed=2)
    lengths = [7, 0, 33, 1]
    seqs = [torch.randn(1, n, mixer.hidden_size) for n in lengths]
    cu = torch.tensor([0, 7, 7, 40, 41])
    with torch.no_grad():
        packed = mixer(torch.cat(seqs, dim=1), cu_seqlens=cu)
        separate = torch.cat([mixer(s) for s in seqs if s.shape[1]], dim=1)
    assert rel_err(packed, separate) < 1e-5


def test_left_padding_with_attention_mask_equals_unpadded():
    mixer = make_mixer(seed=3)
    h = torch.randn(1, 20, mixer.hidden_size)
    padded = torch.cat([torch.randn(1, 6, mixer.hidden_size), h], dim=1)
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 20)], dim=1)
    with torch.no_grad():
        ref = mixer(h)
        out = mixer(padded, attention_mask=mask)
    assert rel_err(out[:, 6:], ref) < 1e-5


def test_ssm_initialisation_ranges():
    mixer = Mamba2Mixer(SimpleNamespace(hidden_size=16, kda_num_heads=4, kda_head_dim=8), 0)
    dt = F.softplus(mixer.dt_bias)
    assert ((dt > 0.9e-3) & (dt < 1.1e-1)).all()
    assert ((mixer.A_log.exp() >= 1) & (mixer.A_log.exp() <= 16)).all()
    assert mixer.norm.weight.shape == (32,)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(hidden_states=torch.randn(2, 5, 23)), ValueError),
        (dict(hidden_states=torch.randn(5, 24)), ValueError),
        (dict(cu_seqlens=torch.tensor([0, 3, 4])), ValueError),
        (dict(hidden_states=torch.randn(1, 5, 24), cu_seqlens=torch.tensor([0, 4, 2, 5])), ValueError),
        (dict(attention_mask=torch.ones(2, 4)), ValueError),
        (dict(cache=object()), NotImplementedError),
    ],
    ids=["hidden-size", "2d", "cu-batch2", "cu-decreasing", "mask-shape", "cache"],
)
def test_bad_input_raises(kwargs, error):
    mixer = make_mixer()
    args = dict(hidden_states=torch.randn(2, 5, 24)) | kwargs
    with pytest.raises(error):
        mixer(**args)
