"""A zip of one DICOM image series -> a 3D volume -> a NIfTI file the engine reads (no torch).

What is accepted: a zip whose members are DICOM image slices (single-frame, one sample per
pixel, uncompressed or any transfer syntax pydicom can decode without plugins) of exactly one
series. Directory entries and macOS metadata (``__MACOSX/``, ``.DS_Store``) are skipped.

What is refused, each with a one-line message (``InvalidInputError``) that names members by
their position in the zip only, never by name, UID or any header text (no PHI): member names
that could escape a directory (absolute, ``..``, drive letters), more than ``max_members``
members, more uncompressed bytes than the volume limit allows (the zip-bomb guard: zipfile
never inflates a member past its declared size, and the declared sizes are checked first),
non-DICOM members, DICOM objects without image data (structured reports, presentation states,
...), several series, inconsistent slice geometry, duplicate or unevenly spaced slices, and
more voxels than ``max_voxels``.

Geometry: slices are sorted by their position along the slice normal (the cross product of
the row and column direction cosines of ImageOrientationPatient); voxel ``(i, j, k)`` is
column ``i``, row ``j`` of slice ``k``, so the affine's columns are the row direction times the
column spacing (PixelSpacing[1]), the column direction times the row spacing (PixelSpacing[0]),
the step between the first and last slice positions divided by ``n - 1``, and the first
slice's ImagePositionPatient; DICOM's LPS patient space is turned into NIfTI's RAS by negating
x and y. Intensities are ``stored * RescaleSlope + RescaleIntercept`` as float32.

Nothing here logs or warns header text either: pydicom's reading validation, which quotes
non-conforming values in its warnings and log records, is switched off (see below).
"""

from __future__ import annotations

import io
import logging
import math
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from sitefit.defaults import MIN_SPATIAL_SIZE
from sitefit.exceptions import InvalidInputError, SitefitError
from sitefit.job_store import JOB_FILE_MODE, storage_error
from sitefit.volume import save_image_atomic
from sitefit.volume.header import nib

MAX_MEMBERS = 4096
HEADER_ALLOWANCE = 1024 * 1024  # bytes of DICOM header allowed per slice besides pixel data
MAX_PIXEL_BYTES = 4  # bytes per stored sample, at most
_POSITION_TOLERANCE_MM = 1e-3
_SPACING_TOLERANCE = 0.01  # relative difference between slice gaps
_ORIENTATION_TOLERANCE = 1e-4
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SKIPPED_PARTS = {"__MACOSX", ".DS_Store"}
_UNKNOWN_SOP_CLASS = "unknown SOP class"

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
    """The series as a float32 volume (column, row, slice) and its RAS voxel-to-world affine."""

    data: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    slices: int


@dataclass(frozen=True)
class _Slice:
    member: int  # position in the zip, for messages
    info: zipfile.ZipInfo
    position: npt.NDArray[np.float64]
    orientation: npt.NDArray[np.float64]
    spacing: tuple[float, float]
    shape: tuple[int, int]
    series: str


def _refuse(message: str) -> InvalidInputError:
    return InvalidInputError(f"DICOM zip: {message}")


def _unsafe_name(name: str) -> bool:
    normalized = name.replace("\\", "/")
    parts = PurePosixPath(normalized).parts
    return (
        normalized.startswith("/")
        or ".." in parts
        or (len(normalized) > 1 and normalized[1] == ":")
        or "\x00" in name
    )


def _members(archive: zipfile.ZipFile, max_voxels: int) -> list[tuple[int, zipfile.ZipInfo]]:
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise _refuse(f"{len(infos)} members; expected at most {MAX_MEMBERS} slices")
    members: list[tuple[int, zipfile.ZipInfo]] = []
    for number, info in enumerate(infos, start=1):
        if _unsafe_name(info.filename):
            raise _refuse(
                f"member #{number} has an unsafe path (absolute, '..' or a drive); "
                "expected plain relative names"
            )
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if info.is_dir() or _SKIPPED_PARTS.intersection(parts):
            continue
        members.append((number, info))
    if not members:
        raise _refuse("no files; expected the DICOM slices of one series")
    limit = max_voxels * MAX_PIXEL_BYTES + len(members) * HEADER_ALLOWANCE
    declared = sum(info.file_size for _, info in members)
    if declared > limit:
        raise _refuse(
            f"members inflate to {declared:,} bytes; expected at most {limit:,} for a series "
            f"of at most {max_voxels:,} voxels"
        )
    return members


