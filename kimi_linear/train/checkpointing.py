"""Training checkpoints: written atomically, resumed exactly.

A checkpoint is a folder ``OUT/checkpoint-NNNNNNN`` holding
  * the model in Hugging Face format (``config.json`` + safetensors, via ``save_pretrained``) when the
    model has that method, so ``kimi-linear generate --checkpoint`` loads it as it is; otherwise
    ``model.safetensors`` of its state dict;
  * ``trainer_state.pt``: optimizer state, RNG states, the data position, the step, the learning-rate schedule
    and the run's identity (``run_info``), everything a resumed run needs to continue on the same loss curve.
It is assembled in ``OUT/.tmp-checkpoint-*`` and renamed into place, so a kill at any moment leaves either the
complete new checkpoint or none. Old checkpoints are pruned by renaming them to ``OUT/.tmp-checkpoint-*``
first and deleting them after, so a kill during a deletion never leaves a partial ``checkpoint-N``; leftovers are
removed on the next save. Resuming still verifies each candidate (``verify_checkpoint``) and falls back to the
newest one that reads, since files can also be damaged after they were written.

State dicts go through ``torch.distributed.checkpoint.state_dict`` with full (unsharded) tensors, so the same
files serve one process, DDP and FSDP2.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
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
SHARD_INDEX = "model.safetensors.index.json"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Checkpoint folders under ``out_dir`` (named ``checkpoint-N``, with a ``trainer_state.pt``) as
    (step, path), oldest first. Their files are not read: see ``verify_checkpoint``."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, or None when every file reads: the
    ``trainer_state.pt`` loads, ``config.json`` (when present) parses, and every safetensors file the folder
    needs (the shard index's, or ``model.safetensors``) is present with a header that parses and covers the
    file (a truncated file fails)."""
    folder = Path(path)
    try:
        torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means "do not trust"
        return f"{TRAINER_STATE} does not load ({_first_line(e)})"
    if (folder / "config.json").is_file():
        try:
            json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            return f"config.json does not parse ({_first_line(e)})"
    if (folder / SHARD_INDEX).is_file():
        try:
            shards = sorted(set(json.loads((folder / SHARD_INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            return f"{SHARD_INDEX} does not parse ({_first_line(e)})"
    else:
        shards = [PLAIN_WEIGHTS]
    for name in shards:
        try:
            with safe_open(str(folder / name), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001
            return f"{name} is not readable ({_first_line(e)})"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def latest_checkpoint(out_dir: str | os.PathLike, *, report=None) -> Path | None:
    """The newest checkpoint under ``out_dir`` that passes ``verify_checkpoint``, or None. ``report(line)``
    (when given) is told of every newer checkpoint skipped, and why."""
    for step, path in reversed(list_checkpoints(out_dir)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        if report is not None:
            report(f"skipping {path.name}: {reason}")
    return None


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


def _discard(folder: Path) -> None:
    """Delete a folder so that a kill midway never leaves it half-deleted under its own name: rename it to a
    ``TMP_PREFIX`` name first (atomic), then delete."""
    doomed = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "old-", dir=folder.parent))
    os.replace(folder, doomed / folder.name)
    shutil.rmtree(doomed, ignore_errors=True)


def _make_shareable(folder: Path) -> None:
    """Give ``folder`` and its files the modes the umask allows (``mkdtemp`` and ``mkstemp`` make them
    private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: nn.Module, optimizer,
                    trainer_state: dict, ctx: DistContext, *, keep: int = 2) -> Path:
    """Write ``OUT/checkpoint-{step}`` atomically (collective: every process calls it; rank 0 writes).

    ``trainer_state`` is merged into ``trainer_state.pt`` next to the optimizer and RNG states.
    Only the newest ``keep`` checkpoints are kept; older ones are renamed away before they are deleted.
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
            payload = dict(trainer_state, step=step, optimizer=optim_state, rng=rng_state())
            torch.save(payload, tmp / TRAINER_STATE)
            _make_shareable(tmp)
            if final.exists():
                _discard(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for _, old in list_checkpoints(out)[:-keep] if keep > 0 else []:
            _discard(old)
    barrier(ctx)
    return final


def _read_model_state(folder: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    inner = unwrap(model)
    if (folder / PLAIN_WEIGHTS).is_file() and not (folder / "config.json").is_file():
        return load_file(str(folder / PLAIN_WEIGHTS))
    loaded = type(inner).from_pretrained(folder)
    return loaded.state_dict()


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, ctx: DistContext) -> dict:
    """Restore model, optimizer and RNG from a checkpoint folder (collective). Returns the rest of the trainer
    state: ``step``, ``run_info``, ``data`` and whatever the caller stored."""
    folder = Path(path)
    payload = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
    model_state = _read_model_state(folder, model)
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, payload.pop("optimizer"),
                             options=StateDictOptions(full_state_dict=True))
    payload.pop("scheduler", None)  # written by earlier versions; the schedule is in the trainer state now
    set_rng_state(payload.pop("rng"))
    return payload


def agree_on_latest(out_dir: str | os.PathLike, ctx: DistContext, *, report=None) -> Path | None:
    """Rank 0's view of the newest checkpoint that verifies, shared with every process (they may not share a
    disk view). ``report`` as in ``latest_checkpoint`` (rank 0 only)."""
    found = latest_checkpoint(out_dir, report=report) if ctx.is_main else None
    found = broadcast_object(None if found is None else str(found), ctx)
    return None if found is None else Path(found)
