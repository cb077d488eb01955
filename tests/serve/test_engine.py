"""The serving engine against ``generate()`` on each prompt alone (the contract), on a tiny fp32 model on the CPU.

Covers continuous batching (more requests than slots, joining and leaving), chunked prefill, the paged MLA cache,
exact prefix caching (on == off, a hit that ends mid-block, a multi-turn conversation), aborts, per-request seeds,
stop tokens, failures confined to their requests, and the start-up checks.
"""

from __future__ import annotations

import pytest
import torch

from kimi_linear.generate import generate
from kimi_linear.serve.engine import Engine, EngineConfig, QueueFullError, SamplingParams, _bucket_sizes, _DecodeGraph
from tests.test_model import make_model
from tests.utils import rel_err

GREEDY = dict(temperature=0.0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_model(seed=31)


def random_prompt(n: int, seed: int, vocab: int = 256) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: Engine, requests: dict, capture_logits: bool = False, max_steps: int = 10_000):
    """Add ``requests`` {id: (prompt, SamplingParams)}, step until done; {id: tokens}, {id: finish event} (and
    {id: [logits per token]} with capture_logits)."""
    logits: dict[str, list[torch.Tensor]] = {}
    if capture_logits:
        original = engine._choose

        def spy(seqs, slots, rows, *args):
            for s, row in zip(seqs, rows, strict=True):
                logits.setdefault(s.request_id, []).append(row.clone())
            return original(seqs, slots, rows, *args)

        engine._choose = spy
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    finished = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for e in engine.step():
            if e.token_id is not None:
                tokens[e.request_id].append(e.token_id)
            if e.finished:
                finished[e.request_id] = e
    assert not engine.has_unfinished()
    if capture_logits:
        engine._choose = original
        return tokens, finished, logits
    return tokens, finished


def alone(model, prompt, max_tokens):
    return generate(model, [prompt], max_new_tokens=max_tokens, stop_tokens=[])[0]


def test_greedy_equals_generate_alone_with_requests_joining_and_leaving(model):
    """12 requests of 1..300 tokens through 8 slots, small token budget (chunked prefill), different output
    lengths: each completion equals generate() on its prompt alone."""
    lengths = [1, 300, 5, 64, 130, 17, 200, 65, 2, 128, 90, 33]
    max_tokens = [9, 4, 12, 7, 3, 10, 6, 8, 11, 5, 9, 2]
    requests = {
        f"r{i}": (random_prompt(n, seed=i), SamplingParams(max_tokens=m, **GREEDY))
        for i, (n, m) in enumerate(zip(lengths, max_tokens, strict=True))
    }
    engine = Engine(model, EngineConfig(max_num_seqs=8, max_model_len=320, max_num_batched_tokens=96))
    tokens, finished = run(engine, requests)
    for rid, (prompt, params) in requests.items():
        assert tokens[rid] == alone(model, prompt, params.max_tokens), rid
        e = finished[rid]
        assert e.finish_reason == "length" and e.completion_tokens == params.max_tokens
        assert e.prompt_tokens == len(prompt)
    stats = engine.stats()
    assert stats.running == stats.waiting == 0 and stats.free_slots == 8
    assert stats.generated_tokens_total == sum(max_tokens) and stats.finished_requests_total == 12
    assert stats.prefill_tokens_total == stats.prompt_tokens_total == sum(len(p) for p, _ in requests.values())
    assert stats.free_blocks == stats.num_blocks  # all blocks free or only held by the prefix cache


def test_stats_count_steps_prefill_steps_and_their_time(model):
    """One 150-token prompt through a 64-token budget (3 pieces), 5 tokens: 3 prefill steps (the last gives the
    first token), then 4 decode steps; no step before a request nor after the last."""
    engine = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=256, max_num_batched_tokens=64))
    assert engine.stats().steps_total == 0
    run(engine, {"a": (random_prompt(150, seed=5), SamplingParams(max_tokens=5, **GREEDY))})
    stats = engine.stats()
    assert (stats.steps_total, stats.prefill_steps_total) == (7, 3)
    assert stats.step_seconds_total > 0
    engine.step()  # nothing to run: not counted
    assert engine.stats().steps_total == 7


