"""Embedded mode (no Redis): the whole job over HTTP, metrics, retention, storage failures."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sitefit.job_store import JobStore
from sitefit.jobs import Progress
from tests.conftest import PhantomCase
from tests.server.helpers import (
    client,
    image_from_bytes,
    service_settings,
    upload,
    wait_for_status,
)
from tests.stored_jobs import publish_job
from worker.engine import Engine, SegmentRequest


def test_upload_poll_mask_and_report_match_the_engine(
    service_home: Path, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    settings = service_settings(service_home)
    with client(settings) as api:
        # no site: neither run reads or saves site weights, so both start from the same state
        created = upload(api, shifted_brain_case.image, brain_model, mode="adapt", site=None)
        assert created.status_code == 202, created.text
        body = created.json()
        assert body["status"] == "queued" and body["links"]["mask"].endswith("/mask")
        job = wait_for_status(api, body["id"], ("finished", "failed"))
        assert job["status"] == "finished", job
        mask = api.get(body["links"]["mask"])
        report = api.get(body["links"]["report"]).json()
    assert mask.status_code == 200 and mask.headers["content-type"] == "application/gzip"
    got = image_from_bytes(mask.content)
    expected = Engine(settings).run(
        SegmentRequest(shifted_brain_case.image, brain_model, None, "adapt")
    )
    source = nib.load(shifted_brain_case.image)
    assert got.shape == source.shape
    np.testing.assert_allclose(got.affine, source.affine)
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(expected.mask.dataobj))
    assert report == job["report"]
    assert report["mode_requested"] == "adapt" and report["site"] is None
    trace = report["refinement"]["dice_trace"]
    assert job["progress"]["attempt"] == 1 and report["refinement"]["epochs"] >= 1
    assert job["progress"]["dice_trace"] == pytest.approx(trace, abs=1e-5)  # seen while running


def test_docs_health_readiness_and_metrics(
    service_home: Path, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    with client(service_settings(service_home)) as api:
        assert api.get("/healthz").json() == {"status": "ok"}
        ready = api.get("/readyz")
        assert ready.status_code == 200 and ready.json()["queue"] == "embedded"
        assert "swagger" in api.get("/docs").text.lower()
        spec = api.get("/openapi.json").json()
        upload_doc = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
        assert "file" in upload_doc["multipart/form-data"]["schema"]["properties"]
        job_id = upload(api, shifted_brain_case.image, brain_model).json()["id"]
        wait_for_status(api, job_id, ("finished",))
        assert api.get("/v1/jobs/" + "0" * 32).status_code == 404
        metrics = api.get("/metrics").text
    assert 'sitefit_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in metrics
    assert 'route="/v1/jobs/{job_id}",status="404"' in metrics
    assert 'sitefit_jobs{mode="none",status="finished"} 1.0' in metrics
    assert 'sitefit_jobs_submitted_total{mode="none"} 1.0' in metrics
    assert "sitefit_queue_depth 0.0" in metrics
    assert 'sitefit_worker_jobs_total{mode="none",outcome="finished"} 1.0' in metrics
    assert "sitefit_http_request_duration_seconds_bucket" in metrics


def test_models_listing(service_home: Path, brain_model: str) -> None:
    with client(service_settings(service_home)) as api:
        models = api.get("/v1/models").json()["models"]
    entry = next(m for m in models if m["name"] == brain_model)
    assert entry["versions"] == [1] and entry["latest"]["classes"] == {
        "0": "background",
        "1": "brain",
    }


def test_deleted_and_expired_jobs_are_clean_404s(
    service_home: Path, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    settings = service_settings(service_home, job_retention_s=1)
    with client(settings) as api:
        first = upload(api, shifted_brain_case.image, brain_model).json()["id"]
        second = upload(api, shifted_brain_case.image, brain_model).json()["id"]
        wait_for_status(api, second, ("finished",))
        deleted = api.delete(f"/v1/jobs/{first}")
        # with a retention of 1 s, a loaded machine may have expired the first job already
        if deleted.status_code != 404:
            assert deleted.status_code == 200, deleted.text
            assert deleted.json()["status"] in ("finished", "canceled")
        # past the 1 s retention the maintenance loop deletes the data; on a loaded machine
        # the loop may run late, so wait for it (bounded) rather than for a fixed time
        deadline = time.monotonic() + 20
        while api.get(f"/v1/jobs/{second}").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.2)
        for job_id in (first, second):
            gone = api.get(f"/v1/jobs/{job_id}")
            assert gone.status_code == 404 and "unknown job" in gone.json()["detail"]
            assert api.get(f"/v1/jobs/{job_id}/mask").status_code == 404
    assert not (service_home / "jobs" / second).exists()


def test_unwritable_job_storage_is_a_5xx_with_a_message_not_a_hang(
    service_home: Path, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    (service_home / "jobs").write_bytes(b"a file where the job directory should be")
    with client(service_settings(service_home)) as api:
        started = time.monotonic()
        response = upload(api, shifted_brain_case.image, brain_model)
        assert time.monotonic() - started < 10
        assert response.status_code == 500
        assert response.json()["detail"].startswith("job storage: cannot")
        ready = api.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["job_storage"] != "ok"


def test_restart_fails_jobs_that_were_running_and_reruns_queued_ones(
    service_home: Path, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    settings = service_settings(service_home)
    store = JobStore.from_settings(settings)
    ids = []
    for status in ("running", "queued"):
        job_id = publish_job(store, scan=shifted_brain_case.image.read_bytes(), model=brain_model)
        store.set_progress(job_id, Progress(status=status, attempt=int(status == "running")))
        ids.append(job_id)
    with client(settings) as api:  # as if the server had died and come back
        running = wait_for_status(api, ids[0], ("failed",))
        assert "stopped while the job was running" in running["error"]
        wait_for_status(api, ids[1], ("finished",))


def test_a_job_left_running_by_an_unrecorded_end_is_failed_by_maintenance(
    service_home: Path, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    """An attempt whose end could not be written (a full disk) leaves the job "running"
    with no thread running it: maintenance fails it rather than the retention sweep days
    later. The job the thread does run is left alone."""
    settings = service_settings(service_home)
    store = JobStore.from_settings(settings)
    with client(settings) as api:
        stuck = publish_job(store, scan=shifted_brain_case.image.read_bytes(), model=brain_model)
        store.set_progress(stuck, Progress(status="running", attempt=1))
        job = wait_for_status(api, stuck, ("failed",))
        assert "could not record the job's end" in job["error"]
        created = upload(api, shifted_brain_case.image, brain_model, mode="adapt", site=None)
        assert wait_for_status(api, created.json()["id"], ("finished",))["progress"]["attempt"] == 1


def test_oversized_upload_is_refused_declared_or_streamed(
    service_home: Path, brain_model: str
) -> None:
    boundary = "sitefit-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{brain_model}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="scan.nii"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while streaming
        yield head
        for _ in range(64):
            yield bytes(1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    with client(service_settings(service_home, max_upload_bytes=4096)) as api:
        files = {"file": ("scan.nii", io.BytesIO(bytes(64 * 1024)), "application/octet-stream")}
        declared = api.post("/v1/jobs", files=files, data={"model": brain_model})
        streamed = api.post(
            "/v1/jobs",
            content=chunks(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert "limit of 4,096 bytes" in response.json()["detail"]
    assert declared.json()["detail"].startswith("upload of ")  # refused on Content-Length
    assert streamed.json()["detail"].startswith("upload exceeds")  # refused while parsing
    assert not list((service_home / "jobs").glob("[0-9a-f]*"))


def test_a_worker_that_cannot_start_fails_queued_jobs_and_refuses_uploads(tmp_path: Path) -> None:
    settings = service_settings(tmp_path, device="cuda:99")  # no such GPU here, or anywhere
    store = JobStore.from_settings(settings)
    job_id = publish_job(store, scan=b"never read")  # queued before: recovered at start
    with client(settings) as api:
        job = wait_for_status(api, job_id, ("failed",), timeout=30)
        refused = api.post(
            "/v1/jobs",
            files={"file": ("scan.nii.gz", b"x", "application/gzip")},
            data={"model": "m"},
        )
        ready = api.get("/readyz")
    assert job["error"].startswith("embedded worker cannot start: DeviceUnavailableError: ")
    assert "cuda:99" in job["error"] and "\n" not in job["error"]
    assert refused.status_code == 503
    assert refused.json()["detail"].startswith(
        "job queue unavailable: embedded worker cannot start: DeviceUnavailableError"
    )
    assert ready.status_code == 503
    assert [p.name for p in (tmp_path / "jobs").glob("[0-9a-f]*")] == [job_id]
