"""``/v1/jobs``: upload a scan (202), poll its status, download mask and report, cancel.

Upload order, so that bad input never reaches the queue: key and content type, queue
reachable, body streamed into a private staging directory within the size limit, fields
checked (site name, the key's sites, mode, model known), scan and reference validated, then
the job is published in the store and queued; if publishing or queueing fails the job is
deleted (queueing: the answer is 503), so no job the client was refused runs later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Annotated, BinaryIO

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from model_store.sites import check_site
from server import uploads
from server.auth import Caller, CallerDep
from server.errors import (
    MalformedRequestError,
    PayloadTooLargeError,
    QueueUnavailableError,
    ResultNotReadyError,
)
from server.errors import responses as error_responses
from server.schemas import JobCreated, JobDeleted, JobLinks, JobView
from server.services import Services, ServicesDep
from server.validation import check_reference, check_scan
from sitefit.job_store import MASK, REPORT, JobStorageError, storage_error
from sitefit.jobs import JobRecord, JobState, new_job_id, validate_mode
from sitefit.report import Report

log = logging.getLogger("sitefit.server")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
# no length limit here: check_job_id answers 404 for anything but 32 hex digits
JobId = Annotated[str, Path(description="job id (32 hex digits)")]

_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "model"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "scan: .nii, .nii.gz, or .zip of one DICOM series",
                        },
                        "model": {"type": "string", "description": "NAME or NAME@VERSION"},
                        "site": {"type": "string", "description": "scanner site"},
                        "mode": {
                            "type": "string",
                            "enum": ["auto", "adapt", "cached", "none"],
                            "default": "auto",
                        },
                        "reference": {
                            "type": "string",
                            "format": "binary",
                            "description": "optional reference labels on the scan's grid",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=202,
    response_model=JobCreated,
    openapi_extra=_UPLOAD_DOC,
    responses=error_responses(400, 413, 415, 422, 500, 503, 507),
    summary="Upload a scan and queue a segmentation job",
)
async def create_job(request: Request, services: ServicesDep, caller: CallerDep) -> JobCreated:
    settings = services.settings
    boundary = uploads.require_multipart(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise PayloadTooLargeError(
            f"upload of {int(declared):,} bytes exceeds the limit of "
            f"{settings.max_upload_bytes:,} bytes"
        )
    problem = await run_in_threadpool(services.queue.problem)
    if problem is not None:
        raise QueueUnavailableError(f"job queue unavailable: {problem}; nothing was queued")
    job_id = new_job_id()
    with services.store.receiving(job_id) as staging:
        upload = await uploads.receive(
            request.stream(), boundary, staging, settings.max_upload_bytes
        )
        record = await run_in_threadpool(_check_upload, services, caller, upload, job_id)
        try:  # a job the client is told failed must not be left published, never queued
            await run_in_threadpool(services.store.publish, staging, record)
            await run_in_threadpool(services.queue.submit, job_id)
        except Exception:
            await run_in_threadpool(services.store.delete, job_id)
            raise
    services.metrics.submitted.labels(record.mode).inc()
    log.info(
        "job %s: queued (model %s, site %s, mode %s, %s, by %s)",
        job_id,
        record.model,
        record.site,
        record.mode,
        record.source_format,
        caller.name,
    )
    return JobCreated(id=job_id, status="queued", links=JobLinks.of(job_id))


def _check_upload(
    services: Services, caller: Caller, upload: uploads.Upload, job_id: str
) -> JobRecord:
    fields = upload.fields
    model = fields.get("model", "")
    if not model:
        raise MalformedRequestError("missing field 'model' (NAME or NAME@VERSION)")
    site = fields.get("site") or None
    if site is not None:
        check_site(site)
    caller.require(site)
    mode = validate_mode(fields.get("mode") or "auto")
    services.models.spec(model)  # ModelNotFoundError: 422
    max_voxels = services.settings.max_voxels
    staging = services.store.incoming_dir(job_id)
    scan = check_scan(upload.files["file"], staging, max_voxels)
    reference = upload.files.get("reference")
    reference_file = (
        check_reference(reference, scan.geometry, max_voxels) if reference is not None else None
    )
    return JobRecord(
        id=job_id,
        created_at=time.time(),
        model=model,
        site=site,
        mode=mode,
        scan_file=scan.file_name,
        reference_file=reference_file,
        source_format=scan.source_format,
    )


def _owned(services: Services, caller: Caller, job_id: str) -> JobState:
    state = services.store.state(job_id)
    caller.require(state.record.site)
    return state


def _report(services: Services, job_id: str) -> Report:
    path = services.store.path(job_id, REPORT)
    try:
        return Report.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise ResultNotReadyError(f"job {job_id} has no report") from None
    except OSError as error:
        raise JobStorageError(f"job storage: cannot read the report ({error.strerror})") from None


@router.get(
    "/{job_id}",
    response_model=JobView,
    responses=error_responses(404, 500),
    summary="A job's status, progress, and report or error",
)
async def get_job(job_id: JobId, services: ServicesDep, caller: CallerDep) -> Response:
    """The hot path of polling clients: a few small local reads, done on the event loop
    (cheaper than a thread hop), and the view serialized once (not re-validated)."""
    state = _owned(services, caller, job_id)
    report = None
    if state.status == "finished":
        with contextlib.suppress(ResultNotReadyError):  # deleted meanwhile: status only
            report = _report(services, job_id)
    body = JobView.of(state, report).model_dump_json()
    return Response(body, media_type="application/json")


def _require_finished(state: JobState) -> None:
    if state.status != "finished":
        because = f": {state.error}" if state.error else ""
        raise ResultNotReadyError(f"job {state.record.id} is {state.status}{because}")


@router.get(
    "/{job_id}/mask",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {}}, "description": "NIfTI mask (.nii.gz)"},
        **error_responses(404, 409, 500),
    },
    summary="The mask, on the input's voxel grid and affine",
)
def get_mask(job_id: JobId, services: ServicesDep, caller: CallerDep) -> StreamingResponse:
    state = _owned(services, caller, job_id)
    _require_finished(state)
    # opened here, not by the response later: a job deleted (or swept) meanwhile is a 409,
    # and one deleted while the mask streams still streams from the open file
    try:
        handle = services.store.path(job_id, MASK).open("rb")
    except (FileNotFoundError, IsADirectoryError):
        raise ResultNotReadyError(f"job {job_id} has no mask") from None
    except OSError as error:
        raise storage_error("read the mask", error) from None
    size = os.fstat(handle.fileno()).st_size
    headers = {
        "Content-Length": str(size),
        "Content-Disposition": f'attachment; filename="{job_id}_mask.nii.gz"',
    }
    return StreamingResponse(_stream(handle), media_type="application/gzip", headers=headers)


def _stream(handle: BinaryIO, chunk: int = 1 << 20) -> Iterator[bytes]:
    with handle:
        while data := handle.read(chunk):
            yield data


@router.get(
    "/{job_id}/report",
    response_model=Report,
    responses=error_responses(404, 409, 500),
    summary="The job's report",
)
def get_report(job_id: JobId, services: ServicesDep, caller: CallerDep) -> Report:
    _require_finished(_owned(services, caller, job_id))
    return _report(services, job_id)


@router.delete(
    "/{job_id}",
    response_model=JobDeleted,
    responses=error_responses(404, 500),
    summary="Cancel a queued or running job and delete its data",
)
def delete_job(job_id: JobId, services: ServicesDep, caller: CallerDep) -> JobDeleted:
    _owned(services, caller, job_id)
    status = services.store.cancel(job_id)
    services.queue.cancel(job_id)
    log.info("job %s: deleted (%s) by %s", job_id, status, caller.name)
    return JobDeleted(id=job_id, status=status, deleted=True)
