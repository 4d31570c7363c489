"""A mask on a DICOM series' grid -> a DICOM Segmentation (SEG) of that series, by highdicom.

:func:`build_seg` makes a BINARY SEG with one segment per foreground class (segment number =
the class's label value, from 1), each coded with its class's concept (:mod:`sitefit.codes`),
algorithm type AUTOMATIC, and an algorithm identification naming sitefit, its version, the
model ``NAME@VERSION``, the mode and the site weights used or saved. highdicom copies the
patient, study and frame-of-reference modules from the source instances and references them
frame by frame; the QC outcome (:class:`SegDescription`) goes into SeriesDescription and
ContentDescription, within their 64 characters.

Geometry goes through highdicom's volume objects, never through the order of a file list
(instances arrive in any order, and a mask matched by index lands on the wrong slices when
they do): the source series' geometry is a ``VolumeGeometry`` built from its headers (slices
placed by ``get_series_volume_positions``), the mask becomes a ``Volume`` in the series' frame
of reference (``Volume.from_nibabel`` turns NIfTI's RAS into DICOM's LPS), and
``match_geometry`` permutes and flips it onto the series' grid, which it must cover exactly:
a mask on any other grid is refused, never resampled, padded or cropped.

Nothing here reads pixel data of the source instances or quotes their headers: errors are
one line naming the problem, never a UID, a name or highdicom's own message (which may quote
header values).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes as dicom_codes

import sitefit
from sitefit.codes import Code, Concept, code_for

# sitefit.dicom also configures pydicom for the process: no header text in its warnings or logs
from sitefit.dicom import MAX_INSTANCES
from sitefit.durable import write_atomic
from sitefit.exceptions import InvalidInputError
from sitefit.job_store import JOB_FILE_MODE
from sitefit.report import Report
from sitefit.volume.header import nib

MANUFACTURER = "sitefit"
SERIES_NUMBER = 9001  # the SEG's own series; arbitrary but recognisable, as other tools do
CONTENT_LABEL = "SITEFIT"
LO_LENGTH = 64  # SeriesDescription, ContentDescription, AlgorithmName, ...: LO, 64 characters
_GRID_TOLERANCE = 0.05  # of the smallest voxel spacing: how far the mask's grid may be off
_DIRECTION_TOLERANCE = 1e-3  # highdicom's match_geometry: |cos| of aligned axes within this
_HEADER_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, RuntimeError,
                  OverflowError, ZeroDivisionError)  # fmt: skip


def _refuse(message: str) -> InvalidInputError:
    return InvalidInputError(f"DICOM SEG: {message}")


@dataclass(frozen=True)
class SegmentSpec:
    """One segment: the mask's label value (= its segment number), its label and its code."""

    number: int
    label: str
    code: Code


def segments_of(classes: Mapping[int, str], codes: Mapping[int, Code]) -> list[SegmentSpec]:
    """A model's foreground classes as segments: each with its code from ``codes``, else the
    default of its class name, else the generic concept (``sitefit.codes.code_for``)."""
    return [
        SegmentSpec(label, name, code_for(name, codes, label))
        for label, name in sorted(classes.items())
        if label != 0
    ]


