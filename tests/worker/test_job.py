"""The job function on a real engine and a real job store: each outcome and what it leaves."""

from __future__ import annotations

import shutil
import stat
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from sitefit.dicom import series_dir_to_nifti
from sitefit.job_store import (
    BASE_MASK,
    DICOM_DIR,
    JOB_FILE_MODE,
    MASK,
    PREVIEW,
    REPORT,
    SEG,
    JobStore,
)
from sitefit.jobs import JobRecord, new_job_id
from sitefit.phantoms.dicom_series import write_dicom_series
from sitefit.report import Mode, Report
from sitefit.settings import Settings
from tests.conftest import PhantomCase
from tests.sitefit.test_seg import assert_seg_follows_mask, dciodvfy_errors
from tests.stored_jobs import publish_job
from worker.engine import Engine, Progress, ProgressCallback, SegmentRequest, SegmentResult
from worker.job import JobEnded, run_job
from worker.preview import MAX_BYTES, PreviewData


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    return Engine(settings)


def _publish(store: JobStore, scan: Path, model: str, mode: Mode = "adapt") -> str:
    suffix = ".nii.gz" if scan.name.endswith(".gz") else ".nii"
    return publish_job(store, scan=scan.read_bytes(), scan_file=f"scan{suffix}", model=model,
                       mode=mode)  # fmt: skip


def _store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs", 3600, 7200)


