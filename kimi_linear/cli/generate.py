"""`kimi-linear generate`: load a checkpoint folder and continue one or more prompts, streaming the text."""

from __future__ import annotations

import argparse
import os
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint folder (release format)",
        description="Loads config.json + safetensors from --checkpoint, tokenises each --prompt (tiktoken "
        "with the folder's tiktoken.model when present, UTF-8 bytes otherwise), prefills with the chunk "
        "kernel and decodes with the recurrent kernel. One prompt streams its continuation; several print "
        "one block each.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json, *.safetensors)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--stop",
        type=int,
        action="append",
        default=None,
        help="token id that ends a sequence (repeatable; default: the config's eos_token_id)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from kimi_linear.generate import generate, validate_sampling
    from kimi_linear.model import KimiLinearForCausalLM
    from kimi_linear.tokenizer import StreamDecoder, load_tokenizer

    validate_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint folder not found: {args.checkpoint}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)

    model = KimiLinearForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=device).eval()
    tokenizer = load_tokenizer(args.checkpoint, model.config)
    prompts = [tokenizer.encode(text) for text in args.prompt]
    for text, ids in zip(args.prompt, prompts, strict=False):
        if not ids:
            raise ValueError(f"prompt {text!r} is empty after tokenisation")
    if tokenizer.add_bos and tokenizer.bos_token_id is not None:
        prompts = [[tokenizer.bos_token_id, *ids] for ids in prompts]

    streaming = len(prompts) == 1
    stream = StreamDecoder(tokenizer)

    def on_token(index: int, token: int) -> None:
        sys.stdout.write(stream(token))
        sys.stdout.flush()

    if streaming:
        sys.stdout.write(args.prompt[0])
    outputs = generate(
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_tokens=args.stop,
        seed=args.seed,
        on_token=on_token if streaming else None,
        use_cuda_graph=not args.no_cuda_graph,
    )
    if streaming:
        sys.stdout.write(stream.flush() + "\n")
    else:
        for i, (text, out) in enumerate(zip(args.prompt, outputs, strict=False)):
            print(f"--- [{i}] ---\n{text}{tokenizer.decode(out)}")
    print(
        f"[{tokenizer.name} tokenizer, {sum(len(o) for o in outputs)} new tokens, {device}, "
        f"{str(dtype).removeprefix('torch.')}]",
        file=sys.stderr,
    )
    return 0
