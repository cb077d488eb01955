"""Training checkpoints: written atomically, resumed exactly.

A checkpoint is a folder ``OUT/checkpoint-NNNNNNN`` holding
  * the model in Hugging Face format (``config.json`` + safetensors, via ``save_pretrained``) when the
    model has that method, so ``kimi-linear generate --checkpoint`` loads it as it is; otherwise
    ``model.safetensors`` of its state dict;
  * ``trainer_state.pt``: optimizer and scheduler state, RNG states, the data position, the step and the run's
    identity (``run_info``), everything a resumed run needs to continue on the same loss curve.
It is assembled in ``OUT/.tmp-checkpoint-*`` and renamed into place, so a kill at any moment leaves either the
complete new checkpoint or none; leftovers of interrupted writes are removed on the next save.

State dicts go through ``torch.distributed.checkpoint.state_dict`` with full (unsharded) tensors, so the same
files serve one process, DDP and FSDP2.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from kimi_linear.train.distributed import DistContext, barrier, broadcast_object, unwrap

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.pt"
PLAIN_WEIGHTS = "model.safetensors"
TMP_PREFIX = ".tmp-checkpoint-"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out_dir`` as (step, path), oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``out_dir``, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_options() -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _write_model(model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Rank 0: the model's weights into ``folder``, in Hugging Face format where the model supports it."""
    inner = unwrap(model)
    if hasattr(inner, "save_pretrained"):
        if any(type(t).__name__ == "DTensor" for t in inner.state_dict().values()):
            # FSDP2 holds shards: save an unsharded CPU copy built from the gathered full state.
            inner = type(inner)(inner.config)
            inner.load_state_dict(state)
        inner.save_pretrained(folder)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / PLAIN_WEIGHTS))


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: nn.Module, optimizer, scheduler,
                    trainer_state: dict, ctx: DistContext, *, keep: int = 2) -> Path:
    """Write ``OUT/checkpoint-{step}`` atomically (collective: every process calls it; rank 0 writes).

    ``trainer_state`` is merged into ``trainer_state.pt`` next to the optimizer, scheduler and RNG states.
    Only the newest ``keep`` checkpoints are kept.
    Returns the checkpoint's path.
    """
    out = Path(out_dir)
    model_state = get_model_state_dict(model, options=_full_options())
    optim_state = get_optimizer_state_dict(model, optimizer, options=_full_options())
    final = out / checkpoint_name(step)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out))
        try:
            _write_model(model, model_state, tmp)
            payload = dict(trainer_state, step=step, optimizer=optim_state, scheduler=scheduler.state_dict(),
                           rng=rng_state())
            torch.save(payload, tmp / TRAINER_STATE)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for _, old in list_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return final


def _read_model_state(folder: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    inner = unwrap(model)
    if (folder / PLAIN_WEIGHTS).is_file() and not (folder / "config.json").is_file():
        return load_file(str(folder / PLAIN_WEIGHTS))
    loaded = type(inner).from_pretrained(folder)
    return loaded.state_dict()


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, scheduler,
                    ctx: DistContext) -> dict:
    """Restore model, optimizer, scheduler and RNG from a checkpoint folder (collective). Returns the rest of
    the trainer state: ``step``, ``run_info``, ``data`` and whatever the caller stored."""
    folder = Path(path)
    payload = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
    model_state = _read_model_state(folder, model)
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, payload.pop("optimizer"),
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(payload.pop("scheduler"))
    set_rng_state(payload.pop("rng"))
    return payload


def agree_on_latest(out_dir: str | os.PathLike, ctx: DistContext) -> Path | None:
    """Rank 0's view of the newest checkpoint, shared with every process (they may not share a disk view)."""
    found = latest_checkpoint(out_dir) if ctx.is_main else None
    found = broadcast_object(None if found is None else str(found), ctx)
    return None if found is None else Path(found)
