"""The states entering each chunk from the Triton chunk kernels: ``chunk_kda(return_intermediate_states=True)``.

A server snapshots these for prefix caching (FLA's ``return_intermediate_states``). Inference only, no autograd.
The forward (``chunk_fwd.chunk_fwd``) runs as ``chunk_kda`` runs it, then the backward's state recompute pass
(``chunk_state.state_pass_recompute``) writes the state entering each 64-token chunk, in fp32. For 32-token chunks
(FLA's ``chunk_size=32``; the kernels' chunk is fixed at 64) the state at the middle of each 64-token chunk comes
from one more batched call of the chunk kernels over each chunk's first 32 tokens, started from the state entering
the chunk.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.kda.chunk_common import CHUNK, layout_for
from kimi_linear.ops.kda.chunk_fwd import chunk_fwd, fwd_launch
from kimi_linear.ops.kda.chunk_state import state_pass_recompute
from kimi_linear.ops.kda.chunk_triton import chunk_kda_triton
from kimi_linear.ops.triton_helpers import new_buffer


@torch.no_grad()
def chunk_kda_states_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, lengths,
                            chunk_size):
    """Activated inputs (q, k ``[B, T, H, K]`` in the operand dtype, g ``[B, T, H, K]``, beta ``[B, T, H]``, v
    ``[B, T, H, V]``), the initial state ``[N, H, K, V]`` fp32 or None, the sequence ``lengths`` (a list) ->
    ``(o [B, T, H, V] in v's dtype, final state [N, H, K, V] fp32 or None, h [NT, H, K, V] fp32)``, NT the number
    of ``chunk_size``-token chunks over all sequences, in sequence order."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    qp, kp, vp = (x.to(dt).reshape(B * T, H, x.shape[-1]).contiguous() for x in (q, k, v))  # [TT, H, D]
    gp = g.float().reshape(B * T, H, K).contiguous()
    bp = beta.reshape(B * T, H).contiguous()
    layout = layout_for(cu_seqlens, B, T, q.device)
    launch = fwd_launch(K, V, dt)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht, saved = chunk_fwd(qp, kp, vp, gp, bp, scale, h0, output_final_state, layout, launch)
    G, Aqk, _, w, u, qg, kd = saved[:7]  # the backward's intermediates, in chunk_bwd's order
    h = new_buffer(layout.NT, H, K, V, device=q.device, dtype=torch.float32)  # fp32: rounded once, by the caller
    v_new = new_buffer(B * T, H, V, device=q.device, dtype=dt)
    state_pass_recompute(qg, kd, w, u, G, Aqk, h0, h, v_new, layout, launch.state)
    o = o.reshape(B, T, H, V).to(v.dtype)
    if chunk_size == CHUNK:
        return o, ht, h
    return o, ht, _split_chunk_states(qp, kp, vp, gp, bp, scale, h, lengths, chunk_size)


def _split_chunk_states(qp, kp, vp, gp, bp, scale, h, lengths, chunk_size):
    """States entering each ``chunk_size``-token chunk (a divisor of CHUNK) from those entering each CHUNK-token
    chunk ``h`` [NT, H, K, V]: sub-chunk m of a chunk starts after its first m * chunk_size tokens, run from the
    chunk's state by the chunk kernels (one batched call per m)."""
    device = h.device
    per_chunk = CHUNK // chunk_size
    starts, sizes = [], []  # of every CHUNK-token chunk, in order
    bos = 0
    for n in lengths:
        for j in range(-(-n // CHUNK)):
            starts.append(bos + j * CHUNK)
            sizes.append(min(CHUNK, n - j * CHUNK))
        bos += n
    starts_t = torch.tensor(starts, dtype=torch.int64, device=device)
    sizes_t = torch.tensor(sizes, dtype=torch.int64, device=device)
    subs = -(-sizes_t // chunk_size)  # sub-chunks per chunk
    first = torch.cumsum(subs, 0) - subs  # index of each chunk's first sub-chunk in the output
    out = new_buffer(int(subs.sum()), *h.shape[1:], device=device, dtype=h.dtype)
    out[first] = h
    for m in range(1, per_chunk):
        picked = (sizes_t > m * chunk_size).nonzero()[:, 0]  # chunks that have a sub-chunk m
        if picked.numel() == 0:
            continue
        rows = starts_t[picked, None] + torch.arange(m * chunk_size, device=device)  # [P, m * chunk_size]
        _, state = chunk_kda_triton(qp[rows], kp[rows], vp[rows], gp[rows], bp[rows], scale=scale,
                                    initial_state=h[picked].contiguous(), output_final_state=True)
        out[first[picked] + m] = state
    return out
