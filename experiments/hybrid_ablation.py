"""Paper Table 1 at small scale: the KDA:MLA hybrid ratio, NoPE vs RoPE, the output gate and ShortConv.

Nine byte-level LMs, each trained on the embedded corpus (the standard library's source,
``kimi_linear.train.data``) with the project's trainer (``kimi_linear.train.trainer.Trainer``: AdamW, warmup +
cosine, bf16 autocast on CUDA), the same data order, steps and tokens, and the same parameter count:

    mla          full attention (MLA) in every layer, NoPE            (the paper's "0:1")
    mla-rope     the same with RoPE (a pure-NoPE stack has no position signal but the causal mask)
    1:1, 3:1, 7:1  KDA:MLA layer ratios; 3:1 is Kimi Linear
    kda          KDA in every layer, no full attention
    3:1-rope     3:1 with RoPE on the MLA layers' rope dims instead of NoPE
    3:1-no-gate  3:1 without the KDA output gate (per-head RMSNorm only)
    3:1-no-conv  3:1 without the KDA ShortConv (q, k, v get SiLU only)

Equal parameter count: a KDA layer and an MLA layer hold different numbers of parameters and the ablations
remove some, so each variant's MLP width (``intermediate_size``; a dense SwiGLU in every layer, no MoE) is
chosen to bring its total to the 3:1 model's, up to half an MLP column (3 x hidden x layers parameters).
Counts are reported.

Evaluation: validation loss (nats/byte) and perplexity at the training length T, and a length-extrapolation
probe: the same validation tokens scored in windows of 2T and 4T (plain rows, no packing: one long context per
window).

    python experiments/hybrid_ablation.py --smoke                   # CPU, tiny sizes
    python experiments/hybrid_ablation.py --device cuda --steps auto --time-budget 280 --out DIR

Resumable: ``DIR/hybrid_ablation.json`` is rewritten (atomically) after every variant and a variant already in
it is not trained again. ``--steps auto`` times a few steps of the 3:1 model first and picks one step count
for all variants so the sweep fits ``--time-budget``; the choice is saved, and a resumed sweep reuses it.
Seeded: the same settings give the same data order and initial weights (GPU kernels are not bit-reproducible).
Writes ``hybrid_ablation.json`` and ``hybrid_ablation.png``; ``--table`` / ``--plot`` redo the table / figure
from the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from kimi_linear.config import KimiLinearConfig
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.train.data import IGNORE_INDEX, PackedBatches, build_corpus
from kimi_linear.train.distributed import DistContext
from kimi_linear.train.trainer import TrainConfig, Trainer

# Run order = priority: a time budget cuts from the end.
VARIANTS: dict[str, dict] = {
    "3:1": dict(hybrid_ratio=3),
    "mla": dict(mixer="mla"),
    "mla-rope": dict(mixer="mla", mla_use_nope=False),
    "kda": dict(hybrid_ratio=0),
    "1:1": dict(hybrid_ratio=1),
    "7:1": dict(hybrid_ratio=7),
    "3:1-rope": dict(hybrid_ratio=3, mla_use_nope=False),
    "3:1-no-gate": dict(hybrid_ratio=3, use_output_gate=False),
    "3:1-no-conv": dict(hybrid_ratio=3, use_short_conv=False),
}
REFERENCE = "3:1"
# Table order, and what the paper finds for each row relative to 3:1 (paper §5.2 and Table 1: training and
# validation perplexity; NoPE vs RoPE: §5.2 and the long-context Table 5).
TABLE_ORDER = ["3:1", "mla", "mla-rope", "1:1", "7:1", "kda", "3:1-rope", "3:1-no-gate", "3:1-no-conv"]
PAPER = {
    "3:1": "best train and validation PPL (the chosen design)",
    "mla": "worse than 3:1 (the hybrid beats full attention)",
    "mla-rope": "worse than 3:1 (the hybrid beats full attention)",
    "1:1": "close to 3:1, no gain for twice the full-attention layers",
    "7:1": "worse than 3:1 on validation (hurts generalisation)",
    "kda": "not in Table 1 (pure linear)",
    "3:1-rope": "close at short context, worse at long context (Table 5)",
    "3:1-no-gate": "worse than 3:1",
    "3:1-no-conv": "slightly worse than 3:1",
}

# ~15M parameters: hidden 384, 8 layers; KDA 6 heads x 64; MLA 6 heads (64 nope + 32 rope, v 64), latent 256.
MODEL = dict(hidden_size=384, num_hidden_layers=8, intermediate_size=1024, num_attention_heads=6,
             num_key_value_heads=6, kda_num_heads=6, kda_head_dim=64, kv_lora_rank=256, qk_nope_head_dim=64,
             qk_rope_head_dim=32, v_head_dim=64)
SMOKE_MODEL = dict(hidden_size=64, num_hidden_layers=8, intermediate_size=128, num_attention_heads=2,
                   num_key_value_heads=2, kda_num_heads=2, kda_head_dim=32, kv_lora_rank=64,
                   qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
FULL = dict(model=MODEL, seq_len=512, batch_size=32, steps=300, lr=2e-3, warmup_fraction=0.1, eval_windows=48,
            eval_micro_tokens=32768, log_every=10)
SMOKE = dict(model=SMOKE_MODEL, seq_len=32, batch_size=4, steps=8, lr=3e-3, warmup_fraction=0.1,
             eval_windows=2, eval_micro_tokens=1024, log_every=2)
EXTRAPOLATION = (1, 2, 4)  # evaluation window lengths, in multiples of the training length


# ---- models ------------------------------------------------------------------------------------------------


def make_config(model: dict, variant: str, intermediate_size: int | None = None) -> KimiLinearConfig:
    """The byte-level, dense-MLP config of ``variant`` (``num_experts=0``: a SwiGLU MLP in every layer)."""
    values = dict(model, **VARIANTS[variant], num_experts=0, model_max_length=1 << 20)
    if intermediate_size is not None:
        values["intermediate_size"] = intermediate_size
    return KimiLinearConfig.from_preset("tiny", **values)


def parameter_count(config: KimiLinearConfig) -> int:
    """Exact parameter count of the model (built on the meta device: no memory, no initialisation)."""
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def matched_config(model: dict, variant: str) -> tuple[KimiLinearConfig, int, int]:
    """(config, its parameter count, the 3:1 reference's count): ``variant`` with the MLP width that brings
    its parameter count closest to the reference's (the count is linear in ``intermediate_size``)."""
    target = parameter_count(make_config(model, REFERENCE))
    base = make_config(model, variant)
    per_column = 3 * base.hidden_size * base.num_hidden_layers  # gate, up and down of every layer's SwiGLU
    width = base.intermediate_size + round((target - parameter_count(base)) / per_column)
    if width < 1:
        raise ValueError(f"{variant}: no MLP width matches the reference's {target:,} parameters")
    config = make_config(model, variant, width)
    return config, parameter_count(config), target


def layout(config: KimiLinearConfig) -> str:
    """One letter per layer: K = KDA, M = MLA (3:1 over 8 layers is KKKMKKKM)."""
    return "".join("M" if t == "mla" else "K" for t in config.layer_types)


# ---- data and evaluation -----------------------------------------------------------------------------------


class WindowBatches:
    """The trainer's ``PackedBatches`` (a seeded order of ``seq_len`` windows) as ``[B, T]`` rows without
    ``cu_seqlens``: a window runs across document boundaries (BOS/EOS mark them; a BOS label is ignored), as
    the long validation windows do, so training and the extrapolation probe see text alike."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int, bos_token_id: int):
        self.packed = PackedBatches(tokens, seq_len, batch_size, seed=seed, bos_token_id=bos_token_id)
        self.shape = (batch_size, seq_len)

    def next_step(self) -> list[dict]:
        (batch,) = self.packed.next_step()
        return [{"input_ids": batch["input_ids"].view(self.shape),
                 "labels": batch["labels"].view(self.shape)}]


def validation_windows(val: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """``count`` windows of ``length + 1`` tokens, spread evenly over the validation stream:
    ``[count, length + 1]``."""
    if val.numel() < length + 1:
        raise ValueError(f"the validation stream has {val.numel()} tokens, fewer than a window of "
                         f"{length + 1}")
    count = min(count, val.numel() - length)
    starts = torch.linspace(0, val.numel() - length - 1, count).round().long()
    return torch.stack([val[s: s + length + 1] for s in starts.tolist()]).long()


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, seq_len: int, factors, micro_tokens: int, device, autocast,
             bos_token_id: int) -> dict:
    """Loss of the same tokens in windows of ``f * seq_len`` tokens, for each ``f`` in ``factors``.

    ``windows [N, max(f) * seq_len + 1]`` are cut into pieces of ``f * seq_len + 1`` tokens (neighbours share
    one token), so every ``f`` scores the same labels. Returns ``{f: {"loss", "tokens", "position_loss"
    [f * seq_len] (mean loss at each position), "window_loss" [N] (mean loss of each window's tokens),
    "beyond_loss" (positions >= seq_len, for f > 1)}}``.
    """
    model.eval()
    results = {}
    for f in factors:
        length = f * seq_len
        per = (windows.shape[1] - 1) // length
        pieces = torch.cat([windows[:, i * length: (i + 1) * length + 1] for i in range(per)])  # [N*per, L+1]
        pos_sum = torch.zeros(length, dtype=torch.float64)
        pos_n = torch.zeros(length, dtype=torch.float64)
        piece_sum, piece_n = [], []
        rows = max(1, micro_tokens // length)
        for i in range(0, pieces.shape[0], rows):
            chunk = pieces[i: i + rows].to(device)
            inputs, labels = chunk[:, :-1], chunk[:, 1:].clone()  # [b, L] each
            labels[labels == bos_token_id] = IGNORE_INDEX
            with autocast():
                logits = model(inputs).logits  # [b, L, vocab]
            loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                   reduction="none")  # [b, L]
            mask = (labels != IGNORE_INDEX).double()
            masked = (loss.double() * mask).cpu()
            pos_sum += masked.sum(0)
            pos_n += mask.sum(0).cpu()
            piece_sum.append(masked.sum(1))
            piece_n.append(mask.sum(1).cpu())
        # Piece j holds part j // N of window j % N: per-window losses, for paired comparisons of variants.
        window_sum = torch.cat(piece_sum).view(per, -1).sum(0)
        window_n = torch.cat(piece_n).view(per, -1).sum(0)
        entry = {"loss": (pos_sum.sum() / pos_n.sum()).item(), "tokens": int(pos_n.sum().item()),
                 "position_loss": (pos_sum / pos_n.clamp_min(1)).tolist(),
                 "window_loss": (window_sum / window_n.clamp_min(1)).tolist()}
        if f > 1:
            entry["beyond_loss"] = (pos_sum[seq_len:].sum() / pos_n[seq_len:].sum()).item()
        results[f] = entry
    return results


# ---- training ----------------------------------------------------------------------------------------------


def train_config(s: dict, steps: int) -> TrainConfig:
    return TrainConfig(max_steps=steps, lr=s["lr"], warmup_steps=max(1, round(s["warmup_fraction"] * steps)),
                       min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0, bias_update_rate=0.0, dtype="auto")


def autocast_for(device: torch.device):
    """The trainer's "auto" compute dtype: bf16 autocast on CUDA, plain fp32 on the CPU."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(config: KimiLinearConfig, seed: int, device: torch.device) -> KimiLinearForCausalLM:
    torch.manual_seed(seed)
    return KimiLinearForCausalLM(config).to(device)


def time_steps(s: dict, corpus, device: torch.device, seed: int) -> float:
    """Seconds per optimizer step of the reference model, after warm-up steps (which compile the kernels)."""
    config, _, _ = matched_config(s["model"], REFERENCE)
    trainer = Trainer(build(config, seed, device), train_config(s, 100), ctx=DistContext(device=device),
                      progress=False)
    batches = WindowBatches(corpus.train, s["seq_len"], s["batch_size"], seed, config.bos_token_id)
    for _ in range(3):
        trainer.train_step(batches.next_step())
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(5):
        trainer.train_step(batches.next_step())
    synchronize(device)
    return (time.perf_counter() - t0) / 5


def run_variant(variant: str, s: dict, steps: int, corpus, windows: torch.Tensor, device: torch.device,
                seed: int, log=print) -> dict:
    """Train ``variant`` for ``steps`` steps, evaluate it, and return its result record."""
    config, n_params, target = matched_config(s["model"], variant)
    trainer = Trainer(build(config, seed, device), train_config(s, steps), ctx=DistContext(device=device),
                      progress=False)
    batches = WindowBatches(corpus.train, s["seq_len"], s["batch_size"], seed, config.bos_token_id)
    log(f"[{variant}] layers {layout(config)}, {n_params:,} parameters (3:1: {target:,}), intermediate_size "
        f"{config.intermediate_size}, {steps} steps x {s['batch_size']} x {s['seq_len']} tokens")
    curve, losses = [], []
    synchronize(device)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        stats = trainer.train_step(batches.next_step())
        losses.append(stats["loss"])
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"{variant}: the loss is {stats['loss']} at step {step}")
        if step % s["log_every"] == 0 or step == steps:
            recent = losses[-s["log_every"]:]
            curve.append({"step": step, "tokens": trainer.tokens_seen, "loss": sum(recent) / len(recent)})
            if step % (10 * s["log_every"]) == 0 or step == steps:
                log(f"[{variant}] step {step}/{steps} loss {curve[-1]['loss']:.4f} "
                    f"({time.perf_counter() - t0:.1f} s)")
    synchronize(device)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    evals = evaluate(trainer.model, windows, s["seq_len"], EXTRAPOLATION, s["eval_micro_tokens"], device,
                     autocast_for(device), config.bos_token_id)
    synchronize(device)
    eval_s = time.perf_counter() - t1
    tail = losses[-max(1, steps // 10):]
    flags = ("mixer", "hybrid_ratio", "mla_use_nope", "use_output_gate", "use_short_conv",
             "intermediate_size")
    record = {
        "variant": variant, "layout": layout(config), "parameters": n_params, "reference_parameters": target,
        "intermediate_size": config.intermediate_size, "steps": steps, "tokens": trainer.tokens_seen,
        "train_loss": sum(tail) / len(tail), "val_loss": evals[1]["loss"],
        "val_ppl": math.exp(evals[1]["loss"]),
        "extrapolation": {f"{f}x": evals[f] for f in EXTRAPOLATION}, "curve": curve,
        "train_seconds": round(train_s, 2), "eval_seconds": round(eval_s, 2),
        "config": {k: getattr(config, k) for k in flags},
    }
    ex = record["extrapolation"]
    log(f"[{variant}] val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.3f}) at T, "
        f"{ex['2x']['loss']:.4f} at 2T, {ex['4x']['loss']:.4f} at 4T; train {train_s:.1f} s, "
        f"eval {eval_s:.1f} s")
    return record


# ---- results -----------------------------------------------------------------------------------------------


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def save(path: Path, data: dict) -> None:
    """Write atomically: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def paired_difference(run: dict, reference: dict, factor: str = "1x") -> tuple[float, float]:
    """(mean, standard error) over validation windows of ``run``'s loss minus ``reference``'s on the same
    window: how far apart two variants are, next to the spread that the choice of validation text alone
    gives."""
    a, b = run["extrapolation"][factor]["window_loss"], reference["extrapolation"][factor]["window_loss"]
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    se = (d.std() / math.sqrt(d.numel())).item() if d.numel() > 1 else float("nan")
    return d.mean().item(), se


def table(data: dict) -> str:
    """Markdown, Table 1 style: ours (loss in nats/byte, perplexity per byte) next to the paper's finding."""
    runs = data["runs"]
    ref = runs.get(REFERENCE)
    by_val = sorted(runs, key=lambda v: runs[v]["val_loss"])
    by_4x = sorted(runs, key=lambda v: runs[v]["extrapolation"]["4x"]["loss"])
    lines = ["| variant | layers | params (vs 3:1) | train loss | val loss @T (ppl) | Δ val vs 3:1 | @2T | "
             "@4T | rank @T | rank @4T | paper (Table 1, §5.2) |", "|---" * 11 + "|"]
    for v in TABLE_ORDER:
        if v not in runs:
            status = "failed" if v in data.get("failed", {}) else "not run"
            lines.append(f"| {v} | — | — | {status} | | | | | | | {PAPER[v]} |")
            continue
        r, ex = runs[v], runs[v]["extrapolation"]
        diff = r["parameters"] - r["reference_parameters"]
        delta = "—"
        if ref is not None and v != REFERENCE and "window_loss" in ex["1x"]:
            mean, se = paired_difference(r, ref)
            delta = f"{mean:+.4f} ± {se:.4f}"
        lines.append(f"| {v} | {r['layout']} | {r['parameters'] / 1e6:.3f}M ({diff:+,}) | "
                     f"{r['train_loss']:.4f} | {r['val_loss']:.4f} ({r['val_ppl']:.3f}) | {delta} | "
                     f"{ex['2x']['loss']:.4f} | {ex['4x']['loss']:.4f} | {by_val.index(v) + 1} | "
                     f"{by_4x.index(v) + 1} | {PAPER[v]} |")
    return "\n".join(lines)


def seed_table(sweeps: list[dict]) -> str:
    """Markdown over sweeps that differ only in the seed: mean ± sample standard deviation across seeds of the
    validation loss at T and at 4T, and of each seed's difference to its own 3:1 run."""
    seeds = [d["settings"]["seed"] for d in sweeps]
    lines = ["| variant | val loss @T | Δ @T vs 3:1 | val loss @4T | @4T − @T | seeds |", "|---" * 6 + "|"]

    def stats(values: list[float], sign: str = "") -> str:
        t = torch.tensor(values, dtype=torch.float64)
        mean = format(t.mean().item(), f"{sign}.4f")
        return f"{mean} ± {t.std().item():.4f}" if len(values) > 1 else mean

    for v in TABLE_ORDER:
        done = [d for d in sweeps if v in d["runs"]]
        if not done:
            continue
        at_t = [d["runs"][v]["val_loss"] for d in done]
        at_4t = [d["runs"][v]["extrapolation"]["4x"]["loss"] for d in done]
        paired = [d["runs"][v]["val_loss"] - d["runs"][REFERENCE]["val_loss"] for d in done
                  if REFERENCE in d["runs"]]
        delta = "—" if v == REFERENCE or not paired else stats(paired, "+")
        growth = stats([b - a for a, b in zip(at_t, at_4t)], "+")
        used = ", ".join(str(d["settings"]["seed"]) for d in done)
        lines.append(f"| {v} | {stats(at_t)} | {delta} | {stats(at_4t)} | {growth} | {used} |")
    if len(set(seeds)) != len(seeds):
        lines.append(f"\n(warning: repeated seeds {seeds})")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    """Training loss vs tokens; validation loss vs position in 4T windows; loss at T, 2T, 4T per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, s = data["runs"], data["settings"]
    names = [v for v in TABLE_ORDER if v in runs]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for v in names:
        curve = runs[v]["curve"]
        skip = len(curve) // 5  # the first steps' losses would squash the range that differs
        axes[0].plot([c["tokens"] / 1e6 for c in curve[skip:]], [c["loss"] for c in curve[skip:]], label=v)
        pos = runs[v]["extrapolation"]["4x"]["position_loss"]
        bucket = max(1, len(pos) // 32)
        starts = range(0, len(pos) - bucket + 1, bucket)
        axes[1].plot([i + bucket / 2 for i in starts], [sum(pos[i: i + bucket]) / bucket for i in starts],
                     label=v)
    axes[0].set(title="training loss (after the first fifth)", xlabel="training tokens (M)",
                ylabel="loss (nats/byte)")
    axes[1].axvline(s["seq_len"], color="gray", ls="--", lw=1)
    axes[1].set(title=f"validation loss by position in 4T windows (T = {s['seq_len']}, dashed)",
                xlabel="position", ylabel="loss (nats/byte)")
    width = 0.8 / len(EXTRAPOLATION)
    for j, f in enumerate(EXTRAPOLATION):
        axes[2].bar([i + (j - 1) * width for i in range(len(names))],
                    [runs[v]["extrapolation"][f"{f}x"]["loss"] for v in names], width, label=f"{f}T windows")
    if names:
        values = [runs[v]["extrapolation"][f"{f}x"]["loss"] for v in names for f in EXTRAPOLATION]
        span = max(values) - min(values) + 1e-3
        axes[2].set_ylim(min(values) - 0.3 * span, max(values) + 0.1 * span)
    axes[2].set_xticks(range(len(names)), names, rotation=30)
    axes[2].set(title="validation loss at T, 2T, 4T (same tokens)", ylabel="loss (nats/byte)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if names:
        r = runs[names[0]]
        fig.suptitle(f"Hybrid ablation: {r['parameters'] / 1e6:.1f}M-parameter byte-level LMs, "
                     f"{s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens "
                     f"= {r['tokens'] / 1e6:.3g}M tokens, {data['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU-sized models and runs")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="experiments/results", help="folder of hybrid_ablation.json and .png")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--steps", default=None, help="optimizer steps per variant, or 'auto' (fit --time-budget)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds for the whole call; variants that would not fit are left for a later call")
    p.add_argument("--max-auto-steps", type=int, default=600, help="upper bound of --steps auto")
    p.add_argument("--seq-len", type=int, default=None, help="training length T (default 512; smoke 32)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per step (default 32; smoke 4)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="validation windows of 4T tokens (default 48; smoke 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data order")
    p.add_argument("--data", default=None, help="another corpus (as 'kimi-linear train --data'); default: "
                                                "the embedded one, the Python standard library's source")
    p.add_argument("--tag", default="", help="suffix of the result files: hybrid_ablation_TAG.json/.png; "
                                             "with --table, several (comma-separated seeds) give mean ± std")
    p.add_argument("--table", action="store_true", help="print the Markdown table of the existing JSON, exit")
    p.add_argument("--plot", action="store_true", help="draw hybrid_ablation.png from the JSON and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    tags = args.tag.split(",")
    if len(tags) > 1:  # several sweeps (seeds) of the same settings: the table of means
        if not args.table or args.plot:
            raise SystemExit("several --tag values go with --table only")
        paths = [out / f"hybrid_ablation_{t}.json" for t in tags]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise SystemExit(f"no results at {missing}")
        sweeps = [load(p) for p in paths]
        settings = [{k: v for k, v in d["settings"].items() if k not in ("seed", "steps_chosen_by")} for d in sweeps]
        if any(x != settings[0] for x in settings):
            raise SystemExit("those sweeps differ in more than the seed")
        print(seed_table(sweeps))
        return 0
    stem = "hybrid_ablation" + (f"_{args.tag}" if args.tag else "")
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    if args.table or args.plot:
        data = load(json_path)
        if data is None:
            raise SystemExit(f"no results at {json_path}")
        if args.plot:
            plot(data, png_path)
            print(f"wrote {png_path}")
        if args.table:
            print(table(data))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.steps not in (None, "auto") and not (args.steps.isdigit() and int(args.steps) > 0):
        raise SystemExit(f"--steps must be a positive integer or 'auto', got {args.steps!r}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    s = dict(SMOKE if args.smoke else FULL)
    s["seq_len"] = args.seq_len or s["seq_len"]
    s["batch_size"] = args.batch_size or s["batch_size"]
    s["eval_windows"] = args.eval_windows or s["eval_windows"]
    settings = {"smoke": args.smoke, "seed": args.seed, "model": s["model"], "seq_len": s["seq_len"],
                "batch_size": s["batch_size"], "lr": s["lr"], "warmup_fraction": s["warmup_fraction"],
                "eval_windows": s["eval_windows"], "data": args.data and os.path.abspath(args.data)}
    data = load(json_path)
    if data is not None:
        saved = {k: v for k, v in data["settings"].items() if k not in ("steps", "steps_chosen_by")}
        if saved != settings:
            raise SystemExit(f"{json_path} holds a sweep with other settings; pass another --out")
        if args.steps not in (None, "auto") and int(args.steps) != data["settings"]["steps"]:
            raise SystemExit(f"{json_path} was run with {data['settings']['steps']} steps; "
                             f"pass another --out")

    out.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(args.data)
    print(f"data: {corpus.describe()}", flush=True)
    if data is not None:
        if data["environment"]["corpus_fingerprint"] != corpus.fingerprint:
            raise SystemExit(f"{json_path} was run on other data ({data['environment']['corpus']}); "
                             f"pass another --out")
        print(f"resuming {json_path}: {sorted(data['runs'])} done, {data['settings']['steps']} steps each")
    todo = [v for v in variants if data is None or v not in data["runs"]]

    if data is None:
        if args.steps == "auto":
            if not args.time_budget:
                raise SystemExit("--steps auto needs --time-budget")
            per_step = time_steps(s, corpus, device, args.seed)
            left = args.time_budget - (time.perf_counter() - start)
            # 15% on top for evaluation, model building and the variants slower than 3:1 (more KDA layers).
            fit = int(left / (len(todo) * per_step * 1.15))
            rounded = fit // 50 * 50 if fit >= 100 else fit
            steps = max(20, min(args.max_auto_steps, rounded))
            chosen_by = (f"auto: {per_step * 1000:.1f} ms per 3:1 step on {device}, "
                         f"budget {args.time_budget:g} s")
            print(f"{chosen_by} -> {steps} steps per variant", flush=True)
        else:
            steps, chosen_by = int(args.steps or s["steps"]), "fixed"
        environment = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "python": platform.python_version(),
                       "corpus": corpus.describe(), "corpus_fingerprint": corpus.fingerprint}
        data = {"settings": dict(settings, steps=steps, steps_chosen_by=chosen_by),
                "environment": environment, "runs": {}, "skipped": [], "failed": {}}
        save(json_path, data)
    steps = data["settings"]["steps"]
    windows = validation_windows(corpus.val, max(EXTRAPOLATION) * s["seq_len"], s["eval_windows"])

    durations = [r["train_seconds"] + r["eval_seconds"] for r in data["runs"].values()]
    for v in todo:
        elapsed = time.perf_counter() - start
        estimate = sum(durations) / len(durations) if durations else 0.0
        if args.time_budget and elapsed + estimate > args.time_budget:
            print(f"[{v}] left for a later call: {elapsed:.0f} s used, ~{estimate:.0f} s needed, "
                  f"budget {args.time_budget:g} s", flush=True)
            data["skipped"] = sorted(set(data["skipped"]) | {v})
            save(json_path, data)
            continue
        try:
            record = run_variant(v, s, steps, corpus, windows, device, args.seed,
                                 log=lambda m: print(m, flush=True))
        except Exception:  # one broken variant must not cost the others their device time
            data["failed"][v] = traceback.format_exc()[-2000:]
            print(f"[{v}] failed:\n{data['failed'][v]}", flush=True)
            save(json_path, data)
            continue
        durations.append(record["train_seconds"] + record["eval_seconds"])
        data["runs"][v] = record
        data["skipped"] = [x for x in data["skipped"] if x != v]
        data["failed"].pop(v, None)
        save(json_path, data)
    plot(data, png_path)
    print(table(data))
    print(f"wrote {json_path} and {png_path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
