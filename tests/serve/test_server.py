"""`kimi-linear serve` as a real process on 127.0.0.1, driven by the official `openai` client and raw HTTP.

The reference for every greedy completion is ``generate()`` on the same prompt alone, in this process.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from kimi_linear.cli import main
from kimi_linear.generate import generate
from kimi_linear.tokenizer import ByteTokenizer, load_tokenizer
from tests.serve.conftest import ServerProcess

BOS = 256


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    # Fewer slots than concurrent requests, so requests also wait in the queue and join as others leave.
    proc = ServerProcess(tiny_checkpoint, "--max-num-seqs", "6", "--max-model-len", "512",
                         log_dir=tmp_path_factory.mktemp("server-logs")).start()
    yield proc
    proc.kill()


def reference(model, prompt: list[int], max_tokens: int, **kwargs) -> list[int]:
    with torch.no_grad():
        return generate(model, [prompt], max_new_tokens=max_tokens, temperature=0.0, **kwargs)[0]


def text_of(tokens: list[int], model) -> str:
    """The served text of a token sequence: a final stop (EOS) token is not part of it."""
    if tokens and tokens[-1] == model.config.eos_token_id:
        tokens = tokens[:-1]
    return ByteTokenizer(model.config).decode(tokens)


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [BOS] + [rng.randrange(32, 127) for _ in range(length - 1)]


def stream_raw(url: str, body: dict, timeout: float = 60.0) -> tuple[list[dict], bool]:
    """POST a streaming request; returns the parsed data chunks and whether ``[DONE]`` ended them."""
    chunks, done = [], False
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            if line == "data: [DONE]":
                done = True
                break
            chunks.append(json.loads(line[len("data: "):]))
    return chunks, done


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60.0)


def test_models_health_and_metrics(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny-kimi"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    metrics = server.metrics()
    for name in ("requests_waiting", "requests_running", "generation_tokens_per_second", "cache_usage_ratio",
                 "prefix_cache_hit_rate", "state_slots_free", "prefill_tokens_total", "engine_steps_total",
                 "engine_prefill_steps_total", "engine_step_seconds_total"):
        assert f"kimi_linear_{name}" in metrics
    assert metrics["kimi_linear_state_slots"] == 6


def test_concurrent_greedy_completions_equal_generate_alone(server, tiny_model):
    """12 requests of different prompt and output lengths, started at staggered times through 6 slots:
    each one's tokens equal generate() on its prompt alone."""
    rng = random.Random(7)
    jobs = [(random_prompt(rng, rng.randint(1, 150)), rng.randint(1, 40)) for _ in range(12)]
    jobs[0] = ([BOS], 25)  # a one-token prompt
    expected = [reference(tiny_model, p, n) for p, n in jobs]
    oai = client(server)

    def run(i: int):
        prompt, max_tokens = jobs[i]
        time.sleep(0.03 * i)
        if i % 3 == 0:  # the openai client, non-streaming
            out = oai.completions.create(model="tiny-kimi", prompt=prompt, max_tokens=max_tokens,
                                         temperature=0, extra_body={"return_token_ids": True})
            return out.choices[0].text, out.choices[0].model_extra["token_ids"], out.usage
        if i % 3 == 1:  # the openai client, streaming
            text = ""
            for chunk in oai.completions.create(model="tiny-kimi", prompt=prompt, max_tokens=max_tokens,
                                                temperature=0, stream=True):
                text += chunk.choices[0].text if chunk.choices else ""
            return text, None, None
        chunks, done = stream_raw(server.url, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                               "return_token_ids": True, "stream_options": {"include_usage": True}})
        assert done
        ids = [t for c in chunks for ch in c["choices"] for t in ch["token_ids"]]
        return "".join(ch["text"] for c in chunks for ch in c["choices"]), ids, chunks[-1]["usage"]

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, range(len(jobs))))
    for i, ((prompt, max_tokens), want, (text, ids, usage)) in enumerate(zip(jobs, expected, results)):
        assert text == text_of(want, tiny_model), f"request {i}"
        if ids is not None:
            assert ids == want, f"request {i}"
        if usage is not None:
            usage = usage if isinstance(usage, dict) else usage.model_dump()
            assert usage["prompt_tokens"] == len(prompt) and usage["completion_tokens"] == len(want)
            assert usage["total_tokens"] == len(prompt) + len(want)


