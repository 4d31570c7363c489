"""The job function: one stored job through the engine, its state kept in the job store.

:func:`run_job` is what both the RQ worker (``sitefit worker``) and the embedded worker
thread of ``sitefit serve`` run. It is given a job id only; the request, the scan and the
results live in the :class:`~sitefit.job_store.JobStore`. Every progress report of the engine
(each stage, each refinement epoch) is written to the store, where ``GET /v1/jobs/{id}``
reads it, and is also where cancellation and the time limit are noticed: a job whose
terminal state was claimed by someone else (``DELETE``) stops with :class:`JobCanceled`, one
past its deadline fails with :class:`JobTimedOut`.

Outcomes: ``finished`` (mask and report stored, the base model's mask when the output is not
it, the preview, and for a DICOM series its DICOM SEG),
``failed`` (the error's one-line message stored; caller errors and engine errors alike, a SEG
that cannot be built included), ``canceled`` (stopped, results discarded) or
``skipped`` (the job had already ended or was deleted before it started). Unexpected
exceptions are recorded as failed and re-raised so the worker logs the traceback. A preview
that cannot be rendered fails nothing: the job finishes without one, and its report's
``warnings`` says so.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from sitefit.exceptions import SitefitError
from sitefit.job_store import (
    BASE_MASK,
    DICOM_DIR,
    JOB_FILE_MODE,
    MASK,
    PREVIEW,
    REPORT,
    SEG,
    JobStore,
    storage_error,
)
from sitefit.jobs import JobNotFoundError, JobRecord, Progress
from sitefit.report import Report
from sitefit.seg import SegDescription, segments_of, write_seg
from sitefit.volume import save_image_atomic
from worker.engine import Progress as EngineProgress
from worker.engine import ProgressCallback, SegmentRequest, SegmentResult
from worker.preview import render_preview

log = logging.getLogger("sitefit.worker")
Outcome = Literal["finished", "failed", "canceled", "skipped"]


class JobCanceled(Exception):
    """The job was canceled or deleted while it ran; its results are discarded."""


class JobTimedOut(SitefitError):
    """The job ran past its time limit."""


class SegmentationEngine(Protocol):
    def run(
        self, request: SegmentRequest, progress: ProgressCallback | None = None
    ) -> SegmentResult: ...


@dataclass(frozen=True)
class JobEnded:
    """What an observer (the worker's metrics) learns when a job ends."""

    record: JobRecord
    outcome: Outcome
    attempt: int
    seconds: float
    report: Report | None


Observer = Callable[[JobEnded], None]


def run_job(
    job_id: str,
    store: JobStore,
    engine: SegmentationEngine,
    *,
    timeout_s: float | None = None,
    observer: Observer | None = None,
) -> Outcome:
    """Run the stored job ``job_id`` once (see the module docstring)."""
    started = time.monotonic()
    try:
        record = store.record(job_id)
    except JobNotFoundError:
        log.info("job %s: gone before it started, skipped", job_id)
        return "skipped"
    if store.is_ended(job_id):
        log.info("job %s: already ended, skipped", job_id)
        return "skipped"
    attempt = store.progress(job_id).attempt + 1
    deadline = None if timeout_s is None else started + timeout_s
    log.info(
        "job %s: start (model %s, site %s, mode %s, attempt %d)",
        job_id,
        record.model,
        record.site,
        record.mode,
        attempt,
    )

    last = Progress(status="running", stage="starting", attempt=attempt)

    def on_progress(update: EngineProgress) -> None:
        nonlocal last
        if store.is_ended(job_id):
            raise JobCanceled(job_id)
        if deadline is not None and time.monotonic() > deadline:
            raise JobTimedOut(f"job exceeded its time limit of {timeout_s:g} s")
        last = Progress(
            status="running",
            stage=update.stage,
            epoch=update.epoch if update.epoch is not None else last.epoch,
            dice_trace=list(update.dice_trace) or last.dice_trace,
            attempt=attempt,
        )
        store.set_progress(job_id, last)

    report: Report | None = None
    try:
        store.set_progress(job_id, last)
        reference = store.path(job_id, record.reference_file) if record.reference_file else None
        request = SegmentRequest(
            scan=store.path(job_id, record.scan_file),
            model=record.model,
            site=record.site,
            mode=record.mode,
            reference=reference,
            job_id=job_id,
        )
        result = engine.run(request, on_progress)
        if store.is_ended(job_id):  # another attempt finished, or the job was canceled
            raise JobCanceled(job_id)
        save_image_atomic(result.mask, store.path(job_id, MASK), mode=JOB_FILE_MODE)
        if result.base_mask is not None:
            save_image_atomic(result.base_mask, store.path(job_id, BASE_MASK), mode=JOB_FILE_MODE)
        _write_preview(store, job_id, result)
        if record.source_format == "dicom":
            _write_seg(store, job_id, result)
        store.write_result(job_id, REPORT, result.report.model_dump_json(indent=2).encode())
        report = result.report
        outcome: Outcome = "finished" if store.end(job_id, "finished") else "canceled"
        if outcome == "canceled":
            _discard_results(store, job_id)
    except (JobCanceled, JobNotFoundError, FileNotFoundError):
        outcome = "canceled" if store.is_ended(job_id) else _fail(store, job_id, "job data lost")
    except SitefitError as error:
        outcome = _fail(store, job_id, str(error))
    except Exception as error:
        _fail(store, job_id, f"internal error ({type(error).__name__}); see the worker log")
        _notify(observer, JobEnded(record, "failed", attempt, time.monotonic() - started, None))
        raise
    seconds = time.monotonic() - started
    log.info("job %s: %s after %.2f s", job_id, outcome, seconds)
    _notify(observer, JobEnded(record, outcome, attempt, seconds, report))
    return outcome


def _write_preview(store: JobStore, job_id: str, result: SegmentResult) -> None:
    """Store the job's preview. One that cannot be rendered is logged and named in the
    report's warnings, and the job goes on: a missing picture is no reason to lose a mask."""
    if result.preview is None:
        return
    try:
        png = render_preview(result.preview)
    except Exception as error:
        log.exception("job %s: preview not rendered", job_id)
        result.report.warnings.append(
            f"no preview: it could not be rendered ({type(error).__name__})"
        )
        return
    store.write_result(job_id, PREVIEW, png)


def _write_seg(store: JobStore, job_id: str, result: SegmentResult) -> None:
    """The DICOM SEG of a DICOM job's mask, referencing the source instances kept in its
    ``dicom/`` folder (a job without them, stored before they were kept, has none). A SEG that
    cannot be built fails the job: its mask is discarded with it, so no job finishes half."""
    source = store.path(job_id, DICOM_DIR)
    if not source.is_dir():
        log.info("job %s: no source instances kept, so no DICOM SEG", job_id)
        return
    spec = result.spec
    try:
        seg = write_seg(result.mask, source, segments_of(spec.classes, spec.codes),
                        store.path(job_id, SEG), description=SegDescription.of(result.report),
                        omit_empty_frames=result.seg_omit_empty_frames)  # fmt: skip
    except FileNotFoundError:
        raise JobNotFoundError(f"job {job_id} was deleted") from None
    except OSError as error:
        raise storage_error("write the DICOM SEG", error) from None
    log.info("job %s: DICOM SEG written (%d frames)", job_id, seg.NumberOfFrames)


def _fail(store: JobStore, job_id: str, reason: str) -> Outcome:
    try:
        ended = store.end(job_id, "failed", reason)
    except SitefitError:
        log.exception("job %s: cannot record its failure (%s)", job_id, reason)
        return "failed"
    if ended:
        _discard_results(store, job_id)
        return "failed"
    return "canceled"


def _discard_results(store: JobStore, job_id: str) -> None:
    """Remove this attempt's results from a job it did not finish, unless another
    attempt finished it: the files are that attempt's (or as good), and its job reads
    finished."""
    with contextlib.suppress(SitefitError):
        if store.state(job_id).status == "finished":
            return
    for name in (MASK, BASE_MASK, PREVIEW, SEG, REPORT):
        with contextlib.suppress(OSError, SitefitError):
            store.path(job_id, name).unlink(missing_ok=True)


def _notify(observer: Observer | None, event: JobEnded) -> None:
    if observer is None:
        return
    try:
        observer(event)
    except Exception:  # metrics must never fail a job
        log.exception("job %s: observer failed", event.record.id)


__all__ = ["JobCanceled", "JobEnded", "JobTimedOut", "Outcome", "SegmentationEngine", "run_job"]
