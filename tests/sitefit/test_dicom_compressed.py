"""Compressed pixel data: each transfer syntax reads back as the uncompressed series does.

A phantom series is written uncompressed, then compressed instance by instance by dcmtk
(``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``) or pydicom (JPEG 2000), and both directories are
read with :func:`sitefit.dicom.read_series_dir`: equal volumes for lossless syntaxes, close
ones for lossy. JPEG baseline holds 8-bit samples and JPEG extended 12-bit ones, so those
cases start from an 8-bit or 12-bit series (and ask dcmcjpeg to keep the intensities with
RescaleSlope/Intercept, ``+rm``, rather than stretch each slice's own range). Pixel data no
plugin decodes is refused, naming its transfer syntax by pydicom's name and never a value
from the file.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    UID,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14

from sitefit.dicom import DicomVolume, read_series_dir, read_series_zip
from sitefit.exceptions import InvalidInputError
from sitefit.phantoms.dicom_series import dataset_bytes, series_datasets
from tests.server.payloads import write_zip

MAX_VOXELS = 10**6
UNKNOWN_SYNTAX = "1.2.826.0.1.3680043.9.7777.1"  # a private transfer syntax no one decodes


def _image() -> Any:
    """A smooth phantom (JPEG's home ground) on an oblique grid: 40 x 36 x 5 voxels."""
    x, y, z = np.meshgrid(np.arange(40), np.arange(36), np.arange(5), indexing="ij")
    data = 1000 + 500 * np.sin(x / 5) * np.cos(y / 7) + 40 * z
    cos, sin = np.cos(np.deg2rad(8.0)), np.sin(np.deg2rad(8.0))
    affine = np.eye(4)
    affine[:3, :3] = np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]]) @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-16.0, 14.0, 3.0]
    return nib.Nifti1Image(data.astype(np.float32), affine)


def _with_bits(dataset: Dataset, bits: int) -> Dataset:
    """``dataset`` (16-bit samples) with its samples cut to ``bits`` bits, same intensities."""
    shift = 16 - bits
    stored = dataset.pixel_array.astype(np.uint16) >> shift
    if bits == 8:
        dataset.BitsAllocated = 8
        dataset.PixelData = stored.astype(np.uint8).tobytes()
    else:
        dataset.PixelData = stored.tobytes()
    dataset.BitsStored, dataset.HighBit = bits, bits - 1
    dataset.RescaleSlope = f"{float(dataset.RescaleSlope) * 2**shift:.10g}"[:16]
    return dataset


def _write_plain(directory: Path, bits: int) -> list[Path]:
    directory.mkdir()
    paths = []
    for number, dataset in enumerate(series_datasets(_image()), start=1):
        path = directory / f"{number:04d}.dcm"
        path.write_bytes(dataset_bytes(_with_bits(dataset, bits) if bits < 16 else dataset))
        paths.append(path)
    return paths


def _dcmtk(tool: str, *options: str) -> Callable[[Path, Path], None]:
    def compress(source: Path, target: Path) -> None:
        if shutil.which(tool) is None:
            pytest.skip(f"dcmtk's {tool} is not installed")
        subprocess.run([tool, *options, str(source), str(target)], check=True, capture_output=True)

    return compress


def _pydicom(syntax: str, **options: Any) -> Callable[[Path, Path], None]:
    def compress(source: Path, target: Path) -> None:
        dataset = pydicom.dcmread(source)
        dataset.compress(syntax, generate_instance_uid=False, **options)
        target.write_bytes(dataset_bytes(dataset))

    return compress


@dataclass(frozen=True)
class Case:
    bits: int  # stored bits of the uncompressed series
    compress: Callable[[Path, Path], None]
    syntax: UID
    max_error: float  # largest difference allowed, as a fraction of the intensity range