def test_streaming_concatenates_to_the_non_streaming_text(server, tiny_model):
    oai = client(server)
    prompt = "The quick brown fox"
    ids = [BOS, *prompt.encode()]
    want = text_of(reference(tiny_model, ids, 30), tiny_model)
    full = oai.completions.create(model="tiny-kimi", prompt=prompt, max_tokens=30, temperature=0)
    pieces = [c.choices[0].text for c in oai.completions.create(
        model="tiny-kimi", prompt=prompt, max_tokens=30, temperature=0, stream=True) if c.choices]
    assert full.choices[0].text == want and "".join(pieces) == want
    assert len([p for p in pieces if p]) > 1, "the text was not streamed in pieces"
    assert full.usage.prompt_tokens == len(ids)


def test_stop_strings_and_stop_token_ids(server, tiny_model):
    """A stop string cuts the text before it (streamed or not); a stop id ends the request at that token."""
    rng = random.Random(11)
    prompt = random_prompt(rng, 40)
    tokens = reference(tiny_model, prompt, 40)
    text = text_of(tokens, tiny_model)
    assert len(text) > 12 and tokens[-1] != tiny_model.config.eos_token_id
    stop = text[8:11]
    cut = text[: text.index(stop)]
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "stop": ["\x00never", stop]}
    out = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    assert out["choices"][0]["text"] == cut and out["choices"][0]["finish_reason"] == "stop"
    chunks, done = stream_raw(server.url, body)
    assert done and "".join(c["choices"][0]["text"] for c in chunks) == cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    # A stop id: generation ends at its first occurrence, and the token is not in the text.
    k = next(i for i, t in enumerate(tokens) if i >= 3 and t not in tokens[:i])
    want = reference(tiny_model, prompt, 40, stop_tokens=[tokens[k], tiny_model.config.eos_token_id])
    assert want == tokens[: k + 1]
    out = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": 40, "temperature": 0, "stop_token_ids": [tokens[k]],
        "return_token_ids": True}).json()
    assert out["choices"][0]["token_ids"] == want and out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["text"] == ByteTokenizer(tiny_model.config).decode(tokens[:k])


def model_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits for each completion token, from one forward of prompt + completion."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1)


