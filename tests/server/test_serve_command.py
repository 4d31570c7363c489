"""`sitefit serve` as users run it: a real HTTP server, embedded mode, loopback without keys."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import nibabel as nib

from tests.conftest import PhantomCase
from tests.server.helpers import image_from_bytes
from tests.server.processes import REPO, free_port, wait_for


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEFIT_")}
    env.update(PYTHONPATH=str(REPO), SITEFIT_HOME=str(home), SITEFIT_DEVICE="cpu")
    env.update(SITEFIT_REFINE_MAX_EPOCHS="2", SITEFIT_REFINE_BATCH_SIZE="8")
    return env


def test_serve_without_keys_refuses_a_public_address(service_home: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sitefit", "serve", "--host", "0.0.0.0"],
        env=_env(service_home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "not a loopback address" in result.stderr and "Traceback" not in result.stderr


def test_serve_says_its_port_is_taken_before_printing_any_url(service_home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "sitefit", "serve", "--port", str(port)],
            env=_env(service_home),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr and "http://" not in result.stdout


def test_serve_embedded_over_real_http(
    service_home: Path, brain_model: str, shifted_brain_case: PhantomCase, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sitefit", "serve", "--port", str(port)],
            env=_env(service_home),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return httpx2.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx2.HTTPError:
                return False

        wait_for(healthy, 60, "sitefit serve to answer", interval=0.2)
        with shifted_brain_case.image.open("rb") as scan:
            created = httpx2.post(
                f"{base}/v1/jobs",
                files={"file": ("scan.nii.gz", scan)},
                data={"model": brain_model, "site": "site-a", "mode": "adapt"},
                timeout=30,
            )
        assert created.status_code == 202, created.text
        job_url = base + created.json()["links"]["self"]
        deadline = time.monotonic() + 300  # generous: a safety net, not a speed target
        while (job := httpx2.get(job_url, timeout=10).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["status"] == "finished", job
        mask = httpx2.get(base + job["links"]["mask"], timeout=10)
        assert image_from_bytes(mask.content).shape == nib.load(shifted_brain_case.image).shape
    finally:
        process.terminate()
        process.wait(30)
    output = log.read_text()
    assert "authentication is off" in output and "loopback only (127.0.0.1)" in output
    assert "embedded mode" in output and f"http://127.0.0.1:{port}/docs" in output


def test_serve_prints_a_curl_line_for_the_demo_phantom(tmp_path: Path) -> None:
    from sitefit.cli.service_commands import demo_curl
    from sitefit.settings import Settings

    settings = Settings(home=tmp_path, redis_url=None, api_keys={})
    assert demo_curl(settings) is None  # before `sitefit demo` ran
    (tmp_path / "models" / "demo-brain" / "1").mkdir(parents=True)
    scans = tmp_path / "demo" / "target" / "imagesTr"
    scans.mkdir(parents=True)
    (scans / "case_0000.nii.gz").write_bytes(b"")
    line = demo_curl(settings)
    assert line is not None and line.startswith("curl -F file=@")
    assert "model=demo-brain" in line and line.endswith("http://127.0.0.1:8000/v1/jobs")
