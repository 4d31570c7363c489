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
   A job RQ calls queued that is in no list for ``stranded_after_s`` (a worker took it and
   died before starting it: workers that listen on two lists take jobs with ``BLPOP``, which
   RQ does not guard as it guards a single queue) is put back on the shared queue.

Warm routing (``Settings.warm_routing``, keys in :class:`~worker.rq_jobs.WarmKeys`): a job for
a site (mode other than ``none``) goes to the own queue of a live, idle worker whose record
says it holds the newest version of that site's weights warm that any live worker holds;
when there is none (nobody warm, or every such worker busy or with jobs waiting for it) it
goes to the shared queue, so a job never queues behind a busy warm worker's job. The job is
still a job of the shared queue (its RQ origin), so retries and registries stay there. A job
such a worker has not taken after ``warm_routing_wait_s`` (it took another job meanwhile, or
it is gone: a record outlives its worker by up to three heartbeats) moves to the shared
queue: a Lua script removes it from the worker's list and pushes it on the shared one in one
step, so a job is in exactly one list, or taken. A thread of the API does this several times
per wait; ``maintain`` too.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import redis
from redis.client import Pipeline
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from server.errors import QueueUnavailableError
from server.queues import requeued
from sitefit.job_store import JobStorageError, JobStore
from sitefit.jobs import QUEUED_FUNCTION, JobNotFoundError, JobState
from sitefit.settings import Settings
from worker.rq_jobs import BUSY_FIELD, SitefitJob, WarmKeys, warm_field

log = logging.getLogger("sitefit.server")
_ABANDONED = "AbandonedJobError"
_ENDED_IN_RQ = (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, JobStatus.FINISHED)

# Routed jobs whose wait is over -> the shared queue. KEYS: the routed set, the shared list;
# ARGV: now, how many at most, the prefix of the workers' own lists, that of RQ job hashes.
# Returns the members moved ("<worker> <job id>"); a job its worker took, or one deleted
# (canceled), is only forgotten.
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = {}
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  local space = string.find(member, ' ', 1, true)
  if space then
    local job = string.sub(member, space + 1)
    local list = ARGV[3] .. string.sub(member, 1, space - 1)
    if redis.call('LREM', list, 1, job) == 1 and redis.call('EXISTS', ARGV[4] .. job) == 1 then
      redis.call('RPUSH', KEYS[2], job)
      table.insert(moved, member)
    end
  end
