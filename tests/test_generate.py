"""Generation: prefill + decode == full forward, batched == one by one, sampling, stop tokens, streaming."""

from __future__ import annotations

import random

import pytest
import torch

from kimi_linear.cache import KimiLinearCache
from kimi_linear.generate import decode_step, generate, piece_step, prefill, sample, sample_rows
from tests.test_model import make_model
from tests.utils import rel_err

PROMPTS = [[5, 17, 200, 3, 99, 42, 7, 150, 1, 64, 33], [250], [9, 8, 7, 6, 5]]


@pytest.fixture(scope="module")
def model():
    return make_model(seed=21)


def test_prefill_and_decode_steps_match_full_forward(model):
    N, steps = len(PROMPTS), 7
    cache = KimiLinearCache(model.config, N, 20)
    logits = prefill(model, PROMPTS, cache)
    seqs = [list(p) for p in PROMPTS]
    step_logits = []
    for _ in range(steps):
        step_logits.append(logits)
        tokens = logits.argmax(-1)
        for n in range(N):
            seqs[n].append(int(tokens[n]))
        logits = decode_step(model, tokens, cache)
    assert cache.lengths.tolist() == [len(p) + steps for p in PROMPTS]
    for n, p in enumerate(PROMPTS):
        with torch.no_grad():
            full = model(torch.tensor([seqs[n]])).logits[0]  # teacher-forced on the generated tokens
        got = torch.stack([step[n] for step in step_logits])
        assert rel_err(got, full[len(p) - 1 : len(p) - 1 + steps]) < 2e-5, f"sequence {n}"


def test_packed_prefill_of_many_prompts_equals_each_alone(model):
    """Many packed prompts (length 1, very unequal lengths, several in one length bucket) give the logits and
    cache contents (KDA conv tails and states, MLA latents) of each prompt prefilled alone."""
    gen = torch.Generator().manual_seed(5)
    lengths = [1, 300, 2, 17, 1, 64, 129, 5, 3, 90, 1, 40]
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    packed = KimiLinearCache(model.config, len(prompts), 310)
    logits = prefill(model, prompts, packed)
    assert packed.lengths.tolist() == lengths
    for i, p in enumerate(prompts):
        single = KimiLinearCache(model.config, 1, 310)
        assert rel_err(logits[i], prefill(model, [p], single)[0]) < 1e-5, f"prompt {i}"
        for layer, (mine, ref) in enumerate(zip(packed.layers, single.layers, strict=True)):
            for name in ref:
                got = mine[name][i] if name in ("conv", "state") else mine[name][i, : len(p)]
                want = ref[name][0] if name in ("conv", "state") else ref[name][0, : len(p)]
                assert rel_err(got, want) < 1e-5, (i, layer, name)


def _round_states(cache: KimiLinearCache) -> None:
    """The fp32 KDA states of ``cache`` rounded to bf16 in place (kept in fp32)."""
    for layer in cache.layers:
        if "state" in layer:
            layer["state"].copy_(layer["state"].bfloat16())


def test_bf16_state_cache_is_the_fp32_model_with_its_state_rounded_after_each_forward(model):
    """``state_dtype=bfloat16``'s contract at the model level: prefill then decode steps on a bf16-state cache give
    the logits and states of an fp32-state cache whose states are rounded to bf16 after every forward (the prefill
    and each decode step): the ops widen the state, compute in fp32 and round once on store."""
    N, steps = len(PROMPTS), 6
    bf16 = KimiLinearCache(model.config, N, 20, state_dtype=torch.bfloat16)
    ref = KimiLinearCache(model.config, N, 20)
    logits, want = prefill(model, PROMPTS, bf16), prefill(model, PROMPTS, ref)
    _round_states(ref)
    for _ in range(steps):
        assert rel_err(logits, want) < 1e-6
        tokens = want.argmax(-1)
        logits, want = decode_step(model, tokens, bf16), decode_step(model, tokens, ref)
        _round_states(ref)
    assert rel_err(logits, want) < 1e-6
    for layer, (got, ref_layer) in enumerate(zip(bf16.layers, ref.layers, strict=True)):
        if "state" in got:
            assert got["state"].dtype == torch.bfloat16
            assert torch.equal(got["state"], ref_layer["state"].bfloat16()), layer


