"""``/ui``: the small web page (static HTML, CSS and JavaScript from ``server/ui/``).

The files need no key: they hold no data. The page asks for the key once, keeps it in the
browser's ``sessionStorage`` and sends it on every ``/v1`` call, so the API's own checks
decide what the page shows. Only the files named in :data:`FILES` are served (no path from
the request reaches the file system), with a Content-Security-Policy that allows nothing
but this server: no inline script, no outside host, images only from here or ``blob:``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # a new version of the server serves new files at once: revalidate, do not guess
    "Cache-Control": "no-cache",
}

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("")
async def ui_root() -> RedirectResponse:
    """To ``/ui/``, so that the page's relative URLs resolve (relative: works under a prefix)."""
    return RedirectResponse("ui/", status_code=307)


@router.get("/")
async def ui_index() -> FileResponse:
    return _file("index.html")


@router.get("/{name}")
async def ui_file(name: str) -> FileResponse:
    if name not in FILES:
        raise HTTPException(404, "no such file of the web page")
    return _file(name)


def _file(name: str) -> FileResponse:
    return FileResponse(UI_DIR / name, media_type=FILES[name], headers=HEADERS)


__all__ = ["FILES", "UI_DIR", "router"]
