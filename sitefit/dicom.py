"""One DICOM image series -> a 3D volume -> a NIfTI file the engine reads (no torch).

Two ways in: a directory of instance files (:func:`read_series_dir`; the PACS listener's
received series, or an extracted upload), and a zip of one series, which is first extracted
into such a directory (:func:`extract_series_zip`; an upload keeps its instances, which the
SEG writer references).

What is accepted: DICOM image instances (single-frame, one sample per pixel) of exactly one
series, uncompressed or compressed with any transfer syntax pydicom's pixel-data plugins decode
(JPEG baseline, extended and lossless, JPEG-LS, JPEG 2000, RLE). An instance sent twice (the
same SOPInstanceUID) counts once: a PACS may re-send.

What is refused, each with a one-line message (``InvalidInputError``) that names instances by
their position only (``instance #N``: the Nth file by name, for a zip the Nth file member),
never by file name, UID or any header text (no PHI): non-DICOM files, objects without image
data (structured reports, presentation states, segmentations, ...), enhanced multi-frame
objects, several series, mixed image sizes, orientations or pixel spacings, gantry tilt,
duplicate or unevenly spaced slices (missing slices), pixel data no plugin decodes (named by
its transfer syntax), intensities that are not finite after the rescale, a volume whose voxels
all have one value, and more voxels than ``max_voxels``. A zip is also refused for member
names that could escape a directory (absolute, ``..``, drive letters), more than
:data:`MAX_INSTANCES` members, more uncompressed bytes than the volume limit allows (the
zip-bomb guard: zipfile never inflates a member past its declared size, and the declared sizes
are checked first), encrypted or corrupt members. Directory entries and macOS metadata
(``__MACOSX/``, ``.DS_Store``) in a zip are skipped.

Geometry: slices are sorted by their position along the slice normal (the cross product of
the row and column direction cosines of ImageOrientationPatient); voxel ``(i, j, k)`` is
column ``i``, row ``j`` of slice ``k``, so the affine's columns are the row direction times the
column spacing (PixelSpacing[1]), the column direction times the row spacing (PixelSpacing[0]),
the step between the first and last slice positions divided by ``n - 1``, and the first
slice's ImagePositionPatient; DICOM's LPS patient space is turned into NIfTI's RAS by negating
x and y. Intensities are ``stored * RescaleSlope + RescaleIntercept`` as float32.

Headers are read first (pixel data deferred) and checked as a series before any pixel data is
decoded; then each slice is decoded straight into its place in the volume.

Nothing here logs or warns header text either: pydicom's reading validation, which quotes
non-conforming values in its warnings and log records, is switched off (see below).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from sitefit.defaults import MAX_SERIES_INSTANCES, MIN_SPATIAL_SIZE
from sitefit.durable import atomic_path
from sitefit.exceptions import InvalidInputError, SitefitError
from sitefit.job_store import JOB_DIR_MODE, JOB_FILE_MODE, storage_error
from sitefit.volume import check_intensities, save_image_atomic
from sitefit.volume.header import nib

MAX_INSTANCES = MAX_SERIES_INSTANCES
HEADER_ALLOWANCE = 1024 * 1024  # bytes of DICOM header allowed per slice besides pixel data
MAX_PIXEL_BYTES = 4  # bytes per stored sample, at most
SERIES = "DICOM series"  # how messages and the intensity check name the series
_DEFER_BYTES = 64 * 1024  # header pass: larger values (pixel data) are not read
_COPY_CHUNK = 2**20
_POSITION_TOLERANCE_MM = 1e-3
_SPACING_TOLERANCE = 0.01  # relative difference between slice gaps
_ORIENTATION_TOLERANCE = 1e-4
# a slice may sit off the first slice's normal by this fraction of its distance along the
# normal (about 0.6°: rounding in written positions, not a gantry tilt) plus a constant
_TILT_TOLERANCE = 0.01
_TILT_TOLERANCE_MM = 0.05
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SKIPPED_PARTS = {"__MACOSX", ".DS_Store"}
_UNKNOWN_SOP_CLASS = "unknown SOP class"
_UNKNOWN_SYNTAX = "unknown transfer syntax"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# objects that carry pixel data but are no image of the patient
_NON_IMAGE_CLASSES = {
    pydicom.uid.SegmentationStorage,
    pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.66.7"),  # Label Map Segmentation Storage
}
_FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")

_T = TypeVar("_T")

# pydicom quotes header values in its warnings and log records: reading validation ("Invalid
# value for VR UI: '...'") and the character set check ("Unknown encoding '...'", which no
# setting turns off) would put header text (PHI) in the server's log. So, for the whole
# process: reading validation is off (pydicom's scoped switch flips this same global and
# races between uploads converted in concurrent threads), pydicom's own log records go
# nowhere and its warnings are ignored. A value we cannot use is still refused, by our own
# message, which quotes nothing (_header_value).
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
_PYDICOM_LOG = logging.getLogger("pydicom")  # its modules' loggers are this one or below it
_PYDICOM_LOG.propagate = False
_PYDICOM_LOG.addHandler(logging.NullHandler())
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


@dataclass(frozen=True, eq=False)
class DicomVolume:
    """The series as a float32 volume (column, row, slice) and its RAS voxel-to-world affine.

    ``study_uid`` and ``series_uid`` are the series' StudyInstanceUID and SeriesInstanceUID
    (empty when the instances have none); ``header`` is the first slice's dataset without its
    pixel data (scanner headers for the site key, patient and study modules for a SEG).
    """

    data: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    slices: int
    study_uid: str
    series_uid: str
    header: Dataset


@dataclass(frozen=True)
class _Slice:
    number: int  # position in the directory listing, for messages
    path: Path
    position: npt.NDArray[np.float64]
    orientation: npt.NDArray[np.float64]
    spacing: tuple[float, float]
    shape: tuple[int, int]
    series: str
    study: str
    expected: int | None  # ImagesInAcquisition, when the instance states it


def _refuse(message: str) -> InvalidInputError:
    return InvalidInputError(f"{SERIES}: {message}")


def _refuse_zip(message: str) -> InvalidInputError:
    return InvalidInputError(f"DICOM zip: {message}")


# -- zip -> directory ---------------------------------------------------------------------------


def _unsafe_name(name: str) -> bool:
    normalized = name.replace("\\", "/")
    parts = PurePosixPath(normalized).parts
    return (
        normalized.startswith("/")
        or ".." in parts
        or (len(normalized) > 1 and normalized[1] == ":")
        or "\x00" in name
    )


def _size_limit(max_voxels: int, files: int) -> int:
    return max_voxels * MAX_PIXEL_BYTES + files * HEADER_ALLOWANCE


def _members(archive: zipfile.ZipFile, max_voxels: int) -> list[tuple[int, zipfile.ZipInfo]]:
    infos = archive.infolist()
    if len(infos) > MAX_INSTANCES:
        raise _refuse_zip(f"{len(infos)} members; expected at most {MAX_INSTANCES} slices")
    members: list[tuple[int, zipfile.ZipInfo]] = []
    for number, info in enumerate(infos, start=1):
        if _unsafe_name(info.filename):
            raise _refuse_zip(
                f"member #{number} has an unsafe path (absolute, '..' or a drive); "
                "expected plain relative names"
            )
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if info.is_dir() or _SKIPPED_PARTS.intersection(parts):
            continue
        members.append((number, info))
    if not members:
        raise _refuse_zip("no files; expected the DICOM slices of one series")
    limit = _size_limit(max_voxels, len(members))
    declared = sum(info.file_size for _, info in members)
    if declared > limit:
        raise _refuse_zip(
            f"members inflate to {declared:,} bytes; expected at most {limit:,} for a series "
            f"of at most {max_voxels:,} voxels"
        )
    return members


@contextlib.contextmanager
def _member_errors(number: int) -> Iterator[None]:
    """Reading member ``number``: the zip module's many exception types, as one refusal."""
    try:
        yield
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError,
            ValueError, zlib.error):  # fmt: skip
        raise _refuse_zip(
            f"member #{number} cannot be extracted (corrupt or unsupported)"
        ) from None
    except RuntimeError:  # encrypted member
        raise _refuse_zip(f"member #{number} is encrypted; expected an unencrypted zip") from None


