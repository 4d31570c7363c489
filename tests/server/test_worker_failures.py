"""Jobs never stay running forever: dead workers, cancellation while running, time limits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from rq import Queue
from rq.registry import StartedJobRegistry

from sitefit.settings import Settings
from tests.conftest import PhantomCase
from tests.server.helpers import client, make_home, service_settings, upload, wait_for_status
from tests.server.processes import RedisProcess, WorkerProcess, service_env, wait_for


@pytest.fixture(scope="module")
def slow_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scan big enough that a job on it runs for seconds on a tiny model."""
    data = np.random.default_rng(0).random((96, 96, 96)).astype(np.float32)
    path = tmp_path_factory.mktemp("slow") / "slow.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _wait_running(api: TestClient, job_id: str, attempt: int) -> dict[str, Any]:
    def running() -> bool:
        body = api.get(f"/v1/jobs/{job_id}").json()
        assert body["status"] in ("queued", "running"), body
        return bool(body["status"] == "running" and body["progress"]["attempt"] == attempt)

    wait_for(running, 120, f"attempt {attempt} to run", interval=0.02)
    body: dict[str, Any] = api.get(f"/v1/jobs/{job_id}").json()
    return body


def test_a_killed_worker_is_detected_the_job_retried_once_then_failed_with_a_reason(
    tmp_path: Path,
    settings: Settings,
    brain_model: str,
    redis_server: RedisProcess,
    slow_scan: Path,
) -> None:
    home = make_home(tmp_path, settings.models_dir)
    queue = "kill-9"
    env = service_env(home, redis_server.url, queue)
    app = service_settings(home, redis_url=redis_server.url, queue_name=queue, job_retries=1)
    first = WorkerProcess(env, tmp_path / "first.log").start()
    second = WorkerProcess(env, tmp_path / "second.log")
    try:
        with client(app) as api:
            job_id = upload(api, slow_scan, brain_model, mode="adapt").json()["id"]
            _wait_running(api, job_id, attempt=1)
            first.kill()
            requeued = wait_for_status(api, job_id, ("queued", "failed"), timeout=60)
            assert requeued["status"] == "queued", requeued
            assert "stopped (killed or crashed)" in requeued["progress"]["note"]

            second.start()
            _wait_running(api, job_id, attempt=2)
            second.kill()
            failed = wait_for_status(api, job_id, ("failed", "finished"), timeout=60)
    finally:
        first.stop()
        second.stop()
    assert failed["status"] == "failed", failed
    assert "killed or crashed" in failed["error"] and "no retries left" in failed["error"]
    connection = redis.Redis.from_url(redis_server.url)
    assert StartedJobRegistry(queue, connection=connection).count == 0


@pytest.fixture(scope="module")
def worker_home(
    tmp_path_factory: pytest.TempPathFactory, settings: Settings, redis_server: RedisProcess
) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("failures")
    home = make_home(root, settings.models_dir)
    worker = WorkerProcess(service_env(home, redis_server.url, "failures"), root / "w.log")
    worker.start()
    yield home
    worker.stop()


def test_delete_cancels_a_running_job_and_the_worker_moves_on(
    worker_home: Path,
    brain_model: str,
    redis_server: RedisProcess,
    slow_scan: Path,
    shifted_brain_case: PhantomCase,
) -> None:
    app = service_settings(worker_home, redis_url=redis_server.url, queue_name="failures")
    with client(app) as api:
        job_id = upload(api, slow_scan, brain_model, mode="adapt").json()["id"]
        _wait_running(api, job_id, attempt=1)
        deleted = api.delete(f"/v1/jobs/{job_id}")
        assert deleted.json()["status"] == "canceled"
        assert not (worker_home / "jobs" / job_id / "scan.nii.gz").exists()
        next_id = upload(api, shifted_brain_case.image, brain_model).json()["id"]
        assert wait_for_status(api, next_id, ("finished", "failed"))["status"] == "finished"
        canceled = api.get(f"/v1/jobs/{job_id}").json()
        assert canceled["status"] == "canceled"
    assert not (worker_home / "jobs" / job_id / "mask.nii.gz").exists()
    assert Queue("failures", connection=redis.Redis.from_url(redis_server.url)).count == 0


def test_a_job_past_its_time_limit_fails_with_a_reason(
    worker_home: Path, brain_model: str, redis_server: RedisProcess, slow_scan: Path
) -> None:
    app = service_settings(
        worker_home, redis_url=redis_server.url, queue_name="failures", job_timeout_s=1
    )
    with client(app) as api:
        job_id = upload(api, slow_scan, brain_model, mode="adapt").json()["id"]
        failed = wait_for_status(api, job_id, ("failed", "finished"), timeout=120)
    assert failed["status"] == "failed", failed
    assert "time limit of 1 s" in failed["error"]


def test_a_worker_on_another_home_is_named_as_the_cause_not_a_crash(
    tmp_path: Path,
    settings: Settings,
    brain_model: str,
    redis_server: RedisProcess,
    shifted_brain_case: PhantomCase,
) -> None:
    """A worker whose SITEFIT_HOME is not the API's (a share not mounted) finds no job data:
    it skips the job, which RQ records as finished; the job must fail with that cause, not
    as "killed or crashed"."""
    home = make_home(tmp_path, settings.models_dir)
    elsewhere = make_home(tmp_path / "elsewhere", settings.models_dir)
    queue = "other-home"
    app = service_settings(home, redis_url=redis_server.url, queue_name=queue)
    worker = WorkerProcess(service_env(elsewhere, redis_server.url, queue), tmp_path / "w.log")
    worker.start()
    try:
        with client(app) as api:
            job_id = upload(api, shifted_brain_case.image, brain_model).json()["id"]
            job = wait_for_status(api, job_id, ("failed", "finished"), timeout=60)
    finally:
        worker.stop()
    assert job["status"] == "failed"
    assert "share SITEFIT_HOME" in job["error"] and "killed" not in job["error"]