def test_bf16_state_logits_stay_closer_to_fp32_than_a_bf16_model():
    """The accuracy a bf16 state costs, on a dense-MLP debug model (MoE routing flips would swamp the measure):
    over 16 teacher-forced decode steps the logits of the bf16-state cache stay within half the error that running
    the whole model in bf16 (weights, activations, fp32 state: the usual serving precision) makes against the fp32
    model, on average, and below its average at every step. Measured on the CPU (relative RMS error of the logits):
    0.002 growing to ~0.01 with the bf16 state, ~0.028 for the bf16 model."""
    import copy

    model = make_model(seed=21, first_k_dense_replace=4)
    model_16 = copy.deepcopy(model).to(torch.bfloat16)
    N, steps = len(PROMPTS), 16
    caches = (KimiLinearCache(model.config, N, 40), KimiLinearCache(model.config, N, 40, state_dtype=torch.bfloat16),
              KimiLinearCache(model.config, N, 40, dtype=torch.bfloat16))
    models = (model, model, model_16)
    logits = [prefill(m, PROMPTS, c) for m, c in zip(models, caches, strict=True)]
    err_state, err_model = [], []
    for _ in range(steps):
        tokens = logits[0].argmax(-1)
        logits = [decode_step(m, tokens, c) for m, c in zip(models, caches, strict=True)]
        err_state.append(rel_err(logits[1], logits[0]))
        err_model.append(rel_err(logits[2], logits[0]))
    mean_model = sum(err_model) / steps
    assert 1e-4 < sum(err_state) / steps <= 0.5 * mean_model, (err_state, err_model)
    assert max(err_state) < mean_model


def test_generate_passes_the_state_dtype_to_its_cache(model):
    """generate(state_dtype=bfloat16) decodes on a bf16-state cache: its greedy tokens are the argmax chain of such
    a cache's logits; a state_dtype outside float32 / bfloat16 is refused."""
    steps = 8
    got = generate(model, PROMPTS, max_new_tokens=steps, stop_tokens=[], state_dtype=torch.bfloat16)
    cache = KimiLinearCache(model.config, len(PROMPTS), 30, state_dtype=torch.bfloat16)
    tokens = prefill(model, PROMPTS, cache).argmax(-1)
    chain = [tokens]
    for _ in range(steps - 1):
        tokens = decode_step(model, tokens, cache).argmax(-1)
        chain.append(tokens)
    assert got == torch.stack(chain, 1).tolist()
    with pytest.raises(ValueError, match="state_dtype"):
        generate(model, PROMPTS, max_new_tokens=2, state_dtype=torch.float16)


def test_batched_equals_one_by_one_and_streaming(model):
    streamed = []
    batched = generate(
        model, PROMPTS, max_new_tokens=9, stop_tokens=[], on_token=lambda i, t: streamed.append((i, t))
    )
    alone = [generate(model, [p], max_new_tokens=9, stop_tokens=[])[0] for p in PROMPTS]
    assert batched == alone and all(len(out) == 9 for out in batched)
    for i, out in enumerate(batched):
        assert [t for j, t in streamed if j == i] == out


def test_stop_tokens_end_only_their_sequence(model):
    free = generate(model, PROMPTS, max_new_tokens=8, stop_tokens=[])
    stop = free[0][2]
    out = generate(model, PROMPTS, max_new_tokens=8, stop_tokens=[stop])
    assert out[0] == free[0][: free[0].index(stop) + 1]
    for n in (1, 2):
        cut = free[n].index(stop) + 1 if stop in free[n] else 8
        assert out[n] == free[n][:cut]


