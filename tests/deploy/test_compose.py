"""docker-compose.yml: valid for Debian's docker-compose with every profile, the details a
hospital IT team relies on, sitefit's settings accept the environment it gives each service,
and Orthanc (profile pacs) runs docker/orthanc.json and reaches a real sitefit listener."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sitefit.routing import DicomWebDestination, DimseDestination
from sitefit.settings import Settings
from tests.deploy.stack import (
    API_KEYS,
    DOCKER,
    PACS_ENV,
    REPO,
    compose,
    resolved_stack,
)
from tests.server.processes import free_port, wait_for

SITEFIT_SERVICES = ("api", "dicom-listener", "worker", "worker-cpu")
WORKERS = ("worker", "worker-cpu")


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return resolved_stack()


@pytest.fixture(scope="module")
def pacs_stack() -> dict[str, Any]:
    return resolved_stack(PACS_ENV)


def test_every_profile_validates() -> None:
    for env_file in (None, PACS_ENV):
        done = compose("config", "-q", env_file=env_file, env={"SITEFIT_API_KEYS": API_KEYS})
        assert done.returncode == 0, done.stderr
        assert done.stdout == ""


def test_the_api_keys_must_be_set() -> None:
    done = compose("config", "-q")
    assert done.returncode != 0
    assert "SITEFIT_API_KEYS" in done.stderr


def test_profiles_add_what_they_promise(stack: dict[str, Any]) -> None:
    services = stack["services"]
    profiles = {name: tuple(service.get("profiles", ())) for name, service in services.items()}
    assert profiles == {
        "redis": (),
        "api": (),
        "worker": (),
        "dicom-listener": ("dicom", "pacs"),
        "worker-cpu": ("cpu",),
        "import": ("import",),
        "orthanc": ("pacs",),
        "prometheus": ("monitoring",),
        "grafana": ("monitoring",),
    }


def test_redis_keeps_the_queue(stack: dict[str, Any]) -> None:
    redis = stack["services"]["redis"]
    command = " ".join(redis["command"])
    for option in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert option in command
    assert any(volume.endswith(":/data:rw") for volume in redis["volumes"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_services_wait_for_a_healthy_redis_and_restart(stack: dict[str, Any]) -> None:
    services = stack["services"]
    for name in ("api", *WORKERS):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    for name, service in services.items():
        if name != "import":  # a one-shot command
            assert service["restart"] == "unless-stopped", name
            assert service["healthcheck"]["test"], name
    assert "restart" not in services["import"]


def test_sitefit_services_share_the_home_volume(stack: dict[str, Any]) -> None:
    services = stack["services"]
    for name in (*SITEFIT_SERVICES, "import"):
        service = services[name]
        assert "sitefit-home:/data:rw" in service["volumes"], name
        assert service["environment"]["SITEFIT_HOME"] == "/data", name
    for name in SITEFIT_SERVICES:
        assert services[name]["environment"]["SITEFIT_REDIS_URL"] == "redis://redis:6379/0"


def test_workers_healthchecks_match_their_metrics_port(stack: dict[str, Any]) -> None:
    for name in WORKERS:
        worker = stack["services"][name]
        port = worker["command"][worker["command"].index("--metrics-port") + 1]
        assert worker["healthcheck"]["test"][-1] == f"http://127.0.0.1:{port}/metrics"
        assert worker["stop_grace_period"] == "1h"  # SIGTERM finishes the running job
    assert stack["services"]["worker"]["environment"]["SITEFIT_DEVICE"] == "cuda"
    assert stack["services"]["worker-cpu"]["environment"]["SITEFIT_DEVICE"] == "cpu"


def test_the_gpu_worker_reserves_an_nvidia_gpu(stack: dict[str, Any]) -> None:
    worker = stack["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "cu1" in worker["build"]["args"]["TORCH_INDEX"]  # the CUDA build of torch
    assert "args" not in stack["services"]["worker-cpu"]["build"]  # the image's CPU default


def test_monitoring_is_published_on_loopback_only(stack: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana", "orthanc"):
        for port in stack["services"][name]["ports"]:
            assert port.startswith("127.0.0.1:"), (name, port)


def test_models_are_imported_from_a_read_only_folder(stack: dict[str, Any]) -> None:
    service = stack["services"]["import"]
    assert service["entrypoint"] == ["sitefit", "models", "import"]
    assert service["working_dir"] == "/import"
    imports = [volume for volume in service["volumes"] if ":/import:" in volume]
    assert len(imports) == 1 and imports[0].endswith(":/import:ro")


def test_mounted_files_exist(stack: dict[str, Any]) -> None:
    mounted = [
        volume.split(":")[0]
        for service in stack["services"].values()
        for volume in service.get("volumes", ())
        if volume.startswith("/")
    ]
    for source in mounted:
        if not source.endswith("/import"):  # the operator's folder: created on use
            assert Path(source).exists(), source
    assert str(DOCKER / "orthanc.json") in mounted
    assert str(DOCKER / "prometheus-rules.yml") in mounted


def test_settings_accept_each_services_environment(
    pacs_stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in SITEFIT_SERVICES:
        settings = settings_of(pacs_stack["services"][name], monkeypatch)
        assert settings.redis_url == "redis://redis:6379/0", name
        assert set(settings.dicom_routes["default"].destinations) == set(
            settings.dicom_destinations
        )


def test_the_listener_needs_allowed_callers_on_an_open_port(
    stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # without docker/pacs.env nothing names the callers: the listener must refuse to start
    with pytest.raises(ValueError, match="SITEFIT_DICOM_ALLOWED_CALLERS"):
        settings_of(stack["services"]["dicom-listener"], monkeypatch)


def settings_of(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a service's command builds from its environment and its CLI options."""
    for key in list(os.environ):
        if key.startswith("SITEFIT_"):
            monkeypatch.delenv(key)
    for key, value in service["environment"].items():
        if value is not None:
            monkeypatch.setenv(key, str(value))
    command: list[str] = service["command"]
    options = {"--host": "host", "--port": "port"}
    if command[:2] == ["sitefit", "dicom-listener"]:
        options = {"--host": "dicom_host", "--port": "dicom_port"}
    overrides: dict[str, Any] = {
        field: command[command.index(flag) + 1]
        for flag, field in options.items()
        if flag in command
    }
    return Settings(**overrides)


