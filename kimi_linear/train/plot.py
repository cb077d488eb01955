"""The loss-curve figure of a run, drawn from its ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def read_records(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a line cut short by a kill is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_metrics(path: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train losses, validation losses) of a ``metrics.jsonl`` as (step, loss) lists."""
    train, val = [], []
    for record in read_records(path):
        if "loss" in record:
            train.append((record["step"], record["loss"]))
        if "val_loss" in record:
            val.append((record["step"], record["val_loss"]))
    return train, val


def plot_loss_curve(metrics: str | Path, png: str | Path, baseline: float | None = None) -> Path:
    """Write the training loss (and its 20-step moving average), validation points and the unigram baseline to
    ``png``. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(metrics)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="train loss")
        window = 20
        if len(losses) >= window:
            avg = [sum(losses[i - window + 1: i + 1]) / window for i in range(window - 1, len(losses))]
            ax.plot(steps[window - 1:], avg, color="tab:blue", linewidth=1.6,
                    label=f"train ({window}-step mean)")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation loss")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("kimi-linear train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png)
    plt.close(fig)
    return png
