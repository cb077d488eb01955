"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (what schedulers and ``kill`` send).

The first signal only records a request; the trainer finishes the step it is in, writes a checkpoint and
raises ``TrainingStopped``. A second signal aborts at once: SIGINT raises ``KeyboardInterrupt`` where the program is,
SIGTERM ends the process with the default action. A write cut short that way loses nothing already saved
(checkpoints are renamed into place whole).
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """Training stopped on a signal after ``step`` with its state saved in ``checkpoint`` (None when nothing
    was ever saved). ``exit_code`` is the shell's convention for the signal: 128 + its number (130 for SIGINT,
    143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """Context manager: while active, SIGINT/SIGTERM set ``signum`` instead of ending the program (the
    trainer polls ``requested``); the second one aborts (see the module docstring).

    Args:
        announce: write a one-line notice to stderr on the first signal (rank 0 of a multi-process run).
        name: program name that starts that notice.

    Handlers are installed only from the main thread (Python delivers signals there); elsewhere this is inert.
    """

    def __init__(self, *, announce: bool = True, name: str = "kimi-linear train"):
        self.announce, self.name = announce, name
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self.announce:
                # os.write: a handler may run in the middle of a print; buffered streams are not reentrant.
                name = signal.Signals(signum).name
                os.write(2, f"{self.name}: {name} received: finishing the current step and saving a "
                            f"checkpoint (send it again to abort at once)\n".encode())
            return
        self._restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
