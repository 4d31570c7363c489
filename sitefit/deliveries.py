"""Deliveries: a finished job's DICOM SEG to send to a PACS destination (no torch, no network).

When a series arrives by a route with destinations, one delivery per destination is added
with its job; the API's delivery loop (:func:`server.delivery.deliver_due`) sends it once the
job finished, retrying with backoff. A delivery is in one of four states:

- ``pending``: waiting for its job to end, or for its next try;
- ``delivered``: the destination took the SEG;
- ``failed``: every try failed (the dead-letter list; ``resend`` makes it pending again);
- ``dropped``: nothing to send (the job failed, was canceled or deleted); the reason is kept.

Layout under ``$SITEFIT_HOME/deliveries`` (one JSON file per delivery; its folder is its
state)::

    pending/ID.json  delivered/ID.json  failed/ID.json  dropped/ID.json
    claimed/ID.CLAIMED_NS.TOKEN.json   a delivery a sender is handling right now

Several processes share the store (the API's workers, the CLI). A sender **claims** a
delivery by renaming its file into ``claimed/`` under a name only it knows: a rename
succeeds once, so one sender wins and the others skip it. The sender then rewrites its
claimed file with the outcome and renames it into the outcome's folder. Each step is a single
rename, so a delivery is always in exactly one place; a sender killed mid-claim leaves its
claimed file, which :meth:`DeliveryStore.recover` moves back (into the folder of the state it
holds) once the claim is older than ``claim_timeout_s``, far longer than one send may take.
At worst (a sender frozen for longer than that) a SEG is sent twice, which a PACS stores as
the same instance; it is never lost.
Records hold ids, destination names, counts, times and one-line PHI-free errors only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from sitefit.durable import write_atomic
from sitefit.exceptions import SitefitError
from sitefit.job_store import JOB_DIR_MODE, JOB_FILE_MODE, JobStorageError, storage_error
from sitefit.jobs import check_job_id
from sitefit.settings import Settings

log = logging.getLogger("sitefit.deliveries")
DeliveryStatus = Literal["pending", "delivered", "failed", "dropped"]
STATUSES: tuple[DeliveryStatus, ...] = ("pending", "delivered", "failed", "dropped")
CLAIMED = "claimed"
MAX_BACKOFF_S = 1800.0
ID_PATTERN = re.compile(r"^[0-9a-f]{24}$")
_CLAIM_NAME = re.compile(r"^([0-9a-f]{24})\.([0-9]{1,20})\.([0-9a-f]{8})\.json$")


class DeliveryNotFoundError(SitefitError):
    """No delivery of that id (never created, or swept after the retention time)."""


class DeliveryStateError(SitefitError):
    """The delivery is not in a state that allows the action (e.g. resending one that has
    not failed)."""


class Delivery(BaseModel):
    """One job's SEG to one destination (see the module docstring)."""

    id: str
    job_id: str
    destination: str = Field(min_length=1, max_length=128, description="its configured name")
    status: DeliveryStatus = "pending"
    attempts: int = Field(default=0, ge=0, description="failed tries since created or resent")
    next_try_at: float = Field(description="Unix time; a pending delivery is due from then")
    created_at: float
    updated_at: float
    last_error: str | None = Field(
        default=None, description="why the last try failed, or why it was dropped (one line)"
    )
    delivered_at: float | None = None


@dataclass(frozen=True)
class Claim:
    """A delivery a sender holds: its record as claimed, and where its file is now."""

    delivery: Delivery
    path: Path
    claimed_at: float


def delivery_id(job_id: str, destination: str) -> str:
    """The id of a job's delivery to a destination: the same on every call and process."""
    digest = hashlib.sha256(f"{check_job_id(job_id)}/{destination}".encode())
    return digest.hexdigest()[:24]


def check_delivery_id(value: str) -> str:
    """Ids become file names: only 24 lowercase hex digits are accepted."""
    if not ID_PATTERN.fullmatch(value):
        raise DeliveryNotFoundError(f"unknown delivery {value[:40]!r}")
    return value


