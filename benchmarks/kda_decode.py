"""Recurrent KDA decode step: ours (and FLA with --compare fla), eager and in a CUDA graph (GPU); and a whole KDA
layer's decode step, fused in one launch against the unfused sequence it replaced.

One decode step of one layer: one token per sequence, H heads, K x V state per (sequence, head) in fp32 or bf16
(``--state-dtypes``), bf16 inputs. The step is bound by the state traffic (read + write K*V*s bytes per head, s = 4
or 2), so the figure of merit is the effective state bandwidth 2 * B * H * K * V * s / time, reported against an
element-wise kernel reading and writing the same bytes. A bf16 state is timed in the serving path only (pool mode
and the fused layer step): the kernels widen it to fp32 and store it rounded.

Modes:
  pool   ours, serving path: the state pool is updated in place through ``state_indices``.
  h0     ours, FLA's calling convention: ``initial_state`` in, a new final state out.
  fla    ``fla.ops.kda.fused_recurrent_kda`` with ``initial_state`` and ``output_final_state=True``
         (``--compare fla``).

Layer step (``--layer-batches``, default B = 1 and 256; H = 32, K = V = R = 128, W = 4, bf16 projections and
weights, fp32 state, the dense cache's in-place pools): everything between the input projections and o_proj.
  fused    ``kda_decode_step``: one Triton launch (conv, activations, gate and output-gate GEMVs, recurrence,
           gated RMSNorm).
  unfused  what the layer ran before it: conv filter cat, ``causal_conv1d_update``, the f_b GEMV,
           ``fused_recurrent_kda`` with its in-kernel activations, fp32 RMSNorm, the g_b GEMV, sigmoid, cast.
Reported in µs per layer-step (eager and graph, as below) and as the fraction of the state-traffic floor: the
copy time of the state's bytes (read and written once) over the graph time.

Timing: "eager" is host wall-clock per call over back-to-back calls (what a Python decode loop pays, launch
overhead included); "graph" is one CUDA graph holding L consecutive layer-steps, each on its own state, timed
by ``triton.testing.do_bench_cudagraph`` (median) and divided by L (L is chosen so the states of one replay far exceed the L2, as
across a real model). ``--sweep`` also times every (BV, num_warps) launch configuration in graph mode;
``--layer-sweep`` the fused layer step at 4, 8 and 16 warps.

Accuracy of a bf16 state (``--accuracy``, CPU or GPU, no timing): one model decodes the same text with an fp32
and a bf16 KDA state cache (``KimiLinearCache(state_dtype=...)``), and, for scale, with the whole model in bf16
(weights and activations, fp32 state). Teacher-forced on the text's next tokens for ``--steps`` steps: relative RMS
error of the logits against the fp32 state (mean and max, and the mean over windows of steps, to see it grow), the
KL divergence of the next-token distribution, greedy top-1 agreement; then free-running greedy decoding from the
same prompts: tokens before the first divergence. The model is ``--checkpoint`` or a preset (``--preset``) at its
own random init; the text is this package's own source (Python code, like the training corpus).

Usage (GPU): python -m benchmarks kda_decode --compare fla [--sweep] [--batches 1 16 64 256] [--layer-sweep]
  fp32 vs bf16 state: python -m benchmarks kda_decode --state-dtypes float32 bfloat16 --batches 1 256
  --layer-batches 1 256
Accuracy (CPU fine): python -m benchmarks kda_decode --accuracy --checkpoint DIR [--steps 300] [--rows 4]
Offline sm_90 registers and spills of the fused layer kernel (no GPU needed): python -m benchmarks kda_decode
--build-report
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton

from benchmarks.common import (SuiteParser, copy_us, environment, graph_ms, host_us, load_fla, resource_line,
                               sm90_resources, write_json)
from kimi_linear.ops.conv import causal_conv1d_update
from kimi_linear.ops.kda import fused_recurrent_kda, kda_decode_step
from kimi_linear.ops.kda.recurrent_triton import _default_block_v, _default_num_warps, fused_recurrent_kda_triton

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SWEEP_CONFIGS = [(8, 1), (16, 1), (16, 2), (32, 2), (32, 4), (32, 8), (64, 2), (64, 4), (64, 8), (128, 8), (128, 16)]
GRAPH_BYTES = 256 * 2**20  # state bytes touched per graph replay, well above the H200's 60 MB L2
LAYER_WARPS = (4, 8, 16)
CONV_WIDTH = 4
EPS = 1e-5


def make_inputs(B: int, H: int, K: int, V: int, device: str, seed: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, 1, H, K, device=device, generator=gen).bfloat16()
    k = torch.randn(B, 1, H, K, device=device, generator=gen)
    k = torch.nn.functional.normalize(k, dim=-1).bfloat16()
    v = torch.randn(B, 1, H, V, device=device, generator=gen).bfloat16()
    g = (-torch.rand(B, 1, H, K, device=device, generator=gen) * 0.5).bfloat16()
    beta = torch.rand(B, 1, H, device=device, generator=gen).bfloat16()
    return dict(q=q, k=k, v=v, g=g, beta=beta)


def time_graph(fns, rep_ms: int) -> float:
    """Microseconds per layer-step: one graph runs every fn in ``fns`` once (median over ``rep_ms`` ms of replays)."""
    return graph_ms(lambda: [fn() for fn in fns], calls=len(fns), rep=rep_ms) * 1e3


def bench_batch(B, H, K, V, fla, sweep: bool, state_dtype: str = "float32") -> dict:
    """One row of the recurrent op's table; with a bf16 state only the pool mode (the serving path) and the sweep."""
    dtype = STATE_DTYPES[state_dtype]
    fp32 = dtype == torch.float32
    state_bytes = B * H * K * V * dtype.itemsize
    layers = max(1, min(32, math.ceil(GRAPH_BYTES / state_bytes)))
    x = make_inputs(B, H, K, V, "cuda", seed=B)
    pools = [torch.randn(B, H, K, V, device="cuda").to(dtype) for _ in range(layers)]
    slots = torch.arange(B, device="cuda", dtype=torch.int32)
    default_bv = _default_block_v(B * H, triton.next_power_of_2(K), V)
    row = dict(B=B, H=H, K=K, V=V, state_dtype=state_dtype, layers_in_graph=layers, state_MB=state_bytes / 2**20,
               default_BV=default_bv, default_warps=_default_num_warps(triton.next_power_of_2(K), default_bv))

    def ours_pool(i):
        return lambda: fused_recurrent_kda(**x, initial_state=pools[i], state_indices=slots)

    def ours_h0(i):
        return lambda: fused_recurrent_kda(**x, initial_state=pools[i], output_final_state=True)

    iters = 200 if B <= 64 else 50
    row["pool_eager_us"] = host_us(ours_pool(0), iters)
    row["pool_graph_us"] = time_graph([ours_pool(i) for i in range(layers)], 50)
    row["copy_us"] = copy_us(state_bytes)
    if not fp32:
        row["o_rel_diff_vs_fp32_state"] = _bf16_pool_output_diff(x, B, H, K, V)
    else:
        row["h0_eager_us"] = host_us(ours_h0(0), iters)
        row["h0_graph_us"] = time_graph([ours_h0(i) for i in range(layers)], 50)

    if fla is not None and fp32:
        h0 = torch.randn(B, H, K, V, device="cuda")
        o_ours, ht_ours = fused_recurrent_kda(**x, initial_state=h0, output_final_state=True)

        def fla_h0(i):
            return lambda: fla(**x, initial_state=pools[i], output_final_state=True)

        row["fla_eager_us"] = host_us(fla_h0(0), iters)
        try:
            row["fla_graph_us"] = time_graph([fla_h0(i) for i in range(layers)], 50)
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
            print(f"FLA graph capture failed at B={B}: {e!r}")
            row["fla_graph_us"] = float("nan")
        o_fla, ht_fla = fla(**x, initial_state=h0, output_final_state=True)
        row["o_rel_diff_vs_fla"] = ((o_ours.float() - o_fla.float()).norm() / o_fla.float().norm()).item()
        row["state_rel_diff_vs_fla"] = ((ht_ours - ht_fla).norm() / ht_fla.norm()).item()

    if sweep:
        row["sweep"] = {}
        for BV, warps in SWEEP_CONFIGS:
            fns = [
                (lambda i=i, BV=BV, warps=warps: fused_recurrent_kda_triton(
                    **x, initial_state=pools[i], state_indices=slots, block_v=BV, num_warps=warps))
                for i in range(layers)
            ]
            row["sweep"][f"BV{BV}-w{warps}"] = time_graph(fns, 30)
    return row


