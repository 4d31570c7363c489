"""``server.uploads.receive`` on real files: what it stores, with which modes, and a storage
failure (no HTTP); and the modes of a whole job's files, over HTTP."""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from server.errors import MalformedRequestError, PayloadTooLargeError
from server.uploads import Upload, receive
from sitefit.job_store import DICOM_DIR, JOB_FILE_MODE, JobStorageError
from tests.conftest import PhantomCase
from tests.server.helpers import client, service_settings, upload, wait_for_status
from tests.server.payloads import nifti_to_dicom_zip

BOUNDARY = b"sitefit-test-boundary"


def _body(scan: bytes, fields: dict[str, str]) -> bytes:
    parts = [
        b"--" + BOUNDARY + b"\r\n"
        b'Content-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value.encode()
        for name, value in fields.items()
    ]
    parts.append(
        b"--" + BOUNDARY + b"\r\n"
        b'Content-Disposition: form-data; name="file"; filename="DOE^JOHN.nii.gz"\r\n'
        b"Content-Type: application/gzip\r\n\r\n" + scan
    )
    return b"\r\n".join(parts) + b"\r\n--" + BOUNDARY + b"--\r\n"


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def _receive(body: bytes, staging: Path) -> Upload:
    async def run() -> Upload:
        return await receive(_chunks(body, 1000), BOUNDARY, staging, max_bytes=10**6)

    return anyio.run(run)


def test_stores_the_whole_file_under_a_fixed_name(tmp_path: Path) -> None:
    scan = os.urandom(50_000)
    upload = _receive(_body(scan, {"model": "tiny", "site": "a"}), tmp_path)
    assert upload.fields == {"model": "tiny", "site": "a"}
    stored = upload.files["file"]
    assert stored.path == tmp_path / "scan.nii.gz" and stored.size == len(scan)
    assert stored.path.read_bytes() == scan
    assert [p.name for p in tmp_path.iterdir()] == ["scan.nii.gz"]


def test_missing_staging_directory_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(JobStorageError, match="cannot store the upload"):
        _receive(_body(b"x" * 100, {}), tmp_path / "gone")


@pytest.mark.parametrize("cut", [3, 40, 200])  # in the closing boundary, the file, its headers
def test_a_body_cut_off_before_its_closing_boundary_is_refused(tmp_path: Path, cut: int) -> None:
    body = _body(b"x" * 100, {"model": "tiny", "mode": "none"})
    # the fields come first: mode=none would silently become the default if the cut were taken
    body = body[: len(body) - cut]
    with pytest.raises(MalformedRequestError, match="incomplete multipart body"):
        _receive(body, tmp_path)


def test_the_limit_counts_the_whole_body_epilogue_included(tmp_path: Path) -> None:
    body = _body(b"x" * 100, {"model": "tiny"}) + b"junk after the closing boundary" * 40_000
    with pytest.raises(PayloadTooLargeError, match="exceeds the limit"):
        _receive(body, tmp_path)


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)  # the usual umask: it alone would make new files world-readable
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("umask_022")
def test_stored_files_are_not_world_readable(tmp_path: Path) -> None:
    _receive(_body(b"x" * 100, {"model": "tiny"}), tmp_path)
    assert stat.S_IMODE((tmp_path / "scan.nii.gz").stat().st_mode) == JOB_FILE_MODE


@pytest.mark.usefixtures("umask_022")
def test_a_jobs_scan_mask_and_directory_are_not_world_readable(
    tmp_path: Path, service_home: Path, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    zipped = nifti_to_dicom_zip(shifted_brain_case.image, tmp_path / "series.zip")
    with client(service_settings(service_home)) as api:
        ids = [
            upload(api, scan, brain_model).json()["id"]
            for scan in (shifted_brain_case.image, zipped)
        ]
        for job_id in ids:
            assert wait_for_status(api, job_id, ("finished", "failed"))["status"] == "finished"
    for job_id in ids:  # a NIfTI upload as received, then a DICOM series converted
        job = service_home / "jobs" / job_id
        for path in (job, job / "scan.nii.gz", job / "mask.nii.gz", job / "job.json"):
            assert path.stat().st_mode & 0o007 == 0, f"{path.name}: {path.stat().st_mode:o}"
    # the DICOM job keeps its source instances (a SEG references them), not the zip
    dicom_job = service_home / "jobs" / ids[1]
    instances = sorted((dicom_job / DICOM_DIR).iterdir())
    slices = zipfile.ZipFile(zipped).namelist()
    assert [p.name for p in instances] == [f"{i:04d}.dcm" for i in range(1, len(slices) + 1)]
    for path in (dicom_job / DICOM_DIR, *instances):
        assert path.stat().st_mode & 0o007 == 0, f"{path.name}: {path.stat().st_mode:o}"
    assert not (dicom_job / "scan.zip").exists()
