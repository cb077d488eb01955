"""The LM loss without the ``[tokens, vocab]`` logits: a linear layer and cross-entropy fused, row chunk by row chunk.

    loss = sum_t [ logsumexp(h_t W^T) - (h_t W^T)[y_t] ]      over the tokens t whose label y_t != ignore_index

The plain way (``reference_linear_cross_entropy``) materialises the logits ``[N, V]`` (and, under bf16 autocast,
their fp32 copy, the softmax and its gradient): at 32k tokens and a 163,840-token vocabulary that is 21 GB of fp32
per tensor. Here the rows go through in chunks of ``chunk_rows``: each chunk's logits are computed, turned into
its loss and into its gradients ``dlogits = softmax - onehot(y)`` at once, which give ``dh`` for those rows and add
into ``dW``; then they are freed. The gradients are therefore computed during the forward (no recomputation in
backward, no extra matmul) and the backward only scales them by the incoming gradient. Only one chunk's logits
exist at a time.

Numerics follow the plain path under autocast: the products run in the compute dtype (autocast's dtype when it
is on, else the inputs' promoted dtype) with fp32 accumulation, the logits are then taken to fp32 for the
log-softmax, the loss is summed in fp32, ``dW`` is accumulated over the chunks in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Default chunk: this many bytes of fp32 logits (each chunk also holds its softmax in place and a compute-dtype
# copy for the gradient products, about 1.5x this in all).
CHUNK_LOGIT_BYTES = 256 * 2**20


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so a chunk's fp32 logits take about ``CHUNK_LOGIT_BYTES``."""
    return max(1, CHUNK_LOGIT_BYTES // (4 * vocab_size))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """hidden ``[N, D]``, weight ``[V, D]``, labels ``[N]`` int64 -> sum of the token losses, fp32 scalar."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_rows, compute_dtype):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = hidden.shape[0]
        w = weight.to(compute_dtype)  # [V, D] (autocast would make the same copy for the plain matmul)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if need_dh else None  # [N, D]
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None  # [V, D]
        for start in range(0, N, chunk_rows):
            h = hidden[start : start + chunk_rows].to(compute_dtype)  # [n, D]
            y = labels[start : start + chunk_rows]  # [n]
            counted = y != ignore_index  # [n]
            y = torch.where(counted, y, 0)
            logits = (h @ w.t()).float()  # [n, V]
            lse = torch.logsumexp(logits, dim=-1)  # [n]
            target = logits.gather(1, y[:, None])[:, 0]  # [n]
            loss += torch.where(counted, lse - target, 0.0).sum()
            if not (need_dh or need_dw):
                continue
            # d loss / d logits = softmax - onehot(y), zero on rows without a label; in place of the logits.
            dlogits = logits.sub_(lse[:, None]).exp_()
            dlogits.scatter_add_(1, y[:, None], torch.full_like(lse[:, None], -1.0))
            dlogits.mul_(counted[:, None])
            dlogits = dlogits.to(compute_dtype)  # [n, V]
            if need_dh:
                dh[start : start + chunk_rows] = dlogits @ w  # [n, D]
            if need_dw:
                dw += dlogits.t() @ h  # [V, D]
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * grad_loss.to(dh.dtype)
        dw = None if dw is None else (dw * grad_loss).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Sum over tokens of ``cross_entropy(hidden @ weight.T, labels)`` without holding all the logits; differentiable
    in ``hidden`` and ``weight``.

    Args:
        hidden: ``[..., D]`` floating point (the final-norm hidden states).
        weight: ``[V, D]`` (the LM head).
        labels: ``[...]`` int, the same leading shape as ``hidden``; ``ignore_index`` marks tokens without a target
            (they add nothing to the loss and get zero gradient). Other values must be in ``[0, V)``.
        ignore_index: the label of tokens without a target (default -100, as ``F.cross_entropy``).
        chunk_rows: tokens per chunk; default ``default_chunk_rows(V)`` (about 256 MiB of fp32 logits per chunk).

    Returns:
        fp32 scalar: the *sum* of the token losses (divide by the number of labelled tokens for the mean).
        Under autocast the products run in autocast's dtype, as ``F.linear`` would.

    Raises:
        TypeError / ValueError naming the argument for wrong dtypes or shapes.
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError("labels must be an int64/int32 tensor")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., D] and weight [V, D] must share D; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden's leading dims), got "
                         f"{tuple(labels.shape)}")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0])
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
    compute_dtype = _compute_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearCrossEntropyFunction.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1).long(), ignore_index, chunk_rows,
            compute_dtype,
        )


def reference_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """The plain loss ``linear_cross_entropy`` must equal: all logits at once, taken to fp32, summed."""
    logits = F.linear(hidden, weight).float()  # [..., V]
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten().long(), ignore_index=ignore_index,
                           reduction="sum")