def _extract_member(
    archive: zipfile.ZipFile, number: int, info: zipfile.ZipInfo, target: Path
) -> None:
    try:
        with atomic_path(target, mode=JOB_FILE_MODE) as temporary, open(temporary, "xb") as sink:
            with _member_errors(number):
                source: IO[bytes] = archive.open(info)
            with source:
                while True:
                    with _member_errors(number):
                        chunk = source.read(_COPY_CHUNK)
                    if not chunk:
                        break
                    sink.write(chunk)
    except OSError as error:  # writing: reading errors are refusals by now
        raise storage_error("extract the DICOM zip", error) from None


def extract_series_zip(path: Path, out_dir: Path, max_voxels: int) -> int:
    """Extract the zip at ``path`` into the new directory ``out_dir``; returns the file count.

    File members become ``0001.dcm``, ``0002.dcm``, ... in zip order (directory entries and
    macOS metadata skipped), each written atomically with mode ``JOB_FILE_MODE``; ``out_dir``
    gets ``JOB_DIR_MODE`` and must not exist (its parent must). The zip itself is refused as
    described in the module docstring (``InvalidInputError``, naming members by position); the
    files' content is checked by :func:`read_series_dir`. A failed write raises
    :class:`~sitefit.job_store.JobStorageError`.
    """
    try:
        return _extract_series_zip(path, out_dir, max_voxels)
    except (SitefitError, MemoryError):
        raise
    except Exception as error:  # the zip parser raises many types for corrupt data
        kind = type(error).__name__
        raise _refuse_zip(f"cannot be read (corrupt or unsupported: {kind})") from None


