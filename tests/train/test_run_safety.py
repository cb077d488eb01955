"""`kimi-linear train` run-folder safety as real processes on the debug preset: one process per --out,
SIGINT/SIGTERM save and exit, resume skips damaged checkpoints, a finished run trains further."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from kimi_linear.cli import main
from kimi_linear.train.checkpointing import TRAINER_STATE, list_checkpoints, verify_checkpoint
from kimi_linear.train.runlock import LOCK_FILE
from kimi_linear.train.stopping import StopOnSignal
from tests.train.test_cli import SMALL_RUN, losses, run_module, write_corpus


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wait_for_steps(proc: subprocess.Popen, out: Path, n: int, timeout: float = 120) -> None:
    """Wait until the run in ``out`` has logged ``n`` steps (fails if it ends first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            log = proc.communicate()[0][-2000:]
            raise AssertionError(f"the run ended early (rc {proc.returncode}): {log}")
        if (out / "metrics.jsonl").is_file() and len(losses(out)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("the run logged too few steps in time")


def long_run(data: Path, *extra: str) -> list[str]:
    """A run that would go on for many minutes: tests stop it."""
    return [*SMALL_RUN, "--max-steps", "100000", "--lr", "1e-2", "--warmup-steps", "2", "--data", str(data),
            "--sample-tokens", "0", "--eval-every", "0", *extra]


def test_second_process_on_the_same_out_is_refused_and_a_dead_holder_does_not_block(tmp_path, capsys):
    data, out = write_corpus(tmp_path / "data", seed=5), tmp_path / "run"
    first = run_module([*long_run(data, "--checkpoint-every", "2"), "--out", str(out)])
    try:
        wait_for_steps(first, out, 3)
        second = run_module([*long_run(data, "--checkpoint-every", "2"), "--out", str(out)])
        log, _ = second.communicate(timeout=300)
        assert second.returncode == 2, log
        assert log.strip() == log.strip().splitlines()[-1], "one line"
        assert f"in use by another training process (pid {first.pid}" in log, log
        assert first.poll() is None, "the first run goes on"
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    steps = sorted(losses(out))
    assert steps == list(range(1, steps[-1] + 1)), "only the first process logged"

    # The holder died without releasing anything: the next run takes the folder over and resumes.
    last = list_checkpoints(out)[-1][0]
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--max-steps", str(last + 1), "--data", str(data), *SMALL_RUN,
                 "--sample-tokens", "0", "--eval-windows", "4"]) == 0
    assert f"resumed {out} at step {last}" in capsys.readouterr().out
    assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_saves_and_says_how_to_resume(tmp_path, capsys, sig, code):
    data, out = write_corpus(tmp_path / "data", seed=6), tmp_path / "run"
    args = [*long_run(data, "--checkpoint-every", "0"), "--out", str(out)]
    proc = run_module(args)
    wait_for_steps(proc, out, 3)
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == code, log
    step = max(losses(out))
    ckpt = out / f"checkpoint-{step:07d}"
    assert [p for _, p in list_checkpoints(out)] == [ckpt], "the last step finished is saved"
    assert verify_checkpoint(ckpt) is None
    assert f"stopped by {sig.name} after step {step}" in log and str(ckpt) in log, log
    assert f"kimi-linear train --out {out}" in log

    # The saved run continues from there (settings from run.json; a smaller --max-steps ends it sooner).
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--max-steps", str(step + 2), "--data", str(data), *SMALL_RUN,
                 "--sample-tokens", "0", "--eval-windows", "4"]) == 0
    assert f"resumed {out} at step {step}" in capsys.readouterr().out
    assert sorted(losses(out)) == list(range(1, step + 3))


def test_second_signal_aborts_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with StopOnSignal(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # recorded, nothing raised: the step goes on
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs before this returns
    assert signal.getsignal(signal.SIGINT) is previous


def train_args(data: Path, out: Path, max_steps: int, *extra: str) -> list[str]:
    return ["train", *SMALL_RUN, "--max-steps", str(max_steps), "--lr", "1e-2", "--warmup-steps", "2",
            "--data", str(data), "--out", str(out), "--sample-tokens", "0", "--eval-windows", "4", *extra]


@pytest.mark.parametrize("damage", ["truncated-trainer-state", "truncated-weights", "missing-weights"])
def test_resume_skips_a_damaged_checkpoint(tmp_path, capsys, damage):
    data, out = write_corpus(tmp_path / "data", seed=7), tmp_path / "run"
    args = train_args(data, out, 6, "--checkpoint-every", "2", "--keep-checkpoints", "3")
    assert main(args) == 0
    first = losses(out)
    newest = out / "checkpoint-0000006"
    if damage == "missing-weights":
        (newest / "model.safetensors").unlink()
    else:
        name = TRAINER_STATE if damage == "truncated-trainer-state" else "model.safetensors"
        blob = (newest / name).read_bytes()
        (newest / name).write_bytes(blob[: len(blob) // 2])
    capsys.readouterr()
    assert main(args) == 0
    text = capsys.readouterr().out
    reason = "trainer_state.pt does not load" if "state" in damage else "model.safetensors is not readable"
    assert f"skipping checkpoint-0000006: {reason}" in text, text
    assert f"resumed {out} at step 4" in text
    again = losses(out)
    assert sorted(again) == list(range(1, 7))
    assert torch.allclose(torch.tensor([again[5], again[6]]), torch.tensor([first[5], first[6]]), rtol=1e-6,
                          atol=0), "steps 5-6 retrained from checkpoint 4 on the same curve"
    assert verify_checkpoint(newest) is None, "the rewritten step-6 checkpoint replaced the damaged one"


def test_a_finished_run_trains_further_at_the_floor(tmp_path, capsys):
    data, out = write_corpus(tmp_path / "data", seed=8), tmp_path / "run"
    assert main(train_args(data, out, 4, "--checkpoint-every", "1")) == 0
    assert [s for s, _ in list_checkpoints(out)] == [3, 4]
    capsys.readouterr()
    assert main(train_args(data, out, 7, "--checkpoint-every", "1", "--keep-checkpoints", "3")) == 0
    text = capsys.readouterr().out
    assert "trained steps 5..7" in text and "now 7: the learning rate goes from 0.1 x peak" in text, text
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 8))
    assert [r["lr"] for r in records[4:]] == pytest.approx([1e-3] * 3), "the finished run stays at the floor"
    assert [s for s, _ in list_checkpoints(out)] == [5, 6, 7]
    # `--out` alone now resumes the 7-step run: nothing left to do.
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--data", str(data), "--sample-tokens", "0", "--no-progress",
                 "--eval-windows", "4"]) == 0
    assert "already trained to step 7 (of 7)" in capsys.readouterr().out
