"""Our KDA ops called the way vLLM's Kimi Linear layer calls FLA's (issue 24), compared with the reference.

vLLM keeps one recurrent state per request slot in a pool, a view into its paged cache: ``[S, H, V, K]`` in the
FLA copy it ships today (``state_v_first=True`` here; older copies kept ``[S, H, K, V]``, FLA 0.6.0's default),
every slot contiguous, slots a page apart. Its layer, per step of the engine:

* prefill (chunked, several requests packed along T with ``cu_seqlens`` = the query start locations, int32):
  zero the slots of requests that start fresh, gather the initial states ``pool[slots].contiguous()``, call
  ``chunk_kda(q=, k=, v=, g=, beta=, initial_state=, output_final_state=True, use_qk_l2norm_in_kernel=True,
  cu_seqlens=)`` with the activated gate and beta, and scatter the final states back ``pool[slots] = final``;
  its newer ``chunk_kda_with_fused_gate(q, k, v, raw_g, beta, A_log, g_bias, ..., safe_gate, lower_bound)`` takes
  the gate pre-activation instead: ``chunk_kda(..., g=raw_g, A_log=A_log, dt_bias=g_bias, use_gate_in_kernel=True,
  safe_gate=, lower_bound=)`` (a raw beta adds ``use_beta_sigmoid_in_kernel=True``), see chunk_kda's docstring;
* decode (one token per request): ``fused_recurrent_kda(q=, k=, v=, g=, beta=, initial_state=pool,
  use_qk_l2norm_in_kernel=True, cu_seqlens=, ssm_state_indices=slots)``, the pool updated in place; slots may be a
  column of a wider table, and a padded entry of a CUDA-graph batch has slot -1;
* speculative decode: slots ``[N, C]`` (one per draft token), ``num_accepted_tokens`` picking the column holding
  each request's state, the state after every token written to that token's slot, the output into ``out=``.

Each case runs on the PyTorch path and on the Triton path (Triton's interpreter on CPU at these small sizes).
"""

from __future__ import annotations

import os

import pytest
import torch

from kimi_linear.ops.kda import (
    beta_activation,
    chunk_kda,
    fused_recurrent_kda,
    kda_gate,
    naive_recurrent_kda,
)
from kimi_linear.ops.norm import l2norm
from tests.utils import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_RUNS, reason="no CUDA and TRITON_INTERPRET is not 1"))]
LAYOUTS = [pytest.param(True, id="pool-VK"), pytest.param(False, id="pool-KV")]
TOL = 2e-5  # fp32 on both sides; only the order of summation differs
H, D = 2, 16  # heads, head dim (K = V, as in the model)
PAD_SLOT = -1  # vLLM's slot of a padded batch entry


def projections(T: int, seed: int) -> dict:
    """What the layer hands the op, as the layer makes it: q, k, v as views of one fused projection
    ``[1, T, 3 * H * D]`` (not contiguous), the gate pre-activation ``[1, T, H, D]``, beta logits ``[1, T, H]``,
    A_log ``[1, 1, H, 1]`` and dt_bias ``[H * D]`` in fp32 (the checkpoint's shapes)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(1, T, 3 * H * D, generator=gen)
    q, k, v = (t.view(1, T, H, D) for t in qkv.split(H * D, dim=-1))
    return dict(q=q, k=k, v=v, raw_g=torch.randn(1, T, H, D, generator=gen),
                raw_beta=torch.randn(1, T, H, generator=gen), A_log=torch.rand(1, 1, H, 1, generator=gen) - 0.5,
                dt_bias=0.5 * torch.randn(H * D, generator=gen))


def paged_pool(S: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pages [S, H*D*D + 3], pool): the pool ``[S, H, D, D]`` a view of the pages, each slot contiguous, slots
    spaced by a page (3 elements of something else follow each state)."""
    pages = torch.randn(S, H * D * D + 3, generator=torch.Generator().manual_seed(seed))
    return pages, pages[:, : H * D * D].view(S, H, D, D)