def backoff_s(attempts: int, base_s: float) -> float:
    """The wait after the ``attempts``-th failed try: ``base_s`` doubling, at most 30 min."""
    return min(base_s * 2.0 ** max(attempts - 1, 0), MAX_BACKOFF_S)


def one_line(text: str, limit: int = 300) -> str:
    """The first line of ``text``, cut to ``limit`` characters (records keep one line)."""
    lines = text.strip().splitlines()
    return (lines[0] if lines else "")[:limit]


class DeliveryStore:
    """The deliveries folder; every method is safe to call from several processes at once."""

    def __init__(
        self,
        root: Path,
        *,
        attempts: int = 6,
        backoff_s: float = 10.0,
        claim_timeout_s: float = 600.0,
        retention_s: float = 7 * 24 * 3600.0,
    ) -> None:
        self.root = Path(root)
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.claim_timeout_s = claim_timeout_s
        self.retention_s = retention_s

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryStore:
        """``$SITEFIT_HOME/deliveries``; a claim outlives any send (connect, associate, store,
        each bounded by ``delivery_timeout_s``) before it is taken back."""
        return cls(
            settings.home / "deliveries",
            attempts=settings.delivery_attempts,
            backoff_s=settings.delivery_backoff_s,
            claim_timeout_s=max(600.0, 5 * settings.delivery_timeout_s),
            retention_s=settings.job_retention_s,
        )

    # -- paths ---------------------------------------------------------------------------------

    def _file(self, status: DeliveryStatus, delivery: str) -> Path:
        return self.root / status / f"{delivery}.json"

    def _folder(self, name: str) -> Path:
        folder = self.root / name
        try:
            folder.mkdir(mode=JOB_DIR_MODE, parents=True, exist_ok=True)
        except OSError as error:
            raise storage_error("create the deliveries folder", error) from None
        return folder

    # -- creating ------------------------------------------------------------------------------

    def add(self, job_id: str, destination: str, now: float | None = None) -> Delivery:
        """A pending delivery of ``job_id``'s SEG to ``destination`` (the one already there
        if it was added before)."""
        now = time.time() if now is None else now
        delivery = Delivery(
            id=delivery_id(job_id, destination),
            job_id=job_id,
            destination=destination,
            next_try_at=now,
            created_at=now,
            updated_at=now,
        )
        with contextlib.suppress(DeliveryNotFoundError):
            return self.get(delivery.id)
        self._folder("pending")
        try:
            write_atomic(
                self._file("pending", delivery.id),
                delivery.model_dump_json().encode(),
                mode=JOB_FILE_MODE,
                exclusive=True,
            )
        except FileExistsError:  # added meanwhile by another process
            return self.get(delivery.id)
        except OSError as error:
            raise storage_error("store a delivery", error) from None
        return delivery

    # -- reading -------------------------------------------------------------------------------

    def get(self, delivery: str) -> Delivery:
        """A delivery by id, wherever it is (a claimed one reads as the state it holds)."""
        check_delivery_id(delivery)
        for _attempt in range(3):  # it may move between folders while we look
            for status in STATUSES:
                found = self._read(self._file(status, delivery), status)
                if found is not None:
                    return found
            for path in self._claim_files():
                if path.name.startswith(delivery + "."):
                    found = self._read(path, None)
                    if found is not None:
                        return found
        raise DeliveryNotFoundError(f"unknown delivery {delivery!r}")

    def records(self, status: DeliveryStatus | None = None) -> list[Delivery]:
        """Every delivery (or those in ``status``), newest first; claimed ones as the state
        they hold (a claimed delivery is being handled: it was pending)."""
        found: dict[str, Delivery] = {}
        for path in self._claim_files():
            claimed = self._readable(path, None)
            if claimed is not None:
                found[claimed.id] = claimed
        for state in STATUSES:
            for path in self._files(state):
                record = self._readable(path, state)
                if record is not None:  # its settled file wins over a leftover claim
                    found[record.id] = record
        selected = [d for d in found.values() if status is None or d.status == status]
        return sorted(selected, key=lambda d: (d.created_at, d.id), reverse=True)

    def due(self, now: float | None = None) -> list[Delivery]:
        """Pending deliveries whose next try is due, the longest-waiting first."""
        now = time.time() if now is None else now
        pending = (self._readable(path, "pending") for path in self._files("pending"))
        due = [d for d in pending if d is not None and d.next_try_at <= now]
        return sorted(due, key=lambda d: (d.next_try_at, d.id))

    def count(self, status: DeliveryStatus) -> int:
        """How many deliveries are in ``status`` (not counting claimed ones): cheap."""
        return sum(1 for _ in self._files(status))

    def _files(self, folder: str) -> Iterator[Path]:
        try:
            names = os.listdir(self.root / folder)
        except FileNotFoundError:
            return
        except OSError as error:
            raise storage_error("list deliveries", error) from None
        for name in names:
            if name.endswith(".json") and ID_PATTERN.fullmatch(name[:-5]):
                yield self.root / folder / name

    def _claim_files(self) -> list[Path]:
        try:
            names = os.listdir(self.root / CLAIMED)
        except FileNotFoundError:
            return []
        except OSError as error:
            raise storage_error("list deliveries", error) from None
        return [self.root / CLAIMED / name for name in names if _CLAIM_NAME.fullmatch(name)]

    @staticmethod
    def _read(path: Path, status: DeliveryStatus | None) -> Delivery | None:
        """The record at ``path`` (``None`` if it is gone); a settled file's folder is its
        state, whatever the file says."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise storage_error("read a delivery", error) from None
        try:
            record = Delivery.model_validate_json(raw)
        except ValidationError:
            raise JobStorageError(f"deliveries: unreadable record {path.name}") from None
        return record if status is None else record.model_copy(update={"status": status})

    def _readable(self, path: Path, status: DeliveryStatus | None) -> Delivery | None:
        """Like :meth:`_read`, but a corrupt record is skipped: listings go on without it."""
        try:
            return self._read(path, status)
        except JobStorageError as error:
            if "unreadable" not in str(error):
                raise
            log.warning("%s: skipped", error)
            return None

    # -- claiming and settling -----------------------------------------------------------------

    def claim(self, delivery: str, status: DeliveryStatus = "pending") -> Claim | None:
        """Take the delivery out of ``status`` for this process alone; ``None`` when it is
        not there (another process claimed or moved it)."""
        check_delivery_id(delivery)
        claimed_at = time.time()
        name = f"{delivery}.{time.time_ns()}.{secrets.token_hex(4)}.json"
        path = self._folder(CLAIMED) / name
        try:
            os.rename(self._file(status, delivery), path)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise storage_error("claim a delivery", error) from None
        try:
            record = self._read(path, status)
        except JobStorageError:  # corrupt: put it back where it was, for an operator to see
            with contextlib.suppress(OSError):
                os.rename(path, self._file(status, delivery))
            raise
        if record is None:  # taken back already: only after claim_timeout_s, never here
            return None
        return Claim(record, path, claimed_at)

    def settle(self, claim: Claim, record: Delivery) -> bool:
        """Store ``record`` (its status names the folder) and end the claim; ``False`` when
        the claim had been taken back (the sender stalled past ``claim_timeout_s``)."""
        late = time.time() - claim.claimed_at > self.claim_timeout_s / 2
        if late and not claim.path.exists():
            return False
        try:  # the claim is ours: recovery takes only claims older than claim_timeout_s
            write_atomic(claim.path, record.model_dump_json().encode(), mode=JOB_FILE_MODE)
            self._folder(record.status)
            os.rename(claim.path, self._file(record.status, record.id))
        except FileNotFoundError:
            return False
        except OSError as error:
            raise storage_error("store a delivery", error) from None
        return True

    def release(self, claim: Claim) -> bool:
        """Give a claimed delivery back unchanged."""
        return self.settle(claim, claim.delivery)

    def recover(self, now: float | None = None) -> int:
        """Move claims older than ``claim_timeout_s`` (their sender died) back into the folder
        of the state they hold; returns how many. Nothing is lost: each move is one rename."""
        now = time.time() if now is None else now
        recovered = 0
        for path in self._claim_files():
            match = _CLAIM_NAME.fullmatch(path.name)
            if match is None or now - int(match.group(2)) / 1e9 <= self.claim_timeout_s:
                continue
            record = self._readable(path, None)
            if record is None:
                continue
            target = self._file(record.status, record.id)
            if target.exists():  # settled, and a claim's copy was left behind: drop the copy
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            self._folder(record.status)
            try:
                os.rename(path, target)
            except FileNotFoundError:
                continue  # another process recovered it first
            except OSError as error:
                raise storage_error("recover a delivery", error) from None
            recovered += 1
        return recovered

    # -- outcomes (each ends the claim) --------------------------------------------------------

    def delivered(self, claim: Claim, now: float | None = None) -> Delivery:
        now = time.time() if now is None else now
        record = claim.delivery.model_copy(
            update={"status": "delivered", "delivered_at": now, "updated_at": now}
        )
        self.settle(claim, record)
        return record

    def failed_try(self, claim: Claim, reason: str, now: float | None = None) -> Delivery:
        """Count a failed try: pending again after the backoff, or ``failed`` after the last."""
        now = time.time() if now is None else now
        attempts = claim.delivery.attempts + 1
        final = attempts >= self.attempts
        record = claim.delivery.model_copy(
            update={
                "status": "failed" if final else "pending",
                "attempts": attempts,
                "next_try_at": now if final else now + backoff_s(attempts, self.backoff_s),
                "last_error": one_line(reason),
                "updated_at": now,
            }
        )
        self.settle(claim, record)
        return record

    def fail(self, claim: Claim, reason: str, now: float | None = None) -> Delivery:
        """Straight to the failed list, no more tries (e.g. the destination is not configured)."""
        return self._end(claim, "failed", reason, now)

    def drop(self, claim: Claim, reason: str, now: float | None = None) -> Delivery:
        """Nothing to send (the job failed, was canceled or is gone); the reason is kept."""
        return self._end(claim, "dropped", reason, now)

    def _end(
        self, claim: Claim, status: DeliveryStatus, reason: str, now: float | None
    ) -> Delivery:
        now = time.time() if now is None else now
        record = claim.delivery.model_copy(
            update={"status": status, "last_error": one_line(reason), "updated_at": now}
        )
        self.settle(claim, record)
        return record

    # -- operators -----------------------------------------------------------------------------

    def resend(self, delivery: str, now: float | None = None) -> Delivery:
        """A failed delivery back to pending, due now, with its tries counted from zero."""
        now = time.time() if now is None else now
        claim = self.claim(delivery, "failed")
        if claim is None:
            current = self.get(delivery)  # DeliveryNotFoundError for an unknown id
            raise DeliveryStateError(
                f"delivery {delivery} is {current.status}: only a failed delivery can be resent"
            )
        record = claim.delivery.model_copy(
            update={"status": "pending", "attempts": 0, "next_try_at": now, "updated_at": now}
        )
        self.settle(claim, record)
        return record

    def sweep(self, now: float | None = None) -> int:
        """Delete delivered, dropped and failed records last changed more than
        ``retention_s`` ago (their job's data is gone by then too), and what killed senders
        left in ``claimed/``; returns how many records were deleted."""
        now = time.time() if now is None else now
        deleted = 0
        for status in ("delivered", "dropped", "failed"):
            for path in list(self._files(status)):
                with contextlib.suppress(OSError):  # gone meanwhile, or unreadable: next time
                    record = self._readable(path, status)
                    changed = path.stat().st_mtime if record is None else record.updated_at
                    if now - changed > self.retention_s:
                        path.unlink()
                        deleted += 1
        with contextlib.suppress(OSError):  # temporary files of interrupted settles
            for name in os.listdir(self.root / CLAIMED):
                debris = self.root / CLAIMED / name
                if name.startswith(".") and now - debris.stat().st_mtime > self.claim_timeout_s:
                    debris.unlink()
        return deleted


__all__ = [
    "STATUSES",
    "Claim",
    "Delivery",
    "DeliveryNotFoundError",
    "DeliveryStateError",
    "DeliveryStatus",
    "DeliveryStore",
    "backoff_s",
    "check_delivery_id",
    "delivery_id",
]
