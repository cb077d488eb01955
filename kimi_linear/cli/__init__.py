"""`kimi-linear <subcommand>`: the command-line entry point.

Each subcommand lives in its own module of this package, which exposes ``add_parser(subparsers)`` and
registers its handler with ``parser.set_defaults(func=...)``. The modules are imported when the CLI starts.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = (
    "kimi_linear.cli.train",
    "kimi_linear.cli.generate",
    "kimi_linear.cli.chat",
    "kimi_linear.cli.info",
    "kimi_linear.cli.synth",
    "kimi_linear.cli.serve",
    "kimi_linear.cli.bench_serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kimi-linear",
        description="Kimi Linear: Kimi Delta Attention, the 3:1 KDA:MLA hybrid model, checkpoints, generation, training.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<subcommand>")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as e:
        print(f"kimi-linear {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kimi-linear {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
