"""The HTTP layer's ceiling (CPU, no model): how many streamed tokens/s `kimi-linear serve`'s API delivers.

    python -m benchmarks serve_http [--out DIR] [--streams 68 128] [--step-ms 4 2] [--output-len 300]

The real app (``kimi_linear.serve.api.create_app``, uvicorn, the same SSE path) over a stand-in engine whose
``step()`` sleeps ``step-ms`` (the GPU's share of a step: the GIL is released, as in a CUDA sync) and then emits
one token for every running request. ``streams`` clients (``kimi-linear bench-serve`` in another process) each
stream one request of ``output-len`` tokens. With an HTTP layer of no cost the server would deliver
streams / step tokens/s at a TPOT of one step; the table gives what it delivers and the step it achieves. What the
engine's GPU work leaves of a step is the time this layer may take without slowing decoding down.

Prints a table last and writes ``DIR/serve_http.json``.
"""

from __future__ import annotations

import json
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


def measure(streams: int, step_s: float, output_len: int) -> dict:
    import uvicorn

    config = KimiLinearConfig.from_preset("debug")
    engine = SleepEngine(config, step_s, streams)
    app = create_app(engine, ByteTokenizer(config), ServerSettings(model_name="sleep", max_model_len=4096))
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
            steps_before = engine.steps
            run = subprocess.run(
                [sys.executable, "-m", "kimi_linear", "bench-serve", "--url", f"http://127.0.0.1:{port}",
                 "--num-clients", str(streams), "--num-requests", str(streams), "--prompt-len", "16",
                 "--output-len", str(output_len), "--json", str(report_path)],
                capture_output=True, text=True, timeout=600,
            )
            if run.returncode:
                raise RuntimeError(f"bench-serve failed: {run.stderr[-2000:]}")
            report = json.loads(report_path.read_text())
            steps = engine.steps - steps_before
    finally:
        server.should_exit = True
        thread.join(30)
    return {
        "streams": streams, "step_ms": step_s * 1e3, "output_len": output_len,
        "ideal_tokens_per_s": streams / step_s, "tokens_per_s": report["output_tokens_per_s"],
        "tpot_p50_ms": report["tpot_p50_ms"], "tpot_p99_ms": report["tpot_p99_ms"],
        "achieved_step_ms": report["duration_s"] / steps * 1e3 if steps else None, "failed": report["num_failed"],
    }


def main(argv=None) -> None:
    parser = SuiteParser(__name__, __doc__)
    parser.add_argument("--streams", type=int, nargs="+", default=[68, 128], help="concurrent streams")
    parser.add_argument("--step-ms", type=float, nargs="+", default=[4.0, 2.0],
                        help="the stand-in engine's step time, one per --streams entry (or one for all)")
    parser.add_argument("--output-len", type=int, default=300, help="tokens per stream")
    args = parser.parse_args(argv)
    steps = args.step_ms if len(args.step_ms) == len(args.streams) else args.step_ms[:1] * len(args.streams)
    rows = [measure(n, ms / 1e3, args.output_len) for n, ms in zip(args.streams, steps, strict=True)]
    write_json(args.out, "serve_http.json", {"environment": environment(args), "rows": rows})
    print("| streams | step ms | ideal tok/s | delivered tok/s | achieved step ms | TPOT p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['streams']} | {r['step_ms']:g} | {r['ideal_tokens_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
              f"{r['achieved_step_ms'] or 0:.2f} | {r['tpot_p50_ms']:.2f} / {r['tpot_p99_ms']:.2f} |")


if __name__ == "__main__":
    main()
