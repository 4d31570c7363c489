"""The one table from exceptions to HTTP status codes."""

from __future__ import annotations

import errno

import pytest

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
