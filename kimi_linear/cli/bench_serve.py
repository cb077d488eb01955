"""`kimi-linear bench-serve`: load a running server with N concurrent streaming clients and report."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench-serve",
        help="load-test a running server (throughput, TTFT, TPOT)",
        description="Sends --num-requests streaming /v1/completions requests from --num-clients concurrent "
        "clients (each sends its next request when its last one ends). Prompts are random token ids; "
        "lengths are N, uniform:LO:HI, normal:MEAN:STD or exponential:MEAN. Every request ignores EOS, so it "
        "produces exactly its drawn output length. Prints a table (and --json writes the report).",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default http://127.0.0.1:8000)")
    p.add_argument("--num-clients", type=int, default=8, help="concurrent streaming clients (default 8)")
    p.add_argument("--num-requests", type=int, default=64, help="requests in all (default 64)")
    p.add_argument("--prompt-len", default="256", help="prompt tokens after the shared prefix, a distribution (default 256)")
    p.add_argument("--output-len", default="64", help="output tokens, a distribution (default 64)")
    p.add_argument("--shared-prefix-len", type=int, default=0, help="tokens every prompt starts with (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and lengths (default 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--json", dest="json_path", default=None, help="write the report as JSON here, '-' for stdout (default: no JSON)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kimi_linear.serve.loadgen import LengthDist, LoadSpec, run_load

    spec = LoadSpec(
        url=args.url,
        num_clients=args.num_clients,
        num_requests=args.num_requests,
        prompt_len=LengthDist.parse(args.prompt_len),
        output_len=LengthDist.parse(args.output_len),
        shared_prefix_len=args.shared_prefix_len,
        seed=args.seed,
        timeout_s=args.timeout,
    )
    import httpx

    try:
        report = asyncio.run(run_load(spec))
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach the server at {args.url}: {type(e).__name__}: {e}") from None
    if args.json_path == "-":
        print(report.to_json())
    else:
        print(report.table())
        if args.json_path:
            tmp = f"{args.json_path}.tmp"
            with open(tmp, "w") as f:
                f.write(report.to_json() + "\n")
            os.replace(tmp, args.json_path)
    if report.errors:
        print("errors: " + "; ".join(report.errors), file=sys.stderr)
    return 0 if report.num_failed == 0 else 1