# -- profile pacs: Orthanc ------------------------------------------------------------------


def test_orthanc_and_sitefit_point_at_each_other(pacs_stack: dict[str, Any]) -> None:
    services = pacs_stack["services"]
    orthanc = json.loads((DOCKER / "orthanc.json").read_text())
    listener = services["dicom-listener"]
    sitefit = listener["environment"]
    port = int(listener["command"][listener["command"].index("--port") + 1])
    # Orthanc -> sitefit: its modality is the listener, which lets Orthanc's AE title in
    assert orthanc["DicomModalities"]["sitefit"] == [
        sitefit["SITEFIT_DICOM_AE_TITLE"],
        "dicom-listener",
        port,
    ]
    assert orthanc["DicomAet"] in json.loads(sitefit["SITEFIT_DICOM_ALLOWED_CALLERS"])
    # sitefit -> Orthanc: by C-STORE to its AE and DICOM port, by STOW-RS to its DICOMweb root
    destinations = json.loads(sitefit["SITEFIT_DICOM_DESTINATIONS"])
    dimse = DimseDestination.model_validate(destinations["orthanc-dimse"])
    assert (dimse.host, dimse.port, dimse.ae_title) == (
        "orthanc",
        orthanc["DicomPort"],
        orthanc["DicomAet"],
    )
    web = DicomWebDestination.model_validate(destinations["orthanc-dicomweb"])
    root = orthanc["DicomWeb"]["Root"].rstrip("/")
    assert web.url == f"http://orthanc:{orthanc['HttpPort']}{root}"
    assert web.username in orthanc["RegisteredUsers"]
    assert web.password is not None
    password = services["orthanc"]["environment"]["ORTHANC_PASSWORD"]
    assert web.password.get_secret_value() == password
    assert orthanc["RegisteredUsers"][web.username] == "${ORTHANC_PASSWORD}"
    assert "orthanc.json:/etc/orthanc/" in " ".join(services["orthanc"]["volumes"])