def _extract_series_zip(path: Path, out_dir: Path, max_voxels: int) -> int:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        raise _refuse_zip("not a readable zip file") from None
    with archive:
        members = _members(archive, max_voxels)
        try:
            out_dir.mkdir()
            os.chmod(out_dir, JOB_DIR_MODE)  # exactly, whatever the umask: it is the job's
        except OSError as error:
            raise storage_error("create the DICOM directory", error) from None
        for count, (number, info) in enumerate(members, start=1):
            _extract_member(archive, number, info, out_dir / f"{count:04d}.dcm")
    return len(members)


# -- reading instances --------------------------------------------------------------------------


def _instances(directory: Path, max_voxels: int) -> list[Path]:
    """The instance files of ``directory`` in name order, after the count and size limits."""
    try:
        with os.scandir(directory) as entries:
            files = sorted(
                (entry.name, entry.stat(follow_symlinks=False).st_size)
                for entry in entries
                if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False)
            )
    except OSError as error:
        raise storage_error("read the DICOM series directory", error) from None
    if not files:
        raise _refuse("no files; expected the DICOM instances of one series")
    if len(files) > MAX_INSTANCES:
        raise _refuse(f"{len(files)} files; expected at most {MAX_INSTANCES} instances")
    limit = _size_limit(max_voxels, len(files))
    total = sum(size for _, size in files)
    if total > limit:
        raise _refuse(
            f"instances hold {total:,} bytes; expected at most {limit:,} for a series of at "
            f"most {max_voxels:,} voxels"
        )
    return [directory / name for name, _ in files]


def _dataset(path: Path, number: int, *, defer: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, defer_size=_DEFER_BYTES if defer else None)
    except InvalidDicomError:
        raise _refuse(f"instance #{number} is not a DICOM file") from None
    except OSError as error:
        raise storage_error("read a DICOM instance", error) from None
    except Exception:  # pydicom raises many types for malformed data
        raise _refuse(f"instance #{number} is a malformed DICOM file") from None


def _header_value(
    dataset: Dataset,
    keyword: str,
    number: int,
    convert: Callable[[Any], _T],
    expected: str,
    default: _T | None = None,
) -> _T:
    """Header element ``keyword`` of instance ``number``, converted by ``convert``.

    An absent or empty element gives ``default``, or is refused when there is none. Anything
    else that goes wrong reading or converting the value (pydicom converts raw values lazily, so
    ``dataset.get`` itself raises on malformed text) is refused with a one-line message naming
    the instance's position and the keyword only, never the value (it could hold PHI).
    """
    try:
        value = dataset.get(keyword)
        if not _empty(value):
            return convert(value)
    except Exception:  # pydicom and the conversions raise many types for malformed values
        raise _refuse(f"instance #{number} has no valid {keyword}; expected {expected}") from None
    if default is None:
        raise _refuse(f"instance #{number} has no {keyword}; expected {expected}")
    return default


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | bytes | list | MultiValue) and not value)


