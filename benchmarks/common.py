"""What every benchmark suite shares: its command line, timing, the environment record, JSON and PNG output, the
peers (FLA), the bandwidth ceiling and the offline sm_90 build of a Triton kernel.

Timing, one helper per kind of measurement:

* ``bench_ms``: a GPU call timed by ``triton.testing.do_bench`` (warm-up, L2 flushed between calls, median);
* ``graph_ms``: a GPU call replayed inside one CUDA graph (``triton.testing.do_bench_cudagraph``, median) —
  decode steps, where launch overhead is not what is measured;
* ``samples_ms`` / ``median_ms``: whole steps (a model prefill, a training step) timed one by one after warm-up,
  by CUDA events on the GPU or the host clock on the CPU;
* ``host_us``: host wall-clock per call over back-to-back calls (what an eager Python loop pays).

Triton is imported lazily, so the CPU suites and ``python -m benchmarks --help`` run without it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
# Ceilings measured on the H200 (benchmarks/RESULTS.md): dense bf16 matmul rate and HBM bandwidth.
H200_BF16_TFLOPS = 790.0
H200_HBM_TBPS = 4.8
SM90_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on the H200


# ---- command line ------------------------------------------------------------------------------------------


class SuiteParser(argparse.ArgumentParser):
    """The argument parser of one suite: ``--out DIR`` (where its JSON and PNG go) and, where the suite has peers,
    ``--compare PEER ...``. ``parse_args`` also records the exact command as ``args.command``."""

    def __init__(self, module: str, doc: str | None, peers: Sequence[str] = ()):
        self.suite = module.rsplit(".", 1)[-1]
        super().__init__(prog=f"python -m benchmarks {self.suite}", description=doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_argument("--out", type=Path, default=RESULTS_DIR,
                          help="folder for this suite's JSON (and PNG); default benchmarks/results")
        if peers:
            self.add_argument("--compare", nargs="+", choices=list(peers), default=[], metavar="PEER",
                              help=f"also time these peers ({', '.join(peers)}); one that cannot be imported "
                                   "is an error")

    def parse_args(self, args: Sequence[str] | None = None, namespace=None):  # noqa: D102
        argv = list(sys.argv[1:] if args is None else args)
        parsed = super().parse_args(argv, namespace)
        parsed.command = shlex.join(["python", "-m", "benchmarks", self.suite, *argv])
        parsed.suite = self.suite
        return parsed


# ---- timing ------------------------------------------------------------------------------------------------


def bench_ms(fn: Callable, *, warmup: int = 100, rep: int = 400, grad_to_none=None) -> float:
    """Median milliseconds of ``fn()`` on the GPU by ``triton.testing.do_bench`` (``warmup`` and ``rep`` are
    milliseconds of warm-up and of timed calls; the L2 is flushed before each call; ``grad_to_none``: tensors
    whose ``.grad`` is reset between calls)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def graph_ms(fn: Callable, calls: int = 1, rep: int = 50) -> float:
    """Median milliseconds per call of ``fn()`` replayed inside a CUDA graph
    (``triton.testing.do_bench_cudagraph``), divided by ``calls`` when one ``fn()`` makes that many calls (e.g. one
    per layer, on separate buffers, so that their bytes exceed the L2)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=rep, return_mode="median") / calls


def samples_ms(fn: Callable, reps: int, warmup: int = 1, cuda: bool | None = None,
               setup: Callable | None = None) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn()`` after ``warmup`` untimed ones: CUDA events when ``cuda``
    (default: whether CUDA is available), else the host clock. ``setup`` (optional) runs untimed before every
    call and its result is passed to ``fn``."""
    cuda = torch.cuda.is_available() if cuda is None else cuda

    def call():
        return fn(setup()) if setup is not None else fn()

    for _ in range(warmup):
        call()
    times = []
    for _ in range(reps):
        args = (setup(),) if setup is not None else ()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median_ms(fn: Callable, reps: int, warmup: int = 1, cuda: bool | None = None,
              setup: Callable | None = None) -> float:
    """Median of ``samples_ms`` (same arguments)."""
    return statistics.median(samples_ms(fn, reps, warmup, cuda, setup))


