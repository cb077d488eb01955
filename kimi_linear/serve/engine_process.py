"""The serving engine in its own process, so the HTTP process's GIL serves only HTTP (as vLLM's engine-core
process does).

An ``Engine`` stepping in a thread of the HTTP process competes with the event loop for the GIL: each of a step's
torch calls lets the GIL go and must wait to take it back, so the step's Python stretches several times over
beside a busy HTTP thread. ``python -m benchmarks serve_http --engine thread process`` compares the two
arrangements (benchmarks/RESULTS.md, Serving). ``EngineProcess`` is a transport around an ``Engine`` living in a
child process, with the interface ``serve.api.EngineLoop`` uses: ``add_request`` / ``add_request_future``,
``abort``, ``has_unfinished``, ``step``, ``stats``, ``model_config``.

The child (a multiprocessing "spawn" process: CUDA cannot be forked) builds its engine by calling a picklable
``factory(*args, **kwargs)`` (``load_engine`` for a checkpoint; tests and benchmarks pass their own), reports
readiness or the exception the factory raised, then loops: it takes every command waiting on the pipe (add, abort,
stop) without blocking while it has work, or waits for one while it has none; steps; and sends the step's events
and its ``EngineStats`` as one message. It ignores SIGINT and SIGTERM (the HTTP process drains on those and then
stops it) and exits when told to, or when the pipe closes because the HTTP process is gone (killed, too).

In the parent one reader thread owns the pipe: it completes the futures of add requests with the engine's answer
(the engine's own ValueError / TypeError / QueueFullError) and queues each step's events, which ``step()`` takes in
order. One sender thread owns the other direction: callers pickle their message and queue it, so adds, aborts and
"stop" reach the child in the order they were made, and a caller never waits for the pipe. (A message larger
than the socket's buffer, an add of a prompt of ~50k tokens or more, is only taken by the child between two of
its steps; an HTTP event loop sending it itself would stall every stream meanwhile.) If the child dies, waiting
and later calls raise RuntimeError saying so, ``step()`` raises once so the caller fails the requests in flight,
and ``exited`` is set.

Messages (tuples, first item the kind). Parent -> child: ``("add", seq, request_id, prompt_ids, params)``,
``("abort", request_id)``, ``("stop",)``. Child -> parent: ``("ready", model_config, engine_config, stats, info)`` or
``("failed", exception)`` once at start; then ``("added", [(seq, exception or None), ...])`` and
``("step", events, stats, exception or None)``, an event being a ``TokenEvent``'s fields as a tuple.
"""

from __future__ import annotations

import atexit
import builtins
import dataclasses
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: importing this module does not import torch (see EngineProcess)
    from kimi_linear.serve.engine import EngineStats, SamplingParams, TokenEvent

logger = logging.getLogger("kimi_linear.serve")

# How long the idle child waits for a command before it checks that its parent is still there.
IDLE_POLL_S = 0.5
# How long the child waits after a step that raised before it steps again (the in-thread EngineLoop's pause).
STEP_ERROR_PAUSE_S = 0.05
# How long ``step()`` waits for the next step before it returns no events (the caller loops).
STEP_WAIT_S = 0.1
# How long ``close()`` waits for the child to exit after "stop" before it kills it.
CLOSE_TIMEOUT_S = 30.0

_DIED = object()  # queued for step() when the child is gone


def load_engine(checkpoint: str, config, device: str, dtype: str, threads: int = 1):
    """The ``Engine`` of ``kimi-linear serve``: the checkpoint's model on ``device`` in ``dtype`` (a torch dtype's
    name, "bfloat16") with ``threads`` torch CPU threads. A factory for ``EngineProcess``.

    Raises:
        FileNotFoundError / ValueError: the checkpoint does not load (``KimiLinearForCausalLM.from_pretrained``).
        ValueError: ``config`` (an ``EngineConfig``) out of range or a memory budget that does not fit.
    """
    import torch

    from kimi_linear.model import KimiLinearForCausalLM
    from kimi_linear.serve.engine import Engine

    torch.set_num_threads(threads)
    model = KimiLinearForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype), device=device).eval()
    return Engine(model, config)


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else its nearest built-in class with the same message; either way
    with the child's traceback as a note (shown where a traceback is printed, not in ``str``)."""
    trace = "".join(traceback.format_exception(error)).rstrip()
    try:
        ForkingPickler.loads(ForkingPickler.dumps(error))
    except Exception:  # noqa: BLE001 - an exception class whose arguments do not round-trip
        base = next(c for c in type(error).__mro__ if getattr(builtins, c.__name__, None) is c)
        error = base(f"{type(error).__name__}: {error}")
    # BaseException.add_note, which Python 3.10 lacks
    error.__notes__ = [*getattr(error, "__notes__", ()), f"in the engine process:\n{trace}"]
    return error


