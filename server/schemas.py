"""Response bodies of the HTTP API (pydantic), so that ``/docs`` documents every route.

The job report is :class:`sitefit.report.Report` itself; site versions are
:class:`model_store.sites.SiteVersion`. Everything else is defined here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

from model_store.base_models import UnreadableModel
from model_store.sites import SiteVersion, UnreadableVersion
from model_store.spec import ModelSpec
from sitefit.deliveries import Delivery, DeliveryStatus
from sitefit.jobs import JobState, JobStatus
from sitefit.report import Mode, Report


class JobLinks(BaseModel):
    self: str = Field(description="this job's status")
    mask: str = Field(
        description="the mask (NIfTI, the input's grid), once finished; ?variant=base: the "
        "base model's"
    )
    report: str = Field(description="the report (JSON), once finished")
    preview: str = Field(description="the preview (PNG), once finished")
    seg: str | None = Field(
        default=None, description="the DICOM SEG, once finished (a DICOM series' job only)"
    )

    @classmethod
    def of(cls, job_id: str, *, dicom: bool = False) -> JobLinks:
        base = f"/v1/jobs/{job_id}"
        seg = f"{base}/seg" if dicom else None
        return cls(self=base, mask=f"{base}/mask", report=f"{base}/report",
                   preview=f"{base}/preview.png", seg=seg)  # fmt: skip


class JobCreated(BaseModel):
    id: str
    status: JobStatus
    links: JobLinks


class JobProgress(BaseModel):
    stage: str | None = Field(
        description="starting | loading | segmenting | adapting | metrics | done"
    )
    epoch: int | None = Field(description="refinement epoch, while adapting")
    dice_trace: list[float] = Field(description="Dice(early, final) after each epoch so far")
    attempt: int = Field(description="runs started so far (a retry after a dead worker: 2)")
    note: str | None = Field(description="e.g. why the job was queued again")


class JobView(BaseModel):
    id: str
    status: JobStatus
    model: str
    site: str | None
    mode: Mode
    source_format: Literal["nifti", "dicom"]
    origin: Literal["upload", "pacs"] = Field(description="a REST upload, or a series a PACS sent")
    route: str | None = Field(default=None, description="the PACS route the series came by")
    site_source: Literal["request", "route", "headers"] | None = Field(
        default=None,
        description="where the site came from: the request, the route, or the series' scanner "
        "headers (a derived site key)",
    )
    created_at: datetime
    ended_at: datetime | None
    progress: JobProgress
    report: Report | None = Field(default=None, description="when finished")
    error: str | None = Field(default=None, description="when failed or canceled: why")
    links: JobLinks

    @classmethod
    def of(cls, state: JobState, report: Report | None) -> JobView:
        record, progress = state.record, state.progress
        return cls(
            id=record.id,
            status=state.status,
            model=record.model,
            site=record.site,
            mode=record.mode,
            source_format=record.source_format,
            origin=record.origin,
            route=record.route,
            site_source=record.site_source,
            created_at=_time(record.created_at),
            ended_at=_time(state.ended_at) if state.ended_at is not None else None,
            progress=JobProgress(
                stage=progress.stage,
                epoch=progress.epoch,
                dice_trace=progress.dice_trace,
                attempt=progress.attempt,
                note=progress.note,
            ),
            report=report,
            error=state.error,
            links=JobLinks.of(record.id, dicom=record.source_format == "dicom"),
        )


class JobList(BaseModel):
    jobs: list[JobView] = Field(description="newest first; without their reports")
    total: int = Field(description="jobs that match, on every page")
    limit: int
    offset: int


class JobDeleted(BaseModel):
    id: str
    status: JobStatus = Field(description="canceled, or the status the job had when deleted")
    deleted: bool = Field(description="true: data deleted (a canceled job keeps a small record)")


class ModelVersion(BaseModel):
    version: int
    sha256: str
    created: datetime
    classes: dict[int, str]
    slice_axis: int
    dice_final: float | None = Field(description="validation Dice of the final output (source)")
    dice_early: float | None = Field(description="validation Dice of the early head (source)")

    @classmethod
    def of(cls, spec: ModelSpec) -> ModelVersion:
        return cls(
            version=spec.version,
            sha256=spec.sha256,
            created=spec.created,
            classes=spec.classes,
            slice_axis=spec.slice_axis,
            dice_final=spec.validation.dice_final,
            dice_early=spec.validation.dice_early,
        )


class ModelEntry(BaseModel):
    name: str
    versions: list[int]
    latest: ModelVersion


class ModelList(BaseModel):
    models: list[ModelEntry]
    unreadable: list[UnreadableModel] = Field(
        default_factory=list, description="models whose latest spec cannot be read"
    )


class SiteEntry(BaseModel):
    site: str
    models: list[str] = Field(description="base models this site has adapted weights for")


class SiteList(BaseModel):
    sites: list[SiteEntry]


class SiteDetail(BaseModel):
    site: str
    models: dict[str, list[SiteVersion]] = Field(description="every version, oldest first")
    unreadable: dict[str, list[UnreadableVersion]] = Field(
        default_factory=dict,
        description="per model, the versions whose meta.json cannot be read (missing or corrupt)",
    )


class SiteDeleted(BaseModel):
    site: str
    deleted: bool


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    queue: Literal["redis", "embedded"]
    checks: dict[str, str] = Field(description="'ok' or what is wrong, per dependency")


def _time(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


class DeliveryView(BaseModel):
    """A finished job's DICOM SEG on its way to one PACS destination."""

    id: str
    job_id: str
    destination: str = Field(description="the destination's name in SITEFIT_DICOM_DESTINATIONS")
    status: DeliveryStatus = Field(
        description="pending (waiting for the job or the next try) | delivered | failed (every "
        "try failed: resend it) | dropped (the job failed, was canceled or is gone)"
    )
    attempts: int = Field(description="failed tries since created or resent")
    next_try_at: datetime | None = Field(description="when pending: the next try's time")
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    last_error: str | None = Field(description="why the last try failed, or why it was dropped")

    @classmethod
    def of(cls, delivery: Delivery) -> DeliveryView:
        return cls(
            id=delivery.id,
            job_id=delivery.job_id,
            destination=delivery.destination,
            status=delivery.status,
            attempts=delivery.attempts,
            next_try_at=_time(delivery.next_try_at) if delivery.status == "pending" else None,
            created_at=_time(delivery.created_at),
            updated_at=_time(delivery.updated_at),
            delivered_at=_time(delivery.delivered_at) if delivery.delivered_at else None,
            last_error=delivery.last_error,
        )


class DeliveryList(BaseModel):
    deliveries: list[DeliveryView] = Field(description="newest first")
