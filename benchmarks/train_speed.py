"""Training step tokens/s on the CPU: ours ([B, T] and packed) vs transformers' kimi_linear, same weights.

One optimizer step (forward, loss, backward, AdamW); ours computes the loss as the trainer does (``labels=``: the
chunked linear + cross-entropy, no whole logits). With ``--compare transformers``, HF transformers'
``kimi_linear`` (its PyTorch fallback; FLA is not used on the CPU) runs the same step on identical weights: ours
is saved with ``save_pretrained`` and loaded by transformers, and the first step's losses must agree. Ours runs
twice: on a ``[B, T]`` batch like transformers, and on the same tokens packed along one row with ``cu_seqlens``
(how ``kimi-linear train`` feeds it).

    python -m benchmarks train_speed --compare transformers          # small preset, B=4, T=256
    python -m benchmarks train_speed --preset tiny --batch-size 8

Prints a table last and writes train_speed.json into --out.
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F

from benchmarks.common import SuiteParser, environment, median_ms, write_json
from kimi_linear.config import KimiLinearConfig
from kimi_linear.model import KimiLinearForCausalLM


def step_time(model, batch: dict, optimizer, steps: int, warmup: int) -> tuple[float, float]:
    """(median seconds per training step, first loss)."""
    losses = []

    def step():
        kwargs = {"cu_seqlens": batch["cu_seqlens"]} if "cu_seqlens" in batch else {}
        if isinstance(model, KimiLinearForCausalLM):  # the loss as the trainer computes it: chunked, from hidden
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"], **kwargs).loss_sum
            loss = loss / batch["labels"].numel()
        else:
            logits = model(input_ids=batch["input_ids"], **kwargs).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    return median_ms(step, reps=steps, warmup=warmup, cuda=False) / 1e3, losses[0]


def main(argv=None) -> None:
    p = SuiteParser(__name__, __doc__, peers=("transformers",))
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1, as `kimi-linear train`; 0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = KimiLinearConfig.from_preset(args.preset)
    ours = KimiLinearForCausalLM(config)
    B, T = args.batch_size, args.seq_len
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (B, T + 1), generator=gen)
    plain = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
    packed = {"input_ids": plain["input_ids"].reshape(1, -1), "labels": plain["labels"].reshape(1, -1),
              "cu_seqlens": torch.arange(0, B * T + 1, T, dtype=torch.int32)}
    runs = [("kimi-linear [B, T]", ours, plain), ("kimi-linear packed (cu_seqlens)", ours, packed)]
    if "transformers" in args.compare:
        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            ours.save_pretrained(tmp)
            theirs = transformers.KimiLinearForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                                        attn_implementation="sdpa")
        theirs.train()
        runs.insert(0, ("transformers kimi_linear [B, T]", theirs, plain))

    rows = []
    for name, model, batch in runs:
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
            raise SystemExit(f"first-step losses disagree: {r['implementation']} {r['first_loss']} vs "
                             f"{rows[0]['implementation']} {ref}")

    n_params = sum(p.numel() for p in ours.parameters())
    info = environment(args, preset=args.preset, parameters=n_params, batch_size=B, seq_len=T, steps=args.steps,
                       threads=torch.get_num_threads(), rows=rows)
    write_json(args.out, "train_speed.json", info)
    base = rows[0]["tokens_per_s"]
    print(f"\npreset {args.preset} ({n_params / 1e6:.1f}M parameters), B={B}, T={T}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps; first-step losses agree "
          f"to 1e-4; commit {info['commit']}\n")
    print(f"| implementation | s/step | tokens/s | vs {rows[0]['implementation']} |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['implementation']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / base:.2f}x |")

