"""Fixtures of the PACS tests: a real Orthanc per test, and a real DICOM SEG to send."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pacs.orthanc import Orthanc


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """An empty Orthanc on free loopback ports (HTTP + DICOMweb, DIMSE), killed afterwards."""
    server = Orthanc(tmp_path / "orthanc")
    server.start()
    yield server
    server.stop()


def write_phantom_seg(out: Path) -> Path:
    """A BINARY DICOM SEG (highdicom) of a small phantom MR series, written to ``out``.

    The series comes from :func:`write_dicom_series`; the mask is a box on two slices. Any
    DICOM instance would do to test sending; a real SEG also proves the SEG's SOP class gets
    through association and STOW-RS.
    """
    import highdicom as hd
    import nibabel as nib
    import numpy as np
    import pydicom
    from pydicom.sr.codedict import codes

    from sitefit.phantoms.dicom_series import dataset_bytes, write_dicom_series

    rng = np.random.default_rng(0)
    image = nib.Nifti1Image(
        rng.normal(100, 20, size=(16, 16, 5)).astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0])
    )
    series = [pydicom.dcmread(p) for p in write_dicom_series(image, out.parent / "series")]
    mask = np.zeros((len(series), 16, 16), dtype=bool)
    mask[1:3, 4:9, 5:11] = True
    algorithm = hd.AlgorithmIdentificationSequence(
        name="sitefit-tests", version="0", family=codes.DCM.ArtificialIntelligence
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="brain",
        segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Brain,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=series,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="sitefit",
        manufacturer_model_name="tests",
        software_versions="0",
        device_serial_number="0",
        omit_empty_frames=False,
    )
    out.write_bytes(dataset_bytes(seg))
    return out


@pytest.fixture(scope="session")
def seg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real DICOM SEG file (built once per session; copy it, do not change it)."""
    return write_phantom_seg(tmp_path_factory.mktemp("seg") / "seg.dcm")
