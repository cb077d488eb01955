"""The trainer on a stand-in model: optimizer groups, schedule, accumulation, MoE balancing, resume."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch

from kimi_linear.train import checkpointing
from kimi_linear.train.checkpointing import TMP_PREFIX, TRAINER_STATE, list_checkpoints, verify_checkpoint
from kimi_linear.train.data import PackedBatches
from kimi_linear.train.trainer import LRSchedule, TrainConfig, Trainer, param_groups, warmup_cosine
from tests.train.toy import ToyLM

BOS = 256


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread is faster, and immune to a busy machine's oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_stream(n: int, seed: int) -> torch.Tensor:
    """Random byte tokens with a BOS starting a document every 20-60 tokens."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (n,), generator=gen, dtype=torch.int16)
    pos = 0
    while pos < n:
        tokens[pos] = BOS
        pos += int(torch.randint(20, 60, (1,), generator=gen))
    return tokens


def make_model(seed: int) -> ToyLM:
    torch.manual_seed(seed)
    return ToyLM()


def test_param_groups_exempt_gates_norms_and_biases():
    model = ToyLM()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {"A_log", "mix.bias", "norm.weight", "norm.bias"}
    assert {names[id(p)] for p in decay["params"]} == {"embed.weight", "mix.weight", "moe.router.weight",
                                                       "moe.experts", "head.weight"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_warmup_cosine_shape():
    f = warmup_cosine(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("lr", float("nan")), ("max_steps", 0),
                                         ("grad_accum", 0), ("warmup_steps", 500), ("weight_decay", -0.1),
                                         ("beta2", 1.0), ("dtype", "float16"), ("grad_clip", -1.0),
                                         ("activation_checkpointing", "attention")])
def test_config_out_of_range_raises(field, value):
    config = TrainConfig(max_steps=100, warmup_steps=10)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=field):
        config.validate()


def run_steps(model, tokens, *, steps, grad_accum=1, batch_size=8, seq_len=32, out_dir=None, **cfg):
    config = TrainConfig(max_steps=steps, lr=1e-2, warmup_steps=2, grad_accum=grad_accum, **cfg)
    batches = PackedBatches(tokens, seq_len, batch_size, seed=3, grad_accum=grad_accum)
    trainer = Trainer(model, config, out_dir=out_dir, progress=False)
    return trainer, trainer.fit(batches)


def test_accumulation_matches_one_big_batch():
    tokens = random_stream(4000, seed=1)
    _, one = run_steps(make_model(0), tokens, steps=4, grad_accum=1)
    _, four = run_steps(make_model(0), tokens, steps=4, grad_accum=4)
    assert torch.allclose(torch.tensor(one["losses"]), torch.tensor(four["losses"]), rtol=1e-6, atol=0)
    assert one["losses"][-1] < one["losses"][0]


def test_moe_bias_moves_toward_balance():
    tokens = random_stream(4000, seed=2)
    model = make_model(0)
    with torch.no_grad():  # route (almost) every token to expert 0
        model.moe.router.weight.zero_()
        model.moe.e_score_correction_bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0]))
    trainer, summary = run_steps(model, tokens, steps=3, bias_update_rate=0.01)
    bias = model.moe.e_score_correction_bias
    assert model.moe.updates == 3
    assert bias[0] < 0.5 and (bias[1:] > 0).all(), bias


class Killed(Exception):
    pass


def test_resume_after_kill_follows_the_same_losses(tmp_path):
    tokens = random_stream(6000, seed=4)
    _, full = run_steps(make_model(0), tokens, steps=7, checkpoint_every=3)

    def kill_at_5(step, stats):
        if step == 5:
            raise Killed

    config = TrainConfig(max_steps=7, lr=1e-2, warmup_steps=2, checkpoint_every=3)
    trainer = Trainer(make_model(0), config, out_dir=tmp_path, progress=False)
    with pytest.raises(Killed):
        trainer.fit(PackedBatches(tokens, 32, 8, seed=3), on_step=kill_at_5)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    (tmp_path / (TMP_PREFIX + "half")).mkdir()  # the remains of a write cut short: ignored, then cleaned

    # A fresh process: other initial weights and RNG state, a data stream at its start.
    torch.manual_seed(123)
    resumed = Trainer(make_model(99), config, out_dir=tmp_path, progress=False)
    summary = resumed.fit(PackedBatches(tokens, 32, 8, seed=3))
    assert summary["start_step"] == 3
    got, want = torch.tensor(summary["losses"]), torch.tensor(full["losses"][3:])
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 7]
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8)), "metrics must follow the resumed run without duplicated steps"


def test_resume_refuses_a_different_run(tmp_path):
    tokens = random_stream(3000, seed=5)
    config = TrainConfig(max_steps=2, lr=1e-2, warmup_steps=1)
    Trainer(make_model(0), config, out_dir=tmp_path, run_info={"seq_len": 32}, progress=False).fit(
        PackedBatches(tokens, 32, 8))
    other = Trainer(make_model(0), config, out_dir=tmp_path, run_info={"seq_len": 64}, progress=False)
    with pytest.raises(ValueError, match="seq_len: 32 -> 64"):
        other.fit(PackedBatches(tokens, 32, 8))


