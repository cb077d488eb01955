"""Training throughput and MFU of a ~1B Kimi Linear (and its MLA-only twin) at 4k context on one GPU.

Tokens/s and model FLOP utilisation through the same ``Trainer.train_step`` that ``kimi-linear train`` runs (bf16
autocast, fp32 weights and AdamW, gradient clipping, MoE bias balancing, documents packed with ``cu_seqlens``,
Triton KDA kernels).

The model (``one_b_config``): hidden 2048, 16 layers (3:1 KDA:MLA: 12 KDA + 4 MLA, NoPE), 16 KDA heads of 128,
16 MLA heads (latent 512 + 64), MoE with 16 experts of 512 (top 4, one shared expert) after a dense first layer,
vocabulary 32000 — about 1.2B parameters, 0.7B active per token. The same shape with every layer MLA
(``--mixers mla``) is the full-attention baseline.

FLOPs per token follow the usual accounting: 6 x (active matrix parameters, lm_head included, embedding lookup
excluded) for forward + backward, plus the token mixers: KDA by paper Eq. 13 (per head 6 K^2 + 3 C K + C^2 per
token, C = 64) and causal attention 2 x (T / 2) x (d_qk + d_v) per head per token for the MLA layers' forward
(score and value products over on average T / 2 keys), both x3 for training. MFU = FLOPs / step time / 790 TFLOP/s
(the bf16 dense-matmul rate measured on the H200, benchmarks/common.py).

    python -m benchmarks train_speed_gpu                              # GPU
    python -m benchmarks train_speed_gpu --device cpu --smoke --out /tmp/x  # pipeline check on the CPU

Step times are CUDA-event medians (host clock on the CPU). Prints a table last and writes ``train_speed_gpu.json``
into --out.
"""

from __future__ import annotations

import json
import statistics

import torch

from benchmarks.common import H200_BF16_TFLOPS, SuiteParser, environment, samples_ms, write_json
from kimi_linear.config import KimiLinearConfig
from kimi_linear.model import KimiLinearForCausalLM, count_parameters
from kimi_linear.train.distributed import DistContext
from kimi_linear.train.trainer import TrainConfig, Trainer

PEAK_TFLOPS = H200_BF16_TFLOPS
CHUNK = 64


def one_b_config(mixer: str = "kda", smoke: bool = False) -> KimiLinearConfig:
    """The benchmark's ~1B model (or, with ``smoke``, a tiny one of the same structure for a CPU check)."""
    if smoke:
        return KimiLinearConfig.from_preset("debug", mixer=mixer, num_hidden_layers=4, layer_types=None,
                                            kda_layers=None, full_attn_layers=None)
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
        model_max_length=65536,
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


def measure(mixer: str, args) -> dict:
    torch.manual_seed(0)
    config = one_b_config(mixer, args.smoke)
    model = KimiLinearForCausalLM(config).to(args.device)
    trainer = Trainer(model, TrainConfig(max_steps=10_000, lr=3e-4, warmup_steps=10),
                      ctx=DistContext(device=torch.device(args.device)), progress=False)
    gen = torch.Generator().manual_seed(1)
    batches = [make_batch(args.docs, args.seq_len, config.vocab_size, gen) for _ in range(args.grad_accum)]
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []

    def step():
        losses.append(trainer.train_step(batches)["loss"])

    times = [ms / 1e3 for ms in samples_ms(step, args.steps, args.warmup, cuda=args.device == "cuda")]
    step_s = statistics.median(times)
    tokens = args.docs * args.seq_len * args.grad_accum
    flops = train_flops_per_token(config, args.seq_len)
    total, active = count_parameters(config)
    row = {
        "mixer": mixer, "layers": "".join("K" if t == "kda" else "M" if t == "mla" else "?"
                                          for t in config.layer_types),
        "params": total, "active_params": active, "step_s": step_s, "step_s_all": times,
        "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
        "flops_per_token": flops, "tflops": flops["total"] * tokens / step_s / 1e12,
        "losses": losses,
    }
    row["mfu"] = row["tflops"] / PEAK_TFLOPS
    if args.device == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> None:
    p = SuiteParser(__name__, __doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--mixers", nargs="+", default=["kda", "mla"], choices=["kda", "gdn", "mla"])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--docs", type=int, default=8, help="documents of --seq-len tokens per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="a tiny model of the same structure (CPU check)")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_len, args.docs, args.steps, args.warmup = min(args.seq_len, 128), min(args.docs, 2), 2, 1
    rows = []
    for mixer in args.mixers:
        row = measure(mixer, args)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "step_s_all")}), flush=True)
    info = environment(args, device=args.device, seq_len=args.seq_len, docs=args.docs,
                       grad_accum=args.grad_accum, steps=args.steps, peak_tflops=PEAK_TFLOPS, rows=rows)
    write_json(args.out, "train_speed_gpu.json", info)
    where = info.get("gpu") if args.device == "cuda" else info["cpu"]
    print(f"\n{where}, commit {info['commit']}, torch {info['torch']}, T = {args.seq_len}, {args.docs} x {args.grad_accum} "
          f"documents per step, median of {args.steps} steps")
    print("| model | params (active) | tokens/s | step s | TFLOP/s | MFU | peak GiB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mixer']} {r['layers']} | {r['params'] / 1e9:.2f}B ({r['active_params'] / 1e9:.2f}B) | "
              f"{r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['tflops']:.1f} | {100 * r['mfu']:.1f}% | "
              f"{r.get('peak_mem_gib', float('nan')):.1f} |")

