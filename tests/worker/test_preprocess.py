"""From a scan to the model's padded slices, and from predicted slices back."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sitefit.volume import load_scan
from worker.preprocess import PreparedScan, prepare_scan


def _prepared(tmp_path: Path, shape: tuple[int, int, int]) -> PreparedScan:
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return prepare_scan(load_scan(path, 10**6), 2, torch.device("cpu"))


def test_slices_are_padded_to_a_multiple_of_8_and_the_region_is_the_scan(
    tmp_path: Path,
) -> None:
    prepared = _prepared(tmp_path, (13, 21, 5))
    assert tuple(prepared.slices.shape) == (5, 1, 16, 24)
    rows, columns = prepared.region
    inside = prepared.slices[:, 0, rows, columns]
    assert tuple(inside.shape) == (5, 13, 21)
    assert float(prepared.slices.abs().sum()) == pytest.approx(float(inside.abs().sum()))
    labels = (inside > 0.5).to(torch.uint8)
    volume = prepared.volume(labels)
    assert volume.shape == (13, 21, 5) and volume.dtype == np.uint8
    assert np.array_equal(volume, np.moveaxis(labels.numpy(), 0, 2))


def test_labels_of_the_padded_slices_are_refused(tmp_path: Path) -> None:
    """A prediction made without the region would put padding into the mask: a clear error."""
    prepared = _prepared(tmp_path, (13, 21, 5))
    padded = torch.zeros(5, 16, 24, dtype=torch.uint8)
    with pytest.raises(ValueError, match="region"):
        prepared.volume(padded)
