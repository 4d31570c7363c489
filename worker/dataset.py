"""Read an nnU-Net v2 raw dataset (imagesTr/labelsTr/dataset.json) into training slices."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sitefit import defaults
from sitefit.exceptions import DatasetError, InvalidInputError
from sitefit.volume import load_label_map, load_scan, minmax_normalize, pad_to_multiple, to_slices


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    label: Path


@dataclass(frozen=True)
class Dataset:
    root: Path
    name: str
    classes: dict[int, str]
    cases: list[Case]

    def fingerprint(self) -> str:
        """sha256 over every case's name and file bytes (identifies the training data)."""
        digest = hashlib.sha256()
        for case in self.cases:
            digest.update(case.name.encode())
            for path in (case.image, case.label):
                digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()


@dataclass(frozen=True)
class Slices:
    """Training slices of several cases, padded to one in-plane size."""

    images: np.ndarray  # (N, 1, H, W) float32 in [0, 1]
    labels: np.ndarray  # (N, H, W) uint8
    case_ranges: list[tuple[int, int]]  # [start, stop) of each case's slices


def read_dataset(root: Path) -> Dataset:
    """Parse ``dataset.json`` and pair ``imagesTr/CASE_0000`` with ``labelsTr/CASE``."""
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"{root}: no dataset.json (expected an nnU-Net v2 raw dataset)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{meta_path}: not valid JSON in UTF-8 ({error})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path}: expected a JSON object")
    channels = meta.get("channel_names", {})
    if not isinstance(channels, dict) or len(channels) != 1:
        found = len(channels) if isinstance(channels, dict) else repr(channels)[:40]
        raise DatasetError(f"{meta_path}: sitefit models take one channel, found {found}")
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not all(isinstance(v, int) for v in labels.values()):
        raise DatasetError(f"{meta_path}: 'labels' must map class names to integer values")
    if "ignore" in labels:
        raise DatasetError(
            f"{meta_path}: nnU-Net's 'ignore' label (unlabelled voxels) is not supported; "
            "label every voxel, or leave those cases out"
        )
    classes = {int(v): str(k) for k, v in labels.items()}
    if 0 not in classes or sorted(classes) != list(range(len(classes))) or len(classes) < 2:
        raise DatasetError(f"{meta_path}: labels must be 0 (background), 1, ..., C-1")
    ending = str(meta.get("file_ending", ".nii.gz"))
    cases = []
    for label in sorted((root / "labelsTr").glob(f"*{ending}")):
        name = label.name[: -len(ending)]
        image = root / "imagesTr" / f"{name}_0000{ending}"
        if not image.is_file():
            raise DatasetError(f"{root}: label {label.name} has no image imagesTr/{image.name}")
        cases.append(Case(name, image, label))
    if not cases:
        raise DatasetError(f"{root}: no labelled cases in labelsTr/*{ending}")
    unlabelled = sorted(
        image.name for image in (root / "imagesTr").glob(f"*_0000{ending}")
        if image.name[: -len(f"_0000{ending}")] not in {case.name for case in cases}
    )  # fmt: skip
    if unlabelled:
        raise DatasetError(
            f"{root}: {len(unlabelled)} image(s) without a label in labelsTr, e.g. "
            f"imagesTr/{unlabelled[0]}"
        )
    return Dataset(root, str(meta.get("name", root.name)), classes, cases)


def load_slices(
    cases: list[Case],
    slice_axis: int,
    max_voxels: int = defaults.MAX_VOXELS,
    num_classes: int | None = None,
) -> Slices:
    """Load, normalise and slice cases; pad every slice to a common size (multiple of 8).
    With ``num_classes``, a label value outside 0..C-1 is refused (e.g. a binary mask stored
    as 0/255, which a loss would take as a target of 255)."""
    images, labels, ranges = [], [], []
    start = 0
    for case in cases:
        try:
            scan = load_scan(case.image, max_voxels)
            label = load_label_map(case.label, like=scan)
        except InvalidInputError as error:
            raise DatasetError(f"case {case.name}: {error}") from None
        if num_classes is not None and label.size and int(label.max()) >= num_classes:
            found = sorted(int(v) for v in np.unique(label) if v >= num_classes)
            raise DatasetError(
                f"case {case.name}: label value(s) {found[:5]} not among the dataset's classes "
                f"0..{num_classes - 1} (dataset.json 'labels')"
            )
        images.append(to_slices(minmax_normalize(scan.data), slice_axis))
        labels.append(to_slices(label, slice_axis))
        ranges.append((start, start + images[-1].shape[0]))
        start += images[-1].shape[0]
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    padded_images = np.concatenate([_pad_to(i, height, width) for i in images])
    padded_labels = np.concatenate([_pad_to(lab, height, width) for lab in labels])
    return Slices(padded_images[:, None], padded_labels, ranges)


def _pad_to(slices: np.ndarray, height: int, width: int) -> np.ndarray:
    # centred, like the symmetric padding used at inference
    top, left = (height - slices.shape[1]) // 2, (width - slices.shape[2]) // 2
    grown = np.zeros((slices.shape[0], height, width), dtype=slices.dtype)
    grown[:, top : top + slices.shape[1], left : left + slices.shape[2]] = slices
    padded, _ = pad_to_multiple(grown, defaults.PAD_MULTIPLE)
    return padded
