"""The OpenAI-compatible HTTP server over an ``Engine`` (FastAPI on uvicorn).

* ``EngineLoop`` runs ``engine.step()`` in one background thread. Request handlers submit with
  ``EngineLoop.submit`` (``engine.add_request`` plus a per-request ``Mailbox``) and read that request's
  ``TokenEvent``s from the queue; a handler that stops early (client gone, stop string matched) calls
  ``EngineLoop.abort``, and the engine frees the slot at its next step. ``kimi-linear serve`` hands it an
  ``EngineProcess`` (``serve.engine_process``): the engine steps in a child process, ``step()`` only waits for
  that step's events, and this process's GIL is left to HTTP (an in-process ``Engine`` also works, as in the
  tests, but its Python then competes with the event loop for the GIL).
* ``create_app`` builds the FastAPI app: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the
  checkpoint's chat template), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).
  Streaming responses are server-sent events ending in ``data: [DONE]``; errors are OpenAI-style bodies
  ``{"error": {"message", "type", "param", "code"}}`` (400 invalid request, 404 unknown model or route, 429
  queue full, 500 engine error).

Text is produced here, not in the engine: tokens are detokenized incrementally (``StreamDecoder``, which
holds back incomplete UTF-8), a token that ended the request as a stop token (EOS, a ``stop_token_ids`` entry)
is not part of the text, and stop *strings* are matched on the text: the text is cut before the first match,
the request is aborted and finishes with ``"stop"``. While streaming, the last ``len(longest stop) - 1``
characters are held back until they can no longer start a match, so the streamed pieces always concatenate
to the non-streaming text.

Log probabilities (``logprobs`` on completions, ``logprobs`` / ``top_logprobs`` on chat) are the engine's: of the
model's own distribution, before temperature and top-k / top-p (``serve.engine``), for each token of the output
text (a stop token that ended the request is not in the text and has none); a token's text is its bytes decoded
with U+FFFD for incomplete UTF-8 (a special token the text skips, as BOS, is ""), so the tokens concatenate to
the text where it is valid UTF-8, and chat entries also give the exact ``bytes``. A completion with ``echo``
returns the prompt's text (its tokens decoded) before the completion, and with ``logprobs`` also those of the
prompt's tokens (None for the first), as evaluation harnesses read them; ``max_tokens`` 0 (with ``echo`` only)
returns the prompt alone.

A chat request with ``tools`` gets the reply's tool calls as ``message.tool_calls`` (streamed as ``tool_calls``
deltas, each call whole once complete) and ``finish_reason`` "tool_calls"; the text before them is the content
(``serve.tool_calls``). ``tool_choice`` "auto" and "none" (no parsing) are served; forcing a call is refused.

``POST /tokenize`` and ``POST /detokenize`` (as vLLM serves them) show a client the token ids the server would
run for a prompt or a conversation, and count them against ``max_model_len``.

With ``ServerSettings.api_key`` set, the ``/v1`` routes (and the two above) answer 401 unless the request carries
``Authorization: Bearer <key>`` (what the OpenAI clients send); ``/health`` and ``/metrics`` stay open for
probes and scrapers.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from kimi_linear.serve.engine import MAX_LOGPROBS, QueueFullError, SamplingParams, TokenEvent
from kimi_linear.serve.tool_calls import ToolCallParser
from kimi_linear.tokenizer import StreamDecoder

logger = logging.getLogger("kimi_linear.serve")

# How long a waiting handler sleeps on its queue before it checks whether its client is still connected.
DISCONNECT_POLL_S = 0.5
# Window of the tokens/s gauge.
RATE_WINDOW_S = 10.0


# ---- the engine thread --------------------------------------------------------------------------------------


class EngineLoop:
    """Runs ``engine.step()`` in one background thread and routes each ``TokenEvent`` to its request's queue.

    ``submit`` and ``abort`` are called from the asyncio event loop; everything the thread hands back goes
    through ``loop.call_soon_threadsafe``. If ``step()`` itself raises (a bug outside any one request, or an
    ``EngineProcess`` whose process died), every request in flight is finished with ``"error"`` and aborted, and
    the thread keeps serving new requests (none, once the engine is not ``alive``: they get 503).
    """

    def __init__(self, engine, idle_wait_s: float = 0.05):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, Mailbox]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._generated = 0
        self._rate_samples: collections.deque[tuple[float, int]] = collections.deque()
        self.step_errors = 0

    # -- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kimi-linear-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Abort what is left, stop the thread and wait for it (up to ``timeout_s``)."""
        with self._lock:
            pending = list(self._streams)
        for request_id in pending:
            self.engine.abort(request_id)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        """The thread runs and so does the engine (an ``EngineProcess`` whose process died is not alive)."""
        return (self._thread is not None and self._thread.is_alive() and not self._stop.is_set()
                and getattr(self.engine, "alive", True))

    # -- called from the event loop
    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Mailbox:
        """``engine.add_request`` and a ``Mailbox`` that receives the request's events; raises what it raises.

        An engine with ``add_request_future`` (``EngineProcess``) is awaited rather than waited for: its answer
        comes from another process between two of its steps, and the event loop serves the other requests
        meanwhile."""
        queue = Mailbox()
        with self._lock:
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        add_future = getattr(self.engine, "add_request_future", None)
        try:
            if add_future is None:
                self.engine.add_request(request_id, prompt_ids, params)
            else:
                await asyncio.wrap_future(add_future(request_id, prompt_ids, params))
        except BaseException as e:
            with self._lock:
                self._streams.pop(request_id, None)
            if isinstance(e, asyncio.CancelledError):  # the engine may have queued it: nobody would read it
                self.engine.abort(request_id)
            raise
        self._wake.set()
        return queue

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last ``RATE_WINDOW_S`` seconds."""
        now = time.monotonic()
        with self._lock:
            self._rate_samples.append((now, self._generated))
            self._trim_rate_samples(now)
            (t0, n0), (t1, n1) = self._rate_samples[0], self._rate_samples[-1]
        return (n1 - n0) / max(t1 - t0, 1e-3) if t1 > t0 else 0.0

    # -- the thread
    def _trim_rate_samples(self, now: float) -> None:
        # Keep one sample at or before the window's start so the rate covers the whole window.
        while len(self._rate_samples) > 1 and self._rate_samples[1][0] <= now - RATE_WINDOW_S:
            self._rate_samples.popleft()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished():
                if self._wake.wait(self.idle_wait_s):
                    self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - the server outlives a failing step
                logger.exception("engine step failed; finishing the requests in flight with an error")
                self.step_errors += 1
                self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                time.sleep(self.idle_wait_s)
                continue
            new_tokens = sum(ev.token_id is not None for ev in events)
            now = time.monotonic()
            with self._lock:
                self._generated += new_tokens
                self._rate_samples.append((now, self._generated))
                self._trim_rate_samples(now)
            self._deliver(events)

    def _deliver(self, events: list[TokenEvent]) -> None:
        """Hand a step's events to their requests' queues: one wake-up of each event loop per step, not one
        per token."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for event in events:
                target = self._streams.pop(event.request_id, None) if event.finished else self._streams.get(
                    event.request_id
                )
                if target is not None:
                    loop, queue = target
                    batches.setdefault(loop, []).append((queue, event))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the event loop has closed: the server is exiting
                pass

    def _fail_all(self, message: str) -> None:
        with self._lock:
            pending = list(self._streams)
        for request_id in pending:
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001
                logger.exception("abort of %s failed", request_id)
            self._deliver([TokenEvent(request_id, None, True, "error", error=message)])


