"""Sending results to a real Orthanc: C-STORE and STOW-RS, retries while the PACS is down,
the failed list, resend, and deliveries that must not be sent (server/delivery.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from server.delivery import DeliveryError, deliver_due, send
from server.metrics import DeliveryMetrics
from sitefit.deliveries import DeliveryStore
from sitefit.job_store import SEG, JobStore
from sitefit.routing import DicomWebDestination, DimseDestination
from sitefit.settings import Settings
from tests.pacs.orthanc import Orthanc
from tests.server.processes import free_port
from tests.stored_jobs import publish_job

BACKOFF_S = 10.0  # tries are driven by `now`: no test waits for a backoff


def pacs_settings(home: Path, orthanc: Orthanc, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        home=home,
        dicom_ae_title="SITEFIT",
        dicom_destinations={
            "pacs": {
                "kind": "dimse",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "ae_title": orthanc.aet,
            },
            "web": {"kind": "dicomweb", "url": orthanc.dicomweb_url},
        },
        delivery_attempts=3,
        delivery_backoff_s=BACKOFF_S,
        delivery_timeout_s=5,
    )
    values.update(overrides)
    return Settings(**values)


class World:
    """A home with a job store, a delivery store and delivery metrics on one registry."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jobs = JobStore.from_settings(settings)
        self.deliveries = DeliveryStore.from_settings(settings)
        self.registry = CollectorRegistry()
        self.metrics = DeliveryMetrics(self.registry, self.deliveries)

    def job(self, seg: Path | None, status: str | None = "finished", site: str = "site-a") -> str:
        """A job as the dispatcher and the worker leave it; ``status`` None: still queued."""
        job_id = publish_job(self.jobs, site=site)
        if seg is not None:
            self.jobs.write_result(job_id, SEG, seg.read_bytes())
        if status is not None:
            assert self.jobs.end(job_id, status)  # type: ignore[arg-type]
        return job_id

    def deliver(self, now: float | None = None) -> int:
        return deliver_due(self.deliveries, self.jobs, self.settings, self.metrics, now)

    def outcomes(self, destination: str, outcome: str) -> float:
        labels = {"destination": destination, "outcome": outcome}
        return self.registry.get_sample_value("sitefit_deliveries_total", labels) or 0.0

    def failed_gauge(self) -> float | None:
        return self.registry.get_sample_value("sitefit_deliveries_failed")


@pytest.fixture
def world(tmp_path: Path, orthanc: Orthanc) -> World:
    return World(pacs_settings(tmp_path / "home", orthanc))


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- send ---------------------------------------------------------------------------------------


def test_c_store_lands_in_orthanc(orthanc: Orthanc, seg_file: Path, tmp_path: Path) -> None:
    settings = pacs_settings(tmp_path, orthanc)
    send(settings.dicom_destinations["pacs"], seg_file, settings)
    assert orthanc.instance_uids() == {sop_uid(seg_file)}
    (instance,) = orthanc.instances()
    assert orthanc.instance_tags(instance)["Modality"] == "SEG"
    stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(instance)))
    assert stored.SOPClassUID == pydicom.dcmread(seg_file).SOPClassUID


def test_c_store_calls_as_our_ae_title(orthanc: Orthanc, seg_file: Path, tmp_path: Path) -> None:
    settings = pacs_settings(tmp_path, orthanc, dicom_ae_title="OUR_AE")
    send(settings.dicom_destinations["pacs"], seg_file, settings)
    (instance,) = orthanc.instances()
    assert orthanc.instance_metadata(instance, "RemoteAET") == "OUR_AE"
    orthanc.delete_everything()
    own = DimseDestination(
        host="127.0.0.1", port=orthanc.dicom_port, ae_title="ORTHANC", calling_ae_title="ROUTE_AE"
    )
    send(own, seg_file, settings)
    (instance,) = orthanc.instances()
    assert orthanc.instance_metadata(instance, "RemoteAET") == "ROUTE_AE"


