"""``/docs`` and ``/redoc`` load every script, style and icon from this server (no CDN), and
each of those assets is served whole."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.offline_docs import ASSETS_URL
from tests.server.helpers import client, service_settings

# what each kind of asset weighs at least: the real bundles, not an error page or a stub
MIN_BYTES = {".js": 100_000, ".css": 10_000, ".png": 1_000}
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


class _References(HTMLParser):
    """The URLs a page makes the browser load: script sources, stylesheets and icons."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script" and values.get("src"):
            self.urls.append(str(values["src"]))
        if tag == "link" and values.get("href"):
            self.urls.append(str(values["href"]))


@pytest.fixture
def api(tmp_path: Path) -> TestClient:
    """Keys configured: the docs need none, like FastAPI's own pages."""
    return client(service_settings(tmp_path, api_keys={"key-0123456789abcdef": ["site-a"]}))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_only_the_servers_own_assets(api: TestClient, page: str) -> None:
    response = api.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "http://" not in html and "https://" not in html, "an absolute URL: a CDN or fonts"
    parser = _References()
    parser.feed(html)
    scripts = [url for url in parser.urls if url.endswith(".js")]
    assert scripts, "the page's script is referenced"
    for url in parser.urls:
        assert url.startswith(f"{ASSETS_URL}/"), url
        asset = api.get(url)
        suffix = Path(url).suffix
        assert asset.status_code == 200, url
        assert CONTENT_TYPES[suffix] in asset.headers["content-type"], url
        assert len(asset.content) >= MIN_BYTES[suffix], url
    assert "'/openapi.json'" in html or '"/openapi.json"' in html
    assert api.get("/openapi.json").status_code == 200


def test_the_swagger_bundle_is_the_real_swagger_ui(api: TestClient) -> None:
    bundle = api.get(f"{ASSETS_URL}/swagger-ui-bundle.js").text
    assert "SwaggerUIBundle" in bundle and '"5.' in bundle  # swagger-ui 5, as FastAPI's page
    assert ".swagger-ui" in api.get(f"{ASSETS_URL}/swagger-ui.css").text
    assert "Redoc" in api.get(f"{ASSETS_URL}/redoc.standalone.js").text


def test_the_oauth2_redirect_page_is_served_and_unknown_assets_are_404(api: TestClient) -> None:
    assert "oauth2" in api.get("/docs/oauth2-redirect").text.lower()
    assert api.get(f"{ASSETS_URL}/missing.js").status_code == 404
    assert api.get(f"{ASSETS_URL}/../pyproject.toml").status_code == 404
    # the docs routes stay out of the API's own document
    paths = api.get("/openapi.json").json()["paths"]
    assert not any(path.startswith(("/docs", "/redoc", ASSETS_URL)) for path in paths)