def test_chunked_prefill_equals_whole_and_does_not_stall_streams(model):
    long_prompt, short_prompt = random_prompt(700, seed=1), random_prompt(3, seed=2)
    whole = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=800, max_num_batched_tokens=1024,
                                       enable_prefix_caching=False))
    tok_whole, _, log_whole = run(whole, {"long": (long_prompt, SamplingParams(max_tokens=4, **GREEDY))}, True)
    chunked = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=800, max_num_batched_tokens=128,
                                         enable_prefix_caching=False))
    # the short request starts first; while the long prompt is prefilled in pieces it gets a token every step
    chunked.add_request("short", short_prompt, SamplingParams(max_tokens=20, **GREEDY))
    got = {"short": [e.token_id for e in chunked.step()], "long": []}
    chunked.add_request("long", long_prompt, SamplingParams(max_tokens=4, **GREEDY))
    logits_long = []
    original = chunked._choose
    chunked._choose = lambda seqs, slots, rows, *args: (
        [logits_long.append(r.clone()) for s, r in zip(seqs, rows, strict=True) if s.request_id == "long"],
        original(seqs, slots, rows, *args),
    )[1]
    steps_while_prefilling = 0
    while chunked.has_unfinished():
        prefilling = any(s.request_id == "long" and s.prefilling for s in chunked.running)
        events = chunked.step()
        for e in events:
            if e.token_id is not None:
                got[e.request_id].append(e.token_id)
        if prefilling and not any(e.request_id == "long" for e in events):
            steps_while_prefilling += 1
            assert any(e.request_id == "short" for e in events), "the running stream stalled"
    assert steps_while_prefilling >= 4  # 700 tokens in pieces of at most 127
    assert got["long"] == tok_whole["long"] == alone(model, long_prompt, 4)
    assert got["short"] == alone(model, short_prompt, 20)
    assert rel_err(torch.stack(logits_long), torch.stack(log_whole["long"])) < 1e-5


def test_prefix_cache_on_equals_off_mid_block_hit_and_multi_turn(model):
    """Same greedy tokens and logits (fp32 tolerance) with the prefix cache on and off: a shared system
    prompt (the second request snapshots the branch point, the third hits it), a hit that ends mid-block
    (falls back to the previous boundary), a repeated prompt, and a multi-turn conversation whose second turn
    reuses the first turn's prompt and generated tokens."""
    system = random_prompt(150, seed=10)
    a = random_prompt(200, seed=11)
    first_turn, user = random_prompt(100, seed=16), random_prompt(30, seed=17)

    def scenario(engine):
        out, logits, cached = {}, {}, {}

        def go(rid, prompt, max_tokens):
            t, f, lg = run(engine, {rid: (prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))}, True)
            out[rid], logits[rid], cached[rid] = t[rid], lg[rid], f[rid].cached_tokens

        go("sys1", system + random_prompt(60, seed=12), 3)  # 210 tokens: snapshot at 192 only
        go("sys2", system + random_prompt(60, seed=13), 3)  # registered blocks reach 128: a piece ends there
        go("sys3", system + random_prompt(25, seed=14), 3)  # hits the snapshot at 128
        go("a", a, 5)  # 200 tokens: snapshot at 192
        go("a_mid", a[:197] + random_prompt(40, seed=15), 4)  # shares 197 tokens: hit at 192
        go("a_again", a, 5)  # the whole prompt cached but one token must be computed: hit at 192
        go("turn1", first_turn, 40)  # decode crosses 128: snapshot there
        go("turn2", first_turn + out["turn1"] + user, 6)
        return out, logits, cached

    config = dict(max_num_seqs=4, max_model_len=400, max_num_batched_tokens=512)
    on_engine = Engine(model, EngineConfig(**config, enable_prefix_caching=True))
    off_engine = Engine(model, EngineConfig(**config, enable_prefix_caching=False))
    on_tokens, on_logits, cached = scenario(on_engine)
    off_tokens, off_logits, off_cached = scenario(off_engine)
    on_stats, off_stats = on_engine.stats(), off_engine.stats()
    # prefill computes exactly the prompt tokens the cache did not serve
    assert on_stats.prefill_tokens_total == on_stats.prompt_tokens_total - sum(cached.values())
    assert off_stats.prefill_tokens_total == off_stats.prompt_tokens_total
    assert cached == {"sys1": 0, "sys2": 0, "sys3": 128, "a": 0, "a_mid": 192, "a_again": 192, "turn1": 0,
                      "turn2": 128}
    assert all(v == 0 for v in off_cached.values())
    assert on_tokens == off_tokens
    for rid in on_logits:
        assert rel_err(torch.stack(on_logits[rid]), torch.stack(off_logits[rid])) < 1e-5, rid
    assert on_tokens["turn2"] == alone(model, first_turn + on_tokens["turn1"] + user, 6)


