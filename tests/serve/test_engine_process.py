"""``EngineProcess``: the engine in a spawned child behaves as the in-process ``Engine`` (same tokens, same errors,
raised synchronously), and a child that fails to start, raises in a step, dies or is closed is reported as such.

The child builds its engine with a factory of tests/serve/engine_factories.py over ``make_model(seed)``, the same
weights the in-process reference uses here.
"""

from __future__ import annotations

import ast
import os
import signal
import time

import pytest
import torch

from kimi_linear.serve.engine import Engine, EngineConfig, QueueFullError, SamplingParams
from kimi_linear.serve.engine_process import EngineProcess
from tests.serve.engine_factories import (
    UnpicklableError,
    failing_step_engine,
    raising_factory,
    slow_step_engine,
    tiny_engine,
)
from tests.test_model import make_model

SEED = 31
GREEDY = dict(temperature=0.0, ignore_eos=True)
CONFIG = EngineConfig(max_num_seqs=3, max_model_len=320, max_num_batched_tokens=96, max_queue=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine_process():
    """One child for the tests that leave it healthy (a spawn with a model costs seconds); its step raises once
    while a request "boom..." runs."""
    with EngineProcess(failing_step_engine, (SEED, CONFIG)) as process:
        yield process


def random_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def drain(engine, timeout_s: float = 120.0) -> tuple[dict, dict]:
    """Step until nothing is left: {id: tokens}, {id: finishing event}."""
    tokens, finished = {}, {}
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "the engine did not finish"
        for e in engine.step():
            if e.token_id is not None:
                tokens.setdefault(e.request_id, []).append(e.token_id)
            if e.finished:
                finished[e.request_id] = e
    return tokens, finished


def gone(pid: int) -> bool:
    """No process (not even a zombie) has this id."""
    return not os.path.exists(f"/proc/{pid}")


def test_same_greedy_tokens_and_events_as_the_in_process_engine(engine_process):
    """7 requests of 1..290 prompt tokens through 3 slots (chunked prefill, a queue), added while earlier ones
    run: the same tokens and finishing events as the in-process engine, and the same final stats."""
    lengths, max_tokens = [1, 290, 17, 64, 130, 5, 65], [9, 4, 12, 7, 3, 10, 6]
    requests = {f"r{i}": (random_prompt(n, seed=i), SamplingParams(max_tokens=m, **GREEDY))
                for i, (n, m) in enumerate(zip(lengths, max_tokens, strict=True))}
    results = []
    for engine in (Engine(make_model(seed=SEED), CONFIG), engine_process):
        before = engine.stats()
        ids = list(requests)
        for rid in ids[:4]:
            engine.add_request(rid, *requests[rid])
        tokens, finished = {}, {}
        for _ in range(2):  # the rest join while the first ones run
            for e in engine.step():
                if e.token_id is not None:
                    tokens.setdefault(e.request_id, []).append(e.token_id)
                if e.finished:
                    finished[e.request_id] = e
        for rid in ids[4:]:
            engine.add_request(rid, *requests[rid])
        more_tokens, more_finished = drain(engine)
        for rid, t in more_tokens.items():
            tokens.setdefault(rid, []).extend(t)
        finished.update(more_finished)
        after = engine.stats()
        results.append((tokens, finished, after.generated_tokens_total - before.generated_tokens_total,
                        after.finished_requests_total - before.finished_requests_total, after.running,
                        after.free_slots))
    (tokens, finished, generated, done, running, free), process_result = results
    assert (engine_process.device, engine_process.dtype) == ("cpu", "float32")
    assert process_result[0] == tokens
    assert process_result[1] == finished
    assert process_result[2:] == (generated, done, running, free) == (sum(max_tokens), 7, 0, 3)
    assert all(len(tokens[rid]) == p.max_tokens for rid, (_, p) in requests.items())


def test_logprobs_come_through_the_process_unchanged(engine_process):
    """Every event of a request with logprobs and prompt logprobs (running ones too) equals the in-process
    engine's."""
    prompt = random_prompt(40, seed=11)
    params = SamplingParams(max_tokens=5, logprobs=2, prompt_logprobs=1, **GREEDY)
    runs = []
    for engine in (Engine(make_model(seed=SEED), CONFIG), engine_process):
        engine.add_request("lp", prompt, params)
        events = []
        while engine.has_unfinished():
            events += [e for e in engine.step() if e.token_id is not None]
        runs.append(events)
    assert len(runs[0]) == 5 and all(e.logprob is not None and len(e.top_logprobs) == 2 for e in runs[0])
    assert len(runs[0][0].prompt_logprobs) == len(prompt) - 1
    assert runs[1] == runs[0]


def test_add_request_errors_are_raised_synchronously_with_the_engine_message(engine_process):
    local = Engine(make_model(seed=SEED), CONFIG)
    params = SamplingParams(max_tokens=4, **GREEDY)
    bad = [
        ("bad-ids", [1, 2, 99999], params),
        ("float-ids", [1, 2.5], params),
        ("empty", [], params),
        ("too-long", [1] * 300, SamplingParams(max_tokens=30, **GREEDY)),
        ("bad-stop", [1, 2], SamplingParams(max_tokens=4, stop_token_ids=(100000,), **GREEDY)),
        ("", [1, 2], params),
    ]
    for rid, prompt, p in bad:
        with pytest.raises(ValueError) as want:
            local.add_request(rid, prompt, p)
        with pytest.raises(ValueError) as got:
            engine_process.add_request(rid, prompt, p)
        assert str(got.value) == str(want.value), rid
    with pytest.raises(TypeError, match="SamplingParams"):
        engine_process.add_request("no-params", [1, 2], {"max_tokens": 4})
    # a duplicate id, while the first is still running
    engine_process.add_request("dup", [1, 2, 3], SamplingParams(max_tokens=50, **GREEDY))
    with pytest.raises(ValueError, match="already in use"):
        engine_process.add_request("dup", [4, 5], params)
    engine_process.abort("dup")
    _, finished = drain(engine_process)
    assert finished["dup"].finish_reason == "abort"
    assert not engine_process.has_unfinished() and engine_process.alive


def test_queue_full_is_raised_as_queue_full_error(engine_process):
    long = SamplingParams(max_tokens=250, **GREEDY)
    running = [f"running-{i}" for i in range(CONFIG.max_num_seqs)]
    waiting = [f"waiting-{i}" for i in range(CONFIG.max_queue)]
    for rid in running:
        engine_process.add_request(rid, [1, 2, 3], long)
    while engine_process.stats().running < CONFIG.max_num_seqs:  # they hold every slot
        engine_process.step()
    for rid in waiting:
        engine_process.add_request(rid, [4], long)
    with pytest.raises(QueueFullError, match="max_queue"):
        engine_process.add_request("one-too-many", [6], long)
    for rid in running + waiting:
        engine_process.abort(rid)
    _, finished = drain(engine_process)
    assert {rid: e.finish_reason for rid, e in finished.items()} == dict.fromkeys(running + waiting, "abort")
    engine_process.add_request("after", [7], SamplingParams(max_tokens=2, **GREEDY))
    assert len(drain(engine_process)[0]["after"]) == 2


def test_a_failing_step_is_raised_by_step_and_the_engine_goes_on(engine_process):
    engine = engine_process
    engine.add_request("boom", [1, 2, 3], SamplingParams(max_tokens=20, **GREEDY))
    with pytest.raises(RuntimeError, match="scripted step failure") as raised:
        for _ in range(100):
            engine.step()
    assert any("in the engine process" in note for note in raised.value.__notes__)
    engine.abort("boom")  # what EngineLoop does with the requests in flight
    assert drain(engine)[1]["boom"].finish_reason == "abort"
    engine.add_request("fine", [1, 2, 3], SamplingParams(max_tokens=3, **GREEDY))
    assert len(drain(engine)[0]["fine"]) == 3


def test_start_up_errors_are_raised_in_the_parent():
    # The engine's memory check: the same ValueError and message as in process.
    config = EngineConfig(max_num_seqs=2, max_model_len=320, num_blocks=1)
    with pytest.raises(ValueError) as want:
        Engine(make_model(seed=SEED), config)
    with pytest.raises(ValueError) as got:
        EngineProcess(tiny_engine, (SEED, config))
    assert str(got.value) == str(want.value) and "cannot hold one sequence" in str(got.value)
    # An exception that does not pickle arrives as its nearest built-in class, named in the message.
    with pytest.raises(ValueError, match=r"UnpicklableError: a custom start-up error \(code 7\)") as custom:
        EngineProcess(raising_factory, ("unpicklable",))
    assert not isinstance(custom.value, UnpicklableError)
    with pytest.raises(RuntimeError, match="exited with code 3 before it was ready"):
        EngineProcess(raising_factory, ("exit",))


def test_close_before_ready_kills_the_starting_child():
    """``wait=False`` returns at once; a close before ``wait_ready`` (the CLI's path when the tokenizer fails) does
    not wait for the engine to load."""
    engine = EngineProcess(tiny_engine, (SEED, CONFIG), wait=False)
    pid = engine.pid
    start = time.monotonic()
    engine.close()
    assert time.monotonic() - start < 5 and gone(pid) and engine.exited.is_set()
    with pytest.raises(RuntimeError, match="closed"):
        engine.wait_ready()
    with pytest.raises(RuntimeError, match="closed"):
        engine.add_request("late", [1], SamplingParams(max_tokens=2, **GREEDY))


def test_a_killed_child_fails_step_then_every_call():
    engine = EngineProcess(tiny_engine, (SEED, CONFIG))
    pid = engine.pid
    try:
        engine.add_request("running", [1, 2, 3], SamplingParams(max_tokens=250, **GREEDY))
        assert engine.step() is not None
        os.kill(pid, signal.SIGKILL)
        assert engine.exited.wait(10)
        with pytest.raises(RuntimeError, match="engine process died"):
            for _ in range(1000):  # steps already sent come first
                engine.step()
        assert not engine.alive and "killed by signal 9" in engine.death
        assert not engine.has_unfinished()  # the loop stops stepping once the failure is out
        with pytest.raises(RuntimeError, match="engine process died"):
            engine.add_request("later", [1], SamplingParams(max_tokens=2, **GREEDY))
        with pytest.raises(RuntimeError, match="engine process died"):
            engine.step()
        engine.abort("running")  # a no-op, not an error
        assert gone(pid), "the dead child was not reaped"
    finally:
        engine.close()


def test_close_stops_the_child_mid_request_and_leaves_no_process():
    engine = EngineProcess(tiny_engine, (SEED, CONFIG))
    pid = engine.pid
    engine.add_request("running", [1, 2, 3], SamplingParams(max_tokens=250, **GREEDY))
    engine.step()
    engine.close()
    assert gone(pid) and engine.exited.is_set() and not engine.alive
    assert engine.death is None  # closed, not dead
    with pytest.raises(RuntimeError, match="closed"):
        engine.add_request("later", [1], SamplingParams(max_tokens=2, **GREEDY))
    engine.close()  # idempotent


def test_a_large_add_does_not_wait_for_the_child_and_messages_keep_their_order():
    """An add larger than the socket's buffer (300k token ids) is only read by the child between two of its
    steps (here 0.5 s long): the caller (an HTTP event loop) gets its future at once all the same, and the
    child receives adds and aborts in the order they were made."""
    from kimi_linear.serve.engine import SamplingParams as Params

    with EngineProcess(slow_step_engine, (0.5,)) as process:
        big = list(range(100_000, 130_000)) * 10  # 5-byte pickled ints: about 1.5 MB
        start = time.perf_counter()
        futures = [process.add_request_future("big", big, Params(max_tokens=1))]
        process.abort("big")
        futures.append(process.add_request_future("small", [1, 2, 3], Params(max_tokens=1)))
        elapsed = time.perf_counter() - start
        assert elapsed < 0.25, f"the caller waited {elapsed:.2f} s for the pipe"
        for f in futures:
            f.result(timeout=30)
        process.add_request("report", [1], Params(max_tokens=1))
        deadline, log = time.monotonic() + 30, None
        while log is None and time.monotonic() < deadline:
            for event in process.step():
                if event.finish_reason == "log":
                    log = ast.literal_eval(event.request_id)  # the child's repr of its log
        assert log == [("add", "big", 300_000), ("abort", "big", 0), ("add", "small", 3), ("add", "report", 1)]
