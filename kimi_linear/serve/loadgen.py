"""A load generator for an OpenAI-compatible completions server (``kimi-linear bench-serve``).

``num_clients`` concurrent clients send ``num_requests`` streaming ``/v1/completions`` requests in total, each
with a prompt of random token ids and an output length drawn from length distributions (``LengthDist``);
``ignore_eos`` makes every request produce exactly its output length. Per request it records the time to the
first streamed text (TTFT), the mean time per output token after the first (TPOT) and the output tokens
(from the ``usage`` the server reports). ``summarize`` turns those into throughput and p50/p99 latencies.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field

import httpx

DIST_KINDS = ("fixed", "uniform", "normal", "exponential")


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts, written ``N`` (fixed), ``uniform:LO:HI`` (inclusive),
    ``normal:MEAN:STD`` or ``exponential:MEAN``; draws are rounded and clipped to ``[1, max]``."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        """Raises ValueError on a malformed spec, naming it."""
        parts = spec.strip().split(":")
        try:
            if len(parts) == 1:
                dist = cls("fixed", int(parts[0]))
            elif parts[0] == "uniform" and len(parts) == 3:
                dist = cls("uniform", int(parts[1]), int(parts[2]))
            elif parts[0] == "normal" and len(parts) == 3:
                dist = cls("normal", float(parts[1]), float(parts[2]))
            elif parts[0] == "exponential" and len(parts) == 2:
                dist = cls("exponential", float(parts[1]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"bad length distribution {spec!r}: use N, uniform:LO:HI, normal:MEAN:STD or exponential:MEAN"
            ) from None
        if dist.a < 1 or (dist.kind == "uniform" and dist.b < dist.a) or (dist.kind == "normal" and dist.b < 0):
            raise ValueError(f"bad length distribution {spec!r}: lengths must be >= 1 (and LO <= HI, STD >= 0)")
        return dist

    def sample(self, rng: random.Random, maximum: int) -> int:
        if self.kind == "fixed":
            n = self.a
        elif self.kind == "uniform":
            n = rng.randint(int(self.a), int(self.b))
        elif self.kind == "normal":
            n = rng.gauss(self.a, self.b)
        else:
            n = rng.expovariate(1.0 / self.a)
        return int(min(max(round(n), 1), maximum))


@dataclass(frozen=True)
class LoadSpec:
    url: str  # the server's base URL, e.g. http://127.0.0.1:8000
    num_clients: int
    num_requests: int
    prompt_len: LengthDist
    output_len: LengthDist
    shared_prefix_len: int = 0  # tokens every prompt starts with (exercises the prefix cache)
    vocab_low: int = 32  # prompt ids are drawn from [vocab_low, vocab_high)
    vocab_high: int = 127
    max_model_len: int | None = None  # clip prompt + output to this (default: the server's /v1/models)
    seed: int = 0
    timeout_s: float = 600.0

    def __post_init__(self):
        if self.num_clients < 1 or self.num_requests < 1:
            raise ValueError("num_clients and num_requests must be >= 1")
        if self.shared_prefix_len < 0 or not 0 <= self.vocab_low < self.vocab_high:
            raise ValueError("shared_prefix_len must be >= 0 and 0 <= vocab_low < vocab_high")


@dataclass
class RequestResult:
    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float = 0.0
    error: str | None = None


@dataclass
class Report:
    num_requests: int
    num_ok: int
    num_failed: int
    duration_s: float
    output_tokens: int
    prompt_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    errors: list[str] = field(default_factory=list)
    # CPU seconds this process (the load generator) used during the run, and as a share of its duration: near 1
    # the client, not the server, may be what limits the tokens/s
    client_cpu_s: float | None = None
    client_cpu_share: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def table(self) -> str:
        def ms(v):
            return "-" if v is None else f"{v:.1f}"

        rows = [
            ("requests ok / failed", f"{self.num_ok} / {self.num_failed}"),
            ("duration (s)", f"{self.duration_s:.2f}"),
            ("output tokens/s", f"{self.output_tokens_per_s:.1f}"),
            ("requests/s", f"{self.requests_per_s:.2f}"),
            ("TTFT p50 / p99 (ms)", f"{ms(self.ttft_p50_ms)} / {ms(self.ttft_p99_ms)}"),
            ("TPOT p50 / p99 (ms)", f"{ms(self.tpot_p50_ms)} / {ms(self.tpot_p99_ms)}"),
            ("latency p50 / p99 (ms)", f"{ms(self.latency_p50_ms)} / {ms(self.latency_p99_ms)}"),
        ]
        if self.client_cpu_share is not None:
            rows.append(("client CPU (share of duration)", f"{self.client_cpu_share:.2f}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(results: list[RequestResult], duration_s: float, client_cpu_s: float | None = None) -> Report:
    ok = [r for r in results if r.error is None]

    def pct_ms(values, q):
        p = percentile([v for v in values if v is not None], q)
        return None if p is None else p * 1e3

    output_tokens = sum(r.output_tokens for r in ok)
    return Report(
        num_requests=len(results),
        num_ok=len(ok),
        num_failed=len(results) - len(ok),
        duration_s=duration_s,
        output_tokens=output_tokens,
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        output_tokens_per_s=output_tokens / duration_s if duration_s > 0 else 0.0,
        requests_per_s=len(ok) / duration_s if duration_s > 0 else 0.0,
        ttft_p50_ms=pct_ms([r.ttft_s for r in ok], 50),
        ttft_p99_ms=pct_ms([r.ttft_s for r in ok], 99),
        tpot_p50_ms=pct_ms([r.tpot_s for r in ok], 50),
        tpot_p99_ms=pct_ms([r.tpot_s for r in ok], 99),
        latency_p50_ms=pct_ms([r.latency_s for r in ok], 50),
        latency_p99_ms=pct_ms([r.latency_s for r in ok], 99),
        errors=sorted({r.error for r in results if r.error is not None})[:20],
        client_cpu_s=client_cpu_s,
        client_cpu_share=client_cpu_s / duration_s if client_cpu_s is not None and duration_s > 0 else None,
    )


async def _one_request(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> RequestResult:
    result = RequestResult(prompt_tokens=len(prompt))
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    first = now if first is None else first
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    end = time.perf_counter()
    result.latency_s = end - start
    if first is not None:
        result.ttft_s = first - start
        if result.output_tokens > 1:
            result.tpot_s = (last - first) / (result.output_tokens - 1)
    return result


async def run_load(spec: LoadSpec) -> Report:
    """Send the load described by ``spec`` and summarize it. Raises httpx errors if /v1/models fails."""
    rng = random.Random(spec.seed)
    limits = httpx.Limits(max_connections=spec.num_clients, max_keepalive_connections=spec.num_clients)
    timeout = httpx.Timeout(spec.timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=spec.url.rstrip("/"), limits=limits, timeout=timeout) as client:
        models = (await client.get("/v1/models")).raise_for_status().json()["data"][0]
        max_len = spec.max_model_len or models.get("max_model_len") or 1 << 30
        prefix = [rng.randrange(spec.vocab_low, spec.vocab_high) for _ in range(spec.shared_prefix_len)]
        jobs = []
        for _ in range(spec.num_requests):
            out_len = spec.output_len.sample(rng, max_len - 1)
            room = max(max_len - out_len - len(prefix), 1)
            n = spec.prompt_len.sample(rng, room)
            jobs.append((prefix + [rng.randrange(spec.vocab_low, spec.vocab_high) for _ in range(n)], out_len))
        pending = list(reversed(jobs))
        results: list[RequestResult] = []

        async def client_loop():
            while pending:
                prompt, out_len = pending.pop()
                results.append(await _one_request(client, models["id"], prompt, out_len))

        start, cpu_start = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client_loop() for _ in range(spec.num_clients)))
        duration, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return summarize(results, duration, cpu)
