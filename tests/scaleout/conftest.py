"""A sitefit cluster across network namespaces: Redis and the API on one host, workers on others.

The cluster (:class:`Cluster`, one per module) is what a multi-host deployment is, on one
machine: the host ``api`` runs ``redis-server`` and ``sitefit serve`` (API keys set, bound to
its test-subnet address), each host ``wN`` runs one ``sitefit worker`` that reaches Redis
over the bridge, and every process shares one ``SITEFIT_HOME`` (a temporary folder: the
"NFS"). The test drives the public API over HTTP from the root namespace. Without root or
``ip netns`` the tests are skipped with the reason.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import nibabel as nib
import numpy as np
import pytest
import redis

from sitefit.settings import Settings
from tests.conftest import PhantomCase
from tests.scaleout import netns
from tests.server.helpers import make_home
from tests.server.processes import service_env, wait_for

QUEUE = "scaleout"
API_KEY = "scaleout-test-key-0123456789"
REDIS_PORT = 6379  # each host is its own namespace: fixed ports cannot collide
API_PORT = 8000
METRICS_PORT = 9100
WARM_WAIT_S = 1.0


def cluster_env(home: Path, redis_url: str, **extra: str) -> dict[str, str]:
    """A process's environment: the shared home and queue, one torch thread, fast beats."""
    return service_env(
        home, redis_url, QUEUE,
        OMP_NUM_THREADS="1",
        SITEFIT_JOB_RETRIES="1",
        SITEFIT_WORKER_HEARTBEAT_S="2",  # a dead worker: its jobs run again after 6 s
        SITEFIT_MAINTENANCE_INTERVAL_S="0.2",
        SITEFIT_WARM_ROUTING="true",
        SITEFIT_WARM_ROUTING_WAIT_S=str(WARM_WAIT_S),
        **extra,
    )  # fmt: skip


@dataclass
class Node:
    """One `sitefit worker` in its own namespace."""

    label: str
    host: netns.Host
    env: dict[str, str]
    log: Path
    process: Any = None

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host.address}:{METRICS_PORT}/metrics"

    def start(self) -> None:
        argv = [sys.executable, "-m", "sitefit", "worker", "--metrics-port", str(METRICS_PORT)]
        self.process = self.host.start(argv, self.env, self.log)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def registered(self, client: redis.Redis) -> bool:
        """Registered with Redis, with its warm record published (it takes jobs)."""
        if not self.alive():
            raise AssertionError(f"worker {self.label} exited:\n{self.text()[-3000:]}")
        for key in client.smembers(f"rq:workers:{QUEUE}"):
            if client.hget(key, "pid") == str(self.process.pid).encode():
                return self.worker_id() is not None
        return False

    def kill(self) -> None:
        """SIGKILL: no goodbye to Redis, its job left half done."""
        self.process.kill()
        self.process.wait(30)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def worker_id(self) -> str | None:
        """The id of its own queue (warm routing), from its log (the last start's)."""
        lines = [line for line in self.text().splitlines() if "this worker's own queue is" in line]
        return lines[-1].rsplit(":w:", 1)[1].strip() if lines else None

    def started(self, job_id: str) -> int:
        return self.text().count(f"job {job_id}: start ")

    def finished(self, job_id: str) -> int:
        return self.text().count(f"job {job_id}: finished after")

    def cache_hits(self) -> float:
        for line in httpx2.get(self.metrics_url, timeout=10).text.splitlines():
            if line.startswith("sitefit_model_cache_hits_total "):
                return float(line.split()[1])
        raise AssertionError("the worker exports no cache hits")


