"""Real processes for the service tests: a private redis-server and `sitefit worker`s.

Helpers, not fixtures, so that tests under tests/worker can use them too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(condition: object, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class RedisProcess:
    """``redis-server`` on a free loopback port, without persistence; stop and start again."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (the Makefile installs it)")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(answers, 10, "redis-server to answer")
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def service_env(home: Path, redis_url: str, queue: str, **extra: str) -> dict[str, str]:
    """The environment of a `sitefit worker`: this test's home and queue, tiny refinement."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEFIT_")}
    env.update(
        PYTHONPATH=str(REPO),
        SITEFIT_HOME=str(home),
        SITEFIT_REDIS_URL=redis_url,
        SITEFIT_QUEUE_NAME=queue,
        SITEFIT_DEVICE="cpu",
        SITEFIT_REFINE_MAX_EPOCHS="3",
        SITEFIT_REFINE_BATCH_SIZE="8",
        SITEFIT_WORKER_HEARTBEAT_S="1",
    )
    env.update(extra)
    return env


class WorkerProcess:
    """A real `sitefit worker` subprocess; ready once it registered with Redis."""

    def __init__(self, env: dict[str, str], log: Path, metrics_port: int | None = None) -> None:
        self.env = env
        self.log = log
        self.metrics_port = metrics_port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60, *, wait: bool = True) -> WorkerProcess:
        """Start the process; with ``wait``, return once it registered with Redis."""
        command = [sys.executable, "-m", "sitefit", "worker"]
        if self.metrics_port is not None:
            command += ["--metrics-port", str(self.metrics_port)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        return self.wait_registered(timeout) if wait else self

    def wait_registered(self, timeout: float = 60) -> WorkerProcess:
        assert self.process is not None
        client = redis.Redis.from_url(self.env["SITEFIT_REDIS_URL"])
        queue = self.env["SITEFIT_QUEUE_NAME"]
        pid = self.process.pid

        def registered() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log.read_text()[-3000:]}")
            for key in client.smembers(f"rq:workers:{queue}"):
                if client.hget(key, "pid") == str(pid).encode():
                    return True
            return False

        wait_for(registered, timeout, "the worker to register with Redis", interval=0.1)
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye to Redis."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM, as an orchestrator stops a worker: it must finish its job and exit 0."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(
                f"the worker did not exit on SIGTERM:\n{self.log.read_text()[-3000:]}"
            ) from None
        assert code == 0, f"the worker exited {code} on SIGTERM:\n{self.log.read_text()[-3000:]}"