def _event_tuple(event: TokenEvent) -> tuple:
    """``event``'s fields in order, as short as its content allows (most events are a running token)."""
    if not event.finished and event.logprob is None and event.prompt_logprobs is None:
        return event.request_id, event.token_id, False, event.finish_reason
    return tuple(getattr(event, f.name) for f in dataclasses.fields(event))


# ---- the child ----------------------------------------------------------------------------------------------


def _child_main(conn, factory: Callable, args: tuple, kwargs: dict) -> None:
    # The parent drains on SIGINT (a terminal's Ctrl-C reaches the whole group) and SIGTERM, then says "stop".
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    try:
        engine = factory(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", _portable(e)))
        return
    try:
        conn.send(("ready", engine.model_config, getattr(engine, "config", None), engine.stats(), _describe(engine)))
        _serve(conn, engine, parent)
    except (EOFError, OSError):  # the parent is gone
        pass


def _describe(engine) -> dict[str, str]:
    """The engine's device and dtype as text, where it has them (an ``Engine``: ``device``, ``model.dtype``)."""
    info = {}
    if getattr(engine, "device", None) is not None:
        info["device"] = str(engine.device)
    if getattr(getattr(engine, "model", None), "dtype", None) is not None:
        info["dtype"] = str(engine.model.dtype).removeprefix("torch.")
    return info


def _serve(conn, engine, parent: int) -> None:
    pause = 0.0
    while True:
        busy = engine.has_unfinished()
        waiting = conn.poll(pause if busy else IDLE_POLL_S)
        if not waiting and not busy and os.getppid() != parent:
            return  # the parent is gone but something else keeps the pipe open
        acks = []
        while waiting:
            command = conn.recv()
            kind = command[0]
            if kind == "add":
                _, seq, request_id, prompt_ids, params = command
                try:
                    engine.add_request(request_id, prompt_ids, params)
                    acks.append((seq, None))
                except Exception as e:  # noqa: BLE001 - the caller's error (ValueError, QueueFullError, ...)
                    acks.append((seq, _portable(e)))
            elif kind == "abort":
                engine.abort(command[1])
            elif kind == "stop":
                return
            waiting = conn.poll(0)
        if acks:
            conn.send(("added", acks))
        pause = 0.0
        if engine.has_unfinished():
            try:
                events = [_event_tuple(e) for e in engine.step()]
                error = None
            except Exception as e:  # noqa: BLE001 - the parent fails the requests in flight and goes on
                events, error, pause = [], _portable(e), STEP_ERROR_PAUSE_S
            conn.send(("step", events, engine.stats(), error))


# ---- the parent ---------------------------------------------------------------------------------------------


class EngineProcess:
    """An ``Engine`` in a child process, with the engine's interface (see the module docstring).

    The child is spawned, so it imports the parent's ``__main__`` module again when that is a script: a script
    that creates an ``EngineProcess`` must do so under ``if __name__ == "__main__":``. Importing this module does
    not import torch, so a parent can start the child first and import the rest while the child loads
    (``wait=False``, then ``wait_ready()``).

    Args:
        factory: a picklable callable (a module-level function) that the child calls as
            ``factory(*args, **kwargs)`` to build the engine, e.g. ``load_engine``.
        args, kwargs: its picklable arguments.
        name: the child's process name.
        wait: wait for the engine to be ready (or raise its start-up error) here. With False, call
            ``wait_ready()`` before anything else (``close()`` may come first: it kills the starting child).

    Raises (here, or from ``wait_ready`` with ``wait=False``):
        Whatever ``factory`` raised in the child (its class and message; a class that cannot be pickled becomes
        its nearest built-in base), with the child's traceback as a note. RuntimeError: the child exited before
        it reported. Pickling errors: ``factory`` or its arguments cannot be sent.
    """

    def __init__(self, factory: Callable, args: tuple = (), kwargs: dict | None = None, *,
                 name: str = "kimi-linear-engine", wait: bool = True):
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(target=_child_main, args=(child_conn, factory, tuple(args), kwargs or {}),
                                        name=name, daemon=False)
        self._lock = threading.Lock()  # pending adds, the unfinished ids, the failure
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # (message, add seq or None); None ends the sender
        self._sender: threading.Thread | None = None
        self._pending: dict[int, tuple[str, Future]] = {}
        self._seq = itertools.count()
        self._unfinished: set[str] = set()  # added (acknowledged) and not yet finished in an event step() gave out
        self._events: queue.Queue = queue.Queue()
        self._failure: str | None = None  # why calls fail: the child died or was closed
        self._closing = False
        self.death: str | None = None  # set when the child died without being closed
        self.exited = threading.Event()  # the child is gone (closed or died)
        self._reader: threading.Thread | None = None  # started once the child is ready
        self._info: dict[str, str] = {}
        try:
            self._process.start()
        finally:
            child_conn.close()  # the child's copy is its only one: the pipe ends when the child does
        atexit.register(self.close)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> EngineProcess:
        """Wait until the child's engine is built (a no-op once it is). On a start-up error the child is gone
        and the error raised (see the class docstring); later calls raise RuntimeError."""
        if self._reader is not None:
            return self
        if self._closing:
            raise RuntimeError(self._failure or "the engine process is closed")
        try:
            reply = self._conn.recv()
        except EOFError:
            self._process.join(10)
            self._abandon("the engine process did not start")
            raise RuntimeError(
                f"the engine process exited with code {self._process.exitcode} before it was ready"
            ) from None
        except BaseException:
            self._abandon("the engine process did not start")
            raise
        if reply[0] == "failed":
            self._process.join(CLOSE_TIMEOUT_S)
            self._abandon("the engine process did not start")
            raise reply[1]
        _, self._model_config, self._config, self._stats, self._info = reply
        self._reader = threading.Thread(target=self._read, name=f"{self._process.name}-reader", daemon=True)
        self._reader.start()
        self._sender = threading.Thread(target=self._send_loop, name=f"{self._process.name}-sender", daemon=True)
        self._sender.start()
        return self

    # -- properties
    @property
    def model_config(self):
        """The engine's ``KimiLinearConfig``."""
        return self._model_config

    @property
    def config(self):
        """The engine's ``EngineConfig`` (None if the factory's engine has no ``config``)."""
        return self._config

    @property
    def device(self) -> str | None:
        """The engine's device ("cuda:0", "cpu"), if it has one."""
        return self._info.get("device")

    @property
    def dtype(self) -> str | None:
        """The engine's model dtype ("bfloat16"), if it has one."""
        return self._info.get("dtype")

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def alive(self) -> bool:
        """The child is running and takes requests (not closed, not dead)."""
        return self._failure is None

    # -- the engine interface
    def add_request_future(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Future:
        """Send a request to the engine; the future completes (None) once the engine has queued it, or with the
        engine's exception (ValueError, TypeError, QueueFullError). Does not wait for the child.

        Raises:
            TypeError: ``params`` is not a SamplingParams, or the arguments cannot be pickled.
            RuntimeError: the engine process died or was closed.
        """
        from kimi_linear.serve.engine import SamplingParams

        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        future: Future = Future()
        with self._lock:
            if self._failure is not None:
                raise RuntimeError(self._failure)
            seq = next(self._seq)
        try:
            message = ForkingPickler.dumps(("add", seq, request_id, list(prompt_ids), params))
        except Exception as e:  # noqa: BLE001 - an id or token that is no plain value
            raise TypeError(f"request {request_id!r} cannot be sent to the engine process: {e}") from None
        with self._lock:
            if self._failure is not None:
                raise RuntimeError(self._failure)
            self._pending[seq] = (request_id, future)
        self._outbox.put((message, seq))
        return future

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request and wait for the engine's answer (``Engine.add_request``'s contract).

        Raises:
            ValueError / TypeError / QueueFullError: the engine's, with its message.
            RuntimeError: the engine process died or was closed.
        """
        self.add_request_future(request_id, prompt_ids, params).result()

    def abort(self, request_id: str) -> None:
        """Finish the request with "abort" at the engine's next step; a no-op once the engine is gone."""
        if self._failure is None:  # else it died: nothing is left to abort
            self._outbox.put((ForkingPickler.dumps(("abort", request_id)), None))

    def has_unfinished(self) -> bool:
        """Requests were added that ``step()`` has not yet given out a finishing event for (or a step is
        waiting to be taken)."""
        with self._lock:
            return bool(self._unfinished) or not self._events.empty()

    def step(self) -> list[TokenEvent]:
        """The next step's events, in the engine's order; [] if none arrived within ``STEP_WAIT_S``.

        Raises:
            The exception the engine's ``step()`` raised (with the child's traceback as a note).
            RuntimeError: the engine process died or was closed.
        """
        try:
            item = self._events.get(timeout=STEP_WAIT_S)
        except queue.Empty:
            if self._failure is not None:
                raise RuntimeError(self._failure) from None
            return []
        if item is _DIED:
            raise RuntimeError(self._failure)
        tuples, error = item
        if error is not None:
            raise error
        from kimi_linear.serve.engine import TokenEvent

        events = [TokenEvent(*t) for t in tuples]
        with self._lock:
            for event in events:
                if event.finished:
                    self._unfinished.discard(event.request_id)
        return events

    def stats(self) -> EngineStats:
        """The ``EngineStats`` the child sent with its latest step (or at start)."""
        return self._stats

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the child (it finishes its current step), wait for it, kill it if it does not exit within
        ``timeout_s``; later calls raise RuntimeError. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self._reader is None:  # still starting (or failed to): nothing to finish
            self._abandon()
            return
        atexit.unregister(self.close)
        self._outbox.put((ForkingPickler.dumps(("stop",)), None))  # after everything queued before it
        self._outbox.put(None)
        self._process.join(timeout_s)
        self._kill()
        self._reader.join(timeout_s)
        self._sender.join(timeout_s)
        self._conn.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals
    def _send_loop(self) -> None:
        """The sender thread: write the queued messages to the pipe in order. An add that cannot be written (the
        child is gone) fails its future; the reader thread notices the death itself."""
        while (item := self._outbox.get()) is not None:
            message, seq = item
            try:
                self._conn.send_bytes(message)
            except (OSError, ValueError):  # gone, or the pipe already closed
                if seq is not None:
                    with self._lock:
                        pending = self._pending.pop(seq, None)
                    if pending is not None:
                        pending[1].set_exception(RuntimeError(self._failure or "the engine process is gone"))

    def _kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join()

    def _abandon(self, failure: str = "the engine process is closed") -> None:
        """Before the child was ready: kill it and let every later call fail with ``failure``."""
        self._closing = True
        atexit.unregister(self.close)
        self._kill()
        self._conn.close()
        self._failure = self._failure or failure
        self.exited.set()

    def _read(self) -> None:
        """The reader thread: route the child's messages until the pipe ends."""
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "step":
                    _, events, self._stats, error = message
                    self._events.put((events, error))
                elif kind == "added":
                    done = []
                    with self._lock:
                        for seq, error in message[1]:
                            request_id, future = self._pending.pop(seq)
                            if error is None:
                                # before any later step of it is queued: has_unfinished must see it
                                self._unfinished.add(request_id)
                            done.append((future, error))
                    for future, error in done:
                        if error is None:
                            future.set_result(None)
                        else:
                            future.set_exception(error)
        except (EOFError, OSError):
            pass
        self._gone()

    def _gone(self) -> None:
        if not self._closing:
            self._process.join(5)  # reap it; a child that closed the pipe but lives on is killed
            if self._process.is_alive():
                self._kill()
            code = self._process.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            self.death = f"the engine process died ({how})"
            logger.error("%s", self.death)
        with self._lock:
            self._failure = self.death or "the engine process is closed"
            pending, self._pending = list(self._pending.values()), {}
            self._unfinished.clear()
        for _, future in pending:
            future.set_exception(RuntimeError(self._failure))
        self._outbox.put(None)  # the sender ends once it has tried what is queued
        self._events.put(_DIED)
        self.exited.set()