def _bf16_pool_output_diff(x: dict, B: int, H: int, K: int, V: int) -> float:
    """Relative difference of one step's output from a bf16 pool against the same states in an fp32 pool (the
    state rounding alone; the step itself is fp32 in both)."""
    start = torch.randn(B, H, K, V, device="cuda").bfloat16()
    slots = torch.arange(B, device="cuda")
    o16, _ = fused_recurrent_kda(**x, initial_state=start.clone(), state_indices=slots)
    o32, _ = fused_recurrent_kda(**x, initial_state=start.float(), state_indices=slots)
    return ((o16.float() - o32.float()).norm() / o32.float().norm()).item()


def gbps(state_bytes: float, us: float) -> float:
    return 2 * state_bytes / (us * 1e-6) / 1e9


# ---- the whole layer step: fused vs unfused ---------------------------------------------------------------


def make_layer(B: int, H: int, K: int, device: str, seed: int,
               state_dtype: torch.dtype = torch.float32) -> tuple[dict, dict, dict]:
    """(projections of one token, the layer's weights, its pools) at the release's proportions: R = V = K."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    x = dict(qkv=randn(B, 3 * H * K), f_low=randn(B, K), beta_logits=randn(B, H), g_low=randn(B, K))
    w = dict(conv_weights=tuple(randn(H * K, 1, CONV_WIDTH, scale=0.5) for _ in range(3)),
             f_b_weight=randn(H * K, K, scale=K**-0.5), A_log=randn(1, 1, H, 1, scale=0.3, dtype=torch.float32),
             dt_bias=randn(H * K, dtype=torch.float32), norm_weight=randn(K, scale=0.1) + 1,
             g_b_weight=randn(H * K, K, scale=K**-0.5))
    pools = dict(conv_pool=randn(B, 3 * H * K, CONV_WIDTH - 1), state_pool=randn(B, H, K, K, dtype=state_dtype))
    return x, w, pools


def fused_step(x: dict, w: dict, pools: dict, slots: torch.Tensor) -> torch.Tensor:
    return kda_decode_step(**x, **w, **pools, slots=slots, eps=EPS)


def unfused_step(x: dict, w: dict, pools: dict, slots: torch.Tensor) -> torch.Tensor:
    """The layer's decode step as it ran before ``kda_decode_step`` (dense cache: the pools updated in place)."""
    B, H, K, V = x["qkv"].shape[0], *pools["state_pool"].shape[1:]
    conv_weight = torch.cat(w["conv_weights"], dim=0)[:, 0]  # [3·H·K, W], every step
    qkv = causal_conv1d_update(x["qkv"], pools["conv_pool"], conv_weight)[:, None]  # [B, 1, 3·H·K]
    q, k, v = qkv.view(B, 1, 3, H, K).unbind(2)
    g = F.linear(x["f_low"][:, None], w["f_b_weight"]).view(B, 1, H, K)
    o, _ = fused_recurrent_kda(
        q, k, v, g, x["beta_logits"][:, None], initial_state=pools["state_pool"], state_indices=slots,
        use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=w["A_log"], dt_bias=w["dt_bias"],
        use_beta_sigmoid_in_kernel=True,
    )
    out = F.rms_norm(o.float(), (V,), w["norm_weight"].float(), EPS)
    out = out * torch.sigmoid(F.linear(x["g_low"][:, None], w["g_b_weight"]).view(B, 1, H, V).float())
    return out.to(o.dtype).reshape(B, H * V)