@dataclass(frozen=True)
class SegDescription:
    """What produced the mask, for the SEG's descriptions and its algorithm identification."""

    model: str  # NAME@VERSION
    mode: str | None = None  # the site policy that ran (Report.mode_used)
    guard: str | None = None  # the guard's verdict, when a refinement ran: kept | reverted
    self_consistency: float | None = None  # Dice(early, final) of the output
    site_version_used: int | None = None
    site_version_saved: int | None = None

    @classmethod
    def of(cls, report: Report) -> SegDescription:
        """The QC outcome of a job, from its report."""
        return cls(
            model=f"{report.model.name}@{report.model.version}",
            mode=report.mode_used,
            guard=report.guard.verdict if report.guard is not None else None,
            self_consistency=report.self_consistency.after.dice,
            site_version_used=report.site_weights.used_version,
            site_version_saved=report.site_weights.saved_version,
        )

    def series_description(self) -> str:
        """E.g. ``sitefit brain@3 adapt kept SC 0.91``."""
        parts = ["sitefit", self.model, self.mode, self.guard, _figure("SC", self.self_consistency)]
        return _lo(" ".join(part for part in parts if part))

    def content_description(self) -> str:
        """E.g. ``mode adapt, guard kept, self-consistency 0.912, site v2->v3``."""
        parts = [f"mode {self.mode}" if self.mode else None,
                 f"guard {self.guard}" if self.guard else None,
                 _figure("self-consistency", self.self_consistency, 3),
                 self._site_versions()]  # fmt: skip
        return _lo(", ".join(part for part in parts if part) or f"sitefit {self.model}")

    def parameters(self) -> dict[str, str]:
        """The algorithm's parameters, as AlgorithmParameters lists them."""
        values = {
            "model": self.model,
            "mode": self.mode,
            "site_version_used": _text(self.site_version_used),
            "site_version_saved": _text(self.site_version_saved),
        }
        return {key: value for key, value in values.items() if value is not None}

    def _site_versions(self) -> str | None:
        used, saved = self.site_version_used, self.site_version_saved
        if used is None and saved is None:
            return None
        if saved is None:
            return f"site v{used}"
        return f"site v{used}->v{saved}" if used is not None else f"site ->v{saved}"


def _figure(name: str, value: float | None, digits: int = 2) -> str | None:
    if value is None or not math.isfinite(value):
        return None
    return f"{name} {value:.{digits}f}"


def _text(value: int | None) -> str | None:
    return None if value is None else str(value)


def _lo(text: str) -> str:
    """``text`` as a valid LO value: no backslash or control characters, 64 at most."""
    cleaned = "".join(" " if ch == "\\" or ord(ch) < 32 else ch for ch in text)
    return cleaned[:LO_LENGTH].rstrip()


def read_source_instances(source_dir: Path) -> list[Dataset]:
    """The headers (no pixel data) of the DICOM instances in ``source_dir``: one image series.

    The files are those :func:`sitefit.dicom.read_series_dir` reads (regular files whose
    names do not start with "."), and an instance present twice (same SOPInstanceUID) counts
    once, as there. Anything that is not a DICOM image of the same series and frame of
    reference as the others is refused, named by its position in name order only.
    """
    try:
        with os.scandir(source_dir) as entries:
            names = sorted(entry.name for entry in entries
                           if not entry.name.startswith(".")
                           and entry.is_file(follow_symlinks=False))  # fmt: skip
    except OSError as error:
        raise _refuse(f"cannot read the source series' folder ({error.strerror})") from None
    if not names:
        raise _refuse("the source series' folder holds no DICOM files")
    if len(names) > MAX_INSTANCES:
        raise _refuse(f"{len(names)} source files; expected at most {MAX_INSTANCES} instances")
    datasets: list[Dataset] = []
    seen: set[str] = set()
    for number, name in enumerate(names, start=1):
        dataset = _read_header(Path(source_dir) / name, number)
        for keyword in _REQUIRED:
            if not _header(dataset, keyword):
                raise _refuse(f"source instance #{number} has no {keyword}")
        uid = str(_header(dataset, "SOPInstanceUID"))
        if uid in seen:
            continue
        seen.add(uid)
        _complete_type2(dataset)
        first = datasets[0] if datasets else dataset
        if _header(dataset, "SeriesInstanceUID") != _header(first, "SeriesInstanceUID"):
            raise _refuse("the source instances belong to more than one series")
        if _header(dataset, "FrameOfReferenceUID") != _header(first, "FrameOfReferenceUID"):
            raise _refuse("the source instances do not share one frame of reference")
        datasets.append(dataset)
    return datasets


_REQUIRED = ("SOPInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
             "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
             "Columns")  # fmt: skip


# Type 2 attributes of the patient and study modules the SEG copies from its source: they
# must be present, empty or not; de-identifiers often drop them, and highdicom needs them
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                 "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip


def _complete_type2(dataset: Dataset) -> None:
    """Add the copied type 2 attributes a source instance lacks, empty (in memory only)."""
    for keyword in _TYPE2_COPIED:
        if keyword not in dataset:
            setattr(dataset, keyword, "")


