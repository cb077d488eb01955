"""One chunk KDA forward (ours, then FLA's when installed) inside a CUDA profiler range, for Nsight Compute.

Both forwards run once first (Triton compiles, FLA autotunes), then once more between
``torch.cuda.profiler.start()`` and ``stop()``, so ``ncu --profile-from-start off`` measures exactly one launch of
every kernel of each forward at the benchmark's shape (B=1, H=32, K=V=128, bf16):

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section LaunchStats python benchmarks/kda_profile.py --T 8192
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.kda_kernels import load_fla, make_inputs
from kimi_linear.ops.kda import chunk_kda


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--no-fla", action="store_true")
    args = ap.parse_args()
    x = make_inputs(args.T, seed=3)
    runs = [("ours", lambda: chunk_kda(**x, backend="triton"))]
    fla_kda = None if args.no_fla else load_fla()[0]
    if fla_kda is not None:
        runs.append(("fla", lambda: fla_kda(**x)))
    with torch.no_grad():
        for _, fn in runs:
            fn()
        torch.cuda.synchronize()
        for name, fn in runs:
            torch.cuda.profiler.start()
            fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            print(f"profiled: {name}", flush=True)


if __name__ == "__main__":
    main()