def _put_all(batch: list[tuple[Mailbox, TokenEvent]]) -> None:
    for mailbox, event in batch:
        mailbox.put(event)


class Mailbox:
    """One request's events: the engine loop's deliveries (``put``, on the event loop) and its handler's reads.

    A wait with a timeout costs one future and one timer handle, where ``asyncio.wait_for`` on an
    ``asyncio.Queue``'s ``get`` builds a task per wait, paid once per streamed token by a handler that keeps up
    (the HTTP process's CPU time per token: ``python -m benchmarks serve_http``; benchmarks/RESULTS.md,
    Serving)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self):
        self._items: collections.deque[TokenEvent] = collections.deque()
        self._waiter: asyncio.Future | None = None

    def put(self, event: TokenEvent) -> None:
        self._items.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> TokenEvent:
        """The oldest event; IndexError if there is none."""
        return self._items.popleft()

    async def wait(self, timeout_s: float) -> bool:
        """Wait until an event is there (True) or ``timeout_s`` seconds have passed without one (False)."""
        if self._items:
            return True
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout_s, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        return bool(self._items)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


# ---- errors -----------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status_code, self.message, self.type, self.param, self.code = status_code, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})")
            continue
        where = ".".join(loc)
        param = param or (where or None)
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        else:
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request", param


# ---- request bodies -----------------------------------------------------------------------------------------


MAX_CHOICES = 64  # n, and prompts x n of one completions request: each is one engine request


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off (an extension of the OpenAI API)")
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, description="token ids that end the request (extension)")
    ignore_eos: bool = Field(False, description="do not stop at the model's EOS (extension)")
    return_token_ids: bool = Field(False, description="add the generated token ids to each choice (extension)")
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, description="1 = off (an extension of the OpenAI API)")
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(_Body):
    """``POST /tokenize``: a completion ``prompt`` (text or ids) or chat ``messages`` (with ``tools``), as the
    server would tokenize them for a request."""

    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` (token id as a string -> bias in [-100, 100]) as ``SamplingParams`` takes it."""
    if not bias:
        return ()
    if len(bias) > MAX_LOGIT_BIAS:
        raise APIError(400, f"logit_bias holds {len(bias)} entries, at most {MAX_LOGIT_BIAS}", param="logit_bias")
    out = []
    for key, value in bias.items():
        if not key.isdigit() or not -100 <= value <= 100:
            raise APIError(400, f"logit_bias maps token ids to a bias in [-100, 100], got {key!r}: {value!r}",
                           param="logit_bias")
        out.append((int(key), float(value)))
    return tuple(out)


