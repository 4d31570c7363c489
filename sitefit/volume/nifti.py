"""Reading scans and label maps into canonical order, and writing masks back onto the input."""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sitefit.durable import atomic_path
from sitefit.exceptions import InvalidInputError, VolumeContentError, VolumeReadError
from sitefit.volume.header import (
    FloatArray,
    SourceGeometry,
    inspect_header,
    nib,
    nifti_suffix,
    open_volume,
    orientations,
    read_header,
)

AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference between two affines' entries (mm) that still counts as the same grid."""
_READ_CHUNK = 64 * 2**20
_TRAILING_CHUNK = 2**20
_MAX_TRAILING_BYTES = 16 * 2**20


@dataclass(frozen=True, eq=False)
class Scan:
    """A scan in canonical (RAS+) voxel order, ready for preprocessing.

    ``data`` is float32, 3D, finite and not constant: the stored values with the file's
    ``scl_slope``/``scl_inter`` applied, not normalised. ``spacing_mm`` is the voxel size along
    ``data``'s axes. ``source`` maps canonical arrays back onto the file's grid.
    """

    data: npt.NDArray[np.float32]
    spacing_mm: tuple[float, float, float]
    source: SourceGeometry

    @property
    def affine(self) -> FloatArray:
        """Voxel-to-world (mm) affine of ``data`` (canonical voxel order)."""
        return self.source.canonical_affine

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of ``data``."""
        return self.source.canonical_shape


def _read_voxels(path: Path, source: SourceGeometry) -> npt.NDArray[Any]:
    """Read the stored voxels (file dtype, unscaled) in the file's voxel order, as 3D."""
    name = path.name
    header = source.header
    voxels = np.empty(math.prod(source.file_shape), dtype=header.get_data_dtype())
    buffer = voxels.view(np.uint8).data
    total = buffer.nbytes
    done = 0
    try:
        with open_volume(path) as stream:
            stream.seek(int(header.get_data_offset()))
            while done < total:
                count = stream.readinto(buffer[done : done + _READ_CHUNK])
                if not count:
                    break
                done += count
            if done == total and isinstance(stream, gzip.GzipFile):
                # Read on to the end of the stream (bounded), where gzip checks CRC and length:
                # corrupt deflate data often decodes without error until then.
                for _ in range(_MAX_TRAILING_BYTES // _TRAILING_CHUNK):
                    if not stream.read(_TRAILING_CHUNK):
                        break
    except (EOFError, zlib.error, OSError) as exc:
        raise VolumeReadError(
            f"{name}: voxel data is truncated or corrupt ({type(exc).__name__}); "
            "expected a complete NIfTI file"
        ) from None
    if done < total:
        raise VolumeReadError(
            f"{name}: voxel data is truncated ({done:,} of {total:,} bytes); "
            "expected a complete NIfTI file"
        )
    return voxels.reshape(source.shape, order="F")


def _scaling(source: SourceGeometry) -> tuple[float, float] | None:
    """The file's (slope, intercept), or None when the stored values are used as they are."""
    slope, inter = source.header.get_slope_inter()
    if slope is None or (slope == 1.0 and inter == 0.0):
        return None
    return float(slope), float(inter)


def _count(number: int, what: str) -> str:
    return f"{number:,} {what} voxel" + ("" if number == 1 else "s")


def check_intensities(data: npt.NDArray[np.float32], name: str) -> None:
    """Refuse a scan's intensities that no model can use (VolumeContentError, one line that
    starts with ``name``): NaN or infinite voxels, or every voxel one value (no contrast)."""
    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.count_nonzero(np.isnan(data)))
        n_inf = int(finite.size - np.count_nonzero(finite)) - n_nan
        found = [_count(n, what) for n, what in ((n_nan, "NaN"), (n_inf, "infinite")) if n]
        raise VolumeContentError(
            f"{name}: found {' and '.join(found)} (values beyond float32 count as infinite); "
            "expected finite intensities"
        )
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise VolumeContentError(
            f"{name}: every voxel has the value {low:g}; expected an image with contrast"
        )


def load_scan(path: Path, max_voxels: int) -> Scan:
    """Read a NIfTI scan into canonical (RAS+) voxel order as float32.

    Runs :func:`read_header` first (so ``max_voxels`` is enforced before any voxel data is
    read), then reads the data: a truncated or corrupt file raises VolumeReadError; NaN or
    infinite voxels, or an image whose voxels all have one value, raise VolumeContentError.
    """
    source = read_header(path, max_voxels)
    raw = _read_voxels(path, source)
    with np.errstate(over="ignore", invalid="ignore"):
        data = raw.astype(np.float32, copy=False)  # in place of raw when it is float32
        del raw
        scaling = _scaling(source)
        if scaling is not None:
            data *= np.float32(scaling[0])
            data += np.float32(scaling[1])
    check_intensities(data, source.name)
    canonical = np.ascontiguousarray(
        orientations.apply_orientation(data, source.orientation), np.float32
    )
    return Scan(data=canonical, spacing_mm=source.spacing_mm, source=source)


