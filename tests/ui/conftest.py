"""Fixtures of the web page's tests: a real `sitefit serve` and a real headless chromium.

The browser is Debian's chromium driven through its chromedriver by Selenium (the Makefile
installs both; the tests skip without them). It reaches nothing but the server: every host
name but 127.0.0.1 fails to resolve and every other connection goes to a closed proxy port,
so a page that needs anything from outside (a CDN, a web font) breaks here as it would on a
hospital network without internet. The server runs in embedded mode with two keys, each
limited to one site, and the session's tiny brain model. One server and one browser serve
the whole module: starting chromium costs a second, `sitefit serve` a few.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
import pytest

from sitefit.settings import Settings
from tests.pacs.services import ServeProcess, pacs_env
from tests.server.helpers import make_home

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SITE_A, SITE_B = "ward-a", "ward-b"
KEY_A, KEY_B = "ui-key-ward-a-5f1c0e7d", "ui-key-ward-b-93ab44d2"
PACS_ROUTE = "ward-a-mr"  # a DICOMweb route whose series become jobs of site A
# the network cut: names resolve only for the server's address, anything else is proxied
# to the discard port, where nothing listens
NETWORK_CUT = [
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",
    "--proxy-bypass-list=127.0.0.1",
]


@dataclass(frozen=True)
class UiServer:
    url: str
    home: Path
    log: Path

    def api(self, key: str) -> httpx2.Client:
        return httpx2.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )


@dataclass(frozen=True)
class Browser:
    driver: Any  # selenium.webdriver.Chrome (imported lazily: skipped without selenium)
    downloads: Path

    def requests(self) -> list[str]:
        """URLs the browser requested since the last call (the DevTools performance log),
        less those the page's Content-Security-Policy blocked: they never left the browser."""
        urls: dict[str, str] = {}
        blocked: set[str] = set()
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            params = message.get("params", {})
            if message.get("method") == "Network.requestWillBeSent":
                urls[params["requestId"]] = params["request"]["url"]
            elif (
                message.get("method") == "Network.loadingFailed"
                and params.get("blockedReason") == "csp"
            ):
                blocked.add(params["requestId"])
        return [url for request, url in urls.items() if request not in blocked]


@pytest.fixture(scope="module")
def ui_server(
    tmp_path_factory: pytest.TempPathFactory, settings: Settings, brain_model: str
) -> Iterator[UiServer]:
    root = tmp_path_factory.mktemp("ui-server")
    home = make_home(root, settings.models_dir)
    env = pacs_env(
        home,
        api_keys={KEY_A: [SITE_A], KEY_B: [SITE_B]},
        dicom_routes={PACS_ROUTE: {"model": brain_model, "mode": "none", "site": SITE_A}},
        series_idle_s=0.5,
    )
    yield from _serve(env, root / "serve.log", home)


@pytest.fixture
def open_server(tmp_path: Path, settings: Settings, brain_model: str) -> Iterator[UiServer]:
    """A server with no API keys (loopback only): the page works without a key."""
    home = make_home(tmp_path, settings.models_dir)
    yield from _serve(pacs_env(home), tmp_path / "serve.log", home)


def _serve(env: dict[str, str], log: Path, home: Path) -> Iterator[UiServer]:
    serve = ServeProcess(env, log)
    serve.start()
    try:
        yield UiServer(serve.wait_ready().url, home, log)
    finally:
        serve.stop()


class _Outside(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        self.wfile.write(b"outside")

    def log_message(self, *_args: Any) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def outside_url() -> Iterator[str]:
    """A web server standing for "the internet": on another loopback address (127.0.0.2),
    reachable from this machine, so the network cut is shown to hold without internet."""
    try:
        server = ThreadingHTTPServer(("127.0.0.2", 0), _Outside)
    except OSError as error:
        pytest.skip(f"cannot listen on 127.0.0.2: {error.strerror}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.2:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    for program in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is missing (make test installs chromium, chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in [
        "--headless=new",
        "--no-sandbox",  # root in CI containers
        "--disable-dev-shm-usage",  # small /dev/shm in containers
        "--disable-gpu",
        "--window-size=1400,1250",
        "--lang=en-GB",
        *NETWORK_CUT,
    ]:
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield Browser(driver, downloads)
    finally:
        driver.quit()