def _check_unsupported(body: _SamplingFields) -> None:
    if isinstance(body, CompletionRequest):
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens=0 needs echo=true (a completion of no tokens)", param="max_tokens")
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of must equal n (no ranking of candidates)", param="best_of")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    if isinstance(body, ChatCompletionRequest) and body.tool_choice not in (None, "auto", "none"):
        raise APIError(400, "tool_choice must be 'auto' or 'none': forcing a tool call needs constrained decoding, "
                       "which this server does not do", param="tool_choice")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")


def _logprobs_wanted(body: _SamplingFields) -> int | None:
    """``SamplingParams.logprobs`` for a request: how many alternatives, or None for no log probabilities."""
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def _echoed(body: _SamplingFields) -> bool:
    return isinstance(body, CompletionRequest) and body.echo


def _parses_tool_calls(body: _SamplingFields) -> bool:
    return isinstance(body, ChatCompletionRequest) and bool(body.tools) and body.tool_choice != "none"


async def _with_tool_calls(pieces: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    """``pieces`` with the reply's tool calls split out of the text (``Piece.tool_calls``); a reply that made
    calls finishes with "tool_calls" where it would have finished with "stop"."""
    parser = ToolCallParser()
    try:
        async for piece in pieces:
            content, calls = parser.feed(piece.text)
            entries = [c.openai(parser.calls - len(calls) + i) for i, c in enumerate(calls)]
            reason = piece.finish_reason
            if reason is not None:
                content += parser.finish()
                if parser.calls and reason == "stop":
                    reason = "tool_calls"
            yield dataclasses.replace(piece, text=content, tool_calls=entries or None, finish_reason=reason)
    finally:
        await pieces.aclose()


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(s == "" for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return stops


# ---- text out -----------------------------------------------------------------------------------------------


class StopStringMatcher:
    """Cuts streamed text at the first occurrence of any stop string.

    ``feed(text)`` returns ``(safe_text, matched)``: ``safe_text`` can be sent now (it can no longer be part
    of a match); once ``matched``, it is everything before the match. ``final=True`` releases what is held.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        cut = len(buf) if final else max(0, len(buf) - self.hold)
        self.pending = buf[cut:]
        return buf[:cut], False


@dataclass
class Piece:
    """A piece of a request's text; the last one has ``finish_reason`` and ``usage``. ``logprobs``: the
    formatted log probabilities of its tokens (``Logprobs``), when the request asked for them."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: dict | None = None
    logprobs: dict | None = None
    tool_calls: list[dict] | None = None  # OpenAI entries completed in this piece (chat with tools)


class Logprobs:
    """A request's log probabilities in the OpenAI format, piece by piece. Completions: ``{"tokens",
    "token_logprobs", "top_logprobs" ([{token text: logprob}]), "text_offset"}``; chat: ``{"content": [{"token",
    "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self.offset = 0  # text offset of the next token (completions)
        self.entries: list[tuple[int, float, tuple]] = []

    def add(self, event: TokenEvent) -> None:
        self.entries.append((event.token_id, event.logprob, event.top_logprobs or ()))

    def add_prompt(self, prompt_ids: list[int], scores: tuple) -> None:
        """The prompt's tokens (``echo``): the first has no log probability, the others ``scores``
        (``TokenEvent.prompt_logprobs``)."""
        self.entries.append((prompt_ids[0], None, None))
        self.entries += [(t, lp, top) for t, (lp, top) in zip(prompt_ids[1:], scores, strict=True)]

    def _bytes(self, token: int) -> bytes:
        return self.tokenizer.token_bytes(token)  # as in the text: a skipped special token is b""

    def take(self) -> dict:
        """The entries added since the last ``take``, formatted."""
        entries, self.entries = self.entries, []
        if self.chat:
            def item(token, logprob):
                raw = self._bytes(token)
                return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

            return {"content": [{**item(t, lp), "top_logprobs": [item(a, v) for a, v in top]}
                                for t, lp, top in entries], "refusal": None}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, logprob, top in entries:
            text = self._bytes(token).decode("utf-8", errors="replace")
            out["tokens"].append(text)
            out["token_logprobs"].append(logprob)
            alternatives: dict[str, float] | None = None if top is None else {}
            for a, v in top or ():  # tokens of one text (U+FFFD for partial UTF-8) share a key: the likeliest stays
                alternatives.setdefault(self._bytes(a).decode("utf-8", errors="replace"), v)
            out["top_logprobs"].append(alternatives)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    @staticmethod
    def size(formatted: dict) -> int:
        """How many tokens a formatted piece holds."""
        return len(formatted["content"] if "content" in formatted else formatted["tokens"])

    @staticmethod
    def join(parts: list[dict]) -> dict | None:
        """One request's pieces' formatted log probabilities as one (the non-streaming response's)."""
        if not parts:
            return None
        out = {key: [] if key != "refusal" else None for key in parts[0]}
        for part in parts:
            for key, values in part.items():
                if key != "refusal":
                    out[key] += values
        return out


class RequestFailed(Exception):
    """The engine finished the request with "error"."""


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


# ---- the app ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    max_model_len: int
    drain_timeout_s: float = 30.0
    api_key: str | None = None  # when set, required as "Authorization: Bearer <key>" (_KEYED_PATHS)


class Server:
    """The request handling behind the routes (one per app)."""

    def __init__(self, engine, tokenizer, settings: ServerSettings):
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = settings
        self.loop = EngineLoop(engine)
        self.created = int(time.time())
        self.rejected = collections.Counter()

    # -- prompts
    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        """The request's prompts (one, or a list of texts or of token lists) as token ids."""
        prompt = body.prompt
        several = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
        prompts = prompt if several else [prompt]
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} completions exceed {MAX_CHOICES} a request",
                           param="prompt")
        return [self.prompt_ids(p) for p in prompts]

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """One completion prompt (text, or ids) as the token ids a request runs: BOS first where the tokenizer
        adds one; 400 if empty or outside the vocabulary."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if getattr(self.tokenizer, "add_bos", False) and self.tokenizer.bos_token_id is not None:
                ids = [self.tokenizer.bos_token_id, *ids]
        else:
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        vocab = self.engine.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:  # ints already (pydantic, the tokenizer): two C loops
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return ids

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(400, f"messages[{i}].content: only text parts are supported",
                                       param=f"messages.{i}.content")
                    texts.append(part["text"])
                content = "".join(texts)
            message = {"role": m.role, "content": content or ""}
            for key in ("name", "tool_calls", "tool_call_id"):
                if getattr(m, key) is not None:
                    message[key] = getattr(m, key)
            messages.append(message)
        if not hasattr(self.tokenizer, "apply_chat_template"):
            raise APIError(400, "this checkpoint's tokenizer has no chat template; use /v1/completions")
        try:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=body.tools))
        except Exception as e:  # noqa: BLE001 - a template that rejects the conversation (raise_exception)
            raise APIError(400, f"the chat template cannot render these messages: {type(e).__name__}: {e}",
                           param="messages") from None

    def sampling_params(self, body: _SamplingFields, prompt_ids: list[int], max_tokens: int | None,
                        default_stop_ids: tuple[int, ...] = (), sample: int = 0) -> SamplingParams:
        """The engine's settings for one completion; ``sample`` (0 .. n - 1) offsets the seed, so the n samples
        of a seeded request differ and repeat."""
        limit = self.settings.max_model_len
        if len(prompt_ids) >= limit:
            raise APIError(
                400, f"the prompt has {len(prompt_ids)} tokens; this server's context (--max-model-len) is "
                f"{limit}, which leaves no room for a completion", param="messages"
                if isinstance(body, ChatCompletionRequest) else "prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = limit - len(prompt_ids)
        if len(prompt_ids) + max_tokens > limit:
            raise APIError(
                400, f"the prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = "
                f"{len(prompt_ids) + max_tokens} exceeds this server's context (--max-model-len) of {limit}",
                param="max_tokens", code="context_length_exceeded")
        vocab = self.engine.model_config.vocab_size
        stop_ids = tuple(body.stop_token_ids or ())
        if any(not 0 <= t < vocab for t in stop_ids):
            raise APIError(400, f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        bias = _logit_bias(body.logit_bias)
        if any(t >= vocab for t, _ in bias):
            raise APIError(400, f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                seed=None if body.seed is None else body.seed + sample,
                stop_token_ids=tuple(dict.fromkeys(stop_ids + default_stop_ids)),
                ignore_eos=body.ignore_eos, logprobs=_logprobs_wanted(body),
                repetition_penalty=body.repetition_penalty, frequency_penalty=body.frequency_penalty,
                presence_penalty=body.presence_penalty, logit_bias=bias,
                prompt_logprobs=_logprobs_wanted(body) if _echoed(body) else None,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None

    # -- running a request
    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Mailbox:
        if not self.loop.alive:
            raise APIError(503, "the engine is not running", type="server_error")
        try:
            return await self.loop.submit(request_id, prompt_ids, params)
        except QueueFullError as e:
            self.rejected["queue_full"] += 1
            raise APIError(429, f"the server is busy: {e}", type="rate_limit_error", code="queue_full") from None
        except ValueError as e:
            self.rejected["invalid"] += 1
            raise APIError(400, str(e)) from None
        except RuntimeError as e:  # the engine's process died meanwhile
            raise APIError(503, f"the engine is not running: {e}", type="server_error") from None

    async def pieces(self, request: Request, request_id: str, queue: Mailbox, prompt_ids: list[int],
                     stops: list[str], logprobs: Logprobs | None = None, echo: bool = False,
                     completion: bool = True) -> AsyncIterator[Piece]:
        """The request's text as it is produced; aborts the request if the consumer stops early.

        Tokens that arrived while the consumer was busy (a slow client, a loaded server) come out as one piece,
        so the per-piece work does not grow with the backlog. The client's connection is checked while the
        request waits and at most every ``DISCONNECT_POLL_S`` while tokens flow, not once per token. With
        ``logprobs`` each piece carries those of its tokens; ``echo`` puts the prompt's text (and log
        probabilities) first; without ``completion`` the request's one generated token is dropped
        (``max_tokens`` 0)."""
        num_prompt = len(prompt_ids)
        decoder = StreamDecoder(self.tokenizer)
        matcher = StopStringMatcher(stops)
        completion_tokens = 0
        done = False
        text_parts: list[str] = [self.tokenizer.decode(prompt_ids)] if echo else []
        ids: list[int] = []
        next_poll = time.monotonic() + DISCONNECT_POLL_S
        try:
            while True:
                if queue.empty():
                    if text_parts or ids:  # the backlog is drained: hand it out as one piece
                        yield Piece("".join(text_parts), ids, logprobs=logprobs and logprobs.take())
                        text_parts, ids = [], []
                    if not await queue.wait(DISCONNECT_POLL_S):
                        if await request.is_disconnected():
                            return
                        continue
                event = queue.get_nowait()
                text = ""
                if echo and logprobs is not None and event.prompt_logprobs is not None:
                    logprobs.add_prompt(prompt_ids, event.prompt_logprobs)
                if not completion:
                    event = dataclasses.replace(event, token_id=None, completion_tokens=0, finish_reason=(
                        "length" if event.finish_reason == "stop" else event.finish_reason))
                if event.token_id is not None:
                    completion_tokens += 1
                    ids.append(event.token_id)
                    # A token that ended the request as a stop token is not part of the text.
                    if not (event.finished and event.finish_reason == "stop"):
                        text = decoder(event.token_id)
                        if logprobs is not None and event.logprob is not None:
                            logprobs.add(event)
                if event.finished:
                    text += decoder.flush()
                safe, matched = matcher.feed(text, final=event.finished)
                text_parts.append(safe)
                if matched:
                    self.loop.abort(request_id)
                    done = True
                    cached = await self._cached_tokens_after_abort(queue, event)
                    yield Piece("".join(text_parts), ids, "stop", _usage(num_prompt, completion_tokens, cached),
                                logprobs and logprobs.take())
                    return
                if event.finished:
                    done = True
                    if event.finish_reason == "error":
                        raise RequestFailed(event.error or "the engine failed on this request")
                    reason = "stop" if event.finish_reason in ("stop", "abort") else event.finish_reason
                    usage = _usage(event.prompt_tokens or num_prompt,
                                   event.completion_tokens or completion_tokens, event.cached_tokens)
                    yield Piece("".join(text_parts), ids, reason, usage, logprobs and logprobs.take())
                    return
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        return
        finally:
            if not done:
                self.loop.abort(request_id)

    async def _cached_tokens_after_abort(self, queue: Mailbox, event: TokenEvent) -> int:
        """The aborted request's finishing event carries its cached-prompt count; wait one step for it."""
        while not event.finished:
            if not await queue.wait(5.0):
                return 0
            event = queue.get_nowait()
        return event.cached_tokens

    # -- metrics
    def metrics_text(self) -> str:
        s = self.engine.stats()
        hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        cache_use = 1.0 - s.free_blocks / s.num_blocks if s.num_blocks else 0.0
        rows = [
            ("requests_waiting", "gauge", "Requests waiting for a state slot.", s.waiting),
            ("requests_running", "gauge", "Sequences holding a state slot (prefilling or decoding).", s.running),
            ("state_slots", "gauge", "KDA state slots (--max-num-seqs).", s.num_slots),
            ("state_slots_free", "gauge", "Free KDA state slots.", s.free_slots),
            ("cache_blocks", "gauge", "MLA latent cache blocks in the pool.", s.num_blocks),
            ("cache_blocks_free", "gauge", "Free MLA latent cache blocks.", s.free_blocks),
            ("cache_usage_ratio", "gauge", "Fraction of MLA latent cache blocks in use.", cache_use),
            ("prefix_cache_queried_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
             s.prefix_cache_queries),
            ("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
             s.prefix_cache_hits),
            ("prefix_cache_hit_rate", "gauge", "Prefix-cache hits / queries, in tokens.", hit_rate),
            ("generation_tokens_per_second", "gauge",
             f"Generated tokens per second over the last {RATE_WINDOW_S:g} s.", self.loop.tokens_per_second()),
            ("generation_tokens_total", "counter", "Generated tokens.", s.generated_tokens_total),
            ("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", s.prompt_tokens_total),
            ("prefill_tokens_total", "counter", "Prompt tokens computed by prefill (prefix-cache hits excluded).",
             s.prefill_tokens_total),
            ("requests_finished_total", "counter", "Finished requests.", s.finished_requests_total),
            ("engine_step_errors_total", "counter", "Engine steps that raised.", self.loop.step_errors),
            ("engine_steps_total", "counter", "Engine iterations that ran a forward.", s.steps_total),
            ("engine_prefill_steps_total", "counter", "Engine iterations that carried prefill pieces.",
             s.prefill_steps_total),
            ("engine_step_seconds_total", "counter", "Wall time inside the engine's iterations.",
             s.step_seconds_total),
        ]
        lines = []
        for name, kind, help_text, value in rows:
            full = f"kimi_linear_{name}"
            lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full} {_fmt(value)}"]
        full = "kimi_linear_requests_rejected_total"
        lines += [f"# HELP {full} Requests refused at submission.", f"# TYPE {full} counter"]
        for reason in ("queue_full", "invalid", "unauthorized"):
            lines.append(f'{full}{{reason="{reason}"}} {self.rejected[reason]}')
        return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


