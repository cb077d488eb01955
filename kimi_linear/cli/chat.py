"""`kimi-linear chat`: a multi-turn conversation with a checkpoint, keeping the model cache between turns."""

from __future__ import annotations

import argparse
import os
import sys

from kimi_linear.cli.common import add_threads_argument, resolve_device, set_threads, utf8_problem

DTYPES = ("auto", "float32", "bfloat16", "float16")
COMMANDS_HELP = (
    "/reset (new conversation), /system TEXT (set the system prompt; /system alone removes it), /exit"
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="chat with a checkpoint folder (chat template, cache kept between turns)",
        description="Multi-turn chat with a checkpoint folder. The conversation is rendered with the folder's chat "
        "template (the built-in Kimi format for tiktoken checkpoints without one; a plain 'role: text' format for "
        "the project's byte-level models) and the model's cache (KDA states, MLA latents) is kept between turns, "
        "so each turn prefills only its new tokens. On a terminal replies stream as they are generated, with line "
        f"editing and history; commands: {COMMANDS_HELP}; Ctrl-C stops the current reply and keeps the "
        "conversation, Ctrl-D quits. With stdin not a terminal, each input line is one user turn (or a command) "
        "and each reply is printed as one block followed by a blank line. Sampling defaults come from the "
        "folder's generation_config.json (greedy without one).",
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint folder (config.json, *.safetensors, tokenizer), or a "
        "`kimi-linear train` run folder (its newest checkpoint that reads is used)"
    )
    p.add_argument("--system", default=None, help="system prompt (default: none, or the template's own)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per reply at most (default 512)")
    p.add_argument(
        "--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json, else 0)"
    )
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens, 0 = off (default: generation_config.json, else 0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1], 1 = off (default: generation_config.json, else 1)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling generator (default: none, a fresh draw)")
    p.add_argument(
        "--max-context",
        type=int,
        default=32768,
        help="tokens the conversation may hold (the cache size; default 32768, at most the model's length)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto (the default): bfloat16 on CUDA, float32 on CPU")
    add_threads_argument(p)
    p.set_defaults(func=run)


def _load(args: argparse.Namespace):
    import torch

    from kimi_linear.chat import ChatSession, SamplingSettings
    from kimi_linear.cli.generate import resolve_checkpoint
    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM
    from kimi_linear.tokenizer import load_tokenizer

    device = resolve_device(args.device)
    if args.system is not None and (problem := utf8_problem(args.system)):
        raise ValueError(f"--system is not valid UTF-8 ({problem})")
    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"checkpoint folder not found: {args.checkpoint}")
    args.checkpoint = resolve_checkpoint(args.checkpoint)  # a `kimi-linear train` run: its newest checkpoint
    config = KimiLinearConfig.from_hf(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint, config)  # fails before the weights are read
    sampling = SamplingSettings.from_generation_config(
        tokenizer.generation_config,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    if args.max_context < 2:
        raise ValueError(f"--max-context must be >= 2, got {args.max_context}")
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else None
    dtype = dtype or getattr(torch, args.dtype)
    model = KimiLinearForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=device).eval()
    session = ChatSession(
        model,
        tokenizer,
        system=args.system,
        sampling=sampling,
        max_length=min(args.max_context, config.model_max_length),
    )
    return session, f"{tokenizer.name} tokenizer, {device}, {str(dtype).removeprefix('torch.')}"


def _command(session, line: str) -> bool | None:
    """Run a /command: True to quit, False when handled, None when the line is not a command."""
    word, _, rest = line.strip().partition(" ")
    if word in ("/exit", "/quit"):
        return True
    if word == "/reset":
        session.reset()
        print("[new conversation]", file=sys.stderr)
        return False
    if word == "/system":
        session.set_system(rest.strip() or None)
        print(f"[system prompt {'set' if rest.strip() else 'removed'}]", file=sys.stderr)
        return False
    if word == "/help":
        print(COMMANDS_HELP, file=sys.stderr)
        return False
    return None


def _interactive(session) -> None:
    from kimi_linear.chat import ContextFullError
    from kimi_linear.tokenizer import StreamDecoder

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n[Ctrl-D or /exit quits]", file=sys.stderr)
            continue
        if not line.strip():
            continue
        if problem := utf8_problem(line):
            print(f"[the line is not valid UTF-8 ({problem}); not sent]", file=sys.stderr)
            continue
        handled = _command(session, line)
        if handled:
            return
        if handled is False:
            continue
        stream = StreamDecoder(session.tokenizer)

        def on_token(token: int, stream=stream) -> None:
            sys.stdout.write(stream(token))
            sys.stdout.flush()

        try:
            reply = session.send(line, on_token=on_token)
        except ContextFullError as e:
            print(f"[{e}]", file=sys.stderr)
            continue
        sys.stdout.write(stream.flush() + "\n")
        sys.stdout.flush()
        if reply.finish_reason == "interrupted":
            print("[reply stopped; the conversation goes on]", file=sys.stderr)
        elif reply.finish_reason == "length":
            print(f"[reply cut at {len(reply.token_ids)} tokens]", file=sys.stderr)


def _scripted(session) -> int:
    from kimi_linear.chat import ContextFullError

    status = 0
    for number, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if problem := utf8_problem(line):
            print(f"kimi-linear chat: error: input line {number} is not valid UTF-8 ({problem}); skipped",
                  file=sys.stderr, flush=True)
            status = 2
            continue
        handled = _command(session, line)
        if handled:
            break
        if handled is False:
            continue
        try:
            reply = session.send(line)
        except ContextFullError as e:
            print(f"kimi-linear chat: error: {e}", file=sys.stderr)
            status = 2
            continue
        print(reply.text)
        print(flush=True)
    return status


def run(args: argparse.Namespace) -> int:
    set_threads(args)
    session, description = _load(args)
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes reach utf8_problem (named), no traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    if sys.stdin.isatty():
        print(f"[{args.checkpoint}: {description}; {COMMANDS_HELP}; Ctrl-C stops a reply]", file=sys.stderr)
        _interactive(session)
        return 0
    return _scripted(session)