def pool_on_device(pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``pages`` on the test device and its pool view, as ``paged_pool`` makes them."""
    pages_d = pages.clone().to(DEVICE)
    return pages_d, pages_d[:, : H * D * D].view(pages.shape[0], H, D, D)


def to_device(x: dict) -> dict:
    return {n: t.to(DEVICE) for n, t in x.items()}


def kv_first(state: torch.Tensor, v_first: bool) -> torch.Tensor:
    """A pool / state in the caller's layout -> ``[..., K, V]`` (the reference's)."""
    return state.transpose(-1, -2) if v_first else state


def reference(x: dict, bounds: list[int], h0: list[torch.Tensor | None], lower_bound=None):
    """The activations by their references (l2norm, kda_gate, sigmoid), then paper Eq. 1 one request at a time.
    Returns per request (o [1, len, H, D], the state after every token [len, H, K, V])."""
    q, k = l2norm(x["q"]), l2norm(x["k"])
    g = kda_gate(x["raw_g"], x["A_log"], x["dt_bias"], lower_bound)
    beta = beta_activation(x["raw_beta"])
    out = []
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        init = None if h0[i] is None else h0[i][None]
        o, _, every = naive_recurrent_kda(q[:, s:e], k[:, s:e], x["v"][:, s:e], g[:, s:e], beta[:, s:e],
                                          initial_state=init, output_all_states=True)
        out.append((o, every[0]))
    return out


@pytest.mark.parametrize("v_first", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_with_states_gathered_from_the_pool(backend, v_first):
    """Three requests packed along T (one continuing from its slot, one fresh, one continuing), the gate and
    beta activated before the call as vLLM's layer does: outputs and the states scattered back to the pool."""
    bounds, slots, has_initial_state = [0, 7, 8, 20], [5, 0, 2], [True, False, True]
    x = projections(bounds[-1], seed=0)
    pages, pool = paged_pool(S=6, seed=1)
    pool_before = pool.clone()

    dev = to_device(x)
    pages_d, pool_d = pool_on_device(pages)
    slots_d = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    fresh = ~torch.tensor(has_initial_state, device=DEVICE)
    pool_d[slots_d[fresh]] = 0
    initial_state = pool_d[slots_d].contiguous()
    g = kda_gate(dev["raw_g"], dev["A_log"], dev["dt_bias"])
    beta = dev["raw_beta"].float().sigmoid()
    o, final_state = chunk_kda(q=dev["q"], k=dev["k"], v=dev["v"], g=g, beta=beta, initial_state=initial_state,
                               output_final_state=True, use_qk_l2norm_in_kernel=True,
                               cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=DEVICE),
                               state_v_first=v_first, backend=backend)
    pool_d[slots_d] = final_state

    h0 = [kv_first(pool_before[s], v_first) if has else None for s, has in zip(slots, has_initial_state)]
    ref = reference(x, bounds, h0)
    assert rel_err(o.cpu(), torch.cat([o_r for o_r, _ in ref], dim=1)) < TOL
    expected = pool_before.clone()
    for s, (_, every) in zip(slots, ref):
        expected[s] = kv_first(every[-1], v_first)
    assert rel_err(pool_d.cpu(), expected) < TOL
    assert torch.equal(pages_d.cpu()[:, H * D * D :], pages[:, H * D * D :])  # the rest of each page untouched