def _integer(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("not an integer")
    return int(value)


def _number(value: Any) -> float:
    result = float(value)
    if not math.isfinite(result):
        raise ValueError("not finite")
    return result


def _floats(dataset: Dataset, keyword: str, count: int, number: int) -> list[float]:
    def convert(value: Any) -> list[float]:
        values = [_number(v) for v in value]
        if len(values) != count:
            raise ValueError("wrong count")
        return values

    return _header_value(dataset, keyword, number, convert, f"{count} numbers")


def _uid_name(value: Any, unknown: str) -> str:
    # pydicom names a UID it does not know by the UID itself: never echo a header value
    name = getattr(value, "name", None)
    return str(name) if name and str(name) != str(value) else unknown


def _sop_class(dataset: Dataset) -> pydicom.uid.UID | None:
    """The SOP class, only to name an object: a missing or unreadable one is no reason to refuse."""
    try:
        value = dataset.get("SOPClassUID")
        return pydicom.uid.UID(str(value)) if value else None
    except Exception:  # pydicom converts raw values lazily and raises many types
        return None


def _is_enhanced(dataset: Dataset, sop_class: pydicom.uid.UID | None) -> bool:
    name = _uid_name(sop_class, "")
    return "Enhanced" in name or any(keyword in dataset for keyword in _FUNCTIONAL_GROUPS)


def _check_image_object(dataset: Dataset, number: int) -> None:
    """Refuse what is not a single-frame, grey-scale image object."""
    sop_class = _sop_class(dataset)
    kind = _uid_name(sop_class, _UNKNOWN_SOP_CLASS)
    if sop_class in _NON_IMAGE_CLASSES or not any(k in dataset for k in _PIXEL_KEYWORDS):
        raise _refuse(
            f"instance #{number} is a non-image DICOM object ({kind}); "
            "expected image slices of one series only"
        )
    if _is_enhanced(dataset, sop_class):
        raise _refuse(
            f"instance #{number} is an enhanced multi-frame object ({kind}), which is not "
            "supported; send the series as single-frame images (e.g. MR or CT Image Storage)"
        )
    if _header_value(dataset, "NumberOfFrames", number, _integer, "an integer", 1) > 1:
        raise _refuse(f"instance #{number} is a multi-frame object; expected single-frame slices")
    if _header_value(dataset, "SamplesPerPixel", number, _integer, "an integer", 1) != 1:
        raise _refuse(f"instance #{number} is a colour image; expected grey-scale slices")


def _slice_header(dataset: Dataset, number: int, path: Path) -> _Slice:
    _check_image_object(dataset, number)
    rows = _header_value(dataset, "Rows", number, _integer, "an integer")
    columns = _header_value(dataset, "Columns", number, _integer, "an integer")
    if rows < MIN_SPATIAL_SIZE or columns < MIN_SPATIAL_SIZE:
        raise _refuse(f"instance #{number} has a {rows}x{columns} image; expected at least 2x2")
    orientation = np.array(_floats(dataset, "ImageOrientationPatient", 6, number))
    row_dir, column_dir = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(column_dir) - 1) > 1e-3
        or abs(float(row_dir @ column_dir)) > 1e-3
    ):
        raise _refuse(f"instance #{number}: ImageOrientationPatient is not two orthonormal vectors")
    spacing = _floats(dataset, "PixelSpacing", 2, number)
    if min(spacing) <= 0:
        raise _refuse(f"instance #{number}: PixelSpacing must be positive")
    # required of MR and CT images, and the DICOM SEG of the result is placed in this frame
    _header_value(dataset, "FrameOfReferenceUID", number, str, "a UID (the frame of reference)")
    return _Slice(
        number=number,
        path=path,
        position=np.array(_floats(dataset, "ImagePositionPatient", 3, number)),
        orientation=orientation,
        spacing=(spacing[0], spacing[1]),
        shape=(rows, columns),
        series=_header_value(dataset, "SeriesInstanceUID", number, str, "a UID", ""),
        study=_header_value(dataset, "StudyInstanceUID", number, str, "a UID", ""),
        expected=_header_value(dataset, "ImagesInAcquisition", number, _integer, "an integer", 0)
        or None,
    )


