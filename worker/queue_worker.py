"""``sitefit worker``: an RQ worker that runs sitefit jobs in its own process, never forking.

RQ's default ``Worker`` forks a work horse per job, which would rebuild the CUDA context and
reload every model for every job. :class:`SitefitWorker` is an RQ ``SimpleWorker`` (jobs run
in the worker's main thread), so the one :class:`~worker.engine.Engine` built at start keeps
its device and warm weights for the life of the process.

Safety: jobs are (de)serialized with RQ's ``JSONSerializer``, never pickle, and the job
class (:class:`worker.rq_jobs.SitefitJob`) runs nothing but the sitefit job function with one
job id: a job hash written by anyone else naming another function (``os.system``) or a
callback is refused without importing anything.

Liveness: a SimpleWorker does not heartbeat while a job runs, so its StartedJobRegistry entry
would only expire at the job timeout. :class:`SitefitWorker` runs a heartbeat thread during
each job that renews the entry every ``heartbeat_s`` with a TTL of ``3 * heartbeat_s``. A
worker killed with ``-9`` stops renewing; the entry expires, and the registry cleanup (run by
the API's maintenance loop, see ``server/queue_redis.py``, and by workers' own maintenance)
treats the job as abandoned: RQ retries it while ``Retry(max=job_retries)`` allows, then
fails it with ``AbandonedJobError``; the API copies that outcome into the job store.

Warm routing (``Settings.warm_routing``): the worker also listens, before the shared queue,
on a queue of its own, ``<queue>:w:<id>`` (``id``: random, one per process), and keeps a
record in Redis (:class:`~worker.rq_jobs.WarmKeys`) of the job it runs and of the site
weights its engine holds warm, rewritten after each job and renewed every heartbeat by a
thread for as long as the process lives (it expires three heartbeats after the process died).
The API sends a site's jobs to a live worker warm for it and moves them to the shared queue
if that worker has not started them after ``warm_routing_wait_s``. A job taken from the own
queue is run as a job of the shared queue it belongs to (its registry, its retries), so a
worker killed with it is handled as above. A worker that stops cleanly deletes its record
and hands the jobs still in its own queue back to the shared queue at once.
"""

from __future__ import annotations

import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from prometheus_client import CollectorRegistry, start_http_server
from redis.typing import EncodableT
from rq import Queue
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.timeouts import UnixSignalDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from sitefit.job_store import JobStore
from sitefit.settings import Settings
from worker.job import JobTimedOut, run_job
from worker.rq_jobs import (
    BUSY_FIELD,
    SitefitJob,
    UntrustedJobError,
    WarmKeys,
    bound_job_class,
    warm_field,
)

log = logging.getLogger("sitefit.worker")


class _TimeLimit(UnixSignalDeathPenalty):
    """RQ's SIGALRM job timeout, raising the sitefit error the job function records."""

    def handle_death_penalty(self, signum: int, frame: Any) -> None:
        raise JobTimedOut(f"job exceeded its time limit of {self._timeout} s")


