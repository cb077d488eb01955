"""KDA forward + backward on the CPU: the chunked PyTorch path vs the recurrence vs transformers' fallback.

Ours is ``chunk_kda(backend="torch")``, against the token-by-token recurrent reference and, with ``--compare
transformers``, transformers' pure-PyTorch ``kimi_linear`` chunk fallback. Prints a table last and writes
kda_cpu.json into --out.

    python -m benchmarks kda_cpu --compare transformers [--seq-len 2048] [--heads 4] [--head-dim 64] [--repeats 5]

Timing: wall-clock median over repeats after one warm-up, fresh random inputs each repeat (made outside the timed
call). The CPU should be idle; other processes on the machine distort every number here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import SuiteParser, environment, median_ms, write_json
from kimi_linear.ops.kda import chunk_kda, naive_recurrent_kda

OURS = "kimi-linear chunk_kda (torch path)"


def make_inputs(B, T, H, K, V):
    q = torch.randn(B, T, H, K)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, V)
    g = -torch.rand(B, T, H, K)
    beta = torch.rand(B, T, H)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def fwd_bwd_ms(fn, shape, repeats: int) -> float:
    """Median ms of forward + backward of ``fn`` on fresh inputs of ``shape`` (B, T, H, K, V)."""

    def run(inputs):
        o = fn(*inputs)
        o.float().square().sum().backward()

    return median_ms(run, reps=repeats, warmup=1, cuda=False, setup=lambda: make_inputs(*shape))


def main(argv=None) -> None:
    p = SuiteParser(__name__, __doc__, peers=("transformers",))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.batch, args.seq_len, args.heads, args.head_dim, args.head_dim)

    candidates = {
        OURS: lambda q, k, v, g, b: chunk_kda(q, k, v, g, b, backend="torch")[0],
        "recurrent reference (paper Eq. 1)": lambda q, k, v, g, b: naive_recurrent_kda(q, k, v, g, b)[0],
    }
    if "transformers" in args.compare:
        try:
            import transformers
            from transformers.models.kimi_linear import modeling_kimi_linear as hf
        except ImportError as e:
            raise SystemExit(f"--compare transformers: transformers' kimi_linear cannot be imported ({e!r})") from e
        candidates[f"transformers {transformers.__version__} torch fallback"] = (
            lambda q, k, v, g, b: hf.chunk_kimi_delta_attention(q, k, v, g, b)[0]
        )

    results = {}
    for name, fn in candidates.items():
        repeats = args.repeats if name == OURS else max(2, args.repeats // 2)
        results[name] = fwd_bwd_ms(fn, shape, repeats)
    ours = results[OURS]

    record = environment(args, shape=dict(zip("B T H K V".split(), shape)), fwd_bwd_ms=results)
    write_json(args.out, "kda_cpu.json", record)

    print(f"KDA fwd+bwd on CPU, B={shape[0]} T={shape[1]} H={shape[2]} K=V={shape[3]}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads (median of runs), commit {record['commit']}")
    print(f"| {'implementation':<44} | {'ms':>9} | {'time / ours':>11} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 13}|")
    for name, t in results.items():
        print(f"| {name:<44} | {t:>9.1f} | {t / ours:>10.1f}x |")
