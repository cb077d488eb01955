"""Recurrent KDA decode step: ours (and FLA with --compare fla), eager and in a CUDA graph (GPU).

One decode step of one layer: one token per sequence, H heads, K x V fp32 state per (sequence, head), bf16
inputs. The step is bound by the state traffic (read + write K*V*4 bytes per head), so the figure of merit is
the effective state bandwidth 2 * B * H * K * V * 4 / time, reported against a device-to-device copy of the
same bytes.

Modes:
  pool   ours, serving path: the state pool is updated in place through ``state_indices``.
  h0     ours, FLA's calling convention: ``initial_state`` in, a new final state out.
  fla    ``fla.ops.kda.fused_recurrent_kda`` with ``initial_state`` and ``output_final_state=True``
         (``--compare fla``).

Timing: "eager" is host wall-clock per call over back-to-back calls (what a Python decode loop pays, launch
overhead included); "graph" is one CUDA graph holding L consecutive layer-steps, each on its own state, timed
by ``triton.testing.do_bench_cudagraph`` (median) and divided by L (L is chosen so the states of one replay far exceed the L2, as
across a real model). ``--sweep`` also times every (BV, num_warps) launch configuration in graph mode.

Usage (GPU): python -m benchmarks kda_decode --compare fla [--sweep] [--batches 1 16 64 256]
"""

from __future__ import annotations

import math

import torch
import triton

from benchmarks.common import SuiteParser, copy_us, environment, graph_ms, host_us, load_fla, write_json
from kimi_linear.ops.kda import fused_recurrent_kda
from kimi_linear.ops.kda.recurrent_triton import _default_block_v, _default_num_warps, fused_recurrent_kda_triton

SWEEP_CONFIGS = [(8, 1), (16, 1), (16, 2), (32, 2), (32, 4), (32, 8), (64, 2), (64, 4), (64, 8)]
GRAPH_BYTES = 256 * 2**20  # state bytes touched per graph replay, well above the H200's 60 MB L2


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


def bench_batch(B, H, K, V, fla, sweep: bool) -> dict:
    state_bytes = B * H * K * V * 4
    layers = max(1, min(32, math.ceil(GRAPH_BYTES / state_bytes)))
    x = make_inputs(B, H, K, V, "cuda", seed=B)
    pools = [torch.randn(B, H, K, V, device="cuda") for _ in range(layers)]
    slots = torch.arange(B, device="cuda", dtype=torch.int32)
    default_bv = _default_block_v(B * H, triton.next_power_of_2(K), V)
    row = dict(B=B, H=H, K=K, V=V, layers_in_graph=layers, state_MB=state_bytes / 2**20,
               default_BV=default_bv, default_warps=_default_num_warps(triton.next_power_of_2(K), default_bv))

    def ours_pool(i):
        return lambda: fused_recurrent_kda(**x, initial_state=pools[i], state_indices=slots)

    def ours_h0(i):
        return lambda: fused_recurrent_kda(**x, initial_state=pools[i], output_final_state=True)

    iters = 200 if B <= 64 else 50
    row["pool_eager_us"] = host_us(ours_pool(0), iters)
    row["pool_graph_us"] = time_graph([ours_pool(i) for i in range(layers)], 50)
    row["h0_eager_us"] = host_us(ours_h0(0), iters)
    row["h0_graph_us"] = time_graph([ours_h0(i) for i in range(layers)], 50)
    row["copy_us"] = copy_us(state_bytes)

    h0 = torch.randn(B, H, K, V, device="cuda")
    o_ours, ht_ours = fused_recurrent_kda(**x, initial_state=h0, output_final_state=True)
    if fla is not None:
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


def gbps(state_bytes: float, us: float) -> float:
    return 2 * state_bytes / (us * 1e-6) / 1e9


def main(argv=None) -> None:
    parser = SuiteParser(__name__, __doc__, peers=("fla",))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--sweep", action="store_true", help="also time every (BV, num_warps) configuration")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")

    H, D = args.heads, args.head_dim
    fla = load_fla().fused_recurrent_kda if "fla" in args.compare else None
    rows = [bench_batch(B, H, D, D, fla, args.sweep) for B in args.batches]
    meta = environment(args)
    write_json(args.out, "kda_decode.json", dict(meta=meta, rows=rows))

    if args.sweep:
        print("\nGraph-mode us per layer-step by launch configuration (pool mode):")
        for r in rows:
            best = min(r["sweep"], key=r["sweep"].get)
            cells = "  ".join(f"{n}={t:.1f}" for n, t in r["sweep"].items())
            print(f"B={r['B']}: best {best} {r['sweep'][best]:.1f} us | default BV{r['default_BV']}-w"
                  f"{r['default_warps']} | {cells}")

    print(f"\n{meta}")
    print(f"Decode step, one layer, H={H}, K=V={D}, bf16 inputs, fp32 state; us per step "
          "(eager = host wall-clock per call; graph = per layer-step inside a CUDA graph)\n")
    print("| B | ours pool eager | ours pool graph | ours h0 eager | ours h0 graph | FLA eager | FLA graph "
          "| ours pool graph GB/s | copy GB/s | graph ratio FLA/ours (h0) | o diff vs FLA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sb = r["state_MB"] * 2**20
        fla_e, fla_g = r.get("fla_eager_us", float("nan")), r.get("fla_graph_us", float("nan"))
        print(f"| {r['B']} | {r['pool_eager_us']:.1f} | {r['pool_graph_us']:.1f} | {r['h0_eager_us']:.1f} | "
              f"{r['h0_graph_us']:.1f} | {fla_e:.1f} | {fla_g:.1f} | {gbps(sb, r['pool_graph_us']):.0f} | "
              f"{gbps(sb, r['copy_us']):.0f} | {fla_g / r['h0_graph_us']:.2f} | "
              f"{r.get('o_rel_diff_vs_fla', float('nan')):.1e} |")

