"""Kimi Delta Attention in plain PyTorch: the specification and the CPU path.

Three functions, all in fp32 internally (fp64 for fp64 inputs), all differentiable by autograd:

* ``naive_recurrent_kda`` — the token-by-token loop of paper Eq. 1. It is the spec every other implementation is
  tested against; it is slow (one Python step per token) and meant for tests only.
* ``naive_chunk_kda`` — the chunkwise-parallel form of paper §3.1 (Eqs. 2–9): WY representation of the rank-1
  updates inside a chunk of C = 64 tokens, the UT transform (a unit lower-triangular solve), then a sequential pass
  over chunks that carries the state. Fast enough to train small models on a CPU.
* ``naive_recurrent_dplr`` — the general diagonal-plus-low-rank recurrence, for comparisons.

Layouts: q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``, g ``[B, T, HV, K]`` (natural-log decay, ≤ 0),
beta ``[B, T, HV]``, states ``[B, HV, K, V]`` fp32. HV is a multiple of H (grouped value heads, GVA: value head
``hv`` reads query/key head ``hv // (HV // H)``); HV = H is plain KDA. Math runs in fp32, or in fp64 when an input
is fp64. These functions take already-validated, already-activated inputs (no gate activation, no L2 norm, no
sigmoid): the public ops in ``chunk.py`` / ``recurrent.py`` do that.

Numerics of the chunked form: cumulative log-decays stay in fp32 and only *differences* measured forward in time are
exponentiated (every factor is ≤ 1), so g = -1000 gives exact zeros instead of inf/NaN. Inside a chunk, pairs of
rows in different sub-blocks (SUB_CHUNK rows each) are decayed through the first row r of the later sub-block,
exp(G_t - G_i) = exp(G_t - G_r) · exp(G_r - G_i) with both factors ≤ 1, which turns them into plain matmuls; pairs
inside one sub-block are decayed element-wise.
"""

from __future__ import annotations

import torch

CHUNK_SIZE = 64
# The chunk forms take log-decays below this as this: exp() of it is exactly 0 in fp32 and fp64, so a gate at or
# below it (-inf included) resets the state as the recurrence does, while the differences of the cumulative decays
# the chunk forms exponentiate stay finite (-inf - -inf would be NaN). NaN passes through.
LOG_DECAY_FLOOR = -1000.0
SUB_CHUNK = 8  # measured fastest on CPU: larger blocks cost more element-wise work, smaller more matmuls


def math_dtype(*xs: torch.Tensor | None) -> torch.dtype:
    """The references' compute dtype: fp64 if any of ``xs`` is fp64, else fp32."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def expand_qk_heads(q: torch.Tensor, k: torch.Tensor, value_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GVA: query/key heads ``[B, T, H, K]`` -> ``[B, T, HV, K]``, each repeated HV // H times in place, so value
    head hv reads head hv // (HV // H). A no-op (no copy) when HV = H."""
    H = q.shape[2]
    if value_heads == H:
        return q, k
    group = value_heads // H
    return q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)


