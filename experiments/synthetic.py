"""Paper Fig. 4 at small scale: MQAR, Palindrome and Stack at 256-2048 tokens for KDA, GDN and Mamba2.

Each (task, mixer, length, lr) is one ``kimi-linear synth`` run
(``kimi_linear.train.synthetic.train_synthetic``): the paper's 2-layer, 2-head, head-dim-128 model, trained on
freshly generated sequences and scored by answer accuracy on a held-out set; the best accuracy over the
learning rates is the result of a (task, mixer, length).

    python experiments/synthetic.py --smoke                       # CPU, tiny sizes, a few minutes
    python experiments/synthetic.py --device cuda --out DIR --time-budget 400

Resumable: results go to ``DIR/synthetic.json`` after every run (written atomically); a run already there is
not run again, so the same command continues an interrupted sweep. Every cell runs at the first learning rate,
shortest length first, before any cell not yet solved tries the next one, so a time budget cuts the longest
lengths and the extra learning rates. Seeded: the same command gives the same data and the same initial weights.
Writes ``synthetic.json``, ``synthetic.png`` (accuracy vs length per task; accuracy vs step at the curve
length) and ``synthetic_table.md`` (ours next to the paper's numbers).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from kimi_linear.train.synthetic import MIXERS, TASKS, SynthConfig, train_synthetic

# Paper Fig. 4: accuracy (%) at 256 / 512 / 1024 / 2048 tokens. Stack is reported as 100 for
# KDA and GDN without a per-length breakdown; Mamba2 on Palindrome and Stack is not given in numbers.
PAPER = {
    ("mqar", "kda"): {256: 100, 512: 100, 1024: 100, 2048: 48},
    ("mqar", "gdn"): {256: 100, 512: 100, 1024: 79, 2048: 29},
    ("mqar", "mamba2"): {256: 98, 512: 0, 1024: 0, 2048: 0},
    ("palindrome", "kda"): {256: 100, 512: 100, 1024: 100, 2048: 42},
    ("palindrome", "gdn"): {256: 100, 512: 100, 1024: 97, 2048: 37},
    ("stack", "kda"): {256: 100, 512: 100, 1024: 100, 2048: 100},
    ("stack", "gdn"): {256: 100, 512: 100, 1024: 100, 2048: 100},
}
FULL = dict(
    lengths=[256, 512, 1024, 2048],
    lrs=[3e-3, 1e-3],
    steps=300,
    batch_size=64,
    eval_examples=256,
    eval_every=50,
    head_dim=128,
    curve_length=1024,
)
SMOKE = dict(
    lengths=[32, 64],
    lrs=[1e-2],
    steps=6,
    batch_size=8,
    eval_examples=16,
    eval_every=3,
    head_dim=8,
    curve_length=64,
)


def run_key(task: str, mixer: str, seq_len: int, lr: float) -> str:
    return f"{task}-{mixer}-T{seq_len}-lr{lr:g}"


def load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": {}, "failed": {}}


def save(path: Path, data: dict) -> None:
    """Write atomically: a reader (or a crash) never sees half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def force_kda_backend(backend: str) -> None:
    """Make the KDA layer call ``chunk_kda(..., backend=backend)`` (an experiment knob; the library default is
    auto)."""
    import kimi_linear.layers.kda as kda_layer
    from kimi_linear.ops.kda import chunk_kda

    kda_layer.chunk_kda = functools.partial(chunk_kda, backend=backend)


def share_kda_dt_per_head() -> None:
    """Initialise every KDA layer's per-channel dt_bias with one draw per head, shared by the head's channels
    (GDN's structure, keeping KDA's per-channel gate free to learn). An experiment knob for the init question of
    the MQAR results; the library's initialisation is unchanged."""
    import torch

    from kimi_linear.layers.kda import KimiDeltaAttention

    original = KimiDeltaAttention.reset_gate_parameters

    @torch.no_grad()
    def per_head(self) -> None:
        original(self)
        if self.scalar_gate or self.dt_bias.is_meta:
            return
        dt = self.dt_bias.view(self.num_heads, self.head_dim)
        dt.copy_(dt[:, :1].expand_as(dt))

    KimiDeltaAttention.reset_gate_parameters = per_head


