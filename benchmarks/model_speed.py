"""Whole-model prefill and decode on a GPU: ours vs HF transformers' kimi_linear (+ FLA), same random weights.

With ``--compare transformers``, HF transformers' ``kimi_linear`` runs beside ours (on FLA's kernels when FLA is
importable). Prints a table last and writes model_speed.json into --out.

    python -m benchmarks model_speed --compare transformers [--configs small,0.75b] [--prefill 4096,32768,131072]
    python -m benchmarks model_speed --configs 0.75b --prefill '' --decode '' --compare transformers \
        --many 64:1024,8:8192,1:65536 --e2e 64:1024:256 --engine      # issue 27 rows and the serving engine

Configs: "small" (the preset, MoE, byte vocab) and "0.75b" (the FLA comparison's peer config: 12 layers 3:1,
hidden 2048, 16 heads, KDA 16x128, MLA kv_lora 512, dense SwiGLU 5632, vocab 32000). bf16, random weights
(same config both sides). Prefill: B = 1, one forward over T tokens (ours: chunk kernel + MLA with causal
kernels; HF: its forward with use_cache). Decode: per-token time of a step at context C after a prefill;
ours replays one CUDA graph per token (recurrent KDA kernel, absorbed MLA), HF steps through ``generate``
(time of n + 1 new tokens minus 1, over n). Times are medians of CUDA-event timings after warm-up.

Many prompts (``--many B:T,...``): B random prompts of T tokens, three ways over the same tokens:
``generate(prompts, max_new_tokens=1)`` (packed varlen prefill into a fresh cache, first token), the model's
own batched forward ``hidden_states([B, T])`` plus the head on the last tokens (no cache), and HF's
``generate(max_new_tokens=1)``. End to end (``--e2e B:T:N``): B prompts of T tokens, N new tokens each,
greedy, no stop: output tokens/s of ``generate()`` (static batch) vs HF ``generate``; with ``--engine`` also
the serving engine (``kimi_linear.serve.engine``) fed all B requests at once (max_num_seqs = B), with its
time-to-first-token p50/p99.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from benchmarks.common import SuiteParser, environment, median_ms, spin_up_gpu, write_json
from kimi_linear.config import KimiLinearConfig
from kimi_linear.generate import CudaGraphDecoder, decode_step, generate, prefill
from kimi_linear.layers.kda import KimiDeltaAttention
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.serve.engine import Engine, EngineConfig, SamplingParams

CONFIGS = {
    "small": lambda: KimiLinearConfig.from_preset("small", model_max_length=1 << 18),
    "0.75b": lambda: KimiLinearConfig(
        vocab_size=32000,
        hidden_size=2048,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=5632,
        first_k_dense_replace=12,
        num_experts=8,
        num_experts_per_token=2,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        kda_num_heads=16,
        kda_head_dim=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        model_max_length=1 << 18,
    ),
}


@contextlib.contextmanager
def kernel_backends(model, fused: bool):
    """The ShortConv of every KDA layer of ``model`` and chunk_kda's in-op activations on the fused Triton kernels
    (``fused``: their default on CUDA) or on PyTorch, restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, KimiDeltaAttention)]
    saved = [(m.conv_backend, m.preprocess_backend) for m in layers]
    for m in layers:
        m.conv_backend = m.preprocess_backend = "auto" if fused else "torch"
    try:
        yield
    finally:
        for m, (conv_backend, preprocess_backend) in zip(layers, saved):
            m.conv_backend, m.preprocess_backend = conv_backend, preprocess_backend


def ours_prefill(model, T: int, reps: int) -> float:
    ids = torch.randint(3, model.config.vocab_size, (1, T), device="cuda")

    def run():
        # what prefill() does for one prompt, minus turning a Python list into a tensor
        with torch.no_grad():
            cache = model.allocate_cache(1, T + 1)
            hidden = model.hidden_states(ids, cache=cache)
            model.lm_head(hidden[:, -1])

    return median_ms(run, reps)


def ours_decode(model, B: int, context: int, steps: int) -> tuple[float, float]:
    """(graph ms per step, eager ms per step) at ``context`` tokens."""
    prompts = torch.randint(3, model.config.vocab_size, (B, context)).tolist()
    cache = model.allocate_cache(B, context + 3 * steps + 8)
    decoder = CudaGraphDecoder(model, cache)
    with torch.no_grad():
        tokens = prefill(model, prompts, cache).argmax(-1)
    graph_ms = median_ms(lambda: decoder(tokens), steps, warmup=3)
    with torch.no_grad():
        eager_ms = median_ms(lambda: decode_step(model, tokens, cache), min(steps, 10), warmup=2)
    return graph_ms, eager_ms


