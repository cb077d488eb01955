"""`kimi-linear serve`: an OpenAI-compatible HTTP server over a checkpoint folder (continuous batching).

Two processes: this one serves HTTP (FastAPI on uvicorn, ``serve.api``) with the checkpoint's config and tokenizer
but not its weights; the engine (``serve.engine.Engine`` over the loaded model) runs in a spawned child
(``serve.engine_process.EngineProcess``), so stepping it does not compete with the HTTP event loop for one GIL.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from kimi_linear.cli.common import add_threads_argument, resolve_device

DTYPES = ("auto", "float32", "bfloat16", "float16")
STATE_DTYPES = ("float32", "bfloat16")
API_KEY_ENV = "KIMI_LINEAR_API_KEY"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over the OpenAI HTTP API",
        description="Loads --checkpoint and serves POST /v1/completions, POST /v1/chat/completions, "
        "GET /v1/models, POST /tokenize, POST /detokenize, GET /health and GET /metrics. Requests are batched "
        "continuously on --max-num-seqs "
        "KDA state slots with a paged MLA latent cache; prompts sharing a prefix reuse it exactly. The engine "
        "runs in a child process (the HTTP process does not load the weights); if it dies, the requests in "
        "flight fail and the server exits with status 1. SIGTERM "
        "stops accepting connections, lets running requests finish (up to --drain-timeout) and exits. "
        "Engine settings left out take the engine's defaults (kimi_linear.serve.engine.EngineConfig).",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json, *.safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the folder's name)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help="require 'Authorization: Bearer KEY' on the /v1 routes (default: the "
                   f"{API_KEY_ENV} environment variable, which other users cannot read from the process list; "
                   "unset: no key)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto (the default): bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences running at once (state slots; default 16)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens per request (default: min(engine default, the model's "
                   "model_max_length))")
    p.add_argument("--max-queue", type=int, default=None, help="requests waiting for a slot, more get 429 (default 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="per-step token budget: decode tokens + prefill chunks (default 16384)")
    p.add_argument("--block-size", type=int, default=None, help="MLA cache block size in tokens, a multiple of 64 (default 64)")
    p.add_argument("--num-blocks", type=int, default=None, help="MLA cache blocks (default: derived)")
    p.add_argument("--gpu-memory-fraction", type=float, default=None,
                   help="fraction of GPU memory the engine may use for weights and caches (default 0.9)")
    p.add_argument("--kda-state-dtype", default="float32", choices=STATE_DTYPES,
                   help="dtype of the KDA recurrent states in the slot pool (default float32); bfloat16 halves the "
                        "state bytes a decode step moves (computed in fp32, stored rounded)")
    p.add_argument("--snapshot-interval", type=int, default=None,
                   help="prompt tokens between the KDA state snapshots a prefill leaves for the prefix cache, a "
                        "multiple of the block size (default 2048)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt prefixes")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for running requests before aborting them (default 30)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level (default info)")
    add_threads_argument(p)
    p.set_defaults(func=run)


def engine_settings(args: argparse.Namespace, model_max_length: int) -> dict:
    """The ``EngineConfig`` fields the flags set, checked (flags left out keep the engine's defaults, and
    ``max_model_len`` left out becomes ``min(default, model_max_length)`` in ``build_engine``). Needs no torch, so
    the engine process can start while this process goes on (``kda_state_dtype`` stays a name until
    ``build_engine``). Raises ValueError."""
    chosen = {
        "max_num_seqs": args.max_num_seqs,
        "max_model_len": args.max_model_len,
        "max_queue": args.max_queue,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "block_size": args.block_size,
        "num_blocks": args.num_blocks,
        "gpu_memory_fraction": args.gpu_memory_fraction,
        "snapshot_interval": args.snapshot_interval,
    }
    for name in ("max_num_seqs", "max_model_len", "max_queue", "max_num_batched_tokens", "block_size",
                 "num_blocks", "snapshot_interval"):
        if chosen[name] is not None and chosen[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {chosen[name]}")
    if chosen["gpu_memory_fraction"] is not None and not 0 < chosen["gpu_memory_fraction"] <= 1:
        raise ValueError(f"--gpu-memory-fraction must be in (0, 1], got {chosen['gpu_memory_fraction']}")
    if chosen["max_model_len"] is not None and chosen["max_model_len"] > model_max_length:
        raise ValueError(
            f"--max-model-len {chosen['max_model_len']} exceeds the model's model_max_length={model_max_length}"
        )
    settings = {name: value for name, value in chosen.items() if value is not None}
    return {**settings, "enable_prefix_caching": not args.no_prefix_caching, "use_cuda_graph": not args.no_cuda_graph,
            "kda_state_dtype": args.kda_state_dtype}


def build_engine(checkpoint: str, settings: dict, model_max_length: int, device: str | None, dtype: str,
                 threads: int):
    """The engine process's factory: ``--device`` and ``--dtype`` resolved there (before anything is loaded), the
    ``EngineConfig`` of ``settings`` (``engine_settings``), the checkpoint loaded (``load_engine``).

    Raises:
        ValueError: a bad ``--device``, or an engine setting or memory budget that does not fit.
        FileNotFoundError / ValueError: the checkpoint does not load.
    """
    import torch

    from kimi_linear.serve.engine import EngineConfig
    from kimi_linear.serve.engine_process import load_engine

    resolved = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if resolved.type == "cuda" else "float32"
    settings = dict(settings)
    if "kda_state_dtype" in settings:
        settings["kda_state_dtype"] = getattr(torch, settings["kda_state_dtype"])
    config = EngineConfig(**{"max_model_len": min(EngineConfig.max_model_len, model_max_length), **settings})
    return load_engine(checkpoint, config, str(resolved), dtype, threads)


def run(args: argparse.Namespace) -> int:
    import logging
    import threading

    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.serve.engine_process import EngineProcess

    if args.threads < 1:  # the engine process applies it (set_threads's check, without importing torch here)
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"checkpoint folder not found: {args.checkpoint}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger("kimi_linear.serve")

    # This process serves HTTP only: it needs the model's config (vocabulary, context) and the tokenizer, not the
    # weights. The engine process starts first and loads them while this one imports torch and the HTTP stack,
    # checks --device (the engine process is killed if it is bad) and reads the tokenizer; wait_ready raises what
    # the engine raised as it started (a ValueError naming the setting that does not fit the memory budget).
    model_config = KimiLinearConfig.from_hf(args.checkpoint)
    settings = engine_settings(args, model_config.model_max_length)
    engine = EngineProcess(
        build_engine,
        (args.checkpoint, settings, model_config.model_max_length, args.device, args.dtype, args.threads),
        wait=False,
    )
    try:
        resolve_device(args.device)
        import uvicorn

        from kimi_linear.serve.api import ServerSettings, create_app
        from kimi_linear.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.checkpoint, model_config)
        config = engine.wait_ready().config
        name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
        app = create_app(engine, tokenizer, ServerSettings(model_name=name, max_model_len=config.max_model_len,
                                                           api_key=args.api_key or None))
        uv_config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.drain_timeout,
            access_log=args.log_level == "debug",
        )
        server = uvicorn.Server(uv_config)

        def stop_when_the_engine_dies() -> None:
            engine.exited.wait()
            if engine.death is not None:  # the requests in flight have been failed by the engine loop
                logger.error("%s; shutting the server down", engine.death)
                server.should_exit = True

        threading.Thread(target=stop_when_the_engine_dies, name="kimi-linear-engine-watch", daemon=True).start()
        print(
            f"kimi-linear serve: {name} on http://{args.host}:{args.port} ({engine.device}, {engine.dtype}, "
            f"{config.max_num_seqs} slots, max_model_len {config.max_model_len}, prefix caching "
            f"{'on' if config.enable_prefix_caching else 'off'}, engine process {engine.pid})",
            file=sys.stderr,
            flush=True,
        )
        # uvicorn drains on SIGTERM/SIGINT and then re-raises the signal it caught under the handler that was in
        # place before it started; a no-op handler makes a drained shutdown exit normally (status 0).
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        server.run()
    finally:
        engine.close()
    if engine.death is not None:
        print(f"kimi-linear serve: error: {engine.death}", file=sys.stderr, flush=True)
        return 1
    return 0