def _read_member(archive: zipfile.ZipFile, number: int, info: zipfile.ZipInfo) -> bytes:
    try:
        with archive.open(info) as handle:
            return handle.read(info.file_size + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError,
            ValueError, zlib.error):  # fmt: skip
        raise _refuse(f"member #{number} cannot be extracted (corrupt or unsupported)") from None
    except RuntimeError:  # encrypted member
        raise _refuse(f"member #{number} is encrypted; expected an unencrypted zip") from None


def _dataset(data: bytes, number: int) -> Any:
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        raise _refuse(f"member #{number} is not a DICOM file") from None
    except Exception:  # pydicom raises many types for malformed data
        raise _refuse(f"member #{number} is a malformed DICOM file") from None


def _header_value(
    dataset: Any,
    keyword: str,
    number: int,
    convert: Callable[[Any], _T],
    expected: str,
    default: _T | None = None,
) -> _T:
    """Header element ``keyword`` of member ``number``, converted by ``convert``.

    An absent or empty element gives ``default``, or is refused when there is none. Anything
    else that goes wrong reading or converting the value (pydicom converts raw values lazily, so
    ``dataset.get`` itself raises on malformed text) is refused with a one-line message naming
    the member's position and the keyword only, never the value (it could hold PHI).
    """
    try:
        value = dataset.get(keyword)
        if not _empty(value):
            return convert(value)
    except Exception:  # pydicom and the conversions raise many types for malformed values
        raise _refuse(f"member #{number} has no valid {keyword}; expected {expected}") from None
    if default is None:
        raise _refuse(f"member #{number} has no {keyword}; expected {expected}")
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


def _floats(dataset: Any, keyword: str, count: int, number: int) -> list[float]:
    def convert(value: Any) -> list[float]:
        values = [_number(v) for v in value]
        if len(values) != count:
            raise ValueError("wrong count")
        return values

    return _header_value(dataset, keyword, number, convert, f"{count} numbers")


def _sop_class_name(value: Any) -> str:
    # pydicom names a UID it does not know by the UID itself: never echo a header value
    name = getattr(value, "name", None)
    return str(name) if name and str(name) != str(value) else _UNKNOWN_SOP_CLASS


def _slice_header(dataset: Any, number: int, info: zipfile.ZipInfo) -> _Slice:
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        kind = _header_value(
            dataset, "SOPClassUID", number, _sop_class_name, "a UID", _UNKNOWN_SOP_CLASS
        )
        raise _refuse(
            f"member #{number} is a non-image DICOM object ({kind}); "
            "expected image slices of one series only"
        )
    if _header_value(dataset, "NumberOfFrames", number, _integer, "an integer", 1) > 1:
        raise _refuse(f"member #{number} is a multi-frame object; expected single-frame slices")
    if _header_value(dataset, "SamplesPerPixel", number, _integer, "an integer", 1) != 1:
        raise _refuse(f"member #{number} is a colour image; expected grey-scale slices")
    rows = _header_value(dataset, "Rows", number, _integer, "an integer")
    columns = _header_value(dataset, "Columns", number, _integer, "an integer")
    if rows < MIN_SPATIAL_SIZE or columns < MIN_SPATIAL_SIZE:
        raise _refuse(f"member #{number} has a {rows}x{columns} image; expected at least 2x2")
    orientation = np.array(_floats(dataset, "ImageOrientationPatient", 6, number))
    row_dir, column_dir = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(column_dir) - 1) > 1e-3
        or abs(float(row_dir @ column_dir)) > 1e-3
    ):
        raise _refuse(f"member #{number}: ImageOrientationPatient is not two orthonormal vectors")
    spacing = _floats(dataset, "PixelSpacing", 2, number)
    if min(spacing) <= 0:
        raise _refuse(f"member #{number}: PixelSpacing must be positive")
    return _Slice(
        member=number,
        info=info,
        position=np.array(_floats(dataset, "ImagePositionPatient", 3, number)),
        orientation=orientation,
        spacing=(spacing[0], spacing[1]),
        shape=(rows, columns),
        series=_header_value(dataset, "SeriesInstanceUID", number, str, "a UID", ""),
    )