end
return moved
"""


class _OwnQueue(Queue):
    """The shared queue, except that a job is pushed on one worker's own list: the job's
    origin, registries and retries are the shared queue's (see the module docs)."""

    own_list = ""

    def push_job_id(
        self, job_id: str, pipeline: Pipeline | None = None, at_front: bool = False
    ) -> None:
        connection = pipeline if pipeline is not None else self.connection
        connection.rpush(self.own_list, job_id)


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
        # a worker takes a job and starts it within milliseconds; this long means it died
        self.stranded_after_s = max(30.0, 3.0 * settings.worker_heartbeat_s)
        self._stranded_since: dict[str, float] = {}
        self.warm = WarmKeys(settings.queue_name)
        self._move_due = self.connection.register_script(_MOVE_DUE)
        self._sweeping = threading.Event()  # set: the fallback thread stops
        self._sweeper: threading.Thread | None = None

    def start(self) -> None:
        problem = self.problem()
        if problem is not None:
            log.warning("job queue not ready at start: %s", problem)
        if self.settings.warm_routing:
            self._sweeping.clear()
            self._sweeper = threading.Thread(
                target=self._sweep_forever, name="sitefit-warm-fallback", daemon=True
            )
            self._sweeper.start()

    def stop(self) -> None:
        self._sweeping.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=10)
            self._sweeper = None
        self.connection.close()

    def problem(self) -> str | None:
        try:
            self.connection.ping()
        except redis.RedisError as error:
            return f"Redis unreachable ({type(error).__name__})"
        return None

    def submit(self, job_id: str) -> None:
        retries = self.settings.job_retries
        options: dict[str, Any] = dict(
            args=(job_id,),
            job_id=job_id,
            timeout=self.settings.job_timeout_s,
            result_ttl=self.settings.job_retention_s,
            failure_ttl=self.settings.job_retention_s,
            retry=Retry(max=retries) if retries else None,
            description=f"sitefit job {job_id}",
        )
        try:
            worker = self._warm_worker(job_id)
            if worker is None:
                self.queue.enqueue_call(QUEUED_FUNCTION, **options)
                return
            own = _OwnQueue(self.settings.queue_name, connection=self.connection,
                            serializer=JSONSerializer, job_class=SitefitJob)  # fmt: skip
            own.own_list = self.warm.own_list(worker)
            deadline = time.time() + self.settings.warm_routing_wait_s
            with self.connection.pipeline() as pipe:  # MULTI: the job and its deadline, or none
                own.enqueue_call(QUEUED_FUNCTION, pipeline=pipe, **options)
                pipe.zadd(self.warm.routed, {f"{worker} {job_id}": deadline})
                pipe.execute()
            log.debug("job %s: routed to warm worker %s", job_id, worker)
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
            waiting = self.queue.count
            workers = sorted(self._members(self.warm.workers))
            if workers:
                with self.connection.pipeline(transaction=False) as pipe:
                    for worker in workers:
                        pipe.llen(self.warm.own_list(worker))
                    waiting += sum(int(n) for n in pipe.execute())
            return waiting
        except redis.RedisError:
            return None

    # -- warm routing -------------------------------------------------------------------------

    def _warm_worker(self, job_id: str) -> str | None:
        """The worker to route ``job_id`` to (see the module docs), or ``None``."""
        if not self.settings.warm_routing:
            return None
        try:
            record = self.store.record(job_id)
        except (JobNotFoundError, JobStorageError):
            return None  # the shared queue; the job itself reports what is wrong
        if record.site is None or record.mode == "none":
            return None
        workers = sorted(self._members(self.warm.workers))
        if not workers:
            return None
        field = warm_field(record.model, record.site)
        with self.connection.pipeline(transaction=False) as pipe:
            for worker in workers:
                pipe.hmget(self.warm.record(worker), [field, BUSY_FIELD])
                pipe.llen(self.warm.own_list(worker))
            answers = pipe.execute()
        warm: list[tuple[int, bool, str]] = []  # (version held, idle, worker)
        for worker, (version, busy), waiting in zip(
            workers, answers[::2], answers[1::2], strict=True
        ):
            if version is not None:  # warm for the site (no record: not alive)
                warm.append((int(version), not busy and not int(waiting), worker))
        if not warm:
            return None
        newest = max(version for version, _, _ in warm)
        idle = [worker for version, free, worker in warm if version == newest and free]
        # a busy warm worker is not waited for: the job would queue behind its job, where
        # the shared queue lets the first free worker start it (cold, but sooner)
        return random.choice(idle) if idle else None

    def move_due(self) -> int:
        """Move routed jobs whose wait is over to the shared queue; how many moved."""
        moved = 0
        while True:
            batch = self._move_due(
                keys=[self.warm.routed, self.queue.key],
                args=[
                    time.time(),
                    100,
                    self.warm.own_list(""),
                    SitefitJob.redis_job_namespace_prefix,
                ],
            )
            for member in batch:
                worker, job_id = _text(member).split(" ", 1)
                moved += 1
                log.info(
                    "job %s: warm worker %s did not start it within %g s: moved to the shared "
                    "queue",
                    job_id, worker, self.settings.warm_routing_wait_s,
                )  # fmt: skip
            if len(batch) < 100:
                return moved

    def _sweep_forever(self) -> None:
        period = min(0.5, max(0.05, self.settings.warm_routing_wait_s / 4))
        while not self._sweeping.wait(period):
            try:
                self.move_due()
            except redis.RedisError as error:  # Redis down: /readyz says so; try again
                log.debug("warm routing fallback: %s", type(error).__name__)

    def _prune_workers(self) -> None:
        """Forget workers whose record expired once nothing waits in their own queue."""
        workers = sorted(self._members(self.warm.workers))
        if not workers:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            for worker in workers:
                pipe.exists(self.warm.record(worker))
                pipe.llen(self.warm.own_list(worker))
            answers = pipe.execute()
        gone = [w for w, alive, waiting in zip(workers, answers[::2], answers[1::2], strict=True)
                if not alive and not waiting]  # fmt: skip
        if gone:
            self.connection.srem(self.warm.workers, *gone)

    def _members(self, key: str) -> set[str]:
        return {_text(member) for member in self.connection.smembers(key)}

    def maintain(self) -> None:
        token = secrets.token_hex(8)
        hold_ms = max(1000, int(self.settings.maintenance_interval_s * 900))
        if not self.connection.set(self._lock_key, token, nx=True, px=hold_ms):
            return  # another API process is doing it
        self.queue.started_job_registry.cleanup()  # with SitefitJob: callbacks never run
        self.move_due()
        waiting = _Waiting(self)
        for job_id in self.store.job_ids():
            if self.store.is_ended(job_id):
                continue
            try:
                self._reconcile(self.store.state(job_id), waiting)
            except JobNotFoundError:
                continue
            except JobStorageError as error:  # one unreadable job must not stop the pass
                log.warning("job %s: cannot reconcile with the queue: %s", job_id, error)
        for job_id in set(self._stranded_since) - waiting.suspects:
            del self._stranded_since[job_id]  # seen in a list, started, or ended since
        self._prune_workers()

    def _waiting_ids(self) -> Iterator[str]:
        """Every job id in a list a worker takes jobs from (or RQ's in-flight list)."""
        lists = [self.queue.key, self.queue.intermediate_queue_key]
        lists += [self.warm.own_list(worker) for worker in self._members(self.warm.workers)]
        for key in lists:
            for job_id in self.connection.lrange(key, 0, -1):
                yield _text(job_id)

    def _rescue_if_stranded(self, job_id: str, waiting: _Waiting) -> None:
        """Put back a job RQ calls queued that has been in no list for ``stranded_after_s``."""
        if job_id in waiting:
            return
        waiting.suspects.add(job_id)
        now = time.monotonic()
        since = self._stranded_since.setdefault(job_id, now)
        if now - since < self.stranded_after_s:
            return
        del self._stranded_since[job_id]
        self.connection.rpush(self.queue.key, job_id)
        log.warning("job %s: a worker took it and stopped before starting it; queued again", job_id)

    def _reconcile(self, state: JobState, waiting: _Waiting) -> None:
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
        elif (
            status == JobStatus.QUEUED and time.time() - state.record.created_at > self.lost_grace_s
        ):
            self._rescue_if_stranded(job_id, waiting)


class _Waiting:
    """The ids of jobs waiting in a list, read once per maintenance pass when first asked."""

    def __init__(self, queue: RedisQueue) -> None:
        self._queue = queue
        self._ids: set[str] | None = None
        self.suspects: set[str] = set()  # queued in RQ, in no list, this pass

    def __contains__(self, job_id: object) -> bool:
        if self._ids is None:
            self._ids = set(self._queue._waiting_ids())
        return job_id in self._ids


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
