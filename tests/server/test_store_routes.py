"""``/v1/models`` and ``/v1/sites/{site}`` on a store with a damaged file: the good entries
are still served, the bad ones named, never a 500 for the whole listing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from model_store.base_models import BaseModelRegistry
from model_store.sites import SiteStore
from sitefit.settings import Settings
from tests.server.helpers import client, service_settings

STATS = {
    "scans_refined": 1,
    "self_consistency_before": 0.8,
    "self_consistency_after": 0.9,
    "refinement_epochs": 2,
}


def test_a_damaged_spec_or_meta_file_hides_nothing_else(
    tmp_path: Path, settings: Settings, brain_model: str
) -> None:
    session = BaseModelRegistry(settings.models_dir)
    spec = session.spec(brain_model)
    registry = BaseModelRegistry(tmp_path / "home" / "models")
    for name in ("good", "bad"):
        registry.register_payload(spec.model_copy(update={"name": name}), session.payload(spec))
    (tmp_path / "home" / "models" / "bad" / "1" / "spec.json").write_text("{")
    sites = SiteStore(tmp_path / "home" / "sites")
    good = registry.spec("good")
    for value in (1.0, 2.0, 3.0):
        sites.append("s", good, {"init.weight": np.full(3, value, np.float32)}, **STATS)
    (tmp_path / "home" / "sites" / "s" / "good" / "1" / "meta.json").write_text("{")
    api: TestClient
    with client(service_settings(tmp_path / "home")) as api:
        models = api.get("/v1/models")
        assert models.status_code == 200, models.text
        assert [m["name"] for m in models.json()["models"]] == ["good"]
        (bad,) = models.json()["unreadable"]
        assert (bad["name"], bad["version"]) == ("bad", 1) and "unreadable spec" in bad["reason"]
        detail = api.get("/v1/sites/s")
        assert detail.status_code == 200, detail.text
        assert [v["version"] for v in detail.json()["models"]["good"]] == [2, 3]
        (unreadable,) = detail.json()["unreadable"]["good"]
        assert unreadable["version"] == 1 and "meta.json" in unreadable["reason"]
