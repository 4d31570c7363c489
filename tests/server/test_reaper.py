"""The API's reaper on a real Redis: abandoned jobs end, and no callback named in Redis runs."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Callback, Queue, Retry
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from server.queue_redis import RedisQueue
from sitefit.job_store import JobStore
from sitefit.jobs import QUEUED_FUNCTION, Progress, new_job_id
from tests.server.helpers import service_settings
from tests.server.processes import RedisProcess
from tests.stored_jobs import publish_job
from worker.queue_worker import SitefitWorker, bound_job_class


def record(job: Any, *args: Any) -> None:
    """Leaves a marker if the reaper ever imports and calls a callback named in a job hash."""
    Path(job.meta["marker"]).write_text("callback ran in the API")


def _abandoned(
    connection: redis.Redis, queue_name: str, marker: Path, job_id: str | None = None, **kw: Any
) -> Job:
    """A job a worker started and then died on: STARTED, its execution about to expire."""
    queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
    job_id = job_id or new_job_id()
    job = queue.enqueue_call(
        QUEUED_FUNCTION,
        args=(job_id,),
        job_id=job_id,
        on_failure=Callback("tests.server.test_reaper.record"),
        meta={"marker": str(marker)},
        **kw,
    )
    queue.remove(job)
    with connection.pipeline() as pipeline:
        Execution.create(job, ttl=1, pipeline=pipeline, worker_name="dead-worker")
        job.set_status(JobStatus.STARTED, pipeline=pipeline)
        pipeline.execute()
    return job


def test_reaper_fails_abandoned_jobs_without_importing_their_callbacks(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    settings = service_settings(tmp_path, redis_url=redis_server.url, queue_name="reaper")
    connection = redis.Redis.from_url(redis_server.url)
    marker = tmp_path / "marker"
    job = _abandoned(connection, "reaper", marker)
    reaper = RedisQueue(settings, JobStore.from_settings(settings))
    time.sleep(2.1)  # the execution's heartbeat TTL (1 s) has passed
    reaper.maintain()
    assert Job.fetch(job.id, connection=connection, serializer=JSONSerializer).get_status() == (
        JobStatus.FAILED
    )
    assert not marker.exists()


def test_reaper_requeues_with_a_retry_left_and_says_so_in_the_store(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    settings = service_settings(tmp_path, redis_url=redis_server.url, queue_name="reaper-retry")
    store = JobStore.from_settings(settings)
    job_id = publish_job(store, site="s")
    store.set_progress(job_id, Progress(status="running", stage="adapting", attempt=1))
    connection = redis.Redis.from_url(redis_server.url)
    _abandoned(connection, "reaper-retry", tmp_path / "m", job_id, retry=Retry(max=1))
    time.sleep(2.1)
    RedisQueue(settings, store).maintain()
    state = store.state(job_id)
    assert state.status == "queued" and state.progress.attempt == 1
    assert "stopped (killed or crashed)" in (state.progress.note or "")
    assert Queue("reaper-retry", connection=connection).job_ids == [job_id]


def test_a_job_with_unreadable_data_does_not_stop_the_pass(
    tmp_path: Path, redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    settings = service_settings(tmp_path, redis_url=redis_server.url, queue_name="reaper-corrupt")
    store = JobStore.from_settings(settings)
    corrupt, lost = "0" * 32, "f" * 32  # ids are visited in order: the corrupt one first
    long_ago = time.time() - 3600  # past the grace for jobs between publish and enqueue
    publish_job(store, job_id=corrupt, created_at=long_ago)
    publish_job(store, job_id=lost, created_at=long_ago)  # queued in the store, never in Redis
    (store.job_dir(corrupt) / "job.json").write_bytes(b"{not json")
    with caplog.at_level(logging.WARNING, logger="sitefit.server"):
        RedisQueue(settings, store).maintain()
    state = store.state(lost)
    assert state.status == "failed" and "lost from the queue" in (state.error or "")
    assert any(
        corrupt in r.getMessage() and "unreadable job.json" in r.getMessage()
        for r in caplog.records
    )
    assert not store.is_ended(corrupt)  # left alone: the retention sweep deletes it later


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        ("skipped", "do the API and the workers share SITEFIT_HOME?"),  # found no such job
        ("failed", "could not record the job's end"),  # e.g. its failure hit a full disk
    ],
)
def test_a_job_rq_finished_but_the_store_never_saw_end_names_the_cause(
    tmp_path: Path, redis_server: RedisProcess, outcome: str, reason: str
) -> None:
    queue_name = f"reaper-finished-{outcome}"
    settings = service_settings(tmp_path, redis_url=redis_server.url, queue_name=queue_name)
    store = JobStore.from_settings(settings)
    job_id = publish_job(store, site="s")
    api = RedisQueue(settings, store)
    api.submit(job_id)
    connection = redis.Redis.from_url(redis_server.url)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    worker = SitefitWorker(
        [queue_name], connection=connection, job_class=bound_job_class(lambda _: outcome),
        serializer=JSONSerializer,
    )  # fmt: skip
    try:
        worker.work(burst=True)  # the job ends in RQ as finished; the store is not written
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    api.maintain()
    state = store.state(job_id)
    assert state.status == "failed" and reason in (state.error or ""), state.error
    assert "killed" not in (state.error or "")
