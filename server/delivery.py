"""Sending finished jobs' DICOM SEGs to their PACS destinations (network; no torch).

:func:`send` stores one SEG at one destination: by C-STORE to a DIMSE peer (pynetdicom, as
our calling AE title, proposing the SEG's SOP class in its own transfer syntax) or by STOW-RS
to a DICOMweb server (dicomweb-client, with bearer or basic auth). Any failure becomes a
:class:`DeliveryError` with a one-line reason that names no patient data.

:func:`deliver_due` is one pass over the delivery store (:mod:`sitefit.deliveries`), run by
the API's background loop in a thread (it blocks on the network): each due delivery whose job
ended is claimed, then sent, retried later, listed failed or dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from server.metrics import DeliveryMetrics
from sitefit.deliveries import Claim, Delivery, DeliveryStore
from sitefit.exceptions import SitefitError
from sitefit.job_store import SEG, JobStorageError, JobStore
from sitefit.jobs import ACTIVE, JobNotFoundError
from sitefit.routing import AnyDestination, DicomWebDestination, DimseDestination
from sitefit.settings import Settings

log = logging.getLogger("sitefit.delivery")
# pynetdicom's debug records quote SOP Instance UIDs: only its warnings and errors get through
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

# C-STORE statuses that mean "stored" (Part 4 B.2.3: warnings are stored with changes)
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class DeliveryError(SitefitError):
    """One try to send a result failed; the message is a short reason without PHI."""


def send(destination: AnyDestination, seg_path: Path, settings: Settings) -> None:
    """Store the DICOM file at ``seg_path`` at ``destination``; :class:`DeliveryError` if not."""
    try:
        dataset = pydicom.dcmread(seg_path)
    except (OSError, InvalidDicomError) as error:
        raise DeliveryError(f"cannot read the result file ({type(error).__name__})") from None
    if isinstance(destination, DimseDestination):
        _c_store(destination, dataset, settings)
    else:
        _stow(destination, dataset, settings)


def _c_store(destination: DimseDestination, dataset: Dataset, settings: Settings) -> None:
    timeout = settings.delivery_timeout_s
    ae = AE(ae_title=destination.calling_ae_title or settings.dicom_ae_title)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    syntax = UID(dataset.file_meta.TransferSyntaxUID)
    # an uncompressed SEG may go in either little endian syntax: pynetdicom re-encodes it
    syntaxes = [syntax]
    if not syntax.is_compressed:
        syntaxes += [s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s != syntax]
    ae.add_requested_context(dataset.SOPClassUID, syntaxes)
    connected: list[bool] = []  # pynetdicom reports a refused connection as an abort
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.append(True))],
    )
    if not assoc.is_established:
        if not connected:
            raise DeliveryError(f"cannot connect to {destination.host}:{destination.port}")
        if assoc.is_rejected:
            raise DeliveryError(f"association rejected by {destination.ae_title}")
        raise DeliveryError(f"association with {destination.ae_title} aborted or timed out")
    try:
        if not assoc.accepted_contexts:
            raise DeliveryError(
                f"{destination.ae_title} accepts neither the SEG's SOP class nor its "
                "transfer syntax"
            )
        status = assoc.send_c_store(dataset)
    except (ValueError, AttributeError, RuntimeError) as error:  # pynetdicom: cannot send
        raise DeliveryError(f"C-STORE not sent ({type(error).__name__})") from None
    finally:
        if assoc.is_established:
            assoc.release()
    code = status.get("Status") if status else None
    if code is None:
        raise DeliveryError("no C-STORE response (timeout, abort or invalid response)")
    if int(code) not in _STORED:
        raise DeliveryError(f"C-STORE refused with status 0x{int(code):04X}")


def _stow(destination: DicomWebDestination, dataset: Dataset, settings: Settings) -> None:
    session = requests.Session()
    # credentials on the session, not per request: dicomweb-client logs request headers
    if destination.bearer_token is not None:
        token = destination.bearer_token.get_secret_value()
        session.headers["Authorization"] = f"Bearer {token}"
    elif destination.username is not None and destination.password is not None:
        session.auth = (destination.username, destination.password.get_secret_value())
    try:
        client = DICOMwebClient(
            url=destination.url, session=session, timeout=settings.delivery_timeout_s
        )
        client.set_http_retry_params(retry=False)  # retries are ours, with backoff
        answer: Any = client.store_instances([dataset])
    except requests.HTTPError as error:
        code = error.response.status_code if error.response is not None else "?"
        raise DeliveryError(f"STOW-RS refused with HTTP {code}") from None
    except requests.Timeout:
        raise DeliveryError("STOW-RS timed out") from None
    except requests.ConnectionError:
        raise DeliveryError(f"cannot connect to {_origin(destination.url)}") from None
    except (requests.RequestException, ValueError) as error:
        raise DeliveryError(f"STOW-RS failed ({type(error).__name__})") from None
    finally:
        session.close()
    if isinstance(answer, Dataset) and len(answer.get("FailedSOPSequence", [])):
        raise DeliveryError("STOW-RS answered that the SEG was not stored")


def _origin(url: str) -> str:
    """``scheme://host:port`` of a URL: enough to say where, without a path or credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def deliver_due(
    deliveries: DeliveryStore,
    jobs: JobStore,
    settings: Settings,
    metrics: DeliveryMetrics | None = None,
    now: float | None = None,
) -> int:
    """Handle every due pending delivery once; returns how many were sent, retried, failed
    or dropped (those still waiting for their job are left pending, no try counted).

    Claims older than the store's claim timeout (a sender died) are taken back first. After
    one failed try to a destination, its other deliveries wait for the next pass, so that a
    PACS that does not answer holds up neither this pass nor the other destinations for long.
    """
    # outcomes are stamped when they happen (a send may take a while), or at ``now`` if given
    clock: Callable[[], float] = time.time if now is None else lambda: now
    deliveries.recover()
    handled = 0
    unreachable: set[str] = set()  # a destination that failed once waits for the next pass
    for due in deliveries.due(clock()):
        if due.destination in unreachable:
            continue
        outcome = _deliver_one(deliveries, jobs, settings, due, clock)
        if outcome is None:
            continue
        handled += 1
        if outcome in ("retry", "failed"):
            unreachable.add(due.destination)
        if metrics is not None:
            metrics.outcomes.labels(due.destination, outcome).inc()
    return handled