def bench_layer(B: int, H: int, K: int, sweep: bool, state_dtype: str = "float32") -> dict:
    from kimi_linear.ops.kda.decode_triton import DecodeLaunch, default_launch, kda_decode_step_triton

    dtype = STATE_DTYPES[state_dtype]
    state_bytes = B * H * K * K * dtype.itemsize
    layers = max(1, min(32, math.ceil(GRAPH_BYTES / state_bytes)))
    x, w, _ = make_layer(B, H, K, "cuda", seed=B)
    pools = [make_layer(B, H, K, "cuda", seed=1000 + i, state_dtype=dtype)[2] for i in range(layers)]
    slots = torch.arange(B, device="cuda")
    launch = default_launch(K, K, K)
    row = dict(B=B, H=H, K=K, V=K, R=K, W=CONV_WIDTH, state_dtype=state_dtype, layers_in_graph=layers,
               state_MB=state_bytes / 2**20, block_v=launch.block_v, block_r=launch.block_r, warps=launch.num_warps)

    def steps(fn):
        return [lambda i=i: fn(x, w, pools[i], slots) for i in range(layers)]

    iters = 200 if B <= 64 else 50
    for name, fn in (("fused", fused_step), ("unfused", unfused_step)):
        row[f"{name}_eager_us"] = host_us(lambda fn=fn: fn(x, w, pools[0], slots), iters)
        row[f"{name}_graph_us"] = time_graph(steps(fn), 50)
    row["copy_us"] = copy_us(state_bytes)

    # the same step on copies of the same pools: the two paths agree to bf16 rounding
    start = make_layer(B, H, K, "cuda", seed=7, state_dtype=dtype)[2]
    outs = [fn(x, w, {n: t.clone() for n, t in start.items()}, slots).float() for fn in (fused_step, unfused_step)]
    row["o_rel_diff_fused_vs_unfused"] = ((outs[0] - outs[1]).norm() / outs[1].norm()).item()

    if sweep:
        row["sweep"] = {}
        for warps in LAYER_WARPS:
            cfg = DecodeLaunch(block_v=launch.block_v, block_r=launch.block_r, num_warps=warps)

            def fused_with(x, w, p, slots, cfg=cfg):
                return kda_decode_step_triton(
                    x["qkv"], x["f_low"], x["beta_logits"], x["g_low"], p["conv_pool"], w["conv_weights"],
                    w["f_b_weight"], w["A_log"], w["dt_bias"], p["state_pool"], slots, w["norm_weight"],
                    w["g_b_weight"], EPS, K**-0.5, launch=cfg)

            row["sweep"][f"w{warps}"] = time_graph(steps(fused_with), 30)
    return row


