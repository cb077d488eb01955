"""One chunk KDA forward in a CUDA profiler range, for Nsight Compute (GPU).

Ours, and FLA's with ``--compare fla``. Both forwards run once first (Triton compiles, FLA autotunes), then once
more between ``torch.cuda.profiler.start()`` and ``stop()``, so ``ncu --profile-from-start off`` measures exactly
one launch of every kernel of each forward at the benchmark's shape (B=1, H=32, K=V=128, bf16):

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section LaunchStats python -m benchmarks kda_profile --T 8192 --compare fla

Writes nothing (``--out`` is unused); the numbers are ncu's.
"""

from __future__ import annotations

import torch

from benchmarks.common import SuiteParser, load_fla
from benchmarks.kda_kernels import make_inputs
from kimi_linear.ops.kda import chunk_kda


def main(argv=None) -> None:
    ap = SuiteParser(__name__, __doc__, peers=("fla",))
    ap.add_argument("--T", type=int, default=8192)
    args = ap.parse_args(argv)
    x = make_inputs(args.T, seed=3)
    runs = [("ours", lambda: chunk_kda(**x, backend="triton"))]
    if "fla" in args.compare:
        fla_kda = load_fla().chunk_kda
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
