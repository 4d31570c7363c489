"""``/docs`` (Swagger UI) and ``/redoc`` served with their scripts and styles from this server.

FastAPI's own pages load swagger-ui and redoc from a CDN, so on a hospital network without
internet they stay blank. The assets come from the ``fastapi-offline`` package (MIT), which
ships the builds of swagger-ui (Apache-2.0) and redoc (MIT) that FastAPI's pages load; they
are served under :data:`ASSETS_URL`, and the pages are FastAPI's own HTML pointed at them,
Google Fonts left out.
Like the default pages they need no key: they show the OpenAPI document, no data.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL, REDOC_URL = "/docs", "/redoc"
ASSETS_URL = "/docs-assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
SWAGGER_JS, SWAGGER_CSS = "swagger-ui-bundle.js", "swagger-ui.css"
REDOC_JS, FAVICON = "redoc.standalone.js", "favicon.png"


def install_offline_docs(app: FastAPI) -> None:
    """Serve the docs pages on ``app``, built with ``docs_url=None`` and ``redoc_url=None``."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("build the app with docs_url=None and redoc_url=None")
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url

    def asset(request: Request, name: str) -> str:
        # behind a proxy that serves the API under a prefix, root_path holds it
        return f"{request.scope.get('root_path', '')}{ASSETS_URL}/{name}"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=f"{request.scope.get('root_path', '')}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=redirect_url,
            swagger_js_url=asset(request, SWAGGER_JS),
            swagger_css_url=asset(request, SWAGGER_CSS),
            swagger_favicon_url=asset(request, FAVICON),
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    if redirect_url:

        @app.get(redirect_url, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=f"{request.scope.get('root_path', '')}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=asset(request, REDOC_JS),
            redoc_favicon_url=asset(request, FAVICON),
            with_google_fonts=False,
        )
        # redoc's bundle hard-codes its footer logo on a CDN: images from this server only,
        # so the page makes no request to outside (the footer just shows no logo)
        page.headers["Content-Security-Policy"] = "img-src 'self' data:"
        return page


__all__ = ["ASSETS_URL", "DOCS_URL", "REDOC_URL", "install_offline_docs"]
