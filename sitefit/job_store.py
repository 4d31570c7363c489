"""Job data on disk, shared by the API and the workers (no torch, no Redis).

Layout under ``$SITEFIT_HOME/jobs`` (one directory per job, named by its 32-hex id)::

    .incoming/ID/          an upload being received and validated (never seen by readers)
    ID/job.json            the request (JobRecord), written once when the job is published
    ID/scan.nii[.gz]       the input scan (a DICOM series is stored converted to NIfTI)
    ID/dicom/              a DICOM series' source instances (the SEG references them)
    ID/reference.nii[.gz]  optional reference labels
    ID/progress.json       latest Progress (queued/running, stage, epoch, Dice trace)
    ID/mask.nii.gz         the result, on the input's grid
    ID/mask_base.nii.gz    the base model's mask, on the input's grid (when mode_used is not none)
    ID/preview.png         a montage of slices with the mask's outline (when it rendered)
    ID/report.json         the result's Report
    ID/seg.dcm             the result as a DICOM SEG (DICOM input only)
    ID/final.json          the terminal state (finished | failed | canceled), created once

Every file is written to a hidden temporary name, fsynced and renamed into place, so a reader
sees the old file or the whole new one. ``final.json`` is created with ``link(2)``, which fails
when the name exists: whoever ends a job first (the worker finishing it, the API canceling it,
the reaper failing it) wins, and the others see that they lost. This is the one
compare-and-set the job lifecycle needs, and it holds on NFS too.

Nothing here holds PHI: scans are stored under fixed names, and records keep the model, site,
mode and timestamps only. A job expires ``retention_s`` after it ended (or after it was
created, for a job that never ended within ``retention_s`` plus ``stale_after_s``);
:meth:`JobStore.sweep` deletes expired jobs and an expired job reads as unknown.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ValidationError

from sitefit.durable import fsync_dir, write_atomic
from sitefit.exceptions import SitefitError
from sitefit.jobs import (
    ID_PATTERN,
    FinalStatus,
    JobNotFoundError,
    JobRecord,
    JobState,
    Progress,
    check_job_id,
)
from sitefit.settings import Settings

INCOMING = ".incoming"
RECORD, PROGRESS, FINAL = "job.json", "progress.json", "final.json"
MASK, REPORT = "mask.nii.gz", "report.json"
DICOM_DIR, SEG = "dicom", "seg.dcm"  # a DICOM job's source instances, and its DICOM SEG
BASE_MASK = "mask_base.nii.gz"  # the base model's mask, when the output is not it
PREVIEW = "preview.png"  # the result at a glance (worker.preview)


class JobStorageError(SitefitError):
    """The job directory cannot be written or read (permissions, full disk, lost mount)."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


def storage_error(action: str, error: OSError) -> JobStorageError:
    """A one-line, PHI-free message for a failed filesystem operation."""
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "disk full" if full else (error.strerror or type(error).__name__)
    return JobStorageError(f"job storage: cannot {action} ({reason})", disk_full=full)


JOB_FILE_MODE = 0o640  # job files may hold a scan: not world-readable
JOB_DIR_MODE = 0o770  # job directories: the group's workers write there; others get nothing


def _write_atomic(path: Path, data: bytes, *, exclusive: bool = False) -> bool:
    """Write ``data`` to ``path`` atomically (mode 0640: job files may hold a scan); never
    creates directories, so a job deleted meanwhile stays deleted.

    With ``exclusive``, the file is linked into place only if ``path`` does not exist yet
    (returns ``False`` when it does). Raises ``OSError`` (e.g. the directory is gone).
    """
    try:
        write_atomic(path, data, mode=JOB_FILE_MODE, exclusive=exclusive)
    except FileExistsError:
        if not exclusive:
            raise
        return False
    return True


