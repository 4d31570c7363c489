"""NIfTI header parsing and validation: everything that can be checked before voxel data.

The header is parsed from its first 348 (NIfTI-1) or 540 (NIfTI-2) bytes only: extensions
are never read, so neither a huge extension nor a gzip bomb behind the header is ever
decompressed. Canonical space is the
RAS+ voxel order closest to the file's axes, as in ``nib.as_closest_canonical``: axes are
permuted and flipped, never resampled, so obliquity stays in the affine and the way back to
the file's voxel order is exact.
"""

from __future__ import annotations

import gzip
import io
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel
import nibabel.orientations
import numpy as np
import numpy.typing as npt
from nibabel.spatialimages import HeaderDataError

from sitefit.defaults import MIN_SPATIAL_SIZE
from sitefit.exceptions import VolumeContentError, VolumeReadError

FloatArray = npt.NDArray[np.float64]

# nibabel is only partly annotated: its calls go through these Any-typed handles.
nib: Any = nibabel
orientations: Any = nibabel.orientations

MAX_DATA_OFFSET = 64 * 2**20
"""Largest accepted ``vox_offset`` (header plus extensions) in bytes."""
_NIFTI1_HEADER_BYTES = 348
_NIFTI2_HEADER_BYTES = 540
_NIFTI2_MAGIC = b"n+2\x00\r\n\x1a\n"
_GZIP_MAGIC = b"\x1f\x8b"
_CANONICAL_ORNT = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
_XYZ_UNIT_TO_MM = {1: 1000.0, 2: 1.0, 3: 0.001}  # NIfTI codes: meter, mm, micron
# the header's free-text fields (data_type and db_name: NIfTI-1's unused ANALYZE ones)
_PHI_FIELDS = ("descrip", "aux_file", "db_name", "data_type", "intent_name")


