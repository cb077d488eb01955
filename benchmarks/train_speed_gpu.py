"""Training throughput, MFU and peak memory of a ~1B Kimi Linear and its MLA-only twin on one GPU, by context
length and activation-checkpointing setting, with a per-layer profile of where the time and memory go.

Steps run through the same ``Trainer.train_step`` that ``kimi-linear train`` runs (bf16 autocast, fp32 weights,
fused AdamW, gradient clipping, MoE bias balancing, the chunked linear + cross-entropy loss, documents packed on one
row with ``cu_seqlens``, Triton KDA kernels), back to back without reading anything from the device between them
(as ``fit`` does between log reads): tokens/s = timed steps x tokens per step / their total time.

The model (``one_b_config``): hidden 2048, 16 layers (3:1 KDA:MLA: 12 KDA + 4 MLA, NoPE), 16 KDA heads of 128,
16 MLA heads (latent 512 + 64), MoE with 16 experts of 512 (top 4, one shared expert) after a dense first layer,
vocabulary 32000 — about 1.2B parameters, 0.7B active per token. ``--mixers mla`` gives every layer MLA (the
full-attention baseline).

Each run is one (mixer, --seq-len, --activation-checkpointing) point. A step holds --docs documents of --seq-len
tokens packed on one row (default: as many as make --tokens-per-step, at least one), times --grad-accum. A run that
does not fit in memory is reported as OOM and the next one runs.

FLOPs per token follow the usual accounting (recomputation not counted): 6 x (active matrix parameters, lm_head
included, embedding lookup excluded) for forward + backward, plus the token mixers: KDA by paper Eq. 13 (per head
6 K^2 + 3 C K + C^2 per token, C = 64) and causal attention 2 x (T / 2) x (d_qk + d_v) per head per token for the
MLA layers' forward, both x3 for training. MFU = FLOPs / step time / 790 TFLOP/s (the bf16 dense-matmul rate
measured on the H200, benchmarks/common.py).

``--profile-layers`` then times one layer of each kind (KDA/MLA x dense/MoE) alone on a step's tokens — forward,
backward (recomputation included) and the peak memory above its input — plus the head + loss, and counts the bytes
per token each keeps for its backward (``kimi_linear.train.activation_memory``; without activation checkpointing
only: a recomputed block keeps nothing the census can see but its input).

    python -m benchmarks train_speed_gpu                                             # 4k, hybrid vs MLA
    python -m benchmarks train_speed_gpu --seq-len 4096 16384 --profile-layers       # the issue 26 table
    python -m benchmarks train_speed_gpu --seq-len 32768 65536 --activation-checkpointing none mla,moe full
    python -m benchmarks train_speed_gpu --device cpu --smoke --out /tmp/x           # pipeline check on the CPU

Prints the per-layer tables (with --profile-layers), then the main table last, and writes
``train_speed_gpu.json`` into --out.
"""

from __future__ import annotations

import gc
import json
import statistics
import time

import torch

from benchmarks.common import H200_BF16_TFLOPS, SuiteParser, environment, write_json
from kimi_linear.config import KimiLinearConfig
from kimi_linear.model import KimiLinearForCausalLM, count_parameters, parse_activation_checkpointing
from kimi_linear.ops.cross_entropy import linear_cross_entropy
from kimi_linear.train.activation_memory import saved_activations
from kimi_linear.train.distributed import DistContext
from kimi_linear.train.trainer import TrainConfig, Trainer

PEAK_TFLOPS = H200_BF16_TFLOPS
CHUNK = 64


