"""The API's own metrics: bounded labels whatever the requests."""

from __future__ import annotations

from pathlib import Path

from tests.server.helpers import client, service_settings


def test_made_up_methods_share_one_label(tmp_path: Path) -> None:
    api = client(service_settings(tmp_path))  # no lifespan: nothing here reaches the queue
    for method in ("FOO1", "FOO2", "BAR99"):
        assert api.request(method, "/healthz").status_code == 405
    assert api.request("GET", "/healthz").status_code == 200
    metrics = api.get("/metrics").text
    other = 'sitefit_http_requests_total{method="other",route="/healthz",status="405"} 3.0'
    assert other in metrics
    assert 'method="GET",route="/healthz",status="200"' in metrics
    assert "FOO" not in metrics and "BAR99" not in metrics
