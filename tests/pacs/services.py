"""sitefit's PACS-facing processes as an operator runs them: `sitefit serve` (embedded mode:
the API, the dispatcher, the delivery loop and the worker thread in one process) and
`sitefit dicom-listener`, each a real subprocess on free loopback ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2

from tests.server.processes import REPO, free_port, wait_for


def pacs_env(home: Path, **settings: Any) -> dict[str, str]:
    """The environment of both processes: this test's home, tiny refinement, and
    ``settings`` as SITEFIT_* variables (dicts and lists as JSON)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEFIT_")}
    env.update(
        PYTHONPATH=str(REPO),
        SITEFIT_HOME=str(home),
        SITEFIT_DEVICE="cpu",
        SITEFIT_REFINE_MAX_EPOCHS="2",
        SITEFIT_REFINE_BATCH_SIZE="8",
        SITEFIT_MAINTENANCE_INTERVAL_S="0.5",
    )
    for name, value in settings.items():
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        env[f"SITEFIT_{name.upper()}"] = text
    return env


class SitefitProcess:
    """One `sitefit ...` subprocess whose output goes to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sitefit", *self.args],
                env=self.env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"sitefit {self.args[0]} exited:\n{self.output()[-3000:]}")
        return True

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class ServeProcess(SitefitProcess):
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        super().__init__(["serve", "--port", str(self.port)], env, log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 90) -> ServeProcess:
        def ready() -> bool:
            self.alive()
            try:
                return httpx2.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except httpx2.HTTPError:
                return False

        wait_for(ready, timeout, "sitefit serve to be ready", interval=0.2)
        return self


class ListenerProcess(SitefitProcess):
    def __init__(self, env: dict[str, str], log: Path, port: int) -> None:
        self.port = port
        super().__init__(["dicom-listener", "--port", str(port)], env, log)

    def wait_ready(self, timeout: float = 60) -> ListenerProcess:
        def listening() -> bool:
            self.alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_for(listening, timeout, "sitefit dicom-listener to listen", interval=0.2)
        return self