def one_b_config(mixer: str = "kda", smoke: bool = False) -> KimiLinearConfig:
    """The benchmark's ~1B model (or, with ``smoke``, a tiny one of the same structure for a CPU check)."""
    if smoke:
        return KimiLinearConfig.from_preset("debug", mixer=mixer, num_hidden_layers=4, layer_types=None,
                                            kda_layers=None, full_attn_layers=None, model_max_length=1 << 20)
    return KimiLinearConfig.from_preset(
        "small",
        mixer=mixer,
        vocab_size=32000,
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=5632,
        moe_intermediate_size=512,
        num_experts=16,
        num_experts_per_token=4,
        num_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        kda_num_heads=16,
        kda_head_dim=128,
        model_max_length=1 << 20,
        layer_types=None,
        kda_layers=None,
        full_attn_layers=None,
    )


def train_flops_per_token(config: KimiLinearConfig, T: int) -> dict:
    """Forward + backward FLOPs per token: dense (6 x active matrix parameters) and the token mixers."""
    _, active = count_parameters(config)
    active -= config.vocab_size * config.hidden_size  # the embedding is a lookup, not a product
    dense = 6 * active
    kda = mla = 0
    H, K = config.kda_num_heads, config.kda_head_dim
    for t in config.layer_types:
        if t in ("kda", "gdn"):
            kda += 3 * H * (6 * K * K + 3 * CHUNK * K + CHUNK * CHUNK)
        elif t == "mla":
            d_qk = config.qk_nope_head_dim + config.qk_rope_head_dim
            mla += 3 * config.num_attention_heads * 2 * (T / 2) * (d_qk + config.v_head_dim)
    return {"dense": dense, "kda": kda, "attention": mla, "total": dense + kda + mla}


def make_batch(n_docs: int, T: int, vocab: int, gen: torch.Generator) -> dict:
    """``n_docs`` documents of T tokens packed on one row with ``cu_seqlens`` (as ``kimi-linear train`` feeds)."""
    tokens = torch.randint(0, vocab, (n_docs, T + 1), generator=gen)
    return {"input_ids": tokens[:, :-1].reshape(1, -1).contiguous(),
            "labels": tokens[:, 1:].reshape(1, -1).contiguous(),
            "cu_seqlens": torch.arange(0, n_docs * T + 1, T, dtype=torch.int32)}


def layer_code(config: KimiLinearConfig) -> str:
    return "".join("K" if t == "kda" else "G" if t == "gdn" else "M" if t == "mla" else "?"
                   for t in config.layer_types)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


class Timer:
    """Elapsed milliseconds of a block: CUDA events on the GPU (the device's time), the host clock on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def peak_above(device: str, fn) -> tuple[object, float]:
    """(fn(), peak GiB allocated while it ran above what was allocated before it; NaN off CUDA)."""
    if device != "cuda":
        return fn(), float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - before) / 2**30


def time_fwd_bwd(device: str, forward, reps: int, warmup: int) -> dict:
    """Median forward ms, median backward ms (each timed alone) and the peak GiB of one forward + backward, for
    ``forward()`` returning a tensor to differentiate with a fixed random gradient."""
    out = forward()
    grad = torch.randn_like(out)
    del out
    for _ in range(warmup):
        forward().backward(grad)
    f, b = [], []
    for _ in range(reps):
        with Timer(device) as t:
            out = forward()
        f.append(t.ms)
        with Timer(device) as t:
            out.backward(grad)
        b.append(t.ms)
        del out
    peak = peak_above(device, lambda: forward().backward(grad))[1] if device == "cuda" else float("nan")
    return {"fwd_ms": statistics.median(f), "bwd_ms": statistics.median(b), "peak_gib": peak}


def profile_layers(model: KimiLinearForCausalLM, batch: dict, args, ac: str) -> list[dict]:
    """One layer of each kind, and the head + loss, alone on a step's tokens: times, peak and saved bytes."""
    device, config = args.device, model.config
    ids = batch["input_ids"].to(device)
    cu = batch["cu_seqlens"].to(device)
    T = ids.shape[1]
    kinds: dict[str, list[int]] = {}
    for i, layer in enumerate(model.model.layers):
        kinds.setdefault(f"{layer.layer_type}+{'moe' if layer.is_moe else 'mlp'}", []).append(i)
    rows = []
    gen = torch.Generator(device=device).manual_seed(3)
    for kind, indices in kinds.items():
        layer = model.model.layers[indices[0]]
        x = torch.randn(1, T, config.hidden_size, device=device, generator=gen).requires_grad_()

        def forward(layer=layer, x=x):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=args.autocast):
                return layer(x, cu_seqlens=cu)

        row = {"part": kind, "count": len(indices), **time_fwd_bwd(device, forward, args.profile_reps, 1)}
        row["saved_bytes_per_token"] = saved_per_token(layer, forward, T) if not ac else None
        rows.append(row)
        del x
        free_memory(device)
    hidden = torch.randn(1, T, config.hidden_size, device=device, generator=gen).requires_grad_()
    labels = batch["labels"].to(device)

    def head():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.autocast):
            return linear_cross_entropy(hidden, model.lm_head.weight, labels)

    row = {"part": "lm_head + loss", "count": 1, **time_fwd_bwd(device, head, args.profile_reps, 1)}
    row["saved_bytes_per_token"] = saved_per_token(model.lm_head, head, T) if not ac else None
    rows.append(row)
    return rows


