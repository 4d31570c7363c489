"""The RQ side of `sitefit worker`, in-process on a real Redis: what it runs, what it refuses.

(The worker as a subprocess, killed and canceled, is tested in tests/server.)
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Callback, Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from sitefit.jobs import QUEUED_FUNCTION, new_job_id
from sitefit.settings import Settings
from tests.server.processes import RedisProcess
from worker.queue_worker import SitefitWorker, bound_job_class, run_worker


@pytest.fixture(scope="module")
def connection(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    server = RedisProcess(tmp_path_factory.mktemp("redis-worker"))
    server.start()
    yield redis.Redis.from_url(server.url)
    server.stop()


def record_callback(job: Any, connection: Any, *args: Any) -> None:
    """Would leave a marker if the worker ever imported and ran a callback named in a job."""
    Path(job.meta["marker"]).write_text("callback ran")


def _drain(connection: redis.Redis, queue: str, ran: list[str]) -> None:
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    worker = SitefitWorker(
        [queue],
        connection=connection,
        job_class=bound_job_class(ran.append),
        serializer=JSONSerializer,
    )
    try:
        worker.work(burst=True)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def _result(connection: redis.Redis, job: Job) -> tuple[str, str]:
    fetched = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
    result = fetched.latest_result()
    return fetched.get_status(), (result.exc_string or "") if result is not None else ""


def test_runs_sitefit_jobs_by_id_and_refuses_everything_else(
    connection: redis.Redis, tmp_path: Path
) -> None:
    queue = Queue("only-sitefit", connection=connection, serializer=JSONSerializer)
    job_id = new_job_id()
    good = queue.enqueue_call(QUEUED_FUNCTION, args=(job_id,), job_id=job_id)
    system = queue.enqueue_call("os.system", args=(f"touch {tmp_path / 'pwned'}",))
    traversal = queue.enqueue_call(QUEUED_FUNCTION, args=("../../etc",))
    extra = queue.enqueue_call(QUEUED_FUNCTION, args=(new_job_id(),), kwargs={"x": 1})
    marker = tmp_path / "callback"
    with_callback = queue.enqueue_call(
        QUEUED_FUNCTION,
        args=(new_job_id(),),
        on_success=Callback("tests.worker.test_queue_worker.record_callback"),
        on_failure=Callback("tests.worker.test_queue_worker.record_callback"),
        meta={"marker": str(marker)},
    )
    ran: list[str] = []
    _drain(connection, "only-sitefit", ran)

    assert _result(connection, good)[0] == JobStatus.FINISHED
    assert ran[0] == job_id
    status, error = _result(connection, system)
    assert status == JobStatus.FAILED and "not a sitefit job" in error
    assert not (tmp_path / "pwned").exists()
    assert "unknown job" in _result(connection, traversal)[1]
    assert "exactly one job id" in _result(connection, extra)[1]
    assert _result(connection, with_callback)[0] == JobStatus.FINISHED
    assert not marker.exists()
    assert len(ran) == 2


def test_heartbeat_ttl_follows_the_configured_interval(connection: redis.Redis) -> None:
    worker = SitefitWorker(["ttl"], connection=connection, serializer=JSONSerializer)
    worker.heartbeat_s = 4
    job = Queue("ttl", connection=connection, serializer=JSONSerializer).enqueue_call(
        QUEUED_FUNCTION, args=(new_job_id(),), timeout=3600
    )
    assert worker.get_heartbeat_ttl(job) == 12  # not the job timeout + 60 of SimpleWorker


def test_the_heartbeat_stops_three_beats_past_the_time_limit(connection: redis.Redis) -> None:
    """A job stuck where its time limit cannot interrupt it must not stay running for ever."""
    worker = SitefitWorker(["beat"], connection=connection, serializer=JSONSerializer)
    worker.heartbeat_s = 2
    queue = Queue("beat", connection=connection, serializer=JSONSerializer)
    limited = queue.enqueue_call(QUEUED_FUNCTION, args=(new_job_id(),), timeout=30)
    assert worker.keeps_beating(limited, 35.9)
    assert not worker.keeps_beating(limited, 36.1)
    unlimited = queue.enqueue_call(QUEUED_FUNCTION, args=(new_job_id(),), timeout=-1)
    assert worker.keeps_beating(unlimited, 10**6)


def test_a_burst_worker_without_redis_says_so_and_exits_non_zero(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, redis_url="redis://127.0.0.1:1/0", device="cpu")
    assert run_worker(settings, burst=True) == 1


def test_a_stop_signalled_before_rqs_handlers_are_in_is_honoured(connection: redis.Redis) -> None:
    """A SIGTERM while work() bootstraps (Redis round trips, before RQ installs its handlers)
    reaches only run_worker's handler: the worker must stop before taking a job, not serve
    until a second signal (which an orchestrator sends as SIGKILL, mid-job)."""
    queue = Queue("signalled", connection=connection, serializer=JSONSerializer)
    job = queue.enqueue_call(QUEUED_FUNCTION, args=(new_job_id(),))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    ran: list[str] = []
    worker = SitefitWorker(
        ["signalled"], connection=connection, job_class=bound_job_class(ran.append),
        serializer=JSONSerializer,
    )  # fmt: skip
    worker.stopping = threading.Event()
    worker.stopping.set()  # as run_worker's handler does
    try:
        worker.work(burst=True)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert ran == [] and queue.job_ids == [job.id]
    assert worker.stop_requested_by_signal
