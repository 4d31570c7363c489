"""The web page at ``/ui`` and the docs pages, in a real headless chromium cut off from
everything but the server (conftest.py).

Set ``UI_SCREENSHOT=out.png`` (not SITEFIT_*: the suite clears those) to keep a screenshot of
the finished job page, to look at the page after a change. docs/ui-job.png, the README's
picture, was taken the same way of a larger phantom model (64 mm field of view, 8 channels):
the tests' tiny model draws a noisy mask.
"""

from __future__ import annotations

import gzip
import os
import secrets
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import nibabel as nib
import pytest

from sitefit.phantoms.dicom_series import SeriesIds, dataset_bytes, series_datasets
from tests.conftest import PhantomCase
from tests.ui.conftest import KEY_A, KEY_B, PACS_ROUTE, SITE_A, SITE_B, Browser, UiServer

selenium = pytest.importorskip("selenium")
from selenium.common.exceptions import (  # noqa: E402  # after the skip without selenium
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ENDED = ("finished", "failed", "canceled")
# the preview's size once the browser decoded it from the blob the page fetched with the key
DECODED = """
const img = document.getElementById("job-preview-image");
return img.complete && img.naturalWidth > 0 && img.src.startsWith("blob:")
    && [img.naturalWidth, img.naturalHeight];
"""


def wait(browser: Browser, condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll ``condition`` until it is truthy; the page re-renders, so a vanished element is
    just not there yet."""
    return WebDriverWait(
        browser.driver,
        timeout,
        poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    ).until(lambda _driver: condition(), message=f"timed out waiting for {what}")


def text(browser: Browser, css: str) -> str:
    return str(browser.driver.find_element(By.CSS_SELECTOR, css).text)


def click(browser: Browser, css: str) -> None:
    """Click the element once it is there, again if the page replaced it meanwhile."""
    wait(browser, lambda: browser.driver.find_element(By.CSS_SELECTOR, css).click() or True, css)


def outside(browser: Browser, server: UiServer) -> list[str]:
    """Requests the browser made anywhere but the server since the last call."""
    ours = (f"{server.url}/", "blob:", "data:")
    return [url for url in browser.requests() if not url.startswith(ours)]


def script_errors(browser: Browser) -> list[str]:
    """Uncaught JavaScript errors since the last call (failed requests are logged too, as
    network errors: those are the page's expected 401s and 4xx answers)."""
    entries = browser.driver.get_log("browser")
    return [entry["message"] for entry in entries if entry.get("source") == "javascript"]


def open_ui(browser: Browser, server: UiServer, key: str, model: str) -> None:
    """Load the page, enter ``key`` once, and wait for the model list (the key works)."""
    driver = browser.driver
    driver.get(f"{server.url}/ui")
    assert driver.current_url == f"{server.url}/ui/"
    enter_key(browser, key)
    wait(browser, lambda: model in model_options(browser), "the model list")
    # from here on each test reads its own requests and errors
    browser.requests()
    script_errors(browser)


def enter_key(browser: Browser, key: str) -> None:
    field = browser.driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    browser.driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    wait(browser, lambda: text(browser, "#key-state") == "key in use (this tab only)", "the key")
    assert field.get_attribute("value") == "", "the key does not stay visible in the field"
    stored = browser.driver.execute_script("return sessionStorage.getItem('sitefit.api-key')")
    assert stored == key
    assert browser.driver.execute_script("return localStorage.length") == 0  # the tab only


def model_options(browser: Browser) -> list[str]:
    select = Select(browser.driver.find_element(By.ID, "upload-model"))
    return [str(option.get_attribute("value")) for option in select.options]


def submit_upload(browser: Browser, path: Path, model: str, site: str, mode: str) -> None:
    driver = browser.driver
    driver.find_element(By.ID, "upload-file").send_keys(str(path.resolve()))
    Select(driver.find_element(By.ID, "upload-model")).select_by_value(model)
    site_field = driver.find_element(By.ID, "upload-site")
    site_field.clear()
    site_field.send_keys(site)
    Select(driver.find_element(By.ID, "upload-mode")).select_by_value(mode)
    driver.find_element(By.ID, "upload-submit").click()


def job_rows(browser: Browser) -> dict[str, str]:
    """The job list as the page shows it: job id -> site."""
    rows = browser.driver.find_elements(By.CSS_SELECTOR, "#jobs-body tr")
    return {
        str(row.get_attribute("data-job-id")): row.find_elements(By.TAG_NAME, "td")[3].text
        for row in rows
    }


def api_upload(server: UiServer, key: str, site: str, scan: Path, model: str) -> str:
    with server.api(key) as api:
        response = api.post(
            "/v1/jobs",
            files={"file": (scan.name, scan.read_bytes(), "application/gzip")},
            data={"model": model, "site": site, "mode": "none"},
        )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def figure_rows(browser: Browser) -> dict[str, list[str]]:
    """The key figures table: row name -> [surface Dice, Dice] as shown."""
    rows = browser.driver.find_elements(By.CSS_SELECTOR, ".figures tbody tr")
    return {
        row.find_element(By.TAG_NAME, "th").text: [
            cell.text for cell in row.find_elements(By.TAG_NAME, "td")
        ]
        for row in rows
    }


def shown(overlap: dict[str, float | None]) -> list[str]:
    values = (overlap["surface_dice"], overlap["dice"])
    return [f"{value:.3f}" if value is not None else "–" for value in values]


def stow_body(instances: list[bytes]) -> tuple[bytes, str]:
    """A STOW-RS request body (multipart/related of DICOM instances) and its Content-Type."""
    boundary = secrets.token_hex(12)
    parts = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
        for data in instances
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return parts + f"--{boundary}--\r\n".encode(), content_type


def wait_for_job(api: httpx2.Client, filters: dict[str, str], timeout: float = 60) -> Any:
    """The newest job matching ``filters`` once there is one (the PACS dispatcher makes it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = api.get("/v1/jobs", params=filters).json()["jobs"]
        if jobs:
            return jobs[0]
        time.sleep(0.2)
    raise AssertionError(f"no job {filters} after {timeout} s")


def png_size(content: bytes) -> tuple[int, int]:
    assert content[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", content[16:24])
    return width, height


def test_upload_follow_and_download_a_job_in_the_page(
    ui_server: UiServer, browser: Browser, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    open_ui(browser, ui_server, KEY_A, brain_model)
    submit_upload(browser, shifted_brain_case.image, brain_model, SITE_A, "adapt")

    wait(browser, lambda: len(text(browser, "#job-id")) == 32, "the new job to be shown")
    job_id = text(browser, "#job-id")
    wait(browser, lambda: job_id in job_rows(browser), "the job in the list")
    wait(browser, lambda: text(browser, "#job-status") in ENDED, "the job to end", timeout=150)
    assert text(browser, "#job-status") == "finished", text(browser, "#job-error")

    with ui_server.api(KEY_A) as api:
        report = api.get(f"/v1/jobs/{job_id}/report").json()
        mask = api.get(f"/v1/jobs/{job_id}/mask").content
        preview = api.get(f"/v1/jobs/{job_id}/preview.png").content
    assert report["site"] == SITE_A and report["mode_used"] == "adapt"

    # the verdict: the QC's when the report has one, and the guard's, each with its reason
    wait(browser, lambda: browser.driver.find_elements(By.CSS_SELECTOR, ".verdict"), "a verdict")
    if report.get("qc"):
        assert text(browser, ".verdict-qc .badge") == report["qc"]["verdict"]
        assert text(browser, ".verdict-qc .verdict-reason") == report["qc"]["reason"]
    assert text(browser, ".verdict-guard .badge") == report["guard"]["verdict"]
    assert text(browser, ".verdict-guard .verdict-reason") == report["guard"]["reason"]
    # the key figures and the Dice trace, as the report has them
    figures = figure_rows(browser)
    assert figures["Agreement base vs adapted"] == shown(report["agreement_base_vs_adapted"])
    assert figures["Self-consistency before"] == shown(report["self_consistency"]["before"])
    assert figures["Self-consistency after"] == shown(report["self_consistency"]["after"])
    trace = [li.text for li in browser.driver.find_elements(By.CSS_SELECTOR, ".trace-values li")]
    assert trace == [f"{value:.3f}" for value in report["refinement"]["dice_trace"]]

    # the preview: fetched with the key, decoded by the browser at the PNG's own size
    decoded = wait(browser, lambda: browser.driver.execute_script(DECODED), "the preview")
    assert tuple(decoded) == png_size(preview)
    assert browser.driver.find_element(By.ID, "job-preview-image").is_displayed()

    if os.environ.get("UI_SCREENSHOT"):
        browser.driver.execute_script("window.scrollTo(0, 0)")
        browser.driver.save_screenshot(os.environ["UI_SCREENSHOT"])

    # download the mask: the link fetches it with the key, then saves it as a blob
    link = browser.driver.find_element(By.CSS_SELECTOR, "a.download[data-path$='/mask']")
    link.click()
    saved = browser.downloads / f"{job_id}_mask.nii.gz"
    wait(browser, lambda: saved.exists() and saved.read_bytes() == mask, "the mask download")
    assert str(link.get_attribute("href")).startswith("blob:")
    image = nib.Nifti1Image.from_bytes(gzip.decompress(saved.read_bytes()))
    assert image.shape == nib.load(shifted_brain_case.image).shape
    links = [a.text for a in browser.driver.find_elements(By.CSS_SELECTOR, "a.download")]
    assert links == ["Mask (.nii.gz)", "Base model mask (.nii.gz)", "Report (.json)"]  # no SEG

    # the site's new version is listed with its history
    click(browser, "#sites-refresh")
    click(browser, f"#sites-body button[data-site='{SITE_A}']")  # the list may re-render
    wait(browser, lambda: job_id[:8] in text(browser, "#site-detail"), "the site's history")
    assert f"Site {SITE_A}" in text(browser, "#site-detail")

    assert outside(browser, ui_server) == []
    assert script_errors(browser) == []


def test_a_key_sees_only_the_jobs_of_its_sites(
    ui_server: UiServer, browser: Browser, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    job_a = api_upload(ui_server, KEY_A, SITE_A, shifted_brain_case.image, brain_model)
    job_b = api_upload(ui_server, KEY_B, SITE_B, shifted_brain_case.image, brain_model)
    open_ui(browser, ui_server, KEY_A, brain_model)
    wait(browser, lambda: job_a in job_rows(browser), "site A's job")
    rows = job_rows(browser)
    assert job_b not in rows and set(rows.values()) == {SITE_A}

    enter_key(browser, KEY_B)  # the other site's key, in the same tab
    wait(browser, lambda: job_b in job_rows(browser), "site B's job")
    rows = job_rows(browser)
    assert job_a not in rows and set(rows.values()) == {SITE_B}
    # site A's weights (saved by an adapt job) leave the site list when key B is in use
    wait(browser, lambda: SITE_A not in text(browser, "#sites"), "site A to leave the list")
    assert outside(browser, ui_server) == []
    assert script_errors(browser) == []


def test_a_failed_job_shows_why(
    ui_server: UiServer, browser: Browser, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    """A series a PACS sent that is no usable volume (two orientations) becomes a failed job
    of the route's site: the page shows the job's error, and no preview or downloads."""
    datasets = series_datasets(nib.load(shifted_brain_case.image), ids=SeriesIds())
    datasets[len(datasets) // 2].ImageOrientationPatient = [1, 0, 0, 0, 0, 1]
    body, content_type = stow_body([dataset_bytes(ds) for ds in datasets])
    with ui_server.api(KEY_A) as api:
        stored = api.post(
            f"/dicomweb/routes/{PACS_ROUTE}/studies",
            content=body,
            headers={"Content-Type": content_type},
        )
        assert stored.status_code == 200, stored.text
        job = wait_for_job(api, {"status": "failed"})
    assert job["origin"] == "pacs" and job["error"]

    open_ui(browser, ui_server, KEY_A, brain_model)
    click(browser, f"#jobs-body tr[data-job-id='{job['id']}'] button")
    wait(browser, lambda: text(browser, "#job-status") == "failed", "the failed job")
    wait(browser, lambda: text(browser, "#job-error") == f"Failed: {job['error']}", "the error")
    assert f"DICOM series from the PACS (route {PACS_ROUTE})" in text(browser, "#job-facts")
    assert not browser.driver.find_element(By.ID, "job-preview").is_displayed()
    assert browser.driver.find_elements(By.CSS_SELECTOR, "a.download") == []
    assert script_errors(browser) == []


def test_without_keys_the_page_needs_none(
    open_server: UiServer, browser: Browser, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    scan = shifted_brain_case.image
    with httpx2.Client(base_url=open_server.url, timeout=30) as api:
        created = api.post(
            "/v1/jobs",
            files={"file": (scan.name, scan.read_bytes(), "application/gzip")},
            data={"model": brain_model, "mode": "none"},
        )
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    browser.driver.get(f"{open_server.url}/ui/")  # another origin: an empty sessionStorage
    wait(browser, lambda: job_id in job_rows(browser), "the job, listed without a key")
    assert brain_model in model_options(browser)
    assert text(browser, "#key-state") == "no key"
    assert not browser.driver.find_element(By.ID, "notice").is_displayed()
    assert job_rows(browser)[job_id] == "–"  # a job without a site
    assert script_errors(browser) == []


@pytest.mark.parametrize(
    ("name", "content", "status"),
    [
        ("notes.txt", b"not a scan\n", 415),  # not NIfTI or a zip
        ("scan.nii.gz", b"\x1f\x8b\x08\x00" + b"damaged" * 20, 422),  # a corrupt gzip
    ],
)
def test_a_bad_upload_shows_the_servers_message(
    ui_server: UiServer,
    browser: Browser,
    brain_model: str,
    tmp_path: Path,
    name: str,
    content: bytes,
    status: int,
) -> None:
    scan = tmp_path / name
    scan.write_bytes(content)
    with ui_server.api(KEY_A) as api:
        before = api.get("/v1/jobs").json()["total"]
        answer = api.post(
            "/v1/jobs",
            files={"file": (name, content, "application/octet-stream")},
            data={"model": brain_model, "site": SITE_A},
        )
        assert answer.status_code == status
        detail = answer.json()["detail"]
        open_ui(browser, ui_server, KEY_A, brain_model)
        submit_upload(browser, scan, brain_model, SITE_A, "auto")
        error = browser.driver.find_element(By.ID, "upload-error")
        wait(browser, error.is_displayed, "the upload's error")
        assert error.text == f"Upload refused (HTTP {status}): {detail}"
        assert api.get("/v1/jobs").json()["total"] == before
    assert script_errors(browser) == []


@pytest.mark.parametrize(
    ("page", "title"),
    [("/docs", ".swagger-ui .info .title"), ("/redoc", ".api-info h1")],
)
def test_the_docs_render_with_the_network_cut_off(
    ui_server: UiServer, browser: Browser, page: str, title: str
) -> None:
    driver = browser.driver
    browser.requests()
    driver.get(f"{ui_server.url}{page}")
    heading = wait(browser, lambda: driver.find_element(By.CSS_SELECTOR, title), "the title")
    wait(browser, lambda: "sitefit" in heading.text, "the API's title")
    assert outside(browser, ui_server) == []


def test_the_browser_reaches_nothing_but_the_server(
    ui_server: UiServer, browser: Browser, outside_url: str
) -> None:
    """The cut the other tests run behind holds: a server this machine reaches on another
    address, and the server itself by a host name, are unreachable from the browser."""
    assert httpx2.get(outside_url, timeout=10).text == "outside"
    driver = browser.driver
    driver.get(f"{ui_server.url}/docs")
    fetch = (
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {mode: 'no-cors'}).then(() => done('reached'), () => done('failed'));"
    )
    by_name = ui_server.url.replace("127.0.0.1", "localhost") + "/healthz"
    assert httpx2.get(by_name, timeout=10).status_code == 200
    for url in (outside_url, by_name, "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/"):
        assert driver.execute_async_script(fetch, url) == "failed", url
    assert driver.execute_async_script(fetch, f"{ui_server.url}/healthz") == "reached"


def test_the_page_is_static_and_needs_no_key(ui_server: UiServer) -> None:
    """Files need no key; only the page's own files are served, with a strict CSP."""

    def get(path: str) -> httpx2.Response:
        return httpx2.get(f"{ui_server.url}{path}", timeout=10)

    redirect = get("/ui")
    assert redirect.status_code == 307 and redirect.headers["location"] == "ui/"
    files = [("/ui/", "text/html"), ("/ui/app.js", "javascript"), ("/ui/style.css", "text/css")]
    for path, kind in files:
        response = get(path)
        assert response.status_code == 200 and kind in response.headers["content-type"]
        assert "connect-src 'self'" in response.headers["content-security-policy"]
        # nothing from outside: the only URL is the SVG namespace, a name, never fetched
        body = response.text.replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in body and "https://" not in body, path
    # server strings reach the page as text only: no HTML sinks in the script
    script = get("/ui/app.js").text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    for path in ("/ui/missing.js", "/ui/..%2Fapp.py", "/ui/%2E%2E/routes/ui.py"):
        assert get(path).status_code == 404, path
    assert not any(path.startswith("/ui") for path in get("/openapi.json").json()["paths"])
