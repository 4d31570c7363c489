"""DICOMweb on the API: STOW-RS into the inbox, series dispatched as jobs, QIDO-RS and WADO-RS.

The app runs with its lifespan (the embedded worker takes the jobs), but with an idle time of
an hour: the background loop never finds a series complete, and each test calls the
dispatcher itself with a ``now`` past the idle time, so nothing waits on a clock.
"""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from server.services import Services
from sitefit.job_store import DICOM_DIR, SEG, JobStore
from sitefit.jobs import JobRecord, new_job_id
from sitefit.phantoms.dicom_series import Scanner, SeriesIds, dataset_bytes, series_datasets
from sitefit.settings import Settings
from tests.conftest import PhantomCase
from tests.server.helpers import client, make_home, service_settings

KEY_ALL = "key-for-every-site-012345"
KEY_A = "key-for-site-a-0123456789"
STOW = 'multipart/related; type="application/dicom"; boundary='


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def multipart(parts: list[tuple[bytes, str]]) -> tuple[bytes, str]:
    """A multipart/related body of ``(payload, content type)`` parts, and its Content-Type."""
    boundary = secrets.token_hex(12)
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + payload + b"\r\n"
        for payload, kind in parts
    )
    return body + f"--{boundary}--\r\n".encode(), STOW + boundary


def series_parts(case: PhantomCase, scanner: Scanner | None = None) -> list[tuple[bytes, str]]:
    datasets = series_datasets(nib.load(case.image), scanner=scanner, ids=SeriesIds())
    return [(dataset_bytes(ds), "application/dicom") for ds in datasets]


def structured_report() -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SR"
    return dataset_bytes(ds)


@pytest.fixture
def pacs_settings(tmp_path: Path, settings: Settings, brain_model: str) -> Settings:
    home = make_home(tmp_path, settings.models_dir)
    return service_settings(
        home,
        api_keys={KEY_ALL: ["*"], KEY_A: ["site-a"]},
        series_idle_s=3600,
        dicom_routes={
            "default": {"model": brain_model, "mode": "none"},
            "fixed": {"model": brain_model, "mode": "none", "site": "site-a"},
            "missing-model": {"model": "no-such-model", "mode": "none"},
        },
    )


@pytest.fixture
def api(pacs_settings: Settings) -> Iterator[TestClient]:
    with client(pacs_settings) as running:
        yield running


def services_of(api: TestClient) -> Services:
    found: Services = api.app.state.services  # type: ignore[attr-defined]
    return found


def stow(api: TestClient, parts: list[tuple[bytes, str]], key: str, url: str) -> Any:
    body, content_type = multipart(parts)
    headers = {**bearer(key), "Content-Type": content_type}
    return api.post(url, content=body, headers=headers)


def dispatch(api: TestClient) -> list[Any]:
    return services_of(api).dispatcher.dispatch_once(now=time.time() + 7200)


def test_stow_rs_stores_a_series_that_becomes_one_job_with_a_derived_site(
    api: TestClient, pacs_settings: Settings, shifted_brain_case: PhantomCase
) -> None:
    scanner = Scanner(manufacturer="ACME", model="Magnet 9000", serial="42")
    parts = series_parts(shifted_brain_case, scanner)
    response = stow(api, parts, KEY_ALL, "/dicomweb/studies")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    answer = Dataset.from_json(response.json())
    assert len(answer.ReferencedSOPSequence) == len(parts)
    assert "FailedSOPSequence" not in answer
    sent = {pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID for p, _ in parts}
    assert {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence} == sent

    assert dispatch(api) != []
    jobs = JobStore.from_settings(pacs_settings)
    (job_id,) = jobs.job_ids()
    record = jobs.record(job_id)
    assert record.origin == "pacs" and record.route == "default"
    assert record.site_source == "headers" and record.site is not None
    assert record.site.startswith("acme-magnet-9000-")
    assert len(list((jobs.job_dir(job_id) / DICOM_DIR).iterdir())) == len(parts)
    assert jobs.path(job_id, "scan.nii.gz").is_file()
    # the series left the inbox: dispatching again makes no second job
    assert dispatch(api) == []
    assert jobs.job_ids() == [job_id]