@pytest.fixture
def orthanc_and_listener(tmp_path: Path, pacs_stack: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Debian's Orthanc running docker/orthanc.json (paths, ports and the listener's address
    made local) and a real `sitefit dicom-listener` with the pacs profile's environment."""
    binary = shutil.which("Orthanc")
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if binary is None or not plugin.exists():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (the Makefile installs it)")
    environment: dict[str, str] = pacs_stack["services"]["dicom-listener"]["environment"]
    password = pacs_stack["services"]["orthanc"]["environment"]["ORTHANC_PASSWORD"]
    listener_port, http_port, dicom_port = free_port(), free_port(), free_port()
    config = json.loads((DOCKER / "orthanc.json").read_text())
    ae_title, _, _ = config["DicomModalities"]["sitefit"]
    config.update(
        StorageDirectory=str(tmp_path / "orthanc"),
        IndexDirectory=str(tmp_path / "orthanc"),
        HttpPort=http_port,
        DicomPort=dicom_port,
        Plugins=[str(plugin)],
        DicomModalities={"sitefit": [ae_title, "127.0.0.1", listener_port]},
    )
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEFIT_")}
    env.update({k: str(v) for k, v in environment.items() if v is not None})
    env.update(SITEFIT_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    logs = [(tmp_path / "orthanc.log").open("wb"), (tmp_path / "listener.log").open("wb")]
    orthanc = subprocess.Popen(
        [binary, str(tmp_path / "orthanc.json")],
        env={**env, "ORTHANC_PASSWORD": password},
        stdout=logs[0],
        stderr=subprocess.STDOUT,
    )
    command = [sys.executable, "-m", "sitefit", "dicom-listener"]
    command += ["--host", "127.0.0.1", "--port", str(listener_port)]
    listener = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=logs[1], stderr=subprocess.STDOUT
    )
    try:
        base = f"http://127.0.0.1:{http_port}"
        auth = "Basic " + base64.b64encode(f"sitefit:{password}".encode()).decode()
        wait_for(lambda: _status(f"{base}/system", auth) == 200, 30, "Orthanc to answer")
        wait_for(lambda: b"DICOM listener on" in (tmp_path / "listener.log").read_bytes(), 60,
                 "the listener to start")  # fmt: skip
        yield {"base": base, "auth": auth, "listener": listener}
    finally:
        for process in (listener, orthanc):
            process.terminate()
            process.wait(30)
        for log in logs:
            log.close()


def test_orthanc_runs_the_config_and_echoes_the_listener(
    orthanc_and_listener: dict[str, Any],
) -> None:
    base, auth = orthanc_and_listener["base"], orthanc_and_listener["auth"]
    assert _status(f"{base}/system", None) == 401  # remote access needs the sitefit user
    assert _status(f"{base}/system", "Basic " + base64.b64encode(b"sitefit:wrong").decode()) == 401
    assert _status(f"{base}/dicom-web/studies", auth) == 200  # the DICOMweb root sitefit uses
    # Orthanc, calling as its own AE title, is let in by the listener's allow-list
    assert _status(f"{base}/modalities/sitefit/echo", auth, data=b"{}") == 200
    assert orthanc_and_listener["listener"].poll() is None


def _status(url: str, auth: str | None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if auth is not None:
        request.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0