def host_us(fn: Callable, iters: int, warmup: int = 3) -> float:
    """Microseconds per call, host wall-clock over ``iters`` back-to-back calls ending in a device sync: what a
    Python loop pays, launch overhead included."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def capture_graph(fn: Callable, warmup: int = 2) -> Callable:
    """``fn`` captured in a CUDA graph (after ``warmup`` calls on a side stream, which compile kernels and settle
    the allocator); returns the replay function."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def spin_up_gpu(seconds: float = 3.0) -> None:
    """Keep the GPU busy for a few seconds before the first timing: an idle card starts at low clocks, which
    otherwise land in the first measurement."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def copy_us(nbytes: int) -> float:
    """Microseconds for an element-wise kernel (``torch.neg``) that reads ``nbytes`` and writes ``nbytes``, in a
    CUDA graph: the bandwidth ceiling of memory-bound kernels. A kernel rather than ``copy_``, which may go to the
    copy engines. For small sizes this measures the graph launch, not memory."""
    src = torch.randn(max(nbytes // 4, 1), device="cuda")
    dst = torch.empty_like(src)
    return graph_ms(lambda: torch.neg(src, out=dst)) * 1e3


def ceiling_gbps(nbytes: int = 1 << 30) -> float:
    """GB/s (read + write) of ``copy_us(nbytes)``."""
    return 2 * nbytes / copy_us(nbytes) / 1e3


# ---- environment and output --------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - not installed, or broken: recorded as absent
        return None


COMMIT_ENV = "KIMI_LINEAR_COMMIT"


def _commit() -> str | None:
    """The measured tree: ``$KIMI_LINEAR_COMMIT`` where set (a copy of the tree whose own git history is absent or
    stale, as on a remote machine that receives the files only), else ``git describe`` of the checkout."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=9"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(args: argparse.Namespace | None = None, **extra) -> dict:
    """Where and how a result was measured: date (UTC), the exact command, the commit (``-dirty`` when the tree
    had changes), GPU (or CPU and thread count), Python, torch, Triton, FLA and transformers versions."""
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args is not None:
        env["command"] = args.command
    env["commit"] = _commit()
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    env["cpu"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    env["python"] = platform.python_version()
    env["torch"] = torch.__version__
    for module in ("triton", "fla", "transformers"):
        env[module] = _version(module)
    return env | extra


def write_json(out: Path | str, name: str, doc: dict) -> Path:
    """Write ``doc`` to ``out/name`` atomically (a temporary file renamed over it); returns the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- peers -------------------------------------------------------------------------------------------------


def load_fla() -> SimpleNamespace:
    """FLA's ops that the suites compare with (``--compare fla``): ``chunk_kda``, ``fused_recurrent_kda``,
    ``chunk_gated_delta_rule`` and ``version``. Raises SystemExit naming the import error when FLA is missing."""
    try:
        import fla
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.kda import chunk_kda, fused_recurrent_kda
    except Exception as e:  # noqa: BLE001 - any import failure means the peer cannot run
        raise SystemExit(f"--compare fla: FLA cannot be imported ({e!r})") from e
    return SimpleNamespace(version=fla.__version__, chunk_kda=chunk_kda, fused_recurrent_kda=fused_recurrent_kda,
                           chunk_gated_delta_rule=chunk_gated_delta_rule)


# ---- offline sm_90 builds ----------------------------------------------------------------------------------


def sm90_resources(fn, sig: dict, consts: dict, attrs: dict, num_warps: int, num_stages: int) -> dict:
    """Compile the Triton kernel ``fn`` for sm_90 (no GPU needed: Triton's bundled ptxas) with the given
    signature, constexprs and attributes; returns registers and stack bytes per thread (from the cubin), shared
    memory bytes, and the counts of wgmma and mma.sync instructions in the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    ptx = kernel.asm["ptx"]
    return {"regs": m.group(1) if m else "?", "stack": m.group(2) if m else "?", "shared": kernel.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async"), "mma": ptx.count("mma.sync")}


def resource_line(r: dict, num_warps: int, num_stages: int) -> str:
    """One line of ``sm90_resources``'s figures, flagged when over the H200's shared memory."""
    flag = "  OVER THE SHARED-MEMORY LIMIT" if r["shared"] > SM90_SHARED_LIMIT else ""
    return (f"warps={num_warps} stages={num_stages} regs={r['regs']:>3} stack={r['stack']:>5} B "
            f"shared={r['shared']:>6} B wgmma={r['wgmma']:>3} mma={r['mma']:>3}{flag}")
