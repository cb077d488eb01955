"""The B = 1 decode step's projections: ``ops.linear`` (the one-row GEMV) against cuBLAS (``F.linear``) (GPU).

Every projection shape of the 0.75b model's decode step (the packed KDA and MLA input projections, the output
projections, the MLP's packed gate and up and its down projection, the LM head), bf16, one row of x. Each timing is
a CUDA graph of ``--calls`` products on distinct weights (their bytes past the L2, as in a decode step), median per
product; TB/s = weight bytes / time. Usage: ``python -m benchmarks decode_gemv``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import SuiteParser, environment, graph_ms, write_json

# name -> (N, K) of the 0.75b config (hidden 2048, 16 KDA heads x 128, MLA 16 heads, latent 512 + 64, MLP 5632)
SHAPES = {
    "KDA in (q, k, v, f_a, b, g_a)": (6416, 2048),
    "KDA o": (2048, 2048),
    "MLA in (q, kv_a)": (3648, 2048),
    "MLA o": (2048, 2048),
    "MLP gate + up": (11264, 2048),
    "MLP down": (2048, 5632),
    "LM head": (32000, 2048),
}


def main(argv=None) -> None:
    parser = SuiteParser(__name__, __doc__)
    parser.add_argument("--calls", type=int, default=20, help="products per graph, each on its own weight")
    args = parser.parse_args(argv)
    from kimi_linear.ops.linear import linear
    from kimi_linear.ops.linear_triton import gemv_launch

    torch.manual_seed(0)
    rows = []
    for name, (N, K) in SHAPES.items():
        calls = max(2, min(args.calls, int(2e9 // (N * K * 2))))  # at most ~2 GB of weights
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _ in range(calls)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        cublas = graph_ms(lambda: [F.linear(x, w) for w in ws], calls=calls)
        gemv = graph_ms(lambda: [linear(x, w) for w in ws], calls=calls)
        err = (linear(x, ws[0]).float() - F.linear(x.float(), ws[0].float())).abs().max().item()
        mb = N * K * 2 / 1e6
        rows.append({"shape": name, "N": N, "K": K, "MB": mb, "cublas_us": 1e3 * cublas, "gemv_us": 1e3 * gemv,
                     "cublas_tbps": mb / (1e3 * cublas), "gemv_tbps": mb / (1e3 * gemv),
                     "launch": vars(gemv_launch(N, K)), "max_abs_err_vs_fp32": err})
        del ws
    write_json(args.out, "decode_gemv.json", {"environment": environment(args), "rows": rows})
    print("| projection | N x K | MB | cuBLAS us (TB/s) | GEMV us (TB/s) | GEMV / cuBLAS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['N']} x {r['K']} | {r['MB']:.1f} | {r['cublas_us']:.2f} ({r['cublas_tbps']:.2f}) | "
              f"{r['gemv_us']:.2f} ({r['gemv_tbps']:.2f}) | {r['gemv_us'] / r['cublas_us']:.2f} |")


if __name__ == "__main__":
    main()
