"""`kimi-linear generate`: load a checkpoint folder and continue one or more prompts, streaming the text."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kimi_linear.cli.common import add_threads_argument, resolve_device, set_threads

DTYPES = ("auto", "float32", "bfloat16", "float16")
STATE_DTYPES = ("float32", "bfloat16")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint folder (release format)",
        description="Loads config.json + safetensors from --checkpoint, tokenises each --prompt (tiktoken "
        "with the folder's tiktoken.model when present, UTF-8 bytes otherwise), prefills with the chunk "
        "kernel and decodes with the recurrent kernel. One prompt streams its continuation; several print "
        "one block each.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (config.json, *.safetensors), or a `kimi-linear train` run folder "
                        "(its newest checkpoint that reads is used)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (UTF-8); repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampling (default: drawn from torch's generator, so runs differ)")
    p.add_argument(
        "--stop",
        type=int,
        action="append",
        default=None,
        help="token id that ends a sequence (repeatable; default: the config's eos_token_id)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights and compute dtype (default auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--kda-state-dtype", default="float32", choices=STATE_DTYPES,
                   help="dtype of the cached KDA recurrent states (default float32); bfloat16 halves the state "
                        "bytes a decode step moves (computed in fp32, stored rounded)")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    add_threads_argument(p)
    p.set_defaults(func=run)


def resolve_checkpoint(path: str) -> str:
    """The checkpoint folder to load: ``path`` itself, or for a training run folder (``checkpoint-N``
    subfolders, no config.json) its newest checkpoint that verifies, announced on stderr.

    Raises:
        FileNotFoundError: no such folder, or a run folder without a readable checkpoint.
    """
    from kimi_linear.train.checkpointing import latest_checkpoint, list_checkpoints

    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    if folder.is_dir() and not (folder / "config.json").exists() and list_checkpoints(folder):
        found = latest_checkpoint(folder, report=lambda line: print(line, file=sys.stderr))
        if found is None:
            raise FileNotFoundError(f"{path} is a training run folder without a readable checkpoint")
        print(f"using {found} (the newest checkpoint of the run in {path})", file=sys.stderr)
        return str(found)
    return path


def validate_prompts(prompts: list[str]) -> None:
    """Raise ValueError naming the ``--prompt`` that is not valid UTF-8 (bytes the shell passed undecoded)."""
    for i, text in enumerate(prompts, 1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = text[e.start].encode("utf-8", "surrogateescape")
            raise ValueError(f"--prompt #{i} is not valid UTF-8 (byte {bad[0]:#04x} at character {e.start}); "
                             f"pass UTF-8 text") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from kimi_linear.generate import generate, validate_sampling
    from kimi_linear.model import KimiLinearForCausalLM
    from kimi_linear.tokenizer import StreamDecoder, load_tokenizer

    validate_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    validate_prompts(args.prompt)
    set_threads(args)
    device = resolve_device(args.device)
    checkpoint = resolve_checkpoint(args.checkpoint)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)

    model = KimiLinearForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=device).eval()
    config = model.config
    for token in args.stop or ():
        if not 0 <= token < config.vocab_size:
            raise ValueError(f"--stop {token} is not a token id of this model (0..{config.vocab_size - 1})")
    tokenizer = load_tokenizer(checkpoint, config)
    prompts = [tokenizer.encode(text) for text in args.prompt]
    for text, ids in zip(args.prompt, prompts, strict=False):
        if not ids:
            raise ValueError(f"prompt {text!r} is empty after tokenisation")
    if tokenizer.add_bos and tokenizer.bos_token_id is not None:
        prompts = [[tokenizer.bos_token_id, *ids] for ids in prompts]
    # Checked here, before the prompt is echoed, so that an error is the only output.
    for i, ids in enumerate(prompts, 1):
        if len(ids) + args.max_new_tokens > config.model_max_length:
            raise ValueError(f"--prompt #{i} ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} "
                             f"exceeds the model's model_max_length={config.model_max_length}")

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
        state_dtype=getattr(torch, args.kda_state_dtype),
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
