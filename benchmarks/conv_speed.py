"""ShortConv (causal depthwise conv1d + SiLU): PyTorch path vs Triton kernels, forward and backward (GPU).

For T in {4k, 32k} and C in {4096 (one of q/k/v), 12288 (q, k, v stacked, the layer's single call)}, bf16, filter
width 4: forward, and forward + backward (dx, dweight), both backends in one run, medians by
``triton.testing.do_bench``. Cases: one sequence without state (training), and the same tokens packed as 8 varlen sequences with initial states and
the final state (prefill into a cache). The floor is memory traffic: forward reads x and writes y, backward also reads x and dy and writes dx (2 bytes each per element); the table gives the
achieved GB/s and its fraction of the measured ceiling (``benchmarks.common.ceiling_gbps``: an element-wise kernel
reading and writing 1 GiB). Prints the table last; writes conv_speed.json into --out.

Usage (GPU):   python -m benchmarks conv_speed [--sweep]
Offline sm_90 resources of the kernels (no GPU needed): python -m benchmarks conv_speed --build-report
"""

from __future__ import annotations

import dataclasses
import json

import torch

from benchmarks.common import SuiteParser, bench_ms, ceiling_gbps, environment, resource_line, sm90_resources, write_json

W = 4


def build_report() -> None:
    """Each kernel at its shipped launch (``conv_triton.conv_launch`` at C = 4096), in the variants the model runs:
    plain (one sequence per batch row), varlen without state (packed training), varlen with states and the final
    state (prefill into a cache)."""
    from kimi_linear.ops import conv_triton as ct

    fp32 = {"dw_part", "dh0"}
    ints = {"T_total", "T_seq", "C", "SX"}
    variants = {"plain": (False, False), "varlen": (False, True), "varlen+h0": (True, True)}
    jobs = []
    for act in (1, 0):
        for tag, (h0, varlen) in variants.items():
            c = ct.conv_launch(4096, h0)
            flags = dict(W=W, BC=c.bc, ACT=act, HAS_H0=h0, IS_VARLEN=varlen)
            label = f"{'silu' if act else 'none'} {tag}"
            jobs.append((ct.conv_fwd_kernel, dict(flags, BT=c.fwd_bt, INTERPRET=False), c, label))
            jobs.append((ct.conv_bwd_kernel, dict(flags, BT=c.bwd_bt, HAS_DFINAL=h0, INTERPRET=False), c, label))
        c = ct.conv_launch(4096, True)
        jobs.append((ct.conv_bwd_h0_kernel, dict(W=W, BC=c.bc, BW=4, ACT=act, HAS_DFINAL=True, IS_VARLEN=True), c,
                     f"{'silu' if act else 'none'} varlen"))
    c = ct.conv_launch(4096, True)
    jobs.append((ct.conv_final_state_kernel, dict(W=W, BC=c.bc, HAS_H0=True, IS_VARLEN=True, INTERPRET=False), c,
                 "varlen+h0"))
    print(f"sm_90 build, W={W}, bf16 x, C=4096: {ct.conv_launch(4096, False)}, with states {c}")
    for fn, consts, c, label in jobs:
        names = [n for n in fn.arg_names if n not in consts]
        sig = {n: "i32" if n in ints else "*i32" if n in ("cu_seqlens", "seq_idx") else "*fp32" if n in fp32
               else "*bf16" for n in names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
        r = sm90_resources(fn, sig, consts, attrs, c.warps, 1)
        print(f"{fn.__name__:24s} {label:15s} {resource_line(r, c.warps, 1)}", flush=True)


def bench_case(T: int, C: int, varlen: bool, launch=None, backends=("torch", "triton")) -> dict:
    """Forward and forward + backward of each backend; ``launch`` (a ``ConvLaunch``) for the Triton kernels, None
    for the shipped one."""
    from kimi_linear.ops.conv import causal_conv1d
    from kimi_linear.ops.conv_triton import causal_conv1d_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, T, C, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    w = (torch.randn(C, W, device="cuda", generator=gen) / 2).to(torch.bfloat16).requires_grad_()
    gy = torch.randn(1, T, C, device="cuda", dtype=torch.bfloat16, generator=gen)
    cu = h0 = None
    if varlen:
        N = 8
        cuts = torch.sort(torch.randint(1, T, (N - 1,), device="cuda", generator=gen)).values
        cu = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), T)]).to(torch.int32)
        h0 = torch.randn(N, C, W - 1, device="cuda", dtype=torch.bfloat16, generator=gen)

    def conv(backend):
        if backend == "triton":
            return causal_conv1d_triton(x, w, h0, cu, "silu", varlen, launch=launch)
        return causal_conv1d(x, w, initial_state=h0, cu_seqlens=cu, output_final_state=varlen, backend=backend)

    row = {"T": T, "C": C, "case": "varlen8+h0" if varlen else "plain"}
    elems = T * C
    for backend in backends:
        def fwd(backend=backend):
            with torch.no_grad():
                return conv(backend)

        def fwd_bwd(backend=backend):
            y, _ = conv(backend)
            return torch.autograd.grad(y, (x, w), gy)

        row[f"{backend}_fwd_ms"] = bench_ms(fwd)
        row[f"{backend}_fwdbwd_ms"] = bench_ms(fwd_bwd)
    row["fwd_gbps"] = 2 * elems * 2 / row["triton_fwd_ms"] / 1e6
    row["fwdbwd_gbps"] = 5 * elems * 2 / row["triton_fwdbwd_ms"] / 1e6
    return row


