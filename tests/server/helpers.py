"""Helpers of the service tests: homes, settings, clients, uploads, polling."""

from __future__ import annotations

import gzip
import time
from pathlib import Path
from typing import Any

import nibabel as nib
from fastapi.testclient import TestClient

from server import create_app
from sitefit.settings import Settings


def make_home(root: Path, models_dir: Path) -> Path:
    """A fresh $SITEFIT_HOME whose models/ is the session's (tiny models trained once)."""
    home = root / "home"
    home.mkdir(parents=True)
    (home / "models").symlink_to(models_dir)
    return home


def service_settings(home: Path, **overrides: Any) -> Settings:
    """Explicit settings of a test app: tiny refinement, fast maintenance, no Redis."""
    values: dict[str, Any] = dict(
        home=home,
        device="cpu",
        refine_max_epochs=3,
        refine_batch_size=8,
        redis_url=None,
        api_keys={},
        maintenance_interval_s=0.2,
        worker_heartbeat_s=1,
    )
    values.update(overrides)
    return Settings(**values)


def client(settings: Settings) -> TestClient:
    """A TestClient of a fresh app (use it as a context manager: it runs the lifespan)."""
    return TestClient(create_app(settings), raise_server_exceptions=False)


def wait_for_status(
    api: TestClient, job_id: str, wanted: tuple[str, ...], timeout: float = 90, **kw: Any
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = api.get(f"/v1/jobs/{job_id}", **kw)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] in wanted:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {body['status']}: {body}")
        time.sleep(0.05)


def upload(
    api: TestClient,
    path: Path,
    model: str,
    *,
    site: str | None = "site-a",
    mode: str = "none",
    name: str | None = None,
    headers: dict[str, str] | None = None,
    reference: Path | None = None,
) -> Any:
    files: dict[str, Any] = {
        "file": (name or path.name, path.read_bytes(), "application/octet-stream")
    }
    if reference is not None:
        files["reference"] = (reference.name, reference.read_bytes(), "application/gzip")
    data = {"model": model, "mode": mode}
    if site is not None:
        data["site"] = site
    return api.post("/v1/jobs", files=files, data=data, headers=headers or {})


def image_from_bytes(content: bytes) -> Any:
    """A NIfTI image from downloaded .nii.gz bytes."""
    return nib.Nifti1Image.from_bytes(gzip.decompress(content))