def test_bf16_state_engine_equals_generate_alone_and_restores_bf16_snapshots(model):
    """``kda_state_dtype=bfloat16``: the slot pool holds bf16 KDA states, rounded at the end of every forward. So
    the engine equals generate(state_dtype=bfloat16) alone where each prompt is prefilled in one piece (prompts
    under one block, a budget above them); and prefix-cache snapshots (copies of bf16 slots) give the tokens and
    logits of the cache off when both prefill in the same block-aligned pieces (a budget of one block)."""
    bf16 = torch.bfloat16
    engine = Engine(model, EngineConfig(max_num_seqs=3, max_model_len=128, max_num_batched_tokens=256,
                                        kda_state_dtype=bf16))
    states = [layer["state"] for layer in engine.pools.layers if "state" in layer]
    assert states and all(t.dtype == bf16 for t in states)
    lengths, max_tokens = [1, 40, 63, 7, 20], [6, 3, 5, 8, 4]
    requests = {f"r{i}": (random_prompt(n, seed=60 + i), SamplingParams(max_tokens=m, **GREEDY))
                for i, (n, m) in enumerate(zip(lengths, max_tokens, strict=True))}
    tokens, _ = run(engine, requests)
    for rid, (prompt, params) in requests.items():
        want = generate(model, [prompt], max_new_tokens=params.max_tokens, stop_tokens=[], state_dtype=bf16)[0]
        assert tokens[rid] == want, rid

    system = random_prompt(150, seed=70)
    turns = {"first": (system + random_prompt(10, seed=71), 3), "second": (system + random_prompt(20, seed=72), 5)}

    def scenario(engine):
        out, logits, cached = {}, {}, {}
        for rid, (prompt, m) in turns.items():
            t, f, lg = run(engine, {rid: (prompt, SamplingParams(max_tokens=m, **GREEDY))}, True)
            out[rid], logits[rid], cached[rid] = t[rid], torch.stack(lg[rid]), f[rid].cached_tokens
        return out, logits, cached

    config = dict(max_num_seqs=2, max_model_len=256, max_num_batched_tokens=64, kda_state_dtype=bf16)
    on_tokens, on_logits, cached = scenario(Engine(model, EngineConfig(**config, enable_prefix_caching=True)))
    off_tokens, off_logits, _ = scenario(Engine(model, EngineConfig(**config, enable_prefix_caching=False)))
    assert cached == {"first": 0, "second": 128}
    assert on_tokens == off_tokens
    for rid in turns:
        assert rel_err(on_logits[rid], off_logits[rid]) < 1e-5, rid
    with pytest.raises(ValueError, match="kda_state_dtype"):
        Engine(model, EngineConfig(max_num_seqs=2, max_model_len=128, kda_state_dtype=torch.float16))


def test_interval_snapshots_let_a_later_sharer_skip_the_shared_part(model):
    """With ``snapshot_interval`` 128 a prefill piece also leaves KDA snapshots at the prompt positions that are
    multiples of 128 inside it. Prompts that share 300 and 150 tokens with earlier ones whose pieces ended
    elsewhere then start from 256 and 128 (with piece-end snapshots alone: from 0), with the tokens and logits of
    the cache off. The earlier two are prefilled together; the second one's piece is packed after the first's
    second piece (chunk and position arithmetic of the packed forward)."""
    system, other = random_prompt(300, seed=80), random_prompt(230, seed=81)
    first = {"a": (system + random_prompt(60, seed=82), 2), "b": (other + random_prompt(20, seed=83), 2)}
    then = {"a2": (system + random_prompt(40, seed=84), 4), "b2": (other[:150] + random_prompt(30, seed=85), 4)}

    def scenario(engine):
        run(engine, {rid: (p, SamplingParams(max_tokens=m, **GREEDY)) for rid, (p, m) in first.items()})
        out, logits, cached = {}, {}, {}
        for rid, (prompt, m) in then.items():
            t, f, lg = run(engine, {rid: (prompt, SamplingParams(max_tokens=m, **GREEDY))}, True)
            out[rid], logits[rid], cached[rid] = t[rid], torch.stack(lg[rid]), f[rid].cached_tokens
        return out, logits, cached

    # a budget of 320: "a" runs [0, 320) alone (snapshots at 128 and 256 from inside), then [320, 360) packed
    # with "b"'s [0, 192) (snapshot at 128 from inside)
    config = dict(max_num_seqs=2, max_model_len=512, max_num_batched_tokens=320)
    on_tokens, on_logits, cached = scenario(Engine(model, EngineConfig(**config, snapshot_interval=128)))
    off_tokens, off_logits, _ = scenario(Engine(model, EngineConfig(**config, enable_prefix_caching=False)))
    assert cached == {"a2": 256, "b2": 128}
    _, _, piece_ends_only = scenario(Engine(model, EngineConfig(**config)))  # interval 2048: none inside
    assert piece_ends_only == {"a2": 0, "b2": 0}
    assert on_tokens == off_tokens
    for rid, (prompt, m) in then.items():
        assert rel_err(on_logits[rid], off_logits[rid]) < 1e-5, rid
        assert on_tokens[rid] == alone(model, prompt, m), rid
    with pytest.raises(ValueError, match="snapshot_interval"):
        Engine(model, EngineConfig(max_num_seqs=2, max_model_len=128, snapshot_interval=100))


