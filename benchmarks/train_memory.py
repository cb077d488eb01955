"""Saved activations per layer: the bytes per token each kind of decoder layer keeps for its backward, per tensor.

One decoder layer of each mixer (``--mixers``) of ``train_speed_gpu``'s ~1.2B model (hidden 2048, KDA 16 x 128, MLA
16 heads of 128 + 64 over a 512 latent, MoE 16 x 512 top 4 + 1 shared), the MoE layer 1, runs one forward on
``--docs`` documents packed into ``--seq-len`` tokens under bf16 autocast (as the trainer runs it on the GPU), and
``kimi_linear.train.activation_memory`` lists every tensor its autograd graph keeps: module, node, shape, dtype and
bytes per token (parameters and autocast's weight copies apart). Exact counts of what the graph holds, not
allocator statistics; no backward runs.

On the CPU the KDA layer takes the path it takes on the GPU with ``--kda-backend triton`` (default): its conv,
activations and chunk kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set for this process; slow, about
two minutes at 512 tokens). The other parts run as they do on the CPU, which is not always the GPU's path: SDPA's
math kernel in the MLA layer keeps fp32 q, k, v and the softmax where the GPU's flash kernel keeps bf16 q, k, v
(padded to 192), its output and the log-sum-exp; the reference RMSNorm keeps fp32 x and the normalised x where the
fused GPU kernel keeps x and 1/rms; the MoE's experts keep fp32 activations. Those parts are the same in both
models.

    python -m benchmarks train_memory                            # 1.2B shape, 512 tokens, CPU, KDA on Triton
    python -m benchmarks train_memory --device cuda --seq-len 4096

Prints a per-tensor table per layer, then the totals per part last; writes ``train_memory.json`` into --out.
"""

from __future__ import annotations

import os
import time

import torch

from benchmarks.common import SuiteParser, environment, write_json

PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "block_sparse_moe")


def measure_layer(mixer: str, args) -> dict:
    """Saved tensors of layer 1 (MoE) of the benchmark model with ``mixer`` layers, per token."""
    from benchmarks.train_speed_gpu import one_b_config
    from kimi_linear.model import DecoderLayer
    from kimi_linear.train.activation_memory import format_saved, saved_activations

    config = one_b_config(mixer)
    torch.manual_seed(0)
    layer = DecoderLayer(config, 1).to(args.device)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    if config.layer_types[1] in ("kda", "gdn"):
        attn = layer.self_attn
        attn.conv_backend = attn.preprocess_backend = attn.chunk_backend = args.kda_backend
    T = args.seq_len
    bounds = [round(i * T / args.docs) for i in range(args.docs + 1)]
    cu = torch.tensor(bounds, dtype=torch.int32, device=args.device)
    x = torch.randn(1, T, config.hidden_size, device=args.device, requires_grad=True)

    def forward():
        with torch.autocast(args.device, dtype=torch.bfloat16):
            return layer(x, cu_seqlens=cu).float().sum()

    start = time.perf_counter()
    report = saved_activations(layer, forward)
    seconds = time.perf_counter() - start
    tensors = [{"module": t.module, "node": t.node, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                "bytes_per_token": t.nbytes / T} for t in report.tensors if not t.is_parameter]
    return {"mixer": mixer, "layer_type": config.layer_types[1], "seconds": seconds, "tensors": tensors,
            "per_token": {part: report.activation_bytes(part) / T for part in PARTS},
            "total_per_token": report.activation_bytes() / T, "table": format_saved(report)}


def main(argv=None) -> None:
    p = SuiteParser(__name__, __doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixers", nargs="+", default=["kda", "mla"], choices=["kda", "gdn", "mla"])
    p.add_argument("--seq-len", type=int, default=512, help="tokens in the forward (packed documents)")
    p.add_argument("--docs", type=int, default=4, help="documents the tokens are split into")
    p.add_argument("--kda-backend", default="triton", choices=["triton", "torch", "auto"],
                   help="the KDA layer's conv / preprocess / chunk backend (triton on the CPU: the interpreter)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cpu" and args.kda_backend == "triton":
        # read when the kernel modules are imported (lazily, at the first forward that needs them)
        os.environ["TRITON_INTERPRET"] = "1"
    rows = [measure_layer(mixer, args) for mixer in args.mixers]
    info = environment(args, device=args.device, seq_len=args.seq_len, docs=args.docs,
                       kda_backend=args.kda_backend, rows=[{k: v for k, v in r.items() if k != "table"} for r in rows])
    write_json(args.out, "train_memory.json", info)
    for r in rows:
        print(f"\n{r['mixer']} layer 1 ({r['layer_type']} + MoE), bytes per token = bytes / {args.seq_len}:")
        print("| module | saved by | shape | dtype | bytes per token |\n|---|---|---|---|---|")
        for t in r["tensors"]:
            print(f"| {t['module']} | {t['node']} | {t['shape']} | {t['dtype']} | {t['bytes_per_token']:,.1f} |")
    print(f"\n{args.device}, {args.seq_len} tokens in {args.docs} packed documents, bf16 autocast, KDA backend "
          f"{args.kda_backend}; saved bytes per token")
    print("| layer | " + " | ".join(PARTS) + " | total |\n|---|" + "---|" * (len(PARTS) + 1))
    for r in rows:
        print(f"| {r['mixer']} ({r['layer_type']} + MoE) | "
              + " | ".join(f"{r['per_token'][part]:,.0f}" for part in PARTS) + f" | {r['total_per_token']:,.0f} |")


if __name__ == "__main__":
    main()
