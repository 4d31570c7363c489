"""The delivery store: states, backoff, claims shared by several stores and processes,
resend, recovery of a dead sender's claim, retention (sitefit/deliveries.py)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sitefit.deliveries import (
    MAX_BACKOFF_S,
    Claim,
    DeliveryNotFoundError,
    DeliveryStateError,
    DeliveryStore,
    backoff_s,
    delivery_id,
)
from sitefit.durable import write_atomic
from sitefit.jobs import JobNotFoundError, new_job_id
from sitefit.settings import Settings
from tests.server.processes import REPO, wait_for

NOW = 1_000_000.0


def store_at(root: Path, **kw: float) -> DeliveryStore:
    values = dict(attempts=3, backoff_s=10.0, claim_timeout_s=60.0, retention_s=3600.0)
    values.update(kw)
    return DeliveryStore(root / "deliveries", **values)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> DeliveryStore:
    return store_at(tmp_path)


def claimed(store: DeliveryStore, delivery: str) -> Claim:
    claim = store.claim(delivery)
    assert claim is not None
    return claim


def files_of(store: DeliveryStore, delivery: str) -> list[str]:
    """Every file that holds the delivery, relative to the store (exactly one, always)."""
    return sorted(
        str(path.relative_to(store.root))
        for path in store.root.rglob(f"{delivery}*.json")
        if not path.name.startswith(".")
    )


def test_add_is_pending_and_idempotent(store: DeliveryStore) -> None:
    job = new_job_id()
    first = store.add(job, "pacs", now=NOW)
    assert (first.status, first.attempts, first.next_try_at) == ("pending", 0, NOW)
    assert first.id == delivery_id(job, "pacs") and len(first.id) == 24
    assert store.add(job, "pacs", now=NOW + 5) == first  # the same delivery, unchanged
    assert store.add(job, "web", now=NOW).id != first.id
    assert files_of(store, first.id) == [f"pending/{first.id}.json"]
    mode = stat.S_IMODE(os.stat(store.root / "pending" / f"{first.id}.json").st_mode)
    assert mode == 0o640
    with pytest.raises(JobNotFoundError):
        store.add("../../etc", "pacs")


def test_from_settings(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path, delivery_attempts=4, delivery_backoff_s=2, delivery_timeout_s=300
    )
    store = DeliveryStore.from_settings(settings)
    assert store.root == tmp_path / "deliveries"
    assert (store.attempts, store.backoff_s) == (4, 2)
    assert store.claim_timeout_s >= 5 * 300  # a claim outlives any send


def test_backoff_doubles_up_to_thirty_minutes() -> None:
    assert [backoff_s(n, 10) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert backoff_s(20, 10) == MAX_BACKOFF_S == 1800


def test_failed_tries_back_off_then_fail(store: DeliveryStore) -> None:
    delivery = store.add(new_job_id(), "pacs", now=NOW)
    now = NOW
    for attempt, wait in ((1, 10.0), (2, 20.0)):
        assert [d.id for d in store.due(now)] == [delivery.id]
        record = store.failed_try(claimed(store, delivery.id), "cannot connect\nsecond line", now)
        assert (record.status, record.attempts, record.last_error) == (
            "pending",
            attempt,
            "cannot connect",
        )
        assert record.next_try_at == now + wait
        assert store.due(now + wait - 0.5) == []
        now += wait
    record = store.failed_try(claimed(store, delivery.id), "refused", now)
    assert (record.status, record.attempts) == ("failed", 3)
    assert store.get(delivery.id) == record
    assert store.due(now + 1e9) == []
    assert [d.id for d in store.records("failed")] == [delivery.id]
    assert store.count("failed") == 1
    assert files_of(store, delivery.id) == [f"failed/{delivery.id}.json"]


def test_outcomes_and_listing(store: DeliveryStore) -> None:
    a = store.add(new_job_id(), "pacs", now=NOW)
    b = store.add(new_job_id(), "pacs", now=NOW + 1)
    c = store.add(new_job_id(), "web", now=NOW + 2)
    store.delivered(claimed(store, a.id), now=NOW + 3)
    store.drop(claimed(store, b.id), "the job failed: no result to send", now=NOW + 3)
    store.fail(claimed(store, c.id), "destination 'web' is not configured", now=NOW + 3)
    assert [d.id for d in store.records()] == [c.id, b.id, a.id]  # newest first
    assert store.get(a.id).delivered_at == NOW + 3
    dropped = store.records("dropped")
    assert [d.id for d in dropped] == [b.id] and dropped[0].last_error is not None
    assert store.get(c.id).status == "failed" and store.get(c.id).attempts == 0
    assert store.records("pending") == [] and store.due(NOW + 100) == []


def test_only_a_failed_delivery_is_resent(store: DeliveryStore) -> None:
    delivery = store.add(new_job_id(), "pacs", now=NOW)
    with pytest.raises(DeliveryStateError, match="is pending"):
        store.resend(delivery.id)
    for _ in range(3):
        store.failed_try(claimed(store, delivery.id), "refused", NOW)
    resent = store.resend(delivery.id, now=NOW + 50)
    assert (resent.status, resent.attempts, resent.next_try_at) == ("pending", 0, NOW + 50)
    assert [d.id for d in store.due(NOW + 50)] == [delivery.id]
    with pytest.raises(DeliveryStateError):
        store.resend(delivery.id)  # a second operator: already pending again
    with pytest.raises(DeliveryNotFoundError):
        store.resend("0" * 24)
    with pytest.raises(DeliveryNotFoundError):
        store.resend("../pending/x")
    store.delivered(claimed(store, delivery.id))
    with pytest.raises(DeliveryStateError, match="is delivered"):
        store.resend(delivery.id)


def test_two_stores_never_claim_the_same_delivery(tmp_path: Path) -> None:
    first, second = store_at(tmp_path), store_at(tmp_path)
    ids = [first.add(new_job_id(), "pacs", now=NOW).id for _ in range(40)]
    won: dict[str, list[str]] = {"first": [], "second": []}
    start = threading.Barrier(2)

    def sender(name: str, store: DeliveryStore) -> None:
        start.wait()
        for delivery in ids:
            claim = store.claim(delivery)
            if claim is not None:
                won[name].append(delivery)
                store.delivered(claim)

    threads = [
        threading.Thread(target=sender, args=item)
        for item in (("first", first), ("second", second))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(won["first"] + won["second"]) == sorted(ids)  # each claimed exactly once
    assert {d.status for d in second.records()} == {"delivered"} and len(first.records()) == 40


def test_a_claimed_delivery_is_listed_pending_and_not_due(tmp_path: Path) -> None:
    first, second = store_at(tmp_path), store_at(tmp_path)
    delivery = first.add(new_job_id(), "pacs", now=NOW)
    claim = claimed(first, delivery.id)
    assert second.claim(delivery.id) is None
    assert second.due(NOW + 1) == []
    assert second.get(delivery.id).status == "pending"
    assert [d.status for d in second.records()] == ["pending"]
    assert second.recover() == 0  # a fresh claim is left alone
    assert first.release(claim)
    assert [d.id for d in second.due(NOW + 1)] == [delivery.id]


def test_a_dead_senders_claim_is_taken_back(tmp_path: Path) -> None:
    """A sender is killed (SIGKILL) holding a claim: the delivery stays claimed, nothing is
    lost, and once the claim is older than the timeout another store takes it back."""
    store = store_at(tmp_path)
    delivery = store.add(new_job_id(), "pacs", now=NOW)
    store.failed_try(claimed(store, delivery.id), "refused", NOW)  # attempts 1
    script = (
        "import sys, time; from pathlib import Path; from sitefit.deliveries import DeliveryStore\n"
        "store = DeliveryStore(Path(sys.argv[1]))\n"
        "assert store.claim(sys.argv[2]) is not None\n"
        "print('claimed', flush=True); time.sleep(60)\n"
    )
    sender = subprocess.Popen(
        [sys.executable, "-c", script, str(store.root), delivery.id],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sender.stdout is not None and sender.stdout.readline() == "claimed\n"
    finally:
        sender.send_signal(signal.SIGKILL)
        sender.wait(timeout=10)
    (held,) = files_of(store, delivery.id)
    assert held.startswith("claimed/")
    assert store.due(NOW + 1e6) == [] and store.get(delivery.id).status == "pending"
    assert store.recover() == 0  # not stale yet
    other = store_at(tmp_path)
    assert other.recover(now=NOW + 1e12) == 1
    assert files_of(store, delivery.id) == [f"pending/{delivery.id}.json"]
    back = other.get(delivery.id)
    assert (back.status, back.attempts) == ("pending", 1)  # as it was before the claim
    assert other.delivered(claimed(other, delivery.id)).status == "delivered"


def test_a_sender_that_stalled_past_the_timeout_does_not_duplicate(tmp_path: Path) -> None:
    slow = store_at(tmp_path, claim_timeout_s=0.05)
    delivery = slow.add(new_job_id(), "pacs", now=NOW)
    claim = claimed(slow, delivery.id)
    wait_for(lambda: slow.recover() == 1, 10, "the stale claim to be taken back")
    other = store_at(tmp_path, claim_timeout_s=0.05)
    other.delivered(claimed(other, delivery.id))
    assert not slow.settle(claim, claim.delivery.model_copy(update={"status": "failed"}))
    assert files_of(slow, delivery.id) == [f"delivered/{delivery.id}.json"]


def test_recovery_files_a_claim_under_the_state_it_holds(tmp_path: Path) -> None:
    """A sender that died after writing the outcome into its claim, before moving it."""
    store = store_at(tmp_path)
    delivery = store.add(new_job_id(), "pacs", now=NOW)
    claim = claimed(store, delivery.id)
    outcome = claim.delivery.model_copy(update={"status": "delivered", "delivered_at": NOW})
    write_atomic(claim.path, outcome.model_dump_json().encode())
    assert store.get(delivery.id).status == "delivered"
    assert store.recover(now=NOW + 1e12) == 1
    assert files_of(store, delivery.id) == [f"delivered/{delivery.id}.json"]


def test_a_corrupt_record_is_skipped_by_listings(store: DeliveryStore) -> None:
    good = store.add(new_job_id(), "pacs", now=NOW)
    (store.root / "pending" / ("f" * 24 + ".json")).write_text("{not json")
    assert [d.id for d in store.due(NOW)] == [good.id]
    assert [d.id for d in store.records()] == [good.id]


def test_sweep_deletes_settled_records_after_the_retention(store: DeliveryStore) -> None:
    old, recent, waiting = (store.add(new_job_id(), "pacs", now=NOW) for _ in range(3))
    store.delivered(claimed(store, old.id), now=NOW)
    store.drop(claimed(store, recent.id), "the job failed", now=NOW + 3000)
    assert store.sweep(now=NOW + 3601) == 1
    assert {d.id for d in store.records()} == {recent.id, waiting.id}
    with pytest.raises(DeliveryNotFoundError):
        store.get(old.id)
    assert store.sweep(now=NOW + 1e9) == 1  # the pending one stays, however old
    assert [d.id for d in store.records()] == [waiting.id]