def test_a_completion_keeps_one_snapshot_at_its_last_boundary(model):
    """A 200-token completion crosses three block boundaries; its snapshot moves along, so one is left (at 192),
    and the next turn (prompt + completion + new tokens) starts there, with the tokens generate() gives alone."""
    engine = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=512, max_num_batched_tokens=256))
    prompt = random_prompt(10, seed=90)
    tokens, _ = run(engine, {"long": (prompt, SamplingParams(max_tokens=200, **GREEDY))})
    assert len(engine.prefix.snapshots) == 1
    follow = prompt + tokens["long"] + random_prompt(5, seed=91)
    out, finished = run(engine, {"next": (follow, SamplingParams(max_tokens=4, **GREEDY))})
    assert finished["next"].cached_tokens == 192
    assert out["next"] == alone(model, follow, 4)


def test_prefix_cache_concurrent_sharers_and_eviction(model):
    """Requests sharing a prefix run together (blocks held by several), and a pool too small to keep
    everything evicts cached blocks and snapshots without changing any completion."""
    shared = random_prompt(130, seed=20)
    prompts = [shared + random_prompt(n, seed=21 + n) for n in (5, 40, 70, 1, 90, 12)]
    requests = {f"s{i}": (p, SamplingParams(max_tokens=6, **GREEDY)) for i, p in enumerate(prompts)}
    engine = Engine(model, EngineConfig(max_num_seqs=3, max_model_len=256, num_blocks=12, num_snapshots=2,
                                        max_num_batched_tokens=256))
    first, _ = run(engine, dict(list(requests.items())[:2]))
    rest, finished = run(engine, dict(list(requests.items())[2:]))
    tokens = {**first, **rest}
    for rid, (prompt, params) in requests.items():
        assert tokens[rid] == alone(model, prompt, params.max_tokens), rid
    assert any(e.cached_tokens > 0 for e in finished.values())
    assert engine.stats().free_blocks == 12


def test_seeded_sampling_is_independent_of_the_batch(model):
    prompt = random_prompt(40, seed=3)
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    alone_tokens, _ = run(Engine(model, EngineConfig(max_num_seqs=4, max_model_len=128)), {"x": (prompt, params)})
    others = {f"o{i}": (random_prompt(10 + 7 * i, seed=50 + i), SamplingParams(max_tokens=8, temperature=1.0))
              for i in range(4)}
    batched, _ = run(Engine(model, EngineConfig(max_num_seqs=4, max_model_len=128)), {**others, "x": (prompt, params)})
    assert batched["x"] == alone_tokens["x"]
    ref = generate(model, [prompt], max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=1234, stop_tokens=[])
    assert alone_tokens["x"] == ref[0]


def model_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits for each completion token, from one forward of prompt + completion."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1)  # [len(completion), V]


