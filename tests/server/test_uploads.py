"""``server.uploads.receive`` on real files: what it stores, and a storage failure (no HTTP)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from server.errors import MalformedRequestError, PayloadTooLargeError
from server.uploads import Upload, receive
from sitefit.job_store import JobStorageError

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
