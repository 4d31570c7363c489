"""The API process and the DIMSE listener never import torch: not at import, not building the
app, not uploading, not receiving."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from sitefit.phantoms.dicom_series import write_dicom_series
from tests.conftest import PhantomCase
from tests.server.payloads import nifti_to_dicom_zip
from tests.server.processes import REPO, RedisProcess, free_port

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


LISTENER_SCRIPT = """
import os
import signal
import sys
import threading
from pathlib import Path

port, instance = int(sys.argv[1]), Path(sys.argv[2])
answers = []


def send() -> None:
    import time

    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage, Verification

    ae = AE(ae_title="CALLER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)
    deadline = time.monotonic() + 60
    while True:
        assoc = ae.associate("127.0.0.1", port, ae_title="SITEFIT")
        if assoc.is_established or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    answers.append(assoc.send_c_echo().Status)
    answers.append(assoc.send_c_store(pydicom.dcmread(instance)).Status)
    assoc.release()
    os.kill(os.getpid(), signal.SIGTERM)


threading.Thread(target=send, daemon=True).start()
from sitefit.cli import main

assert main(["dicom-listener", "--port", str(port)]) == 0
assert answers == [0, 0], answers
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "worker"))
assert not loaded, loaded
print("no torch")
"""


def test_dicom_listener_never_imports_torch(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.ones((8, 8, 2), dtype=np.float32), np.eye(4))
    (instance, _) = write_dicom_series(image, tmp_path / "series")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEFIT_")}
    env.update(
        PYTHONPATH=str(REPO),
        SITEFIT_HOME=str(tmp_path / "home"),
        SITEFIT_DICOM_ROUTES='{"default": {"model": "tiny-brain"}}',
    )
    result = subprocess.run(
        [sys.executable, "-c", LISTENER_SCRIPT, str(free_port()), str(instance)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no torch" in result.stdout
    assert len(list((tmp_path / "home" / "inbox" / "default").glob("*/*.dcm"))) == 1
