"""The HTTP layer's own logic, in process: stop-string matching and what happens when the engine fails.

The engine here is a scripted stand-in with the Engine interface (it replays a fixed text one byte-token per
step), so a failing step or a request finished with "error" can be provoked; the real engine is exercised by
test_server.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading

import pytest
from fastapi.testclient import TestClient

from kimi_linear.config import KimiLinearConfig
from kimi_linear.serve.api import ServerSettings, StopStringMatcher, create_app
from kimi_linear.serve.engine import EngineStats, QueueFullError, TokenEvent
from kimi_linear.tokenizer import ByteTokenizer

SCRIPT = "All happy families are alike; each unhappy family is unhappy in its own way."
FAIL_STEP, FAIL_REQUEST = 1, 2  # the first prompt token that makes step() raise / finishes with "error"


class ScriptedEngine:
    """Replays SCRIPT as byte tokens, one per step, for every request; prompt[1] selects a failure."""

    def __init__(self, config: KimiLinearConfig, max_queue: int = 8, script: str = SCRIPT):
        self.model_config = config
        self.script = script.encode()
        self.max_queue = max_queue
        self.lock = threading.Lock()
        self.requests: dict[str, list] = {}
        self.aborted: set[str] = set()
        self.generated = 0

    def add_request(self, request_id, prompt_ids, params):
        with self.lock:
            if len(self.requests) >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are waiting")
            self.requests[request_id] = [list(prompt_ids), params, 0]

    def abort(self, request_id):
        with self.lock:
            self.aborted.add(request_id)

    def has_unfinished(self):
        with self.lock:
            return bool(self.requests)

    def step(self):
        events = []
        with self.lock:
            for request_id in list(self.requests):
                prompt, params, n = self.requests[request_id]
                if request_id in self.aborted:
                    del self.requests[request_id]
                    events.append(TokenEvent(request_id, None, True, "abort", len(prompt), n))
                    continue
                if len(prompt) > 1 and prompt[1] == FAIL_STEP:
                    raise RuntimeError("scripted step failure")
                if len(prompt) > 1 and prompt[1] == FAIL_REQUEST:
                    del self.requests[request_id]
                    events.append(TokenEvent(request_id, None, True, "error", error="scripted request failure"))
                    continue
                token = self.script[n % len(self.script)]
                n += 1
                self.generated += 1
                self.requests[request_id][2] = n
                stop = token in params.stop_token_ids
                done = stop or n >= params.max_tokens
                if done:
                    del self.requests[request_id]
                scores = {}
                if params.logprobs is not None:  # scripted: the token scores -n / 100, its neighbours lower
                    top = ((token, -n / 100), (token + 1, -1 - n / 100), (token + 2, -2 - n / 100))
                    scores = dict(logprob=-n / 100, top_logprobs=top[: params.logprobs])
                if params.prompt_logprobs is not None and n == 1:  # scripted: prompt token j scores -j / 10
                    scores["prompt_logprobs"] = tuple((-j / 10, ((t, -j / 10),)[: params.prompt_logprobs])
                                                      for j, t in enumerate(prompt[1:], 1))
                reason = "stop" if stop else "length" if done else None
                events.append(TokenEvent(request_id, token, done, reason, len(prompt), n, **scores))
        return events

    def stats(self):
        with self.lock:
            n = len(self.requests)
        return EngineStats(waiting=0, running=n, num_slots=4, free_slots=4 - n, num_blocks=16, free_blocks=16,
                           prefix_cache_queries=0, prefix_cache_hits=0, generated_tokens_total=self.generated,
                           prompt_tokens_total=0, prefill_tokens_total=0, finished_requests_total=0)


@pytest.fixture
def client():
    config = KimiLinearConfig.from_preset("debug")
    engine = ScriptedEngine(config)
    app = create_app(engine, ByteTokenizer(config), ServerSettings(model_name="scripted", max_model_len=256))
    with TestClient(app) as c:
        yield c


def test_stop_string_matcher_cuts_at_the_first_match_however_the_text_is_split():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        found = [text.find(s) for s in stops if s in text]
        want = text[: min(found)] if found else text
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        matcher, out, matched = StopStringMatcher(stops), "", False
        for k, piece in enumerate(pieces):
            safe, matched = matcher.feed(piece, final=k == len(pieces) - 1)
            out += safe
            if matched:
                break
        assert out == want and matched == bool(found), (text, stops, pieces)


def test_completion_text_usage_and_stream(client):
    body = {"prompt": "Tolstoy", "max_tokens": 20, "temperature": 0}
    out = client.post("/v1/completions", json=body).json()
    assert out["choices"][0]["text"] == SCRIPT[:20] and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 8, "completion_tokens": 20, "total_tokens": 28,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    with client.stream("POST", "/v1/completions", json={**body, "stream": True, "stop": "families"}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert "families" not in "".join(lines) and '"finish_reason": "stop"' in lines[-2]


def test_chat_without_a_chat_template_is_a_clear_400(client):
    tokenizer = client.app.state.server.tokenizer
    if hasattr(tokenizer, "apply_chat_template"):
        pytest.skip("this tokenizer has a chat template")
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


def test_a_failing_step_fails_only_the_requests_in_flight(client):
    r = client.post("/v1/completions", json={"prompt": [256, FAIL_STEP, 3], "max_tokens": 5})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "scripted step failure" in r.json()["error"]["message"]
    # The engine thread lives on: the next request is served, and health is ok.
    out = client.post("/v1/completions", json={"prompt": "next", "max_tokens": 5}).json()
    assert out["choices"][0]["text"] == SCRIPT[:5]
    assert client.get("/health").json() == {"status": "ok"}
    assert "kimi_linear_engine_step_errors_total 1" in client.get("/metrics").text


def test_an_engine_that_is_not_alive_makes_health_and_requests_503():
    """An EngineProcess whose child died says so through ``alive`` and ``death``."""
    config = KimiLinearConfig.from_preset("debug")
    engine = ScriptedEngine(config)
    app = create_app(engine, ByteTokenizer(config), ServerSettings(model_name="scripted", max_model_len=256))
    with TestClient(app) as c:
        assert c.get("/health").json() == {"status": "ok"}
        engine.alive, engine.death = False, "the engine process died (killed by signal 9)"
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "engine stopped", "error": engine.death}
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def test_a_request_the_engine_finishes_with_error(client):
    r = client.post("/v1/completions", json={"prompt": [256, FAIL_REQUEST], "max_tokens": 5})
    assert r.status_code == 500 and "scripted request failure" in r.json()["error"]["message"]
    with client.stream("POST", "/v1/completions",
                       json={"prompt": [256, FAIL_REQUEST], "max_tokens": 5, "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line]
    assert "scripted request failure" in lines[-2] and '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
    assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_tokens_waiting_in_the_queue_come_out_as_one_piece():
    """A consumer that falls behind gets the backlog as one piece (text, ids, then the finish); a stop string
    spanning queued tokens still cuts the text at its start and aborts the request."""

    from kimi_linear.serve.api import Mailbox, Server

    class Connected:
        async def is_disconnected(self):
            return False

    config = KimiLinearConfig.from_preset("debug")
    server = Server(ScriptedEngine(config), ByteTokenizer(config), ServerSettings(model_name="s", max_model_len=64))
    text = b"happy families"

    async def drain(stops, backlog):
        queue = Mailbox()
        for i, t in enumerate(text[:backlog]):
            done = i == len(text) - 1
            queue.put(TokenEvent("r", t, done, "length" if done else None, 3, i + 1))
        return [p async for p in server.pieces(Connected(), "r", queue, [1, 2, 3], stops)]

    pieces = asyncio.run(drain([], len(text)))
    assert [(p.text, p.token_ids, p.finish_reason) for p in pieces] == [("happy families", list(text), "length")]
    assert pieces[0].usage["completion_tokens"] == len(text)
    pieces = asyncio.run(drain(["y fam"], len(text)))
    assert [(p.text, p.finish_reason) for p in pieces] == [("happ", "stop")]
    assert "r" in server.engine.aborted


def test_an_event_is_one_line_for_clients_that_split_on_unicode_line_ends():
    """U+0085, U+2028 and U+2029 are legal raw in JSON, but str.splitlines (httpx's iter_lines) ends lines there."""
    from httpx._decoders import LineDecoder

    from kimi_linear.serve.api import _sse

    text = "a\x85b\u2028c\u2029d\u00e9\u4e2d"
    lines = [line for line in LineDecoder().decode(_sse({"text": text})) if line]
    assert len(lines) == 1 and json.loads(lines[0][len("data: "):]) == {"text": text}
    assert "\u00e9\u4e2d" in lines[0]  # other non-ASCII text stays raw


def test_load_generator_lengths_and_percentiles():
    import numpy as np

    from kimi_linear.serve.loadgen import LengthDist, percentile

    rng = random.Random(1)
    assert {LengthDist.parse("7").sample(rng, 100) for _ in range(5)} == {7}
    draws = [LengthDist.parse("uniform:3:9").sample(rng, 100) for _ in range(500)]
    assert min(draws) == 3 and max(draws) == 9
    assert max(LengthDist.parse("exponential:50").sample(rng, 60) for _ in range(500)) == 60  # clipped
    assert min(LengthDist.parse("normal:2:10").sample(rng, 60) for _ in range(500)) == 1
    for bad in ("0", "uniform:5:2", "normal:3", "zipf:2", "x"):
        with pytest.raises(ValueError, match="distribution"):
            LengthDist.parse(bad)
    values = [rng.random() for _ in range(37)]
    for q in (0, 50, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([], 50) is None


def test_completion_logprobs_follow_the_text_streamed_or_not(client):
    body = {"prompt": "Tolstoy", "max_tokens": 12, "temperature": 0, "logprobs": 2}
    full = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = full["logprobs"]
    assert "".join(lp["tokens"]) == full["text"] == SCRIPT[:12]
    assert lp["token_logprobs"] == [-n / 100 for n in range(1, 13)]
    assert lp["text_offset"] == list(range(12))
    assert lp["top_logprobs"][0] == {SCRIPT[0]: -0.01, chr(ord(SCRIPT[0]) + 1): -1.01}
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert {k: sum((part[k] for part in streamed), []) for k in lp} == lp
    plain = client.post("/v1/completions", json={**body, "logprobs": None}).json()["choices"][0]
    assert plain["logprobs"] is None and plain["text"] == full["text"]


def test_completion_logprobs_stop_at_a_stop_string(client):
    out = client.post("/v1/completions", json={"prompt": "T", "max_tokens": 40, "temperature": 0, "logprobs": 0,
                                               "stop": "families"}).json()["choices"][0]
    assert out["text"] == "All happy " and out["finish_reason"] == "stop"
    # the tokens up to the one that completed the stop string, each with no alternatives
    assert "".join(out["logprobs"]["tokens"]).startswith(out["text"] + "famil")
    assert all(top == {} for top in out["logprobs"]["top_logprobs"])


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "logprobs": -1}, "logprobs"),
])
def test_completion_logprobs_out_of_range_get_400(client, body, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.json()


def test_chat_logprobs_format_and_their_checks(client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    out = client.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 1}).json()
    choice = out["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"] == SCRIPT[:5]
    assert content[0] == {"token": "A", "logprob": -0.01, "bytes": [65],
                          "top_logprobs": [{"token": "A", "logprob": -0.01, "bytes": [65]}]}
    plain = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert plain["logprobs"] is None
    r = client.post("/v1/chat/completions", json={**body, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = client.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_echo_returns_the_prompt_and_its_logprobs_first(client):
    """echo: the prompt's text leads the completion; with logprobs the prompt's tokens lead the token lists
    (the first with no log probability), as evaluation harnesses read them; max_tokens 0 returns the prompt alone."""
    body = {"prompt": "Tolstoy", "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 1}
    out = client.post("/v1/completions", json=body).json()
    choice = out["choices"][0]
    assert choice["text"] == "Tolstoy" + SCRIPT[:3]
    lp = choice["logprobs"]
    assert lp["tokens"] == ["", *"Tolstoy" + SCRIPT[:3]]  # BOS first: skipped in the text
    assert lp["token_logprobs"] == [None, *(-j / 10 for j in range(1, 8)), -0.01, -0.02, -0.03]
    assert lp["top_logprobs"][:2] == [None, {"T": -0.1}] and lp["text_offset"] == [0, *range(10)]
    assert out["usage"]["prompt_tokens"] == 8 and out["usage"]["completion_tokens"] == 3
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert {k: sum((part[k] for part in streamed), []) for k in lp} == lp
    alone = client.post("/v1/completions", json={**body, "max_tokens": 0}).json()
    assert alone["choices"][0]["text"] == "Tolstoy" and alone["usage"]["completion_tokens"] == 0
    assert alone["choices"][0]["logprobs"]["tokens"] == ["", *"Tolstoy"]
    assert alone["choices"][0]["finish_reason"] == "length"
    plain = client.post("/v1/completions", json={**body, "logprobs": None}).json()["choices"][0]
    assert plain["text"] == choice["text"] and plain["logprobs"] is None
    r = client.post("/v1/completions", json={"prompt": "T", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


TOOL_REPLY = ('Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
              '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>\n')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_chat_tool_calls_are_parsed_streamed_or_not():
    config = KimiLinearConfig.from_preset("debug")
    app = create_app(ScriptedEngine(config, script=TOOL_REPLY), ByteTokenizer(config),
                     ServerSettings(model_name="scripted", max_model_len=512))
    body = {"messages": [{"role": "user", "content": "weather?"}], "max_tokens": 300, "temperature": 0,
            "tools": TOOLS, "tool_choice": "auto", "stop_token_ids": [10]}
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    with TestClient(app) as c:
        out = c.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert out["finish_reason"] == "tool_calls"
        assert out["message"] == {"role": "assistant", "content": "Checking.", "tool_calls": [call]}
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        deltas = [ch["choices"][0]["delta"] for ch in chunks]
        assert "".join(d.get("content") or "" for d in deltas) == "Checking."
        assert [t for d in deltas for t in d.get("tool_calls", [])] == [{"index": 0, **call}]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        raw = c.post("/v1/chat/completions", json={**body, "tool_choice": "none"}).json()["choices"][0]
        assert raw["message"]["content"] == TOOL_REPLY[:-1] and raw["finish_reason"] == "stop"
        bare = c.post("/v1/chat/completions", json={k: v for k, v in body.items() if k != "tools"}).json()
        assert "tool_calls" not in bare["choices"][0]["message"]
        r = c.post("/v1/chat/completions", json={**body, "tool_choice": "required"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_chat_n_choices_streamed_or_not_carry_their_index_and_summed_usage(client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0, "n": 2}
    out = client.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in out["choices"]] == [SCRIPT[:6]] * 2
    one = client.post("/v1/chat/completions", json={**body, "n": 1}).json()["usage"]
    assert out["usage"]["prompt_tokens"] == one["prompt_tokens"]  # the shared prompt counted once
    assert out["usage"]["completion_tokens"] == 2 * one["completion_tokens"] == 12
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=stream) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts, finished = {0: "", 1: ""}, {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                finished[choice["index"]] = choice["finish_reason"]
    assert texts == {0: SCRIPT[:6], 1: SCRIPT[:6]} and finished == {0: "length", 1: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == out["usage"]
    r = client.post("/v1/chat/completions", json={**body, "n": 65})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_penalties_are_taken_and_checked(client):
    body = {"prompt": "hi", "max_tokens": 3, "temperature": 0}
    for ok in (dict(presence_penalty=0.5), dict(frequency_penalty=-2), dict(repetition_penalty=1.3),
               dict(logit_bias={"65": 5, "66": -100})):
        assert client.post("/v1/completions", json={**body, **ok}).status_code == 200, ok
    for name, bad in (("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0),
                      ("logit_bias", {"65": 101}), ("logit_bias", {"x": 1}), ("logit_bias", {"-1": 1}),
                      ("logit_bias", {"100000": 1})):
        r = client.post("/v1/completions", json={**body, name: bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == name


def test_tokenize_and_detokenize(client):
    tokenizer = client.app.state.server.tokenizer
    out = client.post("/tokenize", json={"prompt": "héllo"}).json()
    expected = [tokenizer.bos_token_id, *tokenizer.encode("héllo")]  # what a completion request would run
    assert out == {"count": len(expected), "max_model_len": 256, "tokens": expected}
    assert client.post("/tokenize", json={"prompt": [5, 6, 7]}).json()["tokens"] == [5, 6, 7]
    messages = [{"role": "user", "content": "hi"}]
    chat = client.post("/tokenize", json={"messages": messages})
    if chat.status_code == 200:  # the chat request's own prompt
        assert chat.json()["tokens"] == list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    else:
        assert chat.status_code == 400 and "chat template" in chat.json()["error"]["message"]
    for bad in ({}, {"prompt": "a", "messages": messages}):
        assert client.post("/tokenize", json=bad).status_code == 400
    r = client.post("/tokenize", json={"prompt": "a", "model": "other"})
    assert r.status_code == 404
    back = client.post("/detokenize", json={"tokens": expected}).json()["prompt"]
    assert back == tokenizer.decode(expected, skip_special_tokens=False) and back.endswith("héllo")
    r = client.post("/detokenize", json={"tokens": [1, 10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_an_api_key_guards_the_v1_routes_but_not_health_or_metrics():
    config = KimiLinearConfig.from_preset("debug")
    app = create_app(ScriptedEngine(config), ByteTokenizer(config),
                     ServerSettings(model_name="scripted", max_model_len=256, api_key="sekrit"))
    body = {"prompt": "hi", "max_tokens": 3, "temperature": 0}
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"},
                        {"Authorization": "Basic sekrit"}):
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
        r = c.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 401  # refused before the body is read
        assert c.get("/v1/models").status_code == 401
        assert c.post("/tokenize", json={"prompt": "hi"}).status_code == 401
        ok = {"Authorization": "Bearer sekrit"}
        assert c.get("/v1/models", headers=ok).json()["data"][0]["id"] == "scripted"
        assert c.post("/v1/completions", json=body, headers=ok).json()["choices"][0]["text"] == SCRIPT[:3]
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=ok) as r:
            text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                           if line.startswith("data: {"))
        assert text == SCRIPT[:3]
        assert c.get("/health").status_code == 200
        metrics = c.get("/metrics").text
        assert 'kimi_linear_requests_rejected_total{reason="unauthorized"} 7' in metrics


def test_mailbox_wait_wakes_on_put_and_times_out_without_one():
    from kimi_linear.serve.api import Mailbox

    async def scenario():
        box = Mailbox()
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert not await box.wait(0.05) and loop.time() - start >= 0.04  # nothing came
        loop.call_later(0.01, box.put, TokenEvent("r", 7, False, None))
        assert await box.wait(5.0) and loop.time() - start < 2.0  # woken by the put, not the timer
        assert box.get_nowait().token_id == 7 and box.empty()
        box.put(TokenEvent("r", 8, True, "length"))
        assert await box.wait(5.0)  # already there: no wait
        waiter = asyncio.ensure_future(box.wait(5.0))
        await asyncio.sleep(0)
        waiter.cancel()  # a handler cancelled mid-wait (client gone) leaves the box usable
        assert box.get_nowait().token_id == 8
        await asyncio.gather(waiter, return_exceptions=True)
        box.put(TokenEvent("r", 9, True, "length"))
        assert await box.wait(0.01) and box.get_nowait().token_id == 9

    asyncio.run(scenario())
