"""Synthetic tasks: generator semantics checked by independent decoders, determinism, bad input, and
training."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.train.synthetic import (
    IGNORE_INDEX,
    NUM_STACKS,
    TASKS,
    SynthConfig,
    make_task,
    mqar,
    palindrome,
    stack,
    train_synthetic,
)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("T", [64, 257, 2048], ids=lambda t: f"T{t}")
def test_answers_are_the_next_token_and_shapes_match(task, T):
    ids, targets = make_task(task, 5, T, seed=3)
    assert ids.shape == targets.shape == (5, T) and ids.dtype == targets.dtype == torch.int64
    answer = targets != IGNORE_INDEX
    assert answer.any(dim=1).all(), "every row needs answers"
    assert not answer[:, -1].any()
    pos = answer.nonzero()
    assert torch.equal(targets[pos[:, 0], pos[:, 1]], ids[pos[:, 0], pos[:, 1] + 1])


@pytest.mark.parametrize("task", TASKS)
def test_seeded_and_deterministic(task):
    a, b, c = (make_task(task, 4, 128, seed=s) for s in (7, 7, 8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mqar_queries_ask_for_the_stored_values():
    P, V, T = 12, 64, 100
    ids, targets = mqar(6, T, vocab_size=V, num_kv_pairs=P, seed=1)
    for row, tgt in zip(ids.tolist(), targets.tolist(), strict=True):
        keys, values = row[0 : 2 * P : 2], row[1 : 2 * P : 2]
        assert len(set(keys)) == P and all(1 <= k < V // 2 for k in keys)
        assert all(V // 2 <= v < V for v in values)
        store = dict(zip(keys, values, strict=True))
        asked = [(row[t], tgt[t]) for t in range(T) if tgt[t] != IGNORE_INDEX]
        assert sorted(k for k, _ in asked) == sorted(keys), "each key is queried exactly once"
        assert all(store[k] == v for k, v in asked)
        assert all(t >= 2 * P for t in range(T) if tgt[t] != IGNORE_INDEX)
        filler = [
            row[t]
            for t in range(2 * P, T)
            if tgt[t] == IGNORE_INDEX and (t == 0 or tgt[t - 1] == IGNORE_INDEX)
        ]
        assert set(filler) <= {0}


def test_mqar_default_pairs_scale_with_length():
    for T in (256, 1024):
        _, targets = mqar(2, T, seed=0)
        assert ((targets != IGNORE_INDEX).sum(dim=1) == T // 32).all()


def test_palindrome_answers_are_the_sequence_reversed():
    T = 41
    ids, targets = palindrome(4, T, vocab_size=10, seed=2)
    L = (T - 1) // 2
    for row, tgt in zip(ids.tolist(), targets.tolist(), strict=True):
        content = row[:L]
        assert row[L] == 1 and all(2 <= x < 10 for x in content)
        answers = [x for x in tgt if x != IGNORE_INDEX]
        assert answers == content[::-1]


def test_stack_answers_follow_last_in_first_out():
    V, T = 200, 600
    ids, targets = stack(4, T, vocab_size=V, seed=5)
    for row, tgt in zip(ids.tolist(), targets.tolist(), strict=True):
        stacks = {s: [] for s in range(NUM_STACKS)}
        pops = 0
        for t in range(0, T - 1, 2):
            op, value = row[t], row[t + 1]
            if 1 <= op <= NUM_STACKS:
                stacks[op - 1].append(value)
                assert tgt[t] == IGNORE_INDEX
            else:
                s = op - 1 - NUM_STACKS
                assert 0 <= s < NUM_STACKS and stacks[s], "pop of an empty stack"
                assert tgt[t] == value == stacks[s].pop()
                pops += 1
            assert tgt[t + 1] == IGNORE_INDEX
        assert pops > T // 8
        used = {row[t] - 1 for t in range(0, T - 1, 2) if row[t] <= NUM_STACKS}
        assert len(used) > NUM_STACKS // 2, "the program should spread over many stacks"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mqar(2, 60, num_kv_pairs=16), "too short"),
        (lambda: mqar(2, 1024, vocab_size=64, num_kv_pairs=64), "keys"),
        (lambda: mqar(0, 64), "num_examples"),
        (lambda: palindrome(2, 2), "seq_len"),
        (lambda: stack(2, 64, vocab_size=100), "vocab_size"),
        (lambda: stack(2, 64, push_prob=1.0), "push_prob"),
        (lambda: make_task("copy", 2, 64), "unknown task"),
        (lambda: make_task("stack", 2, 64, num_kv_pairs=4), "mqar only"),
    ],
)
def test_bad_sizes_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(task="copy"), "task"),
        (dict(mixer="rwkv"), "mixer"),
        (dict(steps=0), "steps"),
        (dict(lr=0.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(seq_len=3, task="mqar"), "too short"),
        (dict(stop_at=1.5), "stop_at"),
        (dict(device="gpu0"), "device"),
    ],
)
def test_bad_run_config_raises(change, match):
    with pytest.raises(ValueError, match=match):
        train_synthetic(SynthConfig(**change), log=None)


def tiny_run(**change) -> SynthConfig:
    """A model of 2 layers, 2 heads of dim 16 on 32-token MQAR with 2 pairs: seconds on a CPU."""
    base = dict(
        task="mqar",
        mixer="kda",
        seq_len=32,
        num_kv_pairs=2,
        vocab_size=32,
        steps=3,
        lr=3e-3,
        batch_size=16,
        eval_every=100,
        eval_examples=32,
        head_dim=16,
        seed=0,
    )
    return SynthConfig(**(base | change))


@pytest.mark.parametrize("mixer", ["kda", "gdn", "mamba2", "attention"])
def test_each_mixer_builds_the_paper_model_and_trains(mixer):
    from kimi_linear.train.synthetic import build_model

    model = build_model(mixer, vocab_size=32, seq_len=32, head_dim=16)
    types = [layer.layer_type for layer in model.model.layers]
    assert types == [{"attention": "mla"}.get(mixer, mixer)] * 2
    assert not any(layer.is_moe for layer in model.model.layers)
    result = train_synthetic(tiny_run(mixer=mixer), log=None)
    assert result.steps_run == 3 and len(result.curve) == 1
    assert 0.0 <= result.accuracy <= 1.0
    assert result.curve[0]["train_loss"] == pytest.approx(result.curve[0]["train_loss"])  # finite, not NaN


def test_same_seed_reproduces_the_run():
    a, b = (train_synthetic(tiny_run(steps=2, eval_every=1, eval_examples=16), log=None) for _ in range(2))
    assert [c["train_loss"] for c in a.curve] == [c["train_loss"] for c in b.curve]
    assert [c["eval_loss"] for c in a.curve] == [c["eval_loss"] for c in b.curve]


def test_kda_learns_associative_recall():
    """Chance is 1/16 (values are half of a 32-token vocabulary); 60 steps of KDA take it well above
    (~0.6)."""
    result = train_synthetic(tiny_run(steps=60, eval_every=30, batch_size=64, lr=5e-3, stop_at=0.9), log=None)
    assert result.best_accuracy >= 0.4, result.curve


def test_cli_reports_accuracy_and_rejects_bad_arguments(capsys, tmp_path):
    from kimi_linear.cli import main

    out = tmp_path / "r.json"
    argv = [
        "synth",
        "--task",
        "stack",
        "--mixer",
        "mamba2",
        "--seq-len",
        "40",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--head-dim",
        "16",
        "--eval-examples",
        "8",
        "--vocab-size",
        "140",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    assert "answer accuracy" in capsys.readouterr().out
    import json

    assert json.loads(out.read_text())["config"]["task"] == "stack"
    assert main(["synth", "--seq-len", "-5"]) == 2
    assert "seq_len must be a positive int" in capsys.readouterr().err


def test_time_cap_stops_after_the_first_timed_step_and_evaluates():
    result = train_synthetic(tiny_run(mixer="mamba2", steps=50, max_seconds=1e-6), log=None)
    assert result.steps_run == 2 and [c["step"] for c in result.curve] == [2]
    assert result.first_step_seconds > 0
