"""The benchmark runner: ``python -m benchmarks --help`` lists every suite, and a CPU suite runs end to end at a tiny
size through it (JSON with the environment record, the table printed last)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.__main__ import SUITES

ROOT = Path(__file__).resolve().parents[1]


def run_benchmarks(*argv: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "benchmarks", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def test_help_lists_every_suite_module():
    p = run_benchmarks("--help")
    assert p.returncode == 0, p.stderr
    listed = [line.split()[0] for line in p.stdout.split("suites:\n", 1)[1].splitlines() if line.strip()]
    modules = sorted(f.stem for f in (ROOT / "benchmarks").glob("*.py")
                     if f.stem not in ("__init__", "__main__", "common"))
    assert listed == list(SUITES)
    assert sorted(listed) == modules  # every suite module is reachable, nothing listed is missing


def test_unknown_suite_is_refused():
    p = run_benchmarks("no_such_suite")
    assert p.returncode == 2
    assert "unknown suite 'no_such_suite'" in p.stderr


def test_cpu_suite_runs_at_a_tiny_size(tmp_path):
    p = run_benchmarks("kda_cpu", "--out", str(tmp_path), "--seq-len", "48", "--heads", "2", "--head-dim", "16",
                       "--repeats", "1", "--threads", "1")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads((tmp_path / "kda_cpu.json").read_text())
    assert doc["command"] == (f"python -m benchmarks kda_cpu --out {tmp_path} --seq-len 48 --heads 2 --head-dim 16 "
                              "--repeats 1 --threads 1")
    assert doc["torch"] == __import__("torch").__version__ and doc["date"].endswith("UTC")
    assert doc["shape"] == {"B": 1, "T": 48, "H": 2, "K": 16, "V": 16}
    times = doc["fwd_bwd_ms"]
    assert set(times) == {"kimi-linear chunk_kda (torch path)", "recurrent reference (paper Eq. 1)"}
    assert all(t > 0 for t in times.values())
    last = p.stdout.strip().splitlines()[-1]  # the table comes last
    assert last.startswith("| recurrent reference (paper Eq. 1)") and last.endswith("x |")


def test_kda_decode_accuracy_mode_runs_on_the_cpu(tmp_path):
    """``kda_decode --accuracy`` (bf16 vs fp32 KDA state) at a tiny size: the bf16 state's error is measured,
    nonzero (its states are really bf16) and below the whole-bf16 model's here."""
    p = run_benchmarks("kda_decode", "--accuracy", "--preset", "debug", "--steps", "12", "--rows", "2",
                       "--prompt-len", "16", "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads((tmp_path / "kda_decode_accuracy.json").read_text())
    state, model = doc["teacher_forced"]["bf16 state"], doc["teacher_forced"]["bf16 model, fp32 state"]
    assert 0 < state["logits_rel_err_mean"] < model["logits_rel_err_mean"]
    assert len(doc["free_running"]["bf16 state"]["tokens_before_divergence"]) == 2
    assert p.stdout.strip().splitlines()[-1].startswith("| bf16 model, fp32 state |")


def test_serve_http_suite_runs_at_a_tiny_size(tmp_path):
    """The HTTP-layer ceiling suite (CPU, no GPU), with the stand-in engine and the real one in its own process
    (its factory runs in the spawned child): every stream gets its tokens, and no faster than the steps."""
    p = run_benchmarks("serve_http", "--out", str(tmp_path), "--streams", "3", "--step-ms", "2",
                       "--output-len", "6", "--engine", "sleep", "process")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = json.loads((tmp_path / "serve_http.json").read_text())["rows"]
    assert [r["engine"] for r in rows] == ["sleep", "process"]
    for row in rows:
        assert row["failed"] == 0 and row["streams"] == 3 and row["runs"] == 1
        assert 0 < row["tokens_per_s"] <= row["ideal_tokens_per_s"] and row["achieved_step_ms"] > 0
    assert rows[0]["achieved_step_ms"] >= 2.0  # the stand-in emits a token only after its sleep
    assert p.stdout.strip().splitlines()[-1].startswith("| process | 3 | 2 |")


def test_kda_decode_suite_parses_builds_and_times_the_same_step(monkeypatch):
    """The decode suite imports and parses without a GPU; its offline sm_90 build of the fused layer kernel compiles
    every configuration, the release one without spills; its unfused layer step (the sequence the fused op
    replaced) computes what the fused one does."""
    import torch

    from benchmarks.kda_decode import fused_step, make_layer, unfused_step

    p = run_benchmarks("kda_decode", "--help")
    assert p.returncode == 0, p.stderr
    assert "--layer-batches" in p.stdout and "--layer-sweep" in p.stdout and "--build-report" in p.stdout
    if not torch.cuda.is_available():
        p = run_benchmarks("kda_decode", "--batches", "--layer-batches", "1")
        assert p.returncode == 1 and "needs a CUDA GPU" in p.stderr

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/ops run the interpreter; this compiles
    p = run_benchmarks("kda_decode", "--build-report")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 10 and all("regs=" in line for line in lines)
    assert lines[0].startswith("K=V=128 kda ") and "stack=    0 B" in lines[0]

    x, w, pools = make_layer(3, 2, 16, "cpu", seed=0)
    x = {n: t.float() for n, t in x.items()}
    w = {n: (tuple(f.float() for f in t) if isinstance(t, tuple) else t.float()) for n, t in w.items()}
    pools = {n: t.float() for n, t in pools.items()}
    slots = torch.arange(3)  # the dense cache the unfused step was written for: row n is slot n
    unfused_pools = {n: t.clone() for n, t in pools.items()}
    fused = fused_step(x, w, pools, slots)
    unfused = unfused_step(x, w, unfused_pools, slots)
    assert fused.shape == (3, 32) and (fused - unfused).norm() <= 1e-6 * unfused.norm()
    for name in pools:
        assert (pools[name] - unfused_pools[name]).norm() <= 1e-6 * unfused_pools[name].norm(), name


def test_environment_names_the_tree_from_git_or_the_override(monkeypatch):
    """The commit recorded with every result: ``git describe`` of the checkout, or ``$KIMI_LINEAR_COMMIT`` for a copy
    of the tree measured where its git history is absent or stale."""
    from benchmarks.common import COMMIT_ENV, environment

    monkeypatch.delenv(COMMIT_ENV, raising=False)
    described = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=9"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip() or None
    assert environment()["commit"] == described
    monkeypatch.setenv(COMMIT_ENV, "fwd-noG@151b1bf")
    assert environment()["commit"] == "fwd-noG@151b1bf"
