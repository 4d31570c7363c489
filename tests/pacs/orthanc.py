"""A real Orthanc PACS for the tests: the ``Orthanc`` binary with its DICOMweb plugin.

:class:`Orthanc` writes a minimal configuration into a private folder, starts the server on
free loopback ports (HTTP, DIMSE) and waits until ``/system`` answers (well under a second).
It can be stopped and started again on the same ports and storage, which is how the tests
take the PACS down and bring it back. The REST helpers cover what the tests check: the
instances, series and studies stored, uploading a file, and fetching a stored instance.
Tests skip cleanly on a machine without Orthanc (``make system-tools`` installs it).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.server.processes import free_port, wait_for

BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def orthanc_binary() -> str:
    """The Orthanc binary and its DICOMweb plugin, or a skip naming what is missing."""
    binary = BINARY if os.access(BINARY, os.X_OK) else shutil.which("Orthanc")
    if binary is None:
        pytest.skip("Orthanc is not installed (`make system-tools` installs it)")
    if not Path(DICOMWEB_PLUGIN).is_file():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (package orthanc-dicomweb)")
    return binary


class Orthanc:
    """One Orthanc on loopback; ``modalities`` are the peers it knows (name -> (AE title,
    host, port)), needed to send from Orthanc (``POST /modalities/NAME/store``); ``users``
    (name -> password) turns on HTTP basic authentication (the helpers use the first);
    ``check_called_aet`` makes it refuse associations that call another AE title."""

    def __init__(
        self,
        directory: Path,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        users: dict[str, str] | None = None,
        check_called_aet: bool = False,
        stable_age_s: int = 1,
    ) -> None:
        self.binary = orthanc_binary()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.users = dict(users or {})
        self.check_called_aet = check_called_aet
        self.stable_age_s = stable_age_s
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.log_file = self.directory / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None

    # -- addresses -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    # -- lifecycle -----------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            "Name": "sitefit-test-pacs",
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {
                name: [title, host, port] for name, (title, host, port) in self.modalities.items()
            },
            "StableAge": self.stable_age_s,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomScpTimeout": 10,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "HttpTimeout": 10,
        }

    def start(self, timeout: float = 30) -> None:
        """Start (or start again, same ports and storage) and wait until the REST API answers."""
        if self.running:
            return
        config = self.directory / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "--no-jobs", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )

        def answers() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"Orthanc exited with status {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                return bool(self.get("/system"))
            except OSError:
                return False

        wait_for(answers, timeout, "Orthanc to answer /system")

    def stop(self, *, graceful: bool = False) -> None:
        """Stop the server (the PACS goes down); its storage stays for :meth:`start`.

        By default it is killed, as a crashed PACS would be (and at once: a graceful stop
        waits some seconds for Orthanc's DICOM server threads)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if graceful:
            process.terminate()
            try:
                process.wait(timeout=20)
                return
            except subprocess.TimeoutExpired:
                pass
        process.kill()
        process.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- REST ----------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        timeout: float = 10,
    ) -> bytes:
        headers = {"Content-Type": content_type} if content_type else {}
        if self.users:  # the REST helpers act as the first user
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        request = urllib.request.Request(self.url + path, body, headers, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            content: bytes = response.read()
            return content

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        found: list[str] = self.get("/instances")
        return found

    def series(self) -> list[str]:
        found: list[str] = self.get("/series")
        return found

    def studies(self) -> list[str]:
        found: list[str] = self.get("/studies")
        return found

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        """The series of one study (Orthanc id), with their main tags."""
        found: list[dict[str, Any]] = self.get(f"/studies/{study_id}/series")
        return found

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """An instance's tags by keyword (``/instances/ID/simplified-tags``)."""
        tags: dict[str, Any] = self.get(f"/instances/{instance_id}/simplified-tags")
        return tags

    def instance_metadata(self, instance_id: str, name: str) -> str:
        """Orthanc's metadata of an instance, e.g. ``RemoteAET``: who sent it by C-STORE."""
        return self.request("GET", f"/instances/{instance_id}/metadata/{name}").decode()

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every stored instance."""
        return {self.instance_tags(i)["SOPInstanceUID"] for i in self.instances()}

    def upload(self, path: Path) -> str:
        """Store a DICOM file through the REST API (``POST /instances``); its Orthanc id."""
        answer = json.loads(self.request("POST", "/instances", Path(path).read_bytes()))
        instance_id: str = answer["ID"]
        return instance_id

    def delete_everything(self) -> None:
        for patient in self.get("/patients"):
            self.request("DELETE", f"/patients/{patient}")


__all__ = ["BINARY", "DICOMWEB_PLUGIN", "Orthanc", "orthanc_binary"]