# Characters JSON leaves raw that str.splitlines (and so httpx's iter_lines) takes for line ends: escaped, so an
# event stays one line for such clients too.
_SPLITLINES_ESCAPES = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(payload: dict | str) -> str:
    if not isinstance(payload, str):
        payload = json.dumps(payload, ensure_ascii=False).translate(_SPLITLINES_ESCAPES)
    return f"data: {payload}\n\n"


def create_app(engine, tokenizer, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving ``engine`` (its ``step()`` loop runs while the app's lifespan is open).

    Args:
        engine: an ``Engine`` (kimi_linear.serve.engine), or anything with its interface.
        tokenizer: from ``kimi_linear.tokenizer.load_tokenizer`` (``encode``, ``token_bytes``; chat needs
            ``apply_chat_template``).
        settings: the served model's name and context (``max_model_len`` of the engine's config).
    """
    server = Server(engine, tokenizer, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    app = FastAPI(title="kimi-linear", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    if settings.api_key is not None:
        app.add_middleware(_APIKeyMiddleware, key=settings.api_key, rejected=server.rejected)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        server.rejected["invalid"] += 1
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error in %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {settings.model_name!r}",
                           type="not_found_error", param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        if not server.loop.alive:
            death = getattr(engine, "death", None)  # an EngineProcess's child that died
            return JSONResponse({"status": "engine stopped", **({"error": death} if death else {})},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": settings.model_name, "object": "model", "created": server.created,
                      "owned_by": "kimi-linear", "max_model_len": settings.max_model_len}],
        }

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        ids = server.chat_prompt(body) if body.messages is not None else server.prompt_ids(body.prompt)
        return {"count": len(ids), "max_model_len": settings.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        vocab = engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    async def respond(request: Request, body: _SamplingFields, chat: bool) -> Response:
        check_model(body.model)
        _check_unsupported(body)
        stops = _stop_strings(body.stop)
        if chat:
            prompts = [server.chat_prompt(body)]
            max_tokens = body.max_completion_tokens or body.max_tokens
            default_stop_ids = tuple(getattr(tokenizer, "stop_token_ids", ()) or ())
        else:
            prompts = server.completion_prompts(body)
            max_tokens = 16 if body.max_tokens is None else body.max_tokens
            default_stop_ids = ()
        # max_tokens 0 (echo only): the engine runs the prompt and chooses one token, which is dropped
        jobs = [(p, server.sampling_params(body, p, max(max_tokens, 1), default_stop_ids, sample=j))
                for p in prompts for j in range(body.n)]  # choice k = prompt k // n, sample k % n
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        ids = [request_id] if len(jobs) == 1 else [f"{request_id}-{k}" for k in range(len(jobs))]
        queues = []
        try:
            for rid, (prompt_ids, params) in zip(ids, jobs, strict=True):
                queues.append(await server.submit(rid, prompt_ids, params))
        except BaseException:
            for rid in ids[: len(queues)]:
                server.loop.abort(rid)
            raise
        choices = []
        for rid, queue, (prompt_ids, params) in zip(ids, queues, jobs, strict=True):
            logprobs = Logprobs(tokenizer, chat) if params.logprobs is not None else None
            pieces = server.pieces(request, rid, queue, prompt_ids, stops, logprobs, echo=_echoed(body),
                                   completion=max_tokens != 0)
            choices.append(_with_tool_calls(pieces) if _parses_tool_calls(body) else pieces)
        head = {"id": request_id, "created": int(time.time()), "model": settings.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _event_stream(head, choices, body.n, chat, include_usage, body.return_token_ids)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        tasks = [asyncio.ensure_future(_collect(pieces)) for pieces in choices]
        try:
            results = await asyncio.gather(*tasks)
        except RequestFailed as e:
            raise APIError(500, str(e), type="server_error") from None
        finally:  # a failed choice ends the others (their pieces abort their requests)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if any(last is None or last.finish_reason is None for *_, last in results):  # the client went away
            return Response(status_code=499)
        out = [_choice(chat, text, last.finish_reason, token_ids if body.return_token_ids else None, delta=False,
                       logprobs=scores, tool_calls=calls, index=k)
               for k, (text, token_ids, scores, calls, last) in enumerate(results)]
        kind = "chat.completion" if chat else "text_completion"
        usage = _total_usage([last.usage for *_, last in results], body.n)
        return JSONResponse({**head, "object": kind, "choices": out, "usage": usage})

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await respond(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await respond(request, body, chat=True)

    return app


_KEYED_PATHS = ("/v1/", "/tokenize", "/detokenize")  # what an API key guards


class _APIKeyMiddleware:
    """Answers 401 to a request of ``_KEYED_PATHS`` without ``Authorization: Bearer <key>``, before its body is
    read. Plain ASGI: the streamed responses of the requests let through pass untouched."""

    def __init__(self, app, key: str, rejected: collections.Counter):
        self.app, self.key, self.rejected = app, key.encode(), rejected

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(_KEYED_PATHS):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            # compare_digest: the time taken does not tell how much of a wrong key was right
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), self.key):
                self.rejected["unauthorized"] += 1
                error = APIError(401, "missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _collect(pieces: AsyncIterator[Piece]) -> tuple:
    """One choice's pieces gathered: ``(text, token ids, logprobs, tool calls, last piece or None)``."""
    texts, ids, scores, calls, last = [], [], [], [], None
    async for piece in pieces:
        texts.append(piece.text)
        ids += piece.token_ids
        last = piece
        if piece.logprobs is not None:
            scores.append(piece.logprobs)
        calls += piece.tool_calls or []
    return "".join(texts), ids, Logprobs.join(scores), calls, last


def _total_usage(usages: list[dict], n: int) -> dict:
    """The usage of a request's choices together: each prompt counted once (choices k // n share prompt k)."""
    prompt = sum(u["prompt_tokens"] for u in usages[::n])
    completion = sum(u["completion_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages[::n])
    return _usage(prompt, completion, cached)


def _choice(chat: bool, text: str, finish_reason: str | None, token_ids: list[int] | None, delta: bool,
            first: bool = False, logprobs: dict | None = None, tool_calls: list[dict] | None = None,
            index: int = 0) -> dict:
    if not chat:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    elif delta:
        content = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice = {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        message = {"role": "assistant", "content": text}
        if tool_calls:
            message = {"role": "assistant", "content": text or None,
                       "tool_calls": [{k: v for k, v in call.items() if k != "index"} for call in tool_calls]}
        choice = {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    if delta and tool_calls:
        choice["delta"]["tool_calls"] = tool_calls
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


async def _merged(choices: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece | Exception | None]]:
    """The choices' pieces as they come, as ``(choice index, piece)``; ``(index, None)`` when a choice ends and
    ``(index, RequestFailed)`` if it fails. Closing this generator stops (and so aborts) what is left."""
    if len(choices) == 1:  # no task per choice for the common case
        try:
            async for piece in choices[0]:
                yield 0, piece
        except RequestFailed as e:
            yield 0, e
        yield 0, None
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, pieces: AsyncIterator[Piece]) -> None:
        try:
            async for piece in pieces:
                await queue.put((k, piece))
        except RequestFailed as e:
            await queue.put((k, e))
        await queue.put((k, None))

    tasks = [asyncio.create_task(pump(k, pieces)) for k, pieces in enumerate(choices)]
    try:
        running = len(choices)
        while running:
            k, item = await queue.get()
            yield k, item
            running -= item is None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _event_stream(head: dict, choices: list[AsyncIterator[Piece]], n: int, chat: bool, include_usage: bool,
                        return_token_ids: bool):
    """Server-sent events of one request: a chunk per piece of text of each choice (its ``index``), each one's
    finish reason, optionally the usage of all, then ``[DONE]`` (an engine error becomes an error event before
    ``[DONE]``, and ends the other choices)."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    usage_field = {"usage": None} if include_usage else {}
    if chat:
        first = [_choice(chat, "", None, [] if return_token_ids else None, delta=True, first=True, index=k)
                 for k in range(len(choices))]
        yield _sse({**head, "choices": first, **usage_field})
    usages: dict[int, dict] = {}
    items = _merged(choices)
    try:
        async for k, piece in items:
            if isinstance(piece, RequestFailed):
                yield _sse(APIError(500, str(piece), type="server_error").body())
                break
            if piece is None:
                continue
            scored = piece.logprobs is not None and Logprobs.size(piece.logprobs) > 0
            if (piece.text or piece.finish_reason or (return_token_ids and piece.token_ids) or scored
                    or piece.tool_calls):
                choice = _choice(chat, piece.text, piece.finish_reason, piece.token_ids if return_token_ids else None,
                                 delta=True, logprobs=piece.logprobs, tool_calls=piece.tool_calls, index=k)
                yield _sse({**head, "choices": [choice], **usage_field})
            if piece.finish_reason:
                usages[k] = piece.usage
        else:
            if include_usage and len(usages) == len(choices):
                yield _sse({**head, "choices": [], "usage": _total_usage([usages[k] for k in sorted(usages)], n)})
    finally:
        await items.aclose()
        for pieces in choices:
            await pieces.aclose()
    yield _sse("[DONE]")