def test_logprobs_are_the_models_distribution_whatever_the_batch(model):
    """Greedy with 3 alternatives, seeded sampling with none (its logprobs are before temperature / top-p), and a
    request without logprobs, batched with prompts crossing block boundaries and a stop token: each token's
    logprob and top list equal log_softmax of the model's own logits, and the tokens equal those of the same
    requests without logprobs."""
    prompts = {"g": random_prompt(70, seed=7), "s": random_prompt(9, seed=8), "n": random_prompt(33, seed=9)}
    params = {
        "g": SamplingParams(max_tokens=9, logprobs=3, **GREEDY),
        "s": SamplingParams(max_tokens=7, temperature=0.9, top_p=0.9, seed=5, logprobs=0, ignore_eos=True),
        "n": SamplingParams(max_tokens=6, **GREEDY),
    }
    free = alone(model, prompts["g"], 9)
    params["g"] = SamplingParams(max_tokens=9, logprobs=3, temperature=0.0, stop_token_ids=(free[6],))
    engine = Engine(model, EngineConfig(max_num_seqs=3, max_model_len=128, max_num_batched_tokens=48))
    for rid in prompts:
        engine.add_request(rid, prompts[rid], params[rid])
    events: dict[str, list] = {rid: [] for rid in prompts}
    while engine.has_unfinished():
        for e in engine.step():
            if e.token_id is not None:
                events[e.request_id].append(e)
    plain = dict(params, g=SamplingParams(max_tokens=9, temperature=0.0, stop_token_ids=(free[6],)),
                 s=SamplingParams(max_tokens=7, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True))
    tokens, _ = run(Engine(model, EngineConfig(max_num_seqs=3, max_model_len=128)),
                    {rid: (prompts[rid], plain[rid]) for rid in prompts})
    for rid, evs in events.items():
        assert [e.token_id for e in evs] == tokens[rid], rid
    assert tokens["g"] == free[:7] and events["g"][-1].finished and events["g"][-1].finish_reason == "stop"
    assert all(e.logprob is None and e.top_logprobs is None for e in events["n"])
    for rid, k in (("g", 3), ("s", 0)):
        want = model_logprobs(model, prompts[rid], tokens[rid])
        for j, e in enumerate(events[rid]):
            assert abs(e.logprob - want[j, e.token_id].item()) < 1e-5, (rid, j)
            values, ids = want[j].topk(k)
            assert [t for t, _ in e.top_logprobs] == ids.tolist(), (rid, j)
            assert torch.allclose(torch.tensor([v for _, v in e.top_logprobs]), values, atol=1e-5), (rid, j)
    assert all(e.top_logprobs[0][0] == e.token_id for e in events["g"])  # greedy: the chosen one is the top


def test_prompt_logprobs_are_the_models_and_skip_the_prefix_cache(model, monkeypatch):
    """A 150-token prompt in pieces of at most 48 tokens, with 2 alternatives, computed 7 positions at a time,
    after the same prompt filled the prefix cache: every prompt token after the first gets log_softmax of the
    model's logits on the prompt, on the first token's event; the cache is not used for it (no cached tokens)
    and the completion is the same."""
    import kimi_linear.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "PROMPT_LOGPROBS_ROWS", 7)
    prompt = random_prompt(150, seed=12)
    engine = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=256, max_num_batched_tokens=48))
    first, _ = run(engine, {"warm": (prompt, SamplingParams(max_tokens=3, **GREEDY))})
    engine.add_request("p", prompt, SamplingParams(max_tokens=3, prompt_logprobs=2, **GREEDY))
    events = []
    while engine.has_unfinished():
        events += engine.step()
    assert [e.token_id for e in events] == first["warm"]
    scores = events[0].prompt_logprobs
    assert all(e.prompt_logprobs is None for e in events[1:]) and events[-1].cached_tokens == 0
    want = model_logprobs(model, prompt[:1], prompt[1:])
    assert len(scores) == len(prompt) - 1
    for j, (lp, top) in enumerate(scores):
        assert abs(lp - want[j, prompt[j + 1]].item()) < 1e-5, j
        values, ids = want[j].topk(2)
        assert [t for t, _ in top] == ids.tolist() and torch.allclose(torch.tensor([v for _, v in top]), values)


def test_logprobs_out_of_range_are_refused():
    for bad in (-1, 21, 2.0, True):
        with pytest.raises(ValueError, match="logprobs"):
            SamplingParams(logprobs=bad)


def test_stop_tokens_and_eos(model):
    prompt = random_prompt(20, seed=4)
    free = alone(model, prompt, 12)
    stop = free[4]
    engine = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=64))
    tokens, finished = run(engine, {
        "stop": (prompt, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop,), ignore_eos=True)),
    })
    assert tokens["stop"] == free[: free.index(stop) + 1] and finished["stop"].finish_reason == "stop"
    eos_model = make_model(seed=31, eos_token_id=stop)
    tokens, finished = run(Engine(eos_model, EngineConfig(max_num_seqs=2, max_model_len=64)),
                           {"eos": (prompt, SamplingParams(max_tokens=12, temperature=0.0))})
    assert tokens["eos"][-1] == stop and finished["eos"].finish_reason == "stop"


