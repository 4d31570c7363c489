"""Completed PACS series become jobs: one job per series, validated like an upload.

Instances sent to a route (DIMSE C-STORE to its AE title, or STOW-RS) wait in the
:class:`~sitefit.inbox.Inbox` until no instance of their series has arrived for
``Settings.series_idle_s`` seconds (MONAI's Informatics Gateway and Orthanc's ``StableAge``
decide completion the same way). :meth:`Dispatcher.dispatch_once`, run by the API's
background loop, then claims each complete series (an atomic rename, so several API processes
never take the same one), links its instances into a new job's staging directory and checks
them as a DICOM upload is checked. A usable series becomes a queued job of the route's model
and mode, for the route's site or, when the route fixes none, the site key of the series'
scanner headers (:mod:`sitefit.site_keys`), with one pending delivery per destination of the
route. A series that is not a usable 3D image (mixed orientations, gantry tilt, missing or
cut-off slices, non-image objects, NaN or constant voxels) becomes a failed job with the
reason, never a crash and never a silent drop: ``GET /v1/jobs`` lists it like any other job.

While the job queue is unavailable nothing is claimed: series wait in the inbox. A series that
cannot become a job for another reason (a full disk, an unreadable model store) stays claimed
and returns to the inbox after ``CLAIM_STALE_S``, to be tried again; so does one whose
dispatcher was killed. A re-sent copy of a dispatched series' instance is ignored (the inbox
remembers dispatched instances for a day).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydicom

from model_store.base_models import BaseModelRegistry
from server.queues import JobQueue
from server.validation import check_series_dir
from sitefit.deliveries import DeliveryStore
from sitefit.exceptions import InvalidInputError, ModelNotFoundError, SitefitError
from sitefit.inbox import ClaimedSeries, Inbox
from sitefit.job_store import DICOM_DIR, JOB_DIR_MODE, JobStore, storage_error
from sitefit.jobs import JobRecord, new_job_id
from sitefit.routing import Route
from sitefit.settings import Settings
from sitefit.site_keys import site_key

log = logging.getLogger("sitefit.server")

CLAIM_STALE_S = 600.0  # a claim older than this was left by a killed process: back to the inbox


@dataclass(frozen=True)
class Dispatched:
    """What became of one complete series."""

    job_id: str
    route: str
    status: str  # "queued" or "failed"
    reason: str | None = None


@dataclass
class Dispatcher:
    settings: Settings
    inbox: Inbox
    jobs: JobStore
    queue: JobQueue
    models: BaseModelRegistry
    deliveries: DeliveryStore

    def dispatch_once(self, now: float | None = None) -> list[Dispatched]:
        """Turn every complete series into a job (see the module docstring)."""
        self.inbox.recover(CLAIM_STALE_S)
        if self.queue.problem() is not None:
            return []  # the series wait: nothing is claimed while jobs cannot be queued
        done = []
        for ref in self.inbox.idle_series(self.settings.series_idle_s, now):
            claimed = self.inbox.claim(ref)
            if claimed is None:  # another API process took it
                continue
            try:
                done.append(self._dispatch(claimed))
            except Exception as error:
                # left claimed: recover() puts it back after CLAIM_STALE_S, a natural backoff
                # for a disk, a model store or a queue that fails now
                log.warning(
                    "series on route %s: kept for a later try: %s: %s",
                    claimed.route,
                    type(error).__name__,
                    error if isinstance(error, SitefitError) else "see the traceback",
                    exc_info=not isinstance(error, SitefitError),
                )
        return done

    def _dispatch(self, claimed: ClaimedSeries) -> Dispatched:
        """One claimed series as a job. The instances are linked into the job, so until the
        job is published and queued the claim still holds them: any failure before that
        leaves the series claimed (and the job's staging is removed), nothing is lost."""
        job_id = new_job_id()
        route = self.settings.dicom_routes.get(claimed.route)
        with self.jobs.receiving(job_id) as staging:
            instances = staging / DICOM_DIR
            _link_all(claimed.paths(), instances)
            record, problem = self._record(job_id, claimed.route, route, staging, instances)
            self.jobs.publish(staging, record)
        if problem is not None:
            self.jobs.end(job_id, "failed", problem)
            self.inbox.done(claimed)
            log.info("series on route %s: job %s failed: %s", claimed.route, job_id, problem)
            return Dispatched(job_id, claimed.route, "failed", problem)
        try:  # deliveries first: a job that finishes always finds them
            for destination in record.destinations:
                self.deliveries.add(job_id, destination)
            self.queue.submit(job_id)
        except Exception:
            self.jobs.delete(job_id)  # its deliveries are dropped: "the job is gone"
            raise
        self.inbox.done(claimed)
        log.info(
            "series on route %s: job %s queued (%d instances, model %s, site %s, mode %s)",
            claimed.route,
            job_id,
            claimed.instances,
            record.model,
            record.site,
            record.mode,
        )
        return Dispatched(job_id, claimed.route, "queued")

    def _record(
        self, job_id: str, name: str, route: Route | None, staging: Path, instances: Path
    ) -> tuple[JobRecord, str | None]:
        """The job's record, and why the series cannot be segmented (``None``: it can)."""
        problem: str | None = None
        study_uid = series_uid = None
        header = None
        try:
            if route is None:
                raise InvalidInputError(f"route {name!r} is no longer configured")
            self.models.spec(route.model)
            checked = check_series_dir(instances, staging, self.settings.max_voxels)
            if checked.dicom is not None:
                header = checked.dicom.header
                study_uid, series_uid = checked.dicom.study_uid, checked.dicom.series_uid
        except (InvalidInputError, ModelNotFoundError) as error:
            problem = str(error)
        if header is None:  # unusable series: its site still decides who may see the job
            header = _first_header(instances)
        site: str | None = None
        source: Literal["route", "headers"] | None = None
        if route is not None and route.site is not None:
            site, source = route.site, "route"
        elif header is not None:
            site, source = site_key(header, self.settings.site_key_headers), "headers"
        record = JobRecord(
            id=job_id,
            created_at=time.time(),
            model=route.model if route is not None else "-",
            site=site,
            mode=route.mode if route is not None else "none",
            scan_file="scan.nii.gz",
            source_format="dicom",
            origin="pacs",
            route=name,
            site_source=source,
            destinations=route.destinations if route is not None and problem is None else (),
            study_uid=study_uid,
            series_uid=series_uid,
        )
        return record, problem


def _link_all(paths: list[Path], folder: Path) -> None:
    """Hard-link ``paths`` into a new ``folder`` (copy where the filesystem has no links)."""
    try:
        folder.mkdir(mode=JOB_DIR_MODE)
        for path in paths:
            try:
                os.link(path, folder / path.name)
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copy2(path, folder / path.name)
    except OSError as error:
        raise storage_error("take a series into its job", error) from None


def _first_header(directory: Path) -> Any:
    """The header of the first readable instance in ``directory`` (``None``: none is)."""
    for path in sorted(_instances(directory)):
        with contextlib.suppress(Exception):  # corrupt instances are the series' problem
            return pydicom.dcmread(path, stop_before_pixels=True)
    return None


def _instances(directory: Path) -> Iterator[Path]:
    with contextlib.suppress(OSError):
        for path in directory.iterdir():
            if not path.name.startswith(".") and path.is_file():
                yield path


__all__ = ["Dispatched", "Dispatcher"]
