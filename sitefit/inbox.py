"""Received DICOM instances waiting on disk until their series is complete (no torch, no network).

The DIMSE listener and the STOW-RS route both put what a PACS sends here; the dispatcher takes
a series out once no instance arrived for a while (``series_idle_s``) and makes it one job.
Layout under ``$SITEFIT_HOME/inbox``::

    <route>/<series_key>/<sop_key>.dcm   a series being received, one file per instance
    .tmp/<token>.part                    an upload streamed to disk before it is checked
    .claimed/<route>/<series_key>.<tok>/ a series one dispatcher took (see claim and recover)
    .dispatched/<route>/<series_key>/    empty files named as the instances of a series that
                                         became a job: a re-sent copy is a duplicate (a day)

``series_key`` is the first 32 hex digits of the SHA-256 of the Study and Series Instance UIDs
and ``sop_key`` that of the SOP Instance UID, so no name holds a UID (no PHI on disk names),
and a second copy of an instance is recognised by its name alone and ignored. The series
directory's modification time is the series' last arrival: each instance adds an entry.

Files appear whole: each is written under a hidden name in its series directory, fsynced and
linked onto its name, which fails if the name exists (the first copy of a duplicate wins
without any lock). Claiming a series is one ``rename`` of its directory, which only one of
several processes can win. An instance stored while its series is being claimed either lands
before the rename (and is claimed with it) or finds its directory gone and starts a new one.

Every instance is checked before it is kept: a DICOM Part 10 file with the three UIDs, an
image (pixel data; not a SEG, parametric map or RT dose, which also stops a loop where a PACS
sends our own SEG back), single-frame, and within the series' caps on instances and bytes.
A refusal is a one-line reason that quotes no header value (pydicom's own warnings and log
records are silenced by :mod:`sitefit.dicom`, imported here for that).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

import sitefit.dicom  # noqa: F401  (silences pydicom's header-quoting warnings and log records)
from sitefit.durable import fsync_dir, write_atomic
from sitefit.job_store import JOB_DIR_MODE, JOB_FILE_MODE, JobStorageError
from sitefit.routing import ROUTE_NAME
from sitefit.settings import Settings

TMP, CLAIMED, DISPATCHED = ".tmp", ".claimed", ".dispatched"
DISPATCHED_KEEP_S = 24 * 3600.0  # how long re-sent instances of a dispatched series are ignored
TMP_KEEP_S = 6 * 3600.0  # a temporary upload this old was left by a killed process
SUFFIX = ".dcm"
KEY_LENGTH = 32
KEY_PATTERN = re.compile(rf"^[0-9a-f]{{{KEY_LENGTH}}}$")
CLAIMED_PATTERN = re.compile(rf"^([0-9a-f]{{{KEY_LENGTH}}})\.[0-9a-f]+$")

# DICOM failure reasons (C-STORE status, STOW-RS FailureReason)
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

_DEFER_BYTES = 1024  # larger values (pixel data) in a file are not read while checking it
_UNDEFINED_LENGTH = 0xFFFFFFFF
_UID = re.compile(r"^[0-9.]{1,64}$")  # lenient: real archives hold UIDs with leading zeros
_PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Objects with pixel data that are not images to segment: our own output kind among them
_NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.8": "Heightmap Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map Storage",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose Storage",
}
_LOCK_STRIPES = 64
_TALLY_CACHE = 256
_STORE_ATTEMPTS = 3  # a series claimed while an instance is written: start a new one


@dataclass(frozen=True)
class Received:
    """What became of one instance. The UIDs are for the sender's answer (the STOW-RS response
    dataset), never for logs; ``reason`` is one PHI-free line when ``status`` is refused, and
    ``failure_reason`` the DICOM failure code then (0xA700 out of resources: a cap; 0xC000
    cannot understand: unusable data)."""

    status: Literal["stored", "duplicate", "refused"]
    reason: str | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    failure_reason: int | None = None


@dataclass(frozen=True)
class SeriesRef:
    """A series waiting in the inbox, as :meth:`Inbox.idle_series` found it."""

    route: str
    key: str
    directory: Path
    last_arrival: float  # the directory's mtime (seconds since the epoch)


@dataclass(frozen=True)
class ClaimedSeries:
    """A series taken out of the inbox by :meth:`Inbox.claim`: its instances are
    ``directory/*.dcm``; hand it to :meth:`Inbox.done` once they are in a job."""

    route: str
    key: str
    directory: Path
    instances: int

    def paths(self) -> list[Path]:
        """The instance files, in name order (which is not slice order)."""
        return _instance_files(self.directory)


@dataclass(frozen=True)
class _Instance:
    sop_class_uid: str | None
    sop_instance_uid: str
    study_uid: str
    series_uid: str


class _Refused(Exception):
    def __init__(
        self, reason: str, *, code: int = CANNOT_UNDERSTAND, instance: _Instance | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.instance = instance


@dataclass
class _Tally:
    """Instances and bytes of a series directory, valid while the directory is unchanged."""

    inode: int
    mtime_ns: int
    count: int
    size: int


def series_key(study_uid: str, series_uid: str) -> str:
    """The PHI-free directory name of a series."""
    digest = hashlib.sha256(f"{study_uid}\\{series_uid}".encode("ascii", "replace"))
    return digest.hexdigest()[:KEY_LENGTH]


def sop_key(sop_instance_uid: str) -> str:
    """The PHI-free file name (without ``.dcm``) of an instance."""
    return hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()[:KEY_LENGTH]


class Inbox:
    """The inbox directory; safe to use from several threads and several processes at once.

    The caps (``max_instances``, ``max_bytes`` per series) are exact for stores from one
    process (a lock per series) and approximate when processes store into the same series.
    """

    def __init__(self, root: Path, max_instances: int, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_instances = max_instances
        self.max_bytes = max_bytes
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._tallies: OrderedDict[Path, _Tally] = OrderedDict()
        self._tallies_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Inbox:
        return cls(
            settings.home / "inbox",
            settings.dicom_max_series_instances,
            settings.dicom_max_series_bytes,
        )

    # -- receiving -----------------------------------------------------------------------------

    def store(self, route: str, data: bytes) -> Received:
        """Check ``data`` (a DICOM Part 10 file) and keep it in its series under ``route``.

        Raises :class:`~sitefit.job_store.JobStorageError` when the disk cannot take it.
        """

        def publish(target: Path) -> None:
            write_atomic(target, data, mode=JOB_FILE_MODE, exclusive=True)

        return self._store(route, lambda: io.BytesIO(data), len(data), publish)

    def temp_dir(self) -> Path:
        """The folder (on the inbox's filesystem) to stream uploads into before
        :meth:`store_file`; :meth:`recover` removes files left there by a killed process."""
        return self._directory(self.root / TMP)

    def temp_file(self) -> Path:
        """A new empty file (mode 0640) in :meth:`temp_dir` to stream an upload into (open it
        "wb"), then hand to :meth:`store_file`."""
        path = self.temp_dir() / f"{secrets.token_hex(16)}.part"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, JOB_FILE_MODE))
        except OSError as error:
            raise _storage_error("create a temporary file", error) from None
        return path

    def store_file(self, route: str, path: Path) -> Received:
        """Like :meth:`store`, for a file on the inbox's filesystem (from :meth:`temp_file`):
        it is moved into its series, not copied. The file is consumed either way: moved,
        or removed when the instance is a duplicate or refused (or cannot be stored)."""

        def publish(target: Path) -> None:
            _move_exclusive(path, target)

        try:
            try:
                size = path.stat().st_size
            except OSError as error:
                raise _storage_error("read the received file", error) from None
            return self._store(route, lambda: path, size, publish)
        finally:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def _store(
        self,
        route: str,
        source: Callable[[], Any],
        size: int,
        publish: Callable[[Path], None],
    ) -> Received:
        try:
            if not ROUTE_NAME.fullmatch(route):
                raise _Refused("invalid route name: expected 1-64 letters, digits, . _ -")
            instance = _inspect(source(), size)
            return self._keep(route, instance, size, publish)
        except _Refused as refused:
            return _received("refused", refused.instance, refused.reason, refused.code)

    def _keep(
        self, route: str, instance: _Instance, size: int, publish: Callable[[Path], None]
    ) -> Received:
        series_dir = self.root / route / series_key(instance.study_uid, instance.series_uid)
        target = series_dir / f"{sop_key(instance.sop_instance_uid)}{SUFFIX}"
        duplicate = _received("duplicate", instance)
        dispatched = self.root / DISPATCHED / route / series_dir.name / target.name
        with self._lock(series_dir):
            if target.exists() or dispatched.exists():
                return duplicate
            tally = self._tally(series_dir)
            if tally.count + 1 > self.max_instances:
                raise _Refused(
                    f"series limit reached: {self.max_instances} instances "
                    "(SITEFIT_DICOM_MAX_SERIES_INSTANCES)",
                    code=OUT_OF_RESOURCES,
                    instance=instance,
                )
            if tally.size + size > self.max_bytes:
                raise _Refused(
                    f"series limit reached: {self.max_bytes:,} bytes "
                    "(SITEFIT_DICOM_MAX_SERIES_BYTES)",
                    code=OUT_OF_RESOURCES,
                    instance=instance,
                )
            for attempt in range(1, _STORE_ATTEMPTS + 1):
                self._directory(series_dir)
                try:
                    publish(target)
                    break
                except FileExistsError:
                    return duplicate  # another process stored it meanwhile
                except FileNotFoundError as error:  # the series was claimed meanwhile
                    if attempt == _STORE_ATTEMPTS:
                        raise _storage_error("store the instance", error) from None
                except OSError as error:
                    raise _storage_error("store the instance", error) from None
            self._counted(series_dir, tally, size)
        return _received("stored", instance)

    # -- series --------------------------------------------------------------------------------

    def idle_series(self, idle_s: float, now: float | None = None) -> list[SeriesRef]:
        """The series no instance arrived for in ``idle_s`` seconds, oldest first. Series
        directories without instances (left by a failed store) are removed on the way."""
        now = time.time() if now is None else now
        found: list[SeriesRef] = []
        for route_dir in _subdirectories(self.root):
            if not ROUTE_NAME.fullmatch(route_dir.name):
                continue  # .tmp, .claimed, anything not ours
            for series_dir in _subdirectories(route_dir):
                if not KEY_PATTERN.fullmatch(series_dir.name):
                    continue
                try:
                    arrival = series_dir.stat().st_mtime
                except FileNotFoundError:
                    continue  # claimed meanwhile
                if arrival > now - idle_s:
                    continue
                if not _instance_files(series_dir):
                    _remove_empty(series_dir, now - idle_s)
                    continue
                found.append(SeriesRef(route_dir.name, series_dir.name, series_dir, arrival))
        return sorted(found, key=lambda ref: ref.last_arrival)

    def claim(self, ref: SeriesRef) -> ClaimedSeries | None:
        """Take the series out of the inbox, for this process alone; ``None`` if another
        process claimed it first or an instance arrived since ``ref`` was listed."""
        try:
            if ref.directory.stat().st_mtime != ref.last_arrival:
                return None
        except FileNotFoundError:
            return None
        claimed_dir = self._directory(self.root / CLAIMED / ref.route)
        target = claimed_dir / f"{ref.key}.{secrets.token_hex(6)}"
        try:
            os.rename(ref.directory, target)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise _storage_error("claim a series", error) from None
        fsync_dir(claimed_dir)
        fsync_dir(ref.directory.parent)
        with contextlib.suppress(OSError):
            os.utime(target)  # the claim's time, for recover()
        return ClaimedSeries(ref.route, ref.key, target, len(_instance_files(target)))

    def done(self, claimed: ClaimedSeries) -> None:
        """Remove a claimed series whose instances are in a job now. Their names stay
        (``.dispatched``, for a day) so that a PACS re-sending them makes no second job."""
        markers = self._directory(self.root / DISPATCHED / claimed.route / claimed.key)
        for path in _instance_files(claimed.directory):
            try:
                os.close(os.open(markers / path.name, os.O_WRONLY | os.O_CREAT, JOB_FILE_MODE))
            except OSError as error:
                raise _storage_error("record a dispatched series", error) from None
        with contextlib.suppress(OSError):
            os.utime(markers)  # the dispatch's time, for recover()
        try:
            shutil.rmtree(claimed.directory)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise _storage_error("remove a claimed series", error) from None

    def release(self, claimed: ClaimedSeries) -> None:
        """Put a claimed series back at once (it could not become a job now): the next pass
        of the dispatcher finds it again."""
        self._put_back(claimed.directory, self.root / claimed.route / claimed.key)

    def recover(self, stale_s: float, now: float | None = None) -> int:
        """Put series claimed more than ``stale_s`` seconds ago back (their claimer died, or
        could not make a job of them then), merging with instances of the same series that
        arrived since; remove temporary uploads older than ``TMP_KEEP_S`` and the names of
        series dispatched more than ``DISPATCHED_KEEP_S`` ago. Returns the number of series
        put back."""
        now = time.time() if now is None else now
        recovered = 0
        for route_dir in _subdirectories(self.root / CLAIMED):
            if not ROUTE_NAME.fullmatch(route_dir.name):
                continue
            for claimed_dir in _subdirectories(route_dir):
                match = CLAIMED_PATTERN.fullmatch(claimed_dir.name)
                if match is None or not _older(claimed_dir, now - stale_s):
                    continue
                if self._put_back(claimed_dir, self.root / route_dir.name / match.group(1)):
                    recovered += 1
        for part in _files(self.root / TMP):
            if _older(part, now - max(stale_s, TMP_KEEP_S)):
                with contextlib.suppress(OSError):
                    part.unlink()
        for route_dir in _subdirectories(self.root / DISPATCHED):
            for markers in _subdirectories(route_dir):
                if _older(markers, now - DISPATCHED_KEEP_S):
                    shutil.rmtree(markers, ignore_errors=True)
        return recovered

    def _put_back(self, claimed_dir: Path, series_dir: Path) -> bool:
        self._directory(series_dir.parent)
        try:
            os.rename(claimed_dir, series_dir)  # replaces an empty series directory, if any
        except FileNotFoundError:
            return False  # another process recovered it
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise _storage_error("recover a claimed series", error) from None
            self._merge(claimed_dir, series_dir)
            return True
        fsync_dir(series_dir.parent)
        return True

    def _merge(self, claimed_dir: Path, series_dir: Path) -> None:
        """Instances arrived for the series after it was claimed: move the claimed ones in
        beside them (the first copy of a duplicate wins)."""
        with self._lock(series_dir):
            for path in _instance_files(claimed_dir):
                try:
                    os.link(path, series_dir / path.name)
                except FileExistsError:
                    pass
                except FileNotFoundError:
                    continue  # another process is merging it
                except OSError as error:
                    raise _storage_error("recover a claimed series", error) from None
                with contextlib.suppress(OSError):
                    path.unlink()
            fsync_dir(series_dir)
        shutil.rmtree(claimed_dir, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, series_dir: Path) -> Iterator[None]:
        with self._locks[hash(series_dir) % _LOCK_STRIPES]:
            yield

    def _tally(self, series_dir: Path) -> _Tally:
        """The series' instances and bytes: cached, recounted when the directory changed
        behind this process's back (another process stored, or it was claimed)."""
        try:
            stat = series_dir.stat()
        except FileNotFoundError:
            return _Tally(0, 0, 0, 0)
        with self._tallies_lock:
            cached = self._tallies.get(series_dir)
        if cached and (cached.inode, cached.mtime_ns) == (stat.st_ino, stat.st_mtime_ns):
            return cached
        count = size = 0
        for path in _instance_files(series_dir):
            with contextlib.suppress(FileNotFoundError):
                size += path.stat().st_size
                count += 1
        return _Tally(stat.st_ino, stat.st_mtime_ns, count, size)

    def _counted(self, series_dir: Path, tally: _Tally, size: int) -> None:
        try:
            stat = series_dir.stat()
        except FileNotFoundError:
            return
        updated = _Tally(stat.st_ino, stat.st_mtime_ns, tally.count + 1, tally.size + size)
        if stat.st_ino != tally.inode and tally.count:
            return  # a new directory began: the next store recounts it
        with self._tallies_lock:
            self._tallies[series_dir] = updated
            self._tallies.move_to_end(series_dir)
            while len(self._tallies) > _TALLY_CACHE:
                self._tallies.popitem(last=False)

    def _directory(self, path: Path) -> Path:
        """``path`` and the folders between it and the root, created with mode 0770."""
        if path.is_dir():
            return path
        chain = [path, *path.parents]
        chain = chain[: chain.index(self.root) + 1]
        for folder in reversed(chain):
            try:
                folder.mkdir(parents=folder == self.root)
            except FileExistsError:
                continue
            except OSError as error:
                raise _storage_error("create an inbox directory", error) from None
            with contextlib.suppress(OSError):
                os.chmod(folder, JOB_DIR_MODE)  # exactly, whatever the umask
        return path


def _received(
    status: Literal["stored", "duplicate", "refused"],
    instance: _Instance | None,
    reason: str | None = None,
    failure_reason: int | None = None,
) -> Received:
    return Received(
        status,
        reason,
        sop_class_uid=instance.sop_class_uid if instance else None,
        sop_instance_uid=instance.sop_instance_uid if instance else None,
        study_uid=instance.study_uid if instance else None,
        failure_reason=failure_reason,
    )


def _inspect(source: Any, size: int) -> _Instance:
    """The identifiers of a DICOM instance of ``size`` bytes, or :class:`_Refused` with a
    PHI-free reason."""
    try:
        ds = pydicom.dcmread(source, defer_size=_DEFER_BYTES)
    except Exception:  # pydicom raises many types for corrupt data; none is worth more detail
        raise _Refused("not a readable DICOM Part 10 file (corrupt or not DICOM)") from None
    try:
        found = _identify(ds)
        _check_complete(ds, size, found)
        return found
    except _Refused:
        raise
    except Exception:  # a value pydicom cannot convert (e.g. a corrupt VR or length)
        raise _Refused("the instance's header cannot be read (corrupt)") from None


def _identify(ds: pydicom.Dataset) -> _Instance:
    sop_class = _uid(ds, "SOPClassUID") or _uid(ds.file_meta, "MediaStorageSOPClassUID")
    found = _Instance(
        sop_class,
        sop_instance_uid=_required_uid(ds, "SOPInstanceUID"),
        study_uid=_required_uid(ds, "StudyInstanceUID"),
        series_uid=_required_uid(ds, "SeriesInstanceUID"),
    )
    kind = _sop_class_name(sop_class)
    if sop_class in _NOT_IMAGES or str(ds.get("Modality", "")).strip() == "SEG":
        raise _Refused(f"{kind} objects are not images to segment", instance=found)
    if not any(keyword in ds for keyword in _PIXEL_DATA):
        raise _Refused(
            f"{kind} objects are not images (no pixel data); send image series", instance=found
        )
    frames = ds.get("NumberOfFrames")
    try:
        many = frames is not None and str(frames).strip() != "" and int(frames) > 1
    except (TypeError, ValueError):
        raise _Refused("the instance's NumberOfFrames is not a number", instance=found) from None
    if many:
        raise _Refused(
            "enhanced multi-frame objects are not supported; send single-frame images",
            instance=found,
        )
    return found


def _check_complete(ds: pydicom.Dataset, size: int, found: _Instance) -> None:
    """Refuse pixel data cut short (pydicom reads a truncated value without complaint): its
    declared length past the end of the file, or fewer bytes than an uncompressed image's
    rows, columns, samples, bits and frames need."""
    keyword = next(keyword for keyword in _PIXEL_DATA if keyword in ds)
    element = ds.get_item(keyword)
    if element is None:
        return
    syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
    if isinstance(element, RawDataElement) and element.value is None:  # deferred: not read
        actual = element.length
        # value_tell is a position in the file, except in a deflated one (the inflated stream)
        in_file = syntax != DeflatedExplicitVRLittleEndian and actual != _UNDEFINED_LENGTH
        if in_file and element.value_tell + actual > size:
            raise _Refused(f"the instance's {keyword} is truncated", instance=found)
    else:
        actual = len(element.value or b"")
    if syntax is None or UID(syntax).is_compressed:
        return
    bits = int(ds.get("BitsAllocated") or 0)
    frames = int(ds.get("NumberOfFrames") or 1)
    cells = int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0)
    expected = cells * int(ds.get("SamplesPerPixel") or 1) * frames * bits
    if actual * 8 < expected:
        raise _Refused(f"the instance's {keyword} is truncated", instance=found)


def _uid(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = "" if value is None else str(value).strip(" \x00")
    if not text:
        return None
    if not _UID.fullmatch(text):
        raise _Refused(f"the instance's {keyword} is not a valid UID")
    return text


def _required_uid(ds: pydicom.Dataset, keyword: str) -> str:
    text = _uid(ds, keyword)
    if text is None:
        raise _Refused(f"the instance has no {keyword}")
    return text


def _sop_class_name(sop_class: str | None) -> str:
    """pydicom's name of a standard SOP class; never the UID of a private one."""
    if sop_class is None:
        return "unknown SOP class"
    if sop_class in _NOT_IMAGES:
        return _NOT_IMAGES[sop_class]
    name = UID(sop_class).name
    return "unknown SOP class" if name == sop_class else name


def _instance_files(directory: Path) -> list[Path]:
    try:
        names = sorted(
            entry.name
            for entry in os.scandir(directory)
            if entry.name.endswith(SUFFIX) and not entry.name.startswith(".") and entry.is_file()
        )
    except FileNotFoundError:
        return []
    return [directory / name for name in names]


def _subdirectories(directory: Path) -> list[Path]:
    try:
        return [Path(entry.path) for entry in os.scandir(directory) if entry.is_dir()]
    except FileNotFoundError:
        return []


def _files(directory: Path) -> list[Path]:
    try:
        return [Path(entry.path) for entry in os.scandir(directory) if entry.is_file()]
    except FileNotFoundError:
        return []


def _remove_empty(series_dir: Path, cutoff: float) -> None:
    """Remove a series directory without instances: its temporary files from before
    ``cutoff`` (a store writes one for milliseconds), then the directory if that left it
    empty (a store that began meanwhile keeps it)."""
    for leftover in _files(series_dir):
        if leftover.name.startswith(".") and _older(leftover, cutoff):
            with contextlib.suppress(OSError):
                leftover.unlink()
    with contextlib.suppress(OSError):
        series_dir.rmdir()


def _older(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime <= cutoff
    except FileNotFoundError:
        return False


def _move_exclusive(source: Path, target: Path) -> None:
    """Publish ``source`` at ``target`` unless that exists (``FileExistsError``): a hard
    link, after an fsync; a copy when the file is on another filesystem."""
    os.chmod(source, JOB_FILE_MODE)
    descriptor = os.open(source, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    try:
        os.link(source, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        data = source.read_bytes()
        write_atomic(target, data, mode=JOB_FILE_MODE, exclusive=True)
        return
    fsync_dir(target.parent)


def _storage_error(action: str, error: OSError) -> JobStorageError:
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "disk full" if full else (error.strerror or type(error).__name__)
    return JobStorageError(f"DICOM inbox: cannot {action} ({reason})", disk_full=full)


__all__ = [
    "CANNOT_UNDERSTAND",
    "OUT_OF_RESOURCES",
    "ClaimedSeries",
    "Inbox",
    "Received",
    "SeriesRef",
    "series_key",
    "sop_key",
]
