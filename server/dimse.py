"""The DIMSE listener: a C-ECHO and C-STORE SCP that puts what a PACS sends into the inbox.

One port serves several AE titles: the AE title a caller dials selects the route its series
go to (``Route.ae_title``); our own AE title (``SITEFIT_DICOM_AE_TITLE``) answers C-ECHO and
selects the route named ``default`` if there is one (without it, C-STOREs to it are refused).
An association dialling any other AE title, or from a calling AE title not on
``SITEFIT_DICOM_ALLOWED_CALLERS`` (when set), is rejected at association.

The C-STORE handler runs in the association's thread: it hands the instance to
:meth:`~sitefit.inbox.Inbox.store` and answers at once (the dispatcher makes jobs of complete
series later, in the API process). A refused instance gets a failure status (0xA700 for a
series cap or a full disk, 0xC000 for unusable data) with the reason as its error comment,
and one log line; nothing a handler logs holds a UID, a name or any header value. Any error
becomes a failure status, so corrupt data never ends the association or the listener.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from sitefit.exceptions import InvalidInputError
from sitefit.inbox import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, Inbox
from sitefit.job_store import JobStorageError
from sitefit.settings import Settings

log = logging.getLogger("sitefit.server.dimse")

# pynetdicom's debug records quote SOP Instance UIDs and its info records log every C-STORE:
# in this process only its warnings and errors get through; we log associations ourselves
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

# Uncompressed and the compressed syntaxes pydicom decodes (with the pylibjpeg plugins)
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]
SUCCESS = 0x0000
_COMMENT_LENGTH = 64  # Error Comment is an LO
STOP_GRACE_S = 5.0  # on stop, associations in progress get this long to finish


def called_ae_routes(settings: Settings) -> dict[str, str | None]:
    """The AE titles the listener answers to, each with the route it selects (``None``: our
    own AE title when no route is named ``default``: C-ECHO only)."""
    own = settings.dicom_ae_title
    titles: dict[str, str | None] = {own: "default" if "default" in settings.dicom_routes else None}
    for name, route in settings.dicom_routes.items():
        if route.ae_title is not None:
            titles[route.ae_title] = name  # a route may claim our own AE title too
    return titles


@dataclass
class _Counts:
    stored: int = 0
    duplicate: int = 0
    refused: int = 0


class DicomListener:
    """The listener on ``settings.dicom_host:dicom_port``; :meth:`start` it in the background
    or :meth:`serve_forever` until an event is set."""

    def __init__(self, settings: Settings, inbox: Inbox) -> None:
        self.settings = settings
        self.inbox = inbox
        self.routes = called_ae_routes(settings)
        self._server: ThreadedAssociationServer | None = None
        self._counts: dict[object, _Counts] = {}
        self._counts_lock = threading.Lock()
        self._ae = self._application_entity()

    def _application_entity(self) -> AE:
        ae = AE(ae_title=self.settings.dicom_ae_title)
        ae.maximum_associations = self.settings.dicom_max_associations
        ae.require_called_aet = True  # checked against the title _on_requested picked
        ae.require_calling_aet = list(self.settings.dicom_allowed_callers)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the actual port once started)."""
        if self._server is not None:
            host, port = self._server.server_address[:2]
            return str(host), int(port)
        return self.settings.dicom_host, self.settings.dicom_port

    def start(self) -> None:
        """Listen in background threads (``InvalidInputError`` if the port cannot be bound)."""
        if self._server is not None:
            return
        host, port = self.settings.dicom_host, self.settings.dicom_port
        handlers: list[EventHandlerType] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        try:
            self._server = self._ae.start_server((host, port), block=False, evt_handlers=handlers)
        except OSError as error:
            raise InvalidInputError(
                f"DIMSE listener: cannot listen on {host}:{port} ({error.strerror or error})"
            ) from None

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop listening; associations in progress get ``grace_s`` to end, then are aborted
        (what they sent so far is stored; the sender retries the rest)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + grace_s
        for association in server.active_associations:
            association.join(max(0.0, deadline - time.monotonic()))
        for association in server.active_associations:
            association.abort()

    def serve_forever(self, stop: threading.Event) -> None:
        """Listen until ``stop`` is set (the CLI sets it on SIGTERM and SIGINT), then stop."""
        self.start()
        try:
            while not stop.wait(0.5):
                pass
        finally:
            self.stop()

    # -- event handlers (association threads) --------------------------------------------------

    def _on_requested(self, event: Event) -> None:
        # answer as the AE title dialled when it is one of ours, so that pynetdicom's check of
        # the called AE title accepts it; any other title is rejected as not recognised
        called = _called(event)
        if called in self.routes:
            event.assoc.acceptor.ae_title = called

    def _on_rejected(self, event: Event) -> None:
        calling, called = _calling(event), _called(event)
        allowed = self.settings.dicom_allowed_callers
        if allowed and calling not in allowed:
            reason = "calling AE title not allowed (SITEFIT_DICOM_ALLOWED_CALLERS)"
        elif called not in self.routes:
            reason = "called AE title not recognised (no route has it)"
        else:
            reason = "too many associations (SITEFIT_DICOM_MAX_ASSOCIATIONS)"
        log.warning("association from %r to %r rejected: %s", calling, called, reason)

    def _on_store(self, event: Event) -> Dataset | int:
        calling, called = _calling(event), _called(event)
        counts = self._association_counts(event)
        route = self.routes.get(called)
        if route is None:
            counts.refused += 1
            reason = "no route for this AE title: send to a route's AE title"
            log.warning("C-STORE from %r to %r refused: %s", calling, called, reason)
            return _failure(CANNOT_UNDERSTAND, reason)
        try:
            received = self.inbox.store(route, event.encoded_dataset())
        except JobStorageError as error:  # disk full, lost mount: the sender may retry
            counts.refused += 1
            log.error("C-STORE from %r to %r failed: %s", calling, called, error)
            return _failure(OUT_OF_RESOURCES, str(error))
        except Exception as error:  # a bug must not end the association: say where, not what
            counts.refused += 1
            log.error(
                "C-STORE from %r to %r failed: unexpected %s at %s",
                calling,
                called,
                type(error).__name__,
                _where(error),
            )
            return _failure(CANNOT_UNDERSTAND, "the instance could not be processed")
        if received.status == "refused":
            counts.refused += 1
            reason = received.reason or "refused"
            log.warning("C-STORE from %r to %r refused: %s", calling, called, reason)
            return _failure(received.failure_reason or CANNOT_UNDERSTAND, reason)
        if received.status == "duplicate":
            counts.duplicate += 1
        else:
            counts.stored += 1
        return SUCCESS

    def _on_closed(self, event: Event) -> None:
        with self._counts_lock:
            counts = self._counts.pop(event.assoc, None)
        if counts is not None:
            log.info(
                "association from %r to %r: %d instances stored, %d duplicates, %d refused",
                _calling(event),
                _called(event),
                counts.stored,
                counts.duplicate,
                counts.refused,
            )

    def _association_counts(self, event: Event) -> _Counts:
        with self._counts_lock:
            return self._counts.setdefault(event.assoc, _Counts())


def _called(event: Event) -> str:
    primitive = event.assoc.requestor.primitive
    return "" if primitive is None else str(primitive.called_ae_title).strip()


def _calling(event: Event) -> str:
    primitive = event.assoc.requestor.primitive
    return "" if primitive is None else str(primitive.calling_ae_title).strip()


def _failure(status: int, comment: str) -> Dataset:
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = comment.replace("\\", "/")[:_COMMENT_LENGTH]
    return answer


def _where(error: BaseException) -> str:
    """Where an exception was raised (file, line, function): never its message, which may
    quote header values."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "unknown location"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno} ({last.name})"


__all__ = ["TRANSFER_SYNTAXES", "DicomListener", "called_ae_routes"]
