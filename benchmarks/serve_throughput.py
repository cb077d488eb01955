"""End-to-end serving throughput on a GPU: `kimi-linear serve` under `bench-serve` load vs static batches.

    python -m benchmarks serve_throughput [--out DIR] [--config 0.75b] [--clients 64] [--requests 128]
        [--prompt-len 1024] [--output-len 256] [--prefix-len 32768] [--compare transformers]
        [--phases static,engine,process,server,prefix,floor,long] [--long-context 32768 131072] [--cache-gib 8]
        [--long-output 1024]

One run, side by side on one card, bf16 random weights (``benchmarks/model_speed.py``'s configs):

1. static: our ``generate()`` on ``clients`` prompts of ``prompt-len`` tokens at once, ``output-len`` new tokens
   each (no stop token), prefill included: output tokens / wall time.
2. HF (``--compare transformers``): transformers' ``KimiLinearForCausalLM.generate`` on the same prompts (FLA
   kernels when importable).
3. engine: the server's ``Engine`` in this process (no HTTP, no engine process), the same prompts submitted at
   once: output tokens/s, every ``step()``'s wall time split into steps that only decode and steps that carry
   prefill, and a profile of 20 decode-only steps (host time by operator, GPU time by kernel group). Together with
   ``static`` and ``server`` it splits the server's gap into the engine's and the HTTP path's.
4. process: the same waves through the server's engine process (``EngineProcess`` over ``load_engine``, as
   ``kimi-linear serve`` builds it, same engine settings as ``engine``), driven by a plain loop here: the engine
   process's cost (its loop, the pipe, the step's events) without HTTP. With ``engine`` and ``server`` it splits the
   server's gap between the transport and the HTTP layer.
5. server: the checkpoint served by ``kimi-linear serve --max-num-seqs clients`` in a subprocess, loaded by
   ``clients`` streaming clients sending ``requests`` requests of the same lengths (``kimi_linear.serve.loadgen``):
   output tokens/s, TTFT and TPOT p50/p99.
6. prefix cache: after one unrelated prompt of that length (its kernels and allocations warm), one streaming
   request with a fresh ``prefix-len``-token prompt (a miss), then ``PREFIX_HITS`` sharing that prefix, each with
   a new 64-token tail (hits): the miss's TTFT and the hits' median (each hit's TTFT is kept too).
7. floor: the engine's B = 1 decode step (its CUDA graph, 1k tokens of context) against its weight-read floor
   (bytes of the weights a token reads / the measured copy bandwidth), and where the step's time goes (kernel
   times from the profiler, grouped).
8. long: the paper's Fig. 1 regime through the server. For Kimi Linear and the MLA-only model of the same shape,
   one cache budget (``cache-gib``: KDA state slots + MLA latent blocks): each server gets the sequences of
   ``context`` + ``long-output`` tokens that fit the budget (``--max-num-seqs``, ``--num-blocks``), and as many
   clients send one such request each at once. Reported: concurrent sequences (the peak of the server's
   ``requests_running``), output tokens/s over the whole run, and the decode throughput: generated tokens per
   second over the stretch where every sequence decodes and no prefill runs (``/metrics`` sampled during the run).

Prints a table last and writes ``DIR/serve_throughput.json``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gc
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict

import httpx
import torch

from benchmarks.common import SuiteParser, ceiling_gbps, environment, spin_up_gpu, write_json
from benchmarks.model_speed import CONFIGS, hf_model
from kimi_linear.cache import cache_bytes
from kimi_linear.generate import generate
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.serve.engine import KDA_CHUNK, Engine, EngineConfig
from kimi_linear.serve.loadgen import LengthDist, LoadSpec, run_load
from kimi_linear.tokenizer import NUM_RESERVED_SPECIAL_TOKENS, TIKTOKEN_FILE

PHASES = ("static", "engine", "process", "server", "prefix", "floor", "long")
PREFIX_HITS = 5  # hits timed after one miss; the reported hit TTFT is their median
COUNTERS = ("steps_total", "prefill_steps_total", "step_seconds_total")  # the engine's, timed per run


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


def ttft_of(client: httpx.Client, prompt: list[int]) -> float:
    """Time to the first streamed token of one request on ``client``'s open connection (a client is made once:
    building one, its TLS context included, takes tens of ms, which no server's TTFT contains)."""
    body = json.dumps({"prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "stream": True})
    start = time.perf_counter()
    with client.stream("POST", "/v1/completions", content=body, headers={"content-type": "application/json"},
                       timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - start
    raise RuntimeError("no token streamed")


def write_bpe(checkpoint: str, vocab_size: int) -> None:
    """A tiktoken.model filling ``vocab_size`` with the reserved special tokens: the 256 bytes, then two-byte
    tokens (random weights emit any id; every id must decode)."""
    n = vocab_size - NUM_RESERVED_SPECIAL_TOKENS - 256
    if not 0 <= n <= 256 * 256:
        raise ValueError(f"cannot build a benchmark BPE for vocab_size={vocab_size}")
    tokens = [bytes([i]) for i in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)][:n]
    with open(os.path.join(checkpoint, TIKTOKEN_FILE), "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens))


def save_checkpoint(model, name: str) -> str:
    """``model`` saved with a benchmark tokenizer in a fresh temporary folder."""
    checkpoint = os.path.join(tempfile.mkdtemp(), name)
    model.save_pretrained(checkpoint)
    write_bpe(checkpoint, model.config.vocab_size)
    return checkpoint


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def scrape(url: str) -> dict[str, float]:
    """The server's /metrics as {name: value} (unlabelled series only)."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


# ---- floor: the B = 1 decode step against its weight-read floor ----------------------------------------------


def kernel_group(name: str) -> str:
    n = name.lower()
    if any(t in n for t in ("gemm", "gemv", "nvjet", "cutlass", "sm90_xmma", "cublas")):
        return "matmuls (cuBLAS)"
    if "kda" in n or "recurrent" in n:
        return "KDA recurrence"
    if "mla" in n or "latent" in n:
        return "MLA decode"
    if "conv" in n:
        return "short conv"
    if "norm" in n:
        return "norms"
    return "other (element-wise, copies, softmax, rope, sampling inputs)"


def decode_floor(model, context: int = 1024, reps: int = 300) -> dict:
    """The engine's B = 1 decode graph at ``context`` tokens: median step time, the weight-read floor and the
    kernel time by group (profiler, over 20 replays)."""
    bs = 64
    blocks = math.ceil((context + 1) / bs)
    engine = Engine(model, EngineConfig(max_num_seqs=1, max_model_len=blocks * bs, num_blocks=blocks,
                                        enable_prefix_caching=False, max_num_batched_tokens=64))
    graph = engine.graphs.get(1)
    if graph is None:
        raise RuntimeError("the engine captured no CUDA graph for one row")
    engine.block_tables[0, :blocks] = torch.arange(blocks, device=engine.block_tables.device)
    engine.next_tokens[0] = 5  # slot 0's input token
    graph(slots=[0], lengths=[context])  # slot 0 (and its block-table row), the context
    lengths = graph.inputs[1]
    for _ in range(20):
        lengths.fill_(context)  # a replay advances the length by one
        graph.graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        lengths.fill_(context)
        a.record()
        graph.graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    step_ms = sorted(times)[len(times) // 2]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            lengths.fill_(context)
            graph.graph.replay()
        torch.cuda.synchronize()
    groups: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    launches = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            groups[kernel_group(e.name)] += e.device_time / 20  # us per step
            kernels[e.name[:90]] += e.device_time / 20
            launches += 1
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    slot_bytes, token_bytes = cache_bytes(model.config, 2)
    cache_read = slot_bytes + token_bytes * context  # states read (and written), latents read
    gbps = ceiling_gbps()  # read + write GB/s of a copy kernel
    floor_ms = weight_bytes / (gbps * 1e9) * 1e3
    del engine, graph
    return {
        "context": context, "step_ms": step_ms, "weight_bytes": weight_bytes, "cache_bytes": cache_read,
        "copy_gbps": gbps, "weight_floor_ms": floor_ms, "ratio_to_floor": step_ms / floor_ms,
        "floor_with_cache_ms": (weight_bytes + cache_read + slot_bytes) / (gbps * 1e9) * 1e3,
        "kernel_us_by_group": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "kernel_us_sum": sum(groups.values()), "kernels_per_step": launches / 20,
        "top_kernels_us": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12]),
    }


# ---- engine: the continuous-batching engine alone ---------------------------------------------------------


def _profile_summary(prof, steps: int) -> dict:
    """Host time by operator and GPU time by kernel (top 15 each) and by kernel group, per step."""
    host = sorted(((e.key, e.self_cpu_time_total / steps) for e in prof.key_averages()), key=lambda kv: -kv[1])
    groups: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            groups[kernel_group(e.name)] += e.device_time / steps
            kernels[e.name[:80]] += e.device_time / steps
    return {"steps": steps, "host_us_per_step_top": dict(host[:15]), "kernel_us_per_step": dict(groups),
            "kernel_us_sum": sum(groups.values()),
            "kernel_us_top": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:15])}


def engine_alone(model, prompts: list[list[int]], output_len: int, max_model_len: int,
                 step_tokens: int = EngineConfig.max_num_batched_tokens) -> dict:
    """Run ``prompts`` through an in-process ``Engine`` (the server's defaults, ``len(prompts)`` slots): one wave
    to warm up every graph bucket, one timed step by step, then one profiled (its steps that carry prefill, and
    20 decode-only steps after them). The warm-up and profiled waves send other prompts of the same lengths: a
    repeated prompt would hit the prefix cache and make the timed wave a different workload from the static
    batch's and the server's."""
    from kimi_linear.serve.engine import SamplingParams

    engine = Engine(model, EngineConfig(max_num_seqs=len(prompts), max_model_len=max_model_len,
                                        gpu_memory_fraction=0.8, max_num_batched_tokens=step_tokens))
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]

    rng = random.Random(len(prompts))

    def other_prompts() -> list[list[int]]:
        return [[rng.randrange(32, 127) for _ in p] for p in prompts]

    def wave(tag: str, batch: list[list[int]], profile: bool = False):
        for i, p in enumerate(batch):
            engine.add_request(f"{tag}-{i}", p, params)
        steps, profiles, prof = [], {}, None
        torch.cuda.synchronize()
        start = time.perf_counter()
        while engine.has_unfinished():
            before = engine.stats().prefill_tokens_total
            if profile and prof is None and len(profiles) < 2:
                phase = "prefill" if not profiles else "decode"
                if phase == "prefill" or steps[-1][1] == 0:
                    prof, counted = torch.profiler.profile(activities=activities), 0
                    prof.__enter__()
            t0 = time.perf_counter()
            engine.step()
            t1 = time.perf_counter()
            prefilled = engine.stats().prefill_tokens_total - before
            steps.append((t1 - t0, prefilled))
            if prof is not None:
                counted += 1
                ended = (phase == "prefill" and prefilled == 0) or (phase == "decode" and counted == 20)
                if ended or not engine.has_unfinished():
                    torch.cuda.synchronize()
                    prof.__exit__(None, None, None)
                    profiles[phase], prof = _profile_summary(prof, counted), None
        return time.perf_counter() - start, steps, profiles

    wave("warm", other_prompts())
    seconds, steps, _ = wave("timed", prompts)
    _, _, profiles = wave("profiled", other_prompts(), profile=True)
    decode = sorted(t for t, p in steps if p == 0)
    mixed = [t for t, p in steps if p > 0]
    last_prefill = max(i for i, (_, p) in enumerate(steps) if p)
    out = {"seconds": seconds, "output_tokens_per_s": len(prompts) * output_len / seconds, "steps": len(steps),
           "decode_steps": len(decode), "decode_step_ms_p50": 1e3 * decode[len(decode) // 2] if decode else None,
           "prefill_steps": len(mixed), "prefill_steps_ms": [round(1e3 * t, 2) for t in mixed],
           "time_to_last_prefill_s": sum(t for t, _ in steps[: last_prefill + 1]), "profile": profiles}
    del engine
    return out


def step_counts(deltas: dict, seconds: float) -> dict:
    """The engine's counter deltas over a timed run (``steps_total``, ``prefill_steps_total``,
    ``step_seconds_total``) -> steps, prefill steps, mean step time and the share of ``seconds`` inside steps."""
    steps, inside = deltas["steps_total"], deltas["step_seconds_total"]
    return {"steps": steps, "prefill_steps": deltas["prefill_steps_total"],
            "step_ms_mean": 1e3 * inside / max(steps, 1), "busy_share": inside / seconds}


def describe_steps(counts: dict) -> str:
    """One line for a ``step_counts`` result."""
    return (f"{counts['steps']:.0f} steps ({counts['prefill_steps']:.0f} with prefill), {counts['step_ms_mean']:.2f} "
            f"ms each on average, inside a step {counts['busy_share']:.0%} of the run")


def engine_process(checkpoint: str, prompts: list[list[int]], output_len: int, max_model_len: int, device: str,
                   step_tokens: int = EngineConfig.max_num_batched_tokens) -> dict:
    """``engine_alone``'s waves (one to warm up, one timed; other prompts for the warm-up) through the server's
    engine process: ``EngineProcess`` over ``load_engine`` as ``kimi-linear serve`` builds it, with the engine
    settings of ``engine_alone``, stepped by a plain loop here (no HTTP). Also the child's own count of steps and
    of the time inside them, so the loop and the pipe show as the rest."""
    from kimi_linear.serve.engine import SamplingParams
    from kimi_linear.serve.engine_process import EngineProcess, load_engine

    config = EngineConfig(max_num_seqs=len(prompts), max_model_len=max_model_len, gpu_memory_fraction=0.8,
                          max_num_batched_tokens=step_tokens)
    engine = EngineProcess(load_engine, (checkpoint, config, device, "bfloat16" if device == "cuda" else "float32"))
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    rng = random.Random(len(prompts) + 1)
    try:
        def wave(tag: str, batch: list[list[int]]) -> tuple[float, dict]:
            # The child starts a request as soon as it has it: the clock and the counters start before the adds.
            before = engine.stats()
            start = time.perf_counter()
            added = [engine.add_request_future(f"{tag}-{i}", p, params) for i, p in enumerate(batch)]
            for future in added:
                future.result()
            while engine.has_unfinished():
                engine.step()
            seconds = time.perf_counter() - start
            after = engine.stats()
            return seconds, step_counts({k: getattr(after, k) - getattr(before, k) for k in COUNTERS}, seconds)

        wave("warm", [[rng.randrange(32, 127) for _ in p] for p in prompts])
        seconds, child = wave("timed", prompts)
    finally:
        engine.close()
    return {"seconds": seconds, "output_tokens_per_s": len(prompts) * output_len / seconds, **child}


def prefix_in_process(model, prefix_len: int, rng: random.Random) -> dict:
    """TTFT of a ``prefix_len``-token miss and of a hit (same prefix, new 64-token tail) through an in-process
    ``Engine``: from ``add_request`` to the request's first token event, with the hit profiled (host time by
    operator, GPU time by kernel group), so the HTTP path's share of the server's hit TTFT shows."""
    from kimi_linear.serve.engine import SamplingParams

    engine = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=prefix_len + 256, gpu_memory_fraction=0.8))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    prefix = [rng.randrange(32, 127) for _ in range(prefix_len)]

    def ttft(request_id: str, prompt: list[int]) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.add_request(request_id, prompt, params)
        first = None
        while engine.has_unfinished():
            for event in engine.step():
                if event.request_id == request_id and first is None and event.token_id is not None:
                    first = time.perf_counter() - start
        return first

    ttft("warm", [rng.randrange(32, 127) for _ in range(prefix_len + 64)])  # kernels at this length
    miss = ttft("miss", prefix + [rng.randrange(32, 127) for _ in range(64)])
    hits = [ttft(f"hit{i}", prefix + [rng.randrange(32, 127) for _ in range(64)]) for i in range(PREFIX_HITS)]
    hit = statistics.median(hits)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        hit2 = ttft("hit2", prefix + [rng.randrange(32, 127) for _ in range(64)])
    host = sorted(((e.key, e.self_cpu_time_total) for e in prof.key_averages()), key=lambda kv: -kv[1])[:15]
    kernels: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            kernels[e.name[:80]] += e.device_time
    del engine
    return {"prefix_len": prefix_len, "ttft_miss_s": miss, "ttft_hit_s": hit, "ttft_hits_s": hits,
            "ttft_hit_profiled_s": hit2, "speedup": miss / hit, "hit_host_us_top": dict(host),
            "hit_kernel_us_top": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:15]),
            "hit_kernel_us_sum": sum(kernels.values())}


# ---- long: concurrent sequences and decode throughput at long context, one cache budget ---------------------


def mla_only(config):
    """The MLA-only model of ``config``'s shape: every layer MLA."""
    return dataclasses.replace(config, layer_types=["mla"] * config.num_hidden_layers, kda_layers=None,
                               full_attn_layers=None)


def seqs_in_budget(config, context: int, budget_bytes: int, block_size: int = KDA_CHUNK) -> tuple[int, int]:
    """(sequences, MLA blocks) of ``context`` tokens each that ``budget_bytes`` of cache holds (bf16 latents and
    conv tails, fp32 KDA states; one scratch slot and block)."""
    slot, token = cache_bytes(config, 2)
    per_seq = slot + math.ceil(context / block_size) * block_size * token
    n = int((budget_bytes - slot - block_size * token) // per_seq)
    return n, n * math.ceil(context / block_size)


class MetricsPoller:
    """Samples the server's /metrics every ``period`` s in a thread: (t, generated, prefilled, running)."""

    def __init__(self, url: str, period: float = 0.2):
        self.url, self.period, self.samples = url, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                m = scrape(self.url)
                self.samples.append((time.perf_counter(), m["kimi_linear_generation_tokens_total"],
                                     m["kimi_linear_prefill_tokens_total"], m["kimi_linear_requests_running"]))
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def decode_rate(self) -> tuple[int, float | None, float]:
        """(peak running, generated tokens/s over the samples where the peak decodes with no prefill, seconds)."""
        if not self.samples:
            return 0, None, 0.0
        peak = max(s[3] for s in self.samples)
        tokens = seconds = 0.0
        for (t0, g0, p0, r0), (t1, g1, p1, r1) in zip(self.samples, self.samples[1:]):
            if p1 == p0 and r0 == r1 == peak and g1 > g0:
                tokens += g1 - g0
                seconds += t1 - t0
        return int(peak), (tokens / seconds if seconds else None), seconds


def long_context(base_config, context: int, output_len: int, budget_bytes: int, out_dir: str) -> dict:
    rows = {}
    rng = random.Random(context)
    for name, config in (("kimi_linear", base_config), ("mla_only", mla_only(base_config))):
        n, blocks = seqs_in_budget(config, context + output_len, budget_bytes)
        if n < 1:
            rows[name] = {"error": f"no sequence of {context + output_len} tokens fits {budget_bytes / 2**30:.1f} GiB"}
            continue
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = KimiLinearForCausalLM(config).to(torch.bfloat16)
        checkpoint = save_checkpoint(model, f"long-{name}")
        del model
        gc.collect()
        torch.cuda.empty_cache()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        flags = ["--max-num-seqs", str(n), "--num-blocks", str(blocks), "--max-model-len",
                 str(context + output_len), "--no-prefix-caching", "--max-num-batched-tokens", "16384",
                 "--max-queue", str(4 * n)]
        proc = start_server(checkpoint, port, flags, os.path.join(out_dir, f"server-long-{name}-{context}.log"))
        try:
            warm = LoadSpec(url=url, num_clients=n, num_requests=n, prompt_len=LengthDist("fixed", 64),
                            output_len=LengthDist("fixed", 8), seed=3)
            asyncio.run(run_load(warm))  # every CUDA graph bucket replayed once
            spec = LoadSpec(url=url, num_clients=n, num_requests=n, prompt_len=LengthDist("fixed", context),
                            output_len=LengthDist("fixed", output_len), seed=rng.randrange(1 << 30))
            with MetricsPoller(url) as poller:
                report = asyncio.run(run_load(spec))
            peak, decode_tps, window = poller.decode_rate()
            rows[name] = {"max_num_seqs": n, "num_blocks": blocks, "peak_running": peak,
                          "output_tokens_per_s": report.output_tokens_per_s, "decode_tokens_per_s": decode_tps,
                          "decode_window_s": window, "duration_s": report.duration_s,
                          "ttft_p50_ms": report.ttft_p50_ms, "tpot_p50_ms": report.tpot_p50_ms,
                          "failed": report.num_failed, "errors": report.errors}
            print(f"long {context}: {name} {n} seqs, peak running {peak}, decode "
                  f"{decode_tps or 0:,.0f} tok/s over {window:.1f} s, overall {report.output_tokens_per_s:,.0f} "
                  f"tok/s", flush=True)
        finally:
            stop_server(proc)
    return rows


def main(argv=None) -> None:
    parser = SuiteParser(__name__, __doc__, peers=("transformers",))
    parser.add_argument("--config", default="0.75b", choices=sorted(CONFIGS), help="model size; default 0.75b")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients and batch size; default 64")
    parser.add_argument("--requests", type=int, default=128, help="requests in the timed wave; default 128")
    parser.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens; default 1024")
    parser.add_argument("--output-len", type=int, default=256, help="output tokens; default 256")
    parser.add_argument("--prefix-len", type=int, default=32768,
                        help="shared prefix of the prefix-cache phase; default 32768")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated phases to run, of {','.join(PHASES)} (default all)")
    parser.add_argument("--long-context", type=int, nargs="+", default=[32768],
                        help="prompt lengths of the long phase; default 32768")
    parser.add_argument("--long-output", type=int, default=1024, help="output tokens in the long phase")
    parser.add_argument("--cache-gib", type=float, default=8.0, help="cache budget of the long phase; default 8")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="max_model_len of the engine, process and server phases; default prompt + output "
                             "tokens (the prefix phase's prompts raise the server's)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
                        help="the engine's per-step token budget in the engine and server phases; default the "
                             f"engine's ({EngineConfig.max_num_batched_tokens})")
    args = parser.parse_args(argv)
    phases = set(args.phases.split(","))
    if not phases <= set(PHASES):
        parser.error(f"--phases: unknown {sorted(phases - set(PHASES))}; phases are {','.join(PHASES)}")
    model_len = args.max_model_len or args.prompt_len + args.output_len
    if model_len < args.prompt_len + args.output_len:
        parser.error(f"--max-model-len {model_len} is below --prompt-len + --output-len "
                     f"({args.prompt_len + args.output_len})")
    if not torch.cuda.is_available():
        raise SystemExit("serve_throughput needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"environment": environment(args), "device": torch.cuda.get_device_name()}

    config = CONFIGS[args.config]()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = KimiLinearForCausalLM(config).to(torch.bfloat16).eval()
    checkpoint = save_checkpoint(model, f"kimi-{args.config}")
    rng = random.Random(0)
    prompts = [[rng.randrange(32, 127) for _ in range(args.prompt_len)] for _ in range(args.clients)]
    n_out = args.clients * args.output_len
    spin_up_gpu()

    if "floor" in phases:
        with torch.no_grad():
            results["floor"] = floor = decode_floor(model)
        print(f"B=1 decode step {floor['step_ms']:.3f} ms, weight-read floor {floor['weight_floor_ms']:.3f} ms "
              f"({floor['ratio_to_floor']:.2f}x; {floor['weight_bytes'] / 1e9:.2f} GB at {floor['copy_gbps']:.0f} "
              f"GB/s), {floor['kernels_per_step']:.0f} kernels", flush=True)
        for group, us in floor["kernel_us_by_group"].items():
            print(f"  {group}: {us:.1f} us", flush=True)

    if "static" in phases:
        def ours():
            with torch.no_grad():
                generate(model, prompts, max_new_tokens=args.output_len, temperature=0.0, stop_tokens=[])

        ours()  # warm-up: kernels compiled, CUDA graph captured
        static_s = min(timed(ours) for _ in range(2))
        with torch.no_grad():  # the prefill alone: what the server's TTFT of a whole wave compares to
            prefill_s = min(timed(lambda: generate(model, prompts, max_new_tokens=1, temperature=0.0, stop_tokens=[]))
                            for _ in range(2))
        results["static"] = {"seconds": static_s, "output_tokens_per_s": n_out / static_s, "prefill_s": prefill_s}
        print(f"static generate: {n_out / static_s:,.0f} tok/s; its prefill alone {prefill_s * 1e3:.0f} ms", flush=True)
    if "engine" in phases:
        with torch.no_grad():
            results["engine"] = e = engine_alone(model, prompts, args.output_len, model_len,
                                                 args.max_num_batched_tokens)
        print(f"engine alone: {e['output_tokens_per_s']:,.0f} tok/s, {e['steps']} steps: {e['decode_steps']} decode "
              f"(p50 {e['decode_step_ms_p50']:.2f} ms), {e['prefill_steps']} with prefill "
              f"({sum(e['prefill_steps_ms']):.0f} ms), last prefill done at {e['time_to_last_prefill_s']:.3f} s",
              flush=True)
        print(json.dumps(e.get("profile", {}), indent=1), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    if "prefix" in phases:
        with torch.no_grad():
            results["prefix_cache_engine"] = p = prefix_in_process(model, args.prefix_len, random.Random(5))
        print(f"prefix cache in process: TTFT miss {p['ttft_miss_s'] * 1e3:.1f} ms, hit {p['ttft_hit_s'] * 1e3:.1f} ms "
              f"({p['speedup']:.1f}x)", flush=True)
        print(json.dumps({k: v for k, v in p.items() if k.startswith("hit_")}, indent=1), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    del model
    gc.collect()
    torch.cuda.empty_cache()

    if "static" in phases and "transformers" in args.compare:
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

    if "process" in phases:
        results["process"] = e = engine_process(checkpoint, prompts, args.output_len,
                                                model_len, "cuda", args.max_num_batched_tokens)
        print(f"engine process: {e['output_tokens_per_s']:,.0f} tok/s, {describe_steps(e)}", flush=True)
    if phases & {"server", "prefix"}:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # the engine phases' max_model_len unless the prefix phase needs longer prompts
        max_len = model_len
        if "prefix" in phases:
            max_len = max(max_len, args.prefix_len + 128)
        # This process keeps its CUDA context, so the server gets a little less than the usual fraction.
        flags = ["--max-num-seqs", str(args.clients), "--max-model-len", str(max_len), "--gpu-memory-fraction",
                 "0.8", "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        proc = start_server(checkpoint, port, flags, os.path.join(args.out, "server.log"))
        try:
            spec = LoadSpec(url=url, num_clients=args.clients, num_requests=args.clients,
                            prompt_len=LengthDist("fixed", args.prompt_len),
                            output_len=LengthDist("fixed", args.output_len), seed=1)
            asyncio.run(run_load(spec))  # warm-up wave (CUDA graphs of every batch size, allocator)
            if "server" in phases:
                spec = LoadSpec(url=url, num_clients=args.clients, num_requests=args.requests,
                                prompt_len=LengthDist("fixed", args.prompt_len),
                                output_len=LengthDist("fixed", args.output_len), seed=2)
                before = scrape(url)
                report = asyncio.run(run_load(spec))
                after = scrape(url)
                results["server"] = json.loads(report.to_json())
                results["server"]["engine"] = counts = step_counts(
                    {k: after[f"kimi_linear_engine_{k}"] - before[f"kimi_linear_engine_{k}"] for k in COUNTERS},
                    report.duration_s)
                print(report.table(), flush=True)
                print(f"the server's engine: {describe_steps(counts)}", flush=True)
            if "prefix" in phases:
                with httpx.Client(base_url=url) as client:
                    # a long prompt's kernels, and the connection open
                    ttft_of(client, [rng.randrange(32, 127) for _ in range(args.prefix_len + 64)])
                    prefix = [rng.randrange(32, 127) for _ in range(args.prefix_len)]
                    miss = ttft_of(client, prefix + [rng.randrange(32, 127) for _ in range(64)])
                    hits = [ttft_of(client, prefix + [rng.randrange(32, 127) for _ in range(64)])
                            for _ in range(PREFIX_HITS)]
                hit = statistics.median(hits)
                results["prefix_cache"] = {"prefix_len": args.prefix_len, "ttft_miss_s": miss, "ttft_hit_s": hit,
                                           "ttft_hits_s": hits, "speedup": miss / hit}
            metrics = httpx.get(f"{url}/metrics", timeout=30).text
            results["metrics"] = [line for line in metrics.splitlines() if line and not line.startswith("#")]
        finally:
            stop_server(proc)

    if "long" in phases:
        results["long"] = {
            str(context): long_context(config, context, args.long_output, int(args.cache_gib * 2**30), str(args.out))
            for context in args.long_context
        }

    write_json(args.out, "serve_throughput.json", results)
    print_tables(results, args)


def print_tables(results: dict, args) -> None:
    print(f"\n{results['device']}, {args.config}")
    if "server" in results:
        server_tps = results["server"]["output_tokens_per_s"]
        print(f"{args.clients} clients, {args.prompt_len}-token prompts, {args.output_len} output tokens")
        print("| path | output tok/s | server / path |")
        print("|---|---|---|")
        print(f"| server ({args.requests} requests) | {server_tps:,.0f} | 1.00 |")
        for name in ("static", "engine", "process", "hf"):
            if "output_tokens_per_s" in results.get(name, {}):
                tps = results[name]["output_tokens_per_s"]
                label = {"static": "static generate()", "engine": "engine alone, in process",
                         "process": "engine process, no HTTP", "hf": "HF generate"}[name]
                print(f"| {label}, batch {args.clients} | {tps:,.0f} | {server_tps / tps:.2f} |")
        s = results["server"]
        print(f"TTFT p50/p99 {s['ttft_p50_ms']:.0f}/{s['ttft_p99_ms']:.0f} ms, "
              f"TPOT p50/p99 {s['tpot_p50_ms']:.1f}/{s['tpot_p99_ms']:.1f} ms")
    if "prefix_cache" in results:
        p = results["prefix_cache"]
        print(f"prefix cache, {p['prefix_len']}-token prefix: TTFT miss {p['ttft_miss_s'] * 1e3:.0f} ms, "
              f"hit {p['ttft_hit_s'] * 1e3:.1f} ms ({p['speedup']:.1f}x)")
    if "floor" in results:
        f = results["floor"]
        print(f"B=1 decode step {f['step_ms']:.3f} ms = {f['ratio_to_floor']:.2f}x the weight-read floor "
              f"{f['weight_floor_ms']:.3f} ms")
    for context, rows in results.get("long", {}).items():
        print(f"\nlong context {context} + {args.long_output} output tokens, {args.cache_gib:g} GiB cache")
        print("| model | sequences | peak running | decode tok/s | overall output tok/s | TPOT p50 ms |")
        print("|---|---|---|---|---|---|")
        for name, r in rows.items():
            if "error" in r:
                print(f"| {name} | {r['error']} | | | | |")
                continue
            print(f"| {name} | {r['max_num_seqs']} | {r['peak_running']} | {r['decode_tokens_per_s'] or 0:,.0f} | "
                  f"{r['output_tokens_per_s']:,.0f} | {r['tpot_p50_ms'] or 0:.2f} |")
        kl, mla = rows.get("kimi_linear", {}), rows.get("mla_only", {})
        if kl.get("peak_running") and mla.get("peak_running"):
            ratio = (kl["decode_tokens_per_s"] or 0) / (mla["decode_tokens_per_s"] or float("inf"))
            print(f"Kimi Linear / MLA-only: {kl['peak_running'] / mla['peak_running']:.2f}x sequences, "
                  f"{ratio:.2f}x decode throughput, "
                  f"{kl['output_tokens_per_s'] / mla['output_tokens_per_s']:.2f}x overall output throughput")


if __name__ == "__main__":
    main()
