"""Mask -> DICOM SEG of the source series: every frame on the slice it belongs to, whatever
the instances' order, slice direction or obliquity; codes, identification, descriptions;
empty frames; dciodvfy; and the masks and folders refused (no PHI).

The expected content of each SEG frame is computed here independently of the code under test:
from the source instance's own ImagePositionPatient, ImageOrientationPatient and PixelSpacing,
each pixel centre goes to patient space (LPS), then to RAS, then through the inverse of the
mask's NIfTI affine to the voxel it lies in.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.uid import SegmentationStorage

import sitefit
from sitefit.codes import ANATOMICAL_STRUCTURE, DEFAULT_CODES, GENERIC, Code
from sitefit.dicom import series_dir_to_nifti
from sitefit.exceptions import InvalidInputError
from sitefit.job_store import JOB_FILE_MODE
from sitefit.phantoms.dicom_series import Order, SeriesIds, write_dicom_series
from sitefit.seg import SegDescription, SegmentSpec, build_seg, segments_of, write_seg

SHAPE = (14, 12, 9)  # columns, rows, slices of the series written from it
DESCRIPTION = SegDescription("tiny-brain@2", "adapt", "kept", 0.9134, 3, 4)
BRAIN = segments_of({0: "background", 1: "brain"}, {})
HEART = segments_of({0: "background", 1: "lv_cavity", 2: "lv_myocardium", 3: "rv_cavity"}, {})
ORDERS: tuple[Order, ...] = ("ascending", "reversed", "shuffled")


def _rotation(axis: int, degrees: float) -> npt.NDArray[np.float64]:
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    rotation = np.eye(3)
    rotation[i, i] = rotation[j, j] = c
    rotation[i, j], rotation[j, i] = -s, s
    return rotation


def _affine(*, oblique: bool = False) -> npt.NDArray[np.float64]:
    """Voxels of 1.5 x 1.25 x 2.5 mm; the first axis runs right to left (as DICOM's rows do
    in a LPS-ordered scan), or a grid rotated 20 degrees about two axes."""
    affine = np.eye(4)
    directions = np.diag([-1.0, 1.0, 1.0])
    if oblique:
        directions = _rotation(0, 20) @ _rotation(1, 20) @ directions
    affine[:3, :3] = directions @ np.diag([1.5, 1.25, 2.5])
    affine[:3, 3] = [12.0, -30.0, 7.5]
    return affine


def _scan(affine: npt.NDArray[np.float64]) -> Any:
    rng = np.random.default_rng(0)
    return nib.Nifti1Image(rng.uniform(0, 100, SHAPE).astype(np.float32), affine)


def _mask(affine: npt.NDArray[np.float64], classes: int) -> Any:
    """Labels no flip or shift of any axis maps onto themselves: blocks whose size grows with
    the slice index, each class in its own place."""
    data = np.zeros(SHAPE, np.uint8)
    for k in range(1, SHAPE[2] - 1):
        data[1 : 2 + k // 2, 2 : 4 + k // 3, k] = 1
    if classes > 1:
        data[8:12, 1:3, 2:5] = 2
        data[9:13, 7:11, 5] = 2
    if classes > 2:
        data[4:7, 8:11, 6:8] = 3
    return nib.Nifti1Image(data, affine)


def _series(tmp_path: Path, affine: npt.NDArray[np.float64], order: Order = "shuffled") -> Path:
    out = tmp_path / f"series-{order}"
    write_dicom_series(_scan(affine), out, order=order, ids=SeriesIds(), seed=3)
    return out


def _instances(source: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in sorted(source.iterdir())]


def expected_frame(instance: pydicom.Dataset, mask: Any) -> npt.NDArray[np.uint8]:
    """The mask's labels at the centres of ``instance``'s pixels (see the module docstring)."""
    position = np.array(instance.ImagePositionPatient, dtype=np.float64)
    orientation = np.array(instance.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in instance.PixelSpacing)
    rows, columns = np.meshgrid(
        np.arange(instance.Rows), np.arange(instance.Columns), indexing="ij"
    )
    lps = (
        position
        + columns[..., None] * column_spacing * orientation[:3]
        + rows[..., None] * row_spacing * orientation[3:]
    )
    ras = lps * np.array([-1.0, -1.0, 1.0])
    inverse = np.linalg.inv(np.asarray(mask.affine, dtype=np.float64))
    continuous = ras @ inverse[:3, :3].T + inverse[:3, 3]
    voxels = np.rint(continuous).astype(int)
    assert np.abs(continuous - voxels).max() < 0.01, "pixel centres must be voxel centres"
    data = np.asarray(mask.dataobj)
    assert (voxels >= 0).all() and (voxels < data.shape).all()
    return data[voxels[..., 0], voxels[..., 1], voxels[..., 2]]


def seg_frames(seg_path: Path, source: Path, *, omitted: bool = False) -> dict[str, Any]:
    """Per source SOPInstanceUID, the SEG's label map of that instance (segment numbers)."""
    seg = hd.seg.segread(seg_path)
    uids = [instance.SOPInstanceUID for instance in _instances(source)]
    pixels = seg.get_pixels_by_source_instance(
        uids, combine_segments=True, assert_missing_frames_are_empty=omitted
    )
    return dict(zip(uids, pixels, strict=True))


