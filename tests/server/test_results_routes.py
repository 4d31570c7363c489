"""A finished job's preview (``/preview.png``) and its base model's mask (``/mask?variant=
base``): served for the job's site only, on the input's grid; a clean 404 where there is no
preview (a failed job), 409 while the job runs, 422 for an unknown variant."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sitefit.job_store import BASE_MASK, MASK, PREVIEW, JobStore
from sitefit.report import Mode
from sitefit.settings import Settings
from tests.conftest import PhantomCase
from tests.server.helpers import client, image_from_bytes, make_home, service_settings
from tests.stored_jobs import publish_job
from worker.engine import Engine
from worker.job import run_job
from worker.preview import MAX_BYTES

KEY_A = "key-for-site-a-0123456789"
KEY_B = "key-for-site-b-0123456789"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}


@dataclass(frozen=True)
class Jobs:
    adapted: str  # finished, mode adapt: its base model's mask kept
    base: str  # finished, mode none: the mask is the base model's
    failed: str
    queued: str
    no_preview: str  # finished, its preview gone (as when it could not be rendered)
    no_base: str  # finished, mode adapt, its base model's mask gone (stored before it was kept)


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory,
    settings: Settings,
    brain_model: str,
    shifted_brain_case: PhantomCase,
) -> Iterator[tuple[TestClient, Jobs, JobStore]]:
    root = tmp_path_factory.mktemp("results-routes")
    service = service_settings(make_home(root, settings.models_dir),
                               api_keys={KEY_A: ["site-a"], KEY_B: ["site-b"]})  # fmt: skip
    store = JobStore.from_settings(service)
    store.root.mkdir(parents=True, exist_ok=True)
    engine = Engine(service)
    scan = shifted_brain_case.image.read_bytes()
    modes: dict[str, Mode] = {"adapted": "adapt", "base": "none", "no_preview": "none",
                              "no_base": "adapt"}  # fmt: skip
    ids = {name: publish_job(store, scan=scan, model=brain_model, mode=mode)
           for name, mode in modes.items()}  # fmt: skip
    for job_id in ids.values():
        assert run_job(job_id, store, engine) == "finished"
    store.path(ids["no_preview"], PREVIEW).unlink()
    store.path(ids["no_base"], BASE_MASK).unlink()
    failed = publish_job(store, scan=scan, model=brain_model)
    assert store.end(failed, "failed", "the scan was unusable")
    queued = publish_job(store, scan=scan, model=brain_model)
    # no lifespan, so no embedded worker: the queued job stays queued
    yield client(service), Jobs(failed=failed, queued=queued, **ids), store


def test_the_preview_of_a_finished_job(api: tuple[TestClient, Jobs, JobStore]) -> None:
    test_client, jobs, store = api
    for job_id in (jobs.adapted, jobs.base):
        response = test_client.get(f"/v1/jobs/{job_id}/preview.png", headers=A)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert response.headers["content-disposition"] == (
            f'inline; filename="{job_id}_preview.png"'
        )
        assert response.content == store.path(job_id, PREVIEW).read_bytes()
        assert len(response.content) <= MAX_BYTES
        with Image.open(io.BytesIO(response.content)) as image:
            image.load()
            assert image.format == "PNG" and image.width > 100 and image.height > 100
    links = test_client.get(f"/v1/jobs/{jobs.adapted}", headers=A).json()["links"]
    assert links["preview"] == f"/v1/jobs/{jobs.adapted}/preview.png"


def test_no_preview_is_a_clean_404_and_not_yet_a_409(
    api: tuple[TestClient, Jobs, JobStore],
) -> None:
    test_client, jobs, _ = api
    failed = test_client.get(f"/v1/jobs/{jobs.failed}/preview.png", headers=A)
    assert failed.status_code == 404
    assert failed.json() == {"detail": f"job {jobs.failed} has no preview: it is failed"}
    missing = test_client.get(f"/v1/jobs/{jobs.no_preview}/preview.png", headers=A)
    assert missing.status_code == 404
    assert missing.json() == {
        "detail": f"job {jobs.no_preview} has no preview (see its report's warnings)"
    }
    queued = test_client.get(f"/v1/jobs/{jobs.queued}/preview.png", headers=A)
    assert queued.status_code == 409 and queued.json() == {"detail": f"job {jobs.queued} is queued"}
    assert test_client.get(f"/v1/jobs/{'0' * 32}/preview.png", headers=A).status_code == 404


def test_only_the_jobs_site_sees_its_results(api: tuple[TestClient, Jobs, JobStore]) -> None:
    test_client, jobs, _ = api
    for path in ("preview.png", "mask?variant=base"):
        denied = test_client.get(f"/v1/jobs/{jobs.adapted}/{path}", headers=B)
        assert denied.status_code == 403 and "site-a" in denied.json()["detail"]
        assert test_client.get(f"/v1/jobs/{jobs.adapted}/{path}").status_code == 401


def test_the_base_models_mask_of_an_adapted_job(
    api: tuple[TestClient, Jobs, JobStore], shifted_brain_case: PhantomCase
) -> None:
    test_client, jobs, store = api
    base = test_client.get(f"/v1/jobs/{jobs.adapted}/mask?variant=base", headers=A)
    assert base.status_code == 200 and base.headers["content-type"] == "application/gzip"
    assert base.headers["content-disposition"] == (
        f'attachment; filename="{jobs.adapted}_mask_base.nii.gz"'
    )
    assert base.content == store.path(jobs.adapted, BASE_MASK).read_bytes()
    adapted = test_client.get(f"/v1/jobs/{jobs.adapted}/mask?variant=adapted", headers=A)
    default = test_client.get(f"/v1/jobs/{jobs.adapted}/mask", headers=A)
    assert adapted.content == default.content == store.path(jobs.adapted, MASK).read_bytes()
    # on the input's grid, and the mask a job of mode none made of the same scan
    image, source = image_from_bytes(base.content), nib.load(shifted_brain_case.image)
    assert image.shape == source.shape
    np.testing.assert_array_equal(image.affine, source.affine)
    of_none = image_from_bytes(test_client.get(f"/v1/jobs/{jobs.base}/mask", headers=A).content)
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(of_none.dataobj))


def test_without_adaptation_the_base_mask_is_the_mask(
    api: tuple[TestClient, Jobs, JobStore],
) -> None:
    test_client, jobs, store = api
    base = test_client.get(f"/v1/jobs/{jobs.base}/mask?variant=base", headers=A)
    assert base.status_code == 200
    assert base.content == store.path(jobs.base, MASK).read_bytes()
    assert not store.path(jobs.base, BASE_MASK).exists()


def test_a_base_mask_that_is_missing_or_not_ready_is_a_conflict(
    api: tuple[TestClient, Jobs, JobStore],
) -> None:
    test_client, jobs, _ = api
    missing = test_client.get(f"/v1/jobs/{jobs.no_base}/mask?variant=base", headers=A)
    assert missing.status_code == 409
    assert missing.json() == {"detail": f"job {jobs.no_base} has no base model mask"}
    failed = test_client.get(f"/v1/jobs/{jobs.failed}/mask?variant=base", headers=A)
    assert failed.status_code == 409
    assert failed.json()["detail"] == f"job {jobs.failed} is failed: the scan was unusable"


def test_an_unknown_variant_is_a_422_in_one_line(api: tuple[TestClient, Jobs, JobStore]) -> None:
    test_client, jobs, _ = api
    response = test_client.get(f"/v1/jobs/{jobs.adapted}/mask?variant=site", headers=A)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "variant" in detail