CASES = {
    "JPEG baseline": Case(8, _dcmtk("dcmcjpeg", "+eb", "+rm"), JPEGBaseline8Bit, 0.03),
    "JPEG extended": Case(12, _dcmtk("dcmcjpeg", "+ee", "+rm"), JPEGExtended12Bit, 0.01),
    "JPEG lossless (process 14)": Case(16, _dcmtk("dcmcjpeg", "+el"), JPEGLosslessP14, 0),
    "JPEG lossless SV1": Case(16, _dcmtk("dcmcjpeg", "+e1"), JPEGLosslessSV1, 0),
    "JPEG-LS lossless": Case(16, _dcmtk("dcmcjpls", "+el"), JPEGLSLossless, 0),
    "JPEG-LS near-lossless": Case(16, _dcmtk("dcmcjpls", "+en", "+md", "3"), JPEGLSNearLossless, 3),
    "RLE lossless": Case(16, _dcmtk("dcmcrle"), RLELossless, 0),
    "JPEG 2000 lossless": Case(16, _pydicom(JPEG2000Lossless), JPEG2000Lossless, 0),
    "JPEG 2000 lossy": Case(16, _pydicom(JPEG2000, j2k_psnr=[60]), JPEG2000, 0.02),
}


def _compressed_copy(tmp_path: Path, case: Case) -> tuple[DicomVolume, Path]:
    """The uncompressed series' volume, and the directory of its compressed instances."""
    plain = _write_plain(tmp_path / "plain", case.bits)
    compressed = tmp_path / "compressed"
    compressed.mkdir()
    for path in plain:
        case.compress(path, compressed / path.name)
        assert pydicom.dcmread(compressed / path.name).file_meta.TransferSyntaxUID == case.syntax
    return read_series_dir(tmp_path / "plain", MAX_VOXELS), compressed


@pytest.mark.parametrize("name", list(CASES))
def test_compressed_series_reads_as_the_uncompressed_one(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    expected, compressed = _compressed_copy(tmp_path, case)
    got = read_series_dir(compressed, MAX_VOXELS)
    np.testing.assert_allclose(got.affine, expected.affine, atol=1e-9)
    assert got.data.shape == expected.data.shape == (40, 36, 5)
    if case.max_error == 0:
        np.testing.assert_array_equal(got.data, expected.data)
    else:  # a lossy syntax: not equal, but close, and on average much closer
        error = np.abs(got.data.astype(np.float64) - expected.data) / np.ptp(expected.data)
        assert 0 < float(error.max()) <= case.max_error, float(error.max())
        assert float(error.mean()) <= case.max_error / 3, float(error.mean())


def test_a_zip_of_compressed_instances_reads_as_the_directory(tmp_path: Path) -> None:
    expected, compressed = _compressed_copy(tmp_path, CASES["JPEG 2000 lossless"])
    members = [(f"IM{p.name}", p.read_bytes()) for p in sorted(compressed.iterdir())]
    got = read_series_zip(write_zip(tmp_path / "series.zip", members[::-1]), MAX_VOXELS)
    np.testing.assert_array_equal(got.data, expected.data)


def _with_syntax(directory: Path, syntax: str, fragment: bytes) -> Path:
    """The phantom series, its second instance's pixel data encapsulated under ``syntax``."""
    paths = _write_plain(directory, 16)
    dataset = pydicom.dcmread(paths[1])
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.PixelData = encapsulate([fragment])
    dataset["PixelData"].VR = "OB"
    paths[1].write_bytes(dataset_bytes(dataset))
    return directory


def _refusal(directory: Path) -> str:
    with pytest.raises(InvalidInputError) as caught:
        read_series_dir(directory, MAX_VOXELS)
    return str(caught.value)


def test_a_syntax_without_a_decoder_is_refused_by_its_name(tmp_path: Path) -> None:
    message = _refusal(_with_syntax(tmp_path / "mpeg", MPEG2MPML, bytes(64)))
    assert message == (
        "DICOM series: instance #2: no decoder for its pixel data's transfer syntax "
        "(MPEG2 Main Profile / Main Level); expected uncompressed, JPEG, JPEG-LS, JPEG 2000 "
        "or RLE pixel data"
    )


def test_an_unknown_syntax_is_refused_without_quoting_it(tmp_path: Path) -> None:
    message = _refusal(_with_syntax(tmp_path / "private", UNKNOWN_SYNTAX, bytes(64)))
    assert "instance #2" in message and "(unknown transfer syntax)" in message
    assert UNKNOWN_SYNTAX not in message
    assert "7777" not in message and "\n" not in message


def test_corrupt_compressed_pixel_data_is_refused(tmp_path: Path) -> None:
    message = _refusal(
        _with_syntax(tmp_path / "corrupt", JPEGBaseline8Bit, b"\xff\xd8" + bytes(62))
    )
    assert message == (
        "DICOM series: instance #2: pixel data cannot be decoded "
        "(JPEG Baseline (Process 1); corrupt or unsupported)"
    )
