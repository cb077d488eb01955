"""Fixtures for the server tests: a tiny checkpoint on disk and `kimi-linear serve` as a real subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from kimi_linear.config import KimiLinearConfig
from kimi_linear.model import KimiLinearForCausalLM

SERVER_START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m kimi_linear serve` on 127.0.0.1:<free port>; ``stop`` (or the fixture's teardown) ends it."""

    def __init__(self, checkpoint, *flags: str, log_dir, port: int | None = None):
        self.checkpoint, self.flags, self.log_dir = str(checkpoint), flags, log_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = None

    def start(self) -> ServerProcess:
        self.log_path = os.path.join(self.log_dir, f"server-{self.port}-{time.monotonic_ns()}.log")
        log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "kimi_linear", "serve", "--checkpoint", self.checkpoint,
               "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *self.flags]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        log.close()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the server did not become healthy in {SERVER_START_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    def metrics(self) -> dict[str, float]:
        """GET /metrics as {name (with labels): value}."""
        text = httpx.get(f"{self.url}/metrics", timeout=10.0).raise_for_status().text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def terminate(self, timeout_s: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def one_thread():
    """Torch on one CPU thread for the test (tiny matrices: one thread is several times faster than two
    contending ones)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random "debug"-preset model (byte tokenizer, all four layer kinds) saved in the release format."""
    directory = tmp_path_factory.mktemp("serve-ckpt") / "tiny-kimi"
    torch.manual_seed(2310)
    KimiLinearForCausalLM(KimiLinearConfig.from_preset("debug")).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return KimiLinearForCausalLM.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture
def start_server(tiny_checkpoint, tmp_path):
    """``start_server(*flags, checkpoint=None, port=None)`` -> a started ServerProcess, killed at teardown."""
    started: list[ServerProcess] = []

    def start(*flags: str, checkpoint=None, port: int | None = None) -> ServerProcess:
        server = ServerProcess(checkpoint or tiny_checkpoint, *flags, log_dir=tmp_path, port=port)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()