def naive_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    output_all_states: bool = False,
):
    """Paper Eq. 1, one token at a time, in fp32 (fp64 if an input is fp64).

    S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale q_t)

    q, k ``[B, T, H, K]``; v ``[B, T, HV, V]``; g ``[B, T, HV, K]``; beta ``[B, T, HV]``, or ``[B, T, HV, V]`` for
    a step size per value channel (delta_t = beta_t * (v_t - k_t^T S) element-wise); initial_state
    ``[B, HV, K, V]``. Returns ``(o [B, T, HV, V] in v's dtype, final state [B, HV, K, V] or None)``, plus, with
    ``output_all_states``, the state after every token ``[B, T, HV, K, V]`` as a third element. States are in
    the compute dtype.
    """
    dtype = v.dtype
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    ct = math_dtype(q, k, v, g, beta, initial_state)
    q, k = expand_qk_heads(q, k, HV)
    q, k, v, g, beta = (x.to(ct) for x in (q, k, v, g, beta))
    S = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.to(ct)
    per_channel_beta = beta.dim() == 4
    outputs, states = [], []
    for t in range(T):
        S = S * g[:, t].exp()[..., None]  # decay along K: [B, HV, K, V]
        k_t = k[:, t]  # [B, HV, K]
        prediction = torch.einsum("bhk,bhkv->bhv", k_t, S)
        beta_t = beta[:, t] if per_channel_beta else beta[:, t, :, None]  # [B, HV, V] or [B, HV, 1]
        delta = beta_t * (v[:, t] - prediction)  # [B, HV, V]
        S = S + k_t[..., None] * delta[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
        if output_all_states:
            states.append(S)
    o = torch.stack(outputs, dim=1) if T > 0 else v.new_zeros(B, 0, HV, V)  # [B, T, HV, V]
    final = S if output_final_state else None
    if output_all_states:
        all_states = torch.stack(states, dim=1) if T > 0 else S.new_zeros(B, 0, HV, K, V)  # [B, T, HV, K, V]
        return o.to(dtype), final, all_states
    return o.to(dtype), final


def naive_recurrent_dplr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Diagonal-plus-low-rank recurrence, one token at a time, in fp32.

    S_t = (Diag(exp g_t) - a_t b_t^T) S_{t-1} + k_t v_t^T,   o_t = S_t^T (scale q_t)

    q, k, a, b, g ``[B, T, H, K]``; v ``[B, T, H, V]``. KDA is the case a = beta k, b = exp(g) * k and the written
    key beta k, since (I - beta k k^T) Diag(exp g) = Diag(exp g) - (beta k)(exp(g) * k)^T.
    """
    dtype = v.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q, k, v, a, b, g = (x.float() for x in (q, k, v, a, b, g))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(T):
        b_S = torch.einsum("bhk,bhkv->bhv", b[:, t], S)  # b_t^T S: [B, H, V]
        S = S * g[:, t].exp()[..., None] - a[:, t, ..., None] * b_S[..., None, :]
        S = S + k[:, t, ..., None] * v[:, t, ..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outputs, dim=1) if T > 0 else v.new_zeros(B, 0, H, V)
    return o.to(dtype), (S if output_final_state else None)


def _sub_block_decays(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decay factors for the within-chunk pair matrices, all <= 1.

    G: within-chunk cumulative log-decay ``[..., C, K]``, viewed as n sub-blocks of c = SUB_CHUNK rows.
    Returns
      row  ``[..., n, c, K]``  exp(G_t - G_{r_a}) for row t of block a, r_a = first row of block a;
      col  ``[..., n, C, K]``  col[a, i] = exp(G_{r_a} - G_i) for rows i of blocks before a (clamped garbage
                               elsewhere, masked by the caller);
      diag ``[..., n, c, c, K]``  exp(G_t - G_i) for t >= i inside one block, 0 above the diagonal;
      off_mask ``[C, C]``  1 where the column's block is before the row's block.
    """
    *lead, C, K = G.shape
    n = C // SUB_CHUNK
    Gs = G.reshape(*lead, n, SUB_CHUNK, K)
    G_ref = Gs[..., :1, :]  # [..., n, 1, K]
    row = (Gs - G_ref).exp()
    # The clamp only keeps masked entries finite, so that 0 * inf never happens.
    col = (G_ref - G[..., None, :, :]).clamp(max=0).exp()  # [..., n, C, K]
    causal = torch.ones(SUB_CHUNK, SUB_CHUNK, dtype=torch.bool, device=G.device).tril()
    diag = (Gs[..., :, None, :] - Gs[..., None, :, :]).clamp(max=0).exp() * causal[..., None]
    block = torch.arange(C, device=G.device) // SUB_CHUNK
    off_mask = (block[None, :] < block[:, None]).to(G.dtype)
    return row, col, diag, off_mask


class _IntraChunkPairs(torch.autograd.Function):
    """A_kk[t, i] = sum_c k_t k_i exp(G_t - G_i) for i < t and A_qk[t, i] = sum_c q_t k_i exp(G_t - G_i) for i <= t.

    q, k, G ``[..., C, K]`` -> A_kk, A_qk ``[..., C, C]``. Rows of sub-block a against columns of earlier sub-blocks
    are one matmul per sub-block, with the decay routed through the first row r_a of block a:
    exp(G_t - G_i) = exp(G_t - G_{r_a}) exp(G_{r_a} - G_i), both factors <= 1. Pairs inside a sub-block are decayed
    element-wise. The backward is written out: autograd through the element-wise decay tensors is several times
    slower than the forward on a CPU.
    """

    @staticmethod
    def forward(ctx, q, k, G):
        *lead, C, K = q.shape
        n = C // SUB_CHUNK
        row, col, diag, off_mask = _sub_block_decays(G)
        qs = q.reshape(*lead, n, SUB_CHUNK, K)
        ks = k.reshape(*lead, n, SUB_CHUNK, K)
        k_col_t = (k[..., None, :, :] * col).transpose(-1, -2)  # [..., n, K, C]
        kk = ((ks * row) @ k_col_t).reshape(*lead, C, C) * off_mask
        qk = ((qs * row) @ k_col_t).reshape(*lead, C, C) * off_mask
        kk_diag = (ks[..., :, None, :] * diag * ks[..., None, :, :]).sum(-1).tril(-1)  # [..., n, c, c]
        qk_diag = (qs[..., :, None, :] * diag * ks[..., None, :, :]).sum(-1)
        kk, qk = _add_diagonal_blocks(kk, kk_diag), _add_diagonal_blocks(qk, qk_diag)
        ctx.save_for_backward(q, k, row, col, diag, off_mask)
        return kk, qk

    @staticmethod
    def backward(ctx, d_kk, d_qk):
        # With E[t, i] = exp(G_t - G_i): dq_t = sum_i dA_qk[t, i] k_i E, the key gets a "row" part (as k_t) and a
        # "column" part (as k_i), and dG_t = q_t dq_t + k_t dk_t(row) - k_t dk_t(column).
        q, k, row, col, diag, off_mask = ctx.saved_tensors
        *lead, C, K = q.shape
        n = C // SUB_CHUNK
        qs = q.reshape(*lead, n, SUB_CHUNK, K)
        ks = k.reshape(*lead, n, SUB_CHUNK, K)

        # Pairs in different sub-blocks: [..., n, c, C] row blocks of the masked gradients.
        d_kk_off = (d_kk * off_mask).reshape(*lead, n, SUB_CHUNK, C)
        d_qk_off = (d_qk * off_mask).reshape(*lead, n, SUB_CHUNK, C)
        k_col = k[..., None, :, :] * col  # [..., n, C, K]
        dq = row * (d_qk_off @ k_col)  # [..., n, c, K]
        dk_row = row * (d_kk_off @ k_col)
        z = d_kk_off.transpose(-1, -2) @ (ks * row) + d_qk_off.transpose(-1, -2) @ (qs * row)  # [..., n, C, K]
        dk_col = (z * col).sum(dim=-3).reshape(*lead, n, SUB_CHUNK, K)

        # Pairs inside one sub-block.
        d_kk_diag = _diagonal_blocks(d_kk).tril(-1)[..., None] * diag  # [..., n, c, c, K]
        d_qk_diag = _diagonal_blocks(d_qk).tril()[..., None] * diag
        dq = dq + (d_qk_diag * ks[..., None, :, :]).sum(-2)
        dk_row = dk_row + (d_kk_diag * ks[..., None, :, :]).sum(-2)
        dk_col = dk_col + (d_kk_diag * ks[..., :, None, :] + d_qk_diag * qs[..., :, None, :]).sum(-3)

        dq, dk_row, dk_col = (x.reshape(*lead, C, K) for x in (dq, dk_row, dk_col))
        dG = q * dq + k * (dk_row - dk_col)
        return dq, dk_row + dk_col, dG


def _diagonal_blocks(m: torch.Tensor) -> torch.Tensor:
    """``[..., C, C]`` -> its n diagonal sub-blocks ``[..., n, c, c]``."""
    *lead, C, _ = m.shape
    n = C // SUB_CHUNK
    blocks = m.reshape(*lead, n, SUB_CHUNK, n, SUB_CHUNK)
    return torch.diagonal(blocks, dim1=-4, dim2=-2).permute(*range(len(lead)), -1, -3, -2)


def _add_diagonal_blocks(m: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """m ``[..., C, C]`` plus ``[..., n, c, c]`` placed on its diagonal sub-blocks."""
    *lead, C, _ = m.shape
    n = C // SUB_CHUNK
    eye_n = torch.eye(n, dtype=m.dtype, device=m.device)  # [n, n]
    placed = blocks[..., :, :, None, :] * eye_n[:, None, :, None]  # [..., n, c, n, c]
    return m + placed.reshape(*lead, C, C)


def naive_chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK_SIZE,
    return_chunk_states: bool = False,
):
    """Chunkwise-parallel KDA (paper §3.1), fp32 (fp64 if an input is fp64), any T (padded internally to a
    multiple of ``chunk_size``). Shapes as ``naive_recurrent_kda`` (GVA included; beta one per head).

    Per chunk with cumulative log-decay G (``[C, K]``, G_t = g_1 + ... + g_t):

    * A[t, i] = beta_t sum_c k_t[c] k_i[c] exp(G_t[c] - G_i[c]) for i < t (Eq. 4, strictly lower);
    * UT transform (Eq. 6): T = (I + A)^-1, W = T (beta * exp(G) * K), U = T (beta * V);
    * with the state S entering the chunk: V_new = U - W S (the pseudo-values of Eq. 8),
      O = scale (Q * exp(G)) S + Aqk V_new with Aqk[t, i] = scale sum_c q_t k_i exp(G_t - G_i), i <= t (Eq. 9),
      S <- exp(G_C) * S + (K * exp(G_C - G))^T V_new.

    Padding rows have k = v = beta = g = 0, which leaves the state unchanged.
    Returns ``(o [B, T, HV, V] in v's dtype, final state [B, HV, K, V] or None)``, plus, with
    ``return_chunk_states``, the state entering each chunk ``[B, ceil(T / chunk_size), HV, K, V]`` (the first is
    the initial state) as a third element. States are in the compute dtype.
    """
    dtype = v.dtype
    ct = math_dtype(q, k, v, g, beta, initial_state)
    q, k = expand_qk_heads(q, k, v.shape[2])
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    if C % SUB_CHUNK:
        raise ValueError(f"chunk_size must be a multiple of {SUB_CHUNK}, got {C}")
    scale = K**-0.5 if scale is None else scale
    pad = (-T) % C
    n_chunks = (T + pad) // C

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, D] -> [B, H, N, C, D] in the compute dtype, zero-padded at the end
        x = x.to(ct)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.reshape(B, n_chunks, C, H, -1).permute(0, 3, 1, 2, 4)

    q_c, k_c, v_c, g_c = (to_chunks(x) for x in (q, k, v, g))
    g_c = torch.where(g_c < LOG_DECAY_FLOOR, LOG_DECAY_FLOOR, g_c)  # -inf: a reset (see LOG_DECAY_FLOOR)
    beta_c = to_chunks(beta[..., None])  # [B, H, N, C, 1]
    q_c = q_c * scale
    G = g_c.cumsum(dim=-2)  # [B, H, N, C, K], each entry <= 0

    A_kk, A_qk = _IntraChunkPairs.apply(q_c, k_c, G)  # [B, H, N, C, C] each
    A = A_kk * beta_c
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    G_exp = G.exp()
    rhs = torch.cat([beta_c * G_exp * k_c, beta_c * v_c], dim=-1)  # [B, H, N, C, K + V]
    WU = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    W, U = WU.split([K, V], dim=-1)  # [B, H, N, C, K], [B, H, N, C, V]

    q_dec = q_c * G_exp  # [B, H, N, C, K]
    G_last = G[..., -1:, :]  # [B, H, N, 1, K]
    k_dec = k_c * (G_last - G).exp()  # decay from each row to the end of its chunk

    # Inter-chunk recurrence, Eq. 8: S' = Diag(exp G_C) S + k_dec^T (U - W S) = M S + k_dec^T U with
    # M = Diag(exp G_C) - k_dec^T W, so the sequential part is a single batched matmul-add per chunk.
    k_dec_t = k_dec.transpose(-1, -2)  # [B, H, N, K, C]
    M = torch.diag_embed(G_last.squeeze(-2).exp()) - k_dec_t @ W  # [B, H, N, K, K]
    M = M.movedim(2, 0).reshape(n_chunks, B * H, K, K)
    kU = (k_dec_t @ U).movedim(2, 0).reshape(n_chunks, B * H, K, V)
    S = q.new_zeros(B * H, K, V, dtype=ct) if initial_state is None else initial_state.to(ct).reshape(B * H, K, V)
    states = []  # the state entering each chunk
    for n in range(n_chunks):
        states.append(S)
        S = torch.baddbmm(kU[n], M[n], S)
    S = S.reshape(B, H, K, V)
    if n_chunks:
        S_in = torch.stack(states, dim=0).reshape(n_chunks, B, H, K, V).movedim(0, 2)  # [B, H, N, K, V]
    else:
        S_in = q.new_zeros(B, H, 0, K, V, dtype=ct)

    # Outputs of all chunks at once, Eq. 9: O = (Q * exp(G)) S_in + A_qk (U - W S_in).
    v_new = U - W @ S_in  # [B, H, N, C, V]
    o = q_dec @ S_in + A_qk @ v_new  # [B, H, N, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n_chunks * C, H, V)[:, :T]  # [B, T, H, V]
    if return_chunk_states:
        return o.to(dtype), (S if output_final_state else None), S_in.transpose(1, 2)  # [B, N, H, K, V]
    return o.to(dtype), (S if output_final_state else None)