def test_stepping_ahead_drops_tokens_after_a_stop_and_reuses_the_slot(model):
    """The engine launches an iteration before it reads the previous one's tokens, so a sequence that samples
    a stop token has already been stepped once more. That token must be dropped, and the slot (its state and
    next token overwritten by the extra step) must serve the next request exactly: 6 requests through 2 slots,
    stops at different points, sequences crossing a 64-token block boundary, prefix cache on, each == alone."""
    engine = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=256, max_num_batched_tokens=96))
    requests = {}
    for i in range(6):
        prompt = random_prompt(30 + 17 * i, seed=80 + i)
        free = alone(model, prompt, 40)
        stop = free[3 + 5 * i]
        want = free[: free.index(stop) + 1]
        params = SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=(stop,), ignore_eos=True)
        requests[f"s{i}"] = (prompt, params, want)
    engine.add_request("s0", requests["s0"][0], requests["s0"][1])
    assert engine.step() == []  # the first iteration's token is read in the next one
    first = engine.step()
    assert [(e.request_id, e.token_id) for e in first] == [("s0", requests["s0"][2][0])]
    for rid, (p, params, _) in requests.items():
        if rid != "s0":
            engine.add_request(rid, p, params)
    tokens = {rid: [] for rid in requests}
    tokens["s0"].append(first[0].token_id)
    finished = {}
    while engine.has_unfinished():
        for e in engine.step():
            if e.token_id is not None:
                tokens[e.request_id].append(e.token_id)
            if e.finished:
                finished[e.request_id] = e.finish_reason
    for rid, (_, _, want) in requests.items():
        assert tokens[rid] == want and finished[rid] == "stop", rid
    stats = engine.stats()
    assert stats.running == 0 and stats.free_slots == 2


def test_abort_frees_slot_and_blocks(model):
    engine = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=128))
    engine.add_request("a", random_prompt(70, seed=5), SamplingParams(max_tokens=50, **GREEDY))
    engine.add_request("b", random_prompt(10, seed=6), SamplingParams(max_tokens=50, **GREEDY))
    engine.add_request("c", random_prompt(10, seed=7), SamplingParams(max_tokens=3, **GREEDY))  # waits
    for _ in range(3):
        engine.step()
    assert engine.stats().free_slots == 0 and engine.stats().waiting == 1
    engine.abort("a")
    engine.abort("unknown")  # ignored
    events = engine.step()
    aborted = [e for e in events if e.request_id == "a"]
    assert len(aborted) == 1 and aborted[0].finish_reason == "abort" and aborted[0].token_id is None
    assert engine.stats().running == 2  # c took a's slot in the same step
    engine.abort("b")
    engine.abort("c")
    engine.step()
    s = engine.stats()
    assert s.running == 0 and s.free_slots == 2 and s.free_blocks == s.num_blocks and not engine.has_unfinished()
    engine.add_request("a", random_prompt(4, seed=8), SamplingParams(max_tokens=2, **GREEDY))  # id free again


def test_failing_requests_do_not_stop_the_engine(model, monkeypatch):
    engine = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=128))
    prompts = {f"p{i}": random_prompt(15 + 9 * i, seed=60 + i) for i in range(3)}
    # a sampling failure finishes only its request
    import kimi_linear.serve.engine as engine_module

    real_sample = engine_module.sample_rows

    def flaky_sample(logits, temperatures, top_ks, top_ps, uniforms):
        if 0.5 in temperatures:
            raise RuntimeError("sampler exploded")
        return real_sample(logits, temperatures, top_ks, top_ps, uniforms)

    monkeypatch.setattr(engine_module, "sample_rows", flaky_sample)
    requests = {rid: (p, SamplingParams(max_tokens=5, **GREEDY)) for rid, p in prompts.items()}
    requests["bad"] = (random_prompt(9, seed=70), SamplingParams(max_tokens=5, temperature=0.5))
    tokens, finished = run(engine, requests)
    assert finished["bad"].finish_reason == "error" and "sampler exploded" in finished["bad"].error
    for rid, p in prompts.items():
        assert tokens[rid] == alone(model, p, 5)
    # a forward that raises finishes the requests in it; later requests are served exactly
    calls = {"n": 0}
    real_forward = model.model.forward  # under both the packed prefill and the padded-piece step

    def broken_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("kernel fault")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", broken_once)
    _, finished = run(engine, {"x": (prompts["p0"], SamplingParams(max_tokens=5, **GREEDY))})
    assert finished["x"].finish_reason == "error" and "kernel fault" in finished["x"].error
    tokens, _ = run(engine, {rid: (p, SamplingParams(max_tokens=5, **GREEDY)) for rid, p in prompts.items()})
    for rid, p in prompts.items():
        assert tokens[rid] == alone(model, p, 5)
    assert engine.stats().free_slots == 4


