"""The one table from exceptions to HTTP status codes."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from fastapi.exceptions import RequestValidationError

from server.errors import (
    ForbiddenError,
    MalformedRequestError,
    PayloadTooLargeError,
    QueueUnavailableError,
    ResultNotReadyError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    error_response,
    status_of,
    validation_message,
)
from sitefit.exceptions import (
    ModelNotFoundError,
    ModelStoreError,
    SiteNotFoundError,
    VolumeContentError,
    VolumeReadError,
)
from sitefit.job_store import storage_error
from sitefit.jobs import JobNotFoundError
from tests.server.helpers import client, service_settings


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (UnauthorizedError("x"), 401),
        (ForbiddenError("x"), 403),
        (JobNotFoundError("x"), 404),
        (SiteNotFoundError("x"), 404),
        (ResultNotReadyError("x"), 409),
        (PayloadTooLargeError("x"), 413),
        (UnsupportedMediaTypeError("x"), 415),
        (MalformedRequestError("x"), 400),
        (ModelNotFoundError("x"), 422),
        (VolumeReadError("x"), 422),
        (VolumeContentError("x"), 422),
        (QueueUnavailableError("x"), 503),
        (ModelStoreError("x"), 500),
        (storage_error("write", OSError(errno.EACCES, "Permission denied")), 500),
        (storage_error("write", OSError(errno.ENOSPC, "No space left on device")), 507),
        (RequestValidationError([]), 422),
        (RuntimeError("a bug"), 500),
    ],
)
def test_status_of(error: BaseException, status: int) -> None:
    assert status_of(error) == status


def test_messages_are_kept_for_sitefit_errors_and_hidden_for_bugs() -> None:
    full = error_response(storage_error("store the upload", OSError(errno.ENOSPC, "x")))
    assert (
        full.status_code == 507 and b"job storage: cannot store the upload (disk full)" in full.body
    )
    bug = error_response(RuntimeError("secret internals"))
    assert bug.status_code == 500 and b"secret" not in bug.body
    unauthorized = error_response(UnauthorizedError("missing API key"))
    assert unauthorized.headers["www-authenticate"] == "Bearer"


def test_refused_parameters_are_one_line_naming_the_field_not_the_value(tmp_path: Path) -> None:
    # no lifespan (no `with`): these requests never reach the queue
    api = client(service_settings(tmp_path))
    long_id, long_site = "a" * 65, "s" * 65
    for method, path in (
        ("GET", f"/v1/jobs/{long_id}"),
        ("GET", f"/v1/jobs/{long_id}/mask"),
        ("GET", f"/v1/jobs/{long_id}/report"),
        ("DELETE", f"/v1/jobs/{long_id}"),
        ("GET", "/v1/jobs/" + "a" * 5000),
    ):
        response = api.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert list(response.json()) == ["detail"]
        assert response.json()["detail"].startswith("unknown job")
    for method in ("GET", "DELETE"):
        response = api.request(method, f"/v1/sites/{long_site}")
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail
        assert detail.startswith("invalid path parameter 'site': ") and "64" in detail
        assert long_site not in detail


def test_validation_message_counts_further_problems() -> None:
    error = RequestValidationError(
        [
            {"loc": ("query", "limit"), "msg": "Input should be a valid integer", "input": "x"},
            {"loc": ("body", "a", 0), "msg": "Field required", "input": None},
        ]
    )
    assert validation_message(error) == (
        "invalid query parameter 'limit': Input should be a valid integer (and 1 more problem(s))"
    )
    response = error_response(error)
    assert response.status_code == 422 and b'"x"' not in response.body
    only_body = RequestValidationError([{"loc": ("body", "a", 0), "msg": "Field required"}])
    assert validation_message(only_body) == "invalid request field 'a.0': Field required"


def test_the_openapi_document_shows_the_one_line_error_body_for_refused_parameters(
    tmp_path: Path,
) -> None:
    document = client(service_settings(tmp_path)).get("/openapi.json").json()
    error_body = {"$ref": "#/components/schemas/ErrorResponse"}
    refusals = [
        operation["responses"]["422"]["content"]["application/json"]["schema"]
        for operations in document["paths"].values()
        for operation in operations.values()
        if "422" in operation["responses"]
    ]
    assert len(refusals) >= 7  # the upload, four job routes, two site routes
    assert all(schema == error_body for schema in refusals)
    assert "HTTPValidationError" not in str(document)
