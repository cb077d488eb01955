"""Arguments shared by the subcommands."""

from __future__ import annotations

import argparse

THREADS_HELP = (
    "torch CPU threads (default 1: the models' ops are small, and on a shared machine several threads per "
    "process run many times slower than one; raise it on an idle many-core machine)"
)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` (default 1) for a CPU-heavy subcommand; apply it with ``set_threads(args)``."""
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``args.threads`` to torch. Raises ValueError unless it is >= 1."""
    import torch

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