class WarmPresence:
    """This worker's warm record and own queue (see the module docs); Redis errors are
    logged, never raised: warm routing is an optimisation, the shared queue still works."""

    def __init__(
        self,
        connection: redis.Redis,
        queue: str,
        heartbeat_s: int,
        held: Callable[[], dict[str, int]],
    ) -> None:
        self.connection = connection
        self.keys = WarmKeys(queue)
        self.shared_queue = queue
        self.worker_id = secrets.token_hex(8)
        self.ttl_s = 3 * heartbeat_s
        self.heartbeat_s = heartbeat_s
        self.held = held  # warm_field -> newest site version the engine holds
        self.busy = ""  # the job running now

    @property
    def own_queue(self) -> str:
        return self.keys.own_queue(self.worker_id)

    def publish(self) -> None:
        """Write the whole record afresh: what is warm now, and the job running."""
        fields: dict[EncodableT, EncodableT] = {BUSY_FIELD: self.busy}
        fields.update(self.held())
        key = self.keys.record(self.worker_id)
        try:
            with self.connection.pipeline() as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=fields)
                pipe.expire(key, self.ttl_s)
                pipe.sadd(self.keys.workers, self.worker_id)
                pipe.execute()
        except redis.RedisError as error:
            log.warning("cannot publish the warm-routing record (%s)", type(error).__name__)

    def running(self, job_id: str) -> None:
        self.busy = job_id
        key = self.keys.record(self.worker_id)
        try:
            with self.connection.pipeline() as pipe:
                pipe.hset(key, BUSY_FIELD, job_id)
                pipe.expire(key, self.ttl_s)  # never a record without expiry
                pipe.execute()
        except redis.RedisError as error:
            log.warning("cannot publish the warm-routing record (%s)", type(error).__name__)

    def idle(self) -> None:
        self.busy = ""
        self.publish()  # the job may have warmed (or evicted) a site's weights

    def renew(self) -> None:
        try:
            with self.connection.pipeline() as pipe:
                pipe.expire(self.keys.record(self.worker_id), self.ttl_s)
                pipe.sadd(self.keys.workers, self.worker_id)  # in case the API pruned it
                renewed = pipe.execute()[0]
        except redis.RedisError as error:
            log.debug("cannot renew the warm-routing record (%s)", type(error).__name__)
            return
        if not renewed:  # Redis lost it (restarted): write it again
            self.publish()

    def keep_alive(self, stop: threading.Event) -> None:
        """Renew the record every heartbeat until ``stop`` is set (a thread's target)."""
        while not stop.wait(self.heartbeat_s):
            self.renew()

    def withdraw(self) -> None:
        """Say this worker is gone, and hand what waits in its own queue to the shared one."""
        shared = Queue.redis_queue_namespace_prefix + self.shared_queue
        try:
            self.connection.delete(self.keys.record(self.worker_id))
            self.connection.srem(self.keys.workers, self.worker_id)
            moved = 0
            while self.connection.lmove(self.keys.own_list(self.worker_id), shared) is not None:
                moved += 1
        except redis.RedisError as error:  # the API moves them when their wait is over
            log.warning("cannot withdraw the warm-routing record (%s)", type(error).__name__)
            return
        if moved:
            log.info("handed %d job(s) waiting for this worker to the shared queue", moved)


