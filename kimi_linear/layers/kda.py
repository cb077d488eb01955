"""The Kimi Delta Attention layer (paper §4), with the released checkpoint's parameter names.

x ─┬─ q_proj ─ q_conv1d ─ SiLU ─┐
   ├─ k_proj ─ k_conv1d ─ SiLU ─┤ (q, k L2-normalised inside the op)
   ├─ v_proj ─ v_conv1d ─ SiLU ─┤
   ├─ f_a_proj ─ f_b_proj ──────┤ g = -exp(A_log) softplus(· + dt_bias)   (inside the op)
   ├─ b_proj ───────────────────┤ beta = sigmoid(·)                      (inside the op)
   │                          KDA ─ o_norm (per-head RMSNorm) × sigmoid(g_b_proj(g_a_proj(x))) ─ o_proj
   └─ g_a_proj ─ g_b_proj ───────────────────────┘

Whole sequences go through ``chunk_kda``; a one-token step with a cache goes through ``kda_decode_step``, one
fused kernel on CUDA for everything between the projections and o_proj (short conv and SiLU, the q/k L2 norm, the
gate and beta activations, the recurrent update of the cached state in place, the output norm and gate). For
whole sequences the layer runs those activations (with the short conv + SiLU) through the ops' own preprocessing,
fused Triton kernels on CUDA, before ``chunk_kda``: in training this glue, and the output norm × gate after the
op, are recomputed in backward (``layers.memory``), so the layer keeps only x, the projections and the op's output
besides what the op keeps. On the Triton kernels the op itself reruns the glue in its backward
(``chunk_kda_triton_recomputing``), so it keeps neither q, k, v, g, beta nor its element-wise intermediates, only
the products of its matrix stages.

With ``layer_type="gdn"`` (the paper's Gated DeltaNet baseline) the forget gate is one scalar per head:
f_b_proj maps to H values and dt_bias has H entries.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.cache_layout import CacheEntry
from kimi_linear.layers.linear import Linear
from kimi_linear.layers.memory import autocast_input, recompute, recompute_linear
from kimi_linear.layers.packing import PackedInputProjections
from kimi_linear.ops.conv import causal_conv1d
from kimi_linear.ops.gated_norm import gated_rms_norm
from kimi_linear.ops.kda import chunk_kda, kda_decode_step
from kimi_linear.ops.kda.chunk import chunk_kda_with_states, resolve_backend, resolve_kda_backend
from kimi_linear.ops.kda.common import preprocess
from kimi_linear.ops.linear import linear


class KimiDeltaAttention(PackedInputProjections, nn.Module):
    """KDA token mixer: ``forward(hidden_states [B, T, D], cache=None, cu_seqlens=None, attention_mask=None)``
    -> ``[B, T, D]``.

    Cache (``cache_layout``; pools allocated by ``kimi_linear.cache``, one slot per sequence): ``conv``
    ``[3·H·K, W-1]`` (q, k, v conv inputs, oldest first) and ``state`` ``[H, K, V]`` in the cache's
    ``state_dtype`` (fp32, or bf16: the ops compute in fp32 and store rounded to nearest; a prefill's fp32 final
    state is rounded as it is written). Row n of a forward reads and writes slot ``cache.slots[n]``.

    ``conv_backend`` is the ``backend`` of the ShortConv's ``causal_conv1d`` over whole sequences,
    ``preprocess_backend`` the ``preprocess_backend`` of ``chunk_kda`` (where the in-op activations run),
    ``chunk_backend`` the ``backend`` of ``chunk_kda`` and ``decode_backend`` the ``backend`` of
    ``kda_decode_step`` (a one-token step with a cache): "auto" (the fused Triton kernels on CUDA, PyTorch
    elsewhere), "triton" or "torch" (Triton on CPU tensors only through Triton's interpreter).
    """

    @classmethod
    def cache_layout(cls, config: KimiLinearConfig, layer_idx: int) -> tuple[CacheEntry, ...]:
        """Per-sequence conv tails (model dtype) and recurrent state (the cache's state_dtype, fp32 by default):
        fixed size, any length."""
        H, K = config.kda_num_heads, config.kda_head_dim
        return (
            CacheEntry("conv", "slot", (3 * H * K, config.short_conv_kernel_size - 1)),
            CacheEntry("state", "slot", (H, K, K), recurrent=True),
        )

    def __init__(self, config: KimiLinearConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.scalar_gate = config.layer_types[layer_idx] == "gdn"
        D = config.hidden_size
        H, K = config.kda_num_heads, config.kda_head_dim
        self.num_heads, self.head_dim = H, K
        self.qkv_dim = H * K
        self.use_short_conv = config.use_short_conv
        self.use_output_gate = config.use_output_gate
        self.conv_size = config.short_conv_kernel_size
        self.conv_backend = "auto"
        self.preprocess_backend = "auto"
        self.chunk_backend = "auto"
        self.decode_backend = "auto"

        self.q_proj = Linear(D, H * K)
        self.k_proj = Linear(D, H * K)
        self.v_proj = Linear(D, H * K)
        if self.use_short_conv:
            self.q_conv1d = nn.Conv1d(H * K, H * K, self.conv_size, groups=H * K, bias=False)
            self.k_conv1d = nn.Conv1d(H * K, H * K, self.conv_size, groups=H * K, bias=False)
            self.v_conv1d = nn.Conv1d(H * K, H * K, self.conv_size, groups=H * K, bias=False)
        gate_width = H if self.scalar_gate else H * K
        self.f_a_proj = Linear(D, K)
        self.f_b_proj = Linear(K, gate_width)
        self.A_log = nn.Parameter(torch.empty(1, 1, H, 1, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(gate_width, dtype=torch.float32))
        self.b_proj = Linear(D, H)
        if self.use_output_gate:
            self.g_a_proj = Linear(D, K)
            self.g_b_proj = Linear(K, H * K)
        self.o_norm = nn.Module()
        self.o_norm.weight = nn.Parameter(torch.ones(K))
        self.o_proj = Linear(H * K, D)
        self.reset_gate_parameters()

    @torch.no_grad()
    def reset_gate_parameters(self) -> None:
        """A_log = log U(1, 16); dt_bias = softplus^-1(dt), dt log-uniform in [1e-3, 1e-1] (as Mamba2/GDN)."""
        if self.A_log.is_meta:
            return
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
        dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _apply(self, fn, *args, **kwargs):
        # The gate parameters stay fp32 whatever dtype the rest of the model is cast to (as in the release);
        # the fp32 values from before the cast are kept, not a round trip through the lower precision.
        before = {name: getattr(self, name).data for name in ("A_log", "dt_bias")}
        super()._apply(fn, *args, **kwargs)
        for name, old in before.items():
            p = getattr(self, name)
            if old.dtype == torch.float32 and p.dtype != torch.float32:
                p.data = old.to(p.device)
        return self

    def _input_projections(self) -> list[nn.Linear]:
        """The projections that read x, in the order of the packed matrix's rows."""
        return [self.q_proj, self.k_proj, self.v_proj, self.f_a_proj, self.b_proj] + (
            [self.g_a_proj] if self.use_output_gate else []
        )

    def _projections(self, x: torch.Tensor):
        """``(qkv [B, T, 3·H·K], f_low [B, T, K], beta_logits [B, T, H], g_low [B, T, K] or None)`` of x; g_low only
        from the packed matrix (unpacked, the output gate's projection runs after the mixer, as in training, so
        that the gradient of x sums in the same order). Packed, they are column slices of one product: the
        matmuls and the decode kernel read them strided, and the conv and preprocessing ops make the rows they
        need contiguous themselves."""
        HK, K, H = self.qkv_dim, self.head_dim, self.num_heads
        packed = self._forward_packed_weight()
        if packed is None:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # [B, T, 3·H·K]
            return qkv, self.f_a_proj(x), self.b_proj(x), None
        y = linear(x, packed)  # [B, T, ΣN]
        sizes = [3 * HK, K, H] + ([K] if self.use_output_gate else [])
        parts = y.split(sizes, dim=-1)
        qkv, f_low, beta_logits = parts[:3]
        return qkv, f_low, beta_logits, parts[3] if self.use_output_gate else None

    def conv_weight(self) -> torch.Tensor:
        """The three depthwise filters stacked: ``[3·H·K, W]``."""
        return torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight], dim=0)[:, 0]

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            hidden_states: ``[B, T, D]``.
            cache: a ``KimiLinearCache`` whose rows are the N sequences (N = B, or the number of packed
                sequences with ``cu_seqlens``); read and updated in place. None for training / a plain
                forward.
            cu_seqlens: int ``[N + 1]`` boundaries of sequences packed along T (B = 1): no state or conv
                leakage.
            attention_mask: ``[B, T]`` 1 for tokens, 0 for padding; padded positions are zeroed before the
                projections, so left padding leaves the state exactly as without it.
        Returns:
            ``[B, T, D]`` in hidden_states' dtype.
        """
        B, T, _ = hidden_states.shape
        x = hidden_states
        if attention_mask is not None:
            x = x * attention_mask[:, :, None].to(x.dtype)
        layer_cache = None if cache is None else cache.layers[self.layer_idx]
        decoding = layer_cache is not None and T == 1 and cu_seqlens is None
        # A padded piece (``KimiLinearCache.piece_view``): real tokens per row on the device, no host reads.
        new_tokens = None if layer_cache is None or decoding else cache.new_tokens
        # A prefill into empty rows has no history to read: skip the (zero) initial states.
        history = layer_cache is not None and not decoding and (
            new_tokens is not None or max(cache.host_lengths(), default=0) > 0)
        # The dense cache's row n is slot n (update the pools in place); otherwise gather / scatter the rows.
        in_place = layer_cache is not None and cache.identity_rows

        x = autocast_input(x)  # one low-precision copy of x for all the projections, not one each
        qkv, f_low, beta_logits, g_low = self._projections(x)

        if decoding:
            # Everything between the projections and o_proj in one op, the pools updated in place at the rows'
            # slots (the dense cache's slots are its rows).
            conv = self.use_short_conv
            gate = self.use_output_gate
            o = kda_decode_step(
                qkv[:, 0], f_low[:, 0], beta_logits[:, 0], state_pool=layer_cache["state"], slots=cache.slots,
                f_b_weight=self.f_b_proj.weight, A_log=self.A_log, dt_bias=self.dt_bias,
                norm_weight=self.o_norm.weight, conv_pool=layer_cache["conv"] if conv else None,
                conv_weights=(self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight) if conv else None,
                g_low=(self.g_a_proj(x) if g_low is None else g_low)[:, 0] if gate else None,
                g_b_weight=self.g_b_proj.weight if gate else None,
                eps=self.config.rms_norm_eps, backend=self.decode_backend,
            )  # [B, H·V]
            return self.o_proj(o[:, None])
        if layer_cache is not None:
            conv_state = None
            if history and self.use_short_conv:
                pool = layer_cache["conv"]
                conv_state = pool if in_place else pool.index_select(0, cache.slots)
            q, k, v, g, beta, conv_final = self._op_inputs(
                qkv, f_low, beta_logits, self._conv_weight_or_none(), self.f_b_proj.weight, self.A_log,
                self.dt_bias, cu_seqlens=cu_seqlens, conv_state=conv_state, output_conv_state=True,
            )
            if new_tokens is not None:
                g, beta, conv_final = self._mask_padding(qkv, conv_state, g, beta, new_tokens)
            if self.use_short_conv:
                self._store_rows(layer_cache["conv"], conv_final, cache, in_place)
            initial = None
            if history:
                pool = layer_cache["state"]
                initial = pool if in_place else pool.index_select(0, cache.slots)
            if cache.snapshots is None:
                o, state = chunk_kda(q, k, v, g, beta, initial_state=initial, output_final_state=True,
                                     cu_seqlens=cu_seqlens, backend=self.chunk_backend)
            else:
                o, state = self._chunk_and_snapshots(layer_cache, qkv, q, k, v, g, beta, initial, cu_seqlens,
                                                     cache.snapshots)
            self._store_rows(layer_cache["state"], state, cache, in_place)
        else:
            # Training / a plain forward: the conv, SiLU, q/k L2 norms, gate and beta are recomputed in backward
            # from the projections, which are kept (with the conv filters and the gate parameters).
            prepare = functools.partial(self._op_inputs, cu_seqlens=cu_seqlens)
            inputs = (qkv, f_low, beta_logits, self._conv_weight_or_none(), self.f_b_proj.weight, self.A_log,
                      self.dt_bias)
            if (B * T > 0 and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                    and self._op_backends(qkv)[0] == "triton"):
                from kimi_linear.ops.kda.chunk_triton import chunk_kda_triton_recomputing

                # the op reruns them itself at the start of its backward, which needs them: one recomputation,
                # and q, k, v, g, beta are not kept
                o = chunk_kda_triton_recomputing(prepare, *inputs, cu_seqlens=cu_seqlens)
            else:
                # the reference keeps its own inputs; without grad, or traced by torch.compile (which sees
                # chunk_kda as its registered op), nothing is kept
                o, _ = chunk_kda(*recompute(prepare, *inputs), cu_seqlens=cu_seqlens, backend=self.chunk_backend)

        # The output norm and gate are recomputed in backward too (for o_proj's weight gradient as well): only o
        # and the low-rank gate input are kept.
        if g_low is None and self.use_output_gate:
            g_low = self.g_a_proj(x)  # [B, T, K]
        g_b_weight = self.g_b_proj.weight if self.use_output_gate else None
        return recompute_linear(self._gated_norm, self.o_proj.weight, o, g_low, self.o_norm.weight, g_b_weight)

    def _chunk_and_snapshots(self, layer_cache, qkv, q, k, v, g, beta, initial, cu_seqlens, snapshots):
        """``chunk_kda`` of a packed prefill that also writes the states and conv tails at ``snapshots``'
        points into their pool slots (fp32 states, rounded only as the pool stores them, as a piece ending
        there would store its final state). Returns ``(o, final states)``."""
        backend = resolve_kda_backend(self.chunk_backend, q, k, v, g, beta, initial)
        o, state, h = chunk_kda_with_states(q, k, v, g, beta, initial, cu_seqlens, None, None, q.shape[-1] ** -0.5,
                                            True, False, False, False, backend, backend)  # h [1, NT, H, K, V]
        pool = layer_cache["state"]
        pool.index_copy_(0, snapshots.slots, h[0].index_select(0, snapshots.chunks).to(pool.dtype))
        if self.use_short_conv:
            pool = layer_cache["conv"]  # [slots, C, W - 1]: the last W - 1 conv inputs, oldest first
            W1 = pool.shape[-1]
            cols = snapshots.tokens[:, None] - W1 + torch.arange(W1, device=qkv.device)  # [P, W - 1]
            tails = qkv[0].index_select(0, cols.reshape(-1)).view(cols.shape[0], W1, -1)  # [P, W - 1, C]
            pool.index_copy_(0, snapshots.slots, tails.transpose(1, 2).to(pool.dtype))
        return o, state

    def _mask_padding(self, qkv, conv_state, g, beta, new_tokens):
        """A padded piece's gate and beta with the padding's set to 0 (its tokens then leave the state as it was:
        S <- (I - 0) Diag(e^0) S + 0), and the conv tails at each row's real end: the last W-1 of the previous
        tail followed by the row's ``new_tokens [B]`` real inputs. Device ops only."""
        B, T, _ = qkv.shape
        real = torch.arange(T, device=qkv.device)[None, :] < new_tokens[:, None]  # [B, T]
        g = torch.where(real.view(B, T, *([1] * (g.dim() - 2))), g, 0.0)
        beta = torch.where(real.view(B, T, *([1] * (beta.dim() - 2))), beta, 0.0)
        if not self.use_short_conv:
            return g, beta, None
        W1 = conv_state.shape[-1]  # W - 1
        inputs = torch.cat([conv_state.to(qkv.dtype), qkv.transpose(1, 2)], dim=2)  # [B, C, W - 1 + T]
        cols = new_tokens[:, None] + torch.arange(W1, device=qkv.device)[None, :]  # [B, W - 1]
        tail = inputs.gather(2, cols[:, None, :].expand(B, inputs.shape[1], W1))
        return g, beta, tail

    def _conv_weight_or_none(self) -> torch.Tensor | None:
        return self.conv_weight() if self.use_short_conv else None

    def _op_backends(self, x: torch.Tensor) -> tuple[str, str]:
        """(chunk_kda's backend, where its in-op activations run) for x, as ``chunk_kda`` resolves them."""
        backend = resolve_backend(self.chunk_backend, x)
        pre = backend if self.preprocess_backend == "auto" else resolve_backend(self.preprocess_backend, x)
        return backend, pre

    def _op_inputs(self, qkv, f_low, beta_logits, conv_weight, f_b_weight, A_log, dt_bias, *, cu_seqlens=None,
                   conv_state=None, output_conv_state=False):
        """Projections -> chunk_kda's inputs: short conv + SiLU of q, k, v; q, k L2-normalised; the forget gate
        g = -exp(A_log) softplus(f_b(f_low) + dt_bias) and beta = sigmoid(beta_logits), in fp32.

        The activations are those ``chunk_kda`` applies with ``use_*_in_kernel`` (the same functions, the same
        fused Triton kernels where it would use them, the same operand dtype), so the results are identical;
        running them here lets ``recompute`` drop their intermediates. Returns ``(q, k, v, g, beta)``, and the
        conv's final state with ``output_conv_state``.
        """
        B, T, _ = qkv.shape
        H, K = self.num_heads, self.head_dim
        conv_final = None
        if conv_weight is None:
            qkv = F.silu(qkv)
        else:
            qkv, conv_final = causal_conv1d(qkv, conv_weight, initial_state=conv_state, cu_seqlens=cu_seqlens,
                                            output_final_state=output_conv_state, backend=self.conv_backend)
        q, k, v = qkv.view(B, T, 3, H, K).unbind(2)  # [B, T, H, K] each
        g = F.linear(f_low, f_b_weight)
        g = g.view(B, T, H) if self.scalar_gate else g.view(B, T, H, K)
        backend, pre = self._op_backends(q)
        q, k, g, beta = preprocess(q, k, g, beta_logits, True, True, A_log, dt_bias, True, K,
                                   operand_dtype=q.dtype if backend == "triton" else None, fused=pre == "triton")
        if self.scalar_gate:  # preprocess broadcast the gate over K; chunk_kda does that itself
            g = g[..., 0]
        out = (q, k, v.contiguous(), g, beta)
        return (*out, conv_final) if output_conv_state else out

    def _gated_norm(self, o, g_low, norm_weight, g_b_weight):
        """Per-head RMSNorm (one weight shared by the heads) times the low-rank sigmoid output gate, in fp32
        (``ops.gated_norm``, on the fused kernels where the in-op activations run on theirs): ``o [B, T, H, V]``
        -> ``[B, T, H·V]`` in o's dtype."""
        gate = None if g_low is None else F.linear(g_low, g_b_weight)
        backend = "torch" if o.dtype == torch.float64 else self._op_backends(o)[1]  # as chunk_kda takes float64
        return gated_rms_norm(o, gate, norm_weight, self.config.rms_norm_eps, backend=backend)

    @staticmethod
    def _store_rows(pool: torch.Tensor, rows: torch.Tensor, cache, in_place: bool) -> None:
        """Write the rows' final conv tails / states ``[N, ...]`` back to their slots of ``pool``."""
        if in_place:
            pool.copy_(rows)
        else:
            pool.index_copy_(0, cache.slots, rows.to(pool.dtype))