@pytest.mark.parametrize("lower_bound", [None, -5.0], ids=["softplus-gate", "bounded-gate"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_with_the_gate_fused(backend, lower_bound):
    """vLLM's ``chunk_kda_with_fused_gate(q, k, v, raw_g, beta, A_log, g_bias, ...)`` mapped onto chunk_kda:
    g=raw_g, dt_bias=g_bias, use_gate_in_kernel=True (with safe_gate and lower_bound for the bounded gate); the
    variant taking beta logits maps to use_beta_sigmoid_in_kernel=True."""
    bounds = [0, 9, 30]
    x = projections(bounds[-1], seed=2)
    h0 = torch.randn(2, H, D, D, generator=torch.Generator().manual_seed(3))  # [N, H, V, K], gathered
    dev = to_device(x)
    common = dict(q=dev["q"], k=dev["k"], v=dev["v"], g=dev["raw_g"], A_log=dev["A_log"], dt_bias=dev["dt_bias"],
                  use_gate_in_kernel=True, safe_gate=lower_bound is not None, lower_bound=lower_bound,
                  initial_state=h0.to(DEVICE), output_final_state=True, use_qk_l2norm_in_kernel=True,
                  cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=DEVICE), state_v_first=True,
                  backend=backend)
    o, final_state = chunk_kda(beta=dev["raw_beta"].float().sigmoid(), **common)
    o_logits, final_logits = chunk_kda(beta=dev["raw_beta"], use_beta_sigmoid_in_kernel=True, **common)

    ref = reference(x, bounds, list(kv_first(h0, True)), lower_bound)
    o_ref = torch.cat([o_r for o_r, _ in ref], dim=1)
    final_ref = torch.stack([kv_first(every[-1], True) for _, every in ref])
    for got_o, got_final in ((o, final_state), (o_logits, final_logits)):
        assert rel_err(got_o.cpu(), o_ref) < TOL
        assert rel_err(got_final.cpu(), final_ref) < TOL


@pytest.mark.parametrize("v_first", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_in_place_on_the_pool(backend, v_first):
    """One token per request, slots read from a column of a wider table, a padded batch entry (slot -1): the
    pool is updated in place at the live slots only, and the op returns the pool itself."""
    table = torch.tensor([[3, 9], [1, 9], [4, 9], [PAD_SLOT, 9]], dtype=torch.int32)
    slots = table[:, 0]  # stride 2
    N = slots.numel()
    x = projections(N, seed=4)
    pages, pool = paged_pool(S=6, seed=5)
    pool_before = pool.clone()

    dev = to_device(x)
    pages_d, pool_d = pool_on_device(pages)
    g = kda_gate(dev["raw_g"], dev["A_log"], dev["dt_bias"])
    beta = dev["raw_beta"].float().sigmoid()
    o, returned = fused_recurrent_kda(q=dev["q"], k=dev["k"], v=dev["v"], g=g, beta=beta, initial_state=pool_d,
                                      use_qk_l2norm_in_kernel=True,
                                      cu_seqlens=torch.arange(N + 1, dtype=torch.int32, device=DEVICE),
                                      ssm_state_indices=slots.to(DEVICE), state_v_first=v_first, backend=backend)
    assert returned is pool_d

    live = [int(s) for s in slots if s >= 0]
    ref = reference(x, list(range(N + 1)), [kv_first(pool_before[s], v_first) for s in live] + [None])
    assert rel_err(o[:, :len(live)].cpu(), torch.cat([o_r for o_r, _ in ref[:len(live)]], dim=1)) < TOL
    expected = pool_before.clone()
    for s, (_, every) in zip(live, ref):
        expected[s] = kv_first(every[-1], v_first)
    assert rel_err(pool_d.cpu(), expected) < TOL
    assert torch.equal(pool_d.cpu()[[0, 2, 5]], pool_before[[0, 2, 5]])  # untouched, the padded entry's too
    assert torch.equal(pages_d.cpu()[:, H * D * D :], pages[:, H * D * D :])


@pytest.mark.parametrize("backend", BACKENDS)
def test_speculative_decode_writes_every_tokens_state(backend):
    """Slots [N, C], one per verified token; each request starts from column num_accepted_tokens - 1 and the
    state after token t goes to column t; requests of 3, 2 and 3 tokens; the output lands in a strided ``out``."""
    C = 3
    table = torch.tensor([[0, 1, 2, 7], [3, 4, 5, 7], [6, 8, 9, 7]], dtype=torch.int32)
    slots = table[:, :C]  # [N, C], rows strided by 4
    accepted = torch.tensor([2, 1, 3], dtype=torch.int32)
    bounds = [0, 3, 5, 8]
    x = projections(bounds[-1], seed=6)
    pages, pool = paged_pool(S=10, seed=7)
    pool_before = pool.clone()

    dev = to_device(x)
    pages_d, pool_d = pool_on_device(pages)
    out_storage = torch.full((1, bounds[-1], H * D + 5), float("nan"), device=DEVICE)
    out = out_storage[..., : H * D].view(1, bounds[-1], H, D)  # not contiguous
    g = kda_gate(dev["raw_g"], dev["A_log"], dev["dt_bias"])
    beta = dev["raw_beta"].float().sigmoid()
    o, returned = fused_recurrent_kda(q=dev["q"], k=dev["k"], v=dev["v"], g=g, beta=beta, initial_state=pool_d,
                                      use_qk_l2norm_in_kernel=True, inplace_final_state=True,
                                      cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=DEVICE),
                                      ssm_state_indices=slots.to(DEVICE), num_accepted_tokens=accepted.to(DEVICE),
                                      state_v_first=True, out=out, backend=backend)
    assert o is out and returned is pool_d

    starts = [pool_before[slots[n, accepted[n] - 1]] for n in range(3)]
    ref = reference(x, bounds, [kv_first(s, True) for s in starts])
    assert rel_err(out.cpu(), torch.cat([o_r for o_r, _ in ref], dim=1)) < TOL
    expected = pool_before.clone()
    for n, (_, every) in enumerate(ref):
        for t in range(every.shape[0]):
            expected[slots[n, t]] = kv_first(every[t], True)
    assert rel_err(pool_d.cpu(), expected) < TOL
    assert torch.equal(pool_d.cpu()[[5, 7]], pool_before[[5, 7]])  # the 2-token request's third slot; no slot 7
    assert torch.isnan(out_storage[..., H * D :]).all()  # nothing written outside out
