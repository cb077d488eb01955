"""Chunk KDA forward and forward+backward vs FLA and SDPA, GDN, per-kernel times, decode (GPU).

B=1 (``--batch``: B sequences of T tokens each), H=32, K=V=128, bf16 q/k/v/beta, fp32 gates, T in {4k, 8k, 16k,
32k, 64k}:
  * forward and forward+backward in ms (``triton.testing.do_bench`` median, after warm-up, random inputs);
  * TFLOP/s by paper Eq. 13 (per head 6 T K^2 + 3 T C K + T C^2, C = 64; forward+backward counted as 3x that),
    SDPA by 2 T^2 K per head (causal) and 3x for forward+backward; the fraction of the 790 TFLOP/s bf16 ceiling;
  * the ratio of our time to FLA's (< 1 is faster);
  * the model's call ("fused": raw q, k, gate pre-activation and beta logits with ``use_qk_l2norm_in_kernel``,
    ``use_gate_in_kernel`` (A_log, dt_bias) and ``use_beta_sigmoid_in_kernel``), forward and forward+backward;
  * GDN (one scalar gate per head) through our kernels, next to FLA's GDN forward;
  * per-kernel times of our forward+backward at 8k and 32k (torch profiler, CUDA time per launch);
  * one decode step through the public ``fused_recurrent_kda`` (T=1, state pool in place) at B in {1,16,64,256},
    eager (host wall-clock per call) and replayed in a CUDA graph, with the effective state bandwidth.

FLA's numbers (``--compare fla``) sit beside ours in every table. Gates are logsigmoid(N(3, 1)) (decays mostly near 1); ``--gates steep`` draws -r softplus(N(0, 1)) with a rate r in
[1, 16] per head instead, large decays that send many diagonal blocks of the forward to its element-wise fallback.
``--sweep`` also times other launch settings (``FwdLaunch`` / ``StateLaunch`` / ``BwdLaunch`` fields,
``dataclasses.replace`` on the defaults).

Writes ``kda_kernels.json`` and ``kda_kernels.png`` (log-log ms vs T) into --out and prints the table last.
Usage (GPU): python -m benchmarks kda_kernels --compare fla [--gates steep] [--sweep] [--batch 8 --T 4096]
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch
import torch.nn.functional as F

from benchmarks.common import SuiteParser, bench_ms, environment, graph_ms, host_us, load_fla, pyplot, write_json
from kimi_linear.ops.kda import chunk_kda
from kimi_linear.ops.kda.chunk_bwd import bwd_launch
from kimi_linear.ops.kda.chunk_fwd import fwd_launch
from kimi_linear.ops.kda.chunk_triton import chunk_kda_triton

H, K, V, C = 32, 128, 128, 64


def kda_flops(T: int, B: int = 1) -> float:
    """Paper Eq. 13, forward, all heads."""
    return B * H * (6 * T * K * K + 3 * T * C * K + T * C * C)


def attn_flops(T: int, B: int = 1) -> float:
    return B * H * 2 * T * T * K


def make_inputs(T: int, seed: int, scalar_gate: bool = False, requires_grad: bool = False, gates: str = "mild",
                B: int = 1) -> dict:
    """Random inputs at the benchmark's shape, B sequences of T tokens. ``gates``: "mild" (logsigmoid(N(3, 1)))
    or "steep" (large decays: every diagonal block of the forward's diag_impl "dots" goes to its element-wise
    fallback)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, K, device="cuda", generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, device="cuda", generator=gen), dim=-1)
    q = F.normalize(q, dim=-1)
    v = torch.randn(B, T, H, V, device="cuda", generator=gen)
    g_shape = (B, T, H) if scalar_gate else (B, T, H, K)
    if gates == "steep":  # per head a rate in [1, 16] times softplus of a standard normal: ~-6 per step
        rate = torch.empty(1, 1, H, *[1] * len(g_shape[3:]), device="cuda")
        rate = rate.uniform_(0.0, math.log(16.0), generator=gen).exp()
        g = -rate * F.softplus(torch.randn(*g_shape, device="cuda", generator=gen))
    else:
        g = F.logsigmoid(torch.randn(*g_shape, device="cuda", generator=gen) + 3.0)  # decays mostly near 1
    beta = torch.rand(B, T, H, device="cuda", generator=gen).sigmoid()
    x = dict(q=q.bfloat16(), k=k.bfloat16(), v=v.bfloat16(), g=g.float(), beta=beta.bfloat16())
    if requires_grad:
        for t in x.values():
            t.requires_grad_(True)
    return x


