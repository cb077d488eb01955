"""The chunked linear + cross-entropy against the plain loss: value and both gradients, any chunking, ignored
labels, bf16 autocast, and no [tokens, vocab] tensor kept for the backward."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops.cross_entropy import (
    IGNORE_INDEX,
    default_chunk_rows,
    linear_cross_entropy,
    reference_linear_cross_entropy,
)
from tests.utils import rel_err


def inputs(B, T, D, V, *, ignore_frac=0.25, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen).to(dtype)
    weight = (torch.randn(V, D, generator=gen) * D**-0.5).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[torch.rand(B, T, generator=gen) < ignore_frac] = IGNORE_INDEX
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, scale=1.0, **kwargs):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, labels, **kwargs)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("B,T,D,V,chunk_rows", [
    (1, 37, 24, 101, 8),  # the last chunk is short
    (2, 19, 16, 67, 1),  # one row per chunk
    (3, 5, 32, 50, 64),  # one chunk bigger than the input
    (1, 1, 8, 13, None),  # one token, default chunking
], ids=lambda x: str(x))
def test_matches_the_plain_loss_and_gradients(B, T, D, V, chunk_rows):
    hidden, weight, labels = inputs(B, T, D, V, seed=B * T + V)
    ref = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels, scale=0.37)
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, labels, scale=0.37, chunk_rows=chunk_rows)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ()
    for name, a, b in zip(("loss", "d_hidden", "d_weight"), ours, ref, strict=True):
        assert a.dtype == b.dtype, name
        assert rel_err(a, b) < 1e-6, name


def test_chunks_whose_labels_are_all_ignored_add_nothing():
    hidden, weight, labels = inputs(1, 24, 16, 40, ignore_frac=0.0)
    labels[0, 8:16] = IGNORE_INDEX  # the whole second chunk of 8
    ref = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels)
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_rows=8)
    for a, b in zip(ours, ref, strict=True):
        assert rel_err(a, b) < 1e-6
    assert ours[1][0, 8:16].abs().max() == 0  # no gradient to tokens without a label
    labels[:] = IGNORE_INDEX
    loss, dh, dw = loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_rows=8)
    assert loss == 0 and dh.abs().max() == 0 and dw.abs().max() == 0


def test_bf16_autocast_is_as_accurate_as_the_plain_bf16_loss():
    hidden, weight, labels = inputs(2, 40, 64, 300, seed=3)
    exact = loss_and_grads(reference_linear_cross_entropy, hidden.double(), weight.double(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels)
        ours = loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_rows=16)
    for name, a, p, e in zip(("loss", "d_hidden", "d_weight"), ours, plain, exact, strict=True):
        assert a.dtype == p.dtype, name  # gradients come back in the parameters' dtype (fp32)
        assert rel_err(a, e) <= 2 * rel_err(p, e) + 1e-6, name


def test_no_grad_gives_the_loss_and_frozen_weight_gets_none():
    hidden, weight, labels = inputs(1, 30, 16, 70)
    ref = reference_linear_cross_entropy(hidden, weight, labels)
    with torch.no_grad():
        assert rel_err(linear_cross_entropy(hidden, weight, labels, chunk_rows=7), ref) < 1e-6
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, labels, chunk_rows=7).backward()
    h_ref = hidden.clone().requires_grad_()
    reference_linear_cross_entropy(h_ref, weight, labels).backward()
    assert weight.grad is None and rel_err(h.grad, h_ref.grad) < 1e-6


def test_nothing_of_size_tokens_by_vocab_is_kept_for_the_backward():
    N, D, V = 64, 8, 500
    hidden, weight, labels = inputs(1, N, D, V)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_cross_entropy(h, w, labels, chunk_rows=16)
    assert sizes and max(sizes) == V * D  # d_weight; the plain loss keeps the N x V logits
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference_linear_cross_entropy(h, w, labels)
    assert max(sizes) == N * V


def test_default_chunk_holds_about_256_mib_of_logits():
    assert default_chunk_rows(163840) == 409 and default_chunk_rows(10**12) == 1


@pytest.mark.parametrize("call,error,match", [
    (lambda h, w, y: linear_cross_entropy(h, w[:, :-1], y), ValueError, "share D"),
    (lambda h, w, y: linear_cross_entropy(h, w, y[:, :-1]), ValueError, "labels must have shape"),
    (lambda h, w, y: linear_cross_entropy(h, w, y.float()), TypeError, "labels"),
    (lambda h, w, y: linear_cross_entropy(h.long(), w, y), TypeError, "hidden"),
    (lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=0), ValueError, "chunk_rows"),
], ids=["width", "labels_shape", "labels_dtype", "hidden_dtype", "chunk_rows"])
def test_bad_arguments_raise(call, error, match):
    hidden, weight, labels = inputs(1, 6, 8, 20)
    with pytest.raises(error, match=match):
        call(hidden, weight, labels)
