"""The training loop: AdamW (fused on CUDA, foreach elsewhere) with warmup + cosine, gradient accumulation and
clipping, bf16 autocast on GPU, auxiliary-loss-free MoE balancing, optional activation checkpointing,
checkpoint/resume (also to a larger ``max_steps``), a clean stop on SIGINT/SIGTERM, progress bar and metrics. A step
never waits for the device: its statistics are read every ``log_every`` steps.

Any ``nn.Module`` trains: a batch is a dict with ``input_ids`` and ``labels`` (``IGNORE_INDEX`` where there is
no target), optionally ``cu_seqlens``; ``loss_fn(model, batch)`` returns the *sum* of token losses and the
number of counted tokens. Losses are normalised by the token count of the whole global batch (all
micro-batches on all processes), so one process with accumulation and N processes compute the same update.

Batch sources: anything with ``next_step() -> list[micro-batch dict]`` (this process's micro-batches for one
optimizer step); resuming additionally needs ``state_dict()`` / ``load_state_dict()`` (the data position).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kimi_linear.model import parse_activation_checkpointing
from kimi_linear.train.checkpointing import (
    agree_on_latest,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from kimi_linear.train.data import IGNORE_INDEX
from kimi_linear.train.distributed import DistContext, all_reduce_sum, unwrap
from kimi_linear.train.stopping import STOP_SIGNALS, StopOnSignal, TrainingStopped

AUTOCAST_DTYPES = ("auto", "float32", "bfloat16")
NO_DECAY_NAMES = ("A_log", "dt_bias")


@dataclass
class TrainConfig:
    """Optimisation settings. ``dtype`` is the autocast compute dtype (weights stay float32): "auto" is
    bfloat16 on CUDA and float32 on the CPU. ``activation_checkpointing`` is what the backward recomputes instead
    of keeping: "none", "full" or a list of parts such as "mla,moe" (``kimi_linear.model``'s
    ``ACTIVATION_CHECKPOINTING_HELP``); only a model with ``set_activation_checkpointing`` takes one.
    ``log_every``: steps between reads of the step statistics (loss, gradient norm, ...) from the device, the only
    points where training waits for it; every step still gets its line in ``metrics.jsonl``. None: 1 on the CPU
    (reading costs nothing there), 10 on an accelerator."""

    max_steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    bias_update_rate: float = 1e-3
    dtype: str = "auto"
    checkpoint_every: int = 0
    eval_every: int = 0
    keep_checkpoints: int = 2
    activation_checkpointing: str = "none"
    log_every: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of its range."""
        checks = [
            ("max_steps", self.max_steps >= 1, ">= 1"),
            ("lr", math.isfinite(self.lr) and 0 < self.lr <= 1, "in (0, 1]"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("warmup_steps", 0 <= self.warmup_steps <= self.max_steps, f"in [0, max_steps={self.max_steps}]"),
            ("weight_decay", 0 <= self.weight_decay < 1, "in [0, 1)"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0 disables clipping)"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("bias_update_rate", 0 <= self.bias_update_rate < 1, "in [0, 1)"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0 (0: only at the end)"),
            ("eval_every", self.eval_every >= 0, ">= 0 (0: only at the end)"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
            ("log_every", self.log_every is None or self.log_every >= 1, ">= 1 (or None: automatic)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)}")
        if self.dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"dtype must be one of {AUTOCAST_DTYPES}, got {self.dtype!r}")
        try:
            parse_activation_checkpointing(self.activation_checkpointing)
        except (TypeError, ValueError) as e:
            raise ValueError(f"activation_checkpointing: {e}") from None


def causal_lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies in float32, number of labelled tokens) for a batch whose ``labels``
    are already aligned with ``input_ids`` (label t is the target of position t).

    A model whose ``forward`` takes ``labels`` (``KimiLinearForCausalLM``) computes the loss itself, chunk by
    chunk, without the ``[tokens, vocab]`` logits; any other model returns logits and the loss is taken from
    them."""
    kwargs = {"cu_seqlens": batch["cu_seqlens"]} if batch.get("cu_seqlens") is not None else {}
    labels = batch["labels"]
    if _takes_labels(unwrap(model)):
        return model(batch["input_ids"], labels=labels, **kwargs).loss_sum, (labels != IGNORE_INDEX).sum()
    out = model(batch["input_ids"], **kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    loss = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


def _takes_labels(model: nn.Module) -> bool:
    return "labels" in inspect.signature(model.forward).parameters


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on A_log, dt_bias, norm weights and biases (or any
    vector)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in NO_DECAY_NAMES or leaf == "bias" or "norm" in name.lower() or p.dim() < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate multiplier per step (0-based): linear warmup from 1/warmup to 1 over ``warmup_steps``,
    then cosine segments, each ``(start_step, start_factor, end_step)``: from ``start_factor`` at
    ``start_step`` down to ``min_lr_ratio`` at ``end_step``, then flat at the floor. A run has one segment
    ``(warmup_steps, 1.0, max_steps)``; each change of ``max_steps`` on resume adds one (``extended_to``)."""

    warmup_steps: int
    min_lr_ratio: float
    segments: tuple[tuple[int, float, int], ...]

    @classmethod
    def warmup_cosine(cls, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> LRSchedule:
        return cls(warmup_steps, min_lr_ratio, ((warmup_steps, 1.0, max_steps),))

    @property
    def max_steps(self) -> int:
        return self.segments[-1][2]

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        start, start_factor, end = next(seg for seg in reversed(self.segments) if seg[0] <= step)
        progress = min(1.0, (step - start) / max(1, end - start))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (start_factor - self.min_lr_ratio) * cosine

    def extended_to(self, max_steps: int, step: int) -> LRSchedule:
        """This schedule for a run that, after ``step`` steps, is to end at ``max_steps`` instead: unchanged
        up to ``step``, then a cosine from the multiplier it had reached down to the floor at the new end, so the
        rate never jumps. A finished run (already at the floor) continues at the floor."""
        if max_steps == self.max_steps:
            return self
        start = max(step, self.warmup_steps)
        segment = (start, self(start), max_steps)
        return replace(self, segments=(*(s for s in self.segments if s[0] < start), segment))

    def to_dict(self) -> dict:
        return {"warmup_steps": self.warmup_steps, "min_lr_ratio": self.min_lr_ratio,
                "segments": [list(s) for s in self.segments]}

    @classmethod
    def from_dict(cls, d: dict) -> LRSchedule:
        return cls(int(d["warmup_steps"]), float(d["min_lr_ratio"]),
                   tuple((int(a), float(f), int(b)) for a, f, b in d["segments"]))


def warmup_cosine(warmup_steps: int, max_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear from 1/warmup to 1 over ``warmup_steps``, then cosine down to
    ``min_lr_ratio`` at ``max_steps`` (``LRSchedule`` with one segment)."""
    return LRSchedule.warmup_cosine(warmup_steps, max_steps, min_lr_ratio)


def moe_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that balance experts without an auxiliary loss: they expose ``last_expert_load [E]`` after a
    forward and ``update_correction_bias(rate, load=[E])`` (``kimi_linear.layers.moe.MoE``)."""
    return [m for m in unwrap(model).modules() if hasattr(m, "update_correction_bias")]


class MetricsLog:
    """``metrics.jsonl`` on rank 0: one JSON object per line. On resume, lines past the resumed step are
    dropped so the file follows the run that actually continues."""

    def __init__(self, path: Path | None, resume_step: int):
        self.path = path
        if path is None:
            return
        kept = []
        if resume_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class Trainer:
    """Trains ``model`` (already wrapped for DDP/FSDP when distributed) with ``config``.

    Args:
        model: the module to train, on ``ctx.device``.
        config: optimisation settings (validated here).
        ctx: process placement; a single CPU process by default.
        loss_fn: ``(model, batch) -> (loss_sum, token_count)``; next-token cross-entropy by default.
        out_dir: where checkpoints and ``metrics.jsonl`` go (None: nothing is written).
        run_info: JSON-able identity of the run (model config, data, hyper-parameters); a checkpoint
            written with different ``run_info`` is refused on resume. ``max_steps`` is not part of it: a run
            resumed with another ``max_steps`` continues to it (``LRSchedule.extended_to``).
        progress: show a tqdm progress bar on rank 0.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, *, ctx: DistContext | None = None,
                 loss_fn: Callable = causal_lm_loss, out_dir: str | os.PathLike | None = None,
                 run_info: dict | None = None, progress: bool = True):
        config.validate()
        self.model, self.config, self.loss_fn = model, config, loss_fn
        self.ctx = ctx or DistContext()
        target = unwrap(model)
        if hasattr(target, "set_activation_checkpointing"):
            target.set_activation_checkpointing(config.activation_checkpointing)
        elif parse_activation_checkpointing(config.activation_checkpointing):
            raise ValueError(f"activation_checkpointing={config.activation_checkpointing!r} needs a model with "
                             f"set_activation_checkpointing; {type(target).__name__} has none")
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.run_info = run_info or {}
        self.progress = progress
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                           betas=(config.beta1, config.beta2), **self._adamw_kernel())
        self.schedule = LRSchedule.warmup_cosine(config.warmup_steps, config.max_steps, config.min_lr_ratio)
        self.moe = moe_modules(model)
        self.step = 0
        self.tokens_seen = 0
        self._pending: list[tuple[int, dict]] = []  # steps whose statistics are still on the device
        dev = self.ctx.device
        want_bf16 = config.dtype == "bfloat16" or (config.dtype == "auto" and dev.type == "cuda")
        self._autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if want_bf16 else \
            contextlib.nullcontext

    def _adamw_kernel(self) -> dict:
        """AdamW's implementation: the fused kernel when every parameter is on CUDA, else the multi-tensor
        (foreach) one; both update all parameters in a few launches instead of a Python loop over them."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if params and all(p.is_cuda and p.is_floating_point() for p in params):
            return {"fused": True}
        return {"foreach": True}

    def _restore_adamw_kernel(self) -> None:
        """After loading optimizer state (which brings the saving run's group settings): this run's kernel, with
        the step counters where it wants them (the fused kernel reads them on the parameters' device)."""
        kernel = self._adamw_kernel()
        for group in self.optimizer.param_groups:
            group["fused"], group["foreach"] = kernel.get("fused", False), kernel.get("foreach", False)
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                if "step" in state and torch.is_tensor(state["step"]):
                    device = p.device if kernel.get("fused") else torch.device("cpu")
                    state["step"] = state["step"].to(device=device, dtype=torch.float32)

    def _to_device(self, batch: dict) -> dict:
        """Host tensors go to the device from pinned memory, so the copy does not wait for the device's queue
        (a copy from pageable memory does)."""
        dev = self.ctx.device

        def move(v):
            if not isinstance(v, torch.Tensor) or v.device == dev:
                return v
            if dev.type == "cuda" and v.device.type == "cpu":
                v = v.pin_memory()
            return v.to(dev, non_blocking=True)

        return {k: move(v) for k, v in batch.items()}

    def _sync_gradients(self, enabled: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        m = self.model
        if hasattr(m, "set_requires_gradient_sync"):  # FSDP2
            m.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if hasattr(m, "no_sync") and not enabled:  # DDP
            return m.no_sync()
        return contextlib.nullcontext()

    def train_step(self, micro_batches: list[dict], *, sync: bool = True) -> dict:
        """One optimizer step over this process's micro-batches. Returns loss (mean over the global batch),
        grad_norm (before clipping), lr, tokens (global input tokens) and, with MoE layers, the expert load
        max/mean per MoE layer.

        Nothing in the step waits for the device, provided the batches are host tensors (their label counts are
        read on the host). With ``sync=True`` the statistics are then read (one wait) and returned as Python
        numbers; with ``sync=False`` they stay queued on the device and the return value is ``{}``: read them
        later, for many steps at once, with ``read_stats()`` (``fit`` does, every ``log_every`` steps).
        ``tokens_seen`` advances when they are read.

        Raises:
            ValueError: a step without labelled tokens (known on the host: one process, or CPU processes).
        """
        model, ctx = self.model, self.ctx
        model.train()
        local_labels = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        local_inputs = sum(b["input_ids"].numel() for b in micro_batches)
        batches = [self._to_device(b) for b in micro_batches]
        if ctx.distributed:
            counts = torch.tensor([local_labels, local_inputs], dtype=torch.float64, device=ctx.device)
            counts = all_reduce_sum(counts, ctx)
            if counts.device.type == "cpu":
                total_labels, total_inputs = counts[0].item(), int(counts[1].item())
            else:  # stays on the device; a global batch without labels then gives zero loss and gradients
                total_labels, total_inputs = counts[0].clamp_min(1.0), counts[1]
        else:
            total_labels, total_inputs = float(local_labels), local_inputs
        if isinstance(total_labels, float) and total_labels == 0:
            raise ValueError("a training step has no labelled tokens")
        # DDP/FSDP average gradients over processes; scaling by world_size makes it a global sum.
        scale = ctx.world_size / total_labels
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        loads = [None] * len(self.moe)
        for i, batch in enumerate(batches):
            with self._sync_gradients(i == len(batches) - 1):
                with self._autocast():
                    loss, _ = self.loss_fn(model, batch)
                (loss * (scale.float() if torch.is_tensor(scale) else scale)).backward()
            loss_sum += loss.detach().double()
            for j, m in enumerate(self.moe):
                load = m.last_expert_load.detach().double()
                loads[j] = load if loads[j] is None else loads[j] + load
        for p in model.parameters():
            # Every process must step every parameter alike, also where an expert got no token here.
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        grad_norm = self._clip()
        lr = self.config.lr * self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = {"loss": all_reduce_sum(loss_sum, ctx) / total_labels, "grad_norm": grad_norm, "lr": lr,
                 "tokens": total_inputs}
        if self.moe:
            imbalance = []
            for m, load in zip(self.moe, loads, strict=True):
                load = all_reduce_sum(load, ctx).float()
                if self.config.bias_update_rate > 0:
                    m.update_correction_bias(self.config.bias_update_rate, load=load)
                imbalance.append(load.max() / load.mean().clamp_min(1e-12))
            stats["expert_load_max_over_mean"] = torch.stack(imbalance)
        self.step += 1
        self._pending.append((self.step, stats))
        return self.read_stats()[-1][1] if sync else {}

    def read_stats(self) -> list[tuple[int, dict]]:
        """The statistics of the steps not read yet, as ``[(step, stats)]`` with Python numbers, oldest first;
        waits for the device once for all of them. Advances ``tokens_seen``."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        tensors = [v.detach().reshape(-1).to(self.ctx.device, torch.float64) for _, stats in pending
                   for v in stats.values() if torch.is_tensor(v)]
        flat = iter(torch.cat(tensors).tolist() if tensors else [])
        out = []
        for step, stats in pending:
            read = {}
            for key, v in stats.items():
                if torch.is_tensor(v):
                    values = [next(flat) for _ in range(v.numel())]
                    v = values if v.dim() else values[0]
                read[key] = v
            read["tokens"] = int(read["tokens"])
            if "expert_load_max_over_mean" in read:
                read["expert_load_max_over_mean"] = [round(x, 4) for x in read["expert_load_max_over_mean"]]
            self.tokens_seen += read["tokens"]
            out.append((step, read))
        return out

    def _clip(self) -> torch.Tensor:
        """Clip the gradients to ``grad_clip`` (0: no clipping) and return their norm before it, on the device."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return norm

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> tuple[float, int]:
        """(sum of token losses, token count) over this process's ``batches``, summed over all processes."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        for batch in batches:
            with self._autocast():
                loss, n = self.loss_fn(self.model, self._to_device(batch))
            total += torch.stack([loss.double(), n.double()])
        total = all_reduce_sum(total, self.ctx)
        return total[0].item(), int(total[1].item())

    def state(self, data_state: dict | None) -> dict:
        return {"run_info": self.run_info, "data": data_state, "tokens_seen": self.tokens_seen,
                "train_config": asdict(self.config), "lr_schedule": self.schedule.to_dict()}

    def save(self, data_state: dict | None):
        if self.out_dir is None:
            return None
        return save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, self.state(data_state),
                               self.ctx, keep=self.config.keep_checkpoints)

    def resume(self, batches=None) -> int:
        """Load the newest checkpoint under ``out_dir`` that verifies (if any) and return its step (0 without
        one). Newer checkpoints that do not verify are skipped with a line on stdout saying why. When
        ``config.max_steps`` differs from the saved run's, the schedule is extended
        (``LRSchedule.extended_to``).

        Raises:
            ValueError: the checkpoint was written by a run with different ``run_info``.
        """
        if self.out_dir is None:
            return 0
        path = agree_on_latest(self.out_dir, self.ctx, report=lambda line: print(line, flush=True))
        if path is None:
            return 0
        saved = load_checkpoint(path, self.model, self.optimizer, self.ctx)
        self._restore_adamw_kernel()
        if saved.get("run_info") != self.run_info:
            diff = describe_difference(saved.get("run_info"), self.run_info)
            raise ValueError(f"{self.out_dir} holds a different run ({diff}); pass the same settings to "
                             f"resume it, or another --out")
        if batches is not None and saved.get("data") is not None:
            batches.load_state_dict(saved["data"])
        self.step = int(saved["step"])
        self.tokens_seen = int(saved.get("tokens_seen", 0))
        if "lr_schedule" in saved:
            schedule = LRSchedule.from_dict(saved["lr_schedule"])
        else:  # written before the schedule was saved: it was the one of the saved settings
            tc = saved["train_config"]
            schedule = LRSchedule.warmup_cosine(tc["warmup_steps"], tc["max_steps"], tc["min_lr_ratio"])
        self.schedule = schedule.extended_to(self.config.max_steps, self.step)
        if self.schedule != schedule and self.ctx.is_main and self.step < self.config.max_steps:
            start, factor, end = self.schedule.segments[-1]
            print(f"the run was planned for {schedule.max_steps} steps, now {end}: the learning rate goes "
                  f"from {factor:.3g} x peak at step {start} down a cosine to the floor "
                  f"({self.schedule.min_lr_ratio:g} x peak) at step {end}", flush=True)
        return self.step

    def _stop_requested(self, stop: StopOnSignal | None, collective: bool) -> bool:
        """Whether any process got a stop signal. Distributed, this is a collective (all stop at one step) that
        waits for the device, so it is asked only when ``collective`` (at the steps where statistics are read
        anyway); a single process asks its own flag at every step."""
        if stop is None:
            return False
        if not self.ctx.distributed:
            return stop.requested
        if not collective:
            return False
        got = torch.tensor([float(stop.signum == sig) for sig in STOP_SIGNALS], device=self.ctx.device)
        got = all_reduce_sum(got, self.ctx).tolist()
        if stop.signum is None and any(got):  # another process got it: stop with it, under its signal's name
            stop.signum = next(sig for sig, n in zip(STOP_SIGNALS, got, strict=True) if n > 0)
        return stop.signum is not None

    def log_interval(self) -> int:
        """Steps between reads of the statistics (``TrainConfig.log_every``; automatic: 1 on the CPU, else 10)."""
        if self.config.log_every is not None:
            return self.config.log_every
        return 1 if self.ctx.device.type == "cpu" else 10

    def fit(self, batches, *, eval_data: list[dict] | None = None,
            on_step: Callable[[int, dict], None] | None = None, stop: StopOnSignal | None = None) -> dict:
        """Train until ``config.max_steps``, resuming from ``out_dir`` when it holds a checkpoint.

        Evaluates ``eval_data`` every ``eval_every`` steps and at the end; checkpoints every
        ``checkpoint_every`` steps and at the end; writes every step to ``metrics.jsonl`` and the progress bar
        (rank 0 only), reading the step statistics from the device every ``log_interval()`` steps (and before an
        evaluation, a checkpoint or a stop) — the steps between never wait for the device. ``on_step(step,
        stats)`` is called after each step (it makes every step read its statistics). With ``stop`` (an active
        ``StopOnSignal``), a signal makes it finish the current step, checkpoint and raise ``TrainingStopped``
        (distributed: at the next step where statistics are read).

        Returns ``{"start_step", "step", "losses" (this call's steps), "val_loss", "tokens_per_s",
        "checkpoint"}``.

        Raises:
            TrainingStopped: ``stop`` saw a signal (the state is saved in its ``checkpoint``).
        """
        from tqdm.auto import tqdm

        cfg, ctx = self.config, self.ctx
        start = self.resume(batches)
        if start > 0 and ctx.is_main:
            print(f"resumed {self.out_dir} at step {start}", flush=True)
        main_out = self.out_dir if ctx.is_main else None
        log = MetricsLog(None if main_out is None else main_out / "metrics.jsonl", start)
        bar = tqdm(total=cfg.max_steps, initial=start, unit="step", dynamic_ncols=True,
                   disable=not (self.progress and ctx.is_main))
        losses, val_loss, checkpoint, saved_step = [], None, None, start
        t0, tokens0 = time.perf_counter(), self.tokens_seen
        interval = self.log_interval()
        read_at = [t0, start]  # time and step of the last read

        def read() -> None:
            """Read the pending statistics: losses, metrics lines, progress bar, on_step."""
            records = self.read_stats()
            if not records:
                return
            now = time.perf_counter()
            step_time = (now - read_at[0]) / max(1, records[-1][0] - read_at[1])
            read_at[:] = [now, records[-1][0]]
            tok_s = (self.tokens_seen - tokens0) / max(now - t0, 1e-9)
            for step, stats in records:
                losses.append(stats["loss"])
                log.write({"step": step, **stats, "tokens_seen": self.tokens_seen, "tokens_per_s": round(tok_s),
                           "step_time_s": round(step_time, 4)})
                if on_step is not None:
                    on_step(step, stats)
            bar.set_postfix(loss=f"{records[-1][1]['loss']:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            bar.update(len(records))

        try:
            while self.step < cfg.max_steps:
                if self._stop_requested(stop, collective=not self._pending):
                    if saved_step != self.step:
                        checkpoint = self.save(data_state(batches))
                    elif checkpoint is None and self.out_dir is not None:
                        checkpoint = latest_checkpoint(self.out_dir)
                    raise TrainingStopped(stop.signum, self.step, checkpoint)
                self.train_step(batches.next_step(), sync=False)
                last = self.step == cfg.max_steps
                evaluate = eval_data is not None and (last or (cfg.eval_every and self.step % cfg.eval_every == 0))
                save = last or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
                stopping = stop is not None and not ctx.distributed and stop.requested
                if on_step is not None or evaluate or save or stopping or self.step % interval == 0:
                    read()
                if evaluate:
                    total, n = self.evaluate(eval_data)
                    val_loss = total / max(n, 1)
                    log.write({"step": self.step, "val_loss": val_loss})
                    if ctx.is_main:
                        bar.write(f"step {self.step}: validation loss {val_loss:.4f}")
                if save:
                    checkpoint = self.save(data_state(batches))
                    saved_step = self.step
            read()
        finally:
            bar.close()
        if start >= cfg.max_steps and eval_data is not None:
            total, n = self.evaluate(eval_data)
            val_loss = total / max(n, 1)
        if checkpoint is None and self.out_dir is not None:
            checkpoint = latest_checkpoint(self.out_dir)
        elapsed = time.perf_counter() - t0
        return {"start_step": start, "step": self.step, "losses": losses, "val_loss": val_loss,
                "tokens_per_s": (self.tokens_seen - tokens0) / elapsed if losses else 0.0,
                "elapsed_s": elapsed, "checkpoint": checkpoint}


def data_state(batches) -> dict | None:
    """The batch source's position, when it can tell it (``state_dict()``)."""
    return batches.state_dict() if hasattr(batches, "state_dict") else None


def describe_difference(saved: dict | None, current: dict, prefix: str = "") -> str:
    """The first few settings that differ between two run descriptions, as "name: saved -> current"."""
    saved = saved or {}
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = describe_difference(a, b, prefix + key + ".")
            if inner:
                diffs.append(inner)
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(diffs[:4])


def train(model: nn.Module, batches, config: TrainConfig, **kwargs) -> dict:
    """Train ``model`` on ``batches`` with ``config``; keyword arguments go to ``Trainer`` and ``fit``
    (eval_data, on_step). Returns ``Trainer.fit``'s summary."""
    fit_kwargs = {k: kwargs.pop(k) for k in ("eval_data", "on_step") if k in kwargs}
    return Trainer(model, config, **kwargs).fit(batches, **fit_kwargs)