def _read_header(path: Path, number: int) -> Dataset:
    try:
        dataset: Dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise _refuse(f"source file #{number} is not a DICOM file") from None
    except OSError as error:
        raise _refuse(f"cannot read source file #{number} ({error.strerror})") from None
    except Exception:  # pydicom raises many types for malformed data
        raise _refuse(f"source file #{number} is a malformed DICOM file") from None
    return dataset


def _header(dataset: Dataset, keyword: str) -> Any:
    try:
        return dataset.get(keyword)
    except Exception:  # pydicom converts values lazily: a malformed one raises here
        return None


def series_geometry(datasets: Sequence[Dataset]) -> hd.VolumeGeometry:
    """The source series' voxel grid as highdicom sees it (slices placed by their positions,
    whatever the order of ``datasets``), in the series' frame of reference."""
    try:
        spacing, positions = hd.spatial.get_series_volume_positions(datasets)
    except _HEADER_ERRORS:
        spacing, positions = None, None
    if spacing is None or positions is None:
        raise _refuse("the source instances are not one regularly spaced stack of slices")
    first = datasets[positions.index(0)]
    try:
        return hd.VolumeGeometry.from_attributes(
            image_position=[float(v) for v in first.ImagePositionPatient],
            image_orientation=[float(v) for v in first.ImageOrientationPatient],
            rows=int(first.Rows),
            columns=int(first.Columns),
            pixel_spacing=[float(v) for v in first.PixelSpacing],
            spacing_between_slices=float(spacing),
            number_of_frames=len(datasets),
            coordinate_system="PATIENT",
            frame_of_reference_uid=str(first.FrameOfReferenceUID),
        )
    except _HEADER_ERRORS as error:
        raise _refuse(f"the source series' geometry is unusable ({type(error).__name__})") from None


def mask_volume(
    mask: Any, geometry: hd.VolumeGeometry, segments: Sequence[SegmentSpec]
) -> hd.Volume:
    """``mask`` (a nibabel image of label values) as a label-map ``Volume`` on ``geometry``.

    The mask's grid must be the series' grid, its axes in any order and direction (a NIfTI
    converted from the series, or reoriented); it is matched by highdicom (permute and flip
    only) and then given the series' exact affine, so that every frame is referenced to the
    source instance at its position.
    """
    labels = _label_array(mask, segments)
    image = nib.Nifti1Image(labels, np.asarray(mask.affine, dtype=np.float64))
    volume = hd.Volume.from_nibabel(image, frame_of_reference_uid=geometry.frame_of_reference_uid)
    off_grid = _refuse("the mask is not on the source series' voxel grid")
    if sorted(volume.spatial_shape) != sorted(geometry.spatial_shape):
        raise off_grid
    try:
        matched = volume.match_geometry(geometry, tol=_DIRECTION_TOLERANCE)
    except RuntimeError:
        raise off_grid from None
    if matched.spatial_shape != geometry.spatial_shape or not _same_grid(matched, geometry):
        raise off_grid  # match_geometry pads and crops: a shifted grid would pass it
    return hd.Volume(
        array=np.ascontiguousarray(matched.array),
        affine=geometry.affine,
        coordinate_system="PATIENT",
        frame_of_reference_uid=geometry.frame_of_reference_uid,
    )


def _label_array(mask: Any, segments: Sequence[SegmentSpec]) -> npt.NDArray[np.unsignedinteger]:
    numbers = [segment.number for segment in segments]
    if numbers != list(range(1, len(numbers) + 1)):
        raise _refuse("segment numbers must be 1, 2, ..., one per foreground class")
    data = np.asanyarray(mask.dataobj)
    if data.ndim != 3:
        raise _refuse(f"the mask has {data.ndim} dimensions; expected 3")
    if not np.issubdtype(data.dtype, np.integer) and (
        not np.isfinite(data).all() or not np.array_equal(data, np.rint(data))
    ):
        raise _refuse("the mask holds values that are not label values")
    if data.size and (data.min() < 0 or data.max() > len(numbers)):
        raise _refuse(f"the mask holds labels outside 0..{len(numbers)}")
    labels: npt.NDArray[np.unsignedinteger] = data.astype(
        np.uint8 if len(numbers) < 256 else np.uint16
    )
    return labels


