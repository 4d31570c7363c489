"""Where the API sends jobs: the :class:`JobQueue` interface and the embedded implementation.

Two implementations, chosen by ``SITEFIT_REDIS_URL``: :class:`~server.queue_redis.RedisQueue`
(RQ on Redis, jobs run by ``sitefit worker`` processes anywhere) and :class:`EmbeddedQueue`
(no Redis: one worker thread inside the API process runs the same job function,
:func:`worker.job.run_job`, with one engine). The job's state always lives in the job store;
a queue only moves job ids and keeps them from being lost.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Literal, Protocol

from prometheus_client import CollectorRegistry

from server.errors import QueueUnavailableError
from sitefit.job_store import JobStorageError, JobStore
from sitefit.jobs import JobNotFoundError, Progress
from sitefit.settings import Settings

if TYPE_CHECKING:
    from worker.job import SegmentationEngine

log = logging.getLogger("sitefit.server")


class JobQueue(Protocol):
    kind: Literal["redis", "embedded"]

    def start(self) -> None:
        """Connect, or start the worker thread."""

    def stop(self) -> None: ...

    def problem(self) -> str | None:
        """``None`` when jobs can be queued, else why not (for /readyz and 503s)."""

    def submit(self, job_id: str) -> None:
        """Queue a stored job; :class:`QueueUnavailableError` when that is impossible."""

    def cancel(self, job_id: str) -> None:
        """Best effort: keep a queued job from starting (running jobs see the store)."""

    def depth(self) -> int | None:
        """Jobs waiting to start; ``None`` when unknown."""

    def maintain(self) -> None:
        """Reconcile the store with the queue: dead workers' jobs, lost jobs."""


class EmbeddedQueue:
    """A FIFO of job ids and one worker thread that builds one engine and runs them."""

    kind: Literal["redis", "embedded"] = "embedded"

    def __init__(self, settings: Settings, store: JobStore, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self._ids: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._failure: str | None = None
        self._running: str | None = None  # the job the worker thread runs now
        # held while checking for a failure and queueing, and while recording one: once the
        # worker has failed, nothing more is queued, so draining the queue ends every job
        self._lock = threading.Lock()

    def start(self) -> None:
        self._recover()
        self._thread = threading.Thread(target=self._work, name="sitefit-embedded", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._ids.put(None)
            self._thread.join(timeout=30)

    def problem(self) -> str | None:
        if self._failure is not None:
            return f"embedded worker cannot start: {self._failure}"
        if self._thread is None or not self._thread.is_alive():
            return "embedded worker is not running"
        return None

    def submit(self, job_id: str) -> None:
        with self._lock:
            problem = self.problem()
            if problem is not None:
                raise QueueUnavailableError(f"job queue unavailable: {problem}")
            self._ids.put(job_id)

    def cancel(self, job_id: str) -> None:
        """Nothing to do: the worker thread skips jobs that have ended in the store."""

    def depth(self) -> int | None:
        return self._ids.qsize()

    def maintain(self) -> None:
        """Fail the jobs the store says are running that the worker thread is not running:
        an attempt whose end could not be recorded (e.g. a full disk) would otherwise read
        "running" until the retention sweep. (A dead thread means a dead process: see
        :meth:`_recover`.)"""
        for job_id in self.store.job_ids():
            try:
                running = self.store.state(job_id).status == "running"
            except (JobNotFoundError, JobStorageError):
                continue
            with self._lock:
                if not running or job_id == self._running:
                    continue
            # the thread takes a job under the lock before marking it running, so a job it
            # runs is never seen running here without being ``_running``
            try:
                if self.store.end(job_id, "failed", "the worker could not record the job's end"):
                    log.warning("job %s: failed: its end was never recorded", job_id)
            except (JobNotFoundError, JobStorageError) as error:  # still full: next pass
                log.warning("job %s: cannot record its failure yet: %s", job_id, error)

    def _recover(self) -> None:
        """Jobs a previous process left active: queued ones run again, running ones failed."""
        try:
            job_ids = self.store.job_ids()
        except JobStorageError as error:  # the app starts anyway; /readyz says what is wrong
            log.error("cannot recover jobs: %s", error)
            return
        for job_id in job_ids:
            try:
                state = self.store.state(job_id)
            except (JobNotFoundError, JobStorageError):
                continue
            if state.status == "running":
                self.store.end(job_id, "failed", "the server stopped while the job was running")
            elif state.status == "queued":
                self._ids.put(job_id)

    def _work(self) -> None:
        try:
            from worker.engine import Engine
            from worker.job import run_job
            from worker.worker_metrics import WorkerMetrics

            engine: SegmentationEngine = Engine(self.settings)
            metrics = WorkerMetrics(self.registry, engine)
        except Exception as error:  # e.g. the device is unavailable
            lines = str(error).strip().splitlines()
            with self._lock:
                self._failure = f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
            log.exception("embedded worker cannot start")
            self._fail_queued(f"embedded worker cannot start: {self._failure}")
            return
        while (job_id := self._ids.get()) is not None:
            with self._lock:
                self._running = job_id
            try:
                run_job(
                    job_id,
                    self.store,
                    engine,
                    timeout_s=self.settings.job_timeout_s,
                    observer=metrics.observe,
                )
            except Exception:
                log.exception("job %s: unexpected error", job_id)
            finally:
                with self._lock:
                    self._running = None

    def _fail_queued(self, reason: str) -> None:
        """End every job still in the queue as failed: no thread will ever run them."""
        while True:
            try:
                job_id = self._ids.get_nowait()
            except queue.Empty:
                return
            if job_id is None:  # stop() was called meanwhile
                continue
            try:
                if self.store.end(job_id, "failed", reason):
                    log.warning("job %s: %s", job_id, reason)
            except (JobNotFoundError, JobStorageError) as error:
                log.error("job %s: cannot mark it failed: %s", job_id, error)


def requeued(progress: Progress, note: str) -> Progress:
    """The progress of a job put back in the queue after its worker died."""
    return Progress(status="queued", attempt=progress.attempt, note=note)