def test_completion_logprobs_are_the_models(server, tiny_model):
    """The openai client's ``logprobs=3``: each token's logprob and its 3 alternatives are log_softmax of the
    model's logits on prompt + completion (the greedy token is the first alternative); streamed the same."""
    prompt = [BOS, *b"Once upon a time"]
    want = reference(tiny_model, prompt, 12, stop_tokens=[])
    lp = model_logprobs(tiny_model, prompt, want)
    oai = client(server)
    out = oai.completions.create(model="tiny-kimi", prompt=prompt, max_tokens=12, temperature=0, logprobs=3,
                                 extra_body={"ignore_eos": True})
    got = out.choices[0].logprobs
    assert out.choices[0].text == text_of(want, tiny_model)
    assert len(got.token_logprobs) == 12
    for j, token in enumerate(want):
        assert abs(got.token_logprobs[j] - lp[j, token].item()) < 1e-4, j
        values = lp[j].topk(3).values.tolist()
        top = got.top_logprobs[j]  # {text: logprob}: two byte tokens may share a text (U+FFFD), so one key
        assert 1 <= len(top) <= 3 and all(min(abs(v - w) for w in values) < 1e-4 for v in top.values())
        assert max(top.values()) == pytest.approx(values[0], abs=1e-4) == got.token_logprobs[j]
    streamed = [c.choices[0].logprobs for c in oai.completions.create(
        model="tiny-kimi", prompt=prompt, max_tokens=12, temperature=0, logprobs=3, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert sum((s.token_logprobs for s in streamed), []) == got.token_logprobs


def test_echo_scores_a_text_as_evaluation_harnesses_ask(server, tiny_model):
    """A loglikelihood request as lm-evaluation-harness sends it (token prompt, ``echo``, ``logprobs`` 1,
    ``max_tokens`` 1 or 0): each prompt token after the first gets log_softmax of the model's logits on the
    prompt, and the greedy check (is each token the likeliest?) reads the top alternative; a second scoring of the
    same prompt (prefix cached by then) gives the same numbers."""
    prompt = [BOS, *b"A long time ago in a galaxy far, far away. " * 4]  # 173 tokens: two full cache blocks
    want = model_logprobs(tiny_model, prompt[:1], prompt[1:])
    oai = client(server)
    for max_tokens in (1, 0, 1):
        out = oai.completions.create(model="tiny-kimi", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     echo=True, logprobs=1)
        lp = out.choices[0].logprobs
        assert len(lp.token_logprobs) == len(prompt) + max_tokens and lp.token_logprobs[0] is None
        assert out.choices[0].text.startswith(prompt_text := bytes(prompt[1:]).decode())
        assert "".join(lp.tokens[: len(prompt)]) == prompt_text
        for j in range(1, len(prompt)):
            assert abs(lp.token_logprobs[j] - want[j - 1, prompt[j]].item()) < 1e-4, j
            greedy = want[j - 1].argmax().item()
            assert next(iter(lp.top_logprobs[j].values())) == pytest.approx(want[j - 1, greedy].item(), abs=1e-4)
        assert out.usage.completion_tokens == max_tokens


def test_chat_completions_equal_generate_alone_with_logprobs(server, tiny_model, tiny_checkpoint):
    """/v1/chat/completions through the openai client: the checkpoint's chat template renders the conversation,
    the greedy reply equals generate() on the rendered prompt alone (streamed too), and ``logprobs`` /
    ``top_logprobs`` give each reply token's log probability with its exact bytes."""
    tokenizer = load_tokenizer(tiny_checkpoint, tiny_model.config)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "and now?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    want = reference(tiny_model, prompt, 10, stop_tokens=list(tokenizer.stop_token_ids))
    reply = [t for t in want if t not in tokenizer.stop_token_ids]
    oai = client(server)
    out = oai.chat.completions.create(model="tiny-kimi", messages=messages, max_tokens=10, temperature=0,
                                      logprobs=True, top_logprobs=2)
    choice = out.choices[0]
    assert choice.message.content == tokenizer.decode(reply)
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == len(want)
    lp = model_logprobs(tiny_model, prompt, want)
    assert [bytes(e.bytes) for e in choice.logprobs.content] == [tokenizer.token_bytes(t) for t in reply]
    for j, e in enumerate(choice.logprobs.content):
        assert abs(e.logprob - lp[j, reply[j]].item()) < 1e-4, j
        assert [a.logprob for a in e.top_logprobs] == pytest.approx(lp[j].topk(2).values.tolist(), abs=1e-4)
    streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model="tiny-kimi", messages=messages, max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == choice.message.content


def test_seeded_sampling_repeats(server):
    body = {"prompt": "Once upon", "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 5,
            "return_token_ids": True, "ignore_eos": True}
    a, b = (httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json() for _ in range(2))
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
    assert len(a["choices"][0]["token_ids"]) == a["usage"]["completion_tokens"] > 0
    # n samples: sample j is the request with seed 5 + j; each prompt is counted once in the usage
    several = httpx.post(f"{server.url}/v1/completions", json={**body, "n": 3}, timeout=60).json()
    assert [c["index"] for c in several["choices"]] == [0, 1, 2]
    for j, choice in enumerate(several["choices"]):
        alone = httpx.post(f"{server.url}/v1/completions", json={**body, "seed": 5 + j}, timeout=60).json()
        assert choice["token_ids"] == alone["choices"][0]["token_ids"], j
    assert len({tuple(c["token_ids"]) for c in several["choices"]}) > 1
    assert several["usage"]["prompt_tokens"] == a["usage"]["prompt_tokens"]
    assert several["usage"]["completion_tokens"] == 36


def test_several_prompts_and_choices_in_one_request(server, tiny_model):
    """Three prompts (texts and token lists) x n = 2 greedy choices in one completions request, and streamed:
    choice k answers prompt k // 2 and equals generate() on it alone; usage counts each prompt once."""
    rng = random.Random(3)
    prompts = [random_prompt(rng, 30), random_prompt(rng, 90), random_prompt(rng, 5)]
    want = [text_of(reference(tiny_model, p, 10), tiny_model) for p in prompts]
    body = {"prompt": prompts, "n": 2, "max_tokens": 10, "temperature": 0}
    out = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in out["choices"]] == [w for w in want for _ in range(2)]
    assert [c["index"] for c in out["choices"]] == list(range(6))
    assert out["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    chunks, done = stream_raw(server.url, {**body, "stream_options": {"include_usage": True}})
    usage = chunks[-1]["usage"]  # the prompts' first blocks are cached by now
    assert done and [usage[k] for k in ("prompt_tokens", "completion_tokens")] == [out["usage"]["prompt_tokens"], 60]
    texts = [""] * 6
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in out["choices"]]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "max_tokens": 4, "bogus": 1}, "bogus"),
        ({"prompt": "hi", "temperature": -0.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "top_k": -1}, "top_k"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "n": 65}, "n"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"prompt": "x" * 600, "max_tokens": 4}, "prompt"),  # over --max-model-len 512
        ({"prompt": "hi", "max_tokens": 600}, "max_tokens"),
        ({"prompt": [1, 2, 99999]}, "prompt"),
        ({"prompt": ["a", "b"], "n": 33}, "prompt"),  # 66 completions in one request
        ({"prompt": []}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
    ],
    ids=["unknown-field", "temperature", "top_p-0", "top_p-1.5", "top_k", "max_tokens-0", "n-65", "empty-stop",
         "prompt-over-context", "max_tokens-over-context", "id-outside-vocab", "prompts-x-n", "empty-prompt",
         "no-prompt"],
)
def test_invalid_requests_get_400_with_an_openai_error_body(server, body, param):
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert param in (err["param"] or "") or param in err["message"]


