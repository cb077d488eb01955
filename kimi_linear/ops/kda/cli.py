"""`kimi-linear kda`: run the KDA operator on random inputs and check its chunked form against the recurrence."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "kda",
        help="check and time the KDA operator (chunked vs recurrent, with gradients) on random inputs",
        description="Runs chunk_kda and the token-by-token reference on the same random inputs, prints the relative "
        "error of the output, the final state and every gradient, and the time of each.",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from kimi_linear.ops.kda import chunk_kda, naive_recurrent_kda

    for name in ("batch", "seq_len", "heads", "head_dim"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.manual_seed(args.seed)
    B, T, H, D = args.batch, args.seq_len, args.heads, args.head_dim
    dev = torch.device(args.device)
    inputs = {
        "q": torch.randn(B, T, H, D, device=dev),
        "k": torch.nn.functional.normalize(torch.randn(B, T, H, D, device=dev), dim=-1),
        "v": torch.randn(B, T, H, D, device=dev),
        "g": -torch.rand(B, T, H, D, device=dev),
        "beta": torch.rand(B, T, H, device=dev),
        "initial_state": torch.randn(B, H, D, D, device=dev),
    }
    results = {}
    for label, fn in (("chunk_kda", lambda **x: chunk_kda(**x, output_final_state=True, backend=args.backend)),
                      ("recurrent reference", lambda **x: naive_recurrent_kda(**x, output_final_state=True))):
        for _ in range(2):  # the first run warms up (allocator, kernel compilation); the second is timed
            leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
            start = time.perf_counter()
            o, state = fn(**leaves)
            ((o * o.detach().roll(1, -1)).sum() + state.square().sum()).backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        results[label] = (elapsed, o.detach(), state.detach(), {n: t.grad for n, t in leaves.items()})

    (t_c, o_c, s_c, g_c), (t_r, o_r, s_r, g_r) = results["chunk_kda"], results["recurrent reference"]
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
    print(f"KDA B={B} T={T} H={H} K=V={D} on {dev} (backend {args.backend})")
    print(f"{'tensor':<16}{'rel. error chunk vs recurrent':>32}")
    print(f"{'o':<16}{rel(o_c, o_r):>32.2e}")
    print(f"{'final state':<16}{rel(s_c, s_r):>32.2e}")
    for n in inputs:
        print(f"{'d' + n:<16}{rel(g_c[n], g_r[n]):>32.2e}")
    print(f"fwd+bwd time: chunk_kda {t_c * 1e3:.1f} ms, recurrent reference {t_r * 1e3:.1f} ms "
          f"({t_r / t_c:.1f}x)")
    return 0