def assert_seg_follows_mask(seg_path: Path, source: Path, mask: Any, **kw: Any) -> None:
    frames = seg_frames(seg_path, source, **kw)
    instances = _instances(source)
    for instance in instances:
        expected = expected_frame(instance, mask)
        assert np.array_equal(frames[instance.SOPInstanceUID], expected), instance.InstanceNumber
    # the test's own premise: the mask is not symmetric along the slice axis, so a SEG with
    # its slices in reverse order would fail the comparison above
    normal = np.cross(*np.reshape(np.array(instances[0].ImageOrientationPatient, float), (2, 3)))
    along = sorted(instances, key=lambda i: float(np.array(i.ImagePositionPatient, float) @ normal))
    stack = np.stack([expected_frame(instance, mask) for instance in along])
    assert not np.array_equal(stack, stack[::-1])


def dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dicom3tools' dciodvfy is not installed")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.mark.parametrize("order", ORDERS)
def test_frames_land_on_their_slices_whatever_the_instance_order(
    tmp_path: Path, order: Order
) -> None:
    source = _series(tmp_path, _affine(), order)
    mask = _mask(_affine(), 1)
    out = tmp_path / "seg.dcm"
    write_seg(mask, source, BRAIN, out, description=DESCRIPTION)
    assert_seg_follows_mask(out, source, mask)


def test_a_source_without_its_empty_type2_attributes_still_gives_a_valid_seg(
    tmp_path: Path,
) -> None:
    """De-identified series often lack the empty type 2 attributes the SEG copies."""
    source = _series(tmp_path, _affine())
    dropped = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
               "AccessionNumber", "ReferringPhysicianName", "SliceThickness")  # fmt: skip
    for path in sorted(source.iterdir()):
        instance = pydicom.dcmread(path)
        for keyword in dropped:
            delattr(instance, keyword)
        instance.save_as(path, enforce_file_format=True)
    mask = _mask(_affine(), 1)
    out = tmp_path / "seg.dcm"
    write_seg(mask, source, BRAIN, out, description=DESCRIPTION)
    assert_seg_follows_mask(out, source, mask)
    assert dciodvfy_errors(out) == []


def test_an_oblique_multi_class_series(tmp_path: Path) -> None:
    affine = _affine(oblique=True)
    source = _series(tmp_path, affine, "shuffled")
    mask = _mask(affine, 3)
    out = tmp_path / "seg.dcm"
    seg = write_seg(mask, source, HEART, out, description=DESCRIPTION)
    assert_seg_follows_mask(out, source, mask)
    assert seg.NumberOfFrames == 3 * SHAPE[2]  # every frame of every segment kept
    assert dciodvfy_errors(out) == []


def test_a_mask_in_another_voxel_order_lands_right(tmp_path: Path) -> None:
    """The mask's NIfTI need not list its voxels as the series does (a reoriented copy)."""
    affine = _affine(oblique=True)
    source = _series(tmp_path, affine, "reversed")
    mask = _mask(affine, 3)
    reoriented = mask.as_reoriented(np.array([[2, -1], [0, 1], [1, -1]]))
    assert reoriented.shape != mask.shape
    out = tmp_path / "seg.dcm"
    write_seg(reoriented, source, HEART, out, description=DESCRIPTION)
    assert_seg_follows_mask(out, source, reoriented)


def test_a_mask_on_the_converted_series_grid(tmp_path: Path) -> None:
    """What a job does: the series converted by sitefit.dicom, a mask on that NIfTI's grid."""
    affine = _affine(oblique=True)
    source = _series(tmp_path, affine, "shuffled")
    converted = series_dir_to_nifti(source, tmp_path / "scan.nii.gz", 10**6)
    scan = nib.load(tmp_path / "scan.nii.gz")
    assert np.allclose(scan.affine, converted.affine, atol=1e-4)
    mask = nib.Nifti1Image(np.asarray(_mask(affine, 3).dataobj), scan.affine)
    out = tmp_path / "seg.dcm"
    write_seg(mask, source, HEART, out, description=DESCRIPTION)
    assert_seg_follows_mask(out, source, mask)