def test_bad_json_unknown_model_and_client_errors(server):
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "hi",', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "gpt-4", "prompt": "hi"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client(server).completions.create(model="tiny-kimi", prompt="hi", temperature=-1)
    # The server still serves after all of that.
    assert client(server).completions.create(model="tiny-kimi", prompt="hi", max_tokens=2).usage.completion_tokens


def test_disconnect_mid_stream_frees_the_slot(server):
    before = server.metrics()
    body = {"prompt": "a long one", "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.metrics()["kimi_linear_requests_running"] >= 1
    # The connection is closed: the request is aborted at the engine's next step.
    deadline = time.monotonic() + 20
    while True:
        m = server.metrics()
        if m["kimi_linear_requests_running"] == 0 and m["kimi_linear_state_slots_free"] == 6:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    generated = m["kimi_linear_generation_tokens_total"] - before["kimi_linear_generation_tokens_total"]
    assert 1 <= generated < 480


def test_bench_serve_reports_throughput_and_latency(server, tmp_path, capsys):
    path = tmp_path / "report.json"
    rc = main(["bench-serve", "--url", server.url, "--num-clients", "3", "--num-requests", "6",
               "--prompt-len", "uniform:5:40", "--output-len", "8", "--json", str(path)])
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert rc == 0 and report["num_ok"] == 6 and report["output_tokens"] == 6 * 8
    assert report["output_tokens_per_s"] > 0 and 0 < report["ttft_p50_ms"] <= report["ttft_p99_ms"]
    assert report["tpot_p50_ms"] > 0 and "TTFT p50 / p99" in out
    assert report["client_cpu_s"] > 0 and report["client_cpu_share"] == report["client_cpu_s"] / report["duration_s"]
    assert "client CPU" in out


def test_prefix_cache_on_equals_off(server, start_server, tiny_model):
    """Prompts sharing a long prefix (a hit ending mid-block, a multi-turn continuation): the same greedy
    tokens with the prefix cache on (``server``) and off, equal to generate() alone; the on-server hits."""
    off = start_server("--max-num-seqs", "2", "--max-model-len", "512", "--no-prefix-caching")
    rng = random.Random(3)
    shared = random_prompt(rng, 200)
    turn1 = shared + [rng.randrange(32, 127) for _ in range(7)]
    prompts = [turn1, shared + [rng.randrange(32, 127) for _ in range(70)], shared[:150]]
    first = reference(tiny_model, turn1, 10)
    prompts.append(turn1 + first + [rng.randrange(32, 127) for _ in range(9)])  # the "next turn"
    before = server.metrics()
    for prompt in prompts:
        want = reference(tiny_model, prompt, 10)
        for s in (server, off):
            out = httpx.post(f"{s.url}/v1/completions", timeout=60, json={
                "prompt": prompt, "max_tokens": 10, "temperature": 0, "return_token_ids": True}).json()
            assert out["choices"][0]["token_ids"] == want, s.flags
    after = server.metrics()
    hits = after["kimi_linear_prefix_cache_hit_tokens_total"] - before["kimi_linear_prefix_cache_hit_tokens_total"]
    assert hits >= 128
    assert off.metrics()["kimi_linear_prefix_cache_hit_tokens_total"] == 0


def test_snapshot_interval_flag_lets_a_sharer_hit_where_no_piece_ended(start_server, tiny_model):
    """``--snapshot-interval 64``: a prompt sharing 100 tokens with an earlier one (whose pieces ended at 128 and
    160) starts from the snapshot its prefill left at 64, as ``usage`` reports, with generate()'s tokens."""
    s = start_server("--max-num-seqs", "2", "--max-model-len", "512", "--snapshot-interval", "64")
    rng = random.Random(5)
    shared = random_prompt(rng, 100)
    for tail, cached in ((60, 0), (40, 64)):
        prompt = shared + [rng.randrange(32, 127) for _ in range(tail)]
        out = httpx.post(f"{s.url}/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": 6, "temperature": 0, "return_token_ids": True}).json()
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
        assert out["choices"][0]["token_ids"] == reference(tiny_model, prompt, 6)