def build_report(H: int = 32, D: int = 128) -> None:
    """Registers and spills of the fused layer kernel compiled for sm_90 (Triton's bundled ptxas, no GPU), bf16
    activations and weights, fp32 state, R = K: each configuration of the layer at its default launch, and the
    release configuration at 4, 8 and 16 warps, at K = V = D and K = V = 256."""
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("--build-report compiles for sm_90: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    from kimi_linear.ops.kda.decode_triton import _kda_decode_step_kernel as fn
    from kimi_linear.ops.kda.decode_triton import default_launch
    from kimi_linear.ops.kda.recurrent_triton import SOFTPLUS_THRESHOLD

    fp32 = {"state_pool", "A_log", "dt_bias"}
    configs = {"kda": (True, True, False), "gdn": (True, True, True), "kda-no-conv": (False, True, False),
               "kda-no-gate": (True, False, False), "gdn-no-conv-no-gate": (False, False, True)}
    jobs = [(D, name, None) for name in configs] + [(D, "kda", w) for w in LAYER_WARPS]
    jobs += [(256, "kda", None), (256, "gdn-no-conv-no-gate", None)]
    for K, name, warps in jobs:
        conv, gate, scalar = configs[name]
        launch = default_launch(K, K, K)
        warps = warps or launch.num_warps
        NV = triton.cdiv(K, launch.block_v)
        consts = dict(H=H, K=K, V=K, W=CONV_WIDTH, R_F=K, R_G=K, BK=K, BV=launch.block_v, NV=NV,
                      BNV=triton.next_power_of_2(NV), BW=triton.next_power_of_2(CONV_WIDTH), BR=launch.block_r,
                      USE_CONV=conv, SCALAR_GATE=scalar, USE_OUTPUT_GATE=gate, L2_EPS=1e-6,
                      SP_THRESHOLD=SOFTPLUS_THRESHOLD, INTERPRET=False)
        absent = ([] if conv else ["conv_pool", "w_q", "w_k", "w_v"]) + ([] if gate else ["g_low", "g_b"])
        consts.update(dict.fromkeys(absent))
        names = [n for n in fn.arg_names if n not in consts]
        sig = {n: "fp32" if n in ("eps", "scale") else "i32" if n == "num_slots" or n.startswith("stride")
               else "*i64" if n == "slots" else "*fp32" if n in fp32 else "*bf16" for n in names}
        sig.update(dict.fromkeys(absent, "constexpr"))
        # attributes are keyed by the argument's position among all of the kernel's arguments
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*")}
        r = sm90_resources(fn, sig, consts, attrs, warps, 1)
        print(f"K=V={K:3d} {name:20s} BV={launch.block_v:3d} BR={launch.block_r:3d} {resource_line(r, warps, 1)}",
              flush=True)


# ---- accuracy of a bf16 state --------------------------------------------------------------------------------

ACCURACY_WINDOWS = ((0, 10), (10, 100), (100, 300), (300, 1000))


def _accuracy_model(checkpoint: str | None, preset: str, seed: int, device: str):
    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM

    if checkpoint:
        return KimiLinearForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device=device).eval()
    torch.manual_seed(seed)
    return KimiLinearForCausalLM(KimiLinearConfig.from_preset(preset)).to(device).eval()


