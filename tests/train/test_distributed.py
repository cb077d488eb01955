"""torchrun with two gloo processes on the CPU trains like one process on the same global batch (DDP and
FSDP2), and only rank 0 logs and checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kimi_linear.cli import main
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.train.checkpointing import list_checkpoints
from tests.train.test_cli import REPO, losses, write_corpus

RUN = ["--preset", "debug", "--seq-len", "32", "--batch-size", "4", "--max-steps", "4", "--lr", "1e-2",
       "--warmup-steps", "1", "--sample-tokens", "0", "--no-progress"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process: the corpus and the losses every multi-process run must reproduce."""
    root = tmp_path_factory.mktemp("single")
    data = write_corpus(root / "data", seed=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *RUN, "--data", str(data), "--out", str(root / "run")]) == 0
    finally:
        torch.set_num_threads(threads)
    return data, root / "run"


# FSDP2 runs with every block recomputed in backward (the layout torchtitan uses: checkpoint inside the sharded
# block): the losses must still be the single process's.
@pytest.mark.parametrize("strategy,recompute", [("ddp", "none"), ("fsdp", "full")])
def test_two_processes_match_one(tmp_path, reference, strategy, recompute):
    data, single = reference
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "kimi_linear.train", *RUN, "--data", str(data), "--out", str(out), "--strategy", strategy,
           "--activation-checkpointing", recompute]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("validation loss") == 2  # rank 0 only: the progress line and the summary
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    got, want = losses(out), losses(single)
    # Same data, same math; only the order of float32 sums differs between one and two processes.
    got, want = torch.tensor(list(got.values())), torch.tensor(list(want.values()))
    assert torch.allclose(got, want, rtol=1e-5, atol=0)
    assert [s for s, _ in list_checkpoints(out)] == [4]
    ours = KimiLinearForCausalLM.from_pretrained(out / "checkpoint-0000004").state_dict()
    theirs = KimiLinearForCausalLM.from_pretrained(single / "checkpoint-0000004").state_dict()
    for name, tensor in theirs.items():
        err = ((ours[name] - tensor).norm() / tensor.norm().clamp_min(1e-12)).item()
        assert err < 1e-4, (name, err)


def test_a_held_run_folder_stops_every_process(tmp_path, reference):
    """Rank 0 takes the lock for the whole job; when it is refused, every rank exits (none waits forever)."""
    from kimi_linear.train.runlock import RunLock

    data, _ = reference
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "kimi_linear.train", *RUN, "--data", str(data), "--out", str(out)]
    with RunLock(out):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert log.count(f"in use by another training process (pid {os.getpid()}") == 2, log[-3000:]  # each rank
    assert not (out / "metrics.jsonl").exists()
