"""`kimi-linear train`: train a Kimi Linear model on the embedded corpus (or ``--data``), resumably, on one
process or many (``torchrun --nproc-per-node N -m kimi_linear.train ...``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kimi_linear.cli.common import add_threads_argument, set_threads

MIXER_CHOICES = ("kda", "gdn", "mla")
# The trainer's AUTOCAST_DTYPES, repeated so that building the parser does not import the training stack.
DTYPE_CHOICES = ("auto", "float32", "bfloat16")

# Defaults of the settings saved with a run (all but max_steps identify it); the CLI flags default to None so
# that a resumed run can tell what the user asked for from what it should take from the saved run.
DEFAULTS = {
    "preset": "tiny",
    "mixer": "kda",
    "max_steps": 160,
    "seq_len": 256,
    "batch_size": 8,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 30,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "seed": 0,
    # Faster than the 1e-3 of long pre-training runs: a run of a few hundred steps must balance within them.
    "bias_update_rate": 1e-2,
    "data": None,
}
RUN_FILE = "run.json"
MAX_STEPS_HELP = (
    "optimizer steps (default {default}). On an existing run, a larger value trains it further (a "
    "finished run too) and a smaller one ends it sooner: the learning rate then goes from the value it has "
    "reached down a cosine to the floor (--min-lr-ratio x --lr) at the new last step, so a finished run "
    "continues at the floor and an unfinished one re-stretches its cosine without a jump"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    arg = p.add_argument
    arg("--preset", help=f"model preset: debug, tiny, small, 48b-a3b (default {d['preset']})")
    arg("--mixer", choices=MIXER_CHOICES,
        help="linear mixer of the hybrid (kda, or gdn for the scalar-gate baseline), or mla for full "
             f"attention in every layer (default {d['mixer']})")
    arg("--max-steps", type=int, help=MAX_STEPS_HELP.format(default=d["max_steps"]))
    arg("--seq-len", type=int, help=f"tokens per training window (default {d['seq_len']})")
    arg("--batch-size", type=int,
        help=f"global batch in windows, over all processes and accumulation steps "
             f"(default {d['batch_size']})")
    arg("--grad-accum", type=int, default=1, help="micro-batches per step and process (default 1)")
    arg("--lr", type=float, help=f"peak learning rate (default {d['lr']})")
    arg("--min-lr-ratio", type=float, help=f"final lr / peak lr of the cosine (default {d['min_lr_ratio']})")
    arg("--warmup-steps", type=int, help=f"linear warmup steps (default {d['warmup_steps']})")
    arg("--weight-decay", type=float, help=f"AdamW weight decay (default {d['weight_decay']})")
    arg("--grad-clip", type=float, help=f"gradient-norm clip, 0 = off (default {d['grad_clip']})")
    arg("--bias-update-rate", type=float,
        help=f"MoE correction-bias step toward balanced load, 0 = off (default {d['bias_update_rate']})")
    arg("--seed", type=int, help=f"seed of initialisation and data order (default {d['seed']})")
    arg("--data", help="corpus: a folder of text files, a .txt or a .jsonl file (default: the Python "
                       "standard library's source on this machine)")
    arg("--out", help="run folder for checkpoints, metrics.jsonl and loss_curve.png; an existing run is "
                      "resumed from its newest checkpoint that reads (its settings come from OUT/run.json "
                      "unless given again). One process at a time: OUT/train.lock refuses a second one "
                      "(default runs/PRESET-MIXER)")
    arg("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    arg("--dtype", choices=DTYPE_CHOICES, default="auto",
        help="compute dtype under autocast; weights stay float32 (default auto: bfloat16 on CUDA, float32 "
             "on CPU)")
    arg("--activation-checkpointing", default="none", metavar="PARTS",
        help="what the backward recomputes instead of keeping, to train longer sequences in less memory: "
             "'none' (default; the KDA layers still recompute their cheap glue), 'full' (every block from its "
             "input: least memory, about a third more compute), or a comma-separated list of parts among "
             "kda, gdn, mla, mamba2 (token mixers of that type, with their input norm) and mlp, moe "
             "(feed-forwards) — e.g. 'mla,moe'. Changes no value; a resumed run may use another setting")
    arg("--strategy", choices=("ddp", "fsdp"), default="ddp",
        help="data-parallel engine under torchrun: DDP or FSDP2 fully_shard (default ddp)")
    arg("--checkpoint-every", type=int, default=50,
        help="steps between checkpoints; 0 = only at the end (and on SIGINT/SIGTERM) (default 50)")
    arg("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept; older ones are deleted "
                                                         "(default 2)")
    arg("--eval-every", type=int, default=40,
        help="steps between validation passes; 0 = only at the end (default 40)")
    arg("--log-every", type=int, default=None,
        help="steps between reads of the loss and other statistics from the device, the only points where "
             "training waits for it; metrics.jsonl still gets every step (default: 1 on the CPU, 10 on a GPU)")
    arg("--eval-windows", type=int, default=64, help="validation windows per pass (default 64)")
    arg("--prompt", default="def ", help="prompt of the sample printed at the end (default 'def ')")
    arg("--sample-tokens", type=int, default=200, help="length of that sample; 0 = no sample (default 200)")
    arg("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    add_threads_argument(p)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a Kimi Linear model (default: the tiny preset on the Python standard library, a few "
             "CPU minutes)",
        description="Trains a Kimi Linear model with AdamW (warmup + cosine), packed documents and MoE load "
                    "balancing; checkpoints atomically and resumes a run whose --out folder already exists. "
                    "SIGINT (Ctrl-C) or SIGTERM finishes the current step, saves a checkpoint and exits "
                    "with 130 or 143 (128 + the signal's number); a second one aborts at once. Runs under "
                    "torchrun for multi-process training.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def _read_run_file(out: Path) -> dict | None:
    """``OUT/run.json``: the run's identity (``settings`` but max_steps, ``model_config``,
    ``data_fingerprint``) and its ``max_steps``; None when there is none."""
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); pass another --out") from None
    if "max_steps" in saved.get("settings", {}):  # written when max_steps was part of the identity
        saved["max_steps"] = saved["settings"].pop("max_steps")
    return saved


def _write_run_file(out: Path, run_info: dict, max_steps: int) -> None:
    tmp = out / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps({**run_info, "max_steps": max_steps}, indent=1, sort_keys=True))
    os.replace(tmp, out / RUN_FILE)


def resolve_settings(args: argparse.Namespace) -> tuple[dict, Path, dict | None]:
    """The run's settings: flags given, else the saved run's (when ``--out`` holds one), else the defaults.
    Returns (settings, out folder, saved run identity without its max_steps, or None)."""
    preset = args.preset or DEFAULTS["preset"]
    mixer = args.mixer or DEFAULTS["mixer"]
    out = Path(args.out) if args.out else Path("runs") / f"{preset}-{mixer}"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    saved = _read_run_file(out)
    saved_max_steps = saved.pop("max_steps", None) if saved else None
    base = dict(DEFAULTS, **(saved["settings"] if saved else {}))
    if saved_max_steps is not None:
        base["max_steps"] = saved_max_steps
    settings = {k: (getattr(args, k) if getattr(args, k) is not None else base[k]) for k in DEFAULTS}
    return settings, out, saved


def validate_settings(s: dict, args: argparse.Namespace) -> None:
    """Raise ValueError for settings out of range (the trainer checks its own hyper-parameters again)."""
    for name in ("max_steps", "seq_len", "batch_size"):
        if s[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {s[name]}")
    if args.grad_accum < 1:
        raise ValueError(f"--grad-accum must be >= 1, got {args.grad_accum}")
    for name in ("checkpoint_every", "eval_every", "sample_tokens"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.keep_checkpoints < 1:
        raise ValueError(f"--keep-checkpoints must be >= 1, got {args.keep_checkpoints}")
    if args.eval_windows < 1:
        raise ValueError(f"--eval-windows must be >= 1, got {args.eval_windows}")


def run(args: argparse.Namespace) -> int:
    import torch

    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM
    from kimi_linear.tokenizer import ByteTokenizer
    from kimi_linear.train.data import (
        BOS_ID,
        BYTE_VOCAB_SIZE,
        EOS_ID,
        PackedBatches,
        build_corpus,
        eval_batches,
        unigram_loss,
    )
    from kimi_linear.train.distributed import (
        all_reduce_sum,
        barrier,
        broadcast_object,
        init_distributed,
        shutdown,
        wrap_model,
    )
    from kimi_linear.train.runlock import RunLock, RunLocked
    from kimi_linear.train.stopping import StopOnSignal, TrainingStopped
    from kimi_linear.train.trainer import TrainConfig, Trainer, describe_difference

    settings, out, saved = resolve_settings(args)
    validate_settings(settings, args)
    set_threads(args)
    config = KimiLinearConfig.from_preset(settings["preset"], mixer=settings["mixer"])
    if (config.vocab_size, config.bos_token_id, config.eos_token_id) != (BYTE_VOCAB_SIZE, BOS_ID, EOS_ID):
        raise ValueError(f"preset {settings['preset']!r} has a {config.vocab_size}-token vocabulary; this "
                         f"command trains on byte-level tokens: use the debug, tiny or small preset")
    tokenizer = ByteTokenizer(config)
    if settings["seq_len"] > config.model_max_length:
        raise ValueError(f"--seq-len {settings['seq_len']} is over the model's limit "
                         f"(model_max_length = {config.model_max_length} for preset {settings['preset']!r})")
    train_config = TrainConfig(
        max_steps=settings["max_steps"], lr=settings["lr"], min_lr_ratio=settings["min_lr_ratio"],
        warmup_steps=min(settings["warmup_steps"], settings["max_steps"]),
        weight_decay=settings["weight_decay"], grad_clip=settings["grad_clip"], grad_accum=args.grad_accum,
        bias_update_rate=settings["bias_update_rate"],
        dtype=args.dtype, checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
        keep_checkpoints=args.keep_checkpoints, activation_checkpointing=args.activation_checkpointing,
        log_every=args.log_every,
    )
    train_config.validate()

    ctx = init_distributed(args.device)
    lock = None
    stop = StopOnSignal(announce=ctx.is_main)
    try:
        stop.__enter__()
        corpus = build_corpus(settings["data"], BOS_ID, EOS_ID)
        batches = PackedBatches(corpus.train, settings["seq_len"], settings["batch_size"],
                                seed=settings["seed"], rank=ctx.rank, world_size=ctx.world_size,
                                grad_accum=args.grad_accum, bos_token_id=BOS_ID)
        micro = settings["batch_size"] // (ctx.world_size * args.grad_accum)
        val = eval_batches(corpus.val, settings["seq_len"], args.eval_windows, micro, rank=ctx.rank,
                           world_size=ctx.world_size, bos_token_id=BOS_ID)
        identity = {k: v for k, v in settings.items() if k != "max_steps"}
        run_info = {"settings": {**identity, "data": settings["data"] and os.path.abspath(settings["data"])},
                    "model_config": config.to_dict(), "data_fingerprint": corpus.fingerprint}
        if saved is not None and saved != run_info:
            diff = describe_difference(saved, run_info)
            raise ValueError(f"--out {str(out)!r} holds a different run ({diff}); pass the same settings to "
                             f"resume it, or another --out")
        # One process per run folder (rank 0 holds the lock for all); taken before anything is written.
        refused = None
        if ctx.is_main:
            try:
                lock = RunLock(out)
                now = _read_run_file(out)
                if now is not None:
                    now.pop("max_steps", None)
                if now != saved:
                    refused = f"{out / RUN_FILE} changed while this run started; run the command again"
            except RunLocked as e:
                refused = str(e)
        refused = broadcast_object(refused, ctx)
        if refused:
            raise RunLocked(refused)

        torch.manual_seed(settings["seed"])
        model = KimiLinearForCausalLM(config).to(ctx.device)
        n_params = sum(p.numel() for p in model.parameters())
        model = wrap_model(model, ctx, args.strategy)
        if ctx.is_main:
            _write_run_file(out, run_info, settings["max_steps"])
            print(f"data: {corpus.describe()}")
            print(f"model: preset {settings['preset']}, mixer {settings['mixer']}, {n_params / 1e6:.2f}M "
                  f"parameters, layers {config.layer_types}; {ctx.world_size} process(es) on {ctx.device}"
                  + (f" with {args.strategy.upper()}" if ctx.distributed else ""))
            steps, batch, seq = settings["max_steps"], settings["batch_size"], settings["seq_len"]
            print(f"training: {steps} steps x {batch} x {seq} tokens, lr {settings['lr']:g}, out {out}",
                  flush=True)
        trainer = Trainer(model, train_config, ctx=ctx, out_dir=out, run_info=run_info,
                          progress=not args.no_progress)
        try:
            summary = trainer.fit(batches, eval_data=val, stop=stop)
        except TrainingStopped as e:
            if ctx.is_main:
                report_stop(e.signum, e.step, e.checkpoint, out, settings["max_steps"])
            return e.exit_code
        stop.__exit__(None, None, None)
        if stop.signum is not None:  # the signal came during the last step: the run is complete and saved
            if ctx.is_main:
                report_stop(stop.signum, summary["step"], summary["checkpoint"], out, settings["max_steps"])
            return 128 + stop.signum

        base_total, base_n = unigram_loss(corpus.train, val, tokenizer.vocab_size)
        counts = torch.tensor([base_total, float(base_n)], dtype=torch.float64, device=ctx.device)
        base_total, base_n = all_reduce_sum(counts, ctx).tolist()
        if ctx.is_main:
            report(summary, base_total / base_n, out, settings, args, tokenizer)
        # every process waits for rank 0's report: tearing down a gloo group while a peer still holds it can abort
        barrier(ctx)
    finally:
        stop.__exit__(None, None, None)
        if lock is not None:
            lock.release()
        shutdown(ctx)
    return 0


def report_stop(signum: int, step: int, checkpoint, out: Path, max_steps: int) -> None:
    """Rank 0, after a stop signal: what was saved and how to go on (on stderr)."""
    import signal

    name = signal.Signals(signum).name
    saved = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint (no step was trained)"
    print(f"kimi-linear train: stopped by {name} after step {step} of {max_steps}; {saved}.\n"
          f"  resume: run the same command again, or `kimi-linear train --out {out}` (settings come from "
          f"{out / RUN_FILE})", file=sys.stderr, flush=True)


def report(summary: dict, unigram: float, out: Path, settings: dict, args, tokenizer) -> None:
    """Rank 0: the results a person wants to see after training. The sample comes from the saved checkpoint,
    loaded back, which also shows that it loads."""
    import math

    from kimi_linear.train.plot import plot_loss_curve, read_records

    val = summary["val_loss"]
    if summary["start_step"] >= settings["max_steps"]:
        print(f"{out} is already trained to step {summary['step']} (of {settings['max_steps']}).")
    else:
        print(f"trained steps {summary['start_step'] + 1}..{summary['step']} in "
              f"{summary['elapsed_s']:.0f} s, {summary['tokens_per_s']:,.0f} tokens/s")
    print(f"validation loss {val:.4f} nats/token ({val / math.log(2):.3f} bits/byte); unigram baseline "
          f"{unigram:.4f} nats/token ({unigram / math.log(2):.3f} bits/byte)")
    loads = [r["expert_load_max_over_mean"] for r in read_records(out / "metrics.jsonl")
             if "expert_load_max_over_mean" in r]
    if loads:
        print(f"MoE expert load, max/mean per MoE layer at the last step (1 = balanced): {loads[-1]}")
    png = plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png", baseline=unigram)
    print(f"loss curve: {png}; metrics: {out / 'metrics.jsonl'}")
    ckpt = summary["checkpoint"]
    print(f"checkpoint: {ckpt}  (try: kimi-linear generate --checkpoint {ckpt} --prompt {args.prompt!r})")
    if args.sample_tokens and ckpt is not None:
        from kimi_linear.generate import generate
        from kimi_linear.model import KimiLinearForCausalLM

        model = KimiLinearForCausalLM.from_pretrained(ckpt)
        # Training documents start with BOS, so the prompt does too: the sample begins a fresh file.
        prompt = [tokenizer.bos_token_id, *tokenizer.encode(args.prompt)]
        (new,) = generate(model, [prompt], max_new_tokens=args.sample_tokens, temperature=0.8,
                          seed=settings["seed"])
        print(f"sample (temperature 0.8):\n{args.prompt}{tokenizer.decode(new)}")
    sys.stdout.flush()
