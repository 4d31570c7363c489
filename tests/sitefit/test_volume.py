"""Volume I/O and geometry: exact round trips for oblique inputs, clear errors, array helpers."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest
from nibabel.orientations import aff2axcodes

from sitefit.exceptions import InvalidInputError, VolumeContentError, VolumeReadError
from sitefit.volume import (
    from_slices,
    load_label_map,
    load_scan,
    mask_to_image,
    minmax_normalize,
    pad_to_multiple,
    read_header,
    save_image_atomic,
    to_slices,
)

MAX_VOXELS = 10**6
PHI = b"DOE^JANE 1970-01-01"
TEXT_FIELDS = ("descrip", "aux_file", "db_name", "data_type", "intent_name")
_DIRECTIONS = {
    "R": (1, 0, 0),
    "L": (-1, 0, 0),
    "A": (0, 1, 0),
    "P": (0, -1, 0),
    "S": (0, 0, 1),
    "I": (0, 0, -1),
}


def _rotation(axis: tuple[float, float, float], degrees: float) -> npt.NDArray[np.float64]:
    k = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    theta = np.deg2rad(degrees)
    return np.eye(3) + np.sin(theta) * cross + (1 - np.cos(theta)) * cross @ cross


def _affine(
    codes: str = "PIR",
    zooms: tuple[float, float, float] = (0.8, 1.5, 3.0),
    degrees: float = 20.0,
) -> npt.NDArray[np.float64]:
    """Voxel-to-world affine with the given axis codes, zooms and an oblique rotation."""
    columns = np.array([_DIRECTIONS[c] for c in codes], np.float64).T * np.asarray(zooms)
    affine = np.eye(4)
    affine[:3, :3] = _rotation((0.3, 0.2, 0.93), degrees) @ columns
    affine[:3, 3] = (12.5, -30.0, 7.25)
    return affine


def _write(
    path: Path,
    data: npt.NDArray[Any],
    affine: npt.NDArray[np.float64] | None = None,
    *,
    qform_code: int = 1,
    sform_code: int = 2,
) -> Path:
    """Save ``data`` with distinct qform (code 1) and sform (code 2, shifted 0.5 mm)."""
    affine = _affine() if affine is None else affine
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=qform_code)
    sform = affine.copy()
    sform[:3, 3] += 0.5
    image.set_sform(sform, code=sform_code)
    for field in TEXT_FIELDS:  # every free-text field of the header holds PHI
        image.header[field] = PHI[:16] if field in ("intent_name", "data_type") else PHI
    nib.save(image, str(path))
    return path


def _scan_data(shape: tuple[int, ...] = (5, 6, 7)) -> npt.NDArray[np.float32]:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) * 0.5 - 3.0


def _check_message(error: pytest.ExceptionInfo[Exception], path: Path, *words: str) -> None:
    message = str(error.value)
    assert message.startswith(f"{path.name}: "), message
    assert "\n" not in message
    assert str(path.parent) not in message
    assert "DOE" not in message
    assert "expected" in message
    for word in words:
        assert word in message, message


# --- geometry and round trips -------------------------------------------------------------


@pytest.mark.parametrize(
    ("codes", "zooms", "degrees"),
    [
        ("PIR", (0.8, 1.5, 3.0), 20.0),
        ("LPS", (0.7, 0.7, 2.5), 20.0),
        ("LAS", (1.0, 1.2, 2.0), -15.0),  # negative determinant: qfac -1
        ("SRA", (2.0, 0.9, 1.1), 0.0),
    ],
)
def test_round_trip_oblique_non_ras(
    tmp_path: Path, codes: str, zooms: tuple[float, float, float], degrees: float
) -> None:
    affine = _affine(codes, zooms, degrees)
    assert aff2axcodes(affine) == tuple(codes)
    data = _scan_data()
    source_path = _write(tmp_path / "scan.nii.gz", data, affine)
    original = nib.load(source_path)

    scan = load_scan(source_path, MAX_VOXELS)
    assert scan.data.dtype == np.float32
    assert scan.data.flags.c_contiguous
    assert aff2axcodes(scan.affine) == ("R", "A", "S")
    reference = nib.as_closest_canonical(original)
    np.testing.assert_array_equal(scan.data, reference.get_fdata())
    np.testing.assert_allclose(scan.affine, reference.affine, atol=1e-9)

    marked = (1, 4, 2)
    mask = np.zeros(scan.data.shape, np.uint8)
    mask[marked] = 1
    mask[0, 0, 0] = 2
    out_path = tmp_path / "out" / "mask.nii.gz"
    out_path.parent.mkdir()
    save_image_atomic(mask_to_image(mask, scan.source), out_path)
    reloaded = nib.load(out_path)

    assert reloaded.shape == original.shape
    assert reloaded.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(reloaded.affine, original.affine)
    np.testing.assert_array_equal(reloaded.header.get_qform(), original.header.get_qform())
    np.testing.assert_array_equal(reloaded.header.get_sform(), original.header.get_sform())
    for field in ("qform_code", "sform_code", "pixdim", "quatern_b", "quatern_c", "quatern_d"):
        np.testing.assert_array_equal(reloaded.header[field], original.header[field])
    assert int(reloaded.header["qform_code"]) == 1
    assert int(reloaded.header["sform_code"]) == 2
    assert aff2axcodes(reloaded.affine) == tuple(codes)
    assert all(reloaded.header[field].item() == b"" for field in TEXT_FIELDS)
    assert b"DOE" not in gzip.decompress(out_path.read_bytes())
    assert list(tmp_path.joinpath("out").iterdir()) == [out_path]

    # the voxel marked in canonical space lands on the same world coordinate
    stored = np.asarray(reloaded.dataobj)
    (index,) = np.argwhere(stored == 1)
    world_canonical = scan.affine @ np.array([*marked, 1.0])
    world_stored = reloaded.affine @ np.array([*index, 1.0])
    np.testing.assert_allclose(world_stored, world_canonical, atol=1e-6)
    # and it is the voxel whose intensity the scan had there
    assert data[tuple(index)] == scan.data[marked]
    assert np.count_nonzero(stored) == 2


def test_nifti2_round_trip(tmp_path: Path) -> None:
    affine = _affine("PIR", (0.8, 1.5, 3.0), 20.0)
    source = nib.Nifti2Image(_scan_data(), affine)
    source.set_qform(affine, code=1)
    source.set_sform(affine, code=2)
    path = tmp_path / "scan.nii.gz"
    nib.save(source, str(path))
    scan = load_scan(path, MAX_VOXELS)
    assert scan.data.shape == (7, 5, 6)
    mask = (scan.data > 20).astype(np.uint8)
    image = mask_to_image(mask, scan.source)
    assert isinstance(image, nib.Nifti2Image)
    save_image_atomic(image, tmp_path / "mask.nii.gz")
    reloaded = nib.load(tmp_path / "mask.nii.gz")
    original = nib.load(path)
    assert isinstance(reloaded, nib.Nifti2Image)
    np.testing.assert_array_equal(reloaded.affine, original.affine)
    np.testing.assert_array_equal(reloaded.header.get_qform(), original.header.get_qform())
    np.testing.assert_array_equal(np.asarray(reloaded.dataobj), _scan_data() > 20)


def test_spacing_is_in_canonical_order(tmp_path: Path) -> None:
    path = _write(tmp_path / "scan.nii", _scan_data((5, 6, 7)), _affine("PIR", (0.8, 1.5, 3.0)))
    geometry = read_header(path, MAX_VOXELS)
    assert geometry.shape == (5, 6, 7)
    assert geometry.axcodes == ("P", "I", "R")
    assert geometry.canonical_shape == (7, 5, 6)  # R <- axis 2, A <- axis 0, S <- axis 1
    assert geometry.qform_code == 1
    assert geometry.sform_code == 2
    scan = load_scan(path, MAX_VOXELS)
    assert scan.data.shape == (7, 5, 6)
    np.testing.assert_allclose(scan.spacing_mm, (3.0, 0.8, 1.5), rtol=1e-6)


def test_spacing_honours_spatial_units(tmp_path: Path) -> None:
    image = nib.Nifti1Image(_scan_data(), np.diag([0.001, 0.002, 0.003, 1.0]))
    image.header.set_xyzt_units("meter")
    path = tmp_path / "metres.nii"
    nib.save(image, str(path))
    np.testing.assert_allclose(load_scan(path, MAX_VOXELS).spacing_mm, (1.0, 2.0, 3.0))


def test_scaling_and_big_endian_storage(tmp_path: Path) -> None:
    stored = np.arange(120, dtype=np.int16).reshape(4, 5, 6)
    header = nib.Nifti1Header(endianness=">")
    header.set_data_dtype(np.int16)
    image = nib.Nifti1Image(stored, np.eye(4), header=header)
    image.header.set_slope_inter(2.0, 10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(image, str(path))
    assert nib.load(path).header.endianness == ">"
    scan = load_scan(path, MAX_VOXELS)
    np.testing.assert_array_equal(scan.data, stored * 2.0 + 10.0)


def test_trailing_singleton_4d_is_accepted_as_3d(tmp_path: Path) -> None:
    path = _write(tmp_path / "scan.nii.gz", _scan_data((5, 6, 7, 1)))
    scan = load_scan(path, MAX_VOXELS)
    assert scan.data.shape == (7, 5, 6)
    image = mask_to_image(np.ones(scan.data.shape, np.uint8), scan.source)
    assert image.shape == (5, 6, 7)


def test_read_header_reads_no_voxel_data(tmp_path: Path) -> None:
    """A .nii.gz whose data is missing passes the header check; loading it fails."""
    header = nib.Nifti1Header()
    header.set_data_shape((16, 16, 16))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    assert read_header(path, MAX_VOXELS).shape == (16, 16, 16)
    with pytest.raises(VolumeReadError) as error:
        load_scan(path, MAX_VOXELS)
    _check_message(error, path, "truncated")


# --- errors -------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.nii.gz"
    with pytest.raises(VolumeReadError) as error:
        read_header(path, MAX_VOXELS)
    _check_message(error, path, "not found")


@pytest.mark.parametrize("name", ["empty.nii", "empty.nii.gz"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(VolumeReadError) as error:
        load_scan(path, MAX_VOXELS)
    _check_message(error, path, "empty")


@pytest.mark.parametrize("cut", [4, 1000])
def test_truncated_gzip(tmp_path: Path, cut: int) -> None:
    data = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    path = _write(tmp_path / "scan.nii.gz", data)
    path.write_bytes(path.read_bytes()[:-cut])
    read_header(path, MAX_VOXELS)  # the header is intact: only loading can tell
    with pytest.raises(VolumeReadError) as error:
        load_scan(path, MAX_VOXELS)
    _check_message(error, path, "truncated")


def test_corrupt_gzip(tmp_path: Path) -> None:
    data = np.random.default_rng(1).normal(size=(16, 16, 16)).astype(np.float32)
    path = _write(tmp_path / "scan.nii.gz", data)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    with pytest.raises(VolumeReadError) as error:
        load_scan(path, MAX_VOXELS)
    _check_message(error, path, "corrupt")


def test_truncated_uncompressed_fails_at_header_check(tmp_path: Path) -> None:
    path = _write(tmp_path / "scan.nii", _scan_data())
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(VolumeReadError) as error:
        read_header(path, MAX_VOXELS)
    _check_message(error, path, "truncated")


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("text.nii", b"this is not an image\n" * 40, ("not a NIfTI",)),
        ("text.nii.gz", gzip.compress(b"this is not an image\n" * 40), ("not a NIfTI",)),
        ("plain.nii.gz", b"this is not an image\n" * 40, ("not gzip-compressed",)),
        ("packed.nii", gzip.compress(b"\0" * 400), ("gzip-compressed", ".nii.gz")),
    ],
)
def test_not_a_nifti(tmp_path: Path, name: str, content: bytes, words: tuple[str, ...]) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(VolumeReadError) as error:
        read_header(path, MAX_VOXELS)
    _check_message(error, path, *words)


def test_analyze_pair_header_is_refused(tmp_path: Path) -> None:
    image = nib.Nifti1Pair(_scan_data(), np.eye(4))
    nib.save(image, str(tmp_path / "pair.img"))
    path = tmp_path / "pair.nii"
    path.write_bytes((tmp_path / "pair.hdr").read_bytes())
    with pytest.raises(VolumeReadError) as error:
        read_header(path, MAX_VOXELS)
    _check_message(error, path, ".hdr/.img")


@pytest.mark.parametrize("name", ["scan.mha", "scan.nii.bz2", "scan.img", "scan"])
def test_wrong_suffix(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / "scan.nii", _scan_data()).rename(tmp_path / name)
    with pytest.raises(VolumeReadError) as error:
        load_scan(path, MAX_VOXELS)
    _check_message(error, path, ".nii or .nii.gz")


def test_upper_case_suffix_is_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path / "SCAN.NII.GZ", _scan_data())
    assert load_scan(path, MAX_VOXELS).data.shape == (7, 5, 6)


def test_2d_image(tmp_path: Path) -> None:
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(_scan_data((64, 64)), np.eye(4)), str(path))
    with pytest.raises(VolumeContentError) as error:
        read_header(path, MAX_VOXELS)
    assert str(error.value) == "scan.nii.gz: expected a 3D image, got shape (64, 64) (2D)"


def test_single_slice_3d_image(tmp_path: Path) -> None:
    path = _write(tmp_path / "scan.nii.gz", _scan_data((64, 64, 1)))
    with pytest.raises(VolumeContentError) as error:
        read_header(path, MAX_VOXELS)
    _check_message(error, path, "(64, 64, 1)", "at least 2 voxels")


def test_real_4d_image(tmp_path: Path) -> None:
    path = _write(tmp_path / "scan.nii.gz", _scan_data((5, 6, 7, 3)))
    with pytest.raises(VolumeContentError) as error:
        read_header(path, MAX_VOXELS)
    _check_message(error, path, "3D image", "(5, 6, 7, 3)", "(4D)")


@pytest.mark.parametrize(("bad", "word"), [(np.nan, "NaN"), (np.inf, "infinite")])
def test_non_finite_voxels(tmp_path: Path, bad: float, word: str) -> None:
    data = _scan_data()
    data[1, 2, 3] = bad
    data[4, 0, 6] = bad
    path = _write(tmp_path / "scan.nii.gz", data)
    with pytest.raises(VolumeContentError) as error:
        load_scan(path, MAX_VOXELS)
    _check_message(error, path, f"2 {word} voxels", "finite")


def test_constant_image(tmp_path: Path) -> None:
    path = _write(tmp_path / "scan.nii.gz", np.full((5, 6, 7), 7.0, np.float32))
    with pytest.raises(VolumeContentError) as error:
        load_scan(path, MAX_VOXELS)
    _check_message(error, path, "every voxel has the value 7")


def test_complex_voxels_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "complex.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.complex64), np.eye(4)), str(path))
    with pytest.raises(VolumeContentError) as error:
        read_header(path, MAX_VOXELS)
    _check_message(error, path, "complex")


def _header_only(path: Path, shape: tuple[int, ...], padding: bytes = b"\0" * 4) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + padding))
    return path


def test_huge_header_fails_fast_without_reading_data(tmp_path: Path) -> None:
    # NIfTI-1 stores dims as int16, so 10^5 per axis cannot be written; 30000^3 (2.7e13 voxels,
    # 108 TB of float32) is the same claim within the format.
    path = _header_only(tmp_path / "huge.nii.gz", (30000, 30000, 30000))
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(VolumeContentError) as error:
            load_scan(path, 512**3)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _check_message(error, path, "27,000,000,000,000 voxels", "at most 134,217,728")
    assert elapsed < 1.0
    assert peak < 4 * 2**20


def test_nifti2_header_claiming_10_to_the_5_per_axis(tmp_path: Path) -> None:
    header = nib.Nifti2Header()
    header.set_data_shape((10**5, 10**5, 10**5))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 544
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    started = time.perf_counter()
    with pytest.raises(VolumeContentError) as error:
        load_scan(path, 512**3)
    assert time.perf_counter() - started < 1.0
    _check_message(error, path, "1,000,000,000,000,000 voxels")


def test_nifti1_dims_overflowing_int16_are_refused(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 8))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    block = bytearray(header.binaryblock)
    for axis in range(3):  # dim[1..3] = 10^5 written as int16 wraps to -31072
        block[42 + 2 * axis : 44 + 2 * axis] = (10**5 % 2**16).to_bytes(2, "little")
    path = tmp_path / "wrapped.nii.gz"
    path.write_bytes(gzip.compress(bytes(block) + b"\0" * 4))
    with pytest.raises(VolumeContentError) as error:
        read_header(path, 512**3)
    _check_message(error, path, "(-31072, -31072, -31072)", "positive")


def test_gzip_bomb_is_not_decompressed(tmp_path: Path) -> None:
    # 64 MiB of zeros behind a header claiming 256^3 float32 voxels: refused from the header.
    path = _header_only(tmp_path / "bomb.nii.gz", (256, 256, 256), b"\0" * (4 + 64 * 2**20))
    tracemalloc.start()
    try:
        with pytest.raises(VolumeContentError):
            load_scan(path, 100**3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20


def test_messages_never_quote_header_text(tmp_path: Path) -> None:
    data = np.zeros((5, 6, 7), np.float32)
    path = _write(tmp_path / "scan.nii.gz", data)
    assert nib.load(path).header["descrip"].item() == PHI
    with pytest.raises(VolumeContentError) as error:
        load_scan(path, MAX_VOXELS)
    _check_message(error, path)
    assert read_header(tmp_path / "scan.nii.gz", MAX_VOXELS).header["descrip"].item() == b""


# --- label maps ---------------------------------------------------------------------------


def _labels(shape: tuple[int, int, int] = (5, 6, 7)) -> npt.NDArray[np.int16]:
    return (np.arange(np.prod(shape)) % 4).reshape(shape).astype(np.int16)


def test_label_map_round_trip_and_other_voxel_order(tmp_path: Path) -> None:
    scan = load_scan(_write(tmp_path / "scan.nii.gz", _scan_data()), MAX_VOXELS)
    labels = _labels()
    expected = nib.as_closest_canonical(nib.Nifti1Image(labels, _affine())).get_fdata()
    same_order = load_label_map(_write(tmp_path / "label.nii.gz", labels), scan)
    assert same_order.dtype == np.uint8
    np.testing.assert_array_equal(same_order, expected)
    # the same grid stored in canonical (RAS) order by another tool
    ras = nib.Nifti1Image(expected.astype(np.float32), scan.affine)
    nib.save(ras, str(tmp_path / "label_ras.nii"))
    np.testing.assert_array_equal(load_label_map(tmp_path / "label_ras.nii", scan), expected)


def test_label_map_wrong_shape(tmp_path: Path) -> None:
    scan = load_scan(_write(tmp_path / "scan.nii.gz", _scan_data()), MAX_VOXELS)
    path = _write(tmp_path / "label.nii.gz", _labels((5, 6, 8)))
    with pytest.raises(VolumeContentError) as error:
        load_label_map(path, scan)
    _check_message(error, path, "(5, 6, 8)", "(5, 6, 7)", "does not match")


def test_label_map_wrong_affine(tmp_path: Path) -> None:
    scan = load_scan(_write(tmp_path / "scan.nii.gz", _scan_data()), MAX_VOXELS)
    shifted = _affine()
    shifted[:3, 3] += 2.0
    path = _write(tmp_path / "label.nii.gz", _labels(), shifted)
    with pytest.raises(VolumeContentError) as error:
        load_label_map(path, scan)
    _check_message(error, path, "affine differs", "2 mm")


@pytest.mark.parametrize(
    ("value", "words"),
    [(0.5, ("non-integer", "0.5")), (np.nan, ("NaN",)), (300.0, ("0 to 300", "0 to 255"))],
)
def test_label_map_bad_values(tmp_path: Path, value: float, words: tuple[str, ...]) -> None:
    scan = load_scan(_write(tmp_path / "scan.nii.gz", _scan_data()), MAX_VOXELS)
    labels = _labels().astype(np.float32)
    labels[2, 2, 2] = value
    path = _write(tmp_path / "label.nii.gz", labels)
    with pytest.raises(VolumeContentError) as error:
        load_label_map(path, scan)
    _check_message(error, path, *words)


# --- mask_to_image and save_image_atomic -------------------------------------------------


def test_mask_to_image_validates_the_mask(tmp_path: Path) -> None:
    scan = load_scan(_write(tmp_path / "scan.nii.gz", _scan_data()), MAX_VOXELS)
    with pytest.raises(VolumeContentError, match=r"mask shape \(5, 6, 7\).*\(7, 5, 6\)"):
        mask_to_image(np.zeros((5, 6, 7), np.uint8), scan.source)
    with pytest.raises(VolumeContentError, match="float32"):
        mask_to_image(np.zeros(scan.data.shape, np.float32), scan.source)
    with pytest.raises(VolumeContentError, match="256 to 256"):
        mask_to_image(np.full(scan.data.shape, 256, np.int32), scan.source)
    boolean = mask_to_image(np.ones(scan.data.shape, bool), scan.source)
    assert boolean.get_data_dtype() == np.uint8
    assert np.asarray(boolean.dataobj).all()


@pytest.mark.parametrize(("name", "gzipped"), [("mask.nii", False), ("mask.nii.gz", True)])
def test_save_compresses_as_the_name_says(tmp_path: Path, name: str, gzipped: bool) -> None:
    scan = load_scan(_write(tmp_path / "scan.nii.gz", _scan_data()), MAX_VOXELS)
    path = tmp_path / name
    save_image_atomic(mask_to_image(np.ones(scan.data.shape, np.uint8), scan.source), path)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") is gzipped
    assert nib.load(path).shape == (5, 6, 7)


def test_save_wrong_suffix(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    with pytest.raises(InvalidInputError, match=r"mask\.mha: .*\.nii or \.nii\.gz"):
        save_image_atomic(image, tmp_path / "mask.mha")


# Save a scan of random voxels (gzip cannot shrink it) where no file may pass 64 KiB
# (RLIMIT_FSIZE; the write fails with EFBIG partway, as on a disk that fills up).
_NO_ROOM = """
import resource, signal, sys
from pathlib import Path
import nibabel as nib, numpy as np
from sitefit.volume import save_image_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
data = np.random.default_rng(0).random((64, 64, 64)).astype(np.float32)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    save_image_atomic(nib.Nifti1Image(data, np.eye(4)), Path(sys.argv[1]))
except OSError as error:
    print(error.strerror)
