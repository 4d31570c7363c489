"""What a job is, for the API, the workers and the job store (no torch, no Redis, no I/O).

A job is a :class:`JobRecord` (what was asked, immutable), a :class:`Progress` (where an
active job is) and, once it ended, a final status with an error message. Ids are 32 hex
digits (they become directory names, so nothing else is accepted). :data:`QUEUED_FUNCTION`
is the RQ contract between the API and ``sitefit worker``.
"""

from __future__ import annotations

import re
import uuid
from typing import Literal

from pydantic import BaseModel, Field

from sitefit.exceptions import InvalidInputError, SitefitError
from sitefit.report import MODES, Mode

JobStatus = Literal["queued", "running", "finished", "failed", "canceled"]
FinalStatus = Literal["finished", "failed", "canceled"]
ACTIVE: tuple[JobStatus, ...] = ("queued", "running")
ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
QUEUED_FUNCTION = "sitefit:run_job"
"""The function name of every sitefit RQ job (its only argument: the job id). It is not an
importable path on purpose: ``sitefit worker`` runs it by name and refuses any other, and a
stock ``rq worker`` cannot run it."""


class JobNotFoundError(SitefitError):
    """No job of that id (never created, deleted, or expired)."""


class JobRecord(BaseModel):
    """What was asked: written once by the API when the job is published."""

    id: str
    created_at: float = Field(description="Unix time")
    model: str
    site: str | None
    mode: Mode
    scan_file: str = Field(description="stored scan's file name (scan.nii or scan.nii.gz)")
    reference_file: str | None = None
    source_format: Literal["nifti", "dicom"] = "nifti"
    origin: Literal["upload", "pacs"] = Field(
        default="upload",
        description="how the scan arrived: a REST upload, or a series a PACS sent to a route "
        "(DIMSE C-STORE or DICOMweb STOW-RS)",
    )
    route: str | None = Field(default=None, description="the PACS route the series came by")
    site_source: Literal["request", "route", "headers"] | None = Field(
        default=None,
        description="where the site came from: the request, the route, or the series' "
        "scanner headers (a derived site key)",
    )
    destinations: tuple[str, ...] = Field(
        default=(), description="where the job's DICOM SEG is sent when it finishes"
    )
    study_uid: str | None = Field(default=None, description="the source series' study")
    series_uid: str | None = Field(default=None, description="the source series")


class Progress(BaseModel):
    """Where an active job is; rewritten by the worker at every stage and epoch."""

    status: Literal["queued", "running"] = "queued"
    stage: str | None = None
    epoch: int | None = None
    dice_trace: list[float] = Field(default_factory=list)
    attempt: int = Field(default=0, ge=0, description="runs started so far (retries included)")
    note: str | None = Field(default=None, description="e.g. why the job was queued again")
    updated_at: float = 0.0


class JobState(BaseModel):
    """Everything a status request needs, read from the job's files."""

    record: JobRecord
    status: JobStatus
    progress: Progress
    error: str | None = None
    ended_at: float | None = None


def new_job_id() -> str:
    return uuid.uuid4().hex


def check_job_id(job_id: str) -> str:
    """Job ids become directory names: only 32 lowercase hex digits are accepted."""
    if not ID_PATTERN.fullmatch(job_id):
        raise JobNotFoundError(f"unknown job {job_id[:40]!r}")
    return job_id


def validate_mode(mode: str) -> Mode:
    for known in MODES:
        if mode == known:
            return known
    raise InvalidInputError(f"invalid mode {mode[:40]!r}: expected one of {', '.join(MODES)}")


__all__ = [
    "ACTIVE",
    "QUEUED_FUNCTION",
    "FinalStatus",
    "JobNotFoundError",
    "JobRecord",
    "JobState",
    "JobStatus",
    "Progress",
    "check_job_id",
    "new_job_id",
    "validate_mode",
]
