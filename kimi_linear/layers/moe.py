"""Mixture-of-Experts feed-forward: fp32 sigmoid router with a load-balancing correction
bias, top-k routed SwiGLU experts computed grouped by expert, plus a shared SwiGLU expert.

Shape legend: B batch, T time, N = B*T tokens, D hidden size, E routed experts, F expert intermediate size,
K experts per token.

Module layout follows the released checkpoint (``block_sparse_moe.gate.weight``,
``gate.e_score_correction_bias``, ``shared_experts.{gate,up,down}_proj``); the routed experts are stacked into
``experts.w1/w3 [E, F, D]`` and ``experts.w2 [E, D, F]`` so grouped GEMMs can read them —
``kimi_linear.checkpoint`` maps the release's per-expert tensors ``experts.{e}.w{1,2,3}.weight`` to slices.

The routing numbers are the training loop's handle on balance: after each forward ``last_expert_load`` holds
how many token-slots went to each expert, and ``update_correction_bias(rate)`` moves the bias toward even load
(auxiliary-loss-free balancing; the bias never receives a gradient).
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_linear.layers.memory import autocast_input
from kimi_linear.layers.mlp import SwiGLUMLP
from kimi_linear.ops.moe import EXPERT_BACKENDS, ROUTER_ACTIVATIONS, grouped_experts, route_tokens


class MoEGate(nn.Module):
    """The router's parameters: ``weight [E, D]`` and the persistent buffer ``e_score_correction_bias [E]``.

    Both stay float32 when the model is cast to another dtype (``.to(torch.bfloat16)``, ``.half()``, ...):
    routing decisions are made on fp32 scores, and a bf16 router would choose different experts than the
    release's. Device moves apply as usual.
    """

    def __init__(self, num_experts: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))  # [E, D]
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))  # [E]

    def _apply(self, fn, recurse=True):
        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            if t.dtype == torch.float32 and moved.dtype != torch.float32:
                return t.to(moved.device)
            return moved

        return super()._apply(keep_float32, recurse)

    def extra_repr(self) -> str:
        return f"num_experts={self.weight.shape[0]}, hidden_size={self.weight.shape[1]}, dtype=float32"


class MoEExperts(nn.Module):
    """E routed SwiGLU experts, stacked: w1 (gate), w3 (up) ``[E, F, D]``; w2 (down) ``[E, D, F]``.

    Expert e computes ``w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x))`` (nn.Linear layout: ``[out, in]``).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        E, D, F = num_experts, hidden_size, intermediate_size
        self.w1 = nn.Parameter(torch.empty(E, F, D))
        self.w3 = nn.Parameter(torch.empty(E, F, D))
        self.w2 = nn.Parameter(torch.empty(E, D, F))
        self.backend = "auto"

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor):
        """Returns ``(y_ND, tokens_per_expert_E)``; see ``kimi_linear.ops.moe.grouped_experts``."""
        return grouped_experts(x_ND, weights_NK, experts_NK, self.w1, self.w3, self.w2, backend=self.backend)

    def extra_repr(self) -> str:
        E, F, D = self.w1.shape
        return f"num_experts={E}, hidden_size={D}, intermediate_size={F}, backend={self.backend!r}"