def _sorted_series(slices: list[_Slice], max_voxels: int) -> list[_Slice]:
    """Slices in order along the normal; checks the geometry."""
    first = slices[0]
    for other in slices[1:]:
        if other.shape != first.shape:
            raise _refuse(
                f"instance #{other.number} has another image size than instance #{first.number}"
            )
        if np.max(np.abs(other.orientation - first.orientation)) > _ORIENTATION_TOLERANCE:
            raise _refuse(f"instance #{other.number} has another orientation; expected one plane")
        if np.max(np.abs(np.subtract(other.spacing, first.spacing))) > 1e-4:
            raise _refuse(f"instance #{other.number} has another pixel spacing")
    if len(slices) < MIN_SPATIAL_SIZE:
        raise _refuse(f"{len(slices)} slice; expected at least {MIN_SPATIAL_SIZE}")
    stated = {item.expected for item in slices if item.expected is not None}
    if len(stated) == 1 and (expected := stated.pop()) > len(slices):
        # a series cut off at its start or end is evenly spaced: only its count tells
        raise _refuse(
            f"series is incomplete: {len(slices)} of the {expected} images its instances "
            "state (ImagesInAcquisition); expected the whole series"
        )
    voxels = len(slices) * first.shape[0] * first.shape[1]
    if voxels > max_voxels:
        raise _refuse(f"series has {voxels:,} voxels; expected at most {max_voxels:,}")
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    ordered = sorted(slices, key=lambda s: float(s.position @ normal))
    distances = np.array([float(s.position @ normal) for s in ordered])
    gaps = np.diff(distances)
    if np.min(gaps) < _POSITION_TOLERANCE_MM:
        raise _refuse("two slices share a position; expected one slice per position")
    if (np.max(gaps) - np.min(gaps)) > _SPACING_TOLERANCE * float(np.mean(gaps)):
        raise _refuse(
            f"slice spacing varies from {np.min(gaps):.3g} to {np.max(gaps):.3g} mm; "
            "expected evenly spaced slices (missing slices?)"
        )
    for item, distance in zip(ordered[1:], distances[1:] - distances[0], strict=True):
        offset = item.position - ordered[0].position
        off_normal = float(np.linalg.norm(offset - distance * normal))
        if off_normal > _TILT_TOLERANCE * distance + _TILT_TOLERANCE_MM:
            raise _refuse(
                "slices are not stacked along their normal (gantry tilt or shifted slices); "
                "expected a stack of parallel slices without tilt"
            )
    return ordered