"""


def test_save_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "mask.nii.gz"
    previous = b"previous complete file"
    path.write_bytes(previous)
    run = subprocess.run(
        [sys.executable, "-c", _NO_ROOM, str(path)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert run.stdout.strip() == "File too large", run.stderr
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


def test_save_gives_the_file_the_mode_asked_for(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    previous = os.umask(0o022)
    try:
        save_image_atomic(image, tmp_path / "mask.nii.gz", mode=0o640)
        save_image_atomic(image, tmp_path / "default.nii.gz")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "mask.nii.gz").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "default.nii.gz").stat().st_mode) == 0o644  # the umask's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default.nii.gz", "mask.nii.gz"]


# --- array helpers ------------------------------------------------------------------------


def test_minmax_normalize() -> None:
    volume = np.array([[[-3.0, 1.0], [5.0, 2.5]]], np.float64)
    before = volume.copy()
    out = minmax_normalize(volume)
    assert out.dtype == np.float32
    assert out.min() == 0.0
    assert out.max() == 1.0
    np.testing.assert_allclose(out, (volume + 3.0) / 8.0, rtol=1e-6)
    np.testing.assert_array_equal(volume, before)
    integers = minmax_normalize(np.arange(24, dtype=np.int16).reshape(2, 3, 4) * 1000)
    assert integers.dtype == np.float32
    assert (integers.min(), integers.max()) == (0.0, 1.0)
    wide = minmax_normalize(np.array([-3e38, 0.0, 3e38], np.float32))
    np.testing.assert_allclose(wide, [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_array_equal(minmax_normalize(np.full((2, 2, 2), 4.0)), 0.0)
    with pytest.raises(ValueError, match="finite"):
        minmax_normalize(np.array([0.0, np.nan]))


def test_pad_to_multiple_and_crop_back() -> None:
    slices = np.random.default_rng(2).normal(size=(3, 37, 50)).astype(np.float32) + 5.0
    padded, crop = pad_to_multiple(slices, 8)
    assert padded.shape == (3, 40, 56)
    assert padded.dtype == np.float32
    np.testing.assert_array_equal(padded[crop], slices)
    assert crop[1:] == (slice(1, 38), slice(3, 53))  # symmetric, odd remainder at the end
    outside = np.ones(padded.shape, bool)
    outside[crop] = False
    assert (padded[outside] == 0).all()

    square, crop = pad_to_multiple(slices, 8, square=True)
    assert square.shape == (3, 56, 56)
    np.testing.assert_array_equal(square[crop], slices)

    exact, crop = pad_to_multiple(slices[:, :32, :48], 16)
    assert exact.shape == (3, 32, 48)
    assert crop == (slice(None), slice(0, 32), slice(0, 48))

    single, crop = pad_to_multiple(np.ones((5, 7), np.uint8), 4)
    assert single.shape == (8, 8)
    assert single[crop].sum() == 35
    with pytest.raises(ValueError, match="multiple"):
        pad_to_multiple(slices, 0)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_to_slices_from_slices(axis: int) -> None:
    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    slices = to_slices(volume, axis)
    n = volume.shape[axis]
    assert slices.shape[0] == n
    assert slices.ndim == 3
    for j in range(n):
        np.testing.assert_array_equal(slices[j], np.take(volume, j, axis=axis))
    np.testing.assert_array_equal(from_slices(slices, axis), volume)
    processed = np.ascontiguousarray(slices) * 2
    np.testing.assert_array_equal(from_slices(processed, axis), volume * 2)
    with pytest.raises(ValueError, match="axis"):
        to_slices(volume, 3)
    with pytest.raises(ValueError, match="3D"):
        from_slices(volume[0], axis)
