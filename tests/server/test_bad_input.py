"""Bad input over HTTP: each a 4xx with a useful message, and nothing stored or queued.

The app queues on a real Redis (no worker listens), so "nothing queued" is the RQ queue's
length, and "nothing stored" is the job directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from rq import Queue

from tests.conftest import PhantomCase
from tests.server.helpers import client, make_home, service_settings
from tests.server.payloads import (
    dicom_slices,
    gzip_bomb,
    gzip_of,
    huge_header_nifti,
    nifti_bytes,
    structured_report,
    truncated_gzip,
    with_empty_element,
    with_text_value,
    write_zip,
)
from tests.server.processes import RedisProcess

QUEUE = "bad-input"


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory,
    settings: Any,
    brain_model: str,
    redis_server: RedisProcess,
) -> Iterator[tuple[TestClient, Path]]:
    home = make_home(tmp_path_factory.mktemp("bad-input"), settings.models_dir)
    app_settings = service_settings(home, redis_url=redis_server.url, queue_name=QUEUE)
    with client(app_settings) as test_client:
        yield test_client, home


def _zip_of(tmp_path: Path, members: list[tuple[str, bytes]]) -> bytes:
    return write_zip(tmp_path / "upload.zip", members).read_bytes()


def _slices() -> list[bytes]:
    return dicom_slices(np.arange(4 * 4 * 3).reshape(4, 4, 3) * 1.0, np.eye(4))


def _nifti_of(data: np.ndarray) -> bytes:
    return bytes(nib.Nifti1Image(data.astype(np.float32), np.eye(4)).to_bytes())


def _one_voxel(value: float) -> np.ndarray:
    data = np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    data[3, 4, 5] = value
    return data


# scans the header check passes but no model can use: refused before queueing, not by the worker
_BAD_VOXELS = {
    "NaN voxel": (_one_voxel(np.nan), "found 1 NaN voxel"),
    "infinite voxel": (_one_voxel(np.inf), "found 1 infinite voxel"),
    "constant voxels": (np.full((8, 8, 8), 3.0), "every voxel has the value 3"),
}


CASES: dict[str, tuple[Callable[[Path, PhantomCase], tuple[str, bytes]], dict[str, str], int, str]]
CASES = {
    "empty file": (lambda t, c: ("scan.nii.gz", b""), {}, 422, "empty"),
    "truncated gzip": (lambda t, c: ("scan.nii.gz", truncated_gzip(c.image)), {}, 422, "truncated"),
    "gzip bomb": (lambda t, c: ("scan.nii.gz", gzip_bomb(64 * 2**20)), {}, 422, "gzip bomb"),
    "10^5^3 header": (lambda t, c: ("scan.nii", huge_header_nifti()), {}, 422, "voxels"),
    "gzip named .nii": (
        lambda t, c: ("scan.nii", c.image.read_bytes()),
        {},
        422,
        "gzip-compressed",
    ),
    "non-image DICOM": (
        lambda t, c: (
            "series.zip",
            _zip_of(
                t,
                [(f"a{i}.dcm", s) for i, s in enumerate(_slices()[:2])]
                + [("sr.dcm", structured_report())],
            ),
        ),
        {},
        422,
        "non-image DICOM object",
    ),
    "path traversal": (
        lambda t, c: ("series.zip", _zip_of(t, [("../../evil.dcm", _slices()[0])])),
        {},
        422,
        "unsafe path",
    ),
    "several series": (
        lambda t, c: (
            "series.zip",
            _zip_of(t, [(f"{i}.dcm", s) for i, s in enumerate(_slices() + _slices())]),
        ),
        {},
        422,
        "more than one series",
    ),
    "empty Rows in DICOM": (
        lambda t, c: (
            "series.zip",
            _zip_of(
                t, [(f"{i}.dcm", with_empty_element(s, "Rows")) for i, s in enumerate(_slices())]
            ),
        ),
        {},
        422,
        "instance #1 has no Rows",
    ),
    "non-numeric RescaleSlope in DICOM": (
        lambda t, c: (
            "series.zip",
            _zip_of(
                t,
                [
                    (f"{i}.dcm", with_text_value(s, "RescaleSlope") if i == 1 else s)
                    for i, s in enumerate(_slices())
                ],
            ),
        ),
        {},
        422,
        "instance #2 has no valid RescaleSlope",
    ),
    "constant DICOM series": (
        lambda t, c: (
            "series.zip",
            _zip_of(
                t,
                [
                    (f"{i}.dcm", s)
                    for i, s in enumerate(dicom_slices(np.full((4, 4, 3), 5.0), np.eye(4)))
                ],
            ),
        ),
        {},
        422,
        "DICOM series: every voxel has the value 5",
    ),
    "not a zip": (lambda t, c: ("series.zip", b"PK but not really"), {}, 422, "not a readable zip"),
    "wrong file type": (lambda t, c: ("scan.png", b"\x89PNG"), {}, 415, "unsupported file type"),
    "unknown model": (
        lambda t, c: ("scan.nii.gz", c.image.read_bytes()),
        {"model": "no-such-model"},
        422,
        "unknown model 'no-such-model'",
    ),
    "invalid site name": (
        lambda t, c: ("scan.nii.gz", c.image.read_bytes()),
        {"site": "../other-site"},
        422,
        "invalid site name",
    ),
    "invalid mode": (
        lambda t, c: ("scan.nii.gz", c.image.read_bytes()),
        {"mode": "turbo"},
        422,
        "invalid mode",
    ),
    "unknown part": (
        lambda t, c: ("scan.nii.gz", c.image.read_bytes()),
        {"patient_name": "DOE^JOHN"},
        400,
        "unexpected part",
    ),
}


for _what, (_data, _reason) in _BAD_VOXELS.items():
    CASES[f"{_what} (.nii)"] = (lambda t, c, d=_data: ("scan.nii", _nifti_of(d)), {}, 422, _reason)
    CASES[f"{_what} (.nii.gz)"] = (
        lambda t, c, d=_data: ("scan.nii.gz", gzip_of(_nifti_of(d))),
        {},
        422,
        _reason,
    )


def _assert_nothing_queued(home: Path, redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    assert Queue(QUEUE, connection=connection).count == 0
    jobs = home / "jobs"
    assert not [p for p in jobs.iterdir() if not p.name.startswith(".")]
    assert not list((jobs / ".incoming").iterdir())


@pytest.mark.parametrize("case", list(CASES))
def test_bad_upload_is_refused_with_a_message_and_nothing_queued(
    api: tuple[TestClient, Path],
    case: str,
    tmp_path: Path,
    shifted_brain_case: PhantomCase,
    brain_model: str,
    redis_server: RedisProcess,
) -> None:
    test_client, home = api
    build, fields, status, message = CASES[case]
    name, data = build(tmp_path, shifted_brain_case)
    form = {"model": brain_model, "site": "site-a", "mode": "none", **fields}
    response = test_client.post(
        "/v1/jobs", files={"file": (name, data, "application/octet-stream")}, data=form
    )
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert message in detail
    assert "DOE" not in detail
    _assert_nothing_queued(home, redis_server.url)


def test_requests_that_are_not_uploads(
    api: tuple[TestClient, Path], brain_model: str, redis_server: RedisProcess
) -> None:
    test_client, home = api
    as_json = test_client.post("/v1/jobs", json={"model": brain_model})
    assert as_json.status_code == 415 and "multipart/form-data" in as_json.json()["detail"]
    no_file = test_client.post("/v1/jobs", files={"model": (None, brain_model)})
    assert no_file.status_code == 400 and "'file'" in no_file.json()["detail"]
    garbage = test_client.post(
        "/v1/jobs", content=b"garbage", headers={"content-type": "multipart/form-data"}
    )
    assert garbage.status_code == 400
    _assert_nothing_queued(home, redis_server.url)


def test_reference_on_another_grid_is_refused(
    api: tuple[TestClient, Path],
    shifted_brain_case: PhantomCase,
    brain_model: str,
    redis_server: RedisProcess,
) -> None:
    test_client, home = api
    files = {
        "file": ("scan.nii.gz", shifted_brain_case.image.read_bytes()),
        "reference": ("labels.nii", nifti_bytes((8, 8, 8))),
    }
    response = test_client.post("/v1/jobs", files=files, data={"model": brain_model})
    assert response.status_code == 422 and "scan's voxel grid" in response.json()["detail"]
    _assert_nothing_queued(home, redis_server.url)


def test_a_good_upload_is_queued(
    api: tuple[TestClient, Path],
    shifted_brain_case: PhantomCase,
    brain_model: str,
    redis_server: RedisProcess,
) -> None:
    """The control: the same app and the same scan, well-formed, reach the queue."""
    test_client, home = api
    files = {
        "file": ("scan.nii.gz", shifted_brain_case.image.read_bytes()),
        "reference": ("labels.nii.gz", shifted_brain_case.label.read_bytes()),
    }
    response = test_client.post("/v1/jobs", files=files, data={"model": brain_model})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    queue = Queue(QUEUE, connection=redis.Redis.from_url(redis_server.url))
    assert queue.job_ids == [job_id]
    assert test_client.delete(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
    assert queue.count == 0
    assert test_client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
    assert test_client.delete(f"/v1/jobs/{job_id}").status_code == 200
    _assert_nothing_queued(home, redis_server.url)
