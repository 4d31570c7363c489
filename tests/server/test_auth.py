"""API keys scoped to sites: 401 without a key, 403 across sites, 200 within."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from model_store.base_models import BaseModelRegistry
from model_store.sites import SiteStore
from sitefit.settings import Settings
from tests.conftest import PhantomCase
from tests.server.helpers import client, make_home, service_settings, upload, wait_for_status

KEY_A = "key-for-site-a-0123456789"
KEY_B = "key-for-site-b-0123456789"
KEY_ALL = "key-for-every-site-012345"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, settings: Settings, brain_model: str
) -> Iterator[TestClient]:
    home = make_home(tmp_path_factory.mktemp("auth"), settings.models_dir)
    spec = BaseModelRegistry(home / "models").spec(brain_model)
    sites = SiteStore(home / "sites")
    for site in ("site-a", "site-b"):
        sites.append(
            site,
            spec,
            {"init.weight": np.zeros(3, np.float32)},
            scans_refined=1,
            self_consistency_before=0.8,
            self_consistency_after=0.9,
            refinement_epochs=2,
        )
    keys = {KEY_A: ["site-a"], KEY_B: ["site-b"], KEY_ALL: ["*"]}
    with client(service_settings(home, api_keys=keys)) as test_client:
        yield test_client


def test_no_key_or_unknown_key_is_401(api: TestClient) -> None:
    for headers in ({}, bearer("not-a-configured-key-at-all"), {"Authorization": "Basic x"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/sites"), ("POST", "/v1/jobs")):
            response = api.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    assert api.get("/healthz").status_code == 200  # probes and scrapes need no key
    assert api.get("/metrics").status_code == 200


def test_jobs_are_visible_to_their_site_only(
    api: TestClient, shifted_brain_case: PhantomCase, brain_model: str
) -> None:
    created = upload(api, shifted_brain_case.image, brain_model, headers=bearer(KEY_A))
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    wait_for_status(api, job_id, ("finished",), headers=bearer(KEY_A))
    for suffix in ("", "/mask", "/report"):
        assert api.get(f"/v1/jobs/{job_id}{suffix}", headers=bearer(KEY_A)).status_code == 200
        assert api.get(f"/v1/jobs/{job_id}{suffix}", headers=bearer(KEY_ALL)).status_code == 200
        denied = api.get(f"/v1/jobs/{job_id}{suffix}", headers=bearer(KEY_B))
        assert denied.status_code == 403 and "site-a" in denied.json()["detail"]
        assert api.get(f"/v1/jobs/{job_id}{suffix}").status_code == 401
    assert api.delete(f"/v1/jobs/{job_id}", headers=bearer(KEY_B)).status_code == 403
    assert api.get(f"/v1/jobs/{job_id}", headers=bearer(KEY_A)).status_code == 200
    assert api.delete(f"/v1/jobs/{job_id}", headers=bearer(KEY_A)).status_code == 200


def test_a_site_key_cannot_upload_for_another_site_or_none(
    api: TestClient, shifted_brain_case: PhantomCase, brain_model: str
) -> None:
    other = upload(api, shifted_brain_case.image, brain_model, site="site-b", headers=bearer(KEY_A))
    assert other.status_code == 403
    no_site = upload(api, shifted_brain_case.image, brain_model, site=None, headers=bearer(KEY_A))
    assert no_site.status_code == 403 and "named sites" in no_site.json()["detail"]


def test_site_weights_are_scoped(api: TestClient) -> None:
    listed = api.get("/v1/sites", headers=bearer(KEY_A)).json()["sites"]
    assert [entry["site"] for entry in listed] == ["site-a"]
    every = api.get("/v1/sites", headers=bearer(KEY_ALL)).json()["sites"]
    assert {entry["site"] for entry in every} >= {"site-a", "site-b"}
    own = api.get("/v1/sites/site-a", headers=bearer(KEY_A))
    assert own.status_code == 200
    (version,) = next(iter(own.json()["models"].values()))
    assert version["site"] == "site-a" and version["version"] == 1
    assert api.get("/v1/sites/site-b", headers=bearer(KEY_A)).status_code == 403
    assert api.delete("/v1/sites/site-b", headers=bearer(KEY_A)).status_code == 403
    assert api.get("/v1/sites/site-b", headers=bearer(KEY_B)).status_code == 200
    assert api.get("/v1/sites/nowhere", headers=bearer(KEY_ALL)).status_code == 404
    assert api.get("/v1/sites/..%2Fetc", headers=bearer(KEY_ALL)).status_code in (404, 422)
    assert api.delete("/v1/sites/site-b", headers=bearer(KEY_B)).json() == {
        "site": "site-b",
        "deleted": True,
    }
    assert api.get("/v1/sites/site-b", headers=bearer(KEY_B)).status_code == 404


def test_settings_refuse_an_open_network_binding_without_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        Settings(home=tmp_path, host="0.0.0.0", api_keys={})
    with pytest.raises(ValueError, match="at least 16"):
        Settings(home=tmp_path, host="0.0.0.0", api_keys={"short": ["*"]})
    with pytest.raises(ValueError, match="valid site names"):
        Settings(home=tmp_path, api_keys={KEY_A: ["../etc"]})
    assert Settings(home=tmp_path, host="0.0.0.0", api_keys={KEY_A: ["*"]}).host == "0.0.0.0"
    assert Settings(home=tmp_path, host="::1", api_keys={}).host == "::1"


def test_logs_name_callers_by_a_key_digest_never_the_key_or_the_file(
    api: TestClient,
    shifted_brain_case: PhantomCase,
    brain_model: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):
        created = upload(api, shifted_brain_case.image, brain_model, name="DOE^JOHN.nii.gz",
                         headers=bearer(KEY_A))  # fmt: skip
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        wait_for_status(api, job_id, ("finished",), headers=bearer(KEY_A))
        assert api.delete(f"/v1/jobs/{job_id}", headers=bearer(KEY_A)).status_code == 200
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert job_id in logged  # the log is there to be read
    assert "key-" + hashlib.sha256(KEY_A.encode()).hexdigest()[:8] in logged
    assert KEY_A not in logged and "DOE" not in logged and "JOHN" not in logged
