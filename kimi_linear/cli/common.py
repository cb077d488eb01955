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


def resolve_device(name: str | None):
    """``--device`` as a ``torch.device``: None picks cuda when available, else cpu.

    Raises:
        ValueError: not cpu / cuda / cuda:N, or CUDA (that device) is not available here.
    """
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: use cpu, cuda or cuda:N")
    return device


def utf8_problem(text: str) -> str | None:
    """Where ``text`` (from argv or stdin, undecodable bytes kept as surrogates by Python) is not valid UTF-8,
    as "byte 0xff at character 2", or None when it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        return f"byte {bad[0]:#04x} at character {e.start}"
    return None
