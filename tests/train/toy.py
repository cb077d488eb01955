"""A small stand-in language model for trainer tests: embeddings, a causal mixer that respects ``cu_seqlens``,
a top-1 MoE with auxiliary-loss-free balancing hooks, a norm and a head — the parameter kinds the trainer
treats specially, at a size that trains in milliseconds."""

from __future__ import annotations

import torch
from torch import nn


class ToyMoE(nn.Module):
    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.Parameter(torch.randn(num_experts, dim, dim) * dim**-0.5)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        self.last_expert_load = torch.zeros(num_experts)
        self.updates = 0

    def forward(self, x):  # [N, D]
        scores = self.router(x).sigmoid()  # [N, E]
        choice = (scores.detach() + self.e_score_correction_bias).argmax(-1)  # [N]
        self.last_expert_load = torch.bincount(choice, minlength=scores.shape[-1]).float()
        weight = scores.gather(-1, choice[:, None])  # [N, 1]
        return weight * torch.einsum("nd,nde->ne", x, self.experts[choice])

    def update_correction_bias(self, rate: float, load: torch.Tensor) -> None:
        self.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        self.updates += 1


class ToyLM(nn.Module):
    def __init__(self, vocab_size: int = 259, dim: int = 32, num_experts: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.mix = nn.Linear(dim, dim)
        self.A_log = nn.Parameter(torch.zeros(1, 1, 2, 1))
        self.moe = ToyMoE(dim, num_experts)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, input_ids, cu_seqlens=None):
        x = self.embed(input_ids)  # [B, T, D]
        prev = torch.roll(x, 1, dims=1)
        starts = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
        starts[0] = True
        if cu_seqlens is not None:
            starts[cu_seqlens[:-1].long().clamp(max=x.shape[1] - 1)] = True
        prev = prev.masked_fill(starts[None, :, None], 0.0)  # no mixing across documents
        x = x + torch.tanh(self.mix(prev)) * self.A_log.exp().mean()
        B, T, D = x.shape
        x = x + self.moe(x.reshape(B * T, D)).reshape(B, T, D)
        return self.head(self.norm(x))
