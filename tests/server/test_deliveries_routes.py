"""``/v1/deliveries``: listing by status, key isolation by the job's site, resend."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sitefit.deliveries import DeliveryStore
from sitefit.job_store import JobStore
from tests.server.helpers import client, service_settings
from tests.stored_jobs import publish_job

KEY_A = "key-for-site-a-0123456789"
KEY_B = "key-for-site-b-0123456789"
KEY_ALL = "key-for-every-site-012345"
NOW = 1_700_000_000.0


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Deliveries:
    api: TestClient
    store: DeliveryStore
    a_failed: str  # site-a's job, failed
    a_delivered: str
    b_failed: str  # site-b's job, failed
    gone_failed: str  # a job deleted since: its site is unknown


def fail(store: DeliveryStore, delivery: str) -> None:
    claim = store.claim(delivery)
    assert claim is not None
    store.fail(claim, "cannot connect to 127.0.0.1:11112", now=NOW + 10)


@pytest.fixture
def deliveries(tmp_path: Path) -> Deliveries:
    keys = {KEY_A: ["site-a"], KEY_B: ["site-b"], KEY_ALL: ["*"]}
    settings = service_settings(tmp_path, api_keys=keys)
    jobs = JobStore.from_settings(settings)
    store = DeliveryStore.from_settings(settings)
    job_a, job_b, job_gone = (publish_job(jobs, site=s) for s in ("site-a", "site-b", "site-a"))
    a_failed = store.add(job_a, "pacs", now=NOW).id
    a_delivered = store.add(job_a, "web", now=NOW + 1).id
    b_failed = store.add(job_b, "pacs", now=NOW + 2).id
    gone_failed = store.add(job_gone, "pacs", now=NOW + 3).id
    for delivery in (a_failed, b_failed, gone_failed):
        fail(store, delivery)
    claim = store.claim(a_delivered)
    assert claim is not None
    store.delivered(claim, now=NOW + 10)
    jobs.delete(job_gone)
    # no lifespan: these routes need neither the queue nor the maintenance loop
    return Deliveries(client(settings), store, a_failed, a_delivered, b_failed, gone_failed)


def listed(d: Deliveries, key: str, status: str | None = None) -> list[str]:
    params = {"status": status} if status else {}
    response = d.api.get("/v1/deliveries", params=params, headers=bearer(key))
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["deliveries"]]


def test_listing_by_status_newest_first(deliveries: Deliveries) -> None:
    d = deliveries
    assert listed(d, KEY_ALL) == [d.gone_failed, d.b_failed, d.a_delivered, d.a_failed]
    assert listed(d, KEY_ALL, "failed") == [d.gone_failed, d.b_failed, d.a_failed]
    assert listed(d, KEY_ALL, "delivered") == [d.a_delivered]
    assert listed(d, KEY_ALL, "pending") == listed(d, KEY_ALL, "dropped") == []
    body = d.api.get("/v1/deliveries?status=failed", headers=bearer(KEY_A)).json()
    (item,) = body["deliveries"]
    assert item["status"] == "failed" and item["destination"] == "pacs"
    assert item["attempts"] == 0 and item["next_try_at"] is None
    assert item["last_error"] == "cannot connect to 127.0.0.1:11112"
    response = d.api.get("/v1/deliveries?status=lost", headers=bearer(KEY_ALL))
    assert response.status_code == 422 and "'status'" in response.json()["detail"]


def test_a_key_sees_only_its_sites_deliveries(deliveries: Deliveries) -> None:
    d = deliveries
    assert listed(d, KEY_A) == [d.a_delivered, d.a_failed]
    assert listed(d, KEY_B) == [d.b_failed]
    assert d.gone_failed in listed(d, KEY_ALL)  # a job gone: only keys for every site
    assert d.api.get("/v1/deliveries").status_code == 401


def test_resend(deliveries: Deliveries) -> None:
    d = deliveries
    url = f"/v1/deliveries/{d.a_failed}/resend"
    assert d.api.post(url, headers=bearer(KEY_B)).status_code == 404  # not B's: unknown to B
    assert d.store.get(d.a_failed).status == "failed"
    response = d.api.post(url, headers=bearer(KEY_A))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["attempts"]) == ("pending", 0)
    assert body["next_try_at"] is not None
    assert d.store.get(d.a_failed).status == "pending"
    again = d.api.post(url, headers=bearer(KEY_A))
    assert again.status_code == 409 and "only a failed delivery" in again.json()["detail"]
    delivered = d.api.post(f"/v1/deliveries/{d.a_delivered}/resend", headers=bearer(KEY_A))
    assert delivered.status_code == 409
    for unknown in ("0" * 24, "not-an-id", d.a_failed + "0"):
        response = d.api.post(f"/v1/deliveries/{unknown}/resend", headers=bearer(KEY_ALL))
        assert response.status_code == 404, unknown
    gone = f"/v1/deliveries/{d.gone_failed}/resend"
    assert d.api.post(gone, headers=bearer(KEY_A)).status_code == 404
    assert d.api.post(gone, headers=bearer(KEY_ALL)).status_code == 200
    assert d.api.post(f"/v1/deliveries/{d.a_failed}/resend").status_code == 401


def test_the_routes_are_documented(deliveries: Deliveries) -> None:
    paths = deliveries.api.get("/openapi.json").json()["paths"]
    assert "get" in paths["/v1/deliveries"]
    assert set(paths["/v1/deliveries/{delivery_id}/resend"]["post"]["responses"]) >= {
        "200",
        "404",
        "409",
    }
