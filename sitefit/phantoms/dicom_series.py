"""A NIfTI scan as a single-frame MR DICOM series with its real geometry (demos and tests).

Each slice along the image's third voxel axis becomes one MR Image Storage instance:
ImageOrientationPatient and ImagePositionPatient come from the NIfTI affine (RAS turned into
DICOM's LPS), PixelSpacing from its column norms, and the intensities are stored as unsigned
16-bit integers with RescaleSlope/RescaleIntercept, so :mod:`sitefit.dicom` reads back the same
volume (to the 16-bit quantisation). The patient, study and scanner modules hold synthetic
values only (a phantom has no patient). ``order`` writes the instances in ascending, reversed
or shuffled slice order (InstanceNumber follows the slice position either way), which is how
tests check that nothing relies on arrival order; ``transfer_syntax`` compresses the pixel
data where pydicom has an encoder for it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from sitefit.durable import write_atomic

nib: Any = nibabel

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
Order = Literal["ascending", "reversed", "shuffled"]


@dataclass(frozen=True)
class Scanner:
    """The scanner headers a site key is derived from (sitefit.site_keys)."""

    manufacturer: str = "Phantom Medical"
    model: str = "Simulator 3T"
    field_strength: float = 3.0
    station: str = "PHANTOM01"
    serial: str = "0001"
    institution: str = "sitefit phantoms"

    def headers(self) -> dict[str, Any]:
        return {
            "Manufacturer": self.manufacturer,
            "ManufacturerModelName": self.model,
            "MagneticFieldStrength": self.field_strength,
            "StationName": self.station,
            "DeviceSerialNumber": self.serial,
            "InstitutionName": self.institution,
        }


@dataclass(frozen=True)
class SeriesIds:
    """The UIDs of one series and its study (fresh ones by default)."""

    study: str = field(default_factory=lambda: str(generate_uid()))
    series: str = field(default_factory=lambda: str(generate_uid()))
    frame_of_reference: str = field(default_factory=lambda: str(generate_uid()))


def _stored_values(
    data: npt.NDArray[Any],
) -> tuple[npt.NDArray[np.uint16], float, float]:
    low, high = float(np.min(data)), float(np.max(data))
    slope = (high - low) / 65535.0 if high > low else 1.0
    stored = np.rint((data - low) / slope).clip(0, 65535).astype(np.uint16)
    return stored, slope, low


def series_datasets(
    image: Any,
    *,
    scanner: Scanner | None = None,
    ids: SeriesIds | None = None,
    extra: Mapping[str, Any] | None = None,
) -> list[Dataset]:
    """The instances of ``image`` (a nibabel image), in ascending slice order."""
    scanner = scanner or Scanner()
    ids = ids or SeriesIds()
    data = np.asarray(image.dataobj, dtype=np.float64)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D image, got shape {data.shape}")
    affine = _LPS_FROM_RAS @ np.asarray(image.affine, dtype=np.float64)
    column_step, row_step, slice_step = (affine[:3, axis] for axis in range(3))
    column_spacing = float(np.linalg.norm(column_step))
    row_spacing = float(np.linalg.norm(row_step))
    orientation = [*(column_step / column_spacing), *(row_step / row_spacing)]
    stored, slope, intercept = _stored_values(data)
    datasets = []
    for k in range(data.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.Modality = "MR"
        ds.PatientName = "Phantom^Subject"
        ds.PatientID = "PHANTOM"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = ids.study
        ds.StudyID = "1"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesInstanceUID = ids.series
        ds.SeriesNumber = 1
        ds.SeriesDescription = "sitefit phantom"
        ds.FrameOfReferenceUID = ids.frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = k + 1
        ds.ImagesInAcquisition = int(data.shape[2])
        for keyword, value in scanner.headers().items():
            setattr(ds, keyword, value)
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.EchoTrainLength = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
        position = affine[:3, 3] + k * slice_step
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.SliceThickness = round(float(np.linalg.norm(slice_step)), 6)
        ds.PixelSpacing = [round(row_spacing, 6), round(column_spacing, 6)]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = f"{slope:.10g}"[:16]
        ds.RescaleIntercept = f"{intercept:.10g}"[:16]
        ds.RescaleType = "US"
        # rows run along the column direction: pixel (row j, column i) is voxel (i, j, k)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        datasets.append(ds)
    return datasets


def write_dicom_series(
    image: Any,
    out: Path,
    *,
    scanner: Scanner | None = None,
    ids: SeriesIds | None = None,
    order: Order = "ascending",
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``image`` (a nibabel image or a NIfTI path) as a DICOM series into ``out``.

    Files are named ``0001.dcm``, ``0002.dcm``, ... in the order written (``order``), each
    written atomically; returns their paths in that order.
    """
    if isinstance(image, str | Path):
        image = nib.load(str(image))
    datasets = series_datasets(image, scanner=scanner, ids=ids, extra=extra)
    if order == "reversed":
        datasets.reverse()
    elif order == "shuffled":
        random.Random(seed).shuffle(datasets)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, ds in enumerate(datasets, start=1):
        if UID(transfer_syntax) != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        path = out / f"{number:04d}.dcm"
        write_atomic(path, dataset_bytes(ds))
        paths.append(path)
    return paths


def dataset_bytes(ds: Dataset) -> bytes:
    """``ds`` as a DICOM Part 10 file."""
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


__all__ = ["Scanner", "SeriesIds", "dataset_bytes", "series_datasets", "write_dicom_series"]
