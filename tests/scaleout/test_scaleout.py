"""Scale-out across hosts: Redis and the API on one network namespace, a worker on each of two
others, one shared SITEFIT_HOME (the cluster of ``conftest.py``).

Shown over the real network path (workers reach Redis through veth pairs and a bridge): jobs
spread over both hosts; a worker killed mid-job has its job finished on the other host, each
job finished once; two hosts adapting one site at once leave versions 1..n, each readable;
warm routing sends a site's jobs to the worker holding its weights, and past a busy or dead
one within the wait; and nothing of a network is left behind, even after a failure.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from model_store import ModelStore
from model_store.sites import SiteVersion, UnreadableVersion
from sitefit.settings import Settings
from tests.scaleout import netns
from tests.scaleout.conftest import WARM_WAIT_S, Cluster, Node
from tests.server.processes import wait_for


def _seed_site(cluster: Cluster, site: str) -> SiteVersion:
    """Version 1 of ``site``: the base model with one tensor changed a little."""
    store = ModelStore.from_settings(Settings(home=cluster.home, device="cpu"))
    spec = store.models.spec(cluster.model)
    tensors = store.models.tensors(spec)
    name = next(n for n in sorted(tensors) if n.endswith("weight") and tensors[n].ndim == 1)
    return store.sites.save(
        site, spec, {name: tensors[name] * np.float32(1.01)},
        expected_version=None, scans_refined=1, self_consistency_before=None,
        self_consistency_after=None, refinement_epochs=0,
    )  # fmt: skip


def _other(cluster: Cluster, node: Node) -> Node:
    return next(other for other in cluster.workers if other is not node)


def _runner(cluster: Cluster, job_id: str) -> Node:
    ran = [node for node in cluster.workers if node.finished(job_id)]
    assert len(ran) == 1, f"job {job_id} finished by {[n.label for n in ran]}"
    return ran[0]


def _started_on(cluster: Cluster, job_id: str, timeout: float = 60) -> Node:
    wait_for(lambda: any(node.started(job_id) for node in cluster.workers), timeout,
             f"a worker to start job {job_id}", interval=0.05)  # fmt: skip
    return next(node for node in cluster.workers if node.started(job_id))


def _warm_on(cluster: Cluster, site: str, timeout: float = 30) -> Node:
    """The worker that ran ``site``'s first job, once its warm record says so."""
    wait_for(lambda: any(cluster.warm_on(n, site) for n in cluster.workers), timeout,
             f"a worker warm for {site}", interval=0.05)  # fmt: skip
    return next(n for n in cluster.workers if cluster.warm_on(n, site))


def test_the_workers_run_on_separate_hosts_and_share_the_jobs(live: Cluster) -> None:
    addresses = set()
    for key in live.redis.smembers("rq:workers:scaleout"):
        address = live.redis.hget(key, "ip_address")
        assert isinstance(address, bytes)
        addresses.add(address.decode().rsplit(":", 1)[0])
    assert addresses == {node.host.address for node in live.workers}  # over the bridge

    jobs = [live.submit(live.scan, live.model, site=None, mode="adapt")
            for _ in range(6)]  # fmt: skip
    for job_id in jobs:
        assert live.wait_ended(job_id)["status"] == "finished"
    runners = [_runner(live, job_id).label for job_id in jobs]
    assert set(runners) == {"w1", "w2"}, runners


def test_a_worker_killed_mid_job_has_its_job_finished_on_the_other_host(
    live: Cluster, slow_scan: Path
) -> None:
    """The job was routed to the victim's own queue (it held the site warm): the dead
    worker's retry covers those queues too."""
    site = "scaleout-kill"
    _seed_site(live, site)
    first = live.submit(live.scan, live.model, site=site, mode="cached")
    assert live.wait_ended(first)["status"] == "finished"
    victim = _warm_on(live, site)
    live.wait_idle()
    slow = live.submit(slow_scan, live.model, site=site, mode="adapt")
    assert _started_on(live, slow) is victim
    assert f":w:{victim.worker_id()}: sitefit job {slow}" in victim.text()  # its own queue
    wait_for(lambda: live.job(slow)["status"] == "running", 30, "the job to run", interval=0.05)
    others = [live.submit(live.scan, live.model, site=None, mode="none") for _ in range(2)]
    victim.kill()

    job = live.wait_ended(slow, timeout=180)
    assert job["status"] == "finished", job
    survivor = _other(live, victim)
    assert _runner(live, slow) is survivor
    assert victim.finished(slow) == 0 and survivor.started(slow) == 1
    assert job["progress"]["attempt"] == 2  # one retry: run twice, finished once
    for job_id in others:  # queued meanwhile: none lost
        assert live.wait_ended(job_id)["status"] == "finished"
        _runner(live, job_id)


