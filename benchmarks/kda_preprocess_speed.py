"""chunk_kda's in-op activations (q/k L2 norm, gate, beta sigmoid): PyTorch vs the fused Triton kernels (GPU).

Kernels of ``kda/preprocess_triton.py``. At H = 32, K = 128 (the model's KDA heads), bf16 raw inputs (q, k, gate pre-activation, beta logits), fp32 A_log and
dt_bias, q_n/k_n produced in bf16 (the chunk kernel's operands; the PyTorch path casts its fp32 result), g and beta
in fp32, T in {8k, 32k} tokens: forward (no autograd) and forward + backward (all six gradients), medians by
``triton.testing.do_bench``, both backends in one run. Memory: ``saved`` is what the forward leaves allocated for
backward beyond its inputs (outputs + autograd's saved tensors), ``peak`` the peak over forward + backward above the
inputs and upstream gradients. The floor is memory traffic, per element of [T, H, K] in bf16 with an fp32 gate:
forward reads q, k, g (6 B) and writes q_n, k_n, g (8 B); backward also reads q, k, g, dq_n, dk_n, dg (14 B) and
writes dq, dk, dg (6 B). The table gives the fused kernels' achieved GB/s against the measured ceiling
(``benchmarks.common.ceiling_gbps``). Prints the table last; writes kda_preprocess_speed.json into --out.

Usage (GPU):   python -m benchmarks kda_preprocess_speed
Offline sm_90 resources of the kernels (no GPU needed): python -m benchmarks kda_preprocess_speed --build-report
"""

from __future__ import annotations

import torch

from benchmarks.common import SuiteParser, bench_ms, ceiling_gbps, environment, resource_line, sm90_resources, write_json

H, K = 32, 128
DEVICE = "cuda"
FWD_BYTES, FWDBWD_BYTES = 14, 14 + 20  # per element of [T, H, K], see the module docstring


