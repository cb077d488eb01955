"""Picklable engine factories for ``EngineProcess`` tests: the spawned child imports this module and calls one.

torch is imported inside the factories that need it, so a child running ``raising_factory`` starts in a fraction
of a second (``kimi_linear.serve.engine_process`` does not import it either).
"""

from __future__ import annotations

import os


def tiny_engine(seed: int, config):
    """An ``Engine`` with ``config`` over ``make_model(seed)`` (the same weights as in the parent), one torch
    thread."""
    import torch

    from kimi_linear.serve.engine import Engine
    from tests.test_model import make_model

    torch.set_num_threads(1)
    return Engine(make_model(seed=seed), config)


def failing_step_engine(seed: int, config):
    """``tiny_engine`` whose step raises RuntimeError once while a request whose id starts with "boom" runs."""
    engine = tiny_engine(seed, config)
    step, failed = engine.step, []

    def flaky_step():
        if not failed and any(s.request_id.startswith("boom") for s in engine.running):
            failed.append(True)
            raise RuntimeError("scripted step failure")
        return step()

    engine.step = flaky_step
    return engine


class UnpicklableError(ValueError):
    """An exception whose constructor arguments do not round-trip through pickle."""

    def __init__(self, what: str, code: int):
        super().__init__(f"{what} (code {code})")


def raising_factory(kind: str):
    if kind == "unpicklable":
        raise UnpicklableError("a custom start-up error", 7)
    if kind == "exit":
        os._exit(3)
    raise AssertionError(kind)


class SlowStepEngine:
    """A stand-in engine (no torch) whose every step sleeps ``step_s`` and finishes each request it holds with
    "length": the child is inside a step most of the time, as under load. Records what it was told, in order."""

    def __init__(self, step_s: float):
        from kimi_linear.config import KimiLinearConfig

        self.model_config = KimiLinearConfig.from_preset("debug")
        self.step_s = step_s
        self.requests: list[str] = []
        self.log: list[tuple[str, str, int]] = []  # ("add" | "abort", request id, prompt length)

    def add_request(self, request_id, prompt_ids, params):
        self.log.append(("add", request_id, len(prompt_ids)))
        self.requests.append(request_id)

    def abort(self, request_id):
        self.log.append(("abort", request_id, 0))

    def has_unfinished(self):
        return True  # keeps stepping, so it reads the pipe only between steps

    def step(self):
        import time

        from kimi_linear.serve.engine import TokenEvent

        time.sleep(self.step_s)
        done, self.requests = self.requests, []
        events = [TokenEvent(rid, 1, True, "length") for rid in done]
        if any(rid == "report" for rid in done):  # tell the parent what arrived, in order
            events.append(TokenEvent(repr(self.log), None, True, "log"))
        return events

    def stats(self):
        from kimi_linear.serve.engine import EngineStats

        return EngineStats(0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0)


def slow_step_engine(step_s: float):
    return SlowStepEngine(step_s)
