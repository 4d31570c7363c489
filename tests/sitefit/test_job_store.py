"""The job store: publish, status, the exclusive terminal state, cancel, retention."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sitefit.job_store import DICOM_DIR, JOB_DIR_MODE, MASK, REPORT, JobStorageError, JobStore
from sitefit.jobs import JobNotFoundError, Progress, new_job_id
from sitefit.settings import Settings
from tests.stored_jobs import publish_job


def _store(tmp_path: Path, retention: float = 3600, stale: float = 7200) -> JobStore:
    return JobStore(tmp_path / "jobs", retention, stale)


def _publish(store: JobStore, created: float | None = None) -> str:
    return publish_job(store, mode="auto", created_at=created)


def test_published_job_is_queued_and_nothing_is_left_in_incoming(tmp_path: Path) -> None:
    store = _store(tmp_path)
    job_id = _publish(store)
    state = store.state(job_id)
    assert state.status == "queued" and state.record.site == "site-a"
    assert store.path(job_id, "scan.nii.gz").read_bytes() == b"scan"
    assert list((store.root / ".incoming").iterdir()) == []
    assert store.job_ids() == [job_id]


def test_a_jobs_directory_is_not_for_other_accounts_whatever_the_umask(tmp_path: Path) -> None:
    store = _store(tmp_path)
    previous = os.umask(0o022)  # the usual umask: alone it would let every account list it
    try:
        job_id = _publish(store)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(store.job_dir(job_id).stat().st_mode) == JOB_DIR_MODE


def test_failed_upload_leaves_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    job_id = new_job_id()
    with pytest.raises(RuntimeError), store.receiving(job_id) as staging:
        (staging / "scan.nii").write_bytes(b"x")
        raise RuntimeError("validation failed")
    assert store.job_ids() == [] and list((store.root / ".incoming").iterdir()) == []


@pytest.mark.parametrize("bad", ["../../etc", "ABC", "0" * 31, "x" * 32, ""])
def test_ids_that_are_not_32_hex_digits_are_unknown(tmp_path: Path, bad: str) -> None:
    with pytest.raises(JobNotFoundError):
        _store(tmp_path).state(bad)


def test_terminal_state_is_claimed_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    job_id = _publish(store)
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def claim(status: str) -> None:
        barrier.wait()
        wins.append(store.end(job_id, "finished" if status == "f" else "canceled"))

    threads = [threading.Thread(target=claim, args=("fc"[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wins.count(True) == 1
    assert store.state(job_id).status in ("finished", "canceled")


def test_cancel_keeps_a_small_record_and_deletes_data(tmp_path: Path) -> None:
    store = _store(tmp_path)
    job_id = _publish(store)
    store.set_progress(job_id, Progress(status="running", stage="adapting", epoch=2))
    assert store.state(job_id).status == "running"
    assert store.cancel(job_id) == "canceled"
    state = store.state(job_id)
    assert state.status == "canceled" and state.error
    assert not store.path(job_id, "scan.nii.gz").exists()
    assert store.end(job_id, "finished") is False  # a worker finishing late loses
    assert store.cancel(job_id) == "canceled"  # deleting again removes the record
    with pytest.raises(JobNotFoundError):
        store.state(job_id)


def test_cancel_deletes_a_dicom_jobs_source_instances_too(tmp_path: Path) -> None:
    store = _store(tmp_path)
    job_id = _publish(store)
    instances = store.path(job_id, DICOM_DIR)
    instances.mkdir()
    (instances / "0001.dcm").write_bytes(b"a scan slice")
    store.path(job_id, "mask.nii.gz").write_bytes(b"mask")
    assert store.cancel(job_id) == "canceled"
    assert sorted(p.name for p in store.job_dir(job_id).iterdir()) == ["final.json", "job.json"]


def test_deleting_a_finished_job_removes_it(tmp_path: Path) -> None:
    store = _store(tmp_path)
    job_id = _publish(store)
    store.write_result(job_id, REPORT, b"{}")
    assert store.end(job_id, "finished")
    assert store.cancel(job_id) == "finished"
    with pytest.raises(JobNotFoundError):
        store.state(job_id)
    with pytest.raises(JobNotFoundError):
        store.write_result(job_id, MASK, b"late")  # never recreates a deleted job


# Run with no room to write a byte (RLIMIT_FSIZE 0: every write fails with EFBIG, as on a full
# disk): cancel one job that ended and one that did not; prints what each call gave.
_NO_ROOM = """
import resource, signal, sys
from sitefit.job_store import JobStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
store = JobStore(sys.argv[1], 3600, 7200)
for job_id in sys.argv[2:]:
    try:
        print(store.cancel(job_id))
    except Exception as error:
        print(type(error).__name__)
"""


def test_deleting_an_ended_job_needs_no_room_to_write(tmp_path: Path) -> None:
    """A client frees space by deleting jobs, above all when the disk is full."""
    store = _store(tmp_path)
    ended, active = _publish(store), _publish(store)
    assert store.end(ended, "finished")
    run = subprocess.run(
        [sys.executable, "-c", _NO_ROOM, str(store.root), ended, active],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert run.stdout.split() == ["finished", "JobStorageError"], run.stderr
    assert store.job_ids() == [active] and store.state(active).status == "queued"


def test_retention_expires_ended_jobs_and_stale_uploads(tmp_path: Path) -> None:
    store = _store(tmp_path, retention=10, stale=100)
    ended, active = _publish(store), _publish(store)
    store.end(ended, "failed", "boom")
    now = time.time()
    assert store.state(ended, now=now + 5).status == "failed"
    with pytest.raises(JobNotFoundError):
        store.state(ended, now=now + 11)  # expired: reads as unknown, and is deleted
    assert not store.job_dir(ended).exists()
    assert store.sweep(now=now + 50) == 0  # an active job outlives the retention ...
    assert store.state(active, now=now + 50).status == "queued"
    assert store.sweep(now=now + 200) == 1  # ... until it is stale
    assert store.job_ids() == []
    (store.root / ".incoming" / new_job_id()).mkdir(parents=True)
    store.sweep(now=time.time() + 200)
    assert list((store.root / ".incoming").iterdir()) == []


def test_unwritable_root_is_a_storage_error_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "jobs").write_bytes(b"a file where the jobs directory should be")
    store = _store(tmp_path)
    with (
        pytest.raises(JobStorageError, match="job storage: cannot create"),
        store.receiving(new_job_id()),
    ):
        pass


def test_a_job_that_never_ended_outlives_every_attempts_time_limit(tmp_path: Path) -> None:
    """docs/operations.md: deleted retention + timeout x (retries + 1) + 3600 s after it was
    created; an abandoned upload after timeout x (retries + 1) + 3600 s."""
    settings = Settings(home=tmp_path, job_timeout_s=10, job_retries=2, job_retention_s=100)
    store = JobStore.from_settings(settings)
    assert (store.retention_s, store.stale_after_s) == (100, 10 * 3 + 3600)
    job_id = publish_job(store, scan=b"scan", model="m")
    created = store.record(job_id).created_at
    assert store.sweep(now=created + 100 + 3630 - 1) == 0 and store.record(job_id)
    assert store.sweep(now=created + 100 + 3630 + 1) == 1
