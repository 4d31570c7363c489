"""Warm routing on a real Redis, process by process: where the API sends a job, what a worker's
record says, and how no routed job is lost (waits that end, cancels, stops, dead takers).

The API side is :class:`server.queue_redis.RedisQueue`; the worker side a real
:class:`worker.queue_worker.SitefitWorker` with its :class:`WarmPresence`, running jobs
through a recording runner. The whole path across hosts is in ``test_scaleout.py``.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from server.queue_redis import RedisQueue
from sitefit.job_store import JobStore
from sitefit.report import Mode
from tests.server.helpers import service_settings
from tests.server.processes import RedisProcess, wait_for
from tests.stored_jobs import publish_job
from worker.queue_worker import SitefitWorker, WarmPresence, bound_job_class
from worker.rq_jobs import BUSY_FIELD, WarmKeys


@pytest.fixture(scope="module")
def connection(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    server = RedisProcess(tmp_path_factory.mktemp("redis-warm"))
    server.start()
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()
    server.stop()


def _url(connection: redis.Redis) -> str:
    kwargs = connection.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"


def _api(tmp_path: Path, connection: redis.Redis, queue: str, **overrides: Any) -> RedisQueue:
    values: dict[str, Any] = {"warm_routing": True, **overrides}
    settings = service_settings(tmp_path, redis_url=_url(connection), queue_name=queue,
                                **values)  # fmt: skip
    return RedisQueue(settings, JobStore.from_settings(settings))


def _worker(connection: redis.Redis, queue: str, held: dict[str, int]) -> WarmPresence:
    presence = WarmPresence(connection, queue, heartbeat_s=5, held=lambda: dict(held))
    presence.publish()
    return presence


def _job(api: RedisQueue, site: str = "site-a", mode: Mode = "cached") -> str:
    job_id = publish_job(api.store, model="m", site=site, mode=mode)
    api.submit(job_id)
    return job_id


def _ids(connection: redis.Redis, key: str) -> list[str]:
    values = connection.lrange(key, 0, -1)
    return [value.decode() if isinstance(value, bytes) else value for value in values]


def _work(connection: redis.Redis, queues: list[str], presence: WarmPresence | None,
          runner: Any) -> None:  # fmt: skip
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    worker = SitefitWorker(queues, connection=connection, job_class=bound_job_class(runner),
                           serializer=JSONSerializer)  # fmt: skip
    worker.presence = presence
    try:
        worker.work(burst=True)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def test_a_job_goes_to_the_least_loaded_live_worker_holding_the_newest_weights(
    tmp_path: Path, connection: redis.Redis
) -> None:
    queue = "warm-choice"
    api = _api(tmp_path, connection, queue)
    newest = _worker(connection, queue, {"m/site-a": 2})
    older = _worker(connection, queue, {"m/site-a": 1, "m/site-b": 4})
    _worker(connection, queue, {})  # live, idle, warm for nothing

    def own(presence: WarmPresence) -> list[str]:
        return _ids(connection, presence.keys.own_list(presence.worker_id))

    job_id = _job(api)
    assert own(newest) == [job_id] and own(older) == []
    assert Job.fetch(job_id, connection=connection, serializer=JSONSerializer).origin == queue
    # not warm anywhere, or no site weights wanted: the shared queue
    elsewhere = [_job(api, site="site-c"), _job(api, site="site-a", mode="none")]
    assert _ids(connection, api.queue.key) == elsewhere
    site_b = _job(api, site="site-b")
    assert own(older) == [site_b]

    twin = _worker(connection, queue, {"m/site-a": 2})
    newest.running("0" * 32)  # busy, and a job waits for it: its idle twin takes the next one
    job_id = _job(api)
    assert own(twin) == [job_id]
    # every worker warm with the newest version busy: the shared queue, where the first free
    # worker starts it (the idle cold one, here), rather than behind a busy warm worker's job
    twin.running("1" * 32)
    job_id = _job(api)
    assert _ids(connection, api.queue.key)[-1] == job_id
    assert api.depth() == 6  # the shared queue and every worker's own queue

    connection.delete(newest.keys.record(newest.worker_id), twin.keys.record(twin.worker_id))
    connection.delete(older.keys.own_list(older.worker_id))  # as if it had run site-b's job
    job_id = _job(api)  # the newest version a live worker holds, once the others are gone
    assert own(older) == [job_id]


def test_with_warm_routing_off_every_job_goes_to_the_shared_queue(
    tmp_path: Path, connection: redis.Redis
) -> None:
    queue = "warm-off"
    api = _api(tmp_path, connection, queue, warm_routing=False)
    warm = _worker(connection, queue, {"m/site-a": 1})
    job_id = _job(api)
    assert _ids(connection, api.queue.key) == [job_id]
    assert _ids(connection, warm.keys.own_list(warm.worker_id)) == []
    assert connection.zcard(WarmKeys(queue).routed) == 0


def test_a_job_its_warm_worker_takes_is_run_as_a_job_of_the_shared_queue(
    tmp_path: Path, connection: redis.Redis
) -> None:
    queue = "warm-taken"
    api = _api(tmp_path, connection, queue, warm_routing_wait_s=0.1)  # no sweeper runs here
    held: dict[str, int] = {}
    presence = WarmPresence(connection, queue, heartbeat_s=5, held=lambda: dict(held))
    presence.publish()
    record = presence.keys.record(presence.worker_id)
    connection.hset(record, "m/site-a", 1)  # as if an earlier job had warmed it
    job_id = _job(api)
    seen: list[tuple[str, object]] = []

    def runner(ran: str) -> str:
        seen.append((ran, connection.hget(record, BUSY_FIELD)))
        held["m/site-a"] = 2  # the job saved version 2 and keeps it warm
        return "finished"

    _work(connection, [presence.own_queue, queue], presence, runner)
    assert seen == [(job_id, job_id.encode())]  # the record said busy with it meanwhile
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FINISHED and job.origin == queue
    assert StartedJobRegistry(queue, connection=connection).count == 0
    assert connection.hgetall(record) == {BUSY_FIELD.encode(): b"", b"m/site-a": b"2"}
    assert 0 < connection.ttl(record) <= 15
    moved: list[int] = []  # once its wait is over, the entry is forgotten, nothing moved

    def forgotten() -> bool:
        moved.append(api.move_due())
        return not connection.zcard(presence.keys.routed)

    wait_for(forgotten, 5, "the routed entry to be forgotten")
    assert set(moved) == {0} and _ids(connection, api.queue.key) == []


def test_a_routed_job_not_taken_within_the_wait_moves_to_the_shared_queue(
    tmp_path: Path, connection: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    queue = "warm-moved"
    api = _api(tmp_path, connection, queue, warm_routing_wait_s=0.1)
    gone = [_worker(connection, queue, {"m/site-a": 1}) for _ in range(2)]  # taking nothing
    job_id, canceled = _job(api), _job(api)  # one each: the first is no longer idle
    waiting = sorted(_ids(connection, w.keys.own_list(w.worker_id))[0] for w in gone)
    assert waiting == sorted([job_id, canceled])
    api.cancel(canceled)
    moved: list[int] = []

    def over() -> bool:
        moved.append(api.move_due())
        return not connection.zcard(api.warm.routed)

    with caplog.at_level(logging.INFO, logger="sitefit.server"):
        wait_for(over, 5, "the waits to end")
    assert sum(moved) == 1
    assert _ids(connection, api.queue.key) == [job_id]  # the canceled one is only dropped
    assert all(not _ids(connection, w.keys.own_list(w.worker_id)) for w in gone)
    assert api.move_due() == 0
    assert f"job {job_id}: warm worker" in caplog.text and f"job {canceled}" not in caplog.text

    ran: list[str] = []
    _work(connection, [queue], None, ran.append)
    assert ran == [job_id]  # run once, by a worker of the shared queue


def test_a_worker_that_stops_hands_its_own_queue_back_at_once(
    tmp_path: Path, connection: redis.Redis
) -> None:
    queue = "warm-withdraw"
    api = _api(tmp_path, connection, queue)
    leaving = _worker(connection, queue, {"m/site-a": 1})
    job_id = _job(api)
    assert _ids(connection, leaving.keys.own_list(leaving.worker_id)) == [job_id]
    leaving.withdraw()
    assert _ids(connection, api.queue.key) == [job_id]
    assert not connection.exists(leaving.keys.own_list(leaving.worker_id))
    assert not connection.exists(leaving.keys.record(leaving.worker_id))
    assert not connection.sismember(leaving.keys.workers, leaving.worker_id)
    job_id = _job(api)
    assert _ids(connection, api.queue.key)[-1] == job_id  # no longer routed there


def test_a_job_a_worker_took_but_never_started_is_queued_again(
    tmp_path: Path, connection: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Workers listening on two lists take jobs with BLPOP: one killed between taking a job and
    starting it leaves the job queued in RQ and in no list, which RQ never notices."""
    queue = "warm-stranded"
    api = _api(tmp_path, connection, queue)
    api.lost_grace_s = 0.0
    api.stranded_after_s = 0.5
    stranded, waiting = _job(api, site="elsewhere"), _job(api, site="elsewhere")
    assert connection.lpop(api.queue.key) == stranded.encode()  # the taker dies here

    def maintain() -> list[str]:
        connection.delete(f"sitefit:{queue}:maintenance-lock")  # as the next pass would
        api.maintain()
        return _ids(connection, api.queue.key)

    assert maintain() == [waiting]  # not yet: a live worker starts it within milliseconds
    with caplog.at_level(logging.WARNING, logger="sitefit.server"):
        wait_for(lambda: stranded in maintain(), 10, "the stranded job to be queued again")
    assert _ids(connection, api.queue.key) == [waiting, stranded]
    assert "stopped before starting it; queued again" in caplog.text
    assert Queue(queue, connection=connection).count == 2