def test_c_store_association_rejected(tmp_path: Path, seg_file: Path) -> None:
    with Orthanc(tmp_path / "orthanc", check_called_aet=True) as orthanc:
        settings = pacs_settings(tmp_path, orthanc)
        wrong = DimseDestination(host="127.0.0.1", port=orthanc.dicom_port, ae_title="NOT_IT")
        with pytest.raises(DeliveryError, match=r"^association rejected by NOT_IT$"):
            send(wrong, seg_file, settings)
        assert orthanc.instances() == []
        send(settings.dicom_destinations["pacs"], seg_file, settings)
        assert len(orthanc.instances()) == 1


def test_stow_rs_lands_in_orthanc(orthanc: Orthanc, seg_file: Path, tmp_path: Path) -> None:
    settings = pacs_settings(tmp_path, orthanc)
    send(settings.dicom_destinations["web"], seg_file, settings)
    assert orthanc.instance_uids() == {sop_uid(seg_file)}
    (series,) = orthanc.series()
    assert orthanc.get(f"/series/{series}")["MainDicomTags"]["Modality"] == "SEG"


def test_stow_rs_basic_auth(tmp_path: Path, seg_file: Path) -> None:
    with Orthanc(tmp_path / "orthanc", users={"sitefit": "s3cret-pass"}) as orthanc:
        settings = pacs_settings(tmp_path, orthanc)
        wrong = DicomWebDestination(
            url=orthanc.dicomweb_url, username="sitefit", password=SecretStr("no")
        )
        with pytest.raises(DeliveryError, match="HTTP 401"):
            send(wrong, seg_file, settings)
        with pytest.raises(DeliveryError, match="HTTP 401"):
            send(DicomWebDestination(url=orthanc.dicomweb_url), seg_file, settings)
        assert orthanc.instances() == []
        right = DicomWebDestination(
            url=orthanc.dicomweb_url, username="sitefit", password=SecretStr("s3cret-pass")
        )
        send(right, seg_file, settings)
        assert orthanc.instance_uids() == {sop_uid(seg_file)}


def test_send_failures_are_one_line_without_phi(tmp_path: Path, seg_file: Path) -> None:
    settings = Settings(home=tmp_path, delivery_timeout_s=2)
    port = free_port()  # nothing listens there
    dimse = DimseDestination(host="127.0.0.1", port=port, ae_title="NOBODY")
    with pytest.raises(DeliveryError, match=f"cannot connect to 127.0.0.1:{port}"):
        send(dimse, seg_file, settings)
    web = DicomWebDestination(url=f"http://user:pw@127.0.0.1:{port}/dicom-web")
    with pytest.raises(DeliveryError) as caught:
        send(web, seg_file, settings)
    assert str(caught.value) == f"cannot connect to http://127.0.0.1:{port}"
    not_dicom = tmp_path / "seg.dcm"
    not_dicom.write_bytes(b"not a DICOM file")
    with pytest.raises(DeliveryError, match="cannot read the result file"):
        send(dimse, not_dicom, settings)


# -- deliver_due --------------------------------------------------------------------------------


def test_finished_job_is_delivered_to_every_destination(
    world: World, orthanc: Orthanc, seg_file: Path
) -> None:
    job = world.job(seg_file)
    for name in ("pacs", "web"):
        world.deliveries.add(job, name)
    assert world.deliver() == 2
    assert {d.status for d in world.deliveries.records()} == {"delivered"}
    assert all(d.delivered_at is not None for d in world.deliveries.records())
    assert orthanc.instance_uids() == {sop_uid(seg_file)}
    assert world.outcomes("pacs", "delivered") == world.outcomes("web", "delivered") == 1
    assert world.deliver() == 0  # nothing is sent twice
    assert world.failed_gauge() == 0


def test_job_still_running_is_not_attempted(world: World, orthanc: Orthanc, seg_file: Path) -> None:
    job = world.job(seg_file, status=None)
    delivery = world.deliveries.add(job, "pacs")
    assert world.deliver() == 0
    waiting = world.deliveries.get(delivery.id)
    assert (waiting.status, waiting.attempts, waiting.last_error) == ("pending", 0, None)
    assert orthanc.instances() == []
    assert world.jobs.end(job, "finished")
    assert world.deliver() == 1
    assert world.deliveries.get(delivery.id).status == "delivered"