@dataclass(frozen=True, eq=False)
class SourceGeometry:
    """What is needed to map a canonical array back onto the file it came from.

    ``shape`` and ``affine`` are in the file's voxel order (a trailing singleton 4th dimension
    dropped); ``orientation`` is nibabel's orientation of the file's axes relative to RAS+
    (``io_orientation(affine)``). ``header`` is a NIfTI-1 or NIfTI-2 header (as the file) with
    the exact qform/sform
    (quaternion, offsets, srows, codes), pixdim and units, with free-text fields (descrip,
    aux_file, db_name, intent_name) cleared and no extensions; treat it as read-only.
    """

    name: str
    shape: tuple[int, int, int]
    affine: FloatArray
    orientation: FloatArray
    header: Any
    file_shape: tuple[int, ...]

    @property
    def n_voxels(self) -> int:
        """Number of voxels of the image."""
        return math.prod(self.shape)

    @property
    def qform_code(self) -> int:
        """The file's qform code (0 unknown, 1 scanner, 2 aligned, ...)."""
        return int(self.header["qform_code"])

    @property
    def sform_code(self) -> int:
        """The file's sform code."""
        return int(self.header["sform_code"])

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Orientation of the file's voxel axes, e.g. ``("P", "I", "R")``."""
        codes = orientations.aff2axcodes(self.affine)
        return (str(codes[0]), str(codes[1]), str(codes[2]))

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """Shape of the image in canonical (RAS+) voxel order."""
        axes = self.orientation[:, 0].astype(int)
        shape = [0, 0, 0]
        for source_axis, target_axis in enumerate(axes):
            shape[target_axis] = self.shape[source_axis]
        return (shape[0], shape[1], shape[2])

    @property
    def canonical_affine(self) -> FloatArray:
        """Voxel-to-world (mm) affine of the canonical array."""
        return np.asarray(
            self.affine @ orientations.inv_ornt_aff(self.orientation, self.shape), np.float64
        )

    @property
    def to_source_orientation(self) -> FloatArray:
        """Orientation transform from the canonical array back to the file's voxel order."""
        return np.asarray(
            orientations.ornt_transform(_CANONICAL_ORNT, self.orientation), np.float64
        )

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along the canonical axes in mm (affine column norms, unit-corrected)."""
        norms = np.sqrt(np.sum(self.canonical_affine[:3, :3] ** 2, axis=0))
        factor = _XYZ_UNIT_TO_MM.get(int(self.header["xyzt_units"]) % 8, 1.0)
        return (float(norms[0]) * factor, float(norms[1]) * factor, float(norms[2]) * factor)


def nifti_suffix(path: Path) -> str:
    """Return ``".nii"`` or ``".nii.gz"`` (matched case-insensitively), else VolumeReadError."""
    lower = path.name.lower()
    if lower.endswith(".nii.gz"):
        return ".nii.gz"
    if lower.endswith(".nii"):
        return ".nii"
    raise VolumeReadError(
        f"{path.name}: unsupported file type; expected a NIfTI file ending in .nii or .nii.gz"
    )


def open_volume(path: Path) -> io.BufferedIOBase:
    """Open a ``.nii`` or ``.nii.gz`` file for binary reading (decompressing transparently)."""
    compressed = nifti_suffix(path) == ".nii.gz"
    name = path.name
    try:
        with path.open("rb") as probe:
            magic = probe.read(2)
        if magic == _GZIP_MAGIC and not compressed:
            raise VolumeReadError(
                f"{name}: file is gzip-compressed; expected the name to end in .nii.gz"
            )
        if compressed and magic != _GZIP_MAGIC and len(magic) > 0:
            raise VolumeReadError(
                f"{name}: file is not gzip-compressed; expected a gzip-compressed NIfTI for "
                ".nii.gz (or rename it to .nii)"
            )
        if compressed:
            return gzip.open(path, "rb")
        return path.open("rb")
    except FileNotFoundError:
        raise VolumeReadError(f"{name}: file not found; expected an existing NIfTI file") from None
    except IsADirectoryError:
        raise VolumeReadError(f"{name}: is a directory; expected a NIfTI file") from None
    except PermissionError:
        raise VolumeReadError(f"{name}: permission denied; expected a readable file") from None
    except OSError as exc:
        raise VolumeReadError(
            f"{name}: cannot be read ({type(exc).__name__}); expected a readable NIfTI file"
        ) from None


def _read_header_block(path: Path) -> bytes:
    name = path.name
    try:
        with open_volume(path) as stream:
            block = stream.read(_NIFTI2_HEADER_BYTES)
    except (EOFError, zlib.error, OSError) as exc:
        raise VolumeReadError(
            f"{name}: header cannot be read, the file is truncated or corrupt "
            f"({type(exc).__name__}); expected a complete NIfTI file"
        ) from None
    if len(block) == 0:
        raise VolumeReadError(f"{name}: file is empty; expected a NIfTI image")
    return block


def _parse_header(block: bytes, name: str) -> Any:
    sizes = {int.from_bytes(block[:4], "little"), int.from_bytes(block[:4], "big")}
    if len(block) >= 4 and _NIFTI2_HEADER_BYTES in sizes:
        size, magic, single = _NIFTI2_HEADER_BYTES, block[4:12], _NIFTI2_MAGIC
        header_class = nib.Nifti2Header
    elif len(block) >= 4 and _NIFTI1_HEADER_BYTES in sizes:
        size, magic, single = _NIFTI1_HEADER_BYTES, block[344:348], b"n+1\x00"
        header_class = nib.Nifti1Header
    else:
        raise VolumeReadError(f"{name}: not a NIfTI file (no NIfTI header); expected NIfTI-1/2")
    if len(block) < size:
        raise VolumeReadError(
            f"{name}: file is truncated ({len(block)} bytes); expected a {size}-byte NIfTI header"
        )
    if magic[:3] in (b"ni1", b"ni2"):
        raise VolumeReadError(
            f"{name}: header of a .hdr/.img pair; expected a single-file NIfTI (.nii/.nii.gz)"
        )
    if magic != single:
        raise VolumeReadError(
            f"{name}: not a NIfTI file (Analyze or unknown header magic); expected NIfTI-1/2"
        )
    try:
        return header_class(binaryblock=block[:size], check=True)
    except (HeaderDataError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VolumeReadError(
            f"{name}: invalid NIfTI header ({reason}); expected a valid NIfTI image"
        ) from None


def _spatial_shape(header: Any, name: str) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    dim = [int(d) for d in header["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise VolumeReadError(
            f"{name}: invalid NIfTI header (dim[0]={ndim}); expected 1 to 7 dimensions"
        )
    file_shape = tuple(dim[1 : ndim + 1])
    if any(size < 1 for size in file_shape):
        raise VolumeContentError(
            f"{name}: invalid image shape {file_shape}; expected positive sizes"
        )
    if ndim < 3 or any(size != 1 for size in file_shape[3:]):
        raise VolumeContentError(f"{name}: expected a 3D image, got shape {file_shape} ({ndim}D)")
    return (file_shape[0], file_shape[1], file_shape[2]), file_shape


def _geometry(header: Any, name: str) -> tuple[FloatArray, FloatArray]:
    try:
        affine = np.asarray(header.get_best_affine(), np.float64)
    except (HeaderDataError, ValueError, np.linalg.LinAlgError):
        raise VolumeContentError(
            f"{name}: invalid orientation (qform/sform); expected a valid voxel-to-world mapping"
        ) from None
    if not np.isfinite(affine).all():
        raise VolumeContentError(
            f"{name}: orientation (qform/sform) has non-finite values; expected finite numbers"
        )
    spacing = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    if not (spacing > 0).all():
        shown = tuple(round(float(s), 6) for s in spacing)
        raise VolumeContentError(
            f"{name}: voxel spacing {shown} mm; expected a positive spacing along every axis"
        )
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(spacing)):
        raise VolumeContentError(
            f"{name}: degenerate orientation (voxel axes are not independent); "
            "expected an invertible affine"
        )
    return affine, np.asarray(orientations.io_orientation(affine), np.float64)


def inspect_header(path: Path, max_voxels: int | None) -> SourceGeometry:
    """Validate everything but the voxel data; ``max_voxels=None`` skips the size limit."""
    name = path.name
    nifti_suffix(path)
    header = _parse_header(_read_header_block(path), name)
    shape, file_shape = _spatial_shape(header, name)
    n_voxels = math.prod(file_shape)
    if max_voxels is not None and n_voxels > max_voxels:
        raise VolumeContentError(
            f"{name}: image of shape {file_shape} has {n_voxels:,} voxels; "
            f"expected at most {max_voxels:,}"
        )
    if min(shape) < MIN_SPATIAL_SIZE:
        raise VolumeContentError(
            f"{name}: image of shape {shape} is too thin; expected at least "
            f"{MIN_SPATIAL_SIZE} voxels along every spatial axis"
        )
    dtype = header.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields is not None:
        label = header.get_value_label("datatype")
        raise VolumeContentError(
            f"{name}: unsupported voxel type {label}; expected real scalar voxels (int or float)"
        )
    try:
        header.get_slope_inter()
    except HeaderDataError:
        raise VolumeContentError(
            f"{name}: invalid intensity scaling (scl_slope/scl_inter); expected finite values"
        ) from None
    offset = int(header.get_data_offset())
    minimum = int(header.single_vox_offset)
    if not minimum <= offset <= MAX_DATA_OFFSET:
        raise VolumeReadError(
            f"{name}: voxel data offset {offset} is out of range; expected "
            f"{minimum} to {MAX_DATA_OFFSET} bytes"
        )
    if nifti_suffix(path) == ".nii":
        needed = offset + n_voxels * dtype.itemsize
        size = path.stat().st_size
        if size < needed:
            raise VolumeReadError(
                f"{name}: file is truncated ({size:,} bytes); expected at least {needed:,} "
                "bytes of header and voxel data"
            )
    affine, orientation = _geometry(header, name)
    affine.setflags(write=False)
    orientation.setflags(write=False)
    for field in _PHI_FIELDS:
        if field in header:
            header[field] = b""
    return SourceGeometry(
        name=name,
        shape=shape,
        affine=affine,
        orientation=orientation,
        header=header,
        file_shape=file_shape,
    )


def read_header(path: Path, max_voxels: int) -> SourceGeometry:
    """Validate a scan's header without reading voxel data (what the server checks on upload).

    Checks the suffix (``.nii``/``.nii.gz``), that the file is a readable single-file NIfTI-1
    or NIfTI-2, its rank (3D; a 4D whose trailing dimensions are 1 counts as 3D), its
    dimensions (at least ``MIN_SPATIAL_SIZE`` voxels per axis), ``voxel count <= max_voxels``,
    a real scalar voxel type, finite scaling, a valid and non-degenerate affine (positive
    spacing) and, for uncompressed files, that the file is long enough. Truncation inside a
    ``.nii.gz`` data stream is only detected by :func:`load_scan`.

    Raises VolumeReadError (missing, unreadable, not NIfTI, wrong suffix, truncated) or
    VolumeContentError (wrong rank, too large, unsupported content).
    """
    return inspect_header(path, max_voxels)
