"""DICOMweb on the API: STOW-RS in, QIDO-RS and WADO-RS for the SEGs sitefit made.

- ``POST /dicomweb/studies?route=NAME`` and ``POST /dicomweb/routes/{route}/studies`` (STOW-RS,
  ``multipart/related; type="application/dicom"``): each part is streamed to disk and checked
  like a DIMSE instance by the :class:`~sitefit.inbox.Inbox`; its series becomes a job once
  complete (:mod:`server.dispatch`). Without ``route``, the route named ``default`` is used.
  The answer is the standard STOW-RS response dataset: ``ReferencedSOPSequence`` for the
  stored instances, ``FailedSOPSequence`` with a failure reason for the refused ones; 200 when
  all were stored, 202 when some were, 409 when none was. The caller's key must reach the
  route's site (a route that derives its site from the scanner headers needs a ``*`` key).
- ``GET /dicomweb/studies/{study}/series`` (QIDO-RS): the SEG series sitefit made for that
  study, from the finished jobs the key may see.
- ``GET /dicomweb/studies/{study}/series/{series}`` (WADO-RS): that series' instances as
  ``multipart/related; type="application/dicom"``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
import pydicom
from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom.dataset import Dataset
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from server.auth import Caller, CallerDep
from server.errors import (
    MalformedRequestError,
    PayloadTooLargeError,
    RouteNotFoundError,
    UnsupportedMediaTypeError,
)
from server.errors import responses as error_responses
from server.services import Services, ServicesDep
from sitefit.inbox import CANNOT_UNDERSTAND, Received
from sitefit.job_store import SEG, storage_error
from sitefit.jobs import JobNotFoundError, JobRecord

log = logging.getLogger("sitefit.server")
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

DEFAULT_ROUTE = "default"
DICOM = b"application/dicom"
DICOM_JSON = "application/dicom+json"
_CHUNK = 1 << 20

Uid = Annotated[str, PathParam(max_length=64, pattern=r"^[0-9.]+$", description="a DICOM UID")]
RouteName = Annotated[str, PathParam(max_length=64, description="a configured route")]


def _route(services: Services, caller: Caller, name: str | None) -> str:
    routes = services.settings.dicom_routes
    chosen = name or DEFAULT_ROUTE
    route = routes.get(chosen)
    if route is None:
        if name is None:
            raise RouteNotFoundError(
                "no route given and none is named 'default': use "
                "/dicomweb/routes/{route}/studies or ?route=NAME"
            )
        raise RouteNotFoundError(f"unknown route {name[:64]!r}")
    caller.require(route.site)
    return chosen


def _boundary(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/related":
        shown = kind.decode("latin-1")[:60] or "none"
        raise UnsupportedMediaTypeError(
            f'content type {shown!r}: expected multipart/related; type="application/dicom"'
        )
    part_type = options.get(b"type", DICOM).strip(b'"')
    if part_type != DICOM:
        raise UnsupportedMediaTypeError(
            "multipart/related of type 'application/dicom' only (no metadata and bulk data)"
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedRequestError("multipart/related without a boundary")
    return boundary


class _Parts:
    """python-multipart callbacks writing each part to its own temporary file; a part is
    handed to the inbox as soon as it is complete, so a long request holds one part on disk
    outside the inbox, not all of them."""

    def __init__(self, directory: Path, max_parts: int) -> None:
        self.directory = directory
        self.max_parts = max_parts
        self.parts = 0
        self.files: list[tuple[Path, bool]] = []  # (file, its Content-Type was DICOM)
        self.completed: list[tuple[Path, bool]] = []  # complete parts not handed over yet
        self.pending: list[bytes] = []
        self._handle: Any = None
        self._name = b""
        self._value = b""
        self._type = DICOM
        self.complete = False

    def on_part_begin(self) -> None:
        self._type = DICOM

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if self._name.lower() == b"content-type":
            self._type = parse_options_header(self._value)[0]
        self._name, self._value = b"", b""

    def on_headers_finished(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise PayloadTooLargeError(
                f"more than {self.max_parts} instances in one request "
                "(SITEFIT_DICOM_MAX_SERIES_INSTANCES); send them in several"
            )
        path = self.directory / f"part-{secrets.token_hex(8)}"
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as error:
            raise storage_error("store a STOW-RS part", error) from None
        self._handle = os.fdopen(descriptor, "wb")
        self.files.append((path, self._type == DICOM))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.pending.append(data[start:end])

    def on_part_end(self) -> None:
        self.write_pending()
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self.completed.append(self.files[-1])

    def on_end(self) -> None:
        self.complete = True

    def write_pending(self) -> None:
        if self._handle is None or not self.pending:
            self.pending.clear()
            return
        try:
            for chunk in self.pending:
                self._handle.write(chunk)
        except OSError as error:
            raise storage_error("store a STOW-RS part", error) from None
        self.pending.clear()

    def close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()


def _stored_item(received: Received) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = received.sop_class_uid
    item.ReferencedSOPInstanceUID = received.sop_instance_uid
    return item


def _failed_item(received: Received | None) -> Dataset:
    item = Dataset()
    if received is not None and received.sop_class_uid:
        item.ReferencedSOPClassUID = received.sop_class_uid
    if received is not None and received.sop_instance_uid:
        item.ReferencedSOPInstanceUID = received.sop_instance_uid
    code = received.failure_reason if received is not None else None
    item.FailureReason = code if code is not None else CANNOT_UNDERSTAND
    return item


@router.post(
    "/studies",
    responses={200: {"content": {DICOM_JSON: {}}}, **error_responses(400, 404, 413, 415)},
    summary="STOW-RS: store instances; each complete series becomes a job",
)
async def store_instances(
    request: Request,
    services: ServicesDep,
    caller: CallerDep,
    route: Annotated[str | None, Query(max_length=64, description="route name")] = None,
) -> Response:
    return await _store(request, services, caller, route)


@router.post(
    "/routes/{route}/studies",
    responses={200: {"content": {DICOM_JSON: {}}}, **error_responses(400, 404, 413, 415)},
    summary="STOW-RS to a named route (a PACS's DICOMweb destination URL ends in the route)",
)
async def store_instances_on_route(
    route: RouteName, request: Request, services: ServicesDep, caller: CallerDep
) -> Response:
    return await _store(request, services, caller, route)


async def _store(
    request: Request, services: Services, caller: Caller, name: str | None
) -> Response:
    route = _route(services, caller, name)
    boundary = _boundary(request.headers.get("content-type"))
    limit = services.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request of {int(declared):,} bytes exceeds {limit:,} bytes")
    inbox = services.inbox
    max_parts = services.settings.dicom_max_series_instances
    parts = _Parts(await run_in_threadpool(inbox.temp_dir), max_parts)
    callbacks = {
        "on_part_begin": parts.on_part_begin,
        "on_part_data": parts.on_part_data,
        "on_part_end": parts.on_part_end,
        "on_header_field": parts.on_header_field,
        "on_header_value": parts.on_header_value,
        "on_header_end": parts.on_header_end,
        "on_headers_finished": parts.on_headers_finished,
        "on_end": parts.on_end,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    received = 0
    outcomes: list[Received | None] = []

    async def hand_over() -> None:
        complete, parts.completed = parts.completed, []
        outcomes.extend(await run_in_threadpool(_keep, services, route, complete))

    try:
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLargeError(f"request exceeds the limit of {limit:,} bytes")
                parser.write(chunk)
                if parts.pending:
                    await anyio.to_thread.run_sync(parts.write_pending)
                if parts.completed:
                    await hand_over()
            parser.finalize()
        except FormParserError as error:
            raise MalformedRequestError(f"malformed multipart body ({error})") from None
        if not parts.complete:
            raise MalformedRequestError("incomplete multipart body: no closing boundary")
        parts.close()
        await hand_over()
    finally:
        parts.close()
        for path, _ in parts.files:  # what the inbox did not take (it consumes what it gets)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
    return _stow_response(outcomes, route, caller)


def _keep(services: Services, route: str, files: list[tuple[Path, bool]]) -> list[Received | None]:
    """Hand each part to the inbox (``None``: a part that was not application/dicom)."""
    outcomes: list[Received | None] = []
    for path, is_dicom in files:
        outcomes.append(services.inbox.store_file(route, path) if is_dicom else None)
    return outcomes


def _stow_response(outcomes: list[Received | None], route: str, caller: Caller) -> Response:
    response = Dataset()
    stored = [r for r in outcomes if r is not None and r.status in ("stored", "duplicate")]
    failed = [r for r in outcomes if r is None or r.status == "refused"]
    if stored:
        response.ReferencedSOPSequence = [_stored_item(r) for r in stored]
    if failed:
        response.FailedSOPSequence = [_failed_item(r) for r in failed]
    for outcome in failed:
        reason = outcome.reason if outcome is not None else "part is not application/dicom"
        log.info("STOW-RS on route %s by %s: instance refused: %s", route, caller.name, reason)
    log.info(
        "STOW-RS on route %s by %s: %d stored, %d refused",
        route,
        caller.name,
        len(stored),
        len(failed),
    )
    if not outcomes:
        status = 400
    elif not failed:
        status = 200
    elif stored:
        status = 202
    else:
        status = 409
    if status == 400:
        raise MalformedRequestError("no parts: expected one or more DICOM instances")
    return JSONResponse(response.to_json_dict(), status_code=status, media_type=DICOM_JSON)


# -- QIDO-RS and WADO-RS: the SEGs sitefit made --------------------------------------------


def _segs(services: Services, caller: Caller, study: str) -> Iterator[tuple[JobRecord, Path]]:
    """The SEG files of the finished jobs of ``study`` that the caller may see."""
    store = services.store
    for job_id in store.job_ids():
        try:
            record = store.record(job_id)
        except Exception:  # a job deleted or half-written meanwhile: not a result
            continue
        if record.study_uid != study or not caller.may_use(record.site):
            continue
        path = store.path(job_id, SEG)
        if path.is_file():
            yield record, path


def _seg_header(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # removed by retention meanwhile, or unreadable: not listed
        return None


def _series_listing(services: Services, caller: Caller, study: str, base: str) -> list[Any]:
    found: dict[str, dict[str, Any]] = {}
    for _record, path in _segs(services, caller, study):
        header = _seg_header(path)
        if header is None:
            continue
        series = str(header.SeriesInstanceUID)
        entry = Dataset()
        entry.StudyInstanceUID = study
        entry.SeriesInstanceUID = series
        entry.Modality = header.get("Modality", "SEG")
        entry.SeriesNumber = header.get("SeriesNumber")
        entry.SeriesDescription = header.get("SeriesDescription", "")
        entry.NumberOfSeriesRelatedInstances = 1 + int(
            found.get(series, {}).get("00201209", {}).get("Value", [0])[0]
        )
        entry.RetrieveURL = f"{base}/dicomweb/studies/{study}/series/{series}"
        found[series] = entry.to_json_dict()
    return list(found.values())


@router.get(
    "/studies/{study}/series",
    responses={200: {"content": {DICOM_JSON: {}}}, **error_responses()},
    summary="QIDO-RS: the SEG series sitefit made for a study",
)
async def search_series(
    study: Uid, request: Request, services: ServicesDep, caller: CallerDep
) -> Response:
    base = str(request.base_url).rstrip("/")
    listing = await run_in_threadpool(_series_listing, services, caller, study, base)
    if not listing:  # QIDO-RS: no match is an empty 204
        return Response(status_code=204)
    return JSONResponse(listing, media_type=DICOM_JSON)


@router.get(
    "/studies/{study}/series/{series}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"multipart/related": {}}, "description": "the series' instances"},
        **error_responses(404),
    },
    summary="WADO-RS: a SEG series sitefit made, as multipart/related application/dicom",
)
async def retrieve_series(
    study: Uid, series: Uid, services: ServicesDep, caller: CallerDep
) -> StreamingResponse:
    def find() -> list[Path]:
        paths = []
        for _record, path in _segs(services, caller, study):
            header = _seg_header(path)
            if header is not None and str(header.SeriesInstanceUID) == series:
                paths.append(path)
        return paths

    paths = await run_in_threadpool(find)
    if not paths:
        raise JobNotFoundError("no such series of sitefit's results in that study")
    handles = []
    for path in paths:
        try:
            handles.append(path.open("rb"))
        except OSError:
            continue  # deleted meanwhile
    if not handles:
        raise JobNotFoundError("no such series of sitefit's results in that study")
    boundary = secrets.token_hex(16)
    media_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return StreamingResponse(_multipart(handles, boundary), media_type=media_type)


def _multipart(handles: list[Any], boundary: str) -> Iterator[bytes]:
    for handle in handles:
        with handle:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            while data := handle.read(_CHUNK):
                yield data
            yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


__all__ = ["router"]