def build_report(T: int = 32768) -> None:
    """Both kernels at their shipped launch (``preprocess_launch`` at T tokens): all three parts with the
    per-channel gate and dt_bias (the model), the scalar (GDN) gate, and l2norm alone."""
    import triton

    from kimi_linear.ops.kda import preprocess_triton as pt
    from kimi_linear.ops.norm import L2NORM_EPS

    c = pt.preprocess_launch(T, K)
    fp32 = {"A_log", "dt_bias", "g_out", "beta_out", "dg_out", "dbeta_out", "dA_part", "ddt_part"}
    variants = {"norm+gate+beta": (True, True, False), "norm+gdn gate+beta": (True, True, True),
                "norm only": (True, False, False)}
    print(f"sm_90 build, H={H}, K={K}, T={T}, bf16 q/k/g/beta, fp32 A_log/dt_bias, {c}")
    for tag, (norm, gate, scalar) in variants.items():
        for fn, BT in ((pt.preprocess_fwd_kernel, c.fwd_bt), (pt.preprocess_bwd_kernel, c.bwd_bt)):
            BK = triton.next_power_of_2(K)
            consts = dict(H=H, K=K, BT=BT, BK=BK, NORM_QK=norm, GATE=gate, G_SCALAR=scalar,
                          HAS_DT_BIAS=gate, SIGMOID_BETA=gate, EPS=L2NORM_EPS, INTERPRET=False)
            names = [n for n in fn.arg_names if n not in consts]
            sig = {n: "i32" if n in ("T_total", "SQ") else "*fp32" if n in fp32 else "*bf16" for n in names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
            r = sm90_resources(fn, sig, consts, attrs, c.warps, 1)
            print(f"{fn.__name__:22s} {tag:19s} BT={BT:<3d} {resource_line(r, c.warps, 1)}", flush=True)


def bench_case(T: int) -> dict:
    import kimi_linear.ops.kda.common as common

    dev, bf16 = DEVICE, torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=bf16):
        return torch.randn(*shape, device=dev, generator=gen).to(dtype).requires_grad_()

    q, k, g = rnd(1, T, H, K), rnd(1, T, H, K), rnd(1, T, H, K)
    beta = rnd(1, T, H)
    A_log, dt_bias = rnd(H, dtype=torch.float32), rnd(H * K, dtype=torch.float32)
    up = [torch.randn(1, T, H, K, device=dev, generator=gen).to(bf16) for _ in range(2)]
    up += [torch.randn(1, T, H, K, device=dev, generator=gen), torch.randn(1, T, H, device=dev, generator=gen)]
    leaves = (q, k, g, beta, A_log, dt_bias)

    def forward(fused):
        return common.preprocess(q, k, g, beta, True, True, A_log, dt_bias, True, K, operand_dtype=bf16, fused=fused)

    row = {"T": T, "H": H, "K": K}
    for backend in ("torch", "triton"):
        fused = backend == "triton"

        def fwd(fused=fused):
            with torch.no_grad():
                return forward(fused)

        def fwd_bwd(fused=fused):
            return torch.autograd.grad(forward(fused), leaves, up)

        row[f"{backend}_fwd_ms"] = bench_ms(fwd)
        row[f"{backend}_fwdbwd_ms"] = bench_ms(fwd_bwd)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        outs = forward(fused)
        row[f"{backend}_saved_mib"] = (torch.cuda.memory_allocated() - base) / 2**20
        grads = torch.autograd.grad(outs, leaves, up)
        row[f"{backend}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del outs, grads
    elems = T * H * K
    row["fwd_gbps"] = FWD_BYTES * elems / row["triton_fwd_ms"] / 1e6
    row["fwdbwd_gbps"] = FWDBWD_BYTES * elems / row["triton_fwdbwd_ms"] / 1e6
    return row


def main(argv=None) -> None:
    parser = SuiteParser(__name__, __doc__)
    parser.add_argument("--build-report", action="store_true", help="print the kernels' sm_90 resources and exit")
    parser.add_argument("--tokens", default="8192,32768")
    args = parser.parse_args(argv)
    if args.build_report:
        build_report()
        return
    if not torch.cuda.is_available():
        raise SystemExit("kda_preprocess_speed times GPU kernels: needs CUDA (or use --build-report)")
    ceiling = ceiling_gbps()
    rows = [bench_case(T) for T in map(int, args.tokens.split(","))]
    meta = environment(args, copy_gbps=ceiling, H=H, K=K, dtype="bf16")
    write_json(args.out, "kda_preprocess_speed.json", {"meta": meta, "rows": rows})
    print(f"{meta['gpu']}, torch {meta['torch']}, bf16, H={H}, K={K}, copy ceiling {ceiling:.0f} GB/s")
    print(f"{'T':>6} | {'fwd torch':>9} {'fused':>7} {'x':>5} {'GB/s':>5} {'%':>4} | {'f+b torch':>9} {'fused':>7} "
          f"{'x':>5} {'GB/s':>5} {'%':>4} | {'saved MiB torch':>15} {'fused':>7} | {'peak MiB torch':>14} {'fused':>7}")
    for r in rows:
        print(f"{r['T']:>6} | {r['torch_fwd_ms']:9.3f} {r['triton_fwd_ms']:7.3f} "
              f"{r['torch_fwd_ms'] / r['triton_fwd_ms']:5.2f} {r['fwd_gbps']:5.0f} {100 * r['fwd_gbps'] / ceiling:4.0f} | "
              f"{r['torch_fwdbwd_ms']:9.3f} {r['triton_fwdbwd_ms']:7.3f} {r['torch_fwdbwd_ms'] / r['triton_fwdbwd_ms']:5.2f} "
              f"{r['fwdbwd_gbps']:5.0f} {100 * r['fwdbwd_gbps'] / ceiling:4.0f} | {r['torch_saved_mib']:15.0f} "
              f"{r['triton_saved_mib']:7.0f} | {r['torch_peak_mib']:14.0f} {r['triton_peak_mib']:7.0f}")
    print(f"x = torch / fused; GB/s and % of the copy ceiling for the fused kernels; traffic {FWD_BYTES} B/element "
          f"forward, {FWDBWD_BYTES} B/element forward + backward; memory above the inputs")