def test_activation_checkpointing_needs_a_model_that_takes_it():
    with pytest.raises(ValueError, match="set_activation_checkpointing"):
        Trainer(ToyLM(), TrainConfig(max_steps=2, warmup_steps=1, activation_checkpointing="moe"), progress=False)
    Trainer(ToyLM(), TrainConfig(max_steps=2, warmup_steps=1, activation_checkpointing="none"), progress=False)


def test_step_without_labels_raises():
    model = make_model(0)
    trainer = Trainer(model, TrainConfig(max_steps=1, warmup_steps=0), progress=False)
    ids = torch.randint(0, 256, (1, 16))
    with pytest.raises(ValueError, match="no labelled tokens"):
        trainer.train_step([{"input_ids": ids, "labels": torch.full_like(ids, -100)}])


def test_a_kill_while_pruning_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """The process dies inside the deletion of an old checkpoint (one file gone, then killed)."""
    tokens = random_stream(4000, seed=6)
    config = TrainConfig(max_steps=3, lr=1e-2, warmup_steps=1, checkpoint_every=1, keep_checkpoints=2)

    def die_while_deleting(path, ignore_errors=False):
        victim = next(p for p in sorted(Path(path).rglob("*")) if p.is_file() and p.name == TRAINER_STATE)
        victim.unlink()
        raise Killed

    def arm(step, stats):
        if step == 3:  # checkpoints 1 and 2 exist; saving 3 prunes 1
            monkeypatch.setattr(checkpointing.shutil, "rmtree", die_while_deleting)

    trainer = Trainer(make_model(0), config, out_dir=tmp_path, progress=False)
    with pytest.raises(Killed):
        trainer.fit(PackedBatches(tokens, 32, 8, seed=3), on_step=arm)
    monkeypatch.undo()
    partial = [p.name for p in tmp_path.glob("checkpoint-*") if verify_checkpoint(p) is not None]
    assert partial == [], f"half-deleted checkpoints left under their own name: {partial}"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]

    config = TrainConfig(max_steps=4, lr=1e-2, warmup_steps=1, checkpoint_every=1, keep_checkpoints=2)
    resumed = Trainer(make_model(1), config, out_dir=tmp_path, progress=False)
    assert resumed.fit(PackedBatches(tokens, 32, 8, seed=3))["start_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-0000003",
                                                                        "checkpoint-0000004"]


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        trainer = Trainer(make_model(0), TrainConfig(max_steps=1, warmup_steps=0), out_dir=tmp_path,
                          progress=False)
        trainer.fit(PackedBatches(random_stream(3000, seed=7), 32, 8))
    finally:
        os.umask(old)
    ckpt = tmp_path / "checkpoint-0000001"
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in ckpt.iterdir()} == {0o644}


def test_schedule_extension_is_continuous_and_ends_at_the_floor():
    base = LRSchedule.warmup_cosine(warmup_steps=5, max_steps=50, min_lr_ratio=0.1)
    for step, new_max in [(20, 100), (20, 30), (50, 80), (3, 60)]:
        longer = base.extended_to(new_max, step)
        assert [longer(s) for s in range(step + 1)] == [base(s) for s in range(step + 1)], "the past is kept"
        assert longer(max(step, 5)) == pytest.approx(base(max(step, 5)))
        after = [longer(s) for s in range(max(step, 5), new_max + 3)]
        assert all(a >= b for a, b in zip(after, after[1:])), "no jump up: it only decays"
        assert longer(new_max) == pytest.approx(0.1) and longer(new_max + 2) == pytest.approx(0.1)
    assert base.extended_to(50, 20) is base
    finished = base.extended_to(80, 50)
    assert [finished(s) for s in range(50, 80)] == pytest.approx([0.1] * 30), "a finished run: at the floor"
    twice = base.extended_to(100, 20).extended_to(200, 60)
    assert LRSchedule.from_dict(twice.to_dict()) == twice


def test_resume_with_more_steps_continues_the_schedule(tmp_path):
    """Stopped at step 3 of 6, resumed to 12: the learning rate goes on from where it was to the floor."""
    tokens = random_stream(6000, seed=8)

    def kill_at_4(step, stats):
        if step == 4:
            raise Killed

    config = TrainConfig(max_steps=6, lr=1e-2, warmup_steps=2, checkpoint_every=3)
    first = Trainer(make_model(0), config, out_dir=tmp_path, progress=False)
    with pytest.raises(Killed):
        first.fit(PackedBatches(tokens, 32, 8, seed=3), on_step=kill_at_4)
    lrs = {}
    longer = TrainConfig(max_steps=12, lr=1e-2, warmup_steps=2, checkpoint_every=3)
    resumed = Trainer(make_model(0), longer, out_dir=tmp_path, progress=False)
    summary = resumed.fit(PackedBatches(tokens, 32, 8, seed=3),
                          on_step=lambda step, stats: lrs.update({step: stats["lr"]}))
    assert summary["start_step"] == 3 and sorted(lrs) == list(range(4, 13))
    planned = warmup_cosine(2, 6, 0.1)
    assert lrs[4] == pytest.approx(1e-2 * planned(3)), "step 4 keeps the rate the 6-step plan gave it"
    values = [lrs[s] for s in range(4, 13)]
    assert all(a > b for a, b in zip(values, values[1:-1])) and values[-1] > 1e-3
    assert resumed.schedule(12) == pytest.approx(0.1)


