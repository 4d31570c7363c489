"""API + real Redis + a real `sitefit worker` process: the whole job, DICOM, metrics, safety."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import nibabel as nib
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from sitefit.settings import Settings
from tests.conftest import PhantomCase
from tests.server.helpers import (
    client,
    image_from_bytes,
    make_home,
    service_settings,
    upload,
    wait_for_status,
)
from tests.server.payloads import nifti_to_dicom_zip
from tests.server.processes import RedisProcess, WorkerProcess, free_port, service_env, wait_for
from worker.engine import Engine, SegmentRequest

QUEUE = "integration"


@dataclass
class Service:
    api: TestClient
    settings: Settings
    worker: WorkerProcess


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    settings: Settings,
    brain_model: str,
    redis_server: RedisProcess,
) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("integration")
    home = make_home(root, settings.models_dir)
    env = service_env(home, redis_server.url, QUEUE)
    worker = WorkerProcess(env, root / "worker.log", metrics_port=free_port()).start()
    app_settings = service_settings(home, redis_url=redis_server.url, queue_name=QUEUE)
    try:
        with client(app_settings) as api:
            yield Service(api, app_settings, worker)
    finally:
        worker.stop()


@pytest.mark.parametrize("mode", ["none", "adapt"])
def test_mask_from_the_worker_equals_the_engines(
    service: Service, brain_model: str, shifted_brain_case: PhantomCase, mode: str
) -> None:
    # No site: neither run reads or saves site weights, so both start from the same state.
    created = upload(service.api, shifted_brain_case.image, brain_model, mode=mode, site=None)
    assert created.status_code == 202, created.text
    job = wait_for_status(service.api, created.json()["id"], ("finished", "failed"))
    assert job["status"] == "finished", job
    mask = service.api.get(job["links"]["mask"])
    got = image_from_bytes(mask.content)
    # what `sitefit segment` computes: the engine with the worker's settings
    expected = Engine(service.settings).run(
        SegmentRequest(shifted_brain_case.image, brain_model, None, mode)
    )
    source = nib.load(shifted_brain_case.image)
    assert got.shape == source.shape
    np.testing.assert_allclose(got.affine, source.affine)
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(expected.mask.dataobj))
    assert job["report"]["mode_used"] == expected.report.mode_used
    assert job["report"]["refinement"]["epochs"] == expected.report.refinement.epochs


def test_dicom_series_upload_runs_on_the_series_grid(
    service: Service, brain_model: str, shifted_brain_case: PhantomCase, tmp_path: Path
) -> None:
    zipped = nifti_to_dicom_zip(shifted_brain_case.image, tmp_path / "series.zip")
    created = upload(service.api, zipped, brain_model, name="series.zip")
    assert created.status_code == 202, created.text
    job = wait_for_status(service.api, created.json()["id"], ("finished", "failed"))
    assert job["status"] == "finished" and job["source_format"] == "dicom", job["error"]
    got = image_from_bytes(service.api.get(job["links"]["mask"]).content)
    source = nib.load(shifted_brain_case.image)
    assert got.shape == source.shape  # the series was written from this grid
    np.testing.assert_allclose(got.affine, source.affine, atol=1e-3)


def test_worker_and_api_metrics(
    service: Service, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    for mode in ("none", "adapt"):  # its own jobs: the test does not lean on the others'
        job_id = upload(service.api, shifted_brain_case.image, brain_model, mode=mode).json()["id"]
        assert wait_for_status(service.api, job_id, ("finished", "failed"))["status"] == "finished"
    port = service.worker.metrics_port
    worker_metrics = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for name in (
        'sitefit_worker_jobs_total{mode="none",outcome="finished"}',
        'sitefit_job_stage_duration_seconds_count{stage="adapt"}',
        'sitefit_refinement_epochs_count{model="tiny-brain"}',
        'sitefit_self_consistency_dice_count{model="tiny-brain",phase="after"}',
        "sitefit_site_store_integrity_errors_total 0.0",
        "sitefit_job_duration_seconds_bucket",
        "sitefit_model_cache_misses_total",
        "sitefit_model_cache_bytes",
    ):
        assert name in worker_metrics, name
    api_metrics = service.api.get("/metrics").text
    assert "sitefit_queue_depth 0.0" in api_metrics
    assert 'sitefit_jobs{mode="adapt",status="finished"}' in api_metrics


def test_a_job_hash_naming_another_function_is_refused(
    service: Service, redis_server: RedisProcess, tmp_path: Path
) -> None:
    """Someone with Redis access enqueues os.system: the worker must not run it."""
    target = tmp_path / "pwned"
    connection = redis.Redis.from_url(redis_server.url)
    queue = Queue(QUEUE, connection=connection, serializer=JSONSerializer)
    job = queue.enqueue_call("os.system", args=(f"touch {target}",))
    wait_for(lambda: job.get_status(refresh=True) in ("failed", "finished"), 60, "the job")
    assert job.get_status() == "failed"
    result = Job.fetch(job.id, connection=connection, serializer=JSONSerializer).latest_result()
    assert result is not None and "not a sitefit job" in (result.exc_string or "")
    assert not target.exists()
    assert service.worker.process is not None and service.worker.process.poll() is None


def test_cancel_a_queued_job(
    service: Service,
    brain_model: str,
    shifted_brain_case: PhantomCase,
    redis_server: RedisProcess,
    tmp_path: Path,
) -> None:
    """On a queue no worker listens to, a job stays queued until DELETE takes it out."""
    idle = service_settings(
        service.settings.home, redis_url=redis_server.url, queue_name="integration-idle"
    )
    with client(idle) as api:
        job_id = upload(api, shifted_brain_case.image, brain_model).json()["id"]
        queue = Queue("integration-idle", connection=redis.Redis.from_url(redis_server.url))
        assert queue.job_ids == [job_id]
        deleted = api.delete(f"/v1/jobs/{job_id}")
        assert deleted.json() == {"id": job_id, "status": "canceled", "deleted": True}
        assert queue.count == 0
        status = api.get(f"/v1/jobs/{job_id}").json()
        assert status["status"] == "canceled" and status["error"] == "canceled by the client"
        assert api.get(f"/v1/jobs/{job_id}/mask").status_code == 409
        assert not (service.settings.home / "jobs" / job_id / "scan.nii.gz").exists()
