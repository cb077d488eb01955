"""Absorbed MLA decode attention, one layer, one step: our split-K Triton kernel vs the einsum reference path.

The release shape (H = 32 heads, kv_lora_rank r = 512, rope dim 64, bf16 caches, softmax scale 192^-0.5); every
row of the cache is full (lengths = L). The step is bound by reading the latent cache, B * L * 576 * 2 bytes,
so the figure of merit is that over the time, against the H200's ~4.8 TB/s.

Timing: ``triton.testing.do_bench_cudagraph`` (median), i.e. back-to-back calls inside one CUDA graph. Where one
cache is smaller than 256 MiB, each timed call runs over enough distinct caches (as the layers of a model would
be) that the set exceeds the L2, and the time is divided by their number. "einsum" is
``mla_decode_attention_reference``, the path ``MultiheadLatentAttention.decode`` took before this kernel: it
builds fp32 scores ``[B, H, L]``; it is skipped where its workspace would not fit. ``--sweep`` also times the
split count and launch settings at a few shapes.

Usage (H200, ~40 s):   python benchmarks/mla_decode.py --out $OUT/mla_decode.json [--sweep]
Offline sm_90 build report (no GPU needed; registers, spills, shared memory of each kernel):
                       python benchmarks/mla_decode.py --build-report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import triton

from dataclasses import replace

from kimi_linear.ops import mla_decode_triton as mla_decode
from kimi_linear.ops.mla_decode import default_launch, default_num_splits, mla_decode_attention_reference
from kimi_linear.ops.mla_decode_triton import mla_decode_attention_triton

H, R, DR = 32, 512, 64
SCALE = 192**-0.5
HBM_TBPS = 4.8
L2_DEFEAT_BYTES = 256 * 2**20
SHAPES = [(1, 4096), (8, 4096), (64, 4096), (1, 131072), (8, 131072), (64, 131072), (1, 1048576)]
SWEEP_SHAPES = [(1, 131072), (8, 131072), (64, 131072)]
SWEEP_CONFIGS = [(64, 8, 2), (64, 4, 2)]  # (BLOCK_S, num_warps, num_stages) that fit sm_90 without spills


# ---- offline sm_90 build -----------------------------------------------------------------------------------



def build_line(fn, consts: dict, num_warps: int, num_stages: int, cache_ty: str) -> str:
    """Compile ``fn`` for sm_90 with these constants and report its resources. Integer arguments named stride*
    (and pointers) are declared divisible by 16, as Triton's JIT specialises them at the release shape (every
    stride is a multiple of 16 there); without that the tile loads could not be vectorised or pipelined."""
    from kda_chunk_build import resource_line, sm90_resources  # this folder's sm_90 build helpers

    names = [n for n in fn.arg_names if n not in consts]
    sig = {}
    for n in names:
        if n == "scale_log2":
            sig[n] = "fp32"
        elif n in ("L_max", "num_splits") or n.startswith("stride"):
            sig[n] = "i32"
        elif n == "lengths":
            sig[n] = "*i64"
        elif n in ("o_part", "lse_part"):
            sig[n] = "*fp32"
        else:
            sig[n] = cache_ty
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or n.startswith("stride")}
    r = sm90_resources(fn, sig, consts, attrs, num_warps, num_stages)
    variant = " single" if consts.get("SINGLE_SPLIT") else ""
    tile = f" BLOCK_S={consts['BLOCK_S']}" if "BLOCK_S" in consts else ""
    return f"{fn.__name__ + variant:32s} {cache_ty[1:]:5s}{tile:12s} {resource_line(r, num_warps, num_stages)}"


def build_report() -> list[str]:
    lines = []
    for element_size, ty in ((2, "*bf16"), (4, "*fp32")):
        for fn, consts, warps, stages in mla_decode.sm90_build_jobs(H, R, DR, element_size=element_size):
            lines.append(build_line(fn, consts, warps, stages, ty))
            print(lines[-1], flush=True)
    return lines


# ---- GPU timing --------------------------------------------------------------------------------------------


def make_caches(B: int, L: int, copies: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q_latent = torch.randn(B, H, R, device="cuda", generator=gen).bfloat16() * 0.5
    q_pe = torch.randn(B, H, DR, device="cuda", generator=gen).bfloat16()
    caches = []
    for _ in range(copies):
        latent = torch.randn(B, L, R, device="cuda", generator=gen, dtype=torch.bfloat16)
        pe = torch.randn(B, L, DR, device="cuda", generator=gen, dtype=torch.bfloat16)
        caches.append((latent, pe))
    lengths = torch.full((B,), L, device="cuda", dtype=torch.long)
    return q_latent, q_pe, caches, lengths


def time_us(fn, copies: int) -> float:
    """Median microseconds per call inside a CUDA graph, one call = ``copies`` kernel calls."""
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3 / copies


def einsum_fits(B: int, L: int) -> bool:
    # fp32 scores, their masked and softmaxed copies and the bf16 probabilities: ~14 bytes per (b, h, s)
    free, _ = torch.cuda.mem_get_info()
    return B * H * L * 14 < 0.8 * free


def bench_shape(B: int, L: int, configs=None, splits_list=None) -> dict:
    cache_bytes = B * L * (R + DR) * 2
    copies = max(1, min(32, math.ceil(L2_DEFEAT_BYTES / cache_bytes)))
    q_latent, q_pe, caches, lengths = make_caches(B, L, copies, seed=B * 7 + L)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    row = dict(B=B, L=L, cache_MB=cache_bytes / 2**20, copies=copies,
               default_splits=default_num_splits(B, L, sms))

    def ours(**kw):
        launch = replace(default_launch(2), **kw)
        return lambda: [mla_decode_attention_triton(q_latent, q_pe, lat, pe, lengths, SCALE, launch)
                        for lat, pe in caches]

    row["ours_us"] = time_us(ours(), copies)
    row["ours_TBps"] = cache_bytes / row["ours_us"] / 1e6
    out = mla_decode_attention_triton(q_latent, q_pe, *caches[0], lengths, SCALE, default_launch(2))
    if einsum_fits(B, L):
        ref = mla_decode_attention_reference(q_latent.float(), q_pe.float(), caches[0][0].float(),
                                             caches[0][1].float(), lengths, SCALE) if cache_bytes < 2**31 else None
        if ref is not None:
            row["rel_err_vs_fp32"] = ((out.float() - ref).norm() / ref.norm()).item()
            del ref
        einsum = lambda: [mla_decode_attention_reference(q_latent, q_pe, lat, pe, lengths, SCALE)
                          for lat, pe in caches]
        try:
            row["einsum_us"] = time_us(einsum, copies)
        except torch.OutOfMemoryError:
            row["einsum_us"] = float("nan")
        torch.cuda.empty_cache()
    else:
        row["einsum_us"] = float("nan")
    row["speedup"] = row["einsum_us"] / row["ours_us"]
    if configs or splits_list:
        row["sweep"] = {}
        for BS, warps, stages in configs or []:
            for splits in splits_list or [None]:
                key = f"S{BS}-w{warps}-st{stages}-splits{splits or row['default_splits']}"
                row["sweep"][key] = time_us(ours(num_splits=splits, block_s=BS, num_warps=warps,
                                                 num_stages=stages), copies)
    del caches
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the JSON here (a file, or a folder for mla_decode.json)")
    parser.add_argument("--sweep", action="store_true", help="also time split counts and launch settings")
    parser.add_argument("--build-report", action="store_true", help="offline sm_90 build of the kernels, no GPU")
    args = parser.parse_args(argv)
    if args.build_report:
        lines = build_report()
        if args.out:
            _write(args.out, dict(build_report=lines))
        return
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (--build-report does not)")

    t0 = time.time()
    rows = [bench_shape(B, L) for B, L in SHAPES]
    if args.sweep:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for B, L in SWEEP_SHAPES:
            d = default_num_splits(B, L, sms)
            splits = sorted({max(1, d // 2), d, 2 * d})
            rows.append(dict(bench_shape(B, L, SWEEP_CONFIGS, splits), sweep_only=True))
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), H=H, r=R, dr=DR,
                seconds=round(time.time() - t0, 1))
    if args.out:
        _write(args.out, dict(meta=meta, rows=rows))

    for r in rows:
        if "sweep" in r:
            best = min(r["sweep"], key=r["sweep"].get)
            cells = "  ".join(f"{k}={v:.1f}" for k, v in r["sweep"].items())
            print(f"sweep B={r['B']} L={r['L']}: best {best} {r['sweep'][best]:.1f} us | {cells}")
    print(f"\n{meta}")
    print(f"Absorbed MLA decode attention, one layer: H={H}, r={R}, rope {DR}, bf16 cache, full rows; us per call "
          f"in a CUDA graph (median); bandwidth = cache bytes / time against ~{HBM_TBPS} TB/s\n")
    print("| B | L | cache MB | splits | ours us | ours TB/s | % of HBM | einsum us | einsum / ours | err vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("sweep_only"):
            continue
        print(f"| {r['B']} | {r['L']} | {r['cache_MB']:.0f} | {r['default_splits']} | {r['ours_us']:.1f} | "
              f"{r['ours_TBps']:.2f} | {100 * r['ours_TBps'] / HBM_TBPS:.0f} % | {r['einsum_us']:.1f} | "
              f"{r['speedup']:.1f}x | {r.get('rel_err_vs_fp32', float('nan')):.1e} |")


def _write(out: str, payload: dict) -> None:
    path = os.path.join(out, "mla_decode.json") if os.path.isdir(out) or not out.endswith(".json") else out
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