def saved_per_token(module, forward, T: int) -> float:
    report = saved_activations(module, lambda: forward().float().sum())
    return report.activation_bytes() / T


def measure(mixer: str, seq_len: int, ac: str, args) -> dict:
    """Throughput, MFU and peak memory of one configuration (and its per-layer profile when asked)."""
    torch.manual_seed(0)
    config = one_b_config(mixer, args.smoke)
    docs = args.docs or max(1, args.tokens_per_step // seq_len)
    tokens = docs * seq_len * args.grad_accum
    total, active = count_parameters(config)
    row = {"mixer": mixer, "layers": layer_code(config), "seq_len": seq_len, "docs": docs,
           "activation_checkpointing": ac or "none", "params": total, "active_params": active,
           "tokens_per_step": tokens}
    model = trainer = None
    try:
        model = KimiLinearForCausalLM(config).to(args.device)
        trainer = Trainer(model, TrainConfig(max_steps=10_000, lr=3e-4, warmup_steps=10,
                                             activation_checkpointing=ac or "none"),
                          ctx=DistContext(device=torch.device(args.device)), progress=False)
        gen = torch.Generator().manual_seed(1)
        batches = [make_batch(docs, seq_len, config.vocab_size, gen) for _ in range(args.grad_accum)]
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            trainer.train_step(batches, sync=False)
        trainer.read_stats()
        with Timer(args.device) as t:
            for _ in range(args.steps):
                trainer.train_step(batches, sync=False)
        losses = [s["loss"] for _, s in trainer.read_stats()]
        step_s = t.ms / 1e3 / args.steps
        flops = train_flops_per_token(config, seq_len)
        row.update({"step_s": step_s, "tokens_per_s": tokens / step_s, "flops_per_token": flops,
                    "tflops": flops["total"] * tokens / step_s / 1e12, "losses": losses})
        row["mfu"] = row["tflops"] / PEAK_TFLOPS
        if args.device == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
        if not is_oom(e):
            raise
        row["oom"] = True
        if args.device == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.profile_layers and not row.get("oom"):
        trainer.optimizer.zero_grad(set_to_none=True)
        free_memory(args.device)
        try:
            row["profile"] = profile_layers(model, batches[0], args, ac)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            row["profile_oom"] = True
    del trainer, model
    free_memory(args.device)
    return row


def print_profile(row: dict) -> None:
    print(f"\nper layer, {row['mixer']} {row['layers']}, T = {row['seq_len']} x {row['docs']} docs, "
          f"activation checkpointing {row['activation_checkpointing']}")
    print("| part | layers | fwd ms | bwd ms | fwd+bwd ms (all layers) | peak GiB | saved KiB/token |")
    print("|---|---|---|---|---|---|---|")
    for p in row["profile"]:
        saved = "-" if p["saved_bytes_per_token"] is None else f"{p['saved_bytes_per_token'] / 1024:.1f}"
        print(f"| {p['part']} | {p['count']} | {p['fwd_ms']:.2f} | {p['bwd_ms']:.2f} | "
              f"{p['count'] * (p['fwd_ms'] + p['bwd_ms']):.1f} | {p['peak_gib']:.2f} | {saved} |")


def main(argv=None) -> None:
    p = SuiteParser(__name__, __doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--mixers", nargs="+", default=["kda", "mla"], choices=["kda", "gdn", "mla"])
    p.add_argument("--seq-len", nargs="+", type=int, default=[4096], help="context lengths (one run each)")
    p.add_argument("--tokens-per-step", type=int, default=32768,
                   help="tokens per micro-batch when --docs is not given: docs = this // seq-len, at least 1")
    p.add_argument("--docs", type=int, default=None, help="documents of --seq-len tokens per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--activation-checkpointing", nargs="+", default=["none"], metavar="SPEC",
                   help="settings to run (each as `kimi-linear train --activation-checkpointing`), e.g. none "
                        "mla,moe full")
    p.add_argument("--steps", type=int, default=8, help="timed steps, back to back")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile-layers", action="store_true",
                   help="also time one layer of each kind and the head + loss alone, with peak memory and "
                        "saved bytes per token")
    p.add_argument("--profile-reps", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="a tiny model of the same structure (CPU check)")
    args = p.parse_args(argv)
    for spec in args.activation_checkpointing:
        parse_activation_checkpointing(spec)
    if args.smoke:
        args.seq_len = [min(s, 128) for s in args.seq_len]
        args.tokens_per_step = min(args.tokens_per_step, 256)
        args.steps, args.warmup, args.profile_reps = min(args.steps, 2), min(args.warmup, 1), 1
    args.autocast = args.device == "cuda"
    rows = []
    for seq_len in args.seq_len:
        for spec in args.activation_checkpointing:
            ac = "" if not parse_activation_checkpointing(spec) else spec
            for mixer in args.mixers:
                row = measure(mixer, seq_len, ac, args)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "profile")}), flush=True)
    info = environment(args, device=args.device, seq_len=args.seq_len, tokens_per_step=args.tokens_per_step,
                       docs=args.docs, grad_accum=args.grad_accum, steps=args.steps, peak_tflops=PEAK_TFLOPS,
                       rows=rows)
    write_json(args.out, "train_speed_gpu.json", info)
    for row in rows:
        if "profile" in row:
            print_profile(row)
    where = info.get("gpu") if args.device == "cuda" else info["cpu"]
    print(f"\n{where}, commit {info['commit']}, torch {info['torch']}, {args.grad_accum} micro-batch(es) per step, "
          f"{args.steps} steps back to back after {args.warmup} warm-up")
    print("| model | T x docs | act. ckpt | params (active) | tokens/s | step s | TFLOP/s | MFU | peak GiB | "
          "vs MLA |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = (f"| {r['mixer']} {r['layers']} | {r['seq_len']} x {r['docs']} | {r['activation_checkpointing']} | "
                f"{r['params'] / 1e9:.2f}B ({r['active_params'] / 1e9:.2f}B) |")
        if r.get("oom"):
            print(f"{head} OOM | | | | >{r.get('peak_mem_gib', float('nan')):.1f} | |")
            continue
        base = next((b for b in rows if b["mixer"] == "mla" and b["seq_len"] == r["seq_len"] and not b.get("oom")
                     and b["activation_checkpointing"] == r["activation_checkpointing"]), None)
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(f"{head} {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['tflops']:.1f} | {100 * r['mfu']:.1f}% | "
              f"{r.get('peak_mem_gib', float('nan')):.1f} | {ratio} |")


if __name__ == "__main__":
    main()
