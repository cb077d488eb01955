"""Mamba2's state-space duality (SSD) in plain PyTorch: the recurrence (the spec) and its chunked form.

Mamba2 is the baseline the paper's synthetic tasks (§5.1, Fig. 4) compare KDA against. Per head h, token t,
with a scalar step size dt_t > 0, a scalar decay rate A_h < 0, input x_t ∈ R^P, input/output projections B_t,
C_t ∈ R^N (shared by the heads of one group) and a state S ∈ R^{N×P}:

    S_t = exp(dt_t A_h) · S_{t-1} + dt_t · B_t x_tᵀ
    y_t = S_tᵀ C_t + D_h · x_t

It is linear attention with a scalar per-head decay and no delta rule: GDN's update without the
(I − β k kᵀ) correction, which is why it cannot overwrite an association it has stored.

Layouts: x ``[B, T, H, P]``, dt ``[B, T, H]`` (already positive: softplus applied by the caller),
A ``[H]`` (< 0), B and C ``[B, T, G, N]`` with H divisible by G (head h reads group h // (H / G)),
D ``[H]`` or None, states ``[B, H, N, P]`` fp32. Both forms compute in fp32 and return y in x's dtype; both
are differentiable by autograd (the chunked form is the one to train with; the recurrence is for tests).

Numerics of the chunked form: cumulative log-decays stay in fp32 and only differences measured forward in time
are exponentiated, so every factor is ≤ 1 and a huge dt·|A| gives exact zeros rather than inf·0 = NaN.
"""

from __future__ import annotations

import torch

CHUNK_SIZE = 64
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _expand_groups(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, G, N]`` -> ``[B, T, H, N]``: head h reads group h // (H / G)."""
    return x.repeat_interleave(heads // x.shape[2], dim=2)


def naive_recurrent_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The SSD recurrence, one token at a time, fp32 (slow; the reference for tests).

    Returns ``(y [B, T, H, P] in x's dtype, final state [B, H, N, P] fp32 or None)``.
    """
    dtype = x.dtype
    batch, T, H, P = x.shape
    N = B.shape[-1]
    x, dt, A = x.float(), dt.float(), A.float()
    B, C = _expand_groups(B.float(), H), _expand_groups(C.float(), H)  # [B, T, H, N]
    S = x.new_zeros(batch, H, N, P) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(T):
        decay = (dt[:, t] * A).exp()  # [B, H]
        S = decay[..., None, None] * S + (dt[:, t, :, None] * B[:, t])[..., None] * x[:, t, :, None, :]
        outputs.append(torch.einsum("bhn,bhnp->bhp", C[:, t], S))
    y = torch.stack(outputs, dim=1) if T > 0 else x.new_zeros(batch, 0, H, P)  # [B, T, H, P]
    if D is not None:
        y = y + D.float()[:, None] * x
    return y.to(dtype), (S if output_final_state else None)


def naive_chunk_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel SSD (Mamba2's "SSD algorithm"), fp32, any T (zero-padded to a multiple of
    chunk_size).

    With a = dt·A and, inside a chunk, the cumulative log-decay Λ_t = a_1 + ... + a_t:

    * intra-chunk, quadratic (attention-like) form: Y = ((C Bᵀ) ∘ L) (dt ∘ X) with the 1-semiseparable mask
      L[t, s] = exp(Λ_t − Λ_s) for s ≤ t, 0 above the diagonal;
    * inter-chunk: the state S entering the chunk adds exp(Λ_t) C_tᵀ S to row t, and leaves the chunk as
      S ← exp(Λ_C) S + Σ_s exp(Λ_C − Λ_s) dt_s B_s x_sᵀ.

    Padding rows have dt = 0 (decay 1, no input), which leaves the state unchanged.
    Returns ``(y [B, T, H, P] in x's dtype, final state [B, H, N, P] fp32 or None)``.
    """
    dtype = x.dtype
    batch, T, H, P = x.shape
    N = B.shape[-1]
    Cs = chunk_size
    pad = (-T) % Cs
    n_chunks = (T + pad) // Cs

    def to_chunks(t: torch.Tensor) -> torch.Tensor:
        # [B, T, H, D] -> [B, H, n, Cs, D] in fp32, zero-padded at the end
        t = t.float()
        if pad:
            t = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad))
        return t.reshape(batch, n_chunks, Cs, H, -1).permute(0, 3, 1, 2, 4)

    x_c = to_chunks(x)  # [B, H, n, Cs, P]
    B_c = to_chunks(_expand_groups(B, H))  # [B, H, n, Cs, N]
    C_c = to_chunks(_expand_groups(C, H))  # [B, H, n, Cs, N]
    dt_c = to_chunks(dt[..., None])  # [B, H, n, Cs, 1]
    a = dt_c * A.float()[None, :, None, None, None]  # [B, H, n, Cs, 1], each <= 0
    Lam = a.cumsum(dim=-2).squeeze(-1)  # [B, H, n, Cs]

    causal = torch.ones(Cs, Cs, dtype=torch.bool, device=x.device).tril()
    # Masked entries become -inf before exp: they are exactly 0 and carry no gradient.
    diff = Lam[..., :, None] - Lam[..., None, :]  # [B, H, n, Cs(t), Cs(s)]
    L = torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()
    x_dt = x_c * dt_c  # [B, H, n, Cs, P]
    scores = (C_c @ B_c.transpose(-1, -2)) * L  # [B, H, n, Cs, Cs]
    y_intra = scores @ x_dt  # [B, H, n, Cs, P]

    Lam_last = Lam[..., -1:]  # [B, H, n, 1]
    B_dec = (
        B_c * (Lam_last - Lam).exp()[..., None]
    )  # decay from each row to the chunk's end: [B, H, n, Cs, N]
    C_dec = C_c * Lam.exp()[..., None]  # decay from the chunk's start to each row: [B, H, n, Cs, N]
    chunk_decay = Lam_last.exp()  # [B, H, n, 1]

    S = x.new_zeros(batch, H, N, P, dtype=torch.float32) if initial_state is None else initial_state.float()
    y_inter = []
    for n in range(n_chunks):
        y_inter.append(C_dec[:, :, n] @ S)  # [B, H, Cs, P]
        S = chunk_decay[:, :, n, :, None] * S + B_dec[:, :, n].transpose(-1, -2) @ x_dt[:, :, n]
    if n_chunks:
        y = y_intra + torch.stack(y_inter, dim=2)  # [B, H, n, Cs, P]
    else:
        y = y_intra
    y = y.permute(0, 2, 3, 1, 4).reshape(batch, n_chunks * Cs, H, P)[:, :T]  # [B, T, H, P]
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    return y.to(dtype), (S if output_final_state else None)