def hf_model(config: KimiLinearConfig):
    import transformers

    hf_config = transformers.KimiLinearConfig(**config.to_hf())
    with torch.device("cuda"):
        model = transformers.KimiLinearForCausalLM(hf_config)
    return model.to(torch.bfloat16).eval()


def hf_prefill(model, T: int, reps: int) -> float:
    ids = torch.randint(3, model.config.vocab_size, (1, T), device="cuda")

    def run():
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    return median_ms(run, reps)


def hf_decode(model, B: int, context: int, steps: int) -> float:
    ids = torch.randint(3, model.config.vocab_size, (B, context), device="cuda")
    mask = torch.ones_like(ids)

    def gen(n):
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )

    one = median_ms(lambda: gen(1), 2)
    many = median_ms(lambda: gen(steps + 1), 2)
    return (many - one) / steps


def wall_time(fn, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` by the host clock, synchronised (for calls that sync themselves)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def many_prompts_row(ours, theirs, B: int, T: int, reps: int) -> dict:
    """generate(max_new_tokens=1) vs the batched forward vs HF generate(max_new_tokens=1), same tokens."""
    ids = torch.randint(3, ours.config.vocab_size, (B, T), device="cuda")
    prompts = ids.tolist()

    def forward():
        with torch.no_grad():
            ours.lm_head(ours.hidden_states(ids)[:, -1])

    row = dict(
        B=B,
        T=T,
        generate_ms=wall_time(lambda: generate(ours, prompts, max_new_tokens=1, stop_tokens=[]), reps),
        forward_ms=median_ms(forward, reps),
    )
    torch.cuda.empty_cache()
    if theirs is not None:
        mask = torch.ones_like(ids)
        row["hf_generate_ms"] = wall_time(
            lambda: theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                    pad_token_id=0, eos_token_id=None),
            reps,
        )
        torch.cuda.empty_cache()
    return row


def engine_run(model, prompts: list[list[int]], new: int, budget: int) -> dict:
    """All prompts into a fresh engine at once; wall time to the last token and TTFT percentiles."""
    max_len = max(map(len, prompts)) + new
    blocks = len(prompts) * -(-max_len // 64)  # the static batch's cache size, not the GPU's free memory
    engine = Engine(
        model, EngineConfig(max_num_seqs=len(prompts), max_model_len=max_len, num_blocks=blocks,
                            max_num_batched_tokens=budget)
    )
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    first, produced = {}, 0
    while engine.has_unfinished():
        for e in engine.step():
            if e.token_id is not None:
                produced += 1
                first.setdefault(e.request_id, time.perf_counter() - t0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    ttft = sorted(first.values())
    return dict(seconds=seconds, tokens=produced, ttft_p50_s=ttft[len(ttft) // 2],
                ttft_p99_s=ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))])


def e2e_row(ours, theirs, B: int, T: int, new: int, with_engine: bool, budget: int) -> dict:
    """Output tokens/s of B prompts of T tokens, ``new`` greedy tokens each: generate(), HF, the engine."""
    prompts = torch.randint(3, ours.config.vocab_size, (B, T)).tolist()
    warm = [p[: T // 4] for p in prompts]
    generate(ours, warm, max_new_tokens=4, stop_tokens=[])  # compile what the first call would
    t0 = time.perf_counter()
    out = generate(ours, prompts, max_new_tokens=new, stop_tokens=[])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    row = dict(B=B, T=T, new=new, generate_tok_s=sum(map(len, out)) / seconds, generate_s=seconds)
    torch.cuda.empty_cache()
    if with_engine:
        engine_run(ours, warm, 4, budget)
        torch.cuda.empty_cache()
        run = engine_run(ours, prompts, new, budget)
        row.update(engine_tok_s=run["tokens"] / run["seconds"], engine_s=run["seconds"],
                   engine_ttft_p50_s=run["ttft_p50_s"], engine_ttft_p99_s=run["ttft_p99_s"], engine_budget=budget)
        torch.cuda.empty_cache()
    if theirs is not None:
        ids = torch.tensor(prompts, device="cuda")
        mask = torch.ones_like(ids)
        kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
        theirs.generate(input_ids=ids[:, : T // 4], attention_mask=mask[:, : T // 4], max_new_tokens=4,
                        min_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        theirs.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, **kw)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        row.update(hf_tok_s=B * new / seconds, hf_s=seconds)
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> None:
    parser = SuiteParser(__name__, __doc__, peers=("transformers",))
    parser.add_argument("--configs", default="small,0.75b")
    parser.add_argument("--prefill", default="4096,32768,131072")
    parser.add_argument("--hf-prefill-max", type=int, default=131072, help="longest prefill timed for HF")
    parser.add_argument("--decode", default="1:4096,64:1024", help="B:context pairs")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--many", default="", help="B:T pairs: many-prompt prefill rows (generate vs forward vs HF)")
    parser.add_argument("--e2e", default="", help="B:T:N triples: end-to-end output tokens/s")
    parser.add_argument("--engine", action="store_true", help="--e2e rows also through the serving engine")
    parser.add_argument("--engine-budget", type=int, default=16384, help="engine max_num_batched_tokens")
    parser.add_argument("--profile-many", default=None, metavar="CONFIG:B:T",
                        help="instead of the table: profile generate(max_new_tokens=1) of B prompts of T tokens")
    parser.add_argument(
        "--compare-backends",
        action="store_true",
        help="also time our prefill with the ShortConv and the in-op activations on PyTorch (ours_unfused_ms)",
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="CONFIG:T",
        help="instead of the table: profile our prefill of CONFIG at T tokens, print the top kernels",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("model_speed needs a CUDA GPU")
    try:
        import fla  # noqa: F401

        hf_kernels = "FLA " + getattr(fla, "__version__", "?")
    except ImportError:
        hf_kernels = "torch fallback (FLA not installed)"
    if args.profile_many:
        name, B, T = args.profile_many.split(":")
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = KimiLinearForCausalLM(CONFIGS[name]())
        model = model.to(torch.bfloat16).eval()
        prompts = torch.randint(3, model.config.vocab_size, (int(B), int(T))).tolist()
        activities = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
        generate(model, prompts, max_new_tokens=1, stop_tokens=[])
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities) as prof:
            generate(model, prompts, max_new_tokens=1, stop_tokens=[])
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
        return
    if args.profile:
        name, T = args.profile.split(":")
        with torch.device("cuda"):
            model = KimiLinearForCausalLM(CONFIGS[name]())
        model = model.to(torch.bfloat16).eval()
        activities = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
        ours_prefill(model, int(T), 1)
        with torch.profiler.profile(activities=activities) as prof:
            ours_prefill(model, int(T), 1)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        # one eager decode step at context T: which kernels, how many
        cache = model.allocate_cache(1, int(T) + 8)
        with torch.no_grad():
            tokens = prefill(model, [[5] * int(T)], cache).argmax(-1)
            decode_step(model, tokens, cache)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=activities) as prof:
                decode_step(model, tokens, cache)
                torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(
            f"decode step: {len(kernels)} kernels, "
            f"{sum(e.device_time_total for e in kernels) / 1e3:.3f} ms on the GPU"
        )
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
        return
    spin_up_gpu()
    rows, many, e2e = [], [], []
    for name in args.configs.split(","):
        config = CONFIGS[name]()
        torch.manual_seed(0)
        with torch.device("cuda"):
            ours = KimiLinearForCausalLM(config)
        ours = ours.to(torch.bfloat16).eval()
        theirs = hf_model(config) if "transformers" in args.compare else None
        params = sum(p.numel() for p in ours.parameters())
        for T in (int(t) for t in args.prefill.split(",") if t):
            reps = 7 if T <= 32768 else 2
            t0 = time.time()
            ms = ours_prefill(ours, T, reps)
            row = dict(config=name, params=params, phase="prefill", B=1, T=T, ours_ms=ms)
            if args.compare_backends:
                with kernel_backends(ours, fused=False):
                    row["ours_unfused_ms"] = ours_prefill(ours, T, reps)
            row["hf_ms"] = (
                hf_prefill(theirs, T, reps) if theirs is not None and T <= args.hf_prefill_max else None
            )
            rows.append(row)
            print(f"{name} prefill T={T}: {row} ({time.time() - t0:.0f}s)", flush=True)
            torch.cuda.empty_cache()
        for pair in filter(None, args.decode.split(",")):
            B, C = (int(x) for x in pair.split(":"))
            graph_ms, eager_ms = ours_decode(ours, B, C, args.steps)
            hf_ms = hf_decode(theirs, B, C, min(args.steps, 8)) if theirs is not None else None
            rows.append(
                dict(
                    config=name,
                    params=params,
                    phase="decode",
                    B=B,
                    T=C,
                    ours_ms=graph_ms,
                    ours_eager_ms=eager_ms,
                    hf_ms=hf_ms,
                )
            )
            print(
                f"{name} decode B={B} C={C}: ours graph {graph_ms:.3f} ms, eager {eager_ms:.2f} ms, "
                f"HF {hf_ms} ms",
                flush=True,
            )
            torch.cuda.empty_cache()
        for pair in filter(None, args.many.split(",")):
            B, T = (int(x) for x in pair.split(":"))
            row = many_prompts_row(ours, theirs, B, T, reps=3)
            many.append(dict(config=name, **row))
            print(f"{name} many prompts {B}x{T}: {row}", flush=True)
        for triple in filter(None, args.e2e.split(",")):
            B, T, N = (int(x) for x in triple.split(":"))
            row = e2e_row(ours, theirs, B, T, N, args.engine, args.engine_budget)
            e2e.append(dict(config=name, **row))
            print(f"{name} end to end {B}x({T} in, {N} out): {row}", flush=True)
        del ours, theirs
        torch.cuda.empty_cache()

    meta = environment(
        args,
        hf_kernels=hf_kernels if "transformers" in args.compare else None,
        conv_backend="triton",  # what the layers' "auto" runs on CUDA
        preprocess_backend="triton",
    )
    write_json(args.out, "model_speed.json", dict(meta=meta, rows=rows, many_prompts=many, end_to_end=e2e))
    print(f"\n{meta}")
    alt = "ours_unfused_ms" if any("ours_unfused_ms" in r for r in rows) else None
    alt_head = f" {'alt ms':>9}" if alt else ""
    print(f"(alt ms = {alt})" if alt else "")
    print(
        f"{'config':7} {'phase':8} {'B':>3} {'T/ctx':>7} {'ours ms':>9}{alt_head} {'ours tok/s':>11} {'HF ms':>9} "
        f"{'HF tok/s':>10} {'speed-up':>8}"
    )
    for r in rows:
        tokens = r["T"] * r["B"] if r["phase"] == "prefill" else r["B"]
        hf, ours_ms = r["hf_ms"], r["ours_ms"]
        hf_cols = (
            ("-", "-", "-")
            if hf is None
            else (f"{hf:.3f}", f"{tokens / hf * 1e3:.0f}", f"{hf / ours_ms:.2f}x")
        )
        alt_col = (f" {r[alt]:>9.3f}" if alt in r else f" {'-':>9}") if alt else ""
        print(
            f"{r['config']:7} {r['phase']:8} {r['B']:>3} {r['T']:>7} {ours_ms:>9.3f}{alt_col} "
            f"{tokens / ours_ms * 1e3:>11.0f} {hf_cols[0]:>9} {hf_cols[1]:>10} {hf_cols[2]:>8}"
        )
    if many:
        print_many(many)
    if e2e:
        print_e2e(e2e)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_many(many: list[dict]) -> None:
    print(f"\n{'config':7} {'prompts x tokens':>17} {'generate ms':>12} {'forward ms':>11} {'HF gen ms':>10} "
          f"{'gen/fwd':>8} {'gen/HF':>7}")
    for r in many:
        hf = r.get("hf_generate_ms")
        ratio_hf = None if hf is None else r["generate_ms"] / hf
        print(f"{r['config']:7} {r['B']:>8} x {r['T']:<6} {r['generate_ms']:>12.1f} {r['forward_ms']:>11.1f} "
              f"{_fmt(hf, '.1f'):>10} {r['generate_ms'] / r['forward_ms']:>8.2f} {_fmt(ratio_hf, '.2f'):>7}")


def print_e2e(e2e: list[dict]) -> None:
    print(f"\n{'config':7} {'B x (in, out)':>18} {'generate tok/s':>15} {'engine tok/s':>13} {'HF tok/s':>9} "
          f"{'gen/HF':>7} {'eng/gen':>8} {'TTFT p50/p99 s':>15}")
    for r in e2e:
        gen, hf, eng = r["generate_tok_s"], r.get("hf_tok_s"), r.get("engine_tok_s")
        ttft = None if eng is None else f"{r['engine_ttft_p50_s']:.2f}/{r['engine_ttft_p99_s']:.2f}"
        print(f"{r['config']:7} {r['B']:>4} x ({r['T']}, {r['new']}) {gen:>15.0f} {_fmt(eng, '.0f'):>13} "
              f"{_fmt(hf, '.0f'):>9} {_fmt(None if hf is None else gen / hf, '.2f'):>7} "
              f"{_fmt(None if eng is None else eng / gen, '.2f'):>8} {_fmt(ttft, ''):>15}")