@pytest.mark.parametrize("ending", ["failed", "canceled", "deleted", "no-seg"])
def test_deliveries_with_nothing_to_send_are_dropped(
    world: World, orthanc: Orthanc, seg_file: Path, ending: str
) -> None:
    if ending == "no-seg":
        job = world.job(None)
    else:
        job = world.job(seg_file, status=None if ending == "deleted" else ending)
    if ending == "deleted":
        world.jobs.delete(job)
    delivery = world.deliveries.add(job, "pacs")
    assert world.deliver() == 1
    dropped = world.deliveries.get(delivery.id)
    assert dropped.status == "dropped" and dropped.attempts == 0
    expected = {
        "failed": "the job failed",
        "canceled": "the job was canceled",
        "deleted": "the job is gone",
        "no-seg": "without a DICOM SEG",
    }[ending]
    assert dropped.last_error is not None and expected in dropped.last_error
    assert world.outcomes("pacs", "dropped") == 1
    assert orthanc.instances() == []


def test_unconfigured_destination_goes_to_the_failed_list(world: World, seg_file: Path) -> None:
    delivery = world.deliveries.add(world.job(seg_file), "old-pacs")
    assert world.deliver() == 1
    failed = world.deliveries.get(delivery.id)
    assert failed.status == "failed"
    assert failed.last_error is not None and "'old-pacs' is not configured" in failed.last_error
    assert world.failed_gauge() == 1


def test_pacs_down_retries_with_backoff_then_fails_then_resend_delivers(
    world: World, orthanc: Orthanc, seg_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job = world.job(seg_file)
    ids = {name: world.deliveries.add(job, name).id for name in ("pacs", "web")}
    orthanc.stop()
    t0 = 1e10  # far in the future: every delivery is due, and the times are ours
    caplog.set_level(logging.WARNING, logger="sitefit.delivery")

    assert world.deliver(t0) == 2  # try 1 of 3
    for delivery_id in ids.values():
        record = world.deliveries.get(delivery_id)
        assert (record.status, record.attempts) == ("pending", 1)
        assert record.next_try_at == t0 + BACKOFF_S
        assert record.last_error is not None and "cannot connect" in record.last_error
    assert world.deliver(t0 + BACKOFF_S - 1) == 0  # not due yet: no try counted
    assert world.deliveries.get(ids["pacs"]).attempts == 1

    assert world.deliver(t0 + BACKOFF_S) == 2  # try 2: the wait doubles
    assert world.deliveries.get(ids["pacs"]).next_try_at == t0 + 3 * BACKOFF_S
    assert world.deliver(t0 + 3 * BACKOFF_S) == 2  # try 3: the last
    for delivery_id in ids.values():
        record = world.deliveries.get(delivery_id)
        assert (record.status, record.attempts) == ("failed", 3)
    assert world.outcomes("pacs", "retry") == 2 and world.outcomes("pacs", "failed") == 1
    assert world.failed_gauge() == 2
    tries = [r.getMessage() for r in caplog.records if "failed (" in r.getMessage()]
    assert len(tries) == 6 and all(" to pacs: " in m or " to web: " in m for m in tries)
    assert sum("listed failed" in m for m in tries) == 2

    orthanc.start()  # back, but failed deliveries wait for an operator
    assert world.deliver(t0 + 1e6) == 0
    assert orthanc.instances() == []
    for delivery_id in ids.values():
        resent = world.deliveries.resend(delivery_id)
        assert (resent.status, resent.attempts) == ("pending", 0)
    assert world.failed_gauge() == 0
    assert world.deliver() == 2
    assert {world.deliveries.get(i).status for i in ids.values()} == {"delivered"}
    assert orthanc.instance_uids() == {sop_uid(seg_file)}


def test_pacs_back_before_the_last_try_delivers_without_resend(
    world: World, orthanc: Orthanc, seg_file: Path
) -> None:
    delivery = world.deliveries.add(world.job(seg_file), "pacs")
    orthanc.stop()
    t0 = 1e10
    assert world.deliver(t0) == 1
    assert world.deliveries.get(delivery.id).attempts == 1
    orthanc.start()  # same ports, same storage
    assert world.deliver(t0 + BACKOFF_S) == 1
    record = world.deliveries.get(delivery.id)
    assert record.status == "delivered" and record.attempts == 1
    assert orthanc.instance_uids() == {sop_uid(seg_file)}
    assert world.outcomes("pacs", "retry") == 1 and world.outcomes("pacs", "delivered") == 1
