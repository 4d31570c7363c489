"""``GET /v1/jobs/{id}/seg``: a DICOM job's SEG as application/dicom, for its site only; a
clear 404 for a NIfTI job, 409 while there is none (yet)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import SegmentationStorage

from sitefit.job_store import SEG, JobStore
from sitefit.settings import Settings
from tests.conftest import PhantomCase
from tests.server.helpers import client, make_home, service_settings
from tests.stored_jobs import publish_job
from tests.worker.test_job import publish_dicom_job
from worker.engine import Engine
from worker.job import run_job

KEY_A = "key-for-site-a-0123456789"
KEY_B = "key-for-site-b-0123456789"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}


@dataclass(frozen=True)
class Jobs:
    dicom: str  # finished, with its SEG
    nifti: str  # finished, a NIfTI upload
    failed: str  # a DICOM job that failed
    no_seg: str  # a finished DICOM job whose source instances were not kept


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory,
    settings: Settings,
    brain_model: str,
    shifted_brain_case: PhantomCase,
) -> Iterator[tuple[TestClient, Jobs, JobStore]]:
    root = tmp_path_factory.mktemp("seg-route")
    service = service_settings(make_home(root, settings.models_dir),
                               api_keys={KEY_A: ["site-a"], KEY_B: ["site-b"]})  # fmt: skip
    store = JobStore.from_settings(service)
    store.root.mkdir(parents=True, exist_ok=True)
    engine = Engine(service)
    scan = shifted_brain_case.image
    dicom, _ = publish_dicom_job(store, root / "a", scan, brain_model)
    nifti = publish_job(store, scan=scan.read_bytes(), model=brain_model)
    no_seg, _ = publish_dicom_job(store, root / "b", scan, brain_model, keep_instances=False)
    for job_id in (dicom, nifti, no_seg):
        assert run_job(job_id, store, engine) == "finished"
    failed, _ = publish_dicom_job(store, root / "c", scan, brain_model)
    assert store.end(failed, "failed", "the scan was unusable")
    with client(service) as test_client:
        yield test_client, Jobs(dicom, nifti, failed, no_seg), store


def test_the_seg_of_a_dicom_job(api: tuple[TestClient, Jobs, JobStore]) -> None:
    test_client, jobs, store = api
    response = test_client.get(f"/v1/jobs/{jobs.dicom}/seg", headers=A)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom"
    assert response.headers["content-disposition"] == (
        f'attachment; filename="{jobs.dicom}_seg.dcm"'
    )
    assert response.content == store.path(jobs.dicom, SEG).read_bytes()
    assert pydicom.dcmread(io.BytesIO(response.content)).SOPClassUID == SegmentationStorage
    links = test_client.get(f"/v1/jobs/{jobs.dicom}", headers=A).json()["links"]
    assert links["seg"] == f"/v1/jobs/{jobs.dicom}/seg"


def test_only_the_jobs_site_gets_its_seg(api: tuple[TestClient, Jobs, JobStore]) -> None:
    test_client, jobs, _ = api
    denied = test_client.get(f"/v1/jobs/{jobs.dicom}/seg", headers=B)
    assert denied.status_code == 403 and "site-a" in denied.json()["detail"]
    assert test_client.get(f"/v1/jobs/{jobs.dicom}/seg").status_code == 401


def test_a_nifti_job_has_no_seg(api: tuple[TestClient, Jobs, JobStore]) -> None:
    test_client, jobs, _ = api
    response = test_client.get(f"/v1/jobs/{jobs.nifti}/seg", headers=A)
    assert response.status_code == 404
    assert response.json() == {"detail": f"job {jobs.nifti} has no DICOM SEG: its input was NIfTI"}
    assert test_client.get(f"/v1/jobs/{jobs.nifti}", headers=A).json()["links"]["seg"] is None
    assert test_client.get(f"/v1/jobs/{jobs.nifti}/seg", headers=B).status_code == 403


def test_no_seg_yet_or_none_kept_is_a_conflict(api: tuple[TestClient, Jobs, JobStore]) -> None:
    test_client, jobs, _ = api
    failed = test_client.get(f"/v1/jobs/{jobs.failed}/seg", headers=A)
    assert failed.status_code == 409
    assert failed.json()["detail"] == f"job {jobs.failed} is failed: the scan was unusable"
    missing = test_client.get(f"/v1/jobs/{jobs.no_seg}/seg", headers=A)
    assert missing.status_code == 409
    assert missing.json()["detail"] == f"job {jobs.no_seg} has no DICOM SEG"
    unknown = test_client.get(f"/v1/jobs/{'0' * 32}/seg", headers=A)
    assert unknown.status_code == 404
