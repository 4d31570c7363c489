"""``GET /v1/jobs``: the jobs a key may see, newest first, paged, filtered."""

from __future__ import annotations

import time
from pathlib import Path

from sitefit.job_store import JobStore
from tests.server.helpers import client, service_settings
from tests.stored_jobs import publish_job

KEY_A = "key-for-site-a-0123456789"
KEY_ALL = "key-for-every-site-012345"


def test_listing_is_newest_first_paged_filtered_and_limited_to_the_keys_sites(
    tmp_path: Path,
) -> None:
    settings = service_settings(tmp_path, api_keys={KEY_A: ["site-a"], KEY_ALL: ["*"]})
    jobs = JobStore.from_settings(settings)
    now = time.time()
    a_old = publish_job(jobs, site="site-a", model="brain", created_at=now - 300)
    a_new = publish_job(jobs, site="site-a", model="heart", created_at=now - 100)
    b_mid = publish_job(jobs, site="site-b", model="brain", created_at=now - 200)
    jobs.end(a_old, "failed", "the series is incomplete")
    api = client(settings)  # no lifespan: listing needs neither queue nor loops

    def ids(key: str, query: str = "") -> list[str]:
        response = api.get(f"/v1/jobs{query}", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text
        return [job["id"] for job in response.json()["jobs"]]

    assert ids(KEY_ALL) == [a_new, b_mid, a_old]
    assert ids(KEY_A) == [a_new, a_old]  # nothing of site-b
    assert ids(KEY_A, "?site=site-b") == []
    assert ids(KEY_ALL, "?status=failed") == [a_old]
    assert ids(KEY_ALL, "?model=brain") == [b_mid, a_old]
    assert ids(KEY_ALL, "?limit=1&offset=1") == [b_mid]
    page = api.get("/v1/jobs?limit=1", headers={"Authorization": f"Bearer {KEY_ALL}"}).json()
    assert page["total"] == 3 and page["limit"] == 1
    failed = api.get("/v1/jobs?status=failed", headers={"Authorization": f"Bearer {KEY_A}"})
    assert failed.json()["jobs"][0]["error"] == "the series is incomplete"
    refused = api.get("/v1/jobs?status=lost", headers={"Authorization": f"Bearer {KEY_ALL}"})
    assert refused.status_code == 422