def _sorted_series(slices: list[_Slice], max_voxels: int) -> tuple[list[_Slice], float]:
    """Slices in order along the normal, and the step between them (mm); checks the geometry."""
    first = slices[0]
    for other in slices[1:]:
        if other.shape != first.shape:
            raise _refuse(f"member #{other.member} has another image size than member #1's")
        if np.max(np.abs(other.orientation - first.orientation)) > _ORIENTATION_TOLERANCE:
            raise _refuse(f"member #{other.member} has another orientation; expected one plane")
        if np.max(np.abs(np.subtract(other.spacing, first.spacing))) > 1e-4:
            raise _refuse(f"member #{other.member} has another pixel spacing")
    if len(slices) < MIN_SPATIAL_SIZE:
        raise _refuse(f"{len(slices)} slice; expected at least {MIN_SPATIAL_SIZE}")
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
    return ordered, float(np.mean(gaps))


def _pixels(dataset: Any, number: int, shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    try:
        stored = np.asarray(dataset.pixel_array)
    except Exception:  # missing decoder plugins, truncated pixel data, ...
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown transfer syntax")
        raise _refuse(f"member #{number}: pixel data cannot be decoded ({name})") from None
    if stored.shape != shape:
        raise _refuse(f"member #{number}: pixel data does not match Rows and Columns")
    slope = _header_value(dataset, "RescaleSlope", number, _number, "a number", 1.0) or 1.0
    intercept = _header_value(dataset, "RescaleIntercept", number, _number, "a number", 0.0)
    values = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if not np.isfinite(values).all():
        raise _refuse(f"member #{number}: rescaled intensities are not finite")
    return values


def read_series_zip(path: Path, max_voxels: int) -> DicomVolume:
    """Read the zip at ``path`` as one DICOM series (see the module docstring).

    Anything wrong with the file is an :class:`InvalidInputError`: the zip and DICOM parsers
    raise many exception types for corrupt data, and an upload is untrusted input. Messages
    name the exception's type only, never its text, which may quote header values (PHI).
    """
    try:
        return _read_series_zip(path, max_voxels)
    except (SitefitError, MemoryError):
        raise
    except Exception as error:
        kind = type(error).__name__
        raise _refuse(f"cannot be read (corrupt or unsupported: {kind})") from None


def _read_series_zip(path: Path, max_voxels: int) -> DicomVolume:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        raise _refuse("not a readable zip file") from None
    headers: list[_Slice] = []
    pixels: dict[int, npt.NDArray[np.float32]] = {}
    voxels = 0
    with archive:
        for number, info in _members(archive, max_voxels):
            dataset = _dataset(_read_member(archive, number, info), number)
            header = _slice_header(dataset, number, info)
            voxels += header.shape[0] * header.shape[1]
            if voxels > max_voxels:
                raise _refuse(f"series has more than {max_voxels:,} voxels; refused")
            if headers and header.series != headers[0].series:
                raise _refuse("holds more than one series; expected exactly one series per upload")
            headers.append(header)
            pixels[number] = _pixels(dataset, number, header.shape)
    ordered, step = _sorted_series(headers, max_voxels)
    rows, columns = ordered[0].shape
    data = np.empty((columns, rows, len(ordered)), np.float32)
    for k, item in enumerate(ordered):
        data[:, :, k] = pixels.pop(item.member).T
    first, last = ordered[0], ordered[-1]
    row_spacing, column_spacing = first.spacing
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = first.orientation[:3] * column_spacing
    affine_lps[:3, 1] = first.orientation[3:] * row_spacing
    affine_lps[:3, 2] = (last.position - first.position) / (len(ordered) - 1)
    affine_lps[:3, 3] = first.position
    if abs(np.linalg.norm(affine_lps[:3, 2]) - step) > 0.05 * step:  # gantry tilt beyond 18°
        raise _refuse("slices are not stacked along their normal (tilted gantry?)")
    return DicomVolume(data=data, affine=_LPS_TO_RAS @ affine_lps, slices=len(ordered))


def series_zip_to_nifti(path: Path, out: Path, max_voxels: int) -> DicomVolume:
    """Convert a DICOM series zip to a NIfTI-1 file at ``out`` (qform/sform: scanner, mm).

    ``out`` is written atomically (complete or absent) with mode ``JOB_FILE_MODE`` (it is a
    job's scan); a failed write (full disk, missing or read-only directory) raises
    :class:`~sitefit.job_store.JobStorageError`.
    """
    volume = read_series_zip(path, max_voxels)
    image = nib.Nifti1Image(volume.data, volume.affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    try:
        save_image_atomic(image, out, mode=JOB_FILE_MODE)
    except OSError as error:
        raise storage_error("store the converted DICOM series", error) from None
    return volume


__all__ = ["DicomVolume", "read_series_zip", "series_zip_to_nifti"]
