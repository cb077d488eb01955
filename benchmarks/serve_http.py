"""The HTTP layer's ceiling (CPU, no GPU): how many streamed tokens/s `kimi-linear serve`'s API delivers.

    python -m benchmarks serve_http [--out DIR] [--streams 68 128] [--step-ms 4 2] [--output-len 300]
                                    [--engine sleep thread process] [--repeat N]

The real app (``kimi_linear.serve.api.create_app``, uvicorn, the same SSE path) over an engine whose step's GPU
share is a sleep of ``step-ms`` (the GIL is released, as in a CUDA sync). ``streams`` clients (``kimi-linear
bench-serve`` in another process) each stream one request of ``output-len`` tokens. With an HTTP layer of no cost
the server would deliver streams / step tokens/s at a TPOT of one step; the table gives what it delivers, the
step it achieves and the HTTP process's CPU time per streamed token (all its threads). ``--engine``:

* ``sleep``: a stand-in engine whose ``step()`` sleeps and emits one token for every running request: the HTTP
  layer alone;
* ``thread``: the real ``Engine`` (scheduling, prefix cache, sampling, the prefill of the 16-token prompts on the
  "debug" model) with ``decode_step`` replaced by the sleep and random logits, stepped in a thread of the HTTP
  process (the arrangement before ``EngineProcess``): its Python competes with the event loop for the GIL;
* ``process``: the same engine in its own process (``EngineProcess``, as ``kimi-linear serve`` runs it).

Prints a table last and writes ``DIR/serve_http.json``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import SuiteParser, environment, write_json
from kimi_linear.config import KimiLinearConfig
from kimi_linear.serve.api import ServerSettings, create_app
from kimi_linear.serve.engine import EngineStats, TokenEvent
from kimi_linear.tokenizer import ByteTokenizer

ENGINES = ("sleep", "thread", "process")
MAX_MODEL_LEN = 1024  # of the real engine: 16-token prompts + output-len


class SleepEngine:
    """The Engine interface: each step sleeps ``step_s`` then gives every running request one token."""

    def __init__(self, config: KimiLinearConfig, step_s: float, slots: int):
        self.model_config = config
        self.step_s = step_s
        self.slots = slots
        self.lock = threading.Lock()
        self.requests: dict[str, list[int]] = {}  # id -> [prompt tokens, max tokens, generated]
        self.aborted: set[str] = set()
        self.generated = 0
        self.steps = 0

    def add_request(self, request_id, prompt_ids, params):
        with self.lock:
            self.requests[request_id] = [len(prompt_ids), params.max_tokens, 0]

    def abort(self, request_id):
        with self.lock:
            self.aborted.add(request_id)

    def has_unfinished(self):
        with self.lock:
            return bool(self.requests)

    def step(self):
        time.sleep(self.step_s)
        events = []
        with self.lock:
            self.steps += 1
            for request_id in list(self.requests):
                prompt, most, n = self.requests[request_id]
                if request_id in self.aborted:
                    del self.requests[request_id]
                    events.append(TokenEvent(request_id, None, True, "abort", prompt, n))
                    continue
                n += 1
                self.generated += 1
                self.requests[request_id][2] = n
                done = n >= most
                if done:
                    del self.requests[request_id]
                events.append(TokenEvent(request_id, 97 + n % 26, done, "length" if done else None, prompt, n))
        return events

    def stats(self):
        with self.lock:
            n = len(self.requests)
        return EngineStats(
            waiting=0, running=n, num_slots=self.slots, free_slots=self.slots - n, num_blocks=1, free_blocks=1,
            prefix_cache_queries=0, prefix_cache_hits=0, generated_tokens_total=self.generated,
            prompt_tokens_total=0, prefill_tokens_total=0, finished_requests_total=0,
        )


def sleeping_engine(step_s: float, max_num_seqs: int):
    """The real ``Engine`` over a random "debug"-preset model, its ``decode_step`` replaced by a sleep of ``step_s``
    and random logits. Module-level, so ``EngineProcess``'s child can import and call it (the patch is made in
    the process that steps the engine)."""
    import torch

    from kimi_linear.model import KimiLinearForCausalLM
    from kimi_linear.serve import engine as serve_engine

    def decode_step(model, tokens, cache):
        time.sleep(step_s)  # the GPU's share of the step: the GIL is released
        return torch.randn(tokens.shape[0], model.config.vocab_size)

    serve_engine.decode_step = decode_step
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig.from_preset("debug")).eval()
    return serve_engine.Engine(model, serve_engine.EngineConfig(
        max_num_seqs=max_num_seqs, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=4096))


class StepCounter:
    """An engine whose steps that gave out events are counted (``steps``); everything else is the engine's."""

    def __init__(self, engine):
        self.engine = engine
        self.steps = 0

    def step(self):
        events = self.engine.step()
        self.steps += bool(events)
        return events

    def __getattr__(self, name):
        return getattr(self.engine, name)