def test_add_request_validation_and_queue_limit(model):
    engine = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=64, max_queue=2))
    ok = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], ok)
    with pytest.raises(ValueError, match="vocab"):
        engine.add_request("v", [1, 100000], ok)
    with pytest.raises(ValueError, match="vocab"):
        engine.add_request("n", [1, -1], ok)
    for wrong in (True, 2.0, "3"):
        with pytest.raises(ValueError, match="must be ints"):
            engine.add_request("t", [1, wrong], ok)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("l", [1] * 61, ok)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    engine.add_request("a", [1, 2], ok)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [1, 2], ok)
    engine.add_request("b", [1, 2], ok)
    with pytest.raises(QueueFullError):
        engine.add_request("c", [1, 2], ok)


def test_config_checked_at_start(model):
    with pytest.raises(ValueError, match="block_size"):
        Engine(model, EngineConfig(block_size=96))
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(model, EngineConfig(max_model_len=10**6))
    with pytest.raises(ValueError, match="num_blocks"):
        Engine(model, EngineConfig(max_model_len=640, num_blocks=4))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Engine(model, EngineConfig(max_num_seqs=16, max_num_batched_tokens=8))
    assert Engine(model, EngineConfig(max_num_seqs=2, max_model_len=128)).model_config is model.config


class _ReplayEagerly(_DecodeGraph):
    """The CUDA-graph decode path with ``run`` called in place of a replay: everything a replay does but the
    graph (the host buffer, padding rows, the in-step block-table gather, the argmax), on the CPU."""

    def capture(self) -> None:
        def replay():
            self.logits, self.greedy = self.run()

        self.replay = replay


def test_graph_decode_path_pads_rows_and_equals_generate_alone(model):
    """The engine's graph-bucket decode (one [2, size] input buffer, padding rows on the scratch slot and the
    scratch block-table row, the argmax taken with the step) on the CPU: 7 requests through 4 slots, buckets
    1, 2, 4 (3 running rows pad to 4), each completion == generate() alone."""
    engine = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=256, max_num_batched_tokens=64))
    assert engine.graphs == {}  # none on the CPU
    engine.graphs = {
        size: _ReplayEagerly(engine, size)
        for size in _bucket_sizes(4)
    }
    calls = {size: 0 for size in engine.graphs}

    class Counted(dict):
        def __getitem__(self, size):
            calls[size] += 1
            return dict.__getitem__(self, size)

    engine.graphs = Counted(engine.graphs)
    lengths = [3, 70, 1, 130, 9, 65, 40]
    requests = {f"r{i}": (random_prompt(n, seed=50 + i), SamplingParams(max_tokens=5 + i % 4, **GREEDY))
                for i, n in enumerate(lengths)}
    tokens, finished = run(engine, requests)
    for rid, (prompt, params) in requests.items():
        assert tokens[rid] == alone(model, prompt, params.max_tokens), rid
        assert finished[rid].finish_reason == "length"
    assert calls[4] > 0 and calls[2] + calls[1] > 0, calls  # full, padded and small buckets all ran
    assert (engine.block_tables[-1] == engine.scratch_block).all()



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_equals_generate_alone():
    """On the GPU: decode through the per-bucket CUDA graphs (paged MLA kernel, recurrent KDA on slots), fp32
    and without MoE layers so every mixer is capturable; 10 requests through 8 slots == generate() alone."""
    import warnings

    model = make_model(seed=32, first_k_dense_replace=4).to("cuda")
    lengths = [1, 300, 5, 64, 130, 17, 200, 65, 2, 128]
    requests = {
        f"r{i}": (random_prompt(n, seed=i), SamplingParams(max_tokens=6 + i % 5, **GREEDY))
        for i, n in enumerate(lengths)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture would warn and fall back to eager
        # num_blocks given: by default the engine would take 90 % of the GPU's free memory for latent blocks
        engine = Engine(model, EngineConfig(max_num_seqs=8, max_model_len=320, max_num_batched_tokens=128,
                                            num_blocks=8 * 5 + 8))
    assert sorted(engine.graphs) == [1, 2, 4, 8]
    tokens, _ = run(engine, requests)
    for rid, (prompt, params) in requests.items():
        assert tokens[rid] == alone(model, prompt, params.max_tokens), rid


def penalised_reference(model, prompt, max_tokens, repetition=1.0, frequency=0.0, presence=0.0, bias=(), stop=()):
    """Greedy decoding with the penalties written out per token: a full forward over the text so far, the
    logits of its last position, the penalties from the counts of the tokens generated so far, then the bias."""
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        for t in set(prompt) | set(out):
            logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t in set(out):
            logits[t] -= frequency * out.count(t) + presence
        for t, b in bias:
            logits[t] += b
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        if token in stop:
            break
    return out


def test_penalties_equal_their_definition_and_leave_other_rows_alone(model):
    """Greedy requests with each penalty (and all three) in one batch with an unpenalised one, through fewer
    slots than requests (a slot's counts are reset for its next owner) and the prefix cache: every completion
    equals the penalties applied token by token to a plain forward, and the unpenalised one equals generate()."""
    engine = Engine(model, EngineConfig(max_num_seqs=3, max_model_len=128, max_num_batched_tokens=48))
    prompt = random_prompt(40, seed=8)
    settings = {
        "rep": dict(repetition_penalty=1.8),
        "freq": dict(frequency_penalty=1.5),
        "pres": dict(presence_penalty=2.0),
        "all": dict(repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=-0.5),
        "bias": dict(logit_bias=((7, 4.0), (200, -100.0), (31, 2.5))),
        "forced": dict(logit_bias=((42, 100.0),)),
        "plain": {},
    }
    requests = {rid: (prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, **kw))
                for rid, kw in settings.items()}
    tokens, _ = run(engine, requests)
    assert tokens["plain"] == alone(model, prompt, 24)
    for rid, kw in settings.items():
        names = {"repetition_penalty": "repetition", "frequency_penalty": "frequency", "presence_penalty": "presence",
                 "logit_bias": "bias"}
        expected = penalised_reference(model, prompt, 24, **{names[k]: v for k, v in kw.items()})
        assert tokens[rid] == expected, rid
    assert tokens["freq"] != tokens["plain"] and tokens["rep"] != tokens["plain"]  # the penalties bite here
    assert tokens["bias"] != tokens["plain"] and tokens["forced"] == [42] * 24


