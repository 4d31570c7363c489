"""DICOM series zip -> volume: geometry, rescale, sorting, and everything refused (no PHI)."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest

from sitefit.dicom import read_series_zip, series_zip_to_nifti
from sitefit.exceptions import InvalidInputError
from sitefit.job_store import JobStorageError
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
    assert "non-image" in message and "member #" in message


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
    twice = [*slices[:3], slices[2]]
    twice_zip = write_zip(tmp_path / "dup.zip", [(f"{i}.dcm", s) for i, s in enumerate(twice)])
    assert "share a position" in _refusal(twice_zip)


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
def test_refuses_malformed_header_values_naming_member_and_keyword(
    tmp_path: Path, keyword: str, damage: Any
) -> None:
    slices = dicom_slices(_volume(), _oblique_affine(), slope=2.0, intercept=-100.0)
    slices[2] = damage(slices[2], keyword)
    message = _refusal(series_zip(tmp_path / "bad.zip", slices))
    assert "member #3" in message and keyword in message
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
        assert "member #7 is a non-image" in run.stdout
    else:  # a usable series
        assert run.stdout.strip() == "converted" and out.exists()
    assert "DOE" not in run.stdout + run.stderr, run.stderr[-2000:]