def make_engine(kind: str, step_s: float, streams: int):
    """The engine ``--engine kind`` names and the app's context; ``close`` it (a no-op but for ``process``)."""
    if kind == "sleep":
        return SleepEngine(KimiLinearConfig.from_preset("debug"), step_s, streams), 4096
    if kind == "thread":
        return sleeping_engine(step_s, streams), MAX_MODEL_LEN
    from kimi_linear.serve.engine_process import EngineProcess

    return EngineProcess(sleeping_engine, (step_s, streams)), MAX_MODEL_LEN


def measure(streams: int, step_s: float, output_len: int, engine_kind: str = "sleep") -> dict:
    import uvicorn

    engine, max_model_len = make_engine(engine_kind, step_s, streams)
    counter = StepCounter(engine)
    app = create_app(counter, ByteTokenizer(engine.model_config),
                     ServerSettings(model_name="sleep", max_model_len=max_model_len))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        with tempfile.TemporaryDirectory() as tmp:
            report_path = Path(tmp) / "report.json"
            steps_before = counter.steps
            cpu_before = os.times()
            run = subprocess.run(
                [sys.executable, "-m", "kimi_linear", "bench-serve", "--url", f"http://127.0.0.1:{port}",
                 "--num-clients", str(streams), "--num-requests", str(streams), "--prompt-len", "16",
                 "--output-len", str(output_len), "--json", str(report_path)],
                capture_output=True, text=True, timeout=600,
            )
            if run.returncode:
                raise RuntimeError(f"bench-serve failed: {run.stderr[-2000:]}")
            cpu_after = os.times()
            report = json.loads(report_path.read_text())
            steps = counter.steps - steps_before
    finally:
        server.should_exit = True
        thread.join(30)
        if hasattr(engine, "close"):
            engine.close()
    return {
        "engine": engine_kind, "streams": streams, "step_ms": step_s * 1e3, "output_len": output_len,
        "ideal_tokens_per_s": streams / step_s, "tokens_per_s": report["output_tokens_per_s"],
        "tpot_p50_ms": report["tpot_p50_ms"], "tpot_p99_ms": report["tpot_p99_ms"],
        "achieved_step_ms": report["duration_s"] / steps * 1e3 if steps else None, "failed": report["num_failed"],
        "client_cpu_share": report.get("client_cpu_share"),
        # this process's CPU time (every thread: the event loop, the engine loop, a "sleep" or "thread" engine)
        "http_cpu_us_per_token": ((cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system))
        / max(report["output_tokens"], 1) * 1e6,
    }


def main(argv=None) -> None:
    parser = SuiteParser(__name__, __doc__)
    parser.add_argument("--streams", type=int, nargs="+", default=[68, 128], help="concurrent streams")
    parser.add_argument("--step-ms", type=float, nargs="+", default=[4.0, 2.0],
                        help="the stand-in engine's step time, one per --streams entry (or one for all)")
    parser.add_argument("--output-len", type=int, default=300, help="tokens per stream")
    parser.add_argument("--engine", nargs="+", choices=ENGINES, default=list(ENGINES),
                        help="sleep: a stand-in engine; thread / process: the real engine with a sleeping decode "
                        "step, in a thread of the HTTP process / in its own process (default: all three)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each row, the engines taking turns (a shared machine drifts); the table "
                        "gives the run of median tokens/s, the JSON every run")
    args = parser.parse_args(argv)
    steps = args.step_ms if len(args.step_ms) == len(args.streams) else args.step_ms[:1] * len(args.streams)
    runs = [measure(n, ms / 1e3, args.output_len, kind)
            for n, ms in zip(args.streams, steps, strict=True) for _ in range(args.repeat) for kind in args.engine]
    rows = []
    for n, ms in zip(args.streams, steps, strict=True):
        for kind in args.engine:
            mine = sorted((r for r in runs if (r["engine"], r["streams"], r["step_ms"]) == (kind, n, ms)),
                          key=lambda r: r["tokens_per_s"])
            rows.append({**mine[len(mine) // 2], "runs": len(mine),
                         "tokens_per_s_range": [mine[0]["tokens_per_s"], mine[-1]["tokens_per_s"]]})
    write_json(args.out, "serve_http.json", {"environment": environment(args), "rows": rows, "runs": runs})
    print("| engine | streams | step ms | ideal tok/s | delivered tok/s (range) | achieved step ms | "
          "TPOT p50 / p99 ms | HTTP process CPU µs / token |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["tokens_per_s_range"]
        spread = f" ({low:,.0f}-{high:,.0f})" if r["runs"] > 1 else ""
        print(f"| {r['engine']} | {r['streams']} | {r['step_ms']:g} | {r['ideal_tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s']:,.0f}{spread} | {r['achieved_step_ms'] or 0:.2f} | "
              f"{r['tpot_p50_ms']:.2f} / {r['tpot_p99_ms']:.2f} | {r['http_cpu_us_per_token']:.1f} |")


if __name__ == "__main__":
    main()
