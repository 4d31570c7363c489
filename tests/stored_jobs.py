"""Jobs written straight into a real job store, as the server's upload would leave them."""

from __future__ import annotations

import time

from sitefit.job_store import JobStore
from sitefit.jobs import JobRecord, new_job_id
from sitefit.report import Mode


def publish_job(
    store: JobStore,
    *,
    scan: bytes = b"scan",
    scan_file: str = "scan.nii.gz",
    model: str = "m",
    site: str = "site-a",
    mode: Mode = "none",
    created_at: float | None = None,
    job_id: str | None = None,
) -> str:
    """Publish a queued job whose scan holds ``scan``; returns its id."""
    job_id = job_id or new_job_id()
    with store.receiving(job_id) as staging:
        (staging / scan_file).write_bytes(scan)
        record = JobRecord(
            id=job_id,
            created_at=time.time() if created_at is None else created_at,
            model=model,
            site=site,
            mode=mode,
            scan_file=scan_file,
        )
        store.publish(staging, record)
    return job_id
