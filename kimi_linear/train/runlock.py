"""One training process per run folder: an exclusive ``flock`` on ``OUT/train.lock``.

The kernel releases a ``flock`` when its holder exits, however it exits (crash, SIGKILL), so a lock left by a
dead process never blocks the next run; the file itself stays, holding the last holder's pid. Under torchrun
only rank 0 takes the lock (the other ranks write nothing into the folder).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "train.lock"


class RunLocked(ValueError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """Exclusive lock on a run folder (created if missing), held until ``release()`` or process exit.

    Raises:
        RunLocked: another process holds it; the message names that process's pid.
    """

    def __init__(self, out_dir: str | os.PathLike):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"{out} is in use by another training process (pid {holder}, lock {self.path}); "
                            f"wait for it to finish or stop it, or pass another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
