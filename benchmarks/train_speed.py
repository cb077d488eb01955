"""Training throughput: tokens/s of one optimizer step (forward, loss, backward, AdamW) of the same model with
our implementation and with HF transformers' ``kimi_linear`` (its PyTorch fallback; FLA is not used on the
CPU).

Both models hold identical weights: ours is saved with ``save_pretrained`` and loaded by transformers. The
first step's losses are compared (they must agree) before anything is timed. Ours runs twice: on a ``[B, T]``
batch like transformers, and on the same tokens packed along one row with ``cu_seqlens`` (how ``kimi-linear
train`` feeds it).

    python benchmarks/train_speed.py                      # small preset, B=4, T=256, CPU
    python benchmarks/train_speed.py --preset tiny --batch-size 8 --json out.json

Prints a table last and writes JSON (default benchmarks/results/train_speed_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def step_time(model, batch: dict, optimizer, steps: int, warmup: int) -> tuple[float, float]:
    """(median seconds per training step, first loss)."""
    times, first = [], None
    for i in range(warmup + steps):
        start = time.perf_counter()
        kwargs = {"cu_seqlens": batch["cu_seqlens"]} if "cu_seqlens" in batch else {}
        logits = model(input_ids=batch["input_ids"], **kwargs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if first is None:
            first = loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1, as `kimi-linear train`; 0: torch's default)")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "train_speed_cpu.json"))
    args = p.parse_args()

    import transformers

    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = KimiLinearConfig.from_preset(args.preset)
    ours = KimiLinearForCausalLM(config)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = transformers.KimiLinearForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                                    attn_implementation="sdpa")
    theirs.train()
    B, T = args.batch_size, args.seq_len
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (B, T + 1), generator=gen)
    plain = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
    packed = {"input_ids": plain["input_ids"].reshape(1, -1), "labels": plain["labels"].reshape(1, -1),
              "cu_seqlens": torch.arange(0, B * T + 1, T, dtype=torch.int32)}

    rows = []
    for name, model, batch in (("transformers kimi_linear [B, T]", theirs, plain),
                               ("kimi-linear [B, T]", ours, plain),
                               ("kimi-linear packed (cu_seqlens)", ours, packed)):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        seconds, loss = step_time(model, batch, optimizer, args.steps, args.warmup)
        model.load_state_dict(state)  # every row starts from the same weights
        rows.append({"implementation": name, "step_s": seconds, "tokens_per_s": B * T / seconds,
                     "first_loss": loss})
        print(f"{name}: {seconds:.3f} s/step, {B * T / seconds:,.0f} tokens/s, first loss {loss:.6f}",
              flush=True)
    ref = rows[0]["first_loss"]
    for r in rows[1:]:
        if abs(r["first_loss"] - ref) > 1e-4 * abs(ref):
            raise SystemExit(f"losses disagree: {r['implementation']} {r['first_loss']} vs "
                             f"transformers {ref}")

    n_params = sum(p.numel() for p in ours.parameters())
    info = {"preset": args.preset, "parameters": n_params, "batch_size": B, "seq_len": T, "steps": args.steps,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(info, indent=1))
    base = rows[0]["tokens_per_s"]
    print(f"\npreset {args.preset} ({n_params / 1e6:.1f}M parameters), B={B}, T={T}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps; first-step losses agree "
          f"to 1e-4\n")
    print("| implementation | s/step | tokens/s | vs transformers |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['implementation']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