def test_the_same_scanner_shares_a_site_and_another_scanner_gets_its_own(
    api: TestClient, pacs_settings: Settings, shifted_brain_case: PhantomCase
) -> None:
    one, other = Scanner(serial="1"), Scanner(serial="2")
    for scanner in (one, one, other):
        assert stow(api, series_parts(shifted_brain_case, scanner), KEY_ALL,
                    "/dicomweb/studies").status_code == 200  # fmt: skip
    dispatch(api)
    jobs = JobStore.from_settings(pacs_settings)
    sites = sorted(str(jobs.record(j).site) for j in jobs.job_ids())
    assert len(sites) == 3 and len(set(sites)) == 2


def test_a_route_with_a_site_needs_a_key_for_it_and_a_derived_site_needs_every_site(
    api: TestClient, pacs_settings: Settings, shifted_brain_case: PhantomCase
) -> None:
    parts = series_parts(shifted_brain_case)[:3]
    assert stow(api, parts, KEY_A, "/dicomweb/routes/fixed/studies").status_code == 200
    refused = stow(api, parts, KEY_A, "/dicomweb/studies?route=default")
    assert refused.status_code == 403, refused.text
    assert stow(api, parts, KEY_A, "/dicomweb/routes/nowhere/studies").status_code == 404


def test_refused_parts_are_listed_as_failed_with_a_reason_code(
    api: TestClient, pacs_settings: Settings, shifted_brain_case: PhantomCase
) -> None:
    good = series_parts(shifted_brain_case)[:2]
    bad = [(structured_report(), "application/dicom"), (b"not dicom at all", "application/dicom")]
    partly = stow(api, good + bad, KEY_ALL, "/dicomweb/studies")
    assert partly.status_code == 202, partly.text
    answer = Dataset.from_json(partly.json())
    assert len(answer.ReferencedSOPSequence) == 2
    assert len(answer.FailedSOPSequence) == 2
    assert all(item.FailureReason > 0 for item in answer.FailedSOPSequence)
    none = stow(api, bad, KEY_ALL, "/dicomweb/studies")
    assert none.status_code == 409


def test_stow_rs_refuses_other_content_types(api: TestClient) -> None:
    response = api.post(
        "/dicomweb/studies",
        content=b"{}",
        headers={**bearer(KEY_ALL), "Content-Type": "application/json"},
    )
    assert response.status_code == 415
    assert "multipart/related" in response.json()["detail"]