def test_finished_job_stores_mask_report_and_progress(
    tmp_path: Path, engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    store = _store(tmp_path)
    job_id = _publish(store, shifted_brain_case.image, brain_model)
    events: list[JobEnded] = []
    assert run_job(job_id, store, engine, observer=events.append) == "finished"
    state = store.state(job_id)
    assert state.status == "finished" and state.progress.stage == "done"
    report = Report.model_validate_json(store.path(job_id, REPORT).read_bytes())
    assert state.progress.dice_trace == pytest.approx(report.refinement.dice_trace, abs=1e-6)
    mask = nib.load(store.path(job_id, MASK))
    assert mask.shape == nib.load(shifted_brain_case.image).shape
    (event,) = events
    assert event.outcome == "finished" and event.attempt == 1 and event.report == report
    assert run_job(job_id, store, engine) == "skipped"  # an ended job never runs again


def test_unusable_scan_fails_with_the_engines_message(
    tmp_path: Path, engine: Engine, brain_model: str
) -> None:
    constant = tmp_path / "constant.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), constant)
    store = _store(tmp_path)
    job_id = _publish(store, constant, brain_model)
    assert run_job(job_id, store, engine) == "failed"
    state = store.state(job_id)
    assert state.status == "failed" and "every voxel has the value 1" in (state.error or "")
    for name in (MASK, BASE_MASK, PREVIEW, REPORT):
        assert not store.path(job_id, name).exists(), name


class _CancelWhileSegmenting:
    """The real engine, with the job canceled (as DELETE does) once the scan is loaded: at
    the "segmenting" progress report (earlier, the scan's deletion alone would stop it)."""

    def __init__(self, engine: Engine, store: JobStore, job_id: str) -> None:
        self.engine, self.store, self.job_id = engine, store, job_id
        self.stages: list[str] = []

    def run(
        self, request: SegmentRequest, progress: ProgressCallback | None = None
    ) -> SegmentResult:
        assert progress is not None

        def relay(update: Progress) -> None:
            self.stages.append(update.stage)
            if update.stage == "segmenting":
                self.store.cancel(self.job_id)
            progress(update)

        return self.engine.run(request, relay)


def test_canceled_while_running_stops_and_keeps_no_results(
    tmp_path: Path, engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    store = _store(tmp_path)
    job_id = _publish(store, shifted_brain_case.image, brain_model)
    canceling = _CancelWhileSegmenting(engine, store, job_id)
    outcome = run_job(job_id, store, canceling)
    assert canceling.stages == ["loading", "segmenting"]  # stopped at that progress step
    assert outcome == "canceled"
    assert store.state(job_id).status == "canceled"
    assert not store.path(job_id, MASK).exists() and not store.path(job_id, REPORT).exists()


def test_time_limit_fails_the_job(
    tmp_path: Path, engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    store = _store(tmp_path)
    job_id = _publish(store, shifted_brain_case.image, brain_model)
    assert run_job(job_id, store, engine, timeout_s=0.0) == "failed"
    assert "time limit" in (store.state(job_id).error or "")


def test_deleted_or_unknown_jobs_are_skipped(
    tmp_path: Path, engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    store = _store(tmp_path)
    job_id = _publish(store, shifted_brain_case.image, brain_model)
    store.cancel(job_id)
    assert run_job(job_id, store, engine) == "skipped"
    assert run_job(new_job_id(), store, engine) == "skipped"


class _AnotherAttemptFinishesMeanwhile:
    """The real engine; while this attempt's engine runs, another attempt of the same job
    (requeued because this worker looked dead) runs and finishes it."""

    def __init__(self, engine: Engine, store: JobStore, job_id: str) -> None:
        self.engine, self.store, self.job_id = engine, store, job_id
        self.finished: dict[str, tuple[int, bytes]] = {}  # the winner's files

    def run(
        self, request: SegmentRequest, progress: ProgressCallback | None = None
    ) -> SegmentResult:
        result = self.engine.run(request, progress)
        assert run_job(self.job_id, self.store, self.engine) == "finished"
        for name in (MASK, REPORT):
            path = self.store.path(self.job_id, name)
            self.finished[name] = (path.stat().st_ino, path.read_bytes())
        return result


def test_a_late_attempt_leaves_the_finished_attempts_results_alone(
    tmp_path: Path, engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    store = _store(tmp_path)
    job_id = _publish(store, shifted_brain_case.image, brain_model, mode="none")
    late = _AnotherAttemptFinishesMeanwhile(engine, store, job_id)
    assert run_job(job_id, store, late) == "canceled"  # it lost: the other one finished
    assert store.state(job_id).status == "finished"
    for name, (inode, data) in late.finished.items():  # neither replaced nor removed
        path = store.path(job_id, name)
        assert path.stat().st_ino == inode and path.read_bytes() == data, name


# -- DICOM jobs: the SEG ------------------------------------------------------------------------


def publish_dicom_job(
    store: JobStore,
    tmp_path: Path,
    scan: Path,
    model: str,
    *,
    mode: Mode = "none",
    keep_instances: bool = True,
    series_of: Path | None = None,
) -> tuple[str, Path]:
    """A DICOM job as an upload leaves it: the series' instances (written from ``series_of``,
    default ``scan``, in shuffled order) under ``dicom/`` and their conversion as the scan.
    Returns the job id and a copy of the instances."""
    instances = tmp_path / "instances"
    write_dicom_series(nib.load(series_of or scan), instances, order="shuffled", seed=5)
    job_id = new_job_id()
    with store.receiving(job_id) as staging:
        series_dir_to_nifti(instances, staging / "scan.nii.gz", 10**7)
        if keep_instances:
            shutil.copytree(instances, staging / DICOM_DIR)
        record = JobRecord(id=job_id, created_at=time.time(), model=model, site="site-a",
                           mode=mode, scan_file="scan.nii.gz", source_format="dicom")  # fmt: skip
        store.publish(staging, record)
    return job_id, instances


def test_a_dicom_job_stores_a_seg_on_its_source_slices(
    tmp_path: Path, engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    store = _store(tmp_path)
    job_id, instances = publish_dicom_job(store, tmp_path, shifted_brain_case.image, brain_model,
                                       mode="adapt")  # fmt: skip
    assert run_job(job_id, store, engine) == "finished"
    seg_path = store.path(job_id, SEG)
    assert stat.S_IMODE(seg_path.stat().st_mode) == JOB_FILE_MODE
    mask = nib.load(store.path(job_id, MASK))
    assert np.asarray(mask.dataobj).any()  # the test's premise: something to place
    assert_seg_follows_mask(seg_path, instances, mask)
    seg = pydicom.dcmread(seg_path)
    report = Report.model_validate_json(store.path(job_id, REPORT).read_bytes())
    assert report.guard is not None and report.self_consistency.after.dice is not None
    assert seg.SeriesDescription == (
        f"sitefit {brain_model}@1 adapt {report.guard.verdict} "
        f"SC {report.self_consistency.after.dice:.2f}"
    )
    assert seg.NumberOfFrames == mask.shape[2]  # empty frames kept by default
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "brain"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "12738006"
    first = pydicom.dcmread(next(instances.iterdir()))
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert dciodvfy_errors(seg_path) == []


class _EndSlicesCleared:
    """The real engine, its mask's first two and last slices cleared: a mask with empty
    frames (the tiny model labels every slice), not symmetric along the slice axis."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(
        self, request: SegmentRequest, progress: ProgressCallback | None = None
    ) -> SegmentResult:
        result = self.engine.run(request, progress)
        data = np.asarray(result.mask.dataobj).copy()
        data[:, :, [0, 1, -1]] = 0
        result.mask = nib.Nifti1Image(data, result.mask.affine, result.mask.header)
        return result


def test_empty_frames_are_omitted_when_configured(
    tmp_path: Path, settings: Settings, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    store = _store(tmp_path)
    omitting = Engine(settings.model_copy(update={"seg_omit_empty_frames": True}))
    job_id, instances = publish_dicom_job(store, tmp_path, shifted_brain_case.image, brain_model)
    assert run_job(job_id, store, _EndSlicesCleared(omitting)) == "finished"
    mask = nib.load(store.path(job_id, MASK))
    labelled = np.asarray(mask.dataobj).any(axis=(0, 1))  # the converted scan's slices: axis 2
    assert labelled.any() and not labelled.all()  # the test's premise
    seg = pydicom.dcmread(store.path(job_id, SEG))
    assert seg.NumberOfFrames == int(labelled.sum())
    assert_seg_follows_mask(store.path(job_id, SEG), instances, mask, omitted=True)


def test_a_seg_that_cannot_be_built_fails_the_job_and_leaves_nothing(
    tmp_path: Path, engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    """Instances of another grid than the scan's: the mask cannot be placed on them."""
    store = _store(tmp_path)
    other = tmp_path / "other.nii.gz"
    image = nib.load(shifted_brain_case.image)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :, 1:], image.affine), other)
    job_id, _ = publish_dicom_job(store, tmp_path, other, brain_model)
    shutil.rmtree(store.path(job_id, DICOM_DIR))
    write_dicom_series(image, store.path(job_id, DICOM_DIR), order="reversed")
    assert run_job(job_id, store, engine) == "failed"
    state = store.state(job_id)
    assert state.error == "DICOM SEG: the mask is not on the source series' voxel grid"
    for name in (MASK, PREVIEW, SEG, REPORT):  # the preview, stored before the SEG, went too
        assert not store.path(job_id, name).exists(), name


def test_jobs_without_source_instances_have_no_seg(
    tmp_path: Path, engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    store = _store(tmp_path)
    nifti = _publish(store, shifted_brain_case.image, brain_model, mode="none")
    dicom, _ = publish_dicom_job(store, tmp_path, shifted_brain_case.image, brain_model,
                              keep_instances=False)  # fmt: skip
    for job_id in (nifti, dicom):
        assert run_job(job_id, store, engine) == "finished"
        assert store.path(job_id, MASK).exists() and not store.path(job_id, SEG).exists()


# -- the base model's mask and the preview ------------------------------------------------------


def _png(path: Path) -> bytes:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and 0 < len(data) <= MAX_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == JOB_FILE_MODE
    return data


def test_an_adapted_job_keeps_the_base_models_mask_and_every_job_a_preview(
    tmp_path: Path, engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    store = _store(tmp_path)
    adapted = _publish(store, shifted_brain_case.image, brain_model, mode="adapt")
    base = _publish(store, shifted_brain_case.image, brain_model, mode="none")
    for job_id in (adapted, base):
        assert run_job(job_id, store, engine) == "finished"
        _png(store.path(job_id, PREVIEW))
    kept = store.path(adapted, BASE_MASK)
    assert stat.S_IMODE(kept.stat().st_mode) == JOB_FILE_MODE
    kept_image, base_image = nib.load(kept), nib.load(store.path(base, MASK))
    # the base model's mask of the adapted job is the mask a job of mode none made: same
    # labels, on the input's grid
    assert np.array_equal(np.asarray(kept_image.dataobj), np.asarray(base_image.dataobj))
    np.testing.assert_array_equal(kept_image.affine, nib.load(shifted_brain_case.image).affine)
    assert not store.path(base, BASE_MASK).exists()  # mode none: the mask is the base's


class _UnrenderablePreview:
    """The real engine, its preview's mask replaced by one on another grid: rendering fails."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(
        self, request: SegmentRequest, progress: ProgressCallback | None = None
    ) -> SegmentResult:
        result = self.engine.run(request, progress)
        assert result.preview is not None
        image = result.preview.image
        result.preview = PreviewData(image, np.zeros((2, 2, 2), np.uint8), None, 2,
                                     (1.0, 1.0, 1.0), {1: "x"}, "t")  # fmt: skip
        return result


def test_a_preview_that_cannot_be_rendered_fails_nothing(
    tmp_path: Path, engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    store = _store(tmp_path)
    job_id = _publish(store, shifted_brain_case.image, brain_model, mode="none")
    assert run_job(job_id, store, _UnrenderablePreview(engine)) == "finished"
    assert store.path(job_id, MASK).exists() and not store.path(job_id, PREVIEW).exists()
    report = Report.model_validate_json(store.path(job_id, REPORT).read_bytes())
    assert report.warnings == ["no preview: it could not be rendered (PreviewError)"]