def _remove(path: Path) -> None:
    """Remove a job's file or folder (a DICOM job's ``dicom/``); what is gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


class Final(BaseModel):
    """``final.json``: how the job ended."""

    status: FinalStatus
    error: str | None = None
    ended_at: float


class JobStore:
    """The jobs directory; every method is safe to call from several processes at once."""

    def __init__(self, root: Path, retention_s: float, stale_after_s: float) -> None:
        self.root = Path(root)
        self.retention_s = retention_s
        self.stale_after_s = stale_after_s

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        """``$SITEFIT_HOME/jobs``; a job that never ended is stale after all its attempts."""
        stale = settings.job_timeout_s * (settings.job_retries + 1) + 3600
        return cls(settings.home / "jobs", settings.job_retention_s, stale)

    # -- paths ---------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.root / check_job_id(job_id)

    def incoming_dir(self, job_id: str) -> Path:
        return self.root / INCOMING / check_job_id(job_id)

    def path(self, job_id: str, name: str) -> Path:
        return self.job_dir(job_id) / name

    # -- creating ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def receiving(self, job_id: str) -> Iterator[Path]:
        """A private directory to receive an upload into; removed unless published."""
        staging = self.incoming_dir(job_id)
        try:
            staging.mkdir(parents=True, exist_ok=False)
            os.chmod(staging, JOB_DIR_MODE)  # exactly, whatever the umask: it is the job's
        except OSError as error:
            raise storage_error("create the upload directory", error) from None
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def publish(self, staging: Path, record: JobRecord) -> None:
        """Write the record and move the received files into place as a queued job."""
        try:
            _write_atomic(staging / RECORD, record.model_dump_json().encode())
            _write_atomic(
                staging / PROGRESS, Progress(updated_at=time.time()).model_dump_json().encode()
            )
            os.rename(staging, self.job_dir(record.id))
            fsync_dir(self.job_dir(record.id).parent)
        except OSError as error:
            raise storage_error("store the job", error) from None

    # -- reading -------------------------------------------------------------------------------

    def _read(self, job_id: str, name: str) -> bytes | None:
        try:
            return self.path(job_id, name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise storage_error("read job data", error) from None

    def record(self, job_id: str) -> JobRecord:
        raw = self._read(job_id, RECORD)
        if raw is None:
            raise JobNotFoundError(f"unknown job {job_id!r} (never submitted, deleted or expired)")
        try:
            return JobRecord.model_validate_json(raw)
        except ValidationError:
            raise JobStorageError(f"job {job_id}: unreadable job.json") from None

    def state(self, job_id: str, now: float | None = None) -> JobState:
        """The job's status; :class:`JobNotFoundError` for an unknown or expired job."""
        record = self.record(job_id)
        final = self._final(job_id)
        progress = self.progress(job_id)
        if self._expired(record, final, time.time() if now is None else now):
            self.delete(job_id)
            raise JobNotFoundError(f"unknown job {job_id!r} (never submitted, deleted or expired)")
        if final is not None:
            return JobState(
                record=record,
                status=final.status,
                progress=progress,
                error=final.error,
                ended_at=final.ended_at,
            )
        return JobState(record=record, status=progress.status, progress=progress)

    def progress(self, job_id: str) -> Progress:
        raw = self._read(job_id, PROGRESS)
        if raw is None:
            return Progress()
        try:
            return Progress.model_validate_json(raw)
        except ValidationError:  # an old writer's format: show no progress rather than fail
            return Progress()

    def _final(self, job_id: str) -> Final | None:
        raw = self._read(job_id, FINAL)
        if raw is None:
            return None
        try:
            return Final.model_validate_json(raw)
        except ValidationError:
            raise JobStorageError(f"job {job_id}: unreadable final.json") from None

    def is_ended(self, job_id: str) -> bool:
        """True once the job is finished, failed or canceled, or when its data is gone."""
        try:
            return self.path(job_id, FINAL).exists() or not self.path(job_id, RECORD).exists()
        except OSError:
            return True

    def job_ids(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if ID_PATTERN.fullmatch(p.name))
        except FileNotFoundError:
            return []
        except OSError as error:
            raise storage_error("list jobs", error) from None

    # -- changing ------------------------------------------------------------------------------

    def set_progress(self, job_id: str, progress: Progress) -> None:
        """Replace the job's progress; a job whose directory is gone raises JobNotFoundError."""
        progress.updated_at = time.time()
        try:
            _write_atomic(self.path(job_id, PROGRESS), progress.model_dump_json().encode())
        except FileNotFoundError:
            raise JobNotFoundError(f"job {job_id} was deleted") from None
        except OSError as error:
            raise storage_error("write job progress", error) from None

    def write_result(self, job_id: str, name: str, data: bytes) -> None:
        """Store a result file (``report.json``); raises JobNotFoundError once deleted."""
        try:
            _write_atomic(self.path(job_id, name), data)
        except FileNotFoundError:
            raise JobNotFoundError(f"job {job_id} was deleted") from None
        except OSError as error:
            raise storage_error("write job results", error) from None

    def end(self, job_id: str, status: FinalStatus, error: str | None = None) -> bool:
        """Claim the job's terminal state; ``False`` when it had already ended (lost the race)."""
        final = Final(status=status, error=error, ended_at=time.time())
        try:
            return _write_atomic(
                self.path(job_id, FINAL), final.model_dump_json().encode(), exclusive=True
            )
        except FileNotFoundError:
            return False  # deleted meanwhile
        except OSError as error:
            raise storage_error("write the job's final state", error) from None

    def cancel(self, job_id: str) -> FinalStatus:
        """Cancel an active job and delete its data, keeping a small ``canceled`` record.

        Returns the job's final status: ``canceled``, or the status it already had (a job that
        had ended is deleted entirely: its record goes too).
        """
        self.record(job_id)  # JobNotFoundError for an unknown job
        ended = self._final(job_id)
        if ended is not None:  # nothing to write: deleting must work on a full disk too
            self.delete(job_id)
            return ended.status
        if self.end(job_id, "canceled", "canceled by the client"):
            with contextlib.suppress(OSError):
                for name in os.listdir(self.job_dir(job_id)):
                    if name not in (RECORD, FINAL):
                        _remove(self.job_dir(job_id) / name)
            return "canceled"
        final = self._final(job_id)
        self.delete(job_id)
        return final.status if final else "canceled"

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def sweep(self, now: float | None = None) -> int:
        """Delete expired jobs and abandoned uploads; returns how many jobs were deleted."""
        now = time.time() if now is None else now
        deleted = 0
        for job_id in self.job_ids():
            try:
                record = self.record(job_id)
                expired = self._expired(record, self._final(job_id), now)
            except JobNotFoundError:
                expired = self._age(self.job_dir(job_id), now) > self.stale_after_s
            except JobStorageError:
                expired = self._age(self.job_dir(job_id), now) > self.retention_s
            if expired:
                self.delete(job_id)
                deleted += 1
        incoming = self.root / INCOMING
        with contextlib.suppress(OSError):
            for staging in incoming.iterdir():
                if self._age(staging, now) > self.stale_after_s:
                    shutil.rmtree(staging, ignore_errors=True)
        return deleted

    def _expired(self, record: JobRecord, final: Final | None, now: float) -> bool:
        if final is not None:
            return now > final.ended_at + self.retention_s
        return now > record.created_at + self.retention_s + self.stale_after_s

    @staticmethod
    def _age(path: Path, now: float) -> float:
        try:
            return now - path.stat().st_mtime
        except OSError:
            return 0.0


__all__ = [
    "MASK",
    "REPORT",
    "JobStorageError",
    "JobStore",
    "storage_error",
]