def test_sampled_penalised_requests_repeat_with_their_seed(model):
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=3, frequency_penalty=1.0, repetition_penalty=1.2)
    runs = []
    for neighbours in (0, 2):  # alone, then beside other penalised requests
        engine = Engine(model, EngineConfig(max_num_seqs=3, max_model_len=128))
        requests = {"s": (random_prompt(20, seed=4), params)}
        requests.update({f"n{i}": (random_prompt(30, seed=i), params) for i in range(neighbours)})
        runs.append(run(engine, requests)[0]["s"])
    assert runs[0] == runs[1] and len(runs[0]) == 16


def test_penalty_values_are_checked():
    for bad in (dict(frequency_penalty=2.5), dict(presence_penalty=-3), dict(repetition_penalty=0),
                dict(repetition_penalty=float("inf")), dict(frequency_penalty=True)):
        with pytest.raises(ValueError, match="penalty"):
            SamplingParams(**bad)
    for bad in (((1, 101.0),), ((-1, 1.0),), ((True, 1.0),), ((1,),)):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


def test_small_pieces_take_the_padded_piece_step(model):
    """A prefix hit's rest of a block and a short prompt run as padded pieces (``_PieceRunner``), a long piece
    packed; both give the tokens of generate() alone."""
    engine = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=512, max_num_batched_tokens=256))
    calls = {"piece": 0, "packed": 0}
    for runner in engine.piece_runners.values():
        original = runner.run

        def counted(original=original):
            calls["piece"] += 1
            return original()

        runner.run = counted
    real_hidden = model.hidden_states

    def counted_hidden(*args, **kwargs):
        calls["packed"] += 1
        return real_hidden(*args, **kwargs)

    shared = random_prompt(192, seed=40)
    prompts = {"long": shared + random_prompt(20, seed=41), "hit": shared + random_prompt(9, seed=42),
               "short": random_prompt(30, seed=43)}
    model.hidden_states = counted_hidden
    try:
        for rid, p in prompts.items():  # one at a time: the hit finds the first one's blocks
            tokens, _ = run(engine, {rid: (p, SamplingParams(max_tokens=4, **GREEDY))})
            assert tokens[rid] == alone(model, p, 4), rid
    finally:
        del model.hidden_states
    assert calls["packed"] >= 1 and calls["piece"] >= 2, calls
