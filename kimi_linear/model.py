"""The Kimi Linear hybrid causal LM, top to bottom: embed → blocks (mixer + MLP/MoE, pre-norm) → norm → head.

Each block is ``x + mixer(input_layernorm(x))`` then ``x + mlp(post_attention_layernorm(x))``. The mixer is
chosen per layer from ``config.layer_types`` through ``layers.MIXERS`` (KDA / GDN / MLA / Mamba2); the MLP is
the dense SwiGLU for layers < ``first_k_dense_replace`` and the MoE after. Attribute names are the released
checkpoint's (``model.layers.N.self_attn``, ``.mlp`` or ``.block_sparse_moe``, ``lm_head``), so the state dict
is the release's apart from the MoE experts, which are stacked here (``kimi_linear.checkpoint`` maps them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint

from kimi_linear.cache import KimiLinearCache
from kimi_linear.checkpoint import load_pretrained, save_pretrained
from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers import MIXERS, mixer_class
from kimi_linear.layers.linear import Linear
from kimi_linear.layers.mlp import SwiGLUMLP
from kimi_linear.layers.moe import MoE
from kimi_linear.layers.norm import RMSNorm
from kimi_linear.ops.cross_entropy import IGNORE_INDEX, linear_cross_entropy
from kimi_linear.ops.varlen import host_values, known_host_values, sequence_lengths


def count_parameters(config: KimiLinearConfig) -> tuple[int, int]:
    """(total, active-per-token) parameter counts from the config alone (no model is built).

    "Active" counts the embedding, every dense part, the shared experts and top-k of the routed experts.
    Covers the "kda", "gdn" and "mla" layer types; a "mamba2" layer is counted by building that mixer on the
    meta device.
    """
    c = config
    D, H, K = c.hidden_size, c.kda_num_heads, c.kda_head_dim
    total = active = 0
    for i, layer_type in enumerate(c.layer_types):
        if layer_type in ("kda", "gdn"):
            gate = H if layer_type == "gdn" else H * K
            mixer = 4 * D * H * K + D * K + K * gate + H + gate + D * H + K
            mixer += 3 * H * K * c.short_conv_kernel_size if c.use_short_conv else 0
            mixer += D * K + K * H * K if c.use_output_gate else 0
        elif layer_type == "mla":
            Hq = c.num_attention_heads
            if c.q_lora_rank is None:
                mixer = D * Hq * c.qk_head_dim
            else:
                mixer = D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * Hq * c.qk_head_dim
            mixer += D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
            mixer += c.kv_lora_rank * Hq * (c.qk_nope_head_dim + c.v_head_dim) + Hq * c.v_head_dim * D
        else:
            with torch.device("meta"):
                mixer = sum(p.numel() for p in mixer_class(layer_type)(c, i).parameters())
        norms = 2 * D
        if c.is_moe_layer(i):
            expert = 3 * D * c.moe_intermediate_size
            router = c.num_experts * D + c.num_experts
            shared = c.num_shared_experts * expert
            total += mixer + norms + router + shared + c.num_experts * expert
            active += mixer + norms + router + shared + c.num_experts_per_token * expert
        else:
            total += mixer + norms + 3 * D * c.intermediate_size
            active += mixer + norms + 3 * D * c.intermediate_size
    embed = c.vocab_size * D
    head = 0 if c.tie_word_embeddings else c.vocab_size * D
    return total + embed + head + D, active + embed + head + D


@dataclass
class CausalLMOutput:
    """``logits [B, T, vocab]`` (the head's dtype) and the cache that was passed in (updated), if any; with
    ``labels``, instead of the logits, ``loss_sum``: the fp32 sum of the labelled tokens' cross-entropies."""

    logits: torch.Tensor | None
    cache: KimiLinearCache | None = None
    loss_sum: torch.Tensor | None = None


ACTIVATION_CHECKPOINTING_HELP = (
    "activation checkpointing: 'none'; 'full' (every block recomputed in backward, only its input kept); or a "
    "comma-separated list of parts whose input norm + module are recomputed: the token mixers 'kda', 'gdn', "
    "'mla', 'mamba2' (of that layer type) and the feed-forwards 'mlp' (dense) and 'moe' — e.g. 'mla,moe'"
)
CHECKPOINT_PARTS = frozenset({*MIXERS, "mlp", "moe"})


def parse_activation_checkpointing(spec: str) -> frozenset[str]:
    """``"none"`` -> {}, ``"full"`` -> {"full"}, ``"mla,moe"`` -> {"mla", "moe"}.

    Raises:
        ValueError: an unknown part, or "full"/"none" combined with others.
    """
    if not isinstance(spec, str):
        raise TypeError(f"activation checkpointing must be a string, got {type(spec).__name__}")
    parts = frozenset(p.strip() for p in spec.split(",") if p.strip())
    if parts in (frozenset({"none"}), frozenset()):
        return frozenset()
    if parts == {"full"}:
        return parts
    unknown = sorted(parts - CHECKPOINT_PARTS)
    if unknown:
        raise ValueError(f"activation checkpointing {spec!r}: unknown part(s) {unknown}; "
                         f"{ACTIVATION_CHECKPOINTING_HELP}")
    return parts


def _recompute_in_backward(fn, *args):
    """``fn(*args)`` keeping only its inputs; the backward runs it again (``torch.utils.checkpoint``)."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


class DecoderLayer(nn.Module):
    """One pre-norm block: token mixer, then dense SwiGLU (``mlp``) or MoE (``block_sparse_moe``).

    ``checkpoint_block`` / ``checkpoint_mixer`` / ``checkpoint_ffn`` (set by
    ``KimiLinearForCausalLM.set_activation_checkpointing``) recompute the whole block, or the norm + mixer, or
    the norm + feed-forward, in backward instead of keeping their activations (training without a cache only).
    """

    def __init__(self, config: KimiLinearConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = mixer_class(self.layer_type)(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.block_sparse_moe = MoE(config)
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

        self.checkpoint_block = self.checkpoint_mixer = self.checkpoint_ffn = False

    def forward(self, x, cache=None, cu_seqlens=None, attention_mask=None, delta=None, residual_form=False):
        """The block on ``x``; ``residual_form`` (forwards without autograd): on ``x + delta`` instead, returning
        ``(residual, feed-forward output)`` (``_residual_block``). Through ``__call__`` either way, so module hooks
        (FSDP's gathering of the parameters) run."""
        if residual_form:
            return self._residual_block(x, delta, cache, cu_seqlens, attention_mask)
        recompute = cache is None and torch.is_grad_enabled()
        if recompute and self.checkpoint_block:
            return _recompute_in_backward(self._block, x, None, cu_seqlens, attention_mask)
        return self._block(x, cache, cu_seqlens, attention_mask, recompute)

    def _block(self, x, cache=None, cu_seqlens=None, attention_mask=None, recompute=False):
        if recompute and self.checkpoint_mixer:
            x = x + _recompute_in_backward(self._mix, x, None, cu_seqlens, attention_mask)
        else:
            x = x + self._mix(x, cache, cu_seqlens, attention_mask)
        if recompute and self.checkpoint_ffn:
            return x + _recompute_in_backward(self._feed_forward, x)
        return x + self._feed_forward(x)

    def _residual_block(self, x, delta, cache, cu_seqlens, attention_mask):
        """The block as the model's forwards without autograd run it: its input is ``x + delta`` (``delta`` None:
        ``x``), the previous block's last residual add left undone, and it returns ``(residual, feed-forward
        output)`` likewise. So every residual add runs in one kernel with the norm after it
        (``RMSNorm.add_forward``). The same additions in the same order: the same values."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        if delta is None:
            h = norm1(x)
        else:
            x, h = norm1.add_forward(x, delta)
        x, h = norm2.add_forward(x, self.self_attn(h, cache=cache, cu_seqlens=cu_seqlens,
                                                   attention_mask=attention_mask))
        return x, (self.block_sparse_moe if self.is_moe else self.mlp)(h)

    def _mix(self, x, cache, cu_seqlens, attention_mask):
        return self.self_attn(self.input_layernorm(x), cache=cache, cu_seqlens=cu_seqlens,
                              attention_mask=attention_mask)

    def _feed_forward(self, x):
        ffn = self.block_sparse_moe if self.is_moe else self.mlp
        return ffn(self.post_attention_layernorm(x))


class KimiLinearModel(nn.Module):
    """Embeddings, the blocks and the final norm: ``input_ids [B, T]`` -> hidden states ``[B, T, D]``."""

    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, cache=None, cu_seqlens=None, attention_mask=None):
        x = self.embed_tokens(input_ids)
        if torch.is_grad_enabled():
            for layer in self.layers:
                x = layer(x, cache=cache, cu_seqlens=cu_seqlens, attention_mask=attention_mask)
            return self.norm(x)
        delta = None  # inference: each residual add is fused with the norm after it
        for layer in self.layers:
            x, delta = layer(x, cache=cache, cu_seqlens=cu_seqlens, attention_mask=attention_mask, delta=delta,
                             residual_form=True)
        return self.norm(x) if delta is None else self.norm.add_forward(x, delta)[1]


class KimiLinearForCausalLM(nn.Module):
    """The Kimi Linear LM. ``KimiLinearForCausalLM(config)`` builds it with random weights (fp32).

    ``forward(input_ids, cache=None, attention_mask=None, cu_seqlens=None)`` ->
    ``CausalLMOutput(.logits [B, T, V])``. Checkpoints (HF release format): ``save_pretrained(dir)`` /
    ``KimiLinearForCausalLM.from_pretrained(dir)``.
    """

    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        if not isinstance(config, KimiLinearConfig):
            raise TypeError(f"config must be a KimiLinearConfig, got {type(config).__name__}")
        self.config = config
        self.model = KimiLinearModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for every Linear and the embeddings; other parameters keep their
        module's
        own initialisation (norms at 1, the KDA gate parameters, conv filters, the MoE's)."""
        if self.lm_head.weight.is_meta:
            return
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def allocate_cache(self, batch_size: int, max_length: int,
                       state_dtype: torch.dtype = torch.float32) -> KimiLinearCache:
        """A zeroed cache for ``batch_size`` sequences of up to ``max_length`` tokens, model device/dtype, KDA
        states in ``state_dtype`` (float32 or bfloat16: ``KimiLinearCache``)."""
        return KimiLinearCache(self.config, batch_size, max_length, dtype=self.dtype, device=self.device,
                               state_dtype=state_dtype)

    def _validate(self, input_ids, cache, attention_mask, cu_seqlens) -> torch.Tensor | None:
        """Check the public inputs; return the new tokens per cache row (None without a cache)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32):
            raise TypeError("input_ids must be an int64/int32 torch.Tensor [B, T]")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, T] with T >= 1, got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        capturing = input_ids.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and input_ids.numel():
            known = known_host_values(input_ids)  # a caller that built the ids from a host list saves the read
            lo, hi = (min(known), max(known)) if known is not None else (int(input_ids.min()), int(input_ids.max()))
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids must be in [0, vocab_size={self.config.vocab_size}), got [{lo}, {hi}]"
                )
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask must be a tensor [B, T] = [{B}, {T}]")
            if cu_seqlens is not None:
                raise ValueError("pass either attention_mask (padding) or cu_seqlens (packing), not both")
            if cache is not None:
                raise ValueError(
                    "attention_mask cannot be combined with a cache; pack prompts with cu_seqlens instead"
                )
        new_tokens = None
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
                raise TypeError("cu_seqlens must be an int32/int64 tensor [N + 1]")
            if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
                raise ValueError(
                    f"cu_seqlens must be 1-D with N + 1 >= 2 entries, got {tuple(cu_seqlens.shape)}"
                )
            if B != 1:
                raise ValueError(
                    f"with cu_seqlens, input_ids must be [1, T] (sequences packed along T), got B={B}"
                )
            if not capturing:
                c = host_values(cu_seqlens)
                if c[0] != 0 or c[-1] != T or any(b < a for a, b in zip(c, c[1:], strict=False)):
                    raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {c}")
            new_tokens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=input_ids.device, dtype=torch.long)
        if cache is not None:
            if not isinstance(cache, KimiLinearCache):
                raise TypeError(f"cache must be a KimiLinearCache, got {type(cache).__name__}")
            N = B if cu_seqlens is None else cu_seqlens.numel() - 1
            if cache.batch_size != N:
                raise ValueError(f"cache has {cache.batch_size} rows but the input holds {N} sequences")
            if new_tokens is None:
                new_tokens = torch.full((B,), T, dtype=torch.long, device=input_ids.device)
            if not capturing:
                # on the host: the cache's lengths are read once per forward anyway (or set by the caller)
                counts = [T] * B if cu_seqlens is None else sequence_lengths(cu_seqlens)
                needed = max(n + k for n, k in zip(cache.host_lengths(), counts, strict=True))
                if needed > cache.max_length:
                    raise ValueError(
                        f"the cache holds {cache.max_length} tokens per sequence but {needed} are needed"
                    )
        return new_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KimiLinearCache | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Args:
            input_ids: ``[B, T]`` int64.
            cache: optional ``KimiLinearCache`` with one row per sequence; the tokens are appended to it (its
                ``lengths`` advance) and attention/recurrence continue from what it holds.
            attention_mask: ``[B, T]`` 1 = token, 0 = padding (left or right); padding changes no real token's
                logits. Not together with ``cache`` or ``cu_seqlens``.
            cu_seqlens: int ``[N + 1]``; B = 1 and N documents packed along T, with no attention, state or
                conv leakage across boundaries.
            labels: ``[B, T]`` int, the target of each position (already shifted: label t is the token that
                follows position t), -100 where there is none. Training passes them: the loss is then computed
                chunk by chunk from the hidden states (``kimi_linear.ops.cross_entropy``) and the
                ``[B, T, vocab]`` logits are never held whole.

        Returns:
            ``CausalLMOutput`` with ``.logits [B, T, vocab_size]`` and ``.cache``; with ``labels``,
            ``.loss_sum`` (fp32, summed over the labelled tokens) and ``.logits`` None.

        Raises:
            TypeError / ValueError naming the argument for bad ids, shapes, boundaries or a too-small cache.
        """
        new_tokens = self._validate(input_ids, cache, attention_mask, cu_seqlens)
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            raise ValueError(f"labels must be a tensor shaped like input_ids {tuple(input_ids.shape)}")
        hidden = self.model(input_ids, cache=cache, cu_seqlens=cu_seqlens, attention_mask=attention_mask)
        if cache is not None:
            cache.lengths += new_tokens
        if labels is not None:
            loss_sum = linear_cross_entropy(hidden, self.lm_head.weight, labels, ignore_index=IGNORE_INDEX)
            return CausalLMOutput(logits=None, cache=cache, loss_sum=loss_sum)
        return CausalLMOutput(logits=self.lm_head(hidden), cache=cache)

    def hidden_states(self, input_ids, cache=None, cu_seqlens=None) -> torch.Tensor:
        """Final-norm hidden states ``[B, T, D]`` without the head (generation applies it to a few rows only).

        Same arguments and cache update as ``forward``.
        """
        new_tokens = self._validate(input_ids, cache, None, cu_seqlens)
        hidden = self.model(input_ids, cache=cache, cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.lengths += new_tokens
        return hidden

    def set_activation_checkpointing(self, spec: str = "none") -> None:
        """Choose what training recomputes in backward instead of keeping (``ACTIVATION_CHECKPOINTING_HELP``).

        ``"none"`` keeps every activation (the layers still recompute their own cheap glue); ``"full"``
        recomputes every block from its input (the least memory: one ``[B, T, D]`` per layer, about a third
        more compute); a list such as ``"mla,moe"`` recomputes the norm + module of those parts only (MLA's
        attention and the MoE's expert activations are the usual choice: they keep the most per token). Values
        and gradients are unchanged; forwards with a cache or without grad are never recomputed.

        Raises:
            ValueError: an unknown part (the message lists them).
        """
        parts = parse_activation_checkpointing(spec)
        for layer in self.model.layers:
            layer.checkpoint_block = "full" in parts
            layer.checkpoint_mixer = layer.layer_type in parts
            layer.checkpoint_ffn = ("moe" if layer.is_moe else "mlp") in parts

    def pack_for_inference(self) -> None:
        """Pack the projections that read the same input into one matrix (``layers.packing``): each KDA layer's
        input projections, each MLA layer's query and latent projections, each SwiGLU MLP's gate and up: the same
        parameters and values, one matmul each in forwards without autograd. ``generate``, the chat
        session and the serving engine call it; idempotent."""
        for module in self.modules():
            if hasattr(module, "pack_input_projections") and module._packed_weight() is None:
                module.pack_input_projections()

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count; ``active=True`` counts only the routed experts a token uses (top-k of E)."""
        total, act = count_parameters(self.config)
        return act if active else total

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        max_shard_size: int | str = "5GB",
        dtype: torch.dtype | None = None,
    ) -> None:
        """Write ``config.json`` and sharded safetensors in the release format (kimi_linear.checkpoint)."""
        save_pretrained(self, save_directory, max_shard_size=max_shard_size, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KimiLinearForCausalLM:
        """Load a checkpoint folder (config.json + safetensors): built on the meta device, tensors read
        straight from the files onto ``device`` (default CPU) in ``dtype`` (default: as stored; A_log, dt_bias
        and the router stay fp32)."""
        return load_pretrained(cls, directory, dtype=dtype, device=device)
