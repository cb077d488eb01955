"""Run one benchmark suite: ``python -m benchmarks SUITE [--out DIR] [--compare PEER ...] [suite options]``.

Each suite prints its table last and writes ``SUITE.json`` (and a PNG where a curve says more) into ``--out``
(default benchmarks/results). ``python -m benchmarks SUITE --help`` gives the suite's own options; the tables,
the exact commands and the hardware of the committed results are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

# name -> module of this package; the first line of the module's docstring describes it
SUITES = (
    "kda_kernels",
    "kda_decode",
    "kda_preprocess_speed",
    "conv_speed",
    "mla_decode",
    "decode_gemv",
    "moe_speed",
    "model_speed",
    "model_efficiency",
    "serve_throughput",
    "serve_http",
    "train_speed",
    "train_speed_gpu",
    "train_memory",
    "kda_cpu",
    "kda_chunk_build",
    "kda_profile",
)


def summary(suite: str) -> str:
    """First line of the suite's docstring, read without importing it (no torch needed for ``--help``)."""
    source = (Path(__file__).parent / f"{suite}.py").read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def usage() -> str:
    lines = [__doc__.strip(), "", "suites:"]
    lines += [f"  {name:22s} {summary(name)}" for name in SUITES]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    suite, rest = argv[0], argv[1:]
    if suite not in SUITES:
        print(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    result = importlib.import_module(f"benchmarks.{suite}").main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