FUSED = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)


def make_fused_inputs(T: int, seed: int, requires_grad: bool = False, B: int = 1) -> dict:
    """Inputs of the model's call (``FUSED``), as the KDA layer hands them over: raw bf16 q, k, v, the gate's
    pre-activation and the beta logits (bf16, a linear layer's outputs), A_log ``[H]`` and dt_bias ``[H * K]``
    fp32. The gate -exp(A_log) softplus(g + dt_bias) then has a mean log-decay of about -0.2 (the mild
    gates': about -0.07)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = {n: torch.randn(B, T, H, D, device="cuda", generator=gen).bfloat16() for n, D in (("q", K), ("k", K), ("v", V))}
    x["g"] = torch.randn(B, T, H, K, device="cuda", generator=gen).bfloat16()
    x["beta"] = torch.randn(B, T, H, device="cuda", generator=gen).bfloat16()
    x["A_log"] = torch.empty(H, device="cuda").uniform_(0.0, math.log(16.0), generator=gen)  # rates 1 to 16
    x["dt_bias"] = torch.randn(H * K, device="cuda", generator=gen) - 4.0
    if requires_grad:
        for t in x.values():
            t.requires_grad_(True)
    return x


bench = bench_ms  # do_bench median, 100 ms warm-up, 400 ms of calls


def time_chunk(T: int, fla_kda, fla_gdn, gates: str = "mild", B: int = 1) -> dict:
    row = {"T": T, "B": B}
    x = make_inputs(T, seed=T, gates=gates, B=B)
    with torch.no_grad():
        row["ours_fwd"] = bench(lambda: chunk_kda(**x, backend="triton"))
        if fla_kda is not None:
            row["fla_fwd"] = bench(lambda: fla_kda(**x))
    xg = make_inputs(T, seed=T, requires_grad=True, gates=gates, B=B)
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    leaves = list(xg.values())
    row["ours_fwdbwd"] = bench(lambda: chunk_kda(**xg, backend="triton")[0].backward(do), grad_to_none=leaves)
    if fla_kda is not None:
        row["fla_fwdbwd"] = bench(lambda: fla_kda(**xg)[0].backward(do), grad_to_none=leaves)

    # the model's call: the three in-op activations
    xf = make_fused_inputs(T, seed=T + 2, B=B)
    with torch.no_grad():
        row["ours_fused_fwd"] = bench(lambda: chunk_kda(**xf, **FUSED, backend="triton"))
        if fla_kda is not None:
            row["fla_fused_fwd"] = bench(lambda: fla_kda(**xf, **FUSED))
    xf = make_fused_inputs(T, seed=T + 2, requires_grad=True, B=B)
    leaves = list(xf.values())
    row["ours_fused_fwdbwd"] = bench(lambda: chunk_kda(**xf, **FUSED, backend="triton")[0].backward(do),
                                     grad_to_none=leaves)
    if fla_kda is not None:
        row["fla_fused_fwdbwd"] = bench(lambda: fla_kda(**xf, **FUSED)[0].backward(do), grad_to_none=leaves)

    # GDN: one scalar gate per head, same kernels
    xs = make_inputs(T, seed=T + 1, scalar_gate=True, gates=gates, B=B)
    with torch.no_grad():
        row["ours_gdn_fwd"] = bench(lambda: chunk_kda(**xs, backend="triton"))
        if fla_gdn is not None:
            try:
                row["fla_gdn_fwd"] = bench(lambda: fla_gdn(xs["q"], xs["k"], xs["v"], xs["g"], xs["beta"]))
            except Exception as e:  # noqa: BLE001
                print(f"FLA GDN forward failed: {e!r}")

    # SDPA causal, [B, H, T, D]
    qa, ka, va = (torch.randn(B, H, T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        row["sdpa_fwd"] = bench(lambda: F.scaled_dot_product_attention(qa, ka, va, is_causal=True))
    doa = torch.randn_like(qa)
    row["sdpa_fwdbwd"] = bench(
        lambda: F.scaled_dot_product_attention(qa, ka, va, is_causal=True).backward(doa), grad_to_none=[qa, ka, va]
    )
    del x, xg, xf, xs, qa, ka, va
    torch.cuda.empty_cache()
    return row


def kernel_breakdown(T: int, op=None, backward: bool = True, gates: str = "mild", B: int = 1) -> dict:
    """CUDA time per kernel (ms per call) of a forward(+backward) of ``op`` (ours by default), torch profiler."""
    if op is None:
        op = lambda **x: chunk_kda(**x, backend="triton")  # noqa: E731
    xg = make_inputs(T, seed=7, requires_grad=backward, gates=gates, B=B)
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)

    def call():
        o = op(**xg)[0]
        if backward:
            o.backward(do)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    reps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = ev.cuda_time_total
        if t > 0:
            out[ev.key] = t / 1e3 / reps  # ms per call
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def time_decode(batches) -> list[dict]:
    try:
        import kimi_linear.ops.kda.recurrent_triton  # noqa: F401 - is the Triton decode kernel there?
        from kimi_linear.ops.kda import fused_recurrent_kda
    except Exception as e:  # noqa: BLE001
        print(f"decode kernel not available: {e!r}")
        return []
    rows = []
    for B in batches:
        gen = torch.Generator(device="cuda").manual_seed(B)
        q = F.normalize(torch.randn(B, 1, H, K, device="cuda", generator=gen), dim=-1).bfloat16()
        k = F.normalize(torch.randn(B, 1, H, K, device="cuda", generator=gen), dim=-1).bfloat16()
        v = torch.randn(B, 1, H, V, device="cuda", generator=gen).bfloat16()
        g = F.logsigmoid(torch.randn(B, 1, H, K, device="cuda", generator=gen) + 3.0)
        beta = torch.rand(B, 1, H, device="cuda", generator=gen).bfloat16()
        pool = torch.randn(B, H, K, V, device="cuda", generator=gen)
        slots = torch.arange(B, device="cuda", dtype=torch.int32)

        def step():
            return fused_recurrent_kda(q, k, v, g, beta, initial_state=pool, state_indices=slots, backend="triton")

        eager_us = host_us(step, iters=200, warmup=5)
        graph_us = graph_ms(step) * 1e3
        state_bytes = 2 * B * H * K * V * 4
        rows.append({"B": B, "eager_us": eager_us, "graph_us": graph_us,
                     "graph_GBps": state_bytes / (graph_us * 1e-6) / 1e9})
    return rows


def launch_variant(change: dict) -> dict:
    """The default launch settings with ``change`` applied (``{"fwd": {field: value}, "state": {...}, "bwd":
    {...}}``), as ``chunk_kda_triton`` keyword arguments."""
    fwd = fwd_launch(K, V, torch.bfloat16)
    state = dataclasses.replace(fwd.state, **change.get("state", {}))
    return {"fwd": dataclasses.replace(fwd, **change.get("fwd", {}), state=state),
            "bwd": dataclasses.replace(bwd_launch(K, V, torch.bfloat16), **change.get("bwd", {}))}


def sweep_launch_settings(T: int, variants: list[dict] | None = None, gates: str = "mild") -> list[dict]:
    """Forward and forward+backward at one T for a few launch settings (``launch_variant``).

    Each setting's output and input gradients are also compared with the first setting's (the shipped one):
    ``max_rel_diff`` is the largest of those relative differences — the same math in another order, so it should
    sit at the bf16 rounding level (~1e-2 at most) and a broken variant shows as O(1)."""
    x = make_inputs(T, seed=3, gates=gates)
    xg = make_inputs(T, seed=3, requires_grad=True, gates=gates)
    do = torch.randn(1, T, H, V, device="cuda", dtype=torch.bfloat16)
    # the shipped setting is timed first and again last: the first entry of a run also pays for warm-up
    variants = variants or [{}, {"fwd": {"offdiag_stages": 2}}, {"state": {"bv": 64}}, {"bwd": {"inter_stages": 3}},
                            {}]
    out = []
    first = None
    for change in variants:
        launch = launch_variant(change)
        try:
            for t in xg.values():
                t.grad = None
            o = chunk_kda_triton(**xg, **launch)[0]
            o.backward(do)
            # copies: the timing below accumulates into these .grad tensors in place
            got = [o.detach().float().clone()] + [t.grad.float().clone() for t in xg.values()]
            first = first or got
            diff = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got, first))
            with torch.no_grad():
                f = bench(lambda: chunk_kda_triton(**x, **launch))
            fb = bench(lambda: chunk_kda_triton(**xg, **launch)[0].backward(do), grad_to_none=list(xg.values()))
            out.append({"change": change, "fwd": f, "fwdbwd": fb, "max_rel_diff": diff})
        except Exception as e:  # noqa: BLE001
            out.append({"change": change, "error": repr(e)[:200]})
    return out


def plot(rows, path):
    plt = pyplot()
    Ts = [r["T"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 5))
    for key, label, style in [
        ("ours_fwd", "ours KDA fwd", "o-"), ("fla_fwd", "FLA KDA fwd", "s--"), ("sdpa_fwd", "SDPA fwd", "^:"),
        ("ours_fwdbwd", "ours KDA fwd+bwd", "o-"), ("fla_fwdbwd", "FLA KDA fwd+bwd", "s--"),
        ("sdpa_fwdbwd", "SDPA fwd+bwd", "^:"), ("ours_gdn_fwd", "ours GDN fwd", "x-"),
    ]:
        if all(key in r for r in rows):
            ax.plot(Ts, [r[key] for r in rows], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"T (tokens), B={rows[0]['B'] if rows else 1}, H=32, K=V=128, bf16")
    ax.set_ylabel("ms (median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = SuiteParser(__name__, __doc__, peers=("fla",))
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--batch", type=int, default=1, help="sequences per call (B) of the chunk timings (default 1)")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--sweep", action="store_true", help="also time launch settings of the sequential passes")
    ap.add_argument("--breakdown", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--gates", choices=["mild", "steep"], default="mild",
                    help="log-decay inputs: logsigmoid(N(3, 1)) (mild), or -r softplus(N(0, 1)) with r in [1, 16]")
    ap.add_argument("--sweep-only", metavar="JSON", nargs="?", const="[]",
                    help='only the 8k sweep, of these settings (a JSON list like [{}, {"fwd": {"offdiag_stages": 2}}]; '
                         'default the built-in list)')
    args = ap.parse_args(argv)
    fla = load_fla() if "fla" in args.compare else None
    fla_kda, fla_gdn = (fla.chunk_kda, fla.chunk_gated_delta_rule) if fla else (None, None)
    result = environment(
        args,
        gates=args.gates,
        fwd_launch=dataclasses.asdict(fwd_launch(K, V, torch.bfloat16)),
        bwd_launch=dataclasses.asdict(bwd_launch(K, V, torch.bfloat16)),
        shape={"B": args.batch, "H": H, "K": K, "V": V, "dtype": "bf16 q/k/v/beta, fp32 g"},
    )
    if args.sweep or args.sweep_only is not None:
        result["sweep_8k"] = sweep_launch_settings(8192, json.loads(args.sweep_only or "[]"), gates=args.gates)
        for r in result["sweep_8k"]:
            print("sweep 8k:", json.dumps(r), flush=True)
    if args.sweep_only is not None:
        write_json(args.out, "kda_kernels_sweep.json", result)
        return
    rows = []
    for T in args.T:
        try:
            row = time_chunk(T, fla_kda, fla_gdn, gates=args.gates, B=args.batch)
        except Exception as e:  # noqa: BLE001 - report and go on to the next size
            print(f"T={T}: failed: {e!r}"[:400])
            torch.cuda.empty_cache()
            continue
        rows.append(row)
        print(json.dumps(row), flush=True)
    result["chunk"] = rows
    result["breakdown"] = {}
    for T in args.breakdown:
        try:
            result["breakdown"][T] = kernel_breakdown(T, gates=args.gates, B=args.batch)
        except Exception as e:  # noqa: BLE001
            print(f"breakdown T={T} failed: {e!r}"[:400])
    if fla_kda is not None and args.breakdown:
        T = args.breakdown[0]
        for tag, bwd in (("fwd", False), ("fwdbwd", True)):
            try:
                result["breakdown"][f"FLA {tag} {T}"] = kernel_breakdown(T, fla_kda, backward=bwd, gates=args.gates,
                                                                         B=args.batch)
            except Exception as e:  # noqa: BLE001
                print(f"FLA breakdown {tag} failed: {e!r}"[:400])
        try:
            result["breakdown"][f"ours fwd {T}"] = kernel_breakdown(T, backward=False, gates=args.gates, B=args.batch)
        except Exception as e:  # noqa: BLE001
            print(f"breakdown fwd failed: {e!r}"[:400])
    try:
        result["decode"] = time_decode(args.decode_batches)
    except Exception as e:  # noqa: BLE001
        print(f"decode failed: {e!r}"[:400])
        result["decode"] = []
    write_json(args.out, "kda_kernels.json", result)
    plot(rows, args.out / "kda_kernels.png")

    for T, br in result["breakdown"].items():
        print(f"\nper-kernel ms per call ({T}; plain T = ours fwd+bwd):")
        for name, ms in list(br.items())[:12]:
            print(f"  {ms:8.3f}  {name[:90]}")
    if result["decode"]:
        print("\ndecode step (one layer, T=1, H=32, K=V=128, fp32 state pool in place):")
        print(f"{'B':>5} {'eager us':>9} {'graph us':>9} {'GB/s':>8}")
        for d in result["decode"]:
            print(f"{d['B']:5d} {d['eager_us']:9.1f} {d['graph_us']:9.1f} {d['graph_GBps']:8.0f}")
    print(f"\n{result.get('gpu')}, torch {result['torch']}, triton {result['triton']}, FLA {result['fla']}, "
          f"commit {result['commit']}")
    hdr = (f"{'T':>6} | {'ours fwd':>8} {'FLA fwd':>8} {'ratio':>6} {'TF/s':>6} | {'ours f+b':>8} {'FLA f+b':>8} "
           f"{'ratio':>6} {'TF/s':>6} | {'GDN ours':>8} {'GDN FLA':>8} | {'SDPA f':>7} {'SDPA f+b':>8}")
    print(hdr)
    for r in rows:
        T, B = r["T"], r["B"]
        f = lambda key: r.get(key, math.nan)  # noqa: E731
        print(f"{T:6d} | {f('ours_fwd'):8.3f} {f('fla_fwd'):8.3f} {f('ours_fwd') / f('fla_fwd'):6.2f} "
              f"{kda_flops(T, B) / f('ours_fwd') / 1e9:6.1f} | {f('ours_fwdbwd'):8.3f} {f('fla_fwdbwd'):8.3f} "
              f"{f('ours_fwdbwd') / f('fla_fwdbwd'):6.2f} {3 * kda_flops(T, B) / f('ours_fwdbwd') / 1e9:6.1f} | "
              f"{f('ours_gdn_fwd'):8.3f} {f('fla_gdn_fwd'):8.3f} | {f('sdpa_fwd'):7.3f} {f('sdpa_fwdbwd'):8.3f}")
    print("\nthe model's call (q/k L2 norm, gate and beta sigmoid in the op), ms:")
    print(f"{'T':>6} | {'ours fwd':>8} {'FLA fwd':>8} {'ratio':>6} | {'ours f+b':>8} {'FLA f+b':>8} {'ratio':>6}")
    for r in rows:
        f = lambda key: r.get(key, math.nan)  # noqa: E731
        print(f"{r['T']:6d} | {f('ours_fused_fwd'):8.3f} {f('fla_fused_fwd'):8.3f} "
              f"{f('ours_fused_fwd') / f('fla_fused_fwd'):6.2f} | {f('ours_fused_fwdbwd'):8.3f} "
              f"{f('fla_fused_fwdbwd'):8.3f} {f('ours_fused_fwdbwd') / f('fla_fused_fwdbwd'):6.2f}")

