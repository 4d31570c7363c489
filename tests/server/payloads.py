"""Builders of uploads, good and bad: DICOM series zips and malformed NIfTI files.

Everything is generated (pydicom, nibabel, zlib): no data files in the repository.
"""

from __future__ import annotations

import gzip
import io
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
PATIENT_NAME = "DOE^JOHN"
PATIENT_ID = "PHI-0012345"


def _file_meta(sop_class: str, instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _patient(ds: Dataset, series: str) -> None:
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_slices(
    volume: npt.NDArray[Any],
    affine_ras: npt.NDArray[np.float64],
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    series: str | None = None,
) -> list[bytes]:
    """One MR slice per ``volume[:, :, k]`` (column, row, slice), stored as int16 with a rescale.

    ``volume`` must equal ``stored * slope + intercept`` for some int16 ``stored``.
    """
    series = series or generate_uid()
    affine = LPS @ affine_ras
    column_step, row_step = affine[:3, 0], affine[:3, 1]
    stored = np.rint((np.asarray(volume, np.float64) - intercept) / slope).astype(np.int16)
    slices = []
    for k in range(volume.shape[2]):
        instance = generate_uid()
        ds = Dataset()
        ds.file_meta = _file_meta(MRImageStorage, instance)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, instance, "MR"
        _patient(ds, series)
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelSpacing = [float(np.linalg.norm(row_step)), float(np.linalg.norm(column_step))]
        directions = [
            *(column_step / np.linalg.norm(column_step)),
            *(row_step / np.linalg.norm(row_step)),
        ]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in directions]
        ds.ImagePositionPatient = [float(v) for v in (affine @ [0, 0, k, 1])[:3]]
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        slices.append(_encode(ds))
    return slices


def with_empty_element(data: bytes, keyword: str) -> bytes:
    """The DICOM slice ``data`` with element ``keyword`` present but empty (zero length)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    setattr(ds, keyword, None)
    return _encode(ds)


def with_text_value(data: bytes, keyword: str, text: bytes = b"abc ") -> bytes:
    """The DICOM slice ``data`` with the numeric element ``keyword`` holding ``text``.

    pydicom refuses to write a non-numeric DS/IS value, so a unique placeholder of the same
    length is written and its bytes are replaced.
    """
    placeholder = b"7" * len(text)
    ds = pydicom.dcmread(io.BytesIO(data))
    setattr(ds, keyword, placeholder.decode())
    encoded = _encode(ds)
    assert encoded.count(placeholder) == 1, "placeholder is not unique"
    return encoded.replace(placeholder, text)


def structured_report() -> bytes:
    """A DICOM object without pixel data (Basic Text SR)."""
    instance = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(BasicTextSRStorage, instance)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = BasicTextSRStorage, instance, "SR"
    _patient(ds, generate_uid())
    return _encode(ds)


def write_zip(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return path


def series_zip(path: Path, slices: Sequence[bytes], order: Sequence[int] | None = None) -> Path:
    order = order if order is not None else range(len(slices))
    return write_zip(path, [(f"{PATIENT_NAME}/IM{i:04d}.dcm", slices[i]) for i in order])


def nifti_to_dicom_zip(scan: Path, out: Path) -> Path:
    """The scan as a DICOM series zip (int16 with a rescale), slices in reverse zip order."""
    image: Any = nib.load(scan)
    data = np.asarray(image.dataobj, np.float64)
    low, high = float(data.min()), float(data.max())
    slope = (high - low) / 30000 if high > low else 1.0
    stored = np.rint((data - low) / slope)
    slices = dicom_slices(stored * slope + low, image.affine, slope=slope, intercept=low)
    return series_zip(out, slices, order=list(reversed(range(len(slices)))))


def nifti_bytes(shape: tuple[int, ...] = (8, 8, 8), nifti2: bool = False) -> bytes:
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    image_class = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    return bytes(image_class(data, np.eye(4)).to_bytes())


def huge_header_nifti() -> bytes:
    """A NIfTI-2 header claiming 10^5 x 10^5 x 10^5 float32 voxels, and no data."""
    header = nib.Nifti2Header()
    header.set_data_shape((10**5, 10**5, 10**5))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 544
    return bytes(header.binaryblock) + b"\x00" * 4


def gzip_bomb(inflated_bytes: int) -> bytes:
    """A small .nii.gz: a valid 8^3 header, then ``inflated_bytes`` of zeros."""
    head = nifti_bytes()
    deflater = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [deflater.compress(head)]
    block = bytes(2**20)
    for _ in range(inflated_bytes // len(block)):
        parts.append(deflater.compress(block))
    parts.append(deflater.flush())
    return b"".join(parts)


def truncated_gzip(scan: Path) -> bytes:
    data = scan.read_bytes()
    assert data[:2] == b"\x1f\x8b"
    return data[: len(data) // 2]


def gzip_of(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)