def test_an_unusable_series_becomes_a_failed_job_with_the_reason(
    api: TestClient, pacs_settings: Settings, shifted_brain_case: PhantomCase
) -> None:
    datasets = series_datasets(nib.load(shifted_brain_case.image), ids=SeriesIds())
    tilted = datasets[len(datasets) // 2]
    tilted.ImageOrientationPatient = [1, 0, 0, 0, 0, 1]  # a second orientation in one series
    parts = [(dataset_bytes(ds), "application/dicom") for ds in datasets]
    assert stow(api, parts, KEY_ALL, "/dicomweb/studies").status_code == 200
    (outcome,) = dispatch(api)
    assert outcome.status == "failed"
    jobs = JobStore.from_settings(pacs_settings)
    state = jobs.state(outcome.job_id)
    assert state.status == "failed"
    assert state.error is not None and "orientation" in state.error
    assert state.record.site is not None  # still derived: it decides who may see the job


def test_a_route_whose_model_is_unknown_fails_its_series_with_the_reason(
    api: TestClient, pacs_settings: Settings, shifted_brain_case: PhantomCase
) -> None:
    parts = series_parts(shifted_brain_case)
    assert stow(api, parts, KEY_ALL, "/dicomweb/routes/missing-model/studies").status_code == 200
    (outcome,) = dispatch(api)
    state = JobStore.from_settings(pacs_settings).state(outcome.job_id)
    assert state.status == "failed" and state.error is not None
    assert "no-such-model" in state.error


def _finished_seg_job(jobs: JobStore, seg: Path, study: str, site: str) -> str:
    job_id = new_job_id()
    with jobs.receiving(job_id) as staging:
        (staging / SEG).write_bytes(seg.read_bytes())
        record = JobRecord(
            id=job_id, created_at=time.time(), model="m", site=site, mode="none",
            scan_file="scan.nii.gz", source_format="dicom", origin="pacs", study_uid=study,
        )  # fmt: skip
        jobs.publish(staging, record)
    jobs.end(job_id, "finished")
    return job_id


def _seg(tmp_path: Path, study: str) -> Path:
    image = nib.Nifti1Image(
        np.random.default_rng(0).normal(100, 20, (12, 12, 4)).astype(np.float32), np.eye(4)
    )
    ds = series_datasets(image, ids=SeriesIds(study=study))[0]
    ds.Modality = "SEG"  # any instance of the study stands in for a SEG here
    ds.SeriesInstanceUID = generate_uid()
    path = tmp_path / f"{secrets.token_hex(4)}.dcm"
    path.write_bytes(dataset_bytes(ds))
    return path


def test_qido_and_wado_find_and_return_the_results_a_key_may_see(
    api: TestClient, pacs_settings: Settings, tmp_path: Path
) -> None:
    jobs = JobStore.from_settings(pacs_settings)
    study = str(generate_uid())
    mine, theirs = _seg(tmp_path, study), _seg(tmp_path, study)
    _finished_seg_job(jobs, mine, study, "site-a")
    _finished_seg_job(jobs, theirs, study, "site-b")

    listing = api.get(f"/dicomweb/studies/{study}/series", headers=bearer(KEY_A))
    assert listing.status_code == 200, listing.text
    (entry,) = [Dataset.from_json(item) for item in listing.json()]
    series = pydicom.dcmread(mine).SeriesInstanceUID
    assert entry.SeriesInstanceUID == series
    assert len(api.get(f"/dicomweb/studies/{study}/series", headers=bearer(KEY_ALL)).json()) == 2

    retrieved = api.get(f"/dicomweb/studies/{study}/series/{series}", headers=bearer(KEY_A))
    assert retrieved.status_code == 200
    assert retrieved.headers["content-type"].startswith("multipart/related")
    assert mine.read_bytes() in retrieved.content
    other = pydicom.dcmread(theirs).SeriesInstanceUID
    hidden = api.get(f"/dicomweb/studies/{study}/series/{other}", headers=bearer(KEY_A))
    assert hidden.status_code == 404
    empty = api.get(f"/dicomweb/studies/{generate_uid()}/series", headers=bearer(KEY_ALL))
    assert empty.status_code == 204


def test_series_wait_in_the_inbox_while_the_queue_cannot_take_jobs(
    api: TestClient, pacs_settings: Settings, shifted_brain_case: PhantomCase
) -> None:
    services = services_of(api)
    assert (
        stow(api, series_parts(shifted_brain_case), KEY_ALL, "/dicomweb/studies").status_code == 200
    )
    services.queue.stop()  # the embedded worker is gone: jobs cannot be queued
    assert services.queue.problem() is not None
    assert dispatch(api) == []
    assert JobStore.from_settings(pacs_settings).job_ids() == []
    assert len(services.inbox.idle_series(0, now=time.time() + 1)) == 1
    with client(pacs_settings) as restarted:  # the API back with a working queue
        (outcome,) = dispatch(restarted)
    assert outcome.status == "queued"


def test_a_re_sent_series_after_dispatch_makes_no_second_job(
    api: TestClient, pacs_settings: Settings, shifted_brain_case: PhantomCase
) -> None:
    parts = series_parts(shifted_brain_case)
    assert stow(api, parts, KEY_ALL, "/dicomweb/studies").status_code == 200
    assert len(dispatch(api)) == 1
    again = stow(api, parts, KEY_ALL, "/dicomweb/studies")  # the PACS sends it all again
    assert again.status_code == 200  # accepted, as duplicates
    assert dispatch(api) == []
    assert len(JobStore.from_settings(pacs_settings).job_ids()) == 1
