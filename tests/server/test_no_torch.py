"""The API process never imports torch: not at import, not building the app, not uploading."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import PhantomCase
from tests.server.payloads import nifti_to_dicom_zip
from tests.server.processes import REPO, RedisProcess

SCRIPT = """
import sys
from pathlib import Path
from fastapi.testclient import TestClient
from server import create_app
from sitefit.settings import Settings

home, redis_url, scan, zipped = sys.argv[1:5]
create_app(Settings(home=Path(home), redis_url=None))  # embedded: torch only once it starts
settings = Settings(home=Path(home), redis_url=redis_url, queue_name="no-torch")
with TestClient(create_app(settings)) as api:
    for path in (Path(scan), Path(zipped)):
        files = {"file": (path.name, path.read_bytes())}
        response = api.post("/v1/jobs", files=files, data={"model": "tiny-brain", "site": "a"})
        assert response.status_code == 202, response.text
    assert api.get("/metrics").status_code == 200
    assert api.get("/v1/models").status_code == 200
loaded = sorted(name for name in sys.modules if name.split(".")[0] == "torch")
assert not loaded, loaded
print("no torch")
"""


def test_api_process_never_imports_torch(
    service_home: Path, redis_server: RedisProcess, shifted_brain_case: PhantomCase, tmp_path: Path
) -> None:
    zipped = nifti_to_dicom_zip(shifted_brain_case.image, tmp_path / "series.zip")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEFIT_")}
    env["PYTHONPATH"] = str(REPO)
    arguments = [str(service_home), redis_server.url, str(shifted_brain_case.image), str(zipped)]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no torch" in result.stdout