def _same_grid(volume: hd.Volume, geometry: hd.VolumeGeometry) -> bool:
    """Whether every corner voxel of ``volume`` lies where ``geometry``'s does."""
    shape = np.array(geometry.spatial_shape) - 1
    corners = np.array([[i, j, k, 1] for i in (0, shape[0]) for j in (0, shape[1])
                        for k in (0, shape[2])], dtype=np.float64)  # fmt: skip
    ours = corners @ np.asarray(volume.affine).T
    theirs = corners @ np.asarray(geometry.affine).T
    tolerance = _GRID_TOLERANCE * float(min(geometry.spacing))
    return bool(np.max(np.linalg.norm(ours[:, :3] - theirs[:, :3], axis=1)) <= tolerance)


def _concept(concept: Concept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=concept.value, scheme_designator=concept.scheme,
                              meaning=concept.meaning)  # fmt: skip


def _segment_descriptions(
    segments: Sequence[SegmentSpec], description: SegDescription
) -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=MANUFACTURER,
        family=dicom_codes.DCM.ArtificialIntelligence,
        version=sitefit.__version__,
        source=MANUFACTURER,
        parameters=description.parameters(),
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=segment.number,
            segment_label=_lo(segment.label),
            segmented_property_category=_concept(segment.code.property_category),
            segmented_property_type=_concept(segment.code),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for segment in segments
    ]


def build_seg(
    mask: Any,
    source_dir: Path,
    segments: Sequence[SegmentSpec],
    *,
    description: SegDescription,
    omit_empty_frames: bool = False,
) -> Dataset:
    """The DICOM SEG of ``mask`` (a nibabel image on the series' grid) for the series whose
    instances are in ``source_dir`` (see the module docstring).

    Every frame is kept by default (frames without any segment included: viewers have shown
    SEGs with omitted frames shifted); ``omit_empty_frames`` leaves them out, except that an
    all-empty mask still gives a valid SEG of empty frames. Anything that prevents a valid
    SEG is an :class:`InvalidInputError` with a one-line, PHI-free message.
    """
    if not segments:
        raise _refuse("the model has no foreground class to make a segment of")
    datasets = read_source_instances(source_dir)
    geometry = series_geometry(datasets)
    for dataset in datasets:  # type 2 in MR and CT images, and the SEG's pixel measures
        if "SliceThickness" not in dataset:
            dataset.SliceThickness = f"{geometry.spacing_between_slices:.6g}"
    volume = mask_volume(mask, geometry, segments)
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=volume,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_segment_descriptions(segments, description),
            series_instance_uid=hd.UID(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER,
            software_versions=sitefit.__version__,
            device_serial_number="1",
            content_description=description.content_description(),
            content_label=CONTENT_LABEL,
            omit_empty_frames=omit_empty_frames and bool(volume.array.any()),
            series_description=description.series_description(),
        )
    except _HEADER_ERRORS as error:
        raise _refuse(f"highdicom cannot build it ({type(error).__name__})") from None
    _check_references(seg)
    return seg


def _check_references(seg: Dataset) -> None:
    """Every frame must name the source instance it segments: a frame without one would be
    placed by position alone, which is what this module exists to make unnecessary."""
    for frame in seg.PerFrameFunctionalGroupsSequence:
        derivation = frame.get("DerivationImageSequence")
        if not derivation or not derivation[0].get("SourceImageSequence"):
            raise _refuse("a frame does not match any source instance's position")


def seg_bytes(seg: Dataset) -> bytes:
    """``seg`` as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_seg(
    mask: Any,
    source_dir: Path,
    segments: Sequence[SegmentSpec],
    out: Path,
    *,
    description: SegDescription,
    omit_empty_frames: bool = False,
) -> Dataset:
    """:func:`build_seg`, written to ``out`` atomically with mode 0640 (it holds the source's
    patient module). A failed write raises ``OSError`` for the caller to word."""
    seg = build_seg(mask, source_dir, segments, description=description,
                    omit_empty_frames=omit_empty_frames)  # fmt: skip
    write_atomic(out, seg_bytes(seg), mode=JOB_FILE_MODE)
    return seg


__all__ = [
    "SegDescription",
    "SegmentSpec",
    "build_seg",
    "mask_volume",
    "read_source_instances",
    "seg_bytes",
    "segments_of",
    "series_geometry",
    "write_seg",
]
