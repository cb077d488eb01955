"""End-to-end serving throughput on a GPU: `kimi-linear serve` under `bench-serve` load vs static batches.

    python -m benchmarks serve_throughput [--out DIR] [--config 0.75b] [--clients 64] [--requests 128]
        [--prompt-len 1024] [--output-len 256] [--prefix-len 32768] [--compare transformers]

One run, side by side on one card, bf16 random weights (``benchmarks/model_speed.py``'s configs):

1. static: our ``generate()`` on ``clients`` prompts of ``prompt-len`` tokens at once, ``output-len`` new tokens
   each (no stop token), prefill included: output tokens / wall time.
2. HF (``--compare transformers``): transformers' ``KimiLinearForCausalLM.generate`` on the same prompts (FLA kernels when importable).
3. server: the checkpoint served by ``kimi-linear serve --max-num-seqs clients`` in a subprocess, loaded by
   ``clients`` streaming clients sending ``requests`` requests of the same lengths (``kimi_linear.serve.loadgen``):
   output tokens/s, TTFT and TPOT p50/p99.
4. prefix cache: one streaming request with a fresh ``prefix-len``-token prompt (a miss), then one sharing that
   prefix with a new 64-token tail (a hit): TTFT of each.

Prints a table last and writes ``DIR/serve_throughput.json``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import torch

from benchmarks.common import SuiteParser, environment, spin_up_gpu, write_json
from benchmarks.model_speed import CONFIGS, hf_model
from kimi_linear.generate import generate
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.serve.loadgen import LengthDist, LoadSpec, run_load


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, port: int, flags: list[str], log_path: str) -> subprocess.Popen:
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kimi_linear", "serve", "--checkpoint", checkpoint, "--port", str(port),
         "--log-level", "warning", *flags],
        stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def ttft_of(url: str, prompt: list[int]) -> float:
    start = time.perf_counter()
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - start
    raise RuntimeError("no token streamed")


def main(argv=None) -> None:
    parser = SuiteParser(__name__, __doc__, peers=("transformers",))
    parser.add_argument("--config", default="0.75b", choices=sorted(CONFIGS), help="model size; default 0.75b")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients and batch size; default 64")
    parser.add_argument("--requests", type=int, default=128, help="requests in the timed wave; default 128")
    parser.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens; default 1024")
    parser.add_argument("--output-len", type=int, default=256, help="output tokens; default 256")
    parser.add_argument("--prefix-len", type=int, default=32768,
                        help="shared prefix of the prefix-cache phase, 0 skips it; default 32768")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("serve_throughput needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"environment": environment(args), "device": torch.cuda.get_device_name()}

    config = CONFIGS[args.config]()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = KimiLinearForCausalLM(config).to(torch.bfloat16).eval()
    checkpoint = os.path.join(tempfile.mkdtemp(), f"kimi-{args.config}")
    model.save_pretrained(checkpoint)
    rng = random.Random(0)
    prompts = [[rng.randrange(32, 127) for _ in range(args.prompt_len)] for _ in range(args.clients)]
    n_out = args.clients * args.output_len
    spin_up_gpu()

    def ours():
        with torch.no_grad():
            generate(model, prompts, max_new_tokens=args.output_len, temperature=0.0, stop_tokens=[])

    ours()  # warm-up: kernels compiled, CUDA graph captured
    static_s = min(timed(ours) for _ in range(2))
    results["static"] = {"seconds": static_s, "output_tokens_per_s": n_out / static_s}
    print(f"static generate: {n_out / static_s:,.0f} tok/s", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()

    if "transformers" in args.compare:
        try:
            hf = hf_model(config)
            ids = torch.tensor(prompts, device="cuda")

            def theirs():
                with torch.no_grad():
                    hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.output_len,
                                min_new_tokens=args.output_len, do_sample=False, pad_token_id=0, eos_token_id=None)

            theirs()
            hf_s = timed(theirs)
            results["hf"] = {"seconds": hf_s, "output_tokens_per_s": n_out / hf_s}
            print(f"HF generate: {n_out / hf_s:,.0f} tok/s", flush=True)
            del hf, ids
        except Exception as e:  # noqa: BLE001 - the server numbers still count without the peer
            results["hf"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"HF generate failed: {e}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    max_len = max(args.prompt_len + args.output_len, args.prefix_len + 128)
    # This process keeps its CUDA context, so the server gets a little less than the usual fraction.
    flags = ["--max-num-seqs", str(args.clients), "--max-model-len", str(max_len), "--gpu-memory-fraction", "0.8"]
    proc = start_server(checkpoint, port, flags, os.path.join(args.out, "server.log"))
    try:
        spec = LoadSpec(url=url, num_clients=args.clients, num_requests=args.clients,
                        prompt_len=LengthDist("fixed", args.prompt_len),
                        output_len=LengthDist("fixed", args.output_len), seed=1)
        asyncio.run(run_load(spec))  # warm-up wave (CUDA graphs of every batch size, allocator)
        spec = LoadSpec(url=url, num_clients=args.clients, num_requests=args.requests,
                        prompt_len=LengthDist("fixed", args.prompt_len),
                        output_len=LengthDist("fixed", args.output_len), seed=2)
        report = asyncio.run(run_load(spec))
        results["server"] = json.loads(report.to_json())
        print(report.table(), flush=True)
        if args.prefix_len:
            prefix = [rng.randrange(32, 127) for _ in range(args.prefix_len)]
            miss = ttft_of(url, prefix + [rng.randrange(32, 127) for _ in range(64)])
            hit = ttft_of(url, prefix + [rng.randrange(32, 127) for _ in range(64)])
            results["prefix_cache"] = {"prefix_len": args.prefix_len, "ttft_miss_s": miss, "ttft_hit_s": hit,
                                       "speedup": miss / hit}
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        results["metrics"] = [line for line in metrics.splitlines() if line and not line.startswith("#")]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

    write_json(args.out, "serve_throughput.json", results)
    server_tps = results["server"]["output_tokens_per_s"]
    print(f"\n{results['device']}, {args.config}, {args.clients} clients, {args.prompt_len}-token prompts, "
          f"{args.output_len} output tokens")
    print("| path | output tok/s | server / path |")
    print("|---|---|---|")
    print(f"| server ({args.requests} requests) | {server_tps:,.0f} | 1.00 |")
    for name in ("static", "hf"):
        if "output_tokens_per_s" in results.get(name, {}):
            tps = results[name]["output_tokens_per_s"]
            print(f"| {name} generate, batch {args.clients} | {tps:,.0f} | {server_tps / tps:.2f} |")
    s = results["server"]
    print(f"TTFT p50/p99 {s['ttft_p50_ms']:.0f}/{s['ttft_p99_ms']:.0f} ms, "
          f"TPOT p50/p99 {s['tpot_p50_ms']:.1f}/{s['tpot_p99_ms']:.1f} ms")
    if "prefix_cache" in results:
        p = results["prefix_cache"]
        print(f"prefix cache, {p['prefix_len']}-token prefix: TTFT miss {p['ttft_miss_s'] * 1e3:.0f} ms, "
              f"hit {p['ttft_hit_s'] * 1e3:.0f} ms ({p['speedup']:.1f}x)")


if __name__ == "__main__":
    main()
