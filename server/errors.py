"""The HTTP errors of the API and the one place where exceptions become status codes.

Route code raises exceptions (sitefit's own, or the request errors below); :func:`status_of`
maps each class to a status, and the handlers installed by :func:`install_error_handlers`
answer ``{"detail": "<one line>"}``. Messages are the exceptions' own one-line texts, which
never hold PHI; a parameter FastAPI itself refuses (``RequestValidationError``) is a 422 that
names the field and the rule, not the value sent; anything unexpected is a 500 whose body says
only that, with the traceback in the server log.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from sitefit.deliveries import DeliveryNotFoundError, DeliveryStateError
from sitefit.exceptions import (
    DeviceUnavailableError,
    InvalidInputError,
    ModelNotFoundError,
    ModelStoreError,
    SitefitError,
    SiteNotFoundError,
)
from sitefit.job_store import JobStorageError
from sitefit.jobs import JobNotFoundError

log = logging.getLogger("sitefit.server")


class ErrorResponse(BaseModel):
    detail: str


class UnauthorizedError(SitefitError):
    """No API key, or an unknown one."""


class ForbiddenError(SitefitError):
    """The API key is valid but not for this site."""


class MalformedRequestError(InvalidInputError):
    """The request itself is broken: not parseable multipart, a missing field."""


class PayloadTooLargeError(InvalidInputError):
    """The request body is larger than the configured limit."""


class UnsupportedMediaTypeError(InvalidInputError):
    """Not multipart/form-data, or a file that is neither NIfTI nor a zip."""


class ResultNotReadyError(SitefitError):
    """The job has no mask or report (yet, or because it failed)."""


class NoSuchResultError(SitefitError):
    """The job will never have that result (the DICOM SEG of a job whose input was NIfTI)."""


class RouteNotFoundError(SitefitError):
    """No PACS route of that name is configured."""


class QueueUnavailableError(SitefitError):
    """The job queue (Redis, or the embedded worker) cannot take jobs right now."""


_STATUS: list[tuple[type[BaseException], int]] = [
    (UnauthorizedError, 401),
    (ForbiddenError, 403),
    (JobNotFoundError, 404),
    (SiteNotFoundError, 404),
    (DeliveryNotFoundError, 404),
    (DeliveryStateError, 409),
    (RouteNotFoundError, 404),
    (NoSuchResultError, 404),
    (ResultNotReadyError, 409),
    (PayloadTooLargeError, 413),
    (UnsupportedMediaTypeError, 415),
    (MalformedRequestError, 400),
    (ClientDisconnect, 400),
    (RequestValidationError, 422),  # a path or query parameter FastAPI itself refused
    (ModelNotFoundError, 422),  # models are only named in uploads: the upload is invalid
    (InvalidInputError, 422),
    (QueueUnavailableError, 503),
    (DeviceUnavailableError, 503),
    (ModelStoreError, 500),
    (SitefitError, 500),
]


def status_of(error: BaseException) -> int:
    """The HTTP status for an exception: the first matching class in the table above."""
    if isinstance(error, JobStorageError) and error.disk_full:
        return 507
    for kind, status in _STATUS:
        if isinstance(error, kind):
            return status
    return 500


def error_response(error: BaseException) -> JSONResponse:
    status = status_of(error)
    if isinstance(error, SitefitError):
        detail = str(error)
    elif isinstance(error, ClientDisconnect):
        detail = "the client disconnected before the upload was complete"
    elif isinstance(error, RequestValidationError):
        detail = validation_message(error)
    else:
        detail = "internal server error; see the server log"
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status >= 500:
        log.error("%d: %s", status, detail, exc_info=not isinstance(error, SitefitError))
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


_PLACES = {"path": "path parameter", "query": "query parameter", "header": "header"}


def validation_message(error: RequestValidationError) -> str:
    """One line naming the refused field and the rule it broke, never the value sent."""
    problems = list(error.errors())
    if not problems:
        return "invalid request"
    first = problems[0]
    location = [str(part) for part in first.get("loc", ())]
    place = _PLACES.get(location[0], "request field") if location else "request field"
    name = ".".join(location[1:]) or (location[0] if location else "?")
    rule = (str(first.get("msg", "")).strip().splitlines() or ["invalid value"])[0][:200]
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return f"invalid {place} {name!r}: {rule}{more}"


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with :func:`error_response`, and say so in the OpenAPI document."""

    async def handle(_request: Request, error: Exception) -> JSONResponse:
        return error_response(error)

    app.add_exception_handler(SitefitError, handle)
    app.add_exception_handler(ClientDisconnect, handle)
    app.add_exception_handler(RequestValidationError, handle)  # not FastAPI's list of errors
    app.add_exception_handler(Exception, handle)
    _document_one_line_validation_errors(app)


def _document_one_line_validation_errors(app: FastAPI) -> None:
    """FastAPI documents a 422 with its list of validation errors on every route that takes
    parameters; the handler above answers those with ``ErrorResponse``, so the document
    says that instead (and no longer carries FastAPI's validation schemas)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        fastapi_schema = "#/components/schemas/HTTPValidationError"
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                response = operation.get("responses", {}).get("422")
                content = (response or {}).get("content", {}).get("application/json", {})
                if content.get("schema", {}).get("$ref") == fastapi_schema:
                    response["description"] = "invalid parameter: the message names it"
                    content["schema"] = {"$ref": "#/components/schemas/ErrorResponse"}
        schemas = document.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (401, "no API key, or an unknown one"),
        (403, "the API key may not use this site"),
    )
}
"""Responses every authenticated route can give, for the OpenAPI document."""


def responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI ``responses`` for a route: the common ones plus ``codes``."""
    texts = {
        400: "malformed request",
        404: "unknown (or expired) object",
        409: "the job has no result (yet)",
        413: "upload too large",
        415: "not multipart/form-data, or an unsupported file type",
        422: "invalid input: the message says what is wrong",
        500: "server error: the message says what failed",
        503: "the job queue is unavailable: nothing was stored",
        507: "job storage is full",
    }
    extra: dict[int | str, dict[str, object]] = {
        code: {"model": ErrorResponse, "description": texts[code]} for code in codes
    }
    return {**ERROR_RESPONSES, **extra}