def best_by_cell(runs: dict) -> dict:
    """(task, mixer, seq_len) -> the run with the best final-or-best accuracy over learning rates."""
    cells: dict = {}
    for r in runs.values():
        c = r["config"]
        key = (c["task"], c["mixer"], c["seq_len"])
        if key not in cells or r["best_accuracy"] > cells[key]["best_accuracy"]:
            cells[key] = r
    return cells


def table(runs: dict, tasks, mixers, lengths) -> str:
    """Markdown: a row per (task, mixer); per length "ours (steps@lr) / paper" in %, ours at the best lr."""
    cells = best_by_cell(runs)
    head = "| task | mixer | " + " | ".join(f"{n}: ours (steps@lr) / paper" for n in lengths) + " |"
    lines = [head, "|" + "---|" * (len(lengths) + 2)]
    for task in tasks:
        for mixer in mixers:
            paper = PAPER.get((task, mixer), {})
            row = []
            for n in lengths:
                r = cells.get((task, mixer, n))
                ours = (
                    f"{100 * r['best_accuracy']:.1f} ({r['steps_run']}@{r['config']['lr']:g})" if r else "—"
                )
                row.append(f"{ours} / {paper.get(n, '—')}")
            lines.append(f"| {task} | {mixer} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(runs: dict, tasks, mixers, lengths, curve_length: int, path: Path) -> None:
    """Fig. 4 style: top row accuracy vs length per task (best lr); bottom row accuracy vs step at
    curve_length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = best_by_cell(runs)
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7), squeeze=False)
    for j, task in enumerate(tasks):
        top, bottom = axes[0, j], axes[1, j]
        for mixer in mixers:
            pts = [
                (n, 100 * cells[(task, mixer, n)]["best_accuracy"])
                for n in lengths
                if (task, mixer, n) in cells
            ]
            if pts:
                (line,) = top.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mixer)
                paper = [(n, PAPER[(task, mixer)][n]) for n in lengths if n in PAPER.get((task, mixer), {})]
                if paper:
                    top.plot(
                        [p[0] for p in paper],
                        [p[1] for p in paper],
                        ls="--",
                        marker="x",
                        color=line.get_color(),
                        alpha=0.6,
                        label=f"{mixer} (paper)",
                    )
            r = cells.get((task, mixer, curve_length))
            if r:
                bottom.plot(
                    [c["step"] for c in r["curve"]], [100 * c["accuracy"] for c in r["curve"]], label=mixer
                )
        top.set_xscale("log", base=2)
        top.set_xticks(lengths, [str(n) for n in lengths])
        top.set_ylim(-3, 103)
        top.set_title(f"{task}: accuracy vs length (best lr; x = paper)")
        top.set_xlabel("sequence length")
        top.set_ylabel("answer accuracy (%)")
        bottom.set_ylim(-3, 103)
        bottom.set_title(f"{task}: training at {curve_length} tokens")
        bottom.set_xlabel("step")
        bottom.set_ylabel("answer accuracy (%)")
        if not bottom.lines:
            bottom.text(
                0.5, 0.5, f"no run at {curve_length}", ha="center", va="center", transform=bottom.transAxes
            )
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU check of the whole pipeline")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out",
        default=None,
        help="folder for JSON, PNG and table (default experiments/results/synthetic; with --smoke a temp folder)",
    )
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--mixers", nargs="+", choices=MIXERS, default=["kda", "gdn", "mamba2"])
    p.add_argument("--lengths", nargs="+", type=int, default=None)
    p.add_argument("--lrs", nargs="+", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; no run starts after this much time has passed (runs already started finish)",
    )
    p.add_argument(
        "--run-seconds",
        type=float,
        default=None,
        help="cap on one run's training time (it then evaluates and stops); steps_run says how far it got",
    )
    p.add_argument("--kda-backend", choices=("auto", "torch", "triton"), default="auto")
    p.add_argument("--kda-dt-init", choices=("per-channel", "per-head"), default="per-channel",
                   help="per-head: one dt draw shared by a KDA head's channels at init (an experiment knob)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true", help="only redraw the plot and table from the JSON")
    args = p.parse_args(argv)

    sizes = dict(SMOKE if args.smoke else FULL)
    for name in ("lengths", "lrs", "steps", "batch_size"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    if args.out is None:
        smoke_dir = Path(tempfile.gettempdir()) / "kimi_linear_synthetic_smoke"
        args.out = str(smoke_dir) if args.smoke else "experiments/results/synthetic"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "synthetic.json"
    data = load(json_path)
    # Runs are keyed by task, mixer, length and lr; the other sizes must match for a resumed sweep to be one
    # sweep.
    run_sizes = {k: sizes[k] for k in ("steps", "batch_size", "eval_examples", "eval_every", "head_dim")}
    recorded = data.get("meta", {}).get("run_sizes")
    if recorded is not None and recorded != run_sizes and not args.report_only:
        raise SystemExit(f"{json_path} holds runs made with other sizes ({recorded}); use another --out")
    data.setdefault("meta", {})["run_sizes"] = run_sizes
    if args.kda_backend != "auto":
        force_kda_backend(args.kda_backend)
    if args.kda_dt_init == "per-head":
        share_kda_dt_per_head()

    start = time.perf_counter()
    skipped = []
    if not args.report_only:
        import torch

        data["meta"].update(
            device=(torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"),
            torch=torch.__version__,
            smoke=args.smoke,
            kda_triton_module=importlib.util.find_spec("kimi_linear.ops.kda.chunk_triton") is not None,
        )
        # Every cell at the first lr, shortest length first; then the next lr only for cells not yet solved.
        # A time budget thus cuts the longest lengths and the extra learning rates first.
        cells = [(n, t, m) for n in sizes["lengths"] for t in args.tasks for m in args.mixers]
        plan = [(n, t, m, lr) for lr in sizes["lrs"] for n, t, m in cells]
        for n, task, mixer, lr in plan:
            key = run_key(task, mixer, n, lr)
            if key in data["runs"]:
                continue
            solved = [
                r
                for r in data["runs"].values()
                if (r["config"]["task"], r["config"]["mixer"], r["config"]["seq_len"]) == (task, mixer, n)
                and r["best_accuracy"] >= r["config"]["stop_at"]
            ]
            if solved:
                continue
            if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
                skipped.append(key)
                continue
            cfg = SynthConfig(
                task=task,
                mixer=mixer,
                seq_len=n,
                steps=sizes["steps"],
                lr=lr,
                batch_size=sizes["batch_size"],
                eval_every=sizes["eval_every"],
                eval_examples=sizes["eval_examples"],
                head_dim=sizes["head_dim"],
                seed=args.seed,
                device=args.device,
                max_seconds=args.run_seconds,
            )
            result = None
            for attempt in range(2):
                try:
                    result = train_synthetic(cfg, log=lambda line: print("  " + line, flush=True))
                    break
                except (
                    Exception
                ) as e:  # one broken run (a kernel, memory) must not lose the sweep; it is recorded
                    data["failed"][key] = f"{type(e).__name__}: {e}"
                    print(f"{key}: FAILED {type(e).__name__}: {e}", flush=True)
                    traceback.print_exc()
                    save(json_path, data)
                    if attempt or mixer not in ("kda", "gdn") or args.kda_backend != "auto":
                        break
                    # The fused kernels failed: continue the sweep on the PyTorch path of chunk_kda and say
                    # so.
                    print("retrying KDA/GDN runs with chunk_kda backend='torch'", flush=True)
                    force_kda_backend("torch")
                    args.kda_backend = "torch"
                    data["meta"]["kda_backend_fallback"] = f"{key}: {type(e).__name__}: {e}"
            if result is None:
                continue
            result_dict = result.to_dict()
            result_dict["kda_backend"] = args.kda_backend if mixer in ("kda", "gdn") else None
            data["runs"][key] = result_dict
            data["failed"].pop(key, None)
            save(json_path, data)
            print(
                f"{key}: accuracy {result.accuracy:.3f} (best {result.best_accuracy:.3f}), "
                f"{result.steps_run} steps, {result.seconds:.1f}s",
                flush=True,
            )
        data["meta"].setdefault("calls", []).append(
            dict(command=" ".join(sys.argv), seconds=time.perf_counter() - start, skipped_for_time=skipped)
        )
        save(json_path, data)

    plot(
        data["runs"], args.tasks, args.mixers, sizes["lengths"], sizes["curve_length"], out / "synthetic.png"
    )
    md = table(data["runs"], args.tasks, args.mixers, sizes["lengths"])
    (out / "synthetic_table.md").write_text(md + "\n")
    total = sum(r["seconds"] for r in data["runs"].values())
    print(
        f"\n{len(data['runs'])} runs, {total:.0f}s of training in total; {len(data['failed'])} failed; "
        f"{len(skipped)} not started (time budget)"
    )
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
