"""Compile the chunk KDA kernels for the H200 (sm_90) on a machine without a GPU, and print their resources.

For each kernel at the model's shape (H=32, K=V=128, bf16 operands, the launch settings of
``chunk_triton.CONFIG``): registers per thread, stack frame (spills), dynamic shared memory (must stay under
232448 bytes on the H200, or the launch fails), and how many wgmma (Hopper) / mma.sync instructions the PTX holds.
Pointer arguments are declared 16-byte aligned, as PyTorch allocations are, so the build matches what runs.
Needs only Triton (its bundled ptxas and cuobjdump). Usage: python benchmarks/kda_chunk_build.py
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kimi_linear.ops.kda import chunk_bwd, chunk_fwd

H, K, V = 32, 128, 128
SHARED_LIMIT = 232448
FP32_PTRS = {"g", "beta", "G", "G_out", "Tinv", "Tinv_out", "h0", "ht", "dht", "dh0", "dq", "dk", "dG", "dA", "dAqk",
             "dbeta", "dg_out", "dg", "dbk"}
INT_PTRS = {"cu_seqlens", "chunk_indices", "chunk_offsets"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def sm90_resources(fn, sig: dict, consts: dict, attrs: dict, num_warps: int, num_stages: int) -> dict:
    """Compile ``fn`` for sm_90 with the given signature and read its resources from the cubin and the PTX."""
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    ptx = kernel.asm["ptx"]
    return {"regs": m.group(1) if m else "?", "stack": m.group(2) if m else "?", "shared": kernel.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async"), "mma": ptx.count("mma.sync")}


def resource_line(r: dict, num_warps: int, num_stages: int) -> str:
    flag = "  OVER THE SHARED-MEMORY LIMIT" if r["shared"] > SHARED_LIMIT else ""
    return (f"warps={num_warps} stages={num_stages} regs={r['regs']:>3} stack={r['stack']:>5} B "
            f"shared={r['shared']:>6} B wgmma={r['wgmma']:>3} mma={r['mma']:>3}{flag}")


def build(fn, consts: dict, num_warps: int, num_stages: int, float_args=("scale",)) -> str:
    names = [n for n in fn.arg_names if n not in consts]
    sig = {}
    for n in names:
        sig[n] = "fp32" if n in float_args else "*i32" if n in INT_PTRS else "*fp32" if n in FP32_PTRS else "*bf16"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    r = sm90_resources(fn, sig, consts, attrs, num_warps, num_stages)
    return f"{fn.__name__:34s} {resource_line(r, num_warps, num_stages)}"


def main() -> None:
    # each kernel module lists its kernels with the constants and launch settings the launcher uses
    jobs = chunk_fwd.sm90_build_jobs(H, K, V) + chunk_bwd.sm90_build_jobs(H, K, V)
    for fn, consts, warps, stages in jobs:
        floats = ("scale",) if "scale" in fn.arg_names else ()
        print(build(fn, consts, warps, stages, floats), flush=True)


if __name__ == "__main__":
    main()
