"""``sitefit worker``: an RQ worker that runs sitefit jobs in its own process, never forking.

RQ's default ``Worker`` forks a work horse per job, which would rebuild the CUDA context and
reload every model for every job. :class:`SitefitWorker` is an RQ ``SimpleWorker`` (jobs run
in the worker's main thread), so the one :class:`~worker.engine.Engine` built at start keeps
its device and warm weights for the life of the process.

Safety: jobs are (de)serialized with RQ's ``JSONSerializer``, never pickle, and
:class:`SitefitJob` runs nothing but :data:`~sitefit.job_store.QUEUED_FUNCTION` with one job
id argument: a job hash written by anyone else naming another function (``os.system``) or a
callback is refused without importing anything.

Liveness: a SimpleWorker does not heartbeat while a job runs, so its StartedJobRegistry entry
would only expire at the job timeout. :class:`SitefitWorker` runs a heartbeat thread during
each job that renews the entry every ``heartbeat_s`` with a TTL of ``3 * heartbeat_s``. A
worker killed with ``-9`` stops renewing; the entry expires, and the registry cleanup (run by
the API's maintenance loop, see ``server/queue_redis.py``, and by workers' own maintenance)
treats the job as abandoned: RQ retries it while ``Retry(max=job_retries)`` allows, then
fails it with ``AbandonedJobError``; the API copies that outcome into the job store.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import redis
from prometheus_client import CollectorRegistry, start_http_server
from rq import Queue
from rq.executions import Execution
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.timeouts import UnixSignalDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from sitefit.job_store import QUEUED_FUNCTION, JobStore, check_job_id
from sitefit.settings import Settings
from worker.job import JobTimedOut, run_job

log = logging.getLogger("sitefit.worker")
Runner = Callable[[str], object]


class UntrustedJobError(Exception):
    """A job hash in the queue asks for something other than a sitefit job."""


class SitefitJob(Job):
    """An RQ job that can only run the bound sitefit runner on one job id."""

    runner: ClassVar[Runner | None] = None

    @property
    def func(self) -> Callable[..., object]:
        if self.func_name != QUEUED_FUNCTION:
            raise UntrustedJobError("refused: not a sitefit job (unexpected function name)")
        args, kwargs = self.args, self.kwargs
        if kwargs or len(args) != 1 or not isinstance(args[0], str):
            raise UntrustedJobError("refused: a sitefit job takes exactly one job id")
        job_id = check_job_id(args[0])
        runner = type(self).runner
        if runner is None:
            raise UntrustedJobError("refused: this process runs no sitefit jobs")
        return lambda *_args, **_kwargs: runner(job_id)

    # Callbacks are named in the job hash and would be imported by name: never run any.
    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None


def bound_job_class(runner: Runner) -> type[SitefitJob]:
    """A :class:`SitefitJob` subclass whose jobs call ``runner(job_id)``."""
    return type("BoundSitefitJob", (SitefitJob,), {"runner": staticmethod(runner)})


class _TimeLimit(UnixSignalDeathPenalty):
    """RQ's SIGALRM job timeout, raising the sitefit error the job function records."""

    def handle_death_penalty(self, signum: int, frame: Any) -> None:
        raise JobTimedOut(f"job exceeded its time limit of {self._timeout} s")


class SitefitWorker(SimpleWorker):
    """SimpleWorker (no fork) with a heartbeat thread while a job runs (see module docs)."""

    death_penalty_class = _TimeLimit
    heartbeat_s = 10

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return 3 * self.heartbeat_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        done = threading.Event()
        beat = threading.Thread(
            target=self._beat, args=(job, execution, done), name="rq-heartbeat", daemon=True
        )
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution: Execution, done: threading.Event) -> None:
        while not done.wait(self.heartbeat_s):
            try:
                self.maintain_heartbeats(job, execution)
            except redis.RedisError as error:
                log.warning("heartbeat for job %s failed: %s", job.id, type(error).__name__)

    def request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested_by_signal = True
        super().request_stop(signum, frame)


def run_worker(settings: Settings, metrics_port: int | None = None, *, burst: bool = False) -> int:
    """Serve jobs from ``settings.queue_name`` until stopped (or, with ``burst``, drained)."""
    if settings.redis_url is None:
        raise ValueError("sitefit worker needs SITEFIT_REDIS_URL (the job queue)")
    from worker.engine import Engine
    from worker.worker_metrics import WorkerMetrics

    engine = Engine(settings)  # one per process: device and verified weights stay warm
    store = JobStore.from_settings(settings)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, engine)
    if metrics_port is not None:
        start_http_server(metrics_port, registry=registry)
        log.info("worker metrics on port %d", metrics_port)

    def runner(job_id: str) -> object:
        return run_job(
            job_id, store, engine, timeout_s=settings.job_timeout_s, observer=metrics.observe
        )

    job_class = bound_job_class(runner)
    connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    backoff = 1.0
    while True:
        worker = SitefitWorker(
            [settings.queue_name],
            connection=connection,
            job_class=job_class,
            serializer=JSONSerializer,
            maintenance_interval=max(10, 3 * settings.worker_heartbeat_s),
        )
        worker.heartbeat_s = settings.worker_heartbeat_s
        try:
            worker.work(burst=burst, logging_level="INFO")
        except redis.RedisError as error:
            log.error("lost Redis (%s); reconnecting in %.0f s", type(error).__name__, backoff)
        if burst or getattr(worker, "stop_requested_by_signal", False):
            return 0
        time.sleep(backoff)
        backoff = min(backoff * 2, 30.0)


def install_default_signals() -> None:
    """Restore default SIGINT/SIGTERM (a parent may have ignored them)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


__all__ = ["SitefitJob", "SitefitWorker", "UntrustedJobError", "bound_job_class", "run_worker"]