def test_segments_codes_identification_and_descriptions(tmp_path: Path) -> None:
    source = _series(tmp_path, _affine())
    custom = Code(scheme="SCT", value="80891009", meaning="Heart", category=ANATOMICAL_STRUCTURE)
    segments = segments_of({0: "background", 1: "brain", 2: "heartish", 3: "unknown"},
                           {2: custom})  # fmt: skip
    seg = build_seg(_mask(_affine(), 3), source, segments, description=DESCRIPTION)
    first = _instances(source)[0]
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName"):
        assert seg[keyword].value == first[keyword].value
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert len(referenced.ReferencedInstanceSequence) == SHAPE[2]

    described = seg.SegmentSequence
    assert [s.SegmentNumber for s in described] == [1, 2, 3]
    assert [s.SegmentLabel for s in described] == ["brain", "heartish", "unknown"]
    types = [s.SegmentedPropertyTypeCodeSequence[0] for s in described]
    assert [(t.CodingSchemeDesignator, t.CodeValue) for t in types] == [
        ("SCT", "12738006"),  # the default of the class name
        ("SCT", "80891009"),  # the spec's
        (GENERIC.scheme, GENERIC.value),  # nothing known: generic, labelled by name
    ]
    categories = [s.SegmentedPropertyCategoryCodeSequence[0].CodeValue for s in described]
    assert categories == ["91723000", "91723000", "85756007"]
    for segment in described:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == "sitefit"
        assert algorithm.AlgorithmVersion == sitefit.__version__
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        parameters = dict(p.split("=") for p in algorithm.AlgorithmParameters.split(","))
        assert parameters == {"model": "tiny-brain@2", "mode": "adapt",
                              "site_version_used": "3", "site_version_saved": "4"}  # fmt: skip
    assert seg.SeriesDescription == "sitefit tiny-brain@2 adapt kept SC 0.91"
    assert seg.ContentDescription == "mode adapt, guard kept, self-consistency 0.913, site v3->v4"
    assert seg.Manufacturer == "sitefit" and seg.SoftwareVersions == sitefit.__version__


def test_descriptions_fit_their_value_representation() -> None:
    long = SegDescription("m" * 64 + "@12", "cached", None, 0.5, 7, None)
    assert len(long.series_description()) == 64 and long.series_description().startswith("sit")
    assert len(long.content_description()) <= 64
    assert long.content_description() == "mode cached, self-consistency 0.500, site v7"
    bare = SegDescription("m@1")
    assert bare.series_description() == "sitefit m@1"
    assert bare.content_description() == "sitefit m@1" and bare.parameters() == {"model": "m@1"}
    nan = SegDescription("m@1", "none", self_consistency=float("nan"))
    assert nan.series_description() == "sitefit m@1 none"


def test_empty_frames_are_kept_unless_told(tmp_path: Path) -> None:
    source = _series(tmp_path, _affine())
    mask = _mask(_affine(), 1)
    kept = write_seg(mask, source, BRAIN, tmp_path / "kept.dcm", description=DESCRIPTION)
    assert kept.NumberOfFrames == SHAPE[2]
    omitted = write_seg(mask, source, BRAIN, tmp_path / "omitted.dcm", description=DESCRIPTION,
                        omit_empty_frames=True)  # fmt: skip
    assert omitted.NumberOfFrames == SHAPE[2] - 2  # the first and last slices are empty
    assert_seg_follows_mask(tmp_path / "omitted.dcm", source, mask, omitted=True)


@pytest.mark.parametrize("omit", [False, True])
def test_an_all_empty_mask_is_a_valid_seg(tmp_path: Path, omit: bool) -> None:
    source = _series(tmp_path, _affine(oblique=True))
    empty = nib.Nifti1Image(np.zeros(SHAPE, np.uint8), _affine(oblique=True))
    out = tmp_path / "seg.dcm"
    seg = write_seg(empty, source, HEART, out, description=DESCRIPTION, omit_empty_frames=omit)
    assert seg.NumberOfFrames == 3 * SHAPE[2]
    frames = seg_frames(out, source)
    assert all(not frame.any() for frame in frames.values())
    assert dciodvfy_errors(out) == []