class SitefitWorker(SimpleWorker):
    """SimpleWorker (no fork) with a heartbeat thread while a job runs (see module docs)."""

    death_penalty_class = _TimeLimit
    heartbeat_s = 10
    stopping: threading.Event | None = None  # set by run_worker's handler before RQ's are in
    presence: WarmPresence | None = None  # with warm routing: this worker's record

    def _install_signal_handlers(self) -> None:
        super()._install_signal_handlers()
        if self.stopping is not None and self.stopping.is_set():
            # a signal came while work() bootstrapped, before its handlers: honour it now
            self.stop_requested_by_signal = True
            self._stop_requested = True

    def subscribe(self) -> None:
        """RQ's subscription to its command channel, with a listener that wakes every second
        rather than every minute: when the worker stops, RQ waits for that listener with no
        limit (redis-py's ``PubSubWorkerThread.stop``), so a stop could take up to a minute."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        thread: Any = self.pubsub.run_in_thread(  # RQ declares the attribute as None
            sleep_time=1, daemon=True, exception_handler=self._pubsub_exception_handler
        )
        self.pubsub_thread = thread

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return 3 * self.heartbeat_s

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's heartbeat, which first registers the worker again when Redis lost it.

        Redis keeps nothing on disk: after a restart the worker is in none of RQ's worker
        sets. RQ reconnects by itself but registers only at start, so the worker went on
        taking jobs while invisible to ``rq info``, dashboards and readiness checks. RQ
        heartbeats at every turn of its dequeue loop, also after each reconnect. The worker's
        hash may exist again without being registered (RQ's bookkeeping at the end of a job,
        and the heartbeat thread during one, write single fields of it), so membership of the
        set of workers is what is checked, and that partial hash is replaced.
        """
        if pipeline is None and not self.connection.sismember(self.redis_workers_keys, self.key):
            log.warning("Redis has no record of this worker (restarted?): registering again")
            state = self.get_state()
            self.connection.delete(self.key)  # else register_birth sees "an active worker"
            self.register_birth()
            self.set_state(state)
        super().heartbeat(timeout, pipeline)

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's dequeue; a job taken from this worker's own queue is handed on as a job of
        the shared queue, its origin: its execution, heartbeats, end and retries are all
        recorded there, where the API's registry cleanup finds a dead worker's job."""
        result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        presence = self.presence
        if result is None or presence is None:
            return result
        job, queue = result
        if queue.name == presence.own_queue and job.origin == presence.shared_queue:
            shared = next(q for q in self.queues if q.name == presence.shared_queue)
            return job, shared
        return result

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        done = threading.Event()
        beat = threading.Thread(
            target=self._beat, args=(job, execution, done), name="rq-heartbeat", daemon=True
        )
        beat.start()
        if self.presence is not None:
            self.presence.running(job.id)
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join()
            if self.presence is not None:
                self.presence.idle()
        self.set_state(WorkerStatus.IDLE)

    def keeps_beating(self, job: Job, working_s: float) -> bool:
        """Whether the heartbeat of a job that has run ``working_s`` is still renewed: not
        once it is three heartbeats past its time limit. A job stuck where the limit cannot
        interrupt it (a hung native call: CUDA, a hard NFS mount) is then left to expire and
        be declared abandoned, rather than held "running" for ever by this thread."""
        timeout = job.timeout
        return timeout is None or timeout < 0 or working_s <= timeout + 3 * self.heartbeat_s

    def _beat(self, job: Job, execution: Execution, done: threading.Event) -> None:
        started = time.monotonic()
        while not done.wait(self.heartbeat_s):
            if not self.keeps_beating(job, time.monotonic() - started):
                log.error(
                    "job %s: still running past its time limit of %s s, stuck where it cannot "
                    "be interrupted; its heartbeat stops so that it is declared abandoned",
                    job.id, job.timeout,
                )  # fmt: skip
                return
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
    queues = [settings.queue_name]
    presence: WarmPresence | None = None
    present = threading.Event()  # set to stop the warm record's renewal thread
    if settings.warm_routing:

        def held() -> dict[str, int]:
            warm: dict[str, int] = {}
            cached = engine.site_models.keys()  # a snapshot, taken under the cache's lock
            for key in cached:
                field = warm_field(key.model, key.site)
                warm[field] = max(warm.get(field, 0), key.site_version)
            return warm

        presence = WarmPresence(connection, settings.queue_name, settings.worker_heartbeat_s,
                                held)  # fmt: skip
        queues.insert(0, presence.own_queue)  # its own jobs first
        presence.publish()
        threading.Thread(
            target=presence.keep_alive, args=(present,), name="warm-record", daemon=True
        ).start()
        log.info("warm routing: this worker's own queue is %s", presence.own_queue)
    stopping = threading.Event()  # set by a handler and polled, never waited on: a wait in
    # the thread the handler interrupts could deadlock on the Event's own lock

    def stop_between_loops(signum: int, frame: Any) -> None:
        stopping.set()

    def listen() -> None:
        # RQ's work() installs its own SIGTERM/SIGINT handlers and leaves them behind; out of
        # its loop (building a worker, the back-off) a signal must still stop us cleanly
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stop_between_loops)

    def serve() -> int:
        backoff = 1.0
        listen()  # and again after each loop of RQ's, which leaves its handlers behind
        while True:
            if stopping.is_set():
                return 0
            worker: SitefitWorker | None = None
            started = time.monotonic()
            try:  # building the worker talks to Redis too (CLIENT SETNAME): Redis may be down
                worker = SitefitWorker(
                    queues,
                    connection=connection,
                    job_class=job_class,
                    serializer=JSONSerializer,
                    maintenance_interval=max(10, 3 * settings.worker_heartbeat_s),
                )
                worker.heartbeat_s = settings.worker_heartbeat_s
                worker.stopping = stopping
                worker.presence = presence
                if not stopping.is_set():
                    worker.work(burst=burst, logging_level="INFO")
            except redis.RedisError as error:
                log.error("lost Redis (%s)", type(error).__name__)
                if burst:
                    return 1  # could not drain the queue
            finally:
                listen()
            if burst or stopping.is_set() or getattr(worker, "stop_requested_by_signal", False):
                return 0
            if time.monotonic() - started > 60:
                backoff = 1.0  # it ran a while: this is a new problem, retry soon
            log.warning("worker loop ended; starting a new one in %.0f s", backoff)
            resume = time.monotonic() + backoff
            while time.monotonic() < resume:
                if stopping.is_set():
                    log.info("stopped while waiting to reconnect")
                    return 0
                time.sleep(0.1)
            backoff = min(backoff * 2, 30.0)

    try:
        return serve()
    except StopRequested:  # RQ's handler, left installed, fired out of its loop: a clean stop
        return 0
    finally:
        present.set()
        if presence is not None:
            presence.withdraw()


__all__ = [
    "SitefitJob",
    "SitefitWorker",
    "UntrustedJobError",
    "WarmPresence",
    "bound_job_class",
    "run_worker",
]