def _check_tensor(name: str, t: torch.Tensor, dims: int, float_only: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")


def chunk_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba2's selective state-space layer over whole sequences, chunkwise-parallel; differentiable.

    S_t = exp(dt_t A_h) S_{t-1} + dt_t B_t x_tᵀ,   y_t = S_tᵀ C_t + D_h x_t

    Args:
        x: ``[B, T, H, P]`` float16/bfloat16/float32; the output has x's dtype.
        dt: ``[B, T, H]`` step sizes, > 0 (softplus already applied).
        A: ``[H]`` decay rates, < 0 (Mamba2 stores A_log and uses A = -exp(A_log)).
        B, C: ``[B, T, G, N]`` input/output projections; H must be divisible by G.
        D: ``[H]`` skip connection, or None for none.
        initial_state: ``[B, H, N, P]`` (cast to float32), or None for zeros.
        output_final_state: also return the state after the last token.
        chunk_size: rows per chunk (any positive int; 64 is a good CPU/GPU default).

    Returns:
        ``(y [B, T, H, P] in x's dtype, final_state [B, H, N, P] float32 or None)``.

    Raises:
        TypeError for non-tensors or non-float dtypes; ValueError naming the argument for wrong shapes,
        devices, a non-positive chunk_size. The signs of dt and A are not checked (that would cost a device
        sync).
    """
    _check_tensor("x", x, 4)
    batch, T, H, P = x.shape
    _check_tensor("dt", dt, 3)
    if dt.shape != (batch, T, H):
        raise ValueError(f"dt must be [B, T, H] = {[batch, T, H]}, got {list(dt.shape)}")
    _check_tensor("A", A, 1)
    if A.shape != (H,):
        raise ValueError(f"A must be [H] = [{H}], got {list(A.shape)}")
    _check_tensor("B", B, 4)
    _check_tensor("C", C, 4)
    if B.shape[:2] != (batch, T) or B.shape != C.shape:
        raise ValueError(
            f"B and C must both be [B, T, G, N] with B = {batch}, T = {T}; "
            f"got {list(B.shape)} and {list(C.shape)}"
        )
    if B.shape[2] == 0 or H % B.shape[2]:
        raise ValueError(
            f"the number of heads H = {H} must be divisible by the number of groups G = {B.shape[2]}"
        )
    N = B.shape[3]
    if D is not None:
        _check_tensor("D", D, 1)
        if D.shape != (H,):
            raise ValueError(f"D must be [H] = [{H}], got {list(D.shape)}")
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4)
        if initial_state.shape != (batch, H, N, P):
            raise ValueError(
                f"initial_state must be [B, H, N, P] = {[batch, H, N, P]}, got {list(initial_state.shape)}"
            )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("initial_state", initial_state)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    # Autocast would run the matmuls below in bf16; the state recurrence is meant to be fp32 (as KDA's is).
    with torch.autocast(device_type=x.device.type, enabled=False):
        return naive_chunk_ssd(x, dt, A, B, C, D, initial_state, output_final_state, chunk_size)
