"""Multi-head Latent Attention with NoPE (paper §4), the released checkpoint's parameter names.

    q            = q_proj(x)                      # [B, T, H, dn + dr]  (q_lora_rank is null in the release)
    latent, k_pe = kv_a_proj_with_mqa(x)          # [B, T, r], [B, T, dr]
    latent       = kv_a_layernorm(latent)
    k_nope, v    = kv_b_proj(latent)              # [B, T, H, dn], [B, T, H, dv]
    k            = [k_nope ‖ k_pe shared by all heads]   (no rotation: NoPE)
    o            = o_proj(softmax(q kᵀ · (dn + dr)^-½ + causal) v)

The cache keeps only ``latent`` and ``k_pe`` (r + dr = 576 values per token in the release). A one-token
decode step never decompresses them: with kv_b_proj = [W_uk; W_uv] per head,
q_nope · k_nope = (W_ukᵀ q_nope) · latent and o = W_uv (softmax(...) · latent): attention over the 576-dim
latent shared by all heads (MQA-style), with kv_b_proj absorbed into the query and the output.

``mla_use_nope=False`` (an ablation) rotates q_pe and k_pe with RoPE (rotate-half form, base
``rope_theta``) by each token's position inside its sequence.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.cache_layout import CacheEntry
from kimi_linear.layers.linear import Linear
from kimi_linear.layers.memory import autocast_input
from kimi_linear.layers.norm import RMSNorm
from kimi_linear.layers.packing import PackedInputProjections
from kimi_linear.ops.linear import linear
from kimi_linear.ops.mla_decode import mla_decode_attention
from kimi_linear.ops.varlen import host_to_device, host_values, sequence_lengths

# SDPA's backends for MLA's prefill and training attention. cuDNN's kernel is the fastest on Hopper at long
# lengths, but it builds an execution plan for every new shape (milliseconds of host time each), and packed
# prompts, prefill pieces and packed documents bring new shapes at nearly every call: it is taken only for calls of
# at least CUDNN_MIN_QUERIES queries, where the attention itself takes far longer than a plan. Otherwise the flash
# kernel takes each shape as it comes; the memory-efficient one takes the boolean masks; the math one is the
# fallback.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
CUDNN_MIN_QUERIES = 4096


def sdpa_backends(queries: int, masked: bool) -> list[SDPBackend]:
    """The SDPA backends, in priority order, for one attention call with ``queries`` query positions per row
    (``masked``: with a boolean mask, which cuDNN's kernel is not given)."""
    if queries >= CUDNN_MIN_QUERIES and not masked:
        return [SDPBackend.CUDNN_ATTENTION, *SDPA_BACKENDS]
    return SDPA_BACKENDS


def token_positions(
    B: int, T: int, device, cu_seqlens=None, attention_mask=None, offsets=None
) -> torch.Tensor:
    """Position of each token inside its own sequence, ``[B, T]`` long.

    cu_seqlens: packed sequences restart at 0; attention_mask: padding does not count (left padding shifts);
    offsets ``[N]``: tokens already in the cache for each sequence.
    """
    t = torch.arange(T, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        seq = torch.searchsorted(cu[1:], t, right=True)
        pos = (t - cu[seq])[None]
        if offsets is not None:
            pos = pos + offsets[seq][None]
        return pos
    if attention_mask is not None:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        pos = t.expand(B, T)
    if offsets is not None:
        pos = pos + offsets[:, None]
    return pos


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE on the last dim of ``x [B, T, ..., d]`` by ``positions [B, T]``; computed in fp32."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # [d/2]
    angles = positions.float()[..., None] * inv_freq  # [B, T, d/2]
    cos, sin = angles.cos(), angles.sin()
    for _ in range(x.dim() - 3):
        cos, sin = cos[:, :, None], sin[:, :, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class MultiheadLatentAttention(PackedInputProjections, nn.Module):
    """MLA token mixer: ``forward(hidden_states [B, T, D], cache=None, cu_seqlens=None, attention_mask=None)``
    -> ``[B, T, D]``.

    Cache (``cache_layout``; paged pools allocated by ``kimi_linear.cache``): per token ``latent``
    ``[kv_lora_rank]`` and ``k_pe`` ``[qk_rope_head_dim]`` in the model's dtype, stored as ``[num_blocks,
    block_size, ·]``; token p of row n lives in block ``cache.block_table[n, p // block_size]``, and
    ``cache.lengths [N]`` says how many each row holds.

    ``decode_backend`` picks the one-token decode attention of ``kimi_linear.ops.mla_decode``: "auto" (the
    fused Triton kernel on CUDA, the PyTorch reference elsewhere), "triton" or "torch".
    """

    decode_backend: str = "auto"

    @classmethod
    def cache_layout(cls, config: KimiLinearConfig, layer_idx: int) -> tuple[CacheEntry, ...]:
        """Per cached token: the normalised latent and the shared rope key part, model dtype."""
        return (
            CacheEntry("latent", "token", (config.kv_lora_rank,)),
            CacheEntry("k_pe", "token", (config.qk_rope_head_dim,)),
        )

    def __init__(self, config: KimiLinearConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        D, H = config.hidden_size, config.num_attention_heads
        self.num_heads = H
        self.nope_dim, self.rope_dim, self.v_dim = (
            config.qk_nope_head_dim,
            config.qk_rope_head_dim,
            config.v_head_dim,
        )
        self.qk_dim = self.nope_dim + self.rope_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.use_rope = not config.mla_use_nope
        self.scale = self.qk_dim**-0.5

        if config.q_lora_rank is None:
            self.q_proj = Linear(D, H * self.qk_dim)
        else:
            self.q_a_proj = Linear(D, config.q_lora_rank)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(config.q_lora_rank, H * self.qk_dim)
        self.kv_a_proj_with_mqa = Linear(D, self.kv_lora_rank + self.rope_dim)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim))
        self.o_proj = Linear(H * self.v_dim, D)

    # ---- pieces --------------------------------------------------------------------------------------------

    def _input_projections(self) -> list[nn.Linear]:
        """The projections that read x (the query's first and the latent's), in the packed matrix's order."""
        return [self.q_proj if self.config.q_lora_rank is None else self.q_a_proj, self.kv_a_proj_with_mqa]

    def _queries_and_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q [B, T, H, dn + dr], latent [B, T, r] normalised, k_pe [B, T, dr])`` of x; one matmul for both
        input projections when they are packed and autograd is off."""
        first, latent_proj = self._input_projections()
        packed = self._forward_packed_weight()
        if packed is None:
            q, kv = first(x), latent_proj(x)
        else:
            q, kv = linear(x, packed).split([first.out_features, latent_proj.out_features], dim=-1)
        if self.config.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return q.view(*x.shape[:2], self.num_heads, self.qk_dim), self.kv_a_layernorm(latent), k_pe

    def _expand(self, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents ``[B, S, r]``, ``[B, S, dr]`` -> keys ``[B, S, H, dn + dr]``, values ``[B, S, H, dv]``."""
        B, S, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, S, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, self.num_heads, self.rope_dim)], dim=-1)
        return k, v

    def _attend(self, q, k, v, mask=None, is_causal=False) -> torch.Tensor:
        """q ``[B, Tq, H, E]``, k ``[B, S, H, E]``, v ``[B, S, H, dv]``, mask bool ``[B or 1, 1, Tq, S]``."""
        dv = v.shape[-1]
        if q.is_cuda and dv < q.shape[-1]:
            # The fused (flash) kernels want one head dim for q, k and v: zero-pad v, drop the padding after.
            v = F.pad(v, (0, q.shape[-1] - dv))
        with sdpa_kernel(sdpa_backends(q.shape[1], mask is not None), set_priority=True):
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=mask,
                is_causal=is_causal,
                scale=self.scale,
            )
        return o.transpose(1, 2)[..., :dv]  # [B, Tq, H, dv]

    # ---- forward -------------------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            hidden_states: ``[B, T, D]``.
            cache: a ``KimiLinearCache`` (rows = sequences; the new tokens are appended after
                ``cache.lengths``).
            cu_seqlens: int ``[N + 1]``, sequences packed along T (B = 1); attention stays inside each.
            attention_mask: ``[B, T]`` 1 = token, 0 = padding (keys at padding are ignored). Not with a cache.
        Returns:
            ``[B, T, D]``.
        """
        B, T, _ = hidden_states.shape
        if cache is not None and ((T == 1 and cu_seqlens is None) or cache.new_tokens is not None):
            return self.decode(hidden_states, cache)
        hidden_states = autocast_input(hidden_states)  # one low-precision copy for both projections
        q, latent, k_pe = self._queries_and_latents(hidden_states)
        offsets = None if cache is None else cache.lengths
        if self.use_rope:
            pos = token_positions(B, T, q.device, cu_seqlens, attention_mask, offsets)
            q = torch.cat(
                [q[..., : self.nope_dim], apply_rope(q[..., self.nope_dim :], pos, self.config.rope_theta)],
                dim=-1,
            )
            k_pe = apply_rope(k_pe, pos, self.config.rope_theta)
        if cache is not None:
            o = self._attend_cached(q, latent, k_pe, cache, cu_seqlens)
        else:
            o = self._attend_fresh(q, latent, k_pe, cu_seqlens, attention_mask)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_dim))

    def _attend_fresh(self, q, latent, k_pe, cu_seqlens, attention_mask, seg_lens=None) -> torch.Tensor:
        """Causal attention among the new tokens only (no cache, or an empty one).

        seg_lens: the packed sequences' lengths as a host list, when the caller already has them.
        """
        B, T = q.shape[:2]
        k, v = self._expand(latent, k_pe)
        if cu_seqlens is None and attention_mask is None:
            return self._attend(q, k, v, is_causal=True)
        if cu_seqlens is not None and not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
            if seg_lens is None:
                seg_lens = sequence_lengths(cu_seqlens)
            return self._attend_packed(q, k, v, seg_lens)
        return self._attend(q, k, v, mask=self._mask(B, T, q.device, cu_seqlens, attention_mask))

    def _attend_packed(self, q, k, v, seg_lens: list[int], only: set[int] | None = None) -> torch.Tensor:
        """Causal attention inside each of the sequences packed along T (``q [1, T, H, E]``); with ``only``,
        inside those sequences only (the other rows of the result are left unset for the caller).

        Sequences of similar length (same power-of-two bucket) are attended as one batch with the plain causal
        kernel: equal lengths back to back (same-length prompts, or one sequence) are a reshape of the packed
        tensors, no copy; otherwise they are gathered into a right-padded batch, where a real query never sees a
        padding key (padding comes after it), so no mask is needed and the work stays proportional to each
        sequence's own length squared. Cost: one attention call per bucket (<= log2 T + 1), whatever the number
        of sequences.
        """
        T = q.shape[1]
        starts = [0] * len(seg_lens)
        for i in range(1, len(seg_lens)):
            starts[i] = starts[i - 1] + seg_lens[i - 1]
        buckets: dict[int, list[int]] = {}
        for i, n in enumerate(seg_lens):
            if n > 0 and (only is None or i in only):
                buckets.setdefault(max(n - 1, 0).bit_length(), []).append(i)
        out = None
        for members in buckets.values():
            n, a, width = len(members), starts[members[0]], seg_lens[members[0]]
            if all(seg_lens[i] == width and starts[i] == a + j * width for j, i in enumerate(members)):
                rows, shape = slice(a, a + n * width), (n, width, q.shape[2], -1)
                o = self._attend(q[0, rows].reshape(shape), k[0, rows].reshape(shape), v[0, rows].reshape(shape),
                                 is_causal=True)  # [n, width, H, dv]
                if n * width == T:
                    return o.reshape(1, T, *o.shape[2:])
                src = dst = None
            else:
                lens = torch.tensor([seg_lens[i] for i in members])  # host
                first = torch.tensor([starts[i] for i in members])
                t_b = int(lens.max())
                pos = torch.arange(t_b)
                # right padding repeats each sequence's last token (never seen by its real queries)
                gather = host_to_device(first[:, None] + torch.minimum(pos[None, :], lens[:, None] - 1), q.device)
                o = self._attend(q[0][gather], k[0][gather], v[0][gather], is_causal=True)  # [n, t_b, H, dv]
                src, dst = self._real_rows(lens, t_b, first)
            if out is None:
                out = q.new_empty(T, q.shape[2], v.shape[-1])  # [T, H, dv]
            if src is None:
                out[rows] = o.reshape(n * width, *o.shape[2:])
            else:
                rows_out = o.flatten(0, 1).index_select(0, host_to_device(src, q.device))
                out.index_copy_(0, host_to_device(dst, q.device), rows_out)
        if out is None:  # no tokens
            out = q.new_empty(T, q.shape[2], v.shape[-1])
        return out[None]

    @staticmethod
    def _real_rows(lens: torch.Tensor, width: int, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Host index pair for unpadding: the real rows of a right-padded ``[n, width]`` batch flattened
        (``src``), and where they go in the packed sequence (``dst``: ``first[i] + t``)."""
        i, t = (torch.arange(width)[None, :] < lens[:, None]).nonzero(as_tuple=True)  # host, no device sync
        return i * width + t, first[i] + t

    @staticmethod
    def _mask(B, T, device, cu_seqlens, attention_mask) -> torch.Tensor:
        """Bool ``[B or 1, 1, T, T]``: causal, inside one packed sequence, keys not padding.

        Every query keeps its own key, so a padding row never has an empty softmax (its output is never used).
        """
        t = torch.arange(T, device=device)
        allowed = t[None, :] <= t[:, None]  # [T, T]
        if cu_seqlens is not None:
            seq = torch.searchsorted(cu_seqlens.to(device=device, dtype=torch.long)[1:], t, right=True)
            allowed = allowed & (seq[None, :] == seq[:, None])
        allowed = allowed[None, None]
        if attention_mask is not None:
            keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
            allowed = allowed & (keys | torch.eye(T, dtype=torch.bool, device=device))
        return allowed

    @staticmethod
    def _token_index(cache, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat index into a token pool viewed as ``[num_blocks * block_size, ·]`` of token ``positions`` of
        cache ``rows`` (same shapes, or one int row for all)."""
        bs = cache.block_size
        return cache.block_table[rows, positions // bs] * bs + positions % bs

    def _attend_cached(self, q, latent, k_pe, cache, cu_seqlens) -> torch.Tensor:
        """Append the new latents to the cache rows, then attend over each row's cached prefix (decompressed).

        When the rows were empty (a prefill) only the new tokens exist and the cache is not read back. Otherwise
        each row attends on its own: its queries are the last of its keys, so the mask is the causal one aligned
        to the lower right, which SDPA runs in its fused (flash) kernels without building a mask; a padded
        batch of rows needs a boolean mask, which the flash kernel does not take.
        """
        B, T = q.shape[:2]
        entry = cache.layers[self.layer_idx]
        flat_latent = entry["latent"].view(-1, self.kv_lora_rank)  # [num_blocks * block_size, r]
        flat_pe = entry["k_pe"].view(-1, self.rope_dim)
        start = cache.lengths  # [N]
        starts_host = cache.host_lengths()
        t = torch.arange(T, device=q.device)
        if cu_seqlens is None:
            rows = torch.arange(B, device=q.device)[:, None].expand(B, T)
            cols = start[:, None] + t
            seg_lens = None
        else:
            cu = cu_seqlens.to(device=q.device, dtype=torch.long)
            rows = torch.searchsorted(cu[1:], t, right=True)
            cols = start[rows] + t - cu[rows]
            cu_host = host_values(cu_seqlens)
            seg_lens = sequence_lengths(cu_seqlens)
        index = self._token_index(cache, rows, cols).reshape(-1)
        flat_latent.index_copy_(0, index, latent.reshape(-1, self.kv_lora_rank).to(flat_latent.dtype))
        flat_pe.index_copy_(0, index, k_pe.reshape(-1, self.rope_dim).to(flat_pe.dtype))
        if max(starts_host, default=0) == 0:
            return self._attend_fresh(q, latent, k_pe, cu_seqlens, None, seg_lens)
        # Imported here: torch.nn.attention.bias pulls in torch._dynamo (and Triton) when imported.
        from torch.nn.attention.bias import causal_lower_right

        def attend_row(n: int, q_n: torch.Tensor, past: int) -> torch.Tensor:  # [new, H, E] -> [new, H, dv]
            keys = self._token_index(cache, n, torch.arange(past + len(q_n), device=q.device))  # [S]
            k, v = self._expand(flat_latent[keys][None].to(q.dtype), flat_pe[keys][None].to(q.dtype))  # [1, S, H, ·]
            return self._attend(q_n[None], k, v, mask=causal_lower_right(len(q_n), past + len(q_n)))[0]

        if seg_lens is None:
            return torch.stack([attend_row(n, q[n], past) for n, past in enumerate(starts_host)])  # [B, T, H, dv]
        # packed pieces: those that start a sequence attend among themselves, batched as in a fresh prefill;
        # those that continue one attend over their cached prefix, one by one
        fresh = {n for n, past in enumerate(starts_host) if past == 0}
        if fresh:
            k, v = self._expand(latent, k_pe)
            out = self._attend_packed(q, k, v, seg_lens, only=fresh)[0]  # [T, H, dv]
        else:
            out = q.new_empty(T, q.shape[2], self.v_dim)
        for n, past in enumerate(starts_host):
            if n not in fresh and seg_lens[n] > 0:
                a, b = cu_host[n], cu_host[n + 1]
                out[a:b] = attend_row(n, q[0, a:b], past)
        return out[None]  # [1, T, H, dv]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_uk ``[H, dn, r]`` (keys) and W_uv ``[H, dv, r]`` (values)."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def decode(self, hidden_states: torch.Tensor, cache) -> torch.Tensor:
        """T tokens per sequence (one at decode; a padded piece of a ``piece_view``), absorbed: attention over the
        cached latents without decompressing them.

        Writes the new latents at ``cache.lengths + t`` and attends, for each new token, over its row's positions
        up to its own (``ops.mla_decode``: on CUDA one split-K flash-decoding kernel that reads each cached latent
        once for all heads, no score tensor; elsewhere the reference), each token a row of the kernel. In a
        piece, the padding after a row's ``new_tokens`` real tokens writes and reads as the row's last real token
        does, so nothing past it is touched. Shapes are static and nothing syncs with the host (CUDA-graph
        capturable).
        """
        B, T = hidden_states.shape[:2]
        entry = cache.layers[self.layer_idx]
        q, latent, k_pe = self._queries_and_latents(hidden_states)  # [B, T, H, dn + dr], [B, T, r], [B, T, dr]
        t = torch.arange(T, device=q.device)
        pos = cache.lengths[:, None] + t  # [B, T]
        if self.use_rope:
            q = torch.cat([q[..., : self.nope_dim], apply_rope(q[..., self.nope_dim :], pos, self.config.rope_theta)],
                          dim=-1)
            k_pe = apply_rope(k_pe, pos, self.config.rope_theta)
        if cache.new_tokens is not None:  # padding stands in for the row's last real token
            src = torch.minimum(t[None, :], (cache.new_tokens[:, None] - 1).clamp(min=0))  # [B, T]
            latent = latent.gather(1, src[..., None].expand(B, T, latent.shape[-1]))
            k_pe = k_pe.gather(1, src[..., None].expand(B, T, k_pe.shape[-1]))
            pos = cache.lengths[:, None] + src
        rows = torch.arange(B, device=q.device)[:, None].expand(B, T)
        index = self._token_index(cache, rows, pos).reshape(-1)  # [B·T]
        entry["latent"].view(-1, self.kv_lora_rank).index_copy_(
            0, index, latent.reshape(-1, self.kv_lora_rank).to(entry["latent"].dtype))
        entry["k_pe"].view(-1, self.rope_dim).index_copy_(0, index, k_pe.reshape(-1, self.rope_dim).to(entry["k_pe"].dtype))
        # the dense cache is [B, L_max, ·] with row b in block b; otherwise, or with several tokens a row, read
        # through the block table (one table row per token)
        block_table = None if cache.identity_rows and T == 1 else cache.block_table.repeat_interleave(T, dim=0)

        w_uk, w_uv = self.absorbed_weights()
        q_nope, q_pe = q.reshape(B * T, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        q_latent = torch.einsum("bhd,hdr->bhr", q_nope, w_uk)  # [B·T, H, r]
        # the valid prefix of each token: the cached tokens, the piece's tokens before it and itself
        o_latent = mla_decode_attention(
            q_latent, q_pe, entry["latent"], entry["k_pe"], pos.reshape(-1) + 1, self.scale,
            backend=self.decode_backend, block_table=block_table,
        )  # [B·T, H, r]
        o = torch.einsum("bhr,hvr->bhv", o_latent.to(w_uv.dtype), w_uv)  # [B·T, H, dv]
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_dim))