def _as_labels(raw: npt.NDArray[Any], source: SourceGeometry) -> npt.NDArray[np.uint8]:
    name = source.name
    scaling = _scaling(source)
    values: npt.NDArray[Any] = raw
    if scaling is not None or raw.dtype.kind == "f":
        values = raw.astype(np.float64)
        if scaling is not None:
            values = values * scaling[0] + scaling[1]
        if not np.isfinite(values).all():
            raise VolumeContentError(
                f"{name}: label map has NaN or infinite values; expected integer class labels"
            )
        rounded = np.rint(values)
        fractional = values != rounded
        if fractional.any():
            example = float(values[fractional][0])
            raise VolumeContentError(
                f"{name}: label map has non-integer values (e.g. {example:g}); "
                "expected integer class labels"
            )
        values = rounded
    low, high = values.min(), values.max()
    if low < 0 or high > 255:
        raise VolumeContentError(
            f"{name}: label values range from {low:g} to {high:g}; "
            "expected integer labels from 0 to 255"
        )
    return values.astype(np.uint8)


def load_label_map(
    path: Path, like: Scan, *, tolerance_mm: float = AFFINE_TOLERANCE_MM
) -> npt.NDArray[np.uint8]:
    """Read a reference label map on ``like``'s grid, in canonical order, as uint8.

    The file may store its voxels in another order than the scan as long as it describes the
    same grid: same canonical shape and canonical affines that agree within ``tolerance_mm``
    (else VolumeContentError, checked before any voxel data is read). Values must be whole
    numbers from 0 to 255 (integer types, or float/scaled types holding whole numbers).
    """
    source = inspect_header(path, max_voxels=None)
    target = like.source
    if source.canonical_shape != target.canonical_shape:
        raise VolumeContentError(
            f"{source.name}: label map shape {source.shape} ({''.join(source.axcodes)}) does "
            f"not match the scan's {target.shape} ({''.join(target.axcodes)}); "
            "expected the scan's voxel grid"
        )
    difference = float(np.max(np.abs(source.canonical_affine - target.canonical_affine)))
    if not difference <= tolerance_mm:
        raise VolumeContentError(
            f"{source.name}: label map affine differs from the scan's by up to "
            f"{difference:.3g} mm; expected the scan's voxel grid (tolerance {tolerance_mm:g} mm)"
        )
    labels = _as_labels(_read_voxels(path, source), source)
    return np.ascontiguousarray(
        orientations.apply_orientation(labels, source.orientation), np.uint8
    )


def mask_to_image(mask: npt.NDArray[Any], source: SourceGeometry) -> Any:
    """Turn a canonical-order mask into a NIfTI image on the input's original grid.

    ``mask`` must have ``source.canonical_shape`` and hold bool or integer labels 0..255
    (else VolumeContentError). The image has the input's voxel order and exact shape (a
    trailing singleton 4th dimension dropped), affine, qform and sform with their codes,
    pixdim and units; its data type is uint8 without scaling, and the input's free-text
    fields and extensions are not carried over. A ``Nifti1Image``, or a ``Nifti2Image`` (its
    subclass) for a NIfTI-2 input.
    """
    array = np.asarray(mask)
    if array.shape != source.canonical_shape:
        raise VolumeContentError(
            f"{source.name}: mask shape {array.shape} does not match the scan's canonical shape "
            f"{source.canonical_shape}; expected a mask on the scan's grid"
        )
    if array.dtype.kind not in "biu":
        raise VolumeContentError(
            f"{source.name}: mask has voxel type {array.dtype}; expected integer labels (uint8)"
        )
    if array.dtype.kind in "iu" and array.size and (array.min() < 0 or array.max() > 255):
        raise VolumeContentError(
            f"{source.name}: mask values range from {array.min()} to {array.max()}; "
            "expected labels from 0 to 255"
        )
    original = np.ascontiguousarray(
        orientations.apply_orientation(array, source.to_source_orientation), np.uint8
    )
    header = source.header.copy()
    header.set_data_shape(source.shape)
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 0  # recomputed on save
    header["scl_slope"] = np.nan
    header["scl_inter"] = np.nan
    header["cal_min"] = 0
    header["cal_max"] = 0
    header.set_intent("none")
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    return image_class(original, source.affine, header=header)


def save_image_atomic(image: Any, path: Path, *, mode: int | None = None) -> None:
    """Write a NIfTI image so that ``path`` is either absent/old or complete, never partial.

    Writes a hidden temporary file in the same directory with the same ``.nii``/``.nii.gz``
    suffix (so nibabel compresses as the name says), fsyncs it, then ``os.replace``s it onto
    ``path`` and fsyncs the directory. The file gets ``mode`` (e.g. ``JOB_FILE_MODE`` for a
    job's scan or mask), set before it is published; ``None`` leaves the umask's. On any
    failure the temporary file is removed and the error propagates. A wrong suffix raises
    InvalidInputError.
    """
    try:
        suffix = nifti_suffix(path)
    except VolumeReadError:
        raise InvalidInputError(
            f"{path.name}: unsupported output file type; expected a name ending in .nii or .nii.gz"
        ) from None
    with atomic_path(path, suffix=suffix, mode=mode) as temporary:
        nib.save(image, str(temporary))
