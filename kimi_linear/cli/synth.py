"""`kimi-linear synth`: train the paper's small model on one synthetic task (§5.1), report answer accuracy."""

from __future__ import annotations

import argparse
import json

from kimi_linear.cli.common import add_threads_argument, resolve_device, set_threads
from kimi_linear.train.synthetic import DEFAULT_VOCAB, MIXERS, TASKS, SynthConfig


def add_parser(subparsers) -> None:
    defaults = SynthConfig()
    p = subparsers.add_parser(
        "synth",
        help="train a 2-layer model on MQAR, Palindrome or Stack and report answer accuracy",
        description="Trains the paper's synthetic-task model (2 layers, 2 heads of dim 128, no MoE) with the "
        "chosen token mixer on freshly generated sequences, and reports the accuracy on the answer positions "
        "of a held-out set. Default vocabularies: "
        + ", ".join(f"{t} {v}" for t, v in DEFAULT_VOCAB.items())
        + ".",
    )
    p.add_argument("--task", choices=TASKS, default=defaults.task, help="the task (default %(default)s)")
    p.add_argument(
        "--mixer",
        choices=MIXERS,
        default=defaults.mixer,
        help="kda, gdn (scalar-gate KDA), mamba2, or attention (MLA in every layer) (default %(default)s)",
    )
    p.add_argument("--seq-len", type=int, default=defaults.seq_len,
                   help="tokens per sequence (default %(default)s)")
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="sequences per step (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=None, help="default: the task's (see above)")
    p.add_argument("--num-kv-pairs", type=int, default=None, help="MQAR only (default seq-len / 32)")
    p.add_argument("--eval-every", type=int, default=defaults.eval_every,
                   help="steps between held-out evaluations (default %(default)s)")
    p.add_argument("--eval-examples", type=int, default=defaults.eval_examples,
                   help="held-out sequences (default %(default)s)")
    p.add_argument(
        "--stop-at",
        type=float,
        default=defaults.stop_at,
        help="stop once the held-out accuracy reaches this (1 = only at 100%%) (default %(default)s)",
    )
    p.add_argument(
        "--max-seconds", type=float, default=None,
        help="stop training after this long, then evaluate (default: no limit)",
    )
    p.add_argument("--heads", type=int, default=defaults.num_heads,
                   help="heads per layer (default %(default)s)")
    p.add_argument("--head-dim", type=int, default=defaults.head_dim,
                   help="head dimension (default %(default)s)")
    p.add_argument("--layers", type=int, default=defaults.num_layers, help="layers (default %(default)s)")
    p.add_argument("--device", default=defaults.device, help="cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="seed of data and weights (default %(default)s)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the result (with the curve) here (default: not written)")
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kimi_linear.train.synthetic import train_synthetic

    set_threads(args)
    resolve_device(args.device)
    cfg = SynthConfig(
        task=args.task,
        mixer=args.mixer,
        seq_len=args.seq_len,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        vocab_size=args.vocab_size,
        num_kv_pairs=args.num_kv_pairs,
        eval_every=args.eval_every,
        eval_examples=args.eval_examples,
        stop_at=args.stop_at,
        max_seconds=args.max_seconds,
        seed=args.seed,
        device=args.device,
        num_layers=args.layers,
        num_heads=args.heads,
        head_dim=args.head_dim,
    )
    result = train_synthetic(cfg, log=lambda line: print(line, flush=True))
    print(
        f"{cfg.task} {cfg.mixer} seq-len {cfg.seq_len}: answer accuracy {result.accuracy:.4f} "
        f"(best {result.best_accuracy:.4f}) after {result.steps_run} steps, {result.seconds:.1f}s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=1)
    return 0