def sweep_backward(T: int = 32768, C: int = 12288) -> list[dict]:
    """Forward + backward of the Triton kernels at a few launch settings (the shipped ``conv_launch`` with fields
    replaced), without and with packed sequences and initial states. At the shipped 8 x 128 tiles the backward
    already holds 168-255 registers per thread (``--build-report``), so smaller channel blocks and more warps are
    the candidates, not longer row blocks."""
    from kimi_linear.ops.conv_triton import conv_launch

    variants = [{}, {"bc": 64}, {"bc": 32}, {"warps": 8}, {"bc": 64, "warps": 2}, {}]
    out = []
    for change in variants:
        for varlen in (False, True):
            launch = dataclasses.replace(conv_launch(C, varlen), **change)
            entry = {"change": change, "case": "varlen8+h0" if varlen else "plain"}
            try:
                row = bench_case(T, C, varlen=varlen, launch=launch, backends=("triton",))
                entry.update(fwd_ms=row["triton_fwd_ms"], fwdbwd_ms=row["triton_fwdbwd_ms"])
            except Exception as e:  # noqa: BLE001
                entry["error"] = repr(e)[:200]
            out.append(entry)
            print("sweep:", json.dumps(entry), flush=True)
    return out


def main(argv=None) -> None:
    parser = SuiteParser(__name__, __doc__)
    parser.add_argument("--build-report", action="store_true", help="print the kernels' sm_90 resources and exit")
    parser.add_argument("--tokens", default="4096,32768")
    parser.add_argument("--channels", default="4096,12288")
    parser.add_argument("--sweep", action="store_true", help="also time backward launch settings at 32k x 12288")
    args = parser.parse_args(argv)
    if args.build_report:
        build_report()
        return
    if not torch.cuda.is_available():
        raise SystemExit("conv_speed times GPU kernels: needs CUDA (or use --build-report)")
    ceiling = ceiling_gbps()
    rows = [bench_case(T, C, varlen) for T in map(int, args.tokens.split(","))
            for C in map(int, args.channels.split(",")) for varlen in (False, True)]
    meta = environment(args, copy_gbps=ceiling, W=W, dtype="bf16")
    result = {"meta": meta, "rows": rows}
    if args.sweep:
        result["sweep"] = sweep_backward()
    write_json(args.out, "conv_speed.json", result)
    print(f"{meta['gpu']}, torch {meta['torch']}, bf16, W={W}, copy ceiling {ceiling:.0f} GB/s")
    print(f"{'T':>6} {'C':>6} {'case':>11} | {'fwd torch':>9} {'triton':>7} {'x':>5} {'GB/s':>5} {'%':>4} | "
          f"{'f+b torch':>9} {'triton':>7} {'x':>5} {'GB/s':>5} {'%':>4}")
    for r in rows:
        print(f"{r['T']:>6} {r['C']:>6} {r['case']:>11} | {r['torch_fwd_ms']:9.3f} {r['triton_fwd_ms']:7.3f} "
              f"{r['torch_fwd_ms'] / r['triton_fwd_ms']:5.2f} {r['fwd_gbps']:5.0f} {100 * r['fwd_gbps'] / ceiling:4.0f} | "
              f"{r['torch_fwdbwd_ms']:9.3f} {r['triton_fwdbwd_ms']:7.3f} "
              f"{r['torch_fwdbwd_ms'] / r['triton_fwdbwd_ms']:5.2f} {r['fwdbwd_gbps']:5.0f} "
              f"{100 * r['fwdbwd_gbps'] / ceiling:4.0f}")
    print("x = torch / triton (shipped launch); GB/s and % of the copy ceiling for triton; "
          "fwd traffic 4 B/element, fwd+bwd 10 B/element")

