"""The job function on a real engine and a real job store: each outcome and what it leaves."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sitefit.job_store import MASK, REPORT, JobStore
from sitefit.jobs import new_job_id
from sitefit.report import Mode, Report
from sitefit.settings import Settings
from tests.conftest import PhantomCase
from tests.stored_jobs import publish_job
from worker.engine import Engine, Progress, ProgressCallback, SegmentRequest, SegmentResult
from worker.job import JobEnded, run_job


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
    assert not store.path(job_id, MASK).exists()


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
