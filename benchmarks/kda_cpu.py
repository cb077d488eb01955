"""KDA on the CPU: forward + backward of the chunked PyTorch path vs the recurrent reference vs transformers'
pure-PyTorch `kimi_linear` chunk fallback. Prints a table and writes benchmarks/results/kda_cpu.json.

    python benchmarks/kda_cpu.py [--seq-len 2048] [--heads 4] [--head-dim 64] [--repeats 5]

Timing: wall-clock median over repeats after one warm-up, fresh random inputs each repeat. The CPU should be idle;
other processes on the machine distort every number here.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kimi_linear.ops.kda import chunk_kda, naive_recurrent_kda


def make_inputs(B, T, H, K, V):
    q = torch.randn(B, T, H, K)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, V)
    g = -torch.rand(B, T, H, K)
    beta = torch.rand(B, T, H)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def time_fwd_bwd(fn, shape, repeats):
    times = []
    for i in range(repeats + 1):
        inputs = make_inputs(*shape)
        start = time.perf_counter()
        o = fn(*inputs)
        o.float().square().sum().backward()
        if i:  # the first run is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kda_cpu.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.batch, args.seq_len, args.heads, args.head_dim, args.head_dim)

    candidates = {
        "kimi-linear chunk_kda (torch path)": lambda q, k, v, g, b: chunk_kda(q, k, v, g, b, backend="torch")[0],
        "recurrent reference (paper Eq. 1)": lambda q, k, v, g, b: naive_recurrent_kda(q, k, v, g, b)[0],
    }
    try:
        import transformers
        from transformers.models.kimi_linear import modeling_kimi_linear as hf

        candidates[f"transformers {transformers.__version__} torch fallback"] = (
            lambda q, k, v, g, b: hf.chunk_kimi_delta_attention(q, k, v, g, b)[0]
        )
    except ImportError:
        print("transformers with kimi_linear is not installed: skipping its fallback (pip install -e .[bench])")

    results = {}
    for name, fn in candidates.items():
        repeats = args.repeats if "chunk_kda" in name else max(2, args.repeats // 2)
        results[name] = time_fwd_bwd(fn, shape, repeats)
    ours = results["kimi-linear chunk_kda (torch path)"]

    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "shape": dict(zip("B T H K V".split(), shape)),
        "fwd_bwd_seconds": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")

    print(f"KDA fwd+bwd on CPU, B={shape[0]} T={shape[1]} H={shape[2]} K=V={shape[3]}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads (median of runs)")
    print(f"| {'implementation':<44} | {'ms':>9} | {'time / ours':>11} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 13}|")
    for name, t in results.items():
        print(f"| {name:<44} | {t * 1e3:>9.1f} | {t / ours:>10.1f}x |")


if __name__ == "__main__":
    main()
