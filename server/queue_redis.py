"""The RQ queue on Redis, as the API sees it: submit, cancel, depth, and the dead-job reaper.

Jobs are RQ jobs serialized with ``JSONSerializer`` whose function is
:data:`~sitefit.job_store.QUEUED_FUNCTION` and whose only argument is the job id (the scan
stays in the job store). Each carries the job timeout and ``Retry(max=job_retries)``.

:meth:`RedisQueue.maintain` (run by the API every ``maintenance_interval_s``, under a Redis
lock so that one API replica does it at a time) makes sure no job stays active forever:

1. ``StartedJobRegistry.cleanup()``: an execution whose heartbeat expired (its worker was
   killed or crashed, see ``worker/queue_worker.py``) is abandoned; RQ queues it again while
   it has retries left, else fails it with ``AbandonedJobError``.
2. Every job the store still calls queued or running is compared with its RQ job: failed in
   RQ -> failed in the store, with the reason; queued again in RQ after a run had started ->
   queued in the store, with a note saying why; missing from Redis (flushed, or Redis
   restarted without persistence) -> failed in the store. A job whose data cannot be read
   (e.g. a corrupt ``job.json``) is logged and skipped; the others are still reconciled.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Literal

import redis
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from server.errors import QueueUnavailableError
from server.queues import requeued
from sitefit.job_store import JobStorageError, JobStore
from sitefit.jobs import QUEUED_FUNCTION, JobNotFoundError, JobState
from sitefit.settings import Settings
from worker.rq_jobs import SitefitJob

log = logging.getLogger("sitefit.server")
_ABANDONED = "AbandonedJobError"
_ENDED_IN_RQ = (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, JobStatus.FINISHED)


class RedisQueue:
    kind: Literal["redis", "embedded"] = "redis"

    def __init__(self, settings: Settings, store: JobStore) -> None:
        if settings.redis_url is None:
            raise ValueError("RedisQueue needs settings.redis_url")
        self.settings = settings
        self.store = store
        self.connection = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=5
        )
        self.queue = Queue(
            settings.queue_name,
            connection=self.connection,
            serializer=JSONSerializer,
            job_class=SitefitJob,  # registry cleanup must never import a callback by name
        )
        self._lock_key = f"sitefit:{settings.queue_name}:maintenance-lock"
        # a job younger than this may be between publish and enqueue: not "lost" yet
        self.lost_grace_s = max(5.0, 10 * settings.maintenance_interval_s)

    def start(self) -> None:
        problem = self.problem()
        if problem is not None:
            log.warning("job queue not ready at start: %s", problem)

    def stop(self) -> None:
        self.connection.close()

    def problem(self) -> str | None:
        try:
            self.connection.ping()
        except redis.RedisError as error:
            return f"Redis unreachable ({type(error).__name__})"
        return None

    def submit(self, job_id: str) -> None:
        retries = self.settings.job_retries
        try:
            self.queue.enqueue_call(
                QUEUED_FUNCTION,
                args=(job_id,),
                job_id=job_id,
                timeout=self.settings.job_timeout_s,
                result_ttl=self.settings.job_retention_s,
                failure_ttl=self.settings.job_retention_s,
                retry=Retry(max=retries) if retries else None,
                description=f"sitefit job {job_id}",
            )
        except redis.RedisError as error:
            raise QueueUnavailableError(
                f"job queue unavailable: Redis unreachable ({type(error).__name__}); "
                "nothing was queued, try again later"
            ) from None

    def cancel(self, job_id: str) -> None:
        try:
            job = SitefitJob.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
            if job.get_status() in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
                job.delete()
        except NoSuchJobError:
            pass
        except redis.RedisError as error:  # the worker will skip it: the store says canceled
            log.warning("job %s: cannot remove it from Redis (%s)", job_id, type(error).__name__)

    def depth(self) -> int | None:
        try:
            return self.queue.count
        except redis.RedisError:
            return None

    def maintain(self) -> None:
        token = secrets.token_hex(8)
        hold_ms = max(1000, int(self.settings.maintenance_interval_s * 900))
        if not self.connection.set(self._lock_key, token, nx=True, px=hold_ms):
            return  # another API process is doing it
        self.queue.started_job_registry.cleanup()  # with SitefitJob: callbacks never run
        for job_id in self.store.job_ids():
            if self.store.is_ended(job_id):
                continue
            try:
                self._reconcile(self.store.state(job_id))
            except JobNotFoundError:
                continue
            except JobStorageError as error:  # one unreadable job must not stop the pass
                log.warning("job %s: cannot reconcile with the queue: %s", job_id, error)

    def _reconcile(self, state: JobState) -> None:
        job_id = state.record.id
        try:
            job = SitefitJob.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
            status = job.get_status()
        except NoSuchJobError:
            if time.time() - state.record.created_at > self.lost_grace_s:
                reason = "the job was lost from the queue (Redis was flushed or restarted)"
                self.store.end(job_id, "failed", reason)
                log.warning("job %s: %s", job_id, reason)
            return
        attempt = state.progress.attempt
        if status in _ENDED_IN_RQ:
            reason = _failure_reason(job, status, attempt)
            if self.store.end(job_id, "failed", reason):
                log.warning("job %s: %s", job_id, reason)
        elif status == JobStatus.QUEUED and state.status == "running":
            note = (
                f"the worker running attempt {attempt} stopped (killed or crashed); "
                "the job was queued again"
            )
            self.store.set_progress(job_id, requeued(state.progress, note))
            log.warning("job %s: %s", job_id, note)


def _failure_reason(job: Job, status: JobStatus, attempt: int) -> str:
    if status == JobStatus.FINISHED and job.return_value() == "skipped":
        # the worker found no such job in its job store
        return (
            "a worker ended the job without recording it in the job store: do the API and "
            "the workers share SITEFIT_HOME?"
        )
    if status == JobStatus.FINISHED:  # its attempt ended, but writing that end failed
        return "the worker could not record the job's end in the job store (see its log)"
    result = job.latest_result()
    text = (result.exc_string or "") if result is not None else ""
    if _ABANDONED in text or not text:
        return (
            f"the worker running this job stopped (killed or crashed) during attempt "
            f"{max(attempt, 1)}; no retries left"
        )
    last = text.strip().splitlines()[-1][:300]
    return f"the worker failed the job: {last}"
