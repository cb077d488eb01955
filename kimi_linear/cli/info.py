"""`kimi-linear info DIR|PRESET`: layer layout, parameters (total / active per token), per-sequence cache
at a given context against an MLA-only model of the same shape (the paper's "75% less KV cache")."""

from __future__ import annotations

import argparse
import json
import os


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="parameters and cache size of a checkpoint folder or preset",
        description="Reads only config.json (no weights) or a preset name and prints the layer layout, the "
        "parameter count (total and active per token), and the inference cache one sequence needs at "
        "--context tokens compared with the same model using MLA in every layer.",
    )
    p.add_argument("source", help="checkpoint folder (with config.json) or preset name")
    p.add_argument("--context", type=int, default=1 << 20, help="tokens per sequence (default 1M)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def _count(n: int) -> str:
    """A parameter count in the unit that shows it: 48.0 B, 3.21 M, 5.1 K, 980."""
    for scale, unit, digits in ((1e9, "B", 3), (1e6, "M", 2), (1e3, "K", 1)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return str(n)


def _gib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.3f} GiB"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def describe(config, context: int) -> dict:
    from kimi_linear.cache import cache_bytes_per_sequence
    from kimi_linear.model import count_parameters

    total, active = count_parameters(config)
    cache = cache_bytes_per_sequence(config, context)
    counts = {t: config.layer_types.count(t) for t in dict.fromkeys(config.layer_types)}
    return {
        "layers": config.num_hidden_layers,
        "layer_counts": counts,
        "layer_types": config.layer_types,
        "params_total": total,
        "params_active": active,
        "context": context,
        "cache_bytes_per_sequence": cache["hybrid"],
        "cache_bytes_per_sequence_mla_only": cache["mla_only"],
        "cache_reduction": 1 - cache["hybrid"] / cache["mla_only"],
        "kda_state_bytes_per_layer": cache["kda_layer"],
        "mla_cache_bytes_per_layer": cache["mla_layer"],
    }


def run(args: argparse.Namespace) -> int:
    from kimi_linear.config import PRESETS, KimiLinearConfig

    if args.context < 1:
        raise ValueError(f"--context must be >= 1, got {args.context}")
    if os.path.isdir(args.source):
        config = KimiLinearConfig.from_hf(args.source)
    elif args.source in PRESETS:
        config = KimiLinearConfig.from_preset(args.source)
    elif os.path.exists(args.source):
        raise NotADirectoryError(f"{args.source} is not a checkpoint folder")
    else:
        raise ValueError(
            f"{args.source!r} is neither a checkpoint folder nor a preset ({', '.join(PRESETS)})"
        )
    info = describe(config, args.context)
    if args.json:
        print(json.dumps({"source": args.source, **info}))
        return 0
    layout = " + ".join(f"{n} {t.upper()}" for t, n in info["layer_counts"].items())
    print(
        f"{args.source}: {info['layers']} layers ({layout}), hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}"
    )
    print(
        f"parameters: {_count(info['params_total'])} total, {_count(info['params_active'])} active per token"
    )
    print(
        f"cache per sequence at {info['context']} tokens: {_gib(info['cache_bytes_per_sequence'])} "
        f"vs {_gib(info['cache_bytes_per_sequence_mla_only'])} with MLA in every layer "
        f"({100 * info['cache_reduction']:.1f}% less)"
    )
    print(
        f"  per KDA layer (fixed): {_gib(info['kda_state_bytes_per_layer'])}; "
        f"per MLA layer: {_gib(info['mla_cache_bytes_per_layer'])} (latent + rope key, 2 bytes each)"
    )
    return 0