def test_adamw_runs_the_multi_tensor_kernel_on_the_cpu():
    trainer = Trainer(ToyLM(), TrainConfig(max_steps=2, warmup_steps=1), progress=False)
    assert all(g["foreach"] and not g.get("fused") for g in trainer.optimizer.param_groups)


def test_deferred_statistics_are_the_synchronous_ones():
    """train_step(sync=False) queues its statistics; read_stats() returns them for all steps at once, equal to
    what sync=True returns step by step, and fit with a longer log interval writes every step alike."""
    tokens = random_stream(3000, seed=4)
    runs = []
    for sync in (True, False):
        trainer = Trainer(make_model(0), TrainConfig(max_steps=5, lr=1e-2, warmup_steps=2), progress=False)
        batches = PackedBatches(tokens, 32, 8, seed=3)
        got = [trainer.train_step(batches.next_step(), sync=sync) for _ in range(5)]
        if not sync:
            assert got == [{}] * 5 and trainer.tokens_seen == 0
            got = [stats for _, stats in trainer.read_stats()]
            assert trainer.read_stats() == []
        runs.append((got, trainer.tokens_seen))
    (eager, eager_tokens), (deferred, deferred_tokens) = runs
    assert deferred == eager and deferred_tokens == eager_tokens == 5 * 8 * 32
    assert set(eager[0]) == {"loss", "grad_norm", "lr", "tokens", "expert_load_max_over_mean"}
    assert all(isinstance(v, float) for s in eager for v in (s["loss"], s["grad_norm"], s["lr"]))


def test_fit_reads_every_few_steps_and_logs_every_step(tmp_path):
    tokens = random_stream(3000, seed=5)
    _, every = run_steps(make_model(0), tokens, steps=7, out_dir=tmp_path / "a")
    _, fourth = run_steps(make_model(0), tokens, steps=7, out_dir=tmp_path / "b", log_every=4)
    assert fourth["losses"] == every["losses"] and len(every["losses"]) == 7
    for run in ("a", "b"):
        lines = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines if "loss" in r] == list(range(1, 8))
        assert lines[-1]["tokens_seen"] == 7 * 8 * 32


def test_resume_into_the_fused_kernel_continues_the_run(tmp_path, monkeypatch):
    """A checkpoint written by the multi-tensor AdamW resumes in the fused one (the CUDA choice, here on the
    CPU): the group settings and step counters are this run's, and the losses continue as without the stop."""
    tokens = random_stream(3000, seed=6)
    _, straight = run_steps(make_model(0), tokens, steps=4)
    run_steps(make_model(0), tokens, steps=2, out_dir=tmp_path)
    monkeypatch.setattr(Trainer, "_adamw_kernel", lambda self: {"fused": True})
    trainer, resumed = run_steps(make_model(0), tokens, steps=4, out_dir=tmp_path)
    assert resumed["start_step"] == 2
    assert all(g["fused"] and not g["foreach"] for g in trainer.optimizer.param_groups)
    steps = [s["step"] for s in trainer.optimizer.state.values()]
    assert all(s.dtype == torch.float32 and float(s) == 4 for s in steps)
    assert resumed["losses"] == pytest.approx(straight["losses"][2:], rel=1e-6)


class NoSyncLM(torch.nn.Module):
    """A model whose forward never waits for the device (no data-dependent shapes), to test the trainer alone."""

    def __init__(self, vocab_size: int = 259, dim: int = 32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab_size, bias=False)

    def forward(self, input_ids, cu_seqlens=None):
        return self.head(torch.tanh(self.mix(self.embed(input_ids))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_step_never_waits_for_the_device():
    torch.manual_seed(0)
    from kimi_linear.train.distributed import DistContext

    model = NoSyncLM().cuda()
    trainer = Trainer(model, TrainConfig(max_steps=10, warmup_steps=1), ctx=DistContext(device=torch.device("cuda")),
                      progress=False)
    assert all(g["fused"] for g in trainer.optimizer.param_groups)
    batches = PackedBatches(random_stream(3000, seed=7), 32, 8, seed=3)
    trainer.train_step(batches.next_step())  # warm-up: kernels, pinned host buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.train_step(batches.next_step(), sync=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [s for s, _ in trainer.read_stats()] == [2, 3, 4]