class MoE(nn.Module):
    """Top-k routed SwiGLU experts and a shared one: ``out = sum_k w_k expert_{e_k}(x) + shared_experts(x)``.

    Routing (``kimi_linear.ops.moe.route_tokens``): fp32 logits ``x @ gate.weight.T``, scores = sigmoid (or
    softmax), the K experts with the highest ``scores + gate.e_score_correction_bias`` are chosen, weighted by
    their unbiased scores renormalised to sum 1 (``moe_renormalize``) times ``routed_scaling_factor``.

    Args:
        config: any object with ``hidden_size``, ``num_experts`` (E), ``num_experts_per_token`` (K),
            ``moe_intermediate_size`` (F), ``num_shared_experts``, ``routed_scaling_factor``,
            ``moe_renormalize``, ``moe_router_activation_func`` ("sigmoid" or "softmax"); optional
            ``num_expert_group`` and ``topk_group`` (group-limited routing, default 1 = off) and
            ``initializer_range`` (default 0.02).

    Execution: ``expert_backend`` "auto" picks, per call, the decode kernels (CUDA, no autograd, at most 64
    token-slots N*K), else the grouped GEMM (torch._grouped_mm: bf16 on sm90+ CUDA, or CPU with aligned
    sizes), else a loop over the experts that received tokens. The first two never wait on the host, so a
    decode step can be captured in a CUDA graph; the loop reads the per-expert counts on the host and cannot.

    Attributes:
        last_expert_load: float32 ``[E]``, detached, on the input's device: token-slots routed to each expert
            by the latest forward (sums to N*K); None before the first forward.
        expert_backend: "auto" | "grouped_mm" | "loop", see ``kimi_linear.ops.moe.grouped_experts``.

    Raises:
        ValueError: inconsistent config (K outside 1..E, unknown router activation, E not divisible by the
            groups, a non-positive size).
    """

    def __init__(self, config):
        super().__init__()
        D, E, K = config.hidden_size, config.num_experts, config.num_experts_per_token
        F, shared = config.moe_intermediate_size, config.num_shared_experts
        for name, value in (("hidden_size", D), ("num_experts", E), ("moe_intermediate_size", F)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.{name} must be a positive int, got {value!r}")
        if not isinstance(K, int) or not 1 <= K <= E:
            raise ValueError(f"config.num_experts_per_token must be an int in 1..num_experts={E}, got {K!r}")
        if not isinstance(shared, int) or shared < 0:
            raise ValueError(f"config.num_shared_experts must be an int >= 0, got {shared!r}")
        activation = config.moe_router_activation_func
        if activation not in ROUTER_ACTIVATIONS:
            raise ValueError(f"config.moe_router_activation_func must be one of {ROUTER_ACTIVATIONS}, "
                             f"got {activation!r}")
        groups = getattr(config, "num_expert_group", 1) or 1
        top_groups = getattr(config, "topk_group", 1) or 1
        if E % groups or not 1 <= top_groups <= groups or (groups > 1 and K > top_groups * (E // groups)):
            raise ValueError(f"config.num_expert_group={groups} / topk_group={top_groups} must divide "
                             f"num_experts={E} and keep at least num_experts_per_token={K} experts")
        self.hidden_size, self.num_experts, self.top_k = D, E, K
        self.routed_scaling_factor = float(config.routed_scaling_factor)
        self.renormalize = bool(config.moe_renormalize)
        self.activation = activation
        self.num_groups, self.top_k_groups = groups, top_groups
        self.init_std = float(getattr(config, "initializer_range", 0.02))

        self.gate = MoEGate(E, D)
        self.experts = MoEExperts(E, D, F)
        self.shared_experts = SwiGLUMLP(D, F * shared) if shared > 0 else None
        self.last_expert_load: torch.Tensor | None = None
        self.reset_parameters()

    @property
    def expert_backend(self) -> str:
        return self.experts.backend

    @expert_backend.setter
    def expert_backend(self, value: str) -> None:
        if value not in EXPERT_BACKENDS:
            raise ValueError(f"expert_backend must be one of {EXPERT_BACKENDS}, got {value!r}")
        self.experts.backend = value

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Router and routed experts ~ Normal(0, initializer_range); correction bias 0. The shared expert's
        Linears keep their own initialisation (the model re-initialises every Linear)."""
        for p in (self.gate.weight, self.experts.w1, self.experts.w3, self.experts.w2):
            if not p.is_meta:
                p.normal_(0.0, self.init_std)
        self.gate.e_score_correction_bias.zero_()

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights_NK float32, experts_NK int64)`` for tokens ``x_ND [N, D]``."""
        return route_tokens(
            x_ND, self.gate.weight, self.gate.e_score_correction_bias, self.top_k,
            renormalize=self.renormalize, scaling_factor=self.routed_scaling_factor,
            activation=self.activation, num_groups=self.num_groups, top_k_groups=self.top_k_groups,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[B, T, D]`` (any leading dims ``[..., D]``), the experts' dtype or any under autocast.

        Returns: ``[B, T, D]``. Sets ``last_expert_load``.

        Raises:
            TypeError: x is not a floating-point tensor, or (outside autocast) not the experts' dtype.
            ValueError: x's last dim is not hidden_size.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor [B, T, {self.hidden_size}]")
        if x.dim() < 2 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [B, T, hidden_size={self.hidden_size}], "
                             f"got {tuple(x.shape)}")
        x_ND = x.reshape(-1, self.hidden_size)
        weights_NK, experts_NK = self.route(x_ND)  # from x as given (fp32 routing)
        # The experts compute in autocast's dtype: one copy of x in it for the routed and the shared experts.
        x_low_ND = autocast_input(x_ND)
        y_ND, tokens_per_expert_E = self.experts(x_low_ND, weights_NK, experts_NK)
        self.last_expert_load = tokens_per_expert_E.detach().float()
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_low_ND)
        return y_ND.view(x.shape)

    @torch.no_grad()
    def update_correction_bias(self, rate: float, load: torch.Tensor | None = None) -> None:
        """Auxiliary-loss-free balancing step: ``bias += rate * sign(mean(load) - load)``.

        Experts that got more than their share become less likely to be chosen and vice versa; the routing
        weights are unaffected (they use the unbiased scores).

        Args:
            rate: step size (>= 0), e.g. 1e-3.
            load: ``[E]`` token counts to balance; default ``last_expert_load`` (the trainer may sum it over
                micro-batches and processes and store the total there first).

        Raises:
            ValueError: negative rate or a load of the wrong shape. RuntimeError: no load yet (no forward).
        """
        if not rate >= 0:
            raise ValueError(f"rate must be >= 0, got {rate!r}")
        load = self.last_expert_load if load is None else load
        if load is None:
            raise RuntimeError("update_correction_bias needs a load: run a forward first or pass load=[E]")
        if load.shape != (self.num_experts,):
            raise ValueError(f"load must have shape [num_experts={self.num_experts}], "
                             f"got {tuple(load.shape)}")
        bias_E = self.gate.e_score_correction_bias
        load_E = load.to(device=bias_E.device, dtype=torch.float32)
        bias_E.add_(rate * torch.sign(load_E.mean() - load_E))

    def extra_repr(self) -> str:
        return (f"top_k={self.top_k}, routed_scaling_factor={self.routed_scaling_factor}, "
                f"renormalize={self.renormalize}, activation={self.activation!r}")
