"""Checking a received scan (and reference) before anything is queued, without torch.

NIfTI: the header is validated by :func:`sitefit.volume.read_header` (type, rank, voxel
limit, geometry; for ``.nii``, that the file holds all its voxels). A ``.nii.gz`` is then
inflated as a stream, in bounded steps, and never to more than the header says the file
holds plus a small allowance: a truncated or corrupt stream is refused, and so is a gzip bomb,
before it inflates past that bound. Then the voxels are read as the worker will read them
(:func:`sitefit.volume.load_scan`, at most ``max_voxels``), so that NaN, infinite or constant
intensities are refused here, not after queueing. DICOM: a zip is extracted into the job's
``dicom/`` directory (the job keeps its source instances: the SEG references them) and that
directory, or one received from a PACS, is converted to ``scan.nii.gz`` by
:mod:`sitefit.dicom`, which refuses what it cannot read. A reference must be NIfTI on the
scan's voxel grid.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from server.uploads import StoredFile
from sitefit.dicom import DicomVolume, extract_series_zip, series_dir_to_nifti
from sitefit.exceptions import VolumeContentError, VolumeReadError
from sitefit.job_store import DICOM_DIR
from sitefit.volume import AFFINE_TOLERANCE_MM, SourceGeometry, load_scan, read_header

TRAILING_ALLOWANCE = 16 * 2**20  # bytes after the voxel data that a reader tolerates
_CHUNK = 2**20
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class CheckedScan:
    """A scan fit to queue: its file in the staging directory and its header's geometry.

    ``dicom`` is the series read, for a DICOM scan (study and series UIDs, one instance's
    header; it holds the volume too, so keep it no longer than the request).
    """

    file_name: str
    geometry: SourceGeometry
    source_format: Literal["nifti", "dicom"]
    dicom: DicomVolume | None = None


def check_gzip_stream(path: Path, geometry: SourceGeometry) -> None:
    """Inflate ``path`` in bounded steps: refuse truncation, corruption and excess data."""
    header = geometry.header
    needed = int(header.get_data_offset()) + math.prod(geometry.file_shape) * int(
        header.get_data_dtype().itemsize
    )
    limit = needed + TRAILING_ALLOWANCE
    name = path.name
    inflater = zlib.decompressobj(wbits=31)
    total = 0
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                while chunk:
                    total += len(inflater.decompress(chunk, limit + 1 - total))
                    if total > limit:
                        raise VolumeContentError(
                            f"{name}: inflates to more than {limit:,} bytes although its header "
                            f"describes {needed:,}; refused (gzip bomb or wrong header)"
                        )
                    if inflater.eof:
                        chunk = inflater.unused_data
                        if chunk and not chunk.startswith(_GZIP_MAGIC):
                            raise VolumeReadError(
                                f"{name}: data after the end of the gzip stream; "
                                "expected a complete gzip file"
                            )
                        if chunk:
                            inflater = zlib.decompressobj(wbits=31)  # next gzip member
                    else:
                        chunk = inflater.unconsumed_tail
    except zlib.error:
        raise VolumeReadError(
            f"{name}: gzip data is corrupt; expected a complete, valid .nii.gz file"
        ) from None
    if not inflater.eof or total < needed:
        raise VolumeReadError(
            f"{name}: file is truncated ({total:,} of {needed:,} bytes inflate); "
            "expected a complete NIfTI file"
        )


def check_scan(stored: StoredFile, staging: Path, max_voxels: int) -> CheckedScan:
    """Validate the uploaded scan; a DICOM zip is extracted into ``staging / DICOM_DIR``
    (and deleted) and converted to ``scan.nii.gz`` (:func:`check_series_dir`)."""
    if stored.suffix == ".zip":
        directory = staging / DICOM_DIR
        extract_series_zip(stored.path, directory, max_voxels)
        stored.path.unlink()
        return check_series_dir(directory, staging, max_voxels)
    geometry = read_header(stored.path, max_voxels)
    if stored.suffix == ".nii.gz":
        check_gzip_stream(stored.path, geometry)
    load_scan(stored.path, max_voxels)  # the worker's own read: its content checks, now
    return CheckedScan(stored.path.name, geometry, "nifti")


def check_series_dir(directory: Path, staging: Path, max_voxels: int) -> CheckedScan:
    """Validate the DICOM series in ``directory`` (its instance files) and convert it to
    ``staging / "scan.nii.gz"``; the instances stay where they are."""
    out = staging / "scan.nii.gz"
    volume = series_dir_to_nifti(directory, out, max_voxels)
    return CheckedScan(out.name, read_header(out, max_voxels), "dicom", dicom=volume)


def check_reference(stored: StoredFile, scan: SourceGeometry, max_voxels: int) -> str:
    """Validate the reference labels: a complete NIfTI on the scan's voxel grid."""
    geometry = read_header(stored.path, max_voxels)
    if stored.suffix == ".nii.gz":
        check_gzip_stream(stored.path, geometry)
    if geometry.canonical_shape != scan.canonical_shape:
        raise VolumeContentError(
            f"{stored.path.name}: shape {geometry.shape} does not match the scan's "
            f"{scan.shape}; expected labels on the scan's voxel grid"
        )
    difference = float(np.max(np.abs(geometry.canonical_affine - scan.canonical_affine)))
    if not difference <= AFFINE_TOLERANCE_MM:
        raise VolumeContentError(
            f"{stored.path.name}: affine differs from the scan's by {difference:.3g} mm; "
            "expected labels on the scan's voxel grid"
        )
    return stored.path.name