@dataclass
class Cluster:
    network: netns.Network
    home: Path
    redis_url: str
    api_url: str
    redis: redis.Redis
    http: httpx2.Client
    api_log: Path
    model: str  # the tiny test model, in the shared home
    scan: Path  # a small phantom of a shifted domain
    workers: list[Node] = field(default_factory=list)

    def submit(self, scan: Path, model: str, *, site: str | None, mode: str) -> str:
        data = {"model": model, "mode": mode} | ({"site": site} if site else {})
        files = {"file": ("scan.nii.gz", scan.read_bytes(), "application/gzip")}
        response = self.http.post("/v1/jobs", files=files, data=data)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_ended(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        wait_for(lambda: self.job(job_id)["status"] in ("finished", "failed", "canceled"),
                 timeout, f"job {job_id} to end", interval=0.1)  # fmt: skip
        return self.job(job_id)

    def ran_by(self, job_id: str) -> list[str]:
        """The workers whose logs say they finished ``job_id`` (one, for a finished job)."""
        return [node.label for node in self.workers if node.finished(job_id)]

    def ensure_workers(self, timeout: float = 120) -> None:
        """Start any worker that is not running; return when all take jobs."""
        for node in self.workers:
            if not node.alive():
                node.start()
        for node in self.workers:
            wait_for(lambda n=node: n.registered(self.redis), timeout,
                     f"worker {node.label} to register", interval=0.1)  # fmt: skip

    def wait_idle(self, timeout: float = 60) -> None:
        """Until every running worker's warm record says it is idle: a job's end is visible
        to clients a moment before its worker has said so (and routing reads the record)."""

        def idle(node: Node) -> bool:
            worker_id = node.worker_id()
            key = f"sitefit:{QUEUE}:warm:{worker_id}"
            return self.redis.hget(key, "@busy") == b"" and not self.redis.llen(
                f"rq:queue:{QUEUE}:w:{worker_id}"
            )

        wait_for(lambda: all(idle(n) for n in self.workers if n.alive()), timeout,
                 "every worker to be idle", interval=0.05)  # fmt: skip

    def warm_on(self, node: Node, site: str) -> bool:
        """Whether ``node``'s warm record says it holds ``site``'s weights."""
        worker_id = node.worker_id()
        key = f"sitefit:{QUEUE}:warm:{worker_id}"
        return worker_id is not None and self.redis.hget(key, f"{self.model}/{site}") is not None


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, settings: Settings
) -> Iterator[Cluster]:
    reason = netns.problem()
    if reason is not None:
        pytest.skip(f"scale-out test needs network namespaces: {reason}")
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        pytest.skip("redis-server is not installed (the Makefile installs it)")
    # asked for here, not as arguments: a skip above must not first train a model
    model: str = request.getfixturevalue("brain_model")
    case: PhantomCase = request.getfixturevalue("shifted_brain_case")
    root = tmp_path_factory.mktemp("scaleout")
    home = make_home(root, settings.models_dir)
    with netns.Network() as network:
        api_host = network.add_host("api")
        redis_url = f"redis://{api_host.address}:{REDIS_PORT}/0"
        api_host.start(
            # protected mode refuses every address but loopback without a password: this
            # one is on the private test subnet only
            [redis_binary, "--port", str(REDIS_PORT), "--bind", api_host.address,
             "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", str(root)],
            cluster_env(home, redis_url), root / "redis.log",
        )  # fmt: skip
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
        wait_for(lambda: _answers(client), 30, "redis-server to answer", interval=0.1)
        api_env = cluster_env(
            home, redis_url,
            SITEFIT_API_KEYS=f'{{"{API_KEY}": ["*"]}}',
            SITEFIT_HOST=api_host.address,
            SITEFIT_PORT=str(API_PORT),
        )  # fmt: skip
        api_host.start([sys.executable, "-m", "sitefit", "serve"], api_env, root / "api.log")
        workers = []
        for index in (1, 2):
            host = network.add_host(f"w{index}")
            node = Node(f"w{index}", host, cluster_env(home, redis_url), root / f"w{index}.log")
            node.start()
            workers.append(node)
        api_url = f"http://{api_host.address}:{API_PORT}"
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx2.Client(base_url=api_url, headers=headers, timeout=60) as http:
            cluster = Cluster(network, home, redis_url, api_url, client, http, root / "api.log",
                              model, case.image, workers)  # fmt: skip
            wait_for(lambda: _ready(http), 120, "the API to be ready", interval=0.2)
            cluster.ensure_workers()
            yield cluster
        client.close()


@pytest.fixture
def live(cluster: Cluster) -> Cluster:
    """The cluster with every worker running (a test may have killed one)."""
    cluster.ensure_workers()
    return cluster


@pytest.fixture(scope="module")
def slow_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scan whose adapt job runs for seconds on a tiny model: long enough to kill mid-job."""
    data = np.random.default_rng(0).random((96, 96, 96)).astype(np.float32)
    path = tmp_path_factory.mktemp("slow") / "slow.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _ready(http: httpx2.Client) -> bool:
    try:
        return http.get("/readyz").status_code == 200
    except httpx2.HTTPError:
        return False