def _accuracy_text(rows: int, length: int, vocab: int) -> torch.Tensor:
    """``[rows, length]`` token ids: bytes of this package's own Python source, rows taken from evenly spaced
    offsets (byte-level vocabularies; ids folded into the vocabulary otherwise)."""
    from pathlib import Path

    import kimi_linear

    root = Path(kimi_linear.__file__).parent
    text = b"".join(f.read_bytes() for f in sorted(root.rglob("*.py")))
    stride = (len(text) - length) // rows
    ids = [list(text[r * stride : r * stride + length]) for r in range(rows)]
    return torch.tensor(ids) % vocab


@torch.no_grad()
def _teacher_forced(model, text: torch.Tensor, prompt: int, steps: int, state_dtype: torch.dtype) -> torch.Tensor:
    """Logits ``[steps + 1, rows, vocab]`` fp32: after the prompt, then after each of the text's next tokens."""
    from kimi_linear.cache import KimiLinearCache
    from kimi_linear.generate import decode_step, prefill

    rows = text.shape[0]
    cache = KimiLinearCache(model.config, rows, prompt + steps + 1, dtype=model.dtype, device=model.device,
                            state_dtype=state_dtype)
    text = text.to(model.device)
    logits = [prefill(model, text[:, :prompt].tolist(), cache)]
    for t in range(steps):
        logits.append(decode_step(model, text[:, prompt + t], cache))
    return torch.stack(logits).float().cpu()


@torch.no_grad()
def _greedy(model, prompts: list[list[int]], steps: int, state_dtype: torch.dtype) -> torch.Tensor:
    from kimi_linear.generate import generate

    out = generate(model, prompts, max_new_tokens=steps, stop_tokens=[], use_cuda_graph=False,
                   state_dtype=state_dtype)
    return torch.tensor(out)


