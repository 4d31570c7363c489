"""``/v1/jobs``: upload a scan (202), poll its status, download mask (the output, or the base
model's), report, preview and (for a DICOM series) the DICOM SEG, cancel.

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
from typing import Annotated, BinaryIO, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from model_store.sites import check_site
from server import uploads
from server.auth import Caller, CallerDep
from server.errors import (
    MalformedRequestError,
    NoSuchResultError,
    PayloadTooLargeError,
    QueueUnavailableError,
    ResultNotReadyError,
)
from server.errors import responses as error_responses
from server.schemas import JobCreated, JobDeleted, JobLinks, JobList, JobView
from server.services import Services, ServicesDep
from server.validation import check_reference, check_scan
from sitefit.job_store import (
    BASE_MASK,
    MASK,
    PREVIEW,
    REPORT,
    SEG,
    JobStorageError,
    storage_error,
)
from sitefit.jobs import (
    JobNotFoundError,
    JobRecord,
    JobState,
    JobStatus,
    new_job_id,
    validate_mode,
)
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
    links = JobLinks.of(job_id, dicom=record.source_format == "dicom")
    return JobCreated(id=job_id, status="queued", links=links)


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
        site_source="request" if site is not None else None,
        study_uid=(scan.dicom.study_uid or None) if scan.dicom is not None else None,
        series_uid=(scan.dicom.series_uid or None) if scan.dicom is not None else None,
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
    "",
    response_model=JobList,
    responses=error_responses(500),
    summary="The jobs this key may see, newest first (without their reports)",
)
def list_jobs(
    services: ServicesDep,
    caller: CallerDep,
    site: Annotated[str | None, Query(max_length=64, description="only this site")] = None,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    model: Annotated[
        str | None, Query(max_length=80, description="only this model (NAME or NAME@VERSION)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobList:
    """Reads every job's small files: fine for the days of jobs retention keeps."""
    states = []
    for job_id in services.store.job_ids():
        try:
            state = services.store.state(job_id)
        except (JobNotFoundError, JobStorageError):  # deleted, expired or torn meanwhile
            continue
        record = state.record
        if not caller.may_use(record.site) or (site is not None and record.site != site):
            continue
        if status is not None and state.status != status:
            continue
        if model is not None and model not in (record.model, record.model.split("@")[0]):
            continue
        states.append(state)
    states.sort(key=lambda state: state.record.created_at, reverse=True)
    page = states[offset : offset + limit]
    return JobList(
        jobs=[JobView.of(state, None) for state in page],
        total=len(states),
        limit=limit,
        offset=offset,
    )


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
def get_mask(
    job_id: JobId,
    services: ServicesDep,
    caller: CallerDep,
    variant: Annotated[
        Literal["adapted", "base"],
        Query(
            description="adapted: the job's output (site weights or refinement applied, as "
            "the report's mode_used says); base: the base model's mask of the same scan"
        ),
    ] = "adapted",
) -> StreamingResponse:
    _require_finished(_owned(services, caller, job_id))
    if variant == "adapted":
        return _download(services, job_id, MASK, "mask", "application/gzip", "_mask.nii.gz")
    name = BASE_MASK
    if not services.store.path(job_id, BASE_MASK).exists():
        # kept only when the output is not the base model's; otherwise the mask is it
        if _report(services, job_id).mode_used != "none":
            raise ResultNotReadyError(f"job {job_id} has no base model mask")
        name = MASK
    return _download(services, job_id, name, "base model mask", "application/gzip",
                     "_mask_base.nii.gz")  # fmt: skip


@router.get(
    "/{job_id}/preview.png",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "PNG montage of the mask's outline"},
        **error_responses(404, 409, 500),
    },
    summary="A preview: evenly spaced slices with the mask's outline, and the base model's "
    "where it differs",
)
def get_preview(job_id: JobId, services: ServicesDep, caller: CallerDep) -> StreamingResponse:
    state = _owned(services, caller, job_id)
    if state.status in ("failed", "canceled"):
        raise NoSuchResultError(f"job {job_id} has no preview: it is {state.status}")
    _require_finished(state)
    if not services.store.path(job_id, PREVIEW).exists():
        raise NoSuchResultError(f"job {job_id} has no preview (see its report's warnings)")
    return _download(services, job_id, PREVIEW, "preview", "image/png", "_preview.png",
                     inline=True)  # fmt: skip


@router.get(
    "/{job_id}/seg",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/dicom": {}}, "description": "DICOM SEG (Part 10 file)"},
        **error_responses(404, 409, 500),
    },
    summary="The DICOM SEG of a DICOM series' mask, referencing the series",
)
def get_seg(job_id: JobId, services: ServicesDep, caller: CallerDep) -> StreamingResponse:
    state = _owned(services, caller, job_id)
    if state.record.source_format != "dicom":
        raise NoSuchResultError(f"job {job_id} has no DICOM SEG: its input was NIfTI")
    _require_finished(state)
    return _download(services, job_id, SEG, "DICOM SEG", "application/dicom", "_seg.dcm")


def _download(
    services: Services,
    job_id: str,
    name: str,
    what: str,
    media_type: str,
    suffix: str,
    *,
    inline: bool = False,
) -> StreamingResponse:
    """A result file as an attachment (``inline``: to be shown, as an image in a page).
    Opened here, not by the response later: a job deleted (or swept) meanwhile is a 409, and
    one deleted while the file streams still streams."""
    try:
        handle = services.store.path(job_id, name).open("rb")
    except (FileNotFoundError, IsADirectoryError):
        raise ResultNotReadyError(f"job {job_id} has no {what}") from None
    except OSError as error:
        raise storage_error(f"read the {what}", error) from None
    size = os.fstat(handle.fileno()).st_size
    disposition = "inline" if inline else "attachment"
    headers = {
        "Content-Length": str(size),
        "Content-Disposition": f'{disposition}; filename="{job_id}{suffix}"',
    }
    return StreamingResponse(_stream(handle), media_type=media_type, headers=headers)


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
