"""MoE layer forward and forward+backward: ours vs transformers' KimiLinearMoE (GPU or CPU).

Ours "auto" (decode GEMV kernels for a few tokens, else grouped by expert with torch._grouped_mm), the grouped
path and the loop over experts forced, CUDA-graph replay for decode sizes; with ``--compare transformers``, HF
transformers' KimiLinearMoE with each of its experts implementations holding the same weights.
Prints a table last and writes moe_speed.json into --out.

    python -m benchmarks moe_speed --compare transformers                # release shapes, bf16 (GPU)
    python -m benchmarks moe_speed --device cpu --shape small            # a CPU-sized layer, fp32

Shapes: "48b" = the release's MoE layer (D=2304, E=256, K=8, F=1024, 1 shared expert); "small" = D=512, E=16,
K=2, F=256. N is the number of tokens in one call (decode: N = batch; prefill: N = B*T).
Timing: CUDA: triton.testing.do_bench (median after warm-up); CPU: wall-clock median of 5. "floor" is the larger
of FLOPs / 790 TFLOP/s and (expert weights touched + activations in/out) / 4.8 TB/s, the H200 ceilings
measured on the H200 (benchmarks/common.py); "of floor" = floor / time (CUDA only).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks.common import (
    H200_BF16_TFLOPS,
    H200_HBM_TBPS,
    SuiteParser,
    bench_ms,
    capture_graph,
    environment,
    median_ms,
    write_json,
)
from kimi_linear.layers.moe import MoE

SHAPES = {
    "48b": dict(hidden_size=2304, num_experts=256, num_experts_per_token=8, moe_intermediate_size=1024),
    "small": dict(hidden_size=512, num_experts=16, num_experts_per_token=2, moe_intermediate_size=256),
}
PEAK_FLOPS, PEAK_BYTES = H200_BF16_TFLOPS * 1e12, H200_HBM_TBPS * 1e12


def build(shape: str, device: str, dtype: torch.dtype):
    config = SimpleNamespace(**SHAPES[shape], num_shared_experts=1, routed_scaling_factor=2.446,
                             moe_renormalize=True, moe_router_activation_func="sigmoid",
                             initializer_range=0.02)
    with torch.device(device):
        moe = MoE(config)
        with torch.no_grad():
            moe.gate.weight.normal_(0, config.hidden_size**-0.5)
            moe.gate.e_score_correction_bias.normal_(0, 0.02)
    return config, moe.to(dtype)


def build_hf(config, moe, implementation: str):
    """transformers' layer holding the same weights (SystemExit when transformers has no kimi_linear)."""
    try:
        from transformers.models.kimi_linear.configuration_kimi_linear import KimiLinearConfig
        from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearMoE
    except ImportError as e:
        raise SystemExit(f"--compare transformers: transformers' kimi_linear cannot be imported ({e!r})") from e
    hf_config = KimiLinearConfig(
        hidden_size=config.hidden_size, num_experts=config.num_experts,
        num_experts_per_token=config.num_experts_per_token,
        moe_intermediate_size=config.moe_intermediate_size, num_shared_experts=1,
        routed_scaling_factor=config.routed_scaling_factor, moe_renormalize=True, num_hidden_layers=2,
        vocab_size=64, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    hf_config._experts_implementation = implementation
    device, dtype = moe.experts.w1.device, moe.experts.w1.dtype
    with torch.device("meta"):
        hf = KimiLinearMoE(hf_config)
    hf = hf.to_empty(device=device).to(dtype)
    with torch.no_grad():
        hf.gate.weight.data = moe.gate.weight.detach().clone()  # fp32, as HF keeps it
        hf.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.clone()
        hf.experts.gate_up_proj.copy_(torch.cat([moe.experts.w1, moe.experts.w3], dim=1))
        hf.experts.down_proj.copy_(moe.experts.w2)
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_experts, n).weight.copy_(getattr(moe.shared_experts, n).weight)
    return hf


def timer(device: str):
    """Median ms of a call: do_bench on CUDA, the host clock over 5 calls after one on the CPU."""
    if device == "cuda":
        return lambda fn: bench_ms(fn, warmup=25, rep=100)
    return lambda fn: median_ms(fn, reps=5, warmup=1, cuda=False)


def graph_forward(moe, x):
    """Our forward captured in a CUDA graph: returns a replay function (decode steps run like this)."""
    static_x = x.clone()

    def forward():
        with torch.no_grad():
            moe(static_x)

    return capture_graph(forward)


def floor_ms(config, n_tokens: int, distinct_experts: int, elsize: int, backward: bool) -> float:
    D, F = config.hidden_size, config.moe_intermediate_size
    K, E = config.num_experts_per_token, config.num_experts
    flops = 2 * n_tokens * D * 3 * F * (K + 1) + 2 * n_tokens * D * E
    weights = (distinct_experts + 1) * 3 * D * F * elsize + E * D * 4
    activations = 2 * n_tokens * D * elsize
    if backward:
        flops, weights, activations = 3 * flops, 3 * weights, 3 * activations
    return max(flops / PEAK_FLOPS, (weights + activations) / PEAK_BYTES) * 1e3