def test_queue_full_gets_429_and_sigkill_restart_serves_again(start_server, tiny_model, monkeypatch):
    server = start_server("--max-num-seqs", "1", "--max-queue", "1", "--max-model-len", "512")
    long_body = {"prompt": "busy", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**long_body, "stream": True},
                      timeout=60) as running:
        assert running.status_code == 200
        # Keep the line iterator referenced: closing it would close the connection.
        running_lines = running.iter_lines()
        assert next(running_lines).startswith("data: ")  # it holds the only slot
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**long_body, "stream": True},
                          timeout=60) as waiting:
            assert waiting.status_code == 200  # accepted: it waits in the queue
            r = httpx.post(f"{server.url}/v1/completions", json=long_body, timeout=60)
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                client(server).completions.create(model="tiny-kimi", prompt="x", max_tokens=2)
    assert server.metrics()['kimi_linear_requests_rejected_total{reason="queue_full"}'] == 2

    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    # The restart also requires an API key, given the way that keeps it out of the process list.
    monkeypatch.setenv("KIMI_LINEAR_API_KEY", "sekrit")
    restarted = start_server("--max-num-seqs", "1", "--max-queue", "1", "--max-model-len", "512",
                             port=server.port)
    with pytest.raises(openai.AuthenticationError):
        client(restarted).completions.create(model="tiny-kimi", prompt="abc", max_tokens=6, temperature=0)
    keyed = openai.OpenAI(base_url=f"{restarted.url}/v1", api_key="sekrit", max_retries=0, timeout=60.0)
    out = keyed.completions.create(model="tiny-kimi", prompt="abc", max_tokens=6, temperature=0)
    assert out.choices[0].text == text_of(reference(tiny_model, [BOS, *b"abc"], 6), tiny_model)


def test_sigterm_drains_running_requests_then_exits(start_server):
    server = start_server("--max-num-seqs", "2", "--max-model-len", "512", "--drain-timeout", "60")
    body = {"prompt": "drain me", "max_tokens": 120, "ignore_eos": True, "temperature": 0}
    result = {}

    def consume():
        result["chunks"], result["done"] = stream_raw(server.url, {**body, "stream_options": {"include_usage": True}})

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.monotonic() + 30
    while server.metrics()["kimi_linear_requests_running"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    reader.join(60)
    assert result["done"] and result["chunks"][-1]["usage"]["completion_tokens"] == 120
    assert server.proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-model-len", "100000"], "--max-model-len"),  # checked against config.json in this process
        (["--max-model-len", "512", "--num-blocks", "1"], "cannot hold one sequence"),  # the engine process's check
    ],
    ids=["context-over-the-model", "block-pool-too-small"],
)
def test_a_memory_budget_that_does_not_fit_is_a_clear_startup_error(tiny_checkpoint, capsys, flags, message):
    rc = main(["serve", "--checkpoint", str(tiny_checkpoint), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_a_dead_engine_process_fails_the_requests_in_flight_and_stops_the_server(start_server):
    server = start_server("--max-num-seqs", "2", "--max-model-len", "512")
    engine_pid = int(re.search(r"engine process (\d+)", server.log()).group(1))
    body = {"prompt": "doomed", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(engine_pid, signal.SIGKILL)
        rest = [line for line in lines if line]
    assert any('"error"' in line and "engine process died" in line for line in rest), rest[-3:]
    assert rest[-1] == "data: [DONE]"
    assert server.proc.wait(30) == 1
    assert "killed by signal 9" in server.log()
