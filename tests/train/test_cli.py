"""`kimi-linear train` end to end on the debug preset: results, checkpoint, SIGKILL + resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kimi_linear.cli import main
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.train.checkpointing import list_checkpoints

REPO = Path(__file__).resolve().parents[2]
SMALL_RUN = ["--preset", "debug", "--seq-len", "32", "--batch-size", "4", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread is faster, and immune to a busy machine's oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_corpus(folder: Path, seed: int) -> Path:
    """A folder of small Python-like text files, random but with enough structure to learn from."""
    gen = torch.Generator().manual_seed(seed)
    names = ["alpha", "beta", "gamma", "delta", "value", "items"]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        lines = []
        for _ in range(int(torch.randint(3, 12, (1,), generator=gen))):
            a, b = (names[int(j)] for j in torch.randint(0, len(names), (2,), generator=gen))
            number = int(torch.randint(0, 99, (1,), generator=gen))
            lines.append(f"def {a}_{i}({b}):\n    return {b} + {number}\n")
        (folder / f"file_{i}.py").write_text("\n".join(lines))
    return folder


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_train_end_to_end(tmp_path, capsys):
    data, out = write_corpus(tmp_path / "data", seed=0), tmp_path / "run"
    args = ["train", *SMALL_RUN, "--max-steps", "12", "--lr", "1e-2", "--warmup-steps", "2",
            "--data", str(data), "--out", str(out), "--checkpoint-every", "5", "--eval-every", "6",
            "--sample-tokens", "8"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "unigram baseline" in text and "sample (temperature 0.8)" in text
    val = float(text.split("validation loss ")[-1].split()[0])
    unigram = float(text.split("unigram baseline ")[1].split()[0])
    assert val < unigram, (val, unigram)  # learned more than byte frequencies, on held-out files
    assert [s for s, _ in list_checkpoints(out)] == [10, 12]
    ckpt = out / "checkpoint-0000012"
    assert (ckpt / "config.json").is_file() and (out / "loss_curve.png").stat().st_size > 1000
    assert sorted(losses(out)) == list(range(1, 13))
    model = KimiLinearForCausalLM.from_pretrained(ckpt)
    assert model.config.vocab_size == 259
    capsys.readouterr()
    assert main(["info", "debug", "--json"]) == 0
    assert model.config.layer_types == json.loads(capsys.readouterr().out)["layer_types"], "what info shows"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(f.stat().st_mode) for f in ckpt.iterdir()} == {0o666 & ~umask}, "others may read it"
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "def ", "--max-new-tokens", "4"]) == 0

    # The same command again: the run is complete, nothing retrains.
    capsys.readouterr()
    assert main(args) == 0
    assert "already trained to step 12" in capsys.readouterr().out
    # Another setting on the same --out is refused before anything is written.
    assert main([*args[:-8], "--seq-len", "16", "--out", str(out)]) == 2
    assert "holds a different run" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(out)] == [10, 12]


def run_module(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "kimi_linear.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_then_resume_gives_the_same_losses(tmp_path):
    data = write_corpus(tmp_path / "data", seed=1)
    common = [*SMALL_RUN, "--max-steps", "10", "--lr", "1e-2", "--warmup-steps", "2", "--data", str(data),
              "--checkpoint-every", "2", "--sample-tokens", "0"]
    reference = tmp_path / "reference"
    assert main(["train", *common, "--out", str(reference)]) == 0

    out = tmp_path / "killed"
    proc = run_module([*common, "--out", str(out)])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(losses(out)) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert list_checkpoints(out), "no checkpoint before the kill"

    resumed = run_module([*common, "--out", str(out)])
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert "resumed" in log
    got, want = losses(out), losses(reference)
    assert sorted(got) == list(range(1, 11))
    got, want = (torch.tensor([d[s] for s in range(1, 11)]) for d in (got, want))
    assert torch.allclose(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case,flags,message", [
    ("seq_len_over_limit", ["--seq-len", "5000"], "over the model's limit"),
    ("lr_out_of_range", ["--lr", "-1"], "lr must be in"),
    ("warmup_out_of_range", ["--warmup-steps", "-3"], "warmup_steps must be in"),
    ("zero_steps", ["--max-steps", "0"], "--max-steps must be >= 1"),
    ("zero_threads", ["--threads", "0"], "--threads must be >= 1"),
    ("missing_data", ["--data", "{tmp}/nowhere"], "does not exist"),
    ("empty_corpus", ["--data", "{tmp}/empty"], "empty corpus"),
    ("batch_not_divisible", ["--batch-size", "3", "--grad-accum", "2"], "multiple of processes"),
    ("release_preset", ["--preset", "48b-a3b"], "byte-level tokens"),
    ("unknown_preset", ["--preset", "huge"], "unknown preset"),
    ("zero_log_every", ["--log-every", "0"], "log_every must be >= 1"),
    ("unknown_checkpointing", ["--activation-checkpointing", "mla,attention"], "unknown part(s) ['attention']"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys, case, flags, message):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert main(["train", *SMALL_RUN, "--max-steps", "2", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("kimi-linear train: error:"), err
    assert not out.exists()


@pytest.mark.parametrize("mixer,expected,recompute", [("gdn", {"gdn", "mla"}, "gdn,moe"), ("mla", {"mla"}, "full")])
def test_baseline_mixers_train_and_save(tmp_path, capsys, mixer, expected, recompute):
    data, out = write_corpus(tmp_path / "data", seed=3), tmp_path / "run"
    assert main(["train", *SMALL_RUN, "--max-steps", "2", "--mixer", mixer, "--data", str(data),
                 "--out", str(out), "--sample-tokens", "0", "--activation-checkpointing", recompute]) == 0
    model = KimiLinearForCausalLM.from_pretrained(out / "checkpoint-0000002")
    assert set(model.config.layer_types) == expected
    if mixer == "gdn":  # the debug preset's layout, its linear layers as GDN
        assert model.config.layer_types == ["gdn", "mla", "gdn", "mla"]


def test_cli_choices_follow_the_trainer():
    from kimi_linear.cli.train import DTYPE_CHOICES
    from kimi_linear.train.trainer import AUTOCAST_DTYPES

    assert DTYPE_CHOICES == AUTOCAST_DTYPES