def test_the_seg_file_is_private_and_whole(tmp_path: Path) -> None:
    source = _series(tmp_path, _affine())
    out = tmp_path / "seg.dcm"
    write_seg(_mask(_affine(), 1), source, BRAIN, out, description=DESCRIPTION)
    assert stat.S_IMODE(os.stat(out).st_mode) == JOB_FILE_MODE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm", "series-shuffled"]
    assert pydicom.dcmread(out).SOPClassUID == SegmentationStorage


def test_a_float_mask_of_whole_labels_is_accepted(tmp_path: Path) -> None:
    source = _series(tmp_path, _affine())
    mask = _mask(_affine(), 1)
    as_float = nib.Nifti1Image(np.asarray(mask.dataobj).astype(np.float32), mask.affine)
    out = tmp_path / "seg.dcm"
    write_seg(as_float, source, BRAIN, out, description=DESCRIPTION)
    assert_seg_follows_mask(out, source, mask)


def _shifted(affine: npt.NDArray[np.float64], voxels: float) -> npt.NDArray[np.float64]:
    moved = affine.copy()
    moved[:3, 3] += voxels * affine[:3, 2]
    return moved


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (lambda: _mask(_shifted(_affine(), 1), 1), "not on the source series' voxel grid"),
        (lambda: _mask(_shifted(_affine(), 0.3), 1), "not on the source series' voxel grid"),
        (lambda: nib.Nifti1Image(np.zeros((14, 12, 8), np.uint8), _affine()), "voxel grid"),
        (lambda: _mask(_affine(oblique=True), 1), "not on the source series' voxel grid"),
        (lambda: _mask(_affine(), 2), "labels outside 0..1"),
        (lambda: nib.Nifti1Image(np.full(SHAPE, 0.5, np.float32), _affine()), "not label"),
        (lambda: nib.Nifti1Image(np.zeros((*SHAPE, 2), np.uint8), _affine()), "4 dimensions"),
    ],
)
def test_masks_off_the_series_or_its_segments_are_refused(
    tmp_path: Path, mask: Any, message: str
) -> None:
    source = _series(tmp_path, _affine())
    with pytest.raises(InvalidInputError, match=message) as refused:
        build_seg(mask(), source, BRAIN, description=DESCRIPTION)
    assert str(refused.value).startswith("DICOM SEG: ")


def test_source_folders_that_are_not_one_series_are_refused(tmp_path: Path) -> None:
    mask = _mask(_affine(), 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match="holds no DICOM files"):
        build_seg(mask, empty, BRAIN, description=DESCRIPTION)

    source = _series(tmp_path, _affine())
    (source / "notes.txt").write_text("not DICOM")
    with pytest.raises(InvalidInputError, match=r"source file #\d+ is not a DICOM file"):
        build_seg(mask, source, BRAIN, description=DESCRIPTION)
    (source / "notes.txt").unlink()

    other = _series(tmp_path / "other", _affine())
    shutil.copy(next(other.iterdir()), source / "zz-other.dcm")
    with pytest.raises(InvalidInputError, match="more than one series") as refused:
        build_seg(mask, source, BRAIN, description=DESCRIPTION)
    uids = {str(i.SeriesInstanceUID) for i in _instances(source)}
    assert not any(uid in str(refused.value) for uid in uids)  # no header values in messages
    (source / "zz-other.dcm").unlink()

    middle = next(p for p in source.iterdir() if pydicom.dcmread(p).InstanceNumber == 5)
    middle.unlink()
    with pytest.raises(InvalidInputError, match="not one regularly spaced stack"):
        build_seg(mask, source, BRAIN, description=DESCRIPTION)


def test_an_instance_present_twice_counts_once(tmp_path: Path) -> None:
    """As in sitefit.dicom: a PACS may send an instance again."""
    source = _series(tmp_path, _affine())
    shutil.copy(sorted(source.iterdir())[0], source / "9999.dcm")
    mask = _mask(_affine(), 1)
    out = tmp_path / "seg.dcm"
    write_seg(mask, source, BRAIN, out, description=DESCRIPTION)
    assert_seg_follows_mask(out, source, mask)


def test_segments_must_number_the_foreground_classes(tmp_path: Path) -> None:
    source = _series(tmp_path, _affine())
    code = DEFAULT_CODES["brain"]
    with pytest.raises(InvalidInputError, match="segment numbers must be 1, 2"):
        build_seg(_mask(_affine(), 1), source, [SegmentSpec(2, "brain", code)],
                  description=DESCRIPTION)  # fmt: skip
    with pytest.raises(InvalidInputError, match="no foreground class"):
        build_seg(_mask(_affine(), 1), source, [], description=DESCRIPTION)
