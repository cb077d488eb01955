"""Offline sm_90 build of the chunk KDA kernels as launched: registers, spills, shared memory (no GPU needed).

Default: the kernels exactly as ``chunk_kda`` launches them. The op's forward and backward run on small CPU tensors
with every Triton launch recorded instead of run (so nothing is computed), and each recorded launch is compiled for
sm_90 with its real argument dtypes, constexprs, num_warps and num_stages. Printed per kernel: registers per thread,
stack frame (spills), dynamic shared memory (must stay under 232448 bytes on the H200, or the launch fails), and how
many wgmma (Hopper) / mma.sync instructions the PTX holds. Launches made through
``chunk_common.launch_fitting`` are judged as that launcher runs them: its candidate settings (a shallower
prefetch, then a narrower V block) in order, until a build fits. ``--variants`` builds instead every kernel from the
stage modules' own lists (``sm90_build_jobs``) at bf16, without running the op. Pointer arguments are declared 16-byte aligned, as PyTorch allocations are.
Needs only Triton (its bundled ptxas and cuobjdump).

    python -m benchmarks kda_chunk_build                       # K = V = 128, bf16, as the model runs
    python -m benchmarks kda_chunk_build --K 256 --dtype fp32  # the op's largest head size
    python -m benchmarks kda_chunk_build --K 256 --check       # exit 1 when a launch cannot fit

Prints only (``--out`` is unused).
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from triton.runtime.jit import JITFunction

from benchmarks.common import SM90_SHARED_LIMIT as SHARED_LIMIT
from benchmarks.common import SuiteParser, resource_line, sm90_resources
from kimi_linear.ops.kda import chunk_bwd, chunk_common, chunk_fwd

H, K, V = 32, 128, 128
FP32_PTRS = {"g", "beta", "G", "G_out", "Tinv", "Tinv_out", "h0", "ht", "dht", "dh0", "dq", "dk", "dG", "dA", "dAqk",
             "dbeta", "dg_out", "dg", "dbk"}
INT_PTRS = {"cu_seqlens", "chunk_indices", "chunk_offsets", "diag_unsafe"}


def build(fn, consts: dict, num_warps: int, num_stages: int, float_args=("scale",)) -> str:
    names = [n for n in fn.arg_names if n not in consts]
    sig = {}
    for n in names:
        sig[n] = "fp32" if n in float_args else "*i32" if n in INT_PTRS else "*fp32" if n in FP32_PTRS else "*bf16"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    r = sm90_resources(fn, sig, consts, attrs, num_warps, num_stages)
    return f"{fn.__name__:34s} {resource_line(r, num_warps, num_stages)}"


def variants_main() -> None:
    # each kernel module lists its kernels with the constants and launch settings the launcher uses
    jobs = chunk_fwd.sm90_build_jobs(H, K, V) + chunk_bwd.sm90_build_jobs(H, K, V)
    for fn, consts, warps, stages in jobs:
        floats = ("scale",) if "scale" in fn.arg_names else ()
        print(build(fn, consts, warps, stages, floats), flush=True)


_TORCH_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                torch.int64: "i64"}


@contextlib.contextmanager
def recorded_launches():
    """Within the block, ``kernel[grid](...)`` records ``(kernel, args, kwargs, candidates)`` instead of running
    (outputs stay uninitialised); ``candidates`` are the (BV, num_stages) settings ``launch_fitting`` would go
    through when the launch came from it, else None. Yields the list of records."""
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        caller = sys._getframe(2)  # 0: here, 1: the proxy of JITFunction.__getitem__, 2: the launcher
        candidates = None
        if caller.f_code is chunk_common.launch_fitting.__code__:
            f = caller.f_locals
            candidates = chunk_common.fitting_candidates(f["bv"], f["stages"], f["dtype"])
        launches.append((self, args, kwargs, candidates))

    run = JITFunction.run
    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = run


def launch_build(kernel, args: tuple, kwargs: dict) -> tuple:
    """(signature, constexprs, attrs, num_warps, num_stages) of one recorded launch, as Triton would build it."""
    kwargs = dict(kwargs)
    num_warps, num_stages = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)
    values = dict(zip(kernel.arg_names, args)) | kwargs
    sig, consts, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        v = values[param.name] if param.name in values else param.default  # a parameter left at its default
        if param.is_constexpr or v is None:
            sig[param.name], consts[param.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[param.name] = "*" + _TORCH_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # PyTorch allocations are 16-byte aligned or better
        elif isinstance(v, bool):
            sig[param.name] = "i1"
        elif isinstance(v, int):
            sig[param.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {param.name!r} of type {type(v).__name__} not handled")
    return sig, consts, attrs, num_warps, num_stages


def op_launches(B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype) -> list:
    """The launches of one chunk_kda forward + backward with an initial and a final state, on CPU tensors."""
    from kimi_linear.ops.kda.chunk_triton import chunk_kda_triton

    def make(*shape, dt=dtype):
        return torch.zeros(*shape, dtype=dt, requires_grad=True)

    q, k, v = make(B, T, H, K), make(B, T, H, K), make(B, T, H, V)
    g, beta, h0 = make(B, T, H, K, dt=torch.float32), make(B, T, H), make(B, H, K, V, dt=torch.float32)
    with recorded_launches() as launches:
        o, ht = chunk_kda_triton(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        (o.float().sum() + ht.sum()).backward()
    return launches


def launched_main(B: int, T: int, H_: int, K_: int, V_: int, dtype: torch.dtype, check: bool) -> int:
    """Build every kernel one forward + backward launches; returns the number of launches that cannot fit."""
    print(f"chunk_kda fwd+bwd launches: B={B} T={T} H={H_} K={K_} V={V_} {_TORCH_TYPES[dtype]}", flush=True)
    seen, over = set(), 0
    for kernel, args, kwargs, candidates in op_launches(B, T, H_, K_, V_, dtype):
        sig, consts, attrs, warps, stages = launch_build(kernel, args, kwargs)
        key = (kernel.__name__, tuple(sig.items()), tuple(consts.items()), warps, stages)
        if key in seen:
            continue
        seen.add(key)
        for n, (bv, stages) in enumerate(candidates or [(consts.get("BV"), stages)]):
            if candidates:
                consts["BV"] = bv
            r = sm90_resources(kernel, sig, consts, attrs, warps, stages)
            tag = f" BV={bv}" if candidates else ""
            if r["shared"] <= SHARED_LIMIT or not candidates or n + 1 == len(candidates):
                break
            print(f"{kernel.__name__:34s} {resource_line(r, warps, stages)}{tag} -> the launcher tries the next",
                  flush=True)
        over += r["shared"] > SHARED_LIMIT
        print(f"{kernel.__name__:34s} {resource_line(r, warps, stages)}{tag}", flush=True)
    print(f"{len(seen)} builds, {over} over the shared-memory limit")
    return over if check else 0


def main(argv=None) -> int:
    ap = SuiteParser(__name__, __doc__)
    ap.add_argument("--K", type=int, default=K)
    ap.add_argument("--V", type=int, default=None, help="default: K")
    ap.add_argument("--H", type=int, default=2, help="heads of the recorded run (the builds depend on H only where "
                                                      "a kernel blocks over heads)")
    ap.add_argument("--T", type=int, default=200)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--check", action="store_true", help="exit 1 when a launch needs more shared memory than the "
                                                         "H200 has")
    ap.add_argument("--variants", action="store_true", help="every listed kernel and setting instead, at H=32, "
                                                            "K=V=128, bf16")
    a = ap.parse_args(argv)
    if a.variants:
        variants_main()
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the builds need Triton's compiler, not its interpreter")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    return 1 if launched_main(1, a.T, a.H, a.K, a.V or a.K, dtype, a.check) else 0