def _pixels(dataset: Dataset, number: int, shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    try:
        stored = np.asarray(dataset.pixel_array)
    except NotImplementedError:  # pydicom: no decoder for this transfer syntax
        name = _uid_name(syntax, _UNKNOWN_SYNTAX)
        raise _refuse(
            f"instance #{number}: no decoder for its pixel data's transfer syntax ({name}); "
            "expected uncompressed, JPEG, JPEG-LS, JPEG 2000 or RLE pixel data"
        ) from None
    except Exception:  # corrupt or truncated pixel data, and the decoders' own failures
        name = _uid_name(syntax, _UNKNOWN_SYNTAX)
        raise _refuse(
            f"instance #{number}: pixel data cannot be decoded ({name}; corrupt or unsupported)"
        ) from None
    if stored.shape != shape:
        raise _refuse(f"instance #{number}: pixel data does not match Rows and Columns")
    slope = _header_value(dataset, "RescaleSlope", number, _number, "a number", 1.0) or 1.0
    intercept = _header_value(dataset, "RescaleIntercept", number, _number, "a number", 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        values = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if not np.isfinite(values).all():
        raise _refuse(f"instance #{number}: rescaled intensities are not finite")
    return values


def read_series_dir(directory: Path, max_voxels: int) -> DicomVolume:
    """Read the instance files in ``directory`` as one DICOM series (see the module docstring).

    Every regular file whose name does not start with "." is an instance, in any order and
    under any name; ``instance #N`` in messages is the Nth by name. Anything wrong with the
    files is an :class:`InvalidInputError`: the DICOM parsers raise many exception types for
    corrupt data, and the instances are untrusted input. Messages name an exception's type
    only, never its text, which may quote header values (PHI). A directory that cannot be
    listed or read raises :class:`~sitefit.job_store.JobStorageError`.
    """
    try:
        return _read_series_dir(directory, max_voxels)
    except (SitefitError, MemoryError):
        raise
    except Exception as error:
        kind = type(error).__name__
        raise _refuse(f"cannot be read (corrupt or unsupported: {kind})") from None


def _headers(directory: Path, max_voxels: int) -> list[_Slice]:
    """Every distinct instance's slice header (pixel data not read), checked one by one."""
    headers: list[_Slice] = []
    seen: set[str] = set()
    voxels = 0
    for number, path in enumerate(_instances(directory, max_voxels), start=1):
        dataset = _dataset(path, number, defer=True)
        uid = _header_value(dataset, "SOPInstanceUID", number, str, "a UID", "")
        if uid and uid in seen:
            continue  # the same instance again (a PACS may re-send): the first one counts
        seen.add(uid)
        header = _slice_header(dataset, number, path)
        voxels += header.shape[0] * header.shape[1]
        if voxels > max_voxels:
            raise _refuse(f"series has more than {max_voxels:,} voxels; refused")
        if headers and header.series != headers[0].series:
            raise _refuse("holds more than one series; expected exactly one series")
        headers.append(header)
    return headers


def _read_series_dir(directory: Path, max_voxels: int) -> DicomVolume:
    ordered = _sorted_series(_headers(directory, max_voxels), max_voxels)
    rows, columns = ordered[0].shape
    data = np.empty((columns, rows, len(ordered)), np.float32)
    for k, item in enumerate(ordered):
        dataset = _dataset(item.path, item.number, defer=False)
        data[:, :, k] = _pixels(dataset, item.number, item.shape).T
    check_intensities(data, SERIES)
    first, last = ordered[0], ordered[-1]
    row_spacing, column_spacing = first.spacing
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = first.orientation[:3] * column_spacing
    affine_lps[:3, 1] = first.orientation[3:] * row_spacing
    affine_lps[:3, 2] = (last.position - first.position) / (len(ordered) - 1)
    affine_lps[:3, 3] = first.position
    header = _first_header(first)
    return DicomVolume(
        data=data,
        affine=_LPS_TO_RAS @ affine_lps,
        slices=len(ordered),
        study_uid=first.study,
        series_uid=first.series,
        header=header,
    )


def _first_header(first: _Slice) -> Dataset:
    try:
        return pydicom.dcmread(first.path, stop_before_pixels=True)
    except OSError as error:
        raise storage_error("read a DICOM instance", error) from None


def read_series_zip(path: Path, max_voxels: int) -> DicomVolume:
    """Read the zip at ``path`` as one DICOM series: :func:`extract_series_zip` into a private
    temporary directory, then :func:`read_series_dir` (see both)."""
    with tempfile.TemporaryDirectory(prefix="sitefit-dicom-") as temporary:
        out_dir = Path(temporary) / "dicom"
        extract_series_zip(path, out_dir, max_voxels)
        return read_series_dir(out_dir, max_voxels)


def _save(volume: DicomVolume, out: Path) -> None:
    image = nib.Nifti1Image(volume.data, volume.affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    try:
        save_image_atomic(image, out, mode=JOB_FILE_MODE)
    except OSError as error:
        raise storage_error("store the converted DICOM series", error) from None


def series_dir_to_nifti(directory: Path, out: Path, max_voxels: int) -> DicomVolume:
    """Convert the DICOM series in ``directory`` to a NIfTI-1 file at ``out`` (qform/sform:
    scanner, mm); returns the volume read.

    ``out`` is written atomically (complete or absent) with mode ``JOB_FILE_MODE`` (it is a
    job's scan); a failed write (full disk, missing or read-only directory) raises
    :class:`~sitefit.job_store.JobStorageError`.
    """
    volume = read_series_dir(directory, max_voxels)
    _save(volume, out)
    return volume


def series_zip_to_nifti(path: Path, out: Path, max_voxels: int) -> DicomVolume:
    """Convert a DICOM series zip to a NIfTI-1 file at ``out``, as :func:`series_dir_to_nifti`."""
    volume = read_series_zip(path, max_voxels)
    _save(volume, out)
    return volume


__all__ = [
    "MAX_INSTANCES",
    "DicomVolume",
    "extract_series_zip",
    "read_series_dir",
    "read_series_zip",
    "series_dir_to_nifti",
    "series_zip_to_nifti",
]