def main(argv=None) -> None:
    parser = SuiteParser(__name__, __doc__, peers=("transformers",))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=list(SHAPES), default=None,
                        help="default: 48b on CUDA, small on CPU")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts per call")
    parser.add_argument("--train-min-tokens", type=int, default=512,
                        help="time forward+backward from this N on")
    parser.add_argument("--impls", default=None, help="comma-separated subset of the implementations")
    args = parser.parse_args(argv)
    device = args.device
    shape = args.shape or ("48b" if device == "cuda" else "small")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    default_tokens = "1,8,64,4096,16384" if device == "cuda" else "1,64,2048"
    tokens = [int(t) for t in (args.tokens or default_tokens).split(",")]
    measure = timer(device)
    torch.manual_seed(0)

    config, moe = build(shape, device, dtype)
    impls = {"ours": ("ours", "auto"), "ours-grouped_mm": ("ours", "grouped_mm"),
             "ours-loop": ("ours", "loop")}
    if "transformers" in args.compare:
        for name in ("eager", "grouped_mm", "batched_mm"):
            impls[f"hf-{name}"] = ("hf", name)
    if args.impls:
        unknown = sorted(set(args.impls.split(",")) - set(impls))
        if unknown:
            raise SystemExit(f"--impls: {unknown} not among {sorted(impls)} (hf-* need --compare transformers)")
        impls = {name: impls[name] for name in args.impls.split(",")}
    hf_modules = {}
    rows = []
    for n in tokens:
        x = torch.randn(1, n, config.hidden_size, device=device, dtype=dtype)
        with torch.no_grad():
            moe(x)
        distinct = int((moe.last_expert_load > 0).sum())
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd+bwd" and n < args.train_min_tokens:
                continue
            floor = floor_ms(config, n, distinct, x.element_size(), mode == "fwd+bwd")
            for name, (kind, variant) in impls.items():
                if name == "hf-batched_mm" and n * config.num_experts_per_token > 512:
                    continue  # gathers one weight copy per token-slot: out of memory beyond decode sizes
                row = dict(shape=shape, tokens=n, mode=mode, impl=name, distinct_experts=distinct)
                try:
                    if kind == "ours":
                        moe.expert_backend = variant
                        module = moe
                    else:
                        if variant not in hf_modules:
                            hf_modules[variant] = build_hf(config, moe, variant)
                        module = hf_modules[variant]
                    if mode == "fwd":
                        def fn(module=module, x=x):
                            with torch.no_grad():
                                module(x)
                    else:
                        xg = x.detach().clone().requires_grad_()
                        dy = torch.randn_like(x)

                        def fn(module=module, xg=xg, dy=dy):
                            module(xg).backward(dy)
                    row["ms"] = measure(fn)
                    if device == "cuda":
                        row["floor_ms"], row["of_floor"] = floor, floor / row["ms"]
                except Exception as exc:  # a peer that fails at a size is reported, not fatal
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
                if device == "cuda":
                    for m in [moe, *hf_modules.values()]:
                        for p in m.parameters() if m is not None else ():
                            p.grad = None
            if device == "cuda" and mode == "fwd" and n <= 64 and "ours" in impls:
                moe.expert_backend = "auto"
                ms = measure(graph_forward(moe, x))
                rows.append(dict(shape=shape, tokens=n, mode=mode, impl="ours-cudagraph",
                                 distinct_experts=distinct, ms=ms, floor_ms=floor, of_floor=floor / ms))
        del x

    meta = environment(args, device=device, dtype=str(dtype), shape=SHAPES[shape])
    write_json(args.out, "moe_speed.json", dict(meta=meta, rows=rows))

    where = meta.get("gpu") if device == "cuda" else meta["cpu"]
    print(f"MoE layer, {shape} {SHAPES[shape]}, {dtype}, {where}, torch {torch.__version__}, commit {meta['commit']}")
    print(f"{'N':>6} {'mode':>8} {'impl':>16} {'ms':>10} {'vs ours':>8} {'of floor':>9}  experts hit")
    ours_ms = {(r["tokens"], r["mode"]): r["ms"] for r in rows if r["impl"] == "ours" and "ms" in r}
    for r in rows:
        if "ms" in r:
            ratio = r["ms"] / ours_ms.get((r["tokens"], r["mode"]), float("nan"))
            of_floor = f"{r['of_floor']:>8.1%}" if "of_floor" in r else f"{'-':>8}"
            print(f"{r['tokens']:>6} {r['mode']:>8} {r['impl']:>16} {r['ms']:>10.3f} {ratio:>7.2f}x "
                  f"{of_floor}  {r['distinct_experts']}")
        else:
            print(f"{r['tokens']:>6} {r['mode']:>8} {r['impl']:>16}   {r['error']}")

