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
