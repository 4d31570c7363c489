"""Redis stops while the API runs: not ready, uploads 503, reads still work, then recovery."""

from __future__ import annotations

import re
import socket
import time
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import redis

from tests.conftest import PhantomCase
from tests.server.helpers import client, service_settings, upload, wait_for_status
from tests.server.processes import RedisProcess, WorkerProcess, service_env, wait_for


def test_api_survives_a_redis_outage_and_recovers(
    service_home: Path, brain_model: str, shifted_brain_case: PhantomCase, tmp_path: Path
) -> None:
    private = RedisProcess(tmp_path)
    private.start()
    settings = service_settings(service_home, redis_url=private.url, queue_name="outage")
    try:
        with client(settings) as api:
            assert api.get("/readyz").status_code == 200
            before = upload(api, shifted_brain_case.image, brain_model)
            assert before.status_code == 202
            job_id = before.json()["id"]

            private.stop()
            ready = api.get("/readyz")
            assert ready.status_code == 503
            assert "Redis unreachable" in ready.json()["checks"]["queue"]
            started = time.monotonic()
            refused = upload(api, shifted_brain_case.image, brain_model)
            assert time.monotonic() - started < 15  # an answer, not a hang
            assert refused.status_code == 503
            assert "job queue unavailable" in refused.json()["detail"]
            assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # reads work
            assert "sitefit_queue_depth" not in api.get("/metrics").text

            private.start()  # same port, empty: Redis kept nothing (no persistence)
            assert api.get("/readyz").status_code == 200
            after = upload(api, shifted_brain_case.image, brain_model)
            assert after.status_code == 202, after.text
            # the job queued before the outage is gone from Redis: it must not stay queued
            lost = wait_for_status(api, job_id, ("failed",), timeout=30)
            assert "lost from the queue" in lost["error"]
            assert api.get(f"/v1/jobs/{after.json()['id']}").json()["status"] == "queued"
    finally:
        private.stop()
    assert not [
        p for p in (service_home / "jobs").iterdir() if p.name == ".incoming" and any(p.iterdir())
    ]


def test_a_worker_outlives_redis_being_down_at_its_start_and_mid_job(
    service_home: Path, brain_model: str, shifted_brain_case: PhantomCase, tmp_path: Path
) -> None:
    """operations.md: the worker reconnects with back-off. Started before Redis, it waits
    (it used to exit with a traceback); Redis stopping while a job runs does not end it."""
    private = RedisProcess(tmp_path)  # its port is chosen; the server is not running yet
    env = service_env(service_home, private.url, "late-redis")
    worker = WorkerProcess(env, tmp_path / "worker.log").start(wait=False)
    settings = service_settings(service_home, redis_url=private.url, queue_name="late-redis")
    try:
        time.sleep(3)  # a few failed connections and back-offs
        assert worker.process is not None and worker.process.poll() is None, "it gave up"
        private.start()
        worker.wait_registered()
        with client(settings) as api:
            first = upload(api, shifted_brain_case.image, brain_model, mode="adapt").json()["id"]
            wait_for_status(api, first, ("running", "finished"), timeout=60)
            private.stop()  # the job ends while Redis is away
            time.sleep(3)
            assert worker.process.poll() is None, "the worker died with Redis"
            private.start()
            worker.wait_registered()
            second = upload(api, shifted_brain_case.image, brain_model)
            assert second.status_code == 202, second.text
            done = wait_for_status(api, second.json()["id"], ("finished", "failed"), timeout=60)
            assert done["status"] == "finished", done
    finally:
        worker.stop()
        private.stop()


def test_sigterm_while_redis_is_away_exits_0(service_home: Path, tmp_path: Path) -> None:
    """operations.md: SIGTERM stops a worker with exit 0, also while Redis is away: one that
    never reached Redis waits between attempts (it used to die of the signal there), one that
    lost it retries inside RQ's loop."""
    held = socket.socket()  # bound, never listening: connections to it are refused, and no
    held.bind(("127.0.0.1", 0))  # other server (the Redis below) can be given its port
    nowhere = held.getsockname()[1]
    never = WorkerProcess(
        service_env(service_home, f"redis://127.0.0.1:{nowhere}/0", "never"),
        tmp_path / "never.log",
    ).start(wait=False)
    private = RedisProcess(tmp_path)
    private.start()
    lost = WorkerProcess(service_env(service_home, private.url, "away"), tmp_path / "lost.log")
    lost.start()
    try:
        private.stop()
        waits = {"lost.log": "could not connect to Redis", "never.log": "starting a new one in"}
        for name, waiting in waits.items():
            log = tmp_path / name
            wait_for(partial(_says, log, waiting), 60, f"{name} to say {waiting!r}")
        never.stop()  # each asserts exit 0
        lost.stop()
        for name in waits:
            assert "Traceback" not in (tmp_path / name).read_text()
    finally:
        for worker in (never, lost):
            if worker.process is not None and worker.process.poll() is None:
                worker.kill()
        private.stop()
        held.close()


def _says(log: Path, text: str) -> bool:
    return text in log.read_text()


def test_a_worker_registers_again_with_a_redis_that_restarted_empty(
    service_home: Path, tmp_path: Path
) -> None:
    """Redis keeps nothing on disk: after a restart the idle worker's registration is gone.
    RQ reconnects by itself but registers only at start; the worker must register again."""
    private = RedisProcess(tmp_path)
    private.start()
    worker = WorkerProcess(service_env(service_home, private.url, "restart"), tmp_path / "w.log")
    try:
        worker.start()
        private.stop()
        time.sleep(2)  # the worker's blocking dequeue fails; RQ retries with back-off
        private.start()
        worker.wait_registered(timeout=30)
        assert worker.process is not None and worker.process.poll() is None
        assert "registering again" in worker.log.read_text()
    finally:
        worker.stop()
        private.stop()


def test_a_worker_registers_again_when_redis_restarted_during_its_job(
    service_home: Path, brain_model: str, tmp_path: Path
) -> None:
    """Here the job outlives the restart: RQ's bookkeeping at its end (and the heartbeat
    thread during it) write fields of the worker's hash into the new Redis, so the hash
    exists again while the worker is in none of RQ's worker sets."""
    scan = tmp_path / "slow.nii.gz"  # a job of seconds on the tiny model
    data = np.random.default_rng(0).random((128, 128, 96)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), scan)
    private = RedisProcess(tmp_path)
    private.start()
    env = service_env(service_home, private.url, "restart-mid-job")
    worker = WorkerProcess(env, tmp_path / "w.log")
    settings = service_settings(service_home, redis_url=private.url, queue_name="restart-mid-job")
    try:
        worker.start()
        with client(settings) as api:
            job = upload(api, scan, brain_model, mode="adapt").json()["id"]
            wait_for_status(api, job, ("running",), timeout=60)
            private.stop()
            private.start()
            # the job itself may end either way: the API fails a job that vanished from Redis
            # (operations.md), and the worker then drops its result as canceled
            ended = re.compile(rf"job {job}: (finished|canceled) after")
            assert not ended.search(worker.log.read_text()), "premise: the job outlived it"
            worker.wait_registered(timeout=60)
        assert ended.search(worker.log.read_text())
        assert "registering again" in worker.log.read_text()
        connection = redis.Redis.from_url(private.url)
        key = next(iter(connection.smembers(f"rq:workers:{env['SITEFIT_QUEUE_NAME']}")))
        # what `rq info` shows; written just after the registration, in its own command
        wait_for(lambda: connection.hget(key, "state") == b"idle", 10, "the state", interval=0.1)
    finally:
        worker.stop()
        private.stop()