def _deliver_one(
    deliveries: DeliveryStore,
    jobs: JobStore,
    settings: Settings,
    due: Delivery,
    clock: Callable[[], float],
) -> str | None:
    """One due delivery: its outcome (a metric label), or ``None`` when it was left alone."""
    try:
        state = jobs.state(due.job_id)
    except JobNotFoundError:
        state = None
    except JobStorageError:
        return None  # job storage unreadable: nothing can be decided, try next pass
    if state is not None and state.status in ACTIVE:
        return None  # its job is still queued or running
    claim = deliveries.claim(due.id)
    if claim is None:
        return None  # another process is handling it
    try:
        if claim.delivery.next_try_at > clock():  # handled meanwhile by another process
            deliveries.release(claim)
            return None
        return _settle(deliveries, jobs, settings, claim, state.status if state else None, clock)
    except BaseException:
        # a bug or an interrupt mid-send: give the delivery back untouched (or, should even
        # that fail, recovery takes the claim back after its timeout)
        if claim.path.exists():
            deliveries.release(claim)
        raise


def _settle(
    deliveries: DeliveryStore,
    jobs: JobStore,
    settings: Settings,
    claim: Claim,
    job_status: str | None,
    clock: Callable[[], float],
) -> str:
    delivery = claim.delivery
    name, job_id = delivery.destination, delivery.job_id
    if job_status is None:
        deliveries.drop(claim, "the job is gone (deleted or expired)", clock())
        log.info("delivery %s of job %s to %s: dropped, job gone", delivery.id, job_id, name)
        return "dropped"
    if job_status != "finished":
        ended = "the job failed" if job_status == "failed" else f"the job was {job_status}"
        deliveries.drop(claim, f"{ended}: no result to send", clock())
        log.info(
            "delivery %s of job %s to %s: dropped, job %s", delivery.id, job_id, name, job_status
        )
        return "dropped"
    destination = settings.dicom_destinations.get(name)
    if destination is None:
        reason = f"destination {name!r} is not configured (SITEFIT_DICOM_DESTINATIONS)"
        deliveries.fail(claim, reason, clock())
        log.warning("delivery %s of job %s: failed, %s", delivery.id, job_id, reason)
        return "failed"
    seg = jobs.path(job_id, SEG)
    if not seg.is_file():
        deliveries.drop(claim, "the job finished without a DICOM SEG", clock())
        log.info("delivery %s of job %s to %s: dropped, no SEG", delivery.id, job_id, name)
        return "dropped"
    try:
        send(destination, seg, settings)
    except DeliveryError as error:
        reason = str(error)
    except Exception as error:  # a bug or a library's surprise: count it as a failed try
        reason = f"unexpected {type(error).__name__}"
        log.exception("delivery %s of job %s to %s: unexpected error", delivery.id, job_id, name)
    else:
        deliveries.delivered(claim, clock())
        log.info("delivery %s of job %s: delivered to %s", delivery.id, job_id, name)
        return "delivered"
    now = clock()
    record = deliveries.failed_try(claim, reason, now)
    if record.status == "failed":
        log.warning(
            "delivery %s of job %s to %s: try %d of %d failed (%s); listed failed",
            delivery.id,
            job_id,
            name,
            record.attempts,
            deliveries.attempts,
            record.last_error,
        )
        return "failed"
    log.warning(
        "delivery %s of job %s to %s: try %d of %d failed (%s); next try in %.0f s",
        delivery.id,
        job_id,
        name,
        record.attempts,
        deliveries.attempts,
        record.last_error,
        record.next_try_at - now,
    )
    return "retry"


__all__ = ["DeliveryError", "deliver_due", "send"]
