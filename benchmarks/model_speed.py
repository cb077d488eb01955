"""Whole-model prefill and decode on a GPU: ours vs HF transformers' kimi_linear (+ FLA), same random weights.

With ``--compare transformers``, HF transformers' ``kimi_linear`` runs beside ours (on FLA's kernels when FLA is
importable). Prints a table last and writes model_speed.json into --out.

    python -m benchmarks model_speed --compare transformers [--configs small,0.75b] [--prefill 4096,32768,131072]

Configs: "small" (the preset, MoE, byte vocab) and "0.75b" (DESIGN.md §5's peer config: 12 layers 3:1,
hidden 2048, 16 heads, KDA 16x128, MLA kv_lora 512, dense SwiGLU 5632, vocab 32000). bf16, random weights
(same config both sides). Prefill: B = 1, one forward over T tokens (ours: chunk kernel + MLA with causal
kernels; HF: its forward with use_cache). Decode: per-token time of a step at context C after a prefill;
ours replays one CUDA graph per token (recurrent KDA kernel, absorbed MLA), HF steps through ``generate``
(time of n + 1 new tokens minus 1, over n). Times are medians of CUDA-event timings after warm-up.
"""

from __future__ import annotations

import contextlib
import time

import torch

from benchmarks.common import SuiteParser, environment, median_ms, spin_up_gpu, write_json
from kimi_linear.config import KimiLinearConfig
from kimi_linear.generate import CudaGraphDecoder, decode_step, prefill
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.ops import conv
from kimi_linear.ops.kda import common as kda_common
from kimi_linear.ops.kda.chunk_fwd import FWD_CONFIG

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
def kernel_backends(fused: bool):
    """Our ShortConv and chunk_kda's in-op activations on the fused Triton kernels (``fused``) or on PyTorch."""
    saved = conv.DEFAULT_BACKEND, kda_common.PREPROCESS_BACKEND
    conv.DEFAULT_BACKEND = kda_common.PREPROCESS_BACKEND = "triton" if fused else "torch"
    try:
        yield
    finally:
        conv.DEFAULT_BACKEND, kda_common.PREPROCESS_BACKEND = saved


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


def main(argv=None) -> None:
    parser = SuiteParser(__name__, __doc__, peers=("transformers",))
    parser.add_argument("--configs", default="small,0.75b")
    parser.add_argument("--prefill", default="4096,32768,131072")
    parser.add_argument("--hf-prefill-max", type=int, default=131072, help="longest prefill timed for HF")
    parser.add_argument("--decode", default="1:4096,64:1024", help="B:context pairs")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument(
        "--compare-backends",
        action="store_true",
        help="also time our prefill with the other setting of the fused conv / preprocessing kernels",
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
    rows = []
    for name in args.configs.split(","):
        config = CONFIGS[name]()
        torch.manual_seed(0)
        with torch.device("cuda"):
            ours = KimiLinearForCausalLM(config)
        ours = ours.to(torch.bfloat16).eval()
        theirs = hf_model(config) if "transformers" in args.compare else None
        params = sum(p.numel() for p in ours.parameters())
        for T in (int(t) for t in args.prefill.split(",")):
            reps = 7 if T <= 32768 else 2
            t0 = time.time()
            ms = ours_prefill(ours, T, reps)
            row = dict(config=name, params=params, phase="prefill", B=1, T=T, ours_ms=ms)
            if args.compare_backends:
                other = conv.DEFAULT_BACKEND != "triton"
                with kernel_backends(fused=other):
                    row["ours_fused_ms" if other else "ours_unfused_ms"] = ours_prefill(ours, T, reps)
            row["hf_ms"] = (
                hf_prefill(theirs, T, reps) if theirs is not None and T <= args.hf_prefill_max else None
            )
            rows.append(row)
            print(f"{name} prefill T={T}: {row} ({time.time() - t0:.0f}s)", flush=True)
            torch.cuda.empty_cache()
        for pair in args.decode.split(","):
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
        del ours, theirs
        torch.cuda.empty_cache()

    meta = environment(
        args,
        hf_kernels=hf_kernels if "transformers" in args.compare else None,
        conv_backend=conv.DEFAULT_BACKEND,
        preprocess_backend=kda_common.PREPROCESS_BACKEND,
        pairs_impl=FWD_CONFIG["pairs_impl"],
    )
    write_json(args.out, "model_speed.json", dict(meta=meta, rows=rows))
    print(f"\n{meta}")
    alt = next((k for r in rows for k in ("ours_fused_ms", "ours_unfused_ms") if k in r), None)
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