def test_sampling_controls(model):
    greedy = generate(model, PROMPTS, max_new_tokens=5, stop_tokens=[])
    assert (
        generate(model, PROMPTS, max_new_tokens=5, stop_tokens=[], temperature=1.3, top_k=1, seed=0) == greedy
    )
    assert (
        generate(model, PROMPTS, max_new_tokens=5, stop_tokens=[], temperature=0.7, top_p=1e-6, seed=0)
        == greedy
    )
    a = generate(model, PROMPTS, max_new_tokens=6, stop_tokens=[], temperature=1.0, seed=3)
    b = generate(model, PROMPTS, max_new_tokens=6, stop_tokens=[], temperature=1.0, seed=3)
    assert a == b and a != greedy

    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    logits = torch.randn(4, 50, generator=gen)
    top3 = logits.topk(3).indices
    draws = torch.stack([sample(logits, temperature=2.0, top_k=3, rng=rng) for _ in range(200)], 1)
    assert all(set(draws[i].tolist()) <= set(top3[i].tolist()) for i in range(4))
    assert len(set(draws[0].tolist())) > 1  # really sampling
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < 0.5  # the nucleus of top_p = 0.5
    draws = torch.stack([sample(logits, temperature=1.0, top_p=0.5, rng=rng) for _ in range(200)], 1)
    for i in range(4):
        assert set(draws[i].tolist()) <= set(order[i][keep[i]].tolist())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[]), "non-empty list"),
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[[1, 100000]]), "outside"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_length=8), "exceeds max_length"),
        (dict(max_new_tokens=5000), "model_max_length"),
    ],
    ids=[
        "no-prompts",
        "empty-prompt",
        "bad-id",
        "zero-new",
        "neg-temp",
        "nan-temp",
        "neg-topk",
        "topp0",
        "topp>1",
        "too-long",
        "beyond-model",
    ],
)
def test_bad_arguments(model, kwargs, match):
    args = dict(prompts=[[1, 2, 3, 4, 5, 6]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, **args)


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile (Dynamo) is unsupported here")
def test_decode_step_compiles_with_fullgraph(model):
    """The whole decode step traces without a graph break: the KDA ops and the MoE expert loop are registered
    torch.library ops (opaque to Dynamo, with fake kernels), and the MoE no longer picks torch._grouped_mm, whose
    fake kernel takes bf16 only, for fp32. Two compiled steps give the eager steps' logits and cache. ``aot_eager``
    runs the traced graph (fake kernels, functionalization of the in-place state update) without Inductor's C++
    code generation, which would take minutes on a small CPU."""
    import copy

    cache = KimiLinearCache(model.config, len(PROMPTS), 24)
    tokens = prefill(model, PROMPTS, cache).argmax(-1)
    eager_cache = copy.deepcopy(cache)
    step = torch.compile(decode_step, fullgraph=True, backend="aot_eager")
    try:
        for _ in range(2):
            logits = step(model, tokens, cache)
            want = decode_step(model, tokens, eager_cache)
            assert rel_err(logits, want) < 1e-6
            tokens = want.argmax(-1)
        for layer, (got, ref) in enumerate(zip(cache.layers, eager_cache.layers, strict=True)):
            for name in ref:
                assert rel_err(got[name].float(), ref[name].float()) < 1e-6, (layer, name)
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager():
    # bf16, the serving dtype: the MoE's grouped GEMM path is capturable (its fp32 path syncs, and generate()
    # then decodes eagerly with a warning).
    import warnings

    dtype = torch.bfloat16

    model = make_model(seed=22).to(device="cuda", dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture would warn and fall back to eager
        graphed = generate(model, PROMPTS, max_new_tokens=12, stop_tokens=[], use_cuda_graph=True)
    eager = generate(model, PROMPTS, max_new_tokens=12, stop_tokens=[], use_cuda_graph=False)
    assert graphed == eager
    cache = KimiLinearCache(model.config, len(PROMPTS), 32, dtype=dtype, device="cuda")
    from kimi_linear.generate import CudaGraphDecoder

    decoder = CudaGraphDecoder(model, cache)
    assert cache.lengths.tolist() == [0] * len(PROMPTS) and all(
        t.abs().sum() == 0 for t in cache.layers[0].values()
    )
    logits = prefill(model, PROMPTS, cache)
    tokens = logits.argmax(-1)
    replayed = decoder(tokens).clone()
    eager_cache = KimiLinearCache(model.config, len(PROMPTS), 32, dtype=dtype, device="cuda")
    prefill(model, PROMPTS, eager_cache)
    assert rel_err(replayed, decode_step(model, tokens, eager_cache)) < 1e-3  # same kernels, same inputs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generate_fp32_same_tokens_with_or_without_graph():
    # Whether or not every mixer can be captured in fp32, asking for the graph never changes the tokens.
    import warnings

    model = make_model(seed=23).to(device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graphed = generate(model, PROMPTS, max_new_tokens=10, stop_tokens=[], use_cuda_graph=True)
    eager = generate(model, PROMPTS, max_new_tokens=10, stop_tokens=[], use_cuda_graph=False)
    assert graphed == eager


def test_sample_rows_inverse_cdf_per_row_settings():
    """Each row with its own settings in one batch: the token where the cumulative probability (most likely
    first, after top-k / top-p, renormalised) passes the row's uniform number; greedy rows take the argmax."""
    probs = torch.tensor([0.2, 0.5, 0.3])  # by likelihood: token 1 (0.5), token 2 (0.3), token 0 (0.2)
    logits = probs.log()[None].repeat(7, 1)
    got = sample_rows(
        logits,
        temperatures=[1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0],
        top_ks=[0, 0, 0, 2, 0, 0, 1],
        top_ps=[1.0, 1.0, 1.0, 1.0, 0.6, 1.0, 1.0],
        uniforms=[0.1, 0.6, 0.85, 0.7, 0.9, 0.99, 0.99],
    ).tolist()
    # cdf 0.5 / 0.8 / 1.0; top-2 renormalised: 0.625 / 1.0; top_p 0.6 keeps tokens 1 and 2 (0.5 < 0.6)
    assert got == [1, 2, 0, 2, 2, 1, 1]


def test_sample_rows_frequencies_follow_the_distribution():
    """4,000 uniform draws per row: frequencies within 5 standard errors of softmax(logits / T) restricted."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, generator=gen)
    n = 4000
    u = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
    rows = logits.repeat_interleave(n, 0)
    draws = sample_rows(rows, [0.7] * n + [1.5] * n, [0] * n + [3] * n, [1.0] * 2 * n, u + u).view(2, n)
    want0 = (logits[0] / 0.7).softmax(-1)
    top3 = (logits[1] / 1.5).topk(3)
    want1 = torch.zeros(6).scatter(0, top3.indices, top3.values.softmax(-1))
    for row, want in ((draws[0], want0), (draws[1], want1)):
        freq = torch.bincount(row, minlength=6).float() / n
        se = (want * (1 - want) / n).sqrt()
        assert ((freq - want).abs() <= 5 * se + 1e-9).all(), (freq, want)


def test_generate_under_inference_mode():
    """torch.inference_mode around generate (a common habit) gives the tokens of torch.no_grad: the cache's
    lengths keep a version counter, and inference tensors handed in are read, not remembered."""
    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM

    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig.from_preset("debug"))
    prompts = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        expected = generate(model, prompts, max_new_tokens=4)
    with torch.inference_mode():
        assert generate(model, prompts, max_new_tokens=4) == expected


@pytest.mark.parametrize("pooled", [False, True], ids=["dense", "pooled"])
def test_piece_step_equals_packed_prefill(pooled):
    """A padded piece (``piece_view`` + ``piece_step``: rows of 5 and 3 real tokens padded to 8, after histories
    of 37 and 20 tokens) gives the packed prefill's logits after each row's last real token, the same KDA states,
    conv tails and MLA latents, and then the same next decode step: the padding changes nothing."""
    import copy

    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM
    from kimi_linear.ops.varlen import remember_host_values

    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig.from_preset("debug")).eval()
    V = model.config.vocab_size
    history = [torch.randint(0, V, (n,)).tolist() for n in (37, 20)]
    pieces = [torch.randint(0, V, (n,)).tolist() for n in (5, 3)]
    with torch.no_grad():
        if pooled:  # the engine's arrangement: slots 3 and 1, blocks of 16 tokens from a shared pool
            pools = KimiLinearCache.pooled(model.config, num_slots=4, num_blocks=12, block_size=16)
            slots, table = torch.tensor([3, 1]), torch.tensor([[0, 5, 2, 7], [4, 1, 9, 3]])

            def view(lengths):
                return pools.view(slots, table, torch.tensor(lengths))

            packed = view([0, 0])
            flat = [t for h in history for t in h]
            cu = torch.tensor([0, 37, 57])
            remember_host_values(cu, [0, 37, 57])
            model.hidden_states(torch.tensor(flat)[None], cache=packed, cu_seqlens=cu)
            base = pools
        else:
            base = KimiLinearCache(model.config, batch_size=2, max_length=64)
            prefill(model, history, base)
        ref_cache, piece_cache = base, copy.deepcopy(base)
        # the reference: the pieces as one packed prefill on the cache with the histories
        ref = view([37, 20]) if pooled else ref_cache
        cu = torch.tensor([0, 5, 8])
        remember_host_values(cu, [0, 5, 8])
        hidden = model.hidden_states(torch.tensor(pieces[0] + pieces[1])[None], cache=ref, cu_seqlens=cu)
        ref_logits = model.lm_head(hidden[0, cu[1:] - 1]).float()
        # the padded piece
        tokens = torch.full((2, 8), 7)
        tokens[0, :5], tokens[1, :3] = torch.tensor(pieces[0]), torch.tensor(pieces[1])
        if pooled:
            piece = pools_copy = piece_cache
            piece = piece_cache.piece_view(slots, table, torch.tensor([37, 20]), torch.tensor([5, 3]))
        else:
            piece = piece_cache.piece_view(torch.arange(2), piece_cache.block_table, piece_cache.lengths,
                                           torch.tensor([5, 3]))
        got = piece_step(model, tokens, piece)
        assert rel_err(got, ref_logits) < 1e-5
        assert piece.lengths.tolist() == [42, 23]
        for layer_ref, layer_got in zip(ref_cache.layers, piece_cache.layers, strict=True):
            for name in ("state", "conv"):
                if name in layer_ref:
                    assert rel_err(layer_got[name], layer_ref[name]) < 1e-5, name
        # the next decode step from each: reads every latent the rows hold
        nxt = torch.tensor([1, 2])
        if pooled:
            ref_dec = decode_step(model, nxt, view([42, 23]))
            got_dec = decode_step(model, nxt, pools_copy.view(slots, table, torch.tensor([42, 23])))
        else:
            assert ref_cache.lengths.tolist() == [42, 23]
            ref_dec, got_dec = decode_step(model, nxt, ref_cache), decode_step(model, nxt, piece_cache)
        assert rel_err(got_dec, ref_dec) < 1e-5


def prefilled_twice(model, dtype):
    """A 2-row CUDA cache holding prefills of 70 and 9 random tokens, and a copy of it."""
    import copy

    cache = KimiLinearCache(model.config, batch_size=2, max_length=256, dtype=dtype, device="cuda")
    prefill(model, [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in (70, 9)], cache)
    return cache, copy.deepcopy(cache)


def capture_piece_step(model, cache, rows: int):
    """``piece_step`` over ``cache``'s first ``rows`` rows captured in a CUDA graph (after a warm-up with no real
    token, which changes nothing): (graph, token buffer [rows, 64], real-token counts [rows], logits, the
    captured view). The caller keeps the view: the graph reads its tensors (its slots) at their addresses, and
    freed, the allocator would hand their memory to the next tensor."""
    tokens = torch.zeros(rows, 64, dtype=torch.long, device="cuda")
    new_tokens = torch.zeros(rows, dtype=torch.long, device="cuda")
    view = cache.piece_view(torch.arange(rows, device="cuda"), cache.block_table, cache.lengths, new_tokens)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        piece_step(model, tokens, view)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = piece_step(model, tokens, view)
    return graph, tokens, new_tokens, logits, view


def load_pieces(tokens, new_tokens, pieces):
    tokens.zero_()
    for i, p in enumerate(pieces):
        tokens[i, : len(p)] = torch.tensor(p)
    new_tokens.copy_(torch.tensor([len(p) for p in pieces]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_piece_step_captured_in_a_graph():
    """``piece_step`` captured once in a CUDA graph and replayed for pieces of other lengths (fp32, the debug
    model with dense MLPs and the Triton kernels) gives the packed prefill's logits and the same next decode
    step. (The fp32 MoE layer's expert loop reads the expert offsets on the host, so it cannot be captured: the
    engine then runs such pieces eagerly. bf16 MoE is captured: the next test.)"""
    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM

    torch.manual_seed(0)
    config = KimiLinearConfig.from_preset("debug")
    model = KimiLinearForCausalLM(KimiLinearConfig.from_preset(
        "debug", first_k_dense_replace=config.num_hidden_layers)).cuda().eval()
    V = model.config.vocab_size
    with torch.no_grad():
        base, graph_cache = prefilled_twice(model, torch.float32)
        graph, tokens, new_tokens, logits, _view = capture_piece_step(model, graph_cache, 2)
        for lengths in ((5, 64), (33, 1)):
            pieces = [torch.randint(0, V, (n,)).tolist() for n in lengths]
            load_pieces(tokens, new_tokens, pieces)
            graph.replay()
            ref = prefill_more(model, pieces, base)
            assert rel_err(logits, ref) < 1e-4
        nxt = torch.tensor([1, 2], device="cuda")
        assert rel_err(decode_step(model, nxt, graph_cache), decode_step(model, nxt, base)) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_moe_piece_step_graph_equals_eager():
    """The debug model in bf16 (MoE on torch._grouped_mm, no host read) captures; each replay gives the logits
    and cache of the same ``piece_step`` run eagerly on a copy of the cache."""
    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM

    torch.manual_seed(1)
    model = KimiLinearForCausalLM(KimiLinearConfig.from_preset("debug")).cuda().to(torch.bfloat16).eval()
    V = model.config.vocab_size
    with torch.no_grad():
        base, eager_cache = prefilled_twice(model, torch.bfloat16)
        graph, tokens, new_tokens, logits, _view = capture_piece_step(model, base, 2)
        for lengths in ((5, 64), (33, 1)):
            pieces = [torch.randint(0, V, (n,)).tolist() for n in lengths]
            load_pieces(tokens, new_tokens, pieces)
            graph.replay()
            view = eager_cache.piece_view(torch.arange(2, device="cuda"), eager_cache.block_table,
                                          eager_cache.lengths, new_tokens.clone())
            want = piece_step(model, tokens.clone(), view)
            assert rel_err(logits, want) < 1e-3
            assert torch.equal(base.lengths, eager_cache.lengths)
        for got, want in zip(base.layers, eager_cache.layers, strict=True):
            for name in got:
                assert rel_err(got[name].float(), want[name].float()) < 1e-3, name


def prefill_more(model, pieces, cache):
    """The packed prefill of ``pieces`` appended to the rows of ``cache``: logits after each piece's last token."""
    from kimi_linear.ops.varlen import remember_host_values

    bounds = [0]
    for p in pieces:
        bounds.append(bounds[-1] + len(p))
    cu = torch.tensor(bounds, device=cache.device)
    remember_host_values(cu, bounds)
    ids = torch.tensor([t for p in pieces for t in p], device=cache.device)[None]
    hidden = model.hidden_states(ids, cache=cache, cu_seqlens=cu)
    return model.lm_head(hidden[0, cu[1:] - 1]).float()