def test_two_hosts_adapting_one_site_at_once_leave_its_versions_consistent(live: Cluster) -> None:
    site = "scaleout-concurrent"
    jobs: list[str] = []
    for _ in range(2):  # each round: both hosts refine the site from the same version
        pair = [live.submit(live.scan, live.model, site=site, mode="adapt")
                for _ in range(2)]  # fmt: skip
        jobs += pair
        ended = [live.wait_ended(job_id) for job_id in pair]
        assert [job["status"] for job in ended] == ["finished", "finished"], ended
        if len(jobs) == 2:  # both idle, both shared-queue jobs: one each, at once
            assert {_runner(live, job_id).label for job_id in pair} == {"w1", "w2"}

    store = ModelStore.from_settings(Settings(home=live.home, device="cpu"))
    spec = store.models.spec(live.model)
    unreadable: list[UnreadableVersion] = []
    history = store.sites.history(site, live.model, unreadable=unreadable)
    versions = [meta.version for meta in history]
    assert versions and versions == list(range(1, len(versions) + 1)) and not unreadable
    for meta in history:
        assert store.sites.load(site, meta, spec)  # every version's delta reads and checks
    saved = {}
    for job_id in jobs:
        weights = live.job(job_id)["report"]["site_weights"]
        if weights["saved_version"] is not None:
            saved[weights["saved_version"]] = job_id
        else:
            assert weights["save_reason"].startswith("not saved"), weights
    # exactly the versions the jobs say they saved, each once, each naming its job
    assert sorted(saved) == versions
    assert {meta.version: meta.job_id for meta in history} == saved


def test_a_sites_next_job_goes_to_the_worker_holding_it_warm(live: Cluster) -> None:
    site = "scaleout-warm"
    _seed_site(live, site)
    first = live.submit(live.scan, live.model, site=site, mode="cached")
    assert live.wait_ended(first)["status"] == "finished"
    warm = _warm_on(live, site)
    live.wait_idle()
    assert _runner(live, first) is warm
    hits = warm.cache_hits()
    for _ in range(3):  # both workers idle each time: 1 in 8 to land there by chance
        live.wait_idle()
        job_id = live.submit(live.scan, live.model, site=site, mode="cached")
        job = live.wait_ended(job_id)
        assert job["status"] == "finished" and job["report"]["mode_used"] == "cached", job
        assert _runner(live, job_id) is warm
    assert warm.cache_hits() >= hits + 3


def test_a_job_for_a_busy_warm_worker_runs_elsewhere_after_the_wait(
    live: Cluster, slow_scan: Path
) -> None:
    site = "scaleout-busy"
    _seed_site(live, site)
    first = live.submit(live.scan, live.model, site=site, mode="cached")
    assert live.wait_ended(first)["status"] == "finished"
    warm = _warm_on(live, site)
    live.wait_idle()
    slow = live.submit(slow_scan, live.model, site=site, mode="adapt")  # routed there too
    assert _started_on(live, slow) is warm

    submitted = time.monotonic()
    job_id = live.submit(live.scan, live.model, site=site, mode="cached")
    wait_for(lambda: _other(live, warm).started(job_id) > 0, 30, "the other worker to start it",
             interval=0.05)  # fmt: skip
    waited = time.monotonic() - submitted
    assert live.job(slow)["status"] == "running"  # it did not wait for the busy worker
    assert waited < WARM_WAIT_S + 5, waited
    assert live.wait_ended(job_id)["status"] == "finished"
    assert _runner(live, job_id) is _other(live, warm)
    # the other worker was idle: the job went to it at once, not after the wait
    assert f"job {job_id}: warm worker" not in live.api_log.read_text()
    assert live.wait_ended(slow, timeout=180)["status"] == "finished"


def test_a_job_routed_to_a_warm_worker_that_just_died_runs_elsewhere_after_the_wait(
    live: Cluster,
) -> None:
    site = "scaleout-died"
    _seed_site(live, site)
    first = live.submit(live.scan, live.model, site=site, mode="cached")
    assert live.wait_ended(first)["status"] == "finished"
    warm = _warm_on(live, site)
    live.wait_idle()
    dead = warm.worker_id()
    warm.kill()  # idle: its record says so for up to three more heartbeats (6 s here)

    submitted = time.monotonic()
    job_id = live.submit(live.scan, live.model, site=site, mode="cached")
    assert live.wait_ended(job_id, timeout=60)["status"] == "finished"
    assert _runner(live, job_id) is _other(live, warm)
    moved = f"job {job_id}: warm worker {dead} did not start it within {WARM_WAIT_S:g} s"
    assert moved in live.api_log.read_text()  # routed to the dead worker, then moved
    assert time.monotonic() - submitted < 30


def test_nothing_of_a_network_is_left_after_a_failure(tmp_path: Path) -> None:
    reason = netns.problem()
    if reason is not None:
        pytest.skip(f"needs network namespaces: {reason}")
    started: list[subprocess.Popen[bytes]] = []
    names: set[str] = set()
    network = netns.Network()
    with pytest.raises(RuntimeError, match="a test failed here"), network:
        for label in ("a", "b"):
            host = network.add_host(label)
            names.add(host.name)
            argv = [sys.executable, "-c", "import time; time.sleep(600)"]
            started.append(host.start(argv, {}, tmp_path / f"{label}.log"))
        assert names <= netns.namespaces() and network.bridge in netns.links()
        raise RuntimeError("a test failed here")
    assert all(process.poll() is not None for process in started)
    assert not names & netns.namespaces()
    assert not {network.bridge, *(f"sfv{network.tag}{i:02x}" for i in (2, 3))} & netns.links()
