"""DICOM series (zip or directory) -> volume: geometry, rescale, sorting, duplicates, and
everything refused (no PHI)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    EnhancedMRImageStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SegmentationStorage,
    generate_uid,
)

from sitefit.dicom import (
    extract_series_zip,
    read_series_dir,
    read_series_zip,
    series_dir_to_nifti,
    series_zip_to_nifti,
)
from sitefit.exceptions import InvalidInputError
from sitefit.job_store import JOB_FILE_MODE, JobStorageError
from sitefit.phantoms.dicom_series import SeriesIds, write_dicom_series
from sitefit.volume import load_scan
from tests.server.payloads import (
    PATIENT_ID,
    PATIENT_NAME,
    dicom_slices,
    series_zip,
    structured_report,
    with_empty_element,
    with_text_value,
    write_zip,
)

MAX_VOXELS = 10**6


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(12.0)
    rotation = np.array(
        [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-20.0, 35.0, -7.5]
    return affine


def _volume(shape: tuple[int, int, int] = (7, 5, 6)) -> np.ndarray:
    stored = np.random.default_rng(3).integers(-300, 3000, size=shape)
    return stored * 2.0 - 100.0  # slope 2, intercept -100


def _canonical(data: np.ndarray, affine: np.ndarray) -> Any:
    return nib.as_closest_canonical(nib.Nifti1Image(data.astype(np.float32), affine))


@pytest.mark.parametrize("order", ["forward", "shuffled", "reversed"])
def test_series_volume_matches_source_grid_and_values(tmp_path: Path, order: str) -> None:
    volume, affine = _volume(), _oblique_affine()
    slices = dicom_slices(volume, affine, slope=2.0, intercept=-100.0)
    indices = list(range(len(slices)))
    if order == "shuffled":
        indices = list(np.random.default_rng(0).permutation(indices))
    elif order == "reversed":
        indices.reverse()
    result = read_series_zip(series_zip(tmp_path / "s.zip", slices, indices), MAX_VOXELS)

    expected = _canonical(volume, affine)
    got = _canonical(result.data, result.affine)
    np.testing.assert_allclose(got.affine, expected.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(expected.dataobj))
    assert result.slices == volume.shape[2]


def test_slices_against_the_normal_give_the_same_world_grid(tmp_path: Path) -> None:
    volume, affine = _volume(), _oblique_affine()
    flipped = affine.copy()
    flipped[:3, 2] *= -1  # slice k+1 lies *behind* slice k along the normal
    slices = dicom_slices(volume, flipped, slope=2.0, intercept=-100.0)
    result = read_series_zip(series_zip(tmp_path / "s.zip", slices), MAX_VOXELS)
    assert np.linalg.det(result.affine[:3, :3]) * np.linalg.det(flipped[:3, :3]) < 0
    got, expected = _canonical(result.data, result.affine), _canonical(volume, flipped)
    np.testing.assert_allclose(got.affine, expected.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(expected.dataobj))


def test_converted_nifti_loads_as_a_scan_without_phi(tmp_path: Path) -> None:
    volume, affine = _volume(), _oblique_affine()
    zipped = series_zip(tmp_path / "s.zip", dicom_slices(volume, affine, slope=2, intercept=-100))
    out = tmp_path / "scan.nii.gz"
    series_zip_to_nifti(zipped, out, MAX_VOXELS)
    scan = load_scan(out, MAX_VOXELS)
    assert sorted(scan.shape) == sorted(volume.shape)
    np.testing.assert_allclose(sorted(scan.spacing_mm), [0.8, 0.9, 2.5], atol=1e-4)
    raw = nib.load(out).header
    assert int(raw["qform_code"]) == 1 and int(raw["sform_code"]) == 1
    import gzip

    text = gzip.decompress(out.read_bytes())
    assert PATIENT_NAME.encode() not in text and PATIENT_ID.encode() not in text


def _refusal(path: Path) -> str:
    with pytest.raises(InvalidInputError) as caught:
        read_series_zip(path, MAX_VOXELS)
    message = str(caught.value)
    assert PATIENT_NAME not in message and "DOE" not in message and PATIENT_ID not in message
    return message


def test_refuses_two_series(tmp_path: Path) -> None:
    first = dicom_slices(_volume(), _oblique_affine())
    second = dicom_slices(_volume(), _oblique_affine())
    members = [(f"a/{i}.dcm", s) for i, s in enumerate(first)]
    members += [(f"b/{i}.dcm", s) for i, s in enumerate(second)]
    assert "more than one series" in _refusal(write_zip(tmp_path / "two.zip", members))


def test_refuses_non_image_objects(tmp_path: Path) -> None:
    slices = dicom_slices(_volume(), _oblique_affine())
    members = [(f"IM{i}.dcm", s) for i, s in enumerate(slices)] + [("SR.dcm", structured_report())]
    message = _refusal(write_zip(tmp_path / "sr.zip", members))
    assert "non-image" in message and "instance #7" in message


@pytest.mark.parametrize("name", ["../../etc/evil.dcm", "/abs/evil.dcm", "C:\\evil.dcm"])
def test_refuses_path_traversal_member_names(tmp_path: Path, name: str) -> None:
    slices = dicom_slices(_volume(), _oblique_affine())
    members = [(f"ok{i}.dcm", s) for i, s in enumerate(slices)] + [(name, slices[0])]
    assert "unsafe path" in _refusal(write_zip(tmp_path / "t.zip", members))


def test_refuses_zip_bomb_before_inflating(tmp_path: Path) -> None:
    bomb = write_zip(tmp_path / "bomb.zip", [("IM1.dcm", bytes(64 * 2**20))])
    assert bomb.stat().st_size < 2**20
    with pytest.raises(InvalidInputError, match="inflate to"):
        read_series_zip(bomb, max_voxels=1000)


def test_refuses_non_dicom_members_and_non_zips(tmp_path: Path) -> None:
    assert "not a DICOM" in _refusal(write_zip(tmp_path / "x.zip", [("a.txt", b"hello")] * 1))
    (tmp_path / "no.zip").write_bytes(b"not a zip at all")
    assert "not a readable zip" in _refusal(tmp_path / "no.zip")


def test_refuses_missing_slices_and_duplicates(tmp_path: Path) -> None:
    slices = dicom_slices(_volume((6, 5, 8)), _oblique_affine())
    gap = [s for i, s in enumerate(slices) if i != 3]
    assert "spacing varies" in _refusal(series_zip(tmp_path / "gap.zip", gap))
    twice = [*slices[:3], _with_new_instance_uid(slices[2])]  # a copy, not a re-sent instance
    twice_zip = write_zip(tmp_path / "dup.zip", [(f"{i}.dcm", s) for i, s in enumerate(twice)])
    assert "share a position" in _refusal(twice_zip)


def test_refuses_a_series_cut_off_at_its_end_by_the_count_its_instances_state(
    tmp_path: Path,
) -> None:
    image = nib.Nifti1Image(_volume((6, 5, 8)), np.diag([1.5, 1.5, 2.0, 1.0]))
    paths = write_dicom_series(image, tmp_path / "series")
    for path in paths[4:]:  # the first half arrived, evenly spaced: only the count tells
        path.unlink()
    with pytest.raises(InvalidInputError, match="incomplete: 4 of the 8"):
        read_series_dir(tmp_path / "series", 10**6)


def _with_new_instance_uid(data: bytes) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_refuses_more_voxels_than_allowed(tmp_path: Path) -> None:
    zipped = series_zip(tmp_path / "s.zip", dicom_slices(_volume(), _oblique_affine()))
    with pytest.raises(InvalidInputError, match="voxels"):
        read_series_zip(zipped, max_voxels=100)


@pytest.mark.parametrize(
    ("keyword", "damage"),
    [
        ("Rows", with_empty_element),
        ("Columns", with_empty_element),
        ("RescaleSlope", with_text_value),
        ("RescaleIntercept", with_text_value),
        ("NumberOfFrames", with_text_value),
    ],
)
def test_refuses_malformed_header_values_naming_instance_and_keyword(
    tmp_path: Path, keyword: str, damage: Any
) -> None:
    slices = dicom_slices(_volume(), _oblique_affine(), slope=2.0, intercept=-100.0)
    slices[2] = damage(slices[2], keyword)
    message = _refusal(series_zip(tmp_path / "bad.zip", slices))
    assert "instance #3" in message and keyword in message
    assert "\n" not in message and "abc" not in message


def test_conversion_to_a_missing_directory_is_a_storage_error(tmp_path: Path) -> None:
    zipped = series_zip(tmp_path / "s.zip", dicom_slices(_volume(), _oblique_affine()))
    out = tmp_path / "gone" / "scan.nii.gz"
    with pytest.raises(JobStorageError, match="cannot store the converted DICOM series") as caught:
        series_zip_to_nifti(zipped, out, MAX_VOXELS)
    assert not caught.value.disk_full and PATIENT_NAME not in str(caught.value)
    assert not out.parent.exists()


def test_conversion_leaves_no_temporary_file(tmp_path: Path) -> None:
    zipped = series_zip(tmp_path / "s.zip", dicom_slices(_volume(), _oblique_affine()))
    out = tmp_path / "out" / "scan.nii.gz"
    out.parent.mkdir()
    series_zip_to_nifti(zipped, out, MAX_VOXELS)
    assert [p.name for p in out.parent.iterdir()] == ["scan.nii.gz"]


def _damaged_copies(good: bytes) -> dict[str, bytes]:
    """The same series zip with its compressed data, its version field or a member name
    damaged (each raised an exception of the zip module's own through the reader)."""
    info = zipfile.ZipFile(io.BytesIO(good)).infolist()[0]
    data_at = info.header_offset + 30 + len(info.filename.encode())
    deflate = bytearray(good)
    for k in range(5):
        deflate[data_at + k] ^= 0xFF
    end = good.rfind(b"PK\x05\x06")
    directory_at = int.from_bytes(good[end + 16 : end + 20], "little")
    version = bytearray(good)
    version[directory_at + 6] = 99  # needs zip version 9.9 to extract
    name = bytearray(good)
    name[directory_at + 9] |= 0x08  # names are UTF-8 ...
    name[directory_at + 46] = 0xFF  # ... but this one is not
    return {"deflate": bytes(deflate), "version": bytes(version), "name": bytes(name)}


@pytest.mark.parametrize("damage", ["deflate", "version", "name"])
def test_a_damaged_zip_is_refused_not_an_error(tmp_path: Path, damage: str) -> None:
    slices = dicom_slices(_volume(), _oblique_affine())
    members = [(f"IM{i}.dcm", s) for i, s in enumerate(slices)]
    good = write_zip(tmp_path / "good.zip", members)
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(_damaged_copies(good.read_bytes())[damage])
    assert _refusal(damaged).startswith("DICOM zip: ")


PHI_UID = "1.2.3.DOE^JOHN.19700101"  # not a valid UID: pydicom's reading validation quotes it


def _series_with_phi_uid(tmp_path: Path, keyword: str) -> Path:
    """A series zip whose ``keyword`` holds :data:`PHI_UID` (built before any recording:
    pydicom warns about the value when it is written, too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if keyword == "SeriesInstanceUID":
            slices = dicom_slices(_volume(), _oblique_affine(), series=PHI_UID)
            return series_zip(tmp_path / "uid.zip", slices)
        if keyword == "SpecificCharacterSet":  # pydicom warns of it at each text element
            slices = []
            for data in dicom_slices(_volume(), _oblique_affine()):
                dataset = pydicom.dcmread(io.BytesIO(data))
                dataset.SpecificCharacterSet = "DOE^JOHN 1970"
                buffer = io.BytesIO()
                dataset.save_as(buffer, enforce_file_format=True)
                slices.append(buffer.getvalue())
            return series_zip(tmp_path / "charset.zip", slices)
        slices = dicom_slices(_volume(), _oblique_affine())
        report = pydicom.dcmread(io.BytesIO(structured_report()))
        report.SOPClassUID = PHI_UID
        buffer = io.BytesIO()
        report.save_as(buffer, enforce_file_format=True)
        members = [(f"IM{i}.dcm", s) for i, s in enumerate(slices)]
        members.append(("SR.dcm", buffer.getvalue()))
        return write_zip(tmp_path / "sr.zip", members)


# Convert a series in a fresh interpreter, as the server would: every log record at DEBUG and
# every warning (-W default: each at least once) go to stderr; prints what the call gave.
_CONVERT = """
import logging, sys
from pathlib import Path
from sitefit.dicom import series_zip_to_nifti
from sitefit.exceptions import InvalidInputError
logging.basicConfig(level=logging.DEBUG)
try:
    series_zip_to_nifti(Path(sys.argv[1]), Path(sys.argv[2]), 10**8)
    print("converted")
except InvalidInputError as error:
    print(error)
"""


@pytest.mark.parametrize("keyword", ["SeriesInstanceUID", "SpecificCharacterSet", "SOPClassUID"])
def test_header_values_reach_no_log_and_no_warning(tmp_path: Path, keyword: str) -> None:
    zipped = _series_with_phi_uid(tmp_path, keyword)
    out = tmp_path / "scan.nii.gz"
    run = subprocess.run(
        [sys.executable, "-W", "default", "-c", _CONVERT, str(zipped), str(out)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    if keyword == "SOPClassUID":  # read to name the non-image object's class, then refused
        assert "instance #7 is a non-image" in run.stdout
    else:  # a usable series
        assert run.stdout.strip() == "converted" and out.exists()
    assert "DOE" not in run.stdout + run.stderr, run.stderr[-2000:]


# -- a directory of instance files ---------------------------------------------------------------


def _phantom_series(out: Path, order: str = "ascending", **kwargs: Any) -> list[Path]:
    image = nib.Nifti1Image(_volume().astype(np.float32), _oblique_affine())
    return write_dicom_series(image, out, order=order, ids=_IDS, **kwargs)  # type: ignore[arg-type]


_IDS = SeriesIds()


def _write_dir(directory: Path, slices: list[bytes], names: list[str] | None = None) -> Path:
    directory.mkdir()
    for i, data in enumerate(slices):
        (directory / (names[i] if names else f"{i:04d}.dcm")).write_bytes(data)
    return directory


def _dir_refusal(directory: Path) -> str:
    with pytest.raises(InvalidInputError) as caught:
        read_series_dir(directory, MAX_VOXELS)
    message = str(caught.value)
    assert PATIENT_NAME not in message and "DOE" not in message and PATIENT_ID not in message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_a_directory_in_any_order_reads_as_the_ascending_one(tmp_path: Path, order: str) -> None:
    _phantom_series(tmp_path / "ascending")
    _phantom_series(tmp_path / order, order=order)
    expected = read_series_dir(tmp_path / "ascending", MAX_VOXELS)
    got = read_series_dir(tmp_path / order, MAX_VOXELS)
    np.testing.assert_array_equal(got.data, expected.data)
    np.testing.assert_allclose(got.affine, expected.affine, atol=1e-6)
    assert got.slices == expected.slices == 6
    assert (got.study_uid, got.series_uid) == (_IDS.study, _IDS.series)
    # the header is the lowest slice's, without its pixel data
    assert got.header.Manufacturer == "Phantom Medical" and "PixelData" not in got.header
    assert int(got.header.InstanceNumber) == 1
    # and the volume is the phantom's grid and values (to the 16-bit quantisation)
    want, have = _canonical(_volume(), _oblique_affine()), _canonical(got.data, got.affine)
    np.testing.assert_allclose(have.affine, want.affine, atol=1e-4)
    step = float(np.ptp(_volume())) / 65535
    np.testing.assert_allclose(np.asarray(have.dataobj), np.asarray(want.dataobj), atol=step)


def test_any_file_names_count_and_hidden_files_and_folders_do_not(tmp_path: Path) -> None:
    slices = dicom_slices(_volume(), _oblique_affine(), slope=2.0, intercept=-100.0)
    names = [f"{PATIENT_NAME}-{generate_uid()}" for _ in slices]  # no suffix, any order
    directory = _write_dir(tmp_path / "in", slices, names)
    (directory / ".DS_Store").write_bytes(b"not DICOM")
    (directory / "sub").mkdir()
    (directory / "sub" / "x.txt").write_bytes(b"not DICOM")
    result = read_series_dir(directory, MAX_VOXELS)
    got, expected = _canonical(result.data, result.affine), _canonical(_volume(), _oblique_affine())
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(expected.dataobj))
    (directory / "zz-notes.txt").write_bytes(b"hello")  # a visible non-DICOM file is refused
    assert "instance #7 is not a DICOM file" in _dir_refusal(directory)


def test_a_re_sent_instance_counts_once(tmp_path: Path) -> None:
    paths = _phantom_series(tmp_path / "in", order="shuffled")
    expected = read_series_dir(tmp_path / "in", MAX_VOXELS)
    for path in paths[:2]:  # the same instances again, under other names
        (tmp_path / "in" / f"resent-{path.name}").write_bytes(path.read_bytes())
    got = read_series_dir(tmp_path / "in", MAX_VOXELS)
    assert got.slices == expected.slices == len(paths)
    np.testing.assert_array_equal(got.data, expected.data)
    # a copy under a new SOPInstanceUID is another slice at the same position: refused
    copy = _with_new_instance_uid(paths[0].read_bytes())
    (tmp_path / "in" / "copy.dcm").write_bytes(copy)
    assert "share a position" in _dir_refusal(tmp_path / "in")


def _non_image(sop_class: str, *, pixels: bool) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(structured_report()))
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = sop_class
    if pixels:  # a SEG carries (bit-packed) pixel data and frames
        dataset.Modality = "SEG"
        dataset.Rows = dataset.Columns = 6
        dataset.NumberOfFrames = 2
        dataset.BitsAllocated, dataset.SamplesPerPixel = 1, 1
        dataset.PixelData = bytes(10)
        dataset["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


_NON_IMAGES = {
    "Basic Text SR Storage": structured_report,
    "Grayscale Softcopy Presentation State Storage": lambda: _non_image(
        GrayscaleSoftcopyPresentationStateStorage, pixels=False
    ),
    "Segmentation Storage": lambda: _non_image(SegmentationStorage, pixels=True),
}


@pytest.mark.parametrize("kind", list(_NON_IMAGES))
def test_non_image_objects_in_a_directory_are_refused(tmp_path: Path, kind: str) -> None:
    slices = dicom_slices(_volume(), _oblique_affine())
    directory = _write_dir(tmp_path / "in", [*slices[:3], _NON_IMAGES[kind](), *slices[3:]])
    message = _dir_refusal(directory)
    assert f"instance #4 is a non-image DICOM object ({kind})" in message


def test_an_enhanced_multi_frame_object_is_refused_with_the_reason(tmp_path: Path) -> None:
    dataset = pydicom.dcmread(io.BytesIO(dicom_slices(_volume(), _oblique_affine())[0]))
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    dataset.NumberOfFrames = 3
    dataset.SharedFunctionalGroupsSequence = [Dataset()]
    dataset.PerFrameFunctionalGroupsSequence = [Dataset(), Dataset(), Dataset()]
    dataset.PixelData = dataset.PixelData * 3
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    message = _dir_refusal(_write_dir(tmp_path / "in", [buffer.getvalue()]))
    assert "instance #1 is an enhanced multi-frame object (Enhanced MR Image Storage)" in message
    assert "not supported" in message and "single-frame" in message


def _tilted_affine(degrees: float) -> np.ndarray:
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[1, 2] = 2.5 * np.tan(np.deg2rad(degrees))  # slices shift along y as they go up z
    return affine


def test_refuses_gantry_tilt_but_not_rounded_positions(tmp_path: Path) -> None:
    tilted = dicom_slices(_volume(), _tilted_affine(10.0))
    assert "gantry tilt" in _dir_refusal(_write_dir(tmp_path / "tilt", tilted))
    # positions written to 0.01 mm, as many scanners do, are no tilt
    rounded = []
    for data in dicom_slices(_volume(), _oblique_affine()):
        dataset = pydicom.dcmread(io.BytesIO(data))
        dataset.ImagePositionPatient = [round(float(v), 2) for v in dataset.ImagePositionPatient]
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        rounded.append(buffer.getvalue())
    assert read_series_dir(_write_dir(tmp_path / "rounded", rounded), MAX_VOXELS).slices == 6


def test_refuses_mixed_orientations_and_image_sizes(tmp_path: Path) -> None:
    series = generate_uid()
    slices = dicom_slices(_volume(), _oblique_affine(), series=series)
    rotated = _oblique_affine()
    rotated[:3, :3] = rotated[:3, :3] @ np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])
    other = dicom_slices(_volume(), rotated, series=series)
    mixed = [*slices[:2], other[2], *slices[3:]]
    assert "has another orientation" in _dir_refusal(_write_dir(tmp_path / "plane", mixed))
    smaller = dicom_slices(_volume((5, 5, 6)), _oblique_affine(), series=series)
    mixed = [*slices[:4], smaller[4], slices[5]]
    assert "instance #5 has another image size" in _dir_refusal(
        _write_dir(tmp_path / "size", mixed)
    )


def test_refuses_several_series_in_a_directory(tmp_path: Path) -> None:
    slices = dicom_slices(_volume(), _oblique_affine())
    others = dicom_slices(_volume(), _oblique_affine())
    directory = _write_dir(tmp_path / "in", [*slices, *others])
    assert "more than one series" in _dir_refusal(directory)


def test_refuses_intensities_that_are_not_finite_after_the_rescale(tmp_path: Path) -> None:
    stored = np.random.default_rng(1).integers(1, 100, size=(7, 5, 6)) * 1.0
    slices = dicom_slices(stored * 1e38, _oblique_affine(), slope=1e38)  # > float32's max
    message = _dir_refusal(_write_dir(tmp_path / "in", slices))
    assert "instance #1: rescaled intensities are not finite" in message


def test_refuses_a_constant_volume(tmp_path: Path) -> None:
    slices = dicom_slices(np.full((7, 5, 6), 40.0), _oblique_affine(), slope=2.0)
    message = _dir_refusal(_write_dir(tmp_path / "in", slices))
    assert message == (
        "DICOM series: every voxel has the value 40; expected an image with contrast"
    )


def test_refuses_an_empty_directory_and_too_many_voxels(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no files" in _dir_refusal(tmp_path / "empty")
    _phantom_series(tmp_path / "in")
    with pytest.raises(InvalidInputError, match="voxels"):
        read_series_dir(tmp_path / "in", max_voxels=100)


def test_a_missing_directory_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(JobStorageError, match="cannot read the DICOM series directory"):
        read_series_dir(tmp_path / "gone", MAX_VOXELS)


@pytest.mark.usefixtures("umask_022")
def test_extract_series_zip_writes_numbered_private_files(tmp_path: Path) -> None:
    slices = dicom_slices(_volume(), _oblique_affine())
    members = [("__MACOSX/._IM0.dcm", b"junk"), ("folder/", b"")]
    members += [(f"folder/{PATIENT_NAME}{i}.dcm", s) for i, s in enumerate(slices)]
    zipped = write_zip(tmp_path / "s.zip", members)
    out = tmp_path / "dicom"
    assert extract_series_zip(zipped, out, MAX_VOXELS) == len(slices)
    files = sorted(out.iterdir())
    assert [p.name for p in files] == [f"{i:04d}.dcm" for i in range(1, len(slices) + 1)]
    assert [p.read_bytes() for p in files] == slices
    assert all(stat.S_IMODE(p.stat().st_mode) == JOB_FILE_MODE for p in files)
    assert stat.S_IMODE(out.stat().st_mode) & 0o007 == 0
    out_nifti = tmp_path / "scan.nii.gz"
    volume = series_dir_to_nifti(out, out_nifti, MAX_VOXELS)
    scan = load_scan(out_nifti, MAX_VOXELS)
    assert sorted(scan.shape) == sorted(_volume().shape) and volume.slices == len(slices)
    assert [p.read_bytes() for p in sorted(out.iterdir())] == slices  # the instances stay


def test_extracting_into_a_missing_parent_is_a_storage_error(tmp_path: Path) -> None:
    zipped = series_zip(tmp_path / "s.zip", dicom_slices(_volume(), _oblique_affine()))
    with pytest.raises(JobStorageError, match="cannot create the DICOM directory"):
        extract_series_zip(zipped, tmp_path / "gone" / "dicom", MAX_VOXELS)


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)  # the usual umask: it alone would make new files world-readable
    try:
        yield
    finally:
        os.umask(previous)