def _compare(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    """Errors of the decode steps' ``logits`` against ``ref`` (both ``[S + 1, rows, vocab]``; row 0, the prompt's
    last logits, does not depend on the stored state and is left out)."""
    logits, ref = logits[1:], ref[1:]
    rel = ((logits - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).double()  # [S]
    logp, logq = ref.log_softmax(-1).double(), logits.log_softmax(-1).double()
    kl = (logp.exp() * (logp - logq)).sum(-1)  # [S, rows]
    top1 = (logits.argmax(-1) == ref.argmax(-1)).double()  # [S, rows]
    windows = {f"{a + 1}-{min(b, len(rel))}": rel[a:b].mean().item() for a, b in ACCURACY_WINDOWS if a < len(rel)}
    return dict(logits_rel_err_mean=rel.mean().item(), logits_rel_err_max=rel.max().item(),
                logits_rel_err_by_window=windows, kl_mean=kl.mean().item(), kl_max=kl.max().item(),
                top1_agreement=top1.mean().item())


def accuracy(args) -> dict:
    """fp32 vs bf16 KDA state (and a bf16 model for scale) on one model; see the module docstring."""
    import copy

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _accuracy_model(args.checkpoint, args.preset, args.seed, device)
    text = _accuracy_text(args.rows, args.prompt_len + args.steps, model.config.vocab_size)
    runs = {"fp32 state": (model, torch.float32), "bf16 state": (model, torch.bfloat16)}
    if not args.no_bf16_model:
        runs["bf16 model, fp32 state"] = (copy.deepcopy(model).to(torch.bfloat16), torch.float32)
    logits = {name: _teacher_forced(m, text, args.prompt_len, args.steps, sd) for name, (m, sd) in runs.items()}
    ref = logits["fp32 state"]
    result = dict(model=args.checkpoint or f"preset {args.preset} (random init, seed {args.seed})",
                  rows=args.rows, prompt_len=args.prompt_len, steps=args.steps, device=device,
                  teacher_forced={name: _compare(lg, ref) for name, lg in logits.items() if name != "fp32 state"})
    prompts = text[:, : args.prompt_len].tolist()
    free = {name: _greedy(m, prompts, args.steps, sd) for name, (m, sd) in runs.items()}
    free_ref = free["fp32 state"]
    result["free_running"] = {}
    for name, tokens in free.items():
        if name == "fp32 state":
            continue
        same = (tokens == free_ref).cumprod(1).sum(1)  # [rows] tokens before the first divergence
        result["free_running"][name] = dict(tokens_before_divergence=same.tolist(),
                                            identical_rows=int((same == args.steps).sum()))
    return result


def print_accuracy(meta: dict, r: dict) -> None:
    print(f"\n{meta}")
    print(f"Accuracy of the KDA state dtype: {r['model']}, {r['rows']} rows, {r['prompt_len']}-token prompts, "
          f"{r['steps']} decode steps on {r['device']}; errors against the fp32 state (teacher-forced on the text; "
          "logits error = relative RMS over the vocabulary and rows, per step)\n")
    windows = list(next(iter(r["teacher_forced"].values()))["logits_rel_err_by_window"])
    print("| run | logits err mean | logits err max | " + " | ".join(f"mean, steps {w}" for w in windows)
          + " | KL mean | KL max | top-1 agreement | free-running: tokens before divergence (rows) |")
    print("|---|---|---|" + "---|" * len(windows) + "---|---|---|---|")
    for name, m in r["teacher_forced"].items():
        cells = " | ".join(f"{m['logits_rel_err_by_window'][w]:.2e}" for w in windows)
        free = r["free_running"][name]["tokens_before_divergence"]
        print(f"| {name} | {m['logits_rel_err_mean']:.2e} | {m['logits_rel_err_max']:.2e} | {cells} | "
              f"{m['kl_mean']:.1e} | {m['kl_max']:.1e} | {m['top1_agreement']:.2%} | {free} of {r['steps']} |")


def main(argv=None) -> None:
    parser = SuiteParser(__name__, __doc__, peers=("fla",))
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64, 256],
                        help="batch sizes of the recurrent op's table (none: skip it)")
    parser.add_argument("--layer-batches", type=int, nargs="*", default=[1, 256],
                        help="batch sizes of the fused vs unfused layer step (none: skip it)")
    parser.add_argument("--state-dtypes", nargs="+", choices=list(STATE_DTYPES), default=["float32"],
                        help="KDA state dtypes to time (default float32); with both, a bf16 / fp32 table is added")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--sweep", action="store_true", help="also time every (BV, num_warps) configuration")
    parser.add_argument("--layer-sweep", action="store_true",
                        help=f"also time the fused layer step at {', '.join(map(str, LAYER_WARPS))} warps")
    parser.add_argument("--build-report", action="store_true",
                        help="compile the fused layer kernel for sm_90 offline (no GPU) and print its registers")
    accuracy_args = parser.add_argument_group("accuracy of a bf16 state (--accuracy; no timing, CPU or GPU)")
    accuracy_args.add_argument("--accuracy", action="store_true",
                               help="measure the logits with a bf16 vs an fp32 KDA state instead of timing")
    accuracy_args.add_argument("--checkpoint", default=None, help="model folder (default: --preset at random init)")
    accuracy_args.add_argument("--preset", default="small", help="preset without --checkpoint (default small)")
    accuracy_args.add_argument("--steps", type=int, default=300, help="decode steps (default 300)")
    accuracy_args.add_argument("--rows", type=int, default=4, help="sequences decoded together (default 4)")
    accuracy_args.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row (default 64)")
    accuracy_args.add_argument("--seed", type=int, default=0, help="seed of the random init (default 0)")
    accuracy_args.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    accuracy_args.add_argument("--no-bf16-model", action="store_true",
                               help="skip the whole-model-in-bf16 run given for scale")
    args = parser.parse_args(argv)
    if args.build_report:
        build_report(args.heads, args.head_dim)
        return
    if args.accuracy:
        result = accuracy(args)
        meta = environment(args)
        write_json(args.out, "kda_decode_accuracy.json", dict(meta=meta, **result))
        print_accuracy(meta, result)
        return
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (--accuracy and --build-report do not)")

    H, D = args.heads, args.head_dim
    fla = load_fla().fused_recurrent_kda if "fla" in args.compare else None
    rows = [bench_batch(B, H, D, D, fla, args.sweep, sd) for sd in args.state_dtypes for B in args.batches]
    layer_rows = [bench_layer(B, H, D, args.layer_sweep, sd) for sd in args.state_dtypes for B in args.layer_batches]
    meta = environment(args)
    write_json(args.out, "kda_decode.json", dict(meta=meta, rows=rows, layer_rows=layer_rows))

    if args.sweep:
        print("\nGraph-mode us per layer-step by launch configuration (pool mode):")
        for r in rows:
            best = min(r["sweep"], key=r["sweep"].get)
            cells = "  ".join(f"{n}={t:.1f}" for n, t in r["sweep"].items())
            print(f"B={r['B']} {r['state_dtype']}: best {best} {r['sweep'][best]:.1f} us | default "
                  f"BV{r['default_BV']}-w{r['default_warps']} | {cells}")
    if args.layer_sweep:
        print("\nGraph-mode us per fused layer-step by num_warps:")
        for r in layer_rows:
            cells = "  ".join(f"{n}={t:.1f}" for n, t in r["sweep"].items())
            print(f"B={r['B']} {r['state_dtype']}: default w{r['warps']} | {cells}")

    print(f"\n{meta}")
    nan = float("nan")
    if rows:
        print(f"Decode step, one layer, H={H}, K=V={D}, bf16 inputs; us per step (eager = host wall-clock per call; "
              "graph = per layer-step inside a CUDA graph); h0 and FLA with an fp32 state only\n")
        print("| state | B | ours pool eager | ours pool graph | ours h0 eager | ours h0 graph | FLA eager | FLA graph "
              "| ours pool graph GB/s | copy GB/s | graph ratio FLA/ours (h0) | o diff vs FLA (fp32) or vs an fp32 "
              "pool (bf16) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            sb = r["state_MB"] * 2**20
            fla_e, fla_g = r.get("fla_eager_us", nan), r.get("fla_graph_us", nan)
            diff = r.get("o_rel_diff_vs_fla", r.get("o_rel_diff_vs_fp32_state", nan))
            print(f"| {r['state_dtype']} | {r['B']} | {r['pool_eager_us']:.1f} | {r['pool_graph_us']:.1f} | "
                  f"{r.get('h0_eager_us', nan):.1f} | {r.get('h0_graph_us', nan):.1f} | {fla_e:.1f} | {fla_g:.1f} | "
                  f"{gbps(sb, r['pool_graph_us']):.0f} | {gbps(sb, r['copy_us']):.0f} | "
                  f"{fla_g / r.get('h0_graph_us', nan):.2f} | {diff:.1e} |")
    if layer_rows:
        print(f"\nWhole KDA layer decode step between the projections and o_proj, H={H}, K=V=R={D}, W={CONV_WIDTH}, "
              "bf16 projections and weights; us per layer-step; floor = copy of the state's bytes "
              "(read + write) in a graph\n")
        print("| state | B | fused eager | fused graph | unfused eager | unfused graph | graph speed-up | fused GB/s "
              "| floor us | fused / floor | unfused / floor | o diff fused vs unfused |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in layer_rows:
            sb = r["state_MB"] * 2**20
            fg, ug = r["fused_graph_us"], r["unfused_graph_us"]
            print(f"| {r['state_dtype']} | {r['B']} | {r['fused_eager_us']:.1f} | {fg:.1f} | "
                  f"{r['unfused_eager_us']:.1f} | {ug:.1f} | {ug / fg:.2f}x | {gbps(sb, fg):.0f} | "
                  f"{r['copy_us']:.1f} | {r['copy_us'] / fg:.0%} | {r['copy_us'] / ug:.0%} | "
                  f"{r['o_rel_diff_fused_vs_unfused']:.1e} |")
    if {"float32", "bfloat16"} <= set(args.state_dtypes):
        print("\nbf16 state against fp32 state, graph time fp32 / bf16 (> 1: the bf16 state is faster)\n")
        print("| B | recurrent op, pool | fused layer step |")
        print("|---|---|---|")
        for B in sorted(set(args.batches) | set(args.layer_batches)):
            cells = []
            for table, key in ((rows, "pool_graph_us"), (layer_rows, "fused_graph_us")):
                t = {r["state_dtype"]: r[key] for r in table if r["B"] == B}
                cells.append(f"{t['float32'] / t['bfloat16']:.2f}x" if len(t) == 2 else "-")
            print(f"| {B} | {cells[0]} | {cells[1]} |")
