"""Source training: what gets registered, reproducibility, dataset errors."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from model_store.base_models import BaseModelRegistry
from sitefit.exceptions import DatasetError, InvalidInputError
from sitefit.settings import Settings
from tests.conftest import TINY_TRAINING, TRAINING_LOGS
from worker.training import TrainConfig, train_base_model
from worker.weights import build_net


def test_registered_model_has_a_complete_spec(settings: Settings, brain_model: str) -> None:
    registry = BaseModelRegistry(settings.models_dir)
    spec = registry.spec(brain_model)
    assert spec.classes == {0: "background", 1: "brain"}
    assert spec.architecture.num_outputs == 1
    assert spec.slice_axis == 2 and spec.normalization == "minmax"
    assert len(spec.training.dataset_fingerprint) == 64
    assert spec.training.train_cases and spec.training.validation_cases
    assert not set(spec.training.train_cases) & set(spec.training.validation_cases)
    assert spec.validation.dice_final is not None and 0.0 <= spec.validation.dice_final <= 1.0
    net = build_net(spec, registry.tensors(spec), torch.device("cpu"))
    assert net.config.base_channels == 4


def test_multiclass_model_uses_softmax_outputs(settings: Settings, heart_model: str) -> None:
    spec = BaseModelRegistry(settings.models_dir).spec(heart_model)
    assert spec.architecture.num_outputs == len(spec.classes) == 4


def test_training_is_reproducible(
    settings: Settings, brain_model: str, brain_dataset: Path, tmp_path: Path
) -> None:
    """The same data, configuration and seed give bitwise the same weights."""
    first = BaseModelRegistry(settings.models_dir).spec(brain_model)
    again = train_base_model(
        brain_dataset,
        brain_model,
        TrainConfig(**TINY_TRAINING),
        BaseModelRegistry(tmp_path),
        torch.device("cpu"),
        log=str,
    )
    assert again.sha256 == first.sha256


def test_progress_is_logged_per_epoch(brain_model: str) -> None:
    lines = TRAINING_LOGS[brain_model]
    assert sum(line.startswith("unet epoch 1/2: loss") for line in lines) == 1
    assert sum(line.startswith("unet epoch") for line in lines) == 2
    assert sum(line.startswith("early head epoch") for line in lines) == 1
    assert lines[-1].startswith(f"registered {brain_model}@1")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "dataset.json").unlink(), "no dataset.json"),
        (lambda d: (d / "dataset.json").write_text("{"), "not valid JSON"),
        (lambda d: shutil.rmtree(d / "imagesTr"), "has no image"),
        (lambda d: shutil.rmtree(d / "labelsTr"), "no labelled cases"),
        (
            lambda d: (d / "dataset.json").write_text(
                json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0}})
            ),
            "one channel",
        ),
        (lambda d: (d / "dataset.json").write_text("[1, 2]"), "expected a JSON object"),
        (
            lambda d: (d / "dataset.json").write_bytes(
                (d / "dataset.json").read_text().encode("utf-16")
            ),
            "not valid JSON in UTF-8",
        ),
        (lambda d: _edit_meta(d, channel_names=1), "one channel"),
        (
            lambda d: _edit_meta(d, labels={"background": 0, "brain": 1, "ignore": 2}),
            "'ignore' label",
        ),
        (lambda d: next((d / "labelsTr").iterdir()).unlink(), "without a label"),
        (lambda d: _scale_labels(d, 255), r"label value\(s\) \[255\] not among"),
    ],
)
def test_bad_datasets_are_refused(
    brain_dataset: Path, tmp_path: Path, damage, message: str
) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(brain_dataset, copy)
    damage(copy)
    with pytest.raises(DatasetError, match=message):
        train_base_model(
            copy,
            "c",
            TrainConfig(epochs=1, head_epochs=1),
            BaseModelRegistry(tmp_path),
            torch.device("cpu"),
            log=str,
        )


def _edit_meta(root: Path, **changes: object) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, **changes}))


def _scale_labels(root: Path, factor: int) -> None:
    """A binary mask stored as 0/255, as many tools write them."""
    for path in (root / "labelsTr").iterdir():
        image = nib.load(path)
        data = (np.asarray(image.dataobj) * factor).astype(np.uint8)
        nib.save(nib.Nifti1Image(data, image.affine, image.header), path)


def test_training_that_diverges_registers_nothing(brain_dataset: Path, tmp_path: Path) -> None:
    registry = BaseModelRegistry(tmp_path)
    config = TrainConfig(**{**TINY_TRAINING, "epochs": 1, "learning_rate": 1e12})
    with pytest.raises(InvalidInputError, match="training diverged"):
        train_base_model(brain_dataset, "nan", config, registry, torch.device("cpu"), log=str)
    assert registry.names() == []


@pytest.mark.parametrize(("field", "value"), [("batch_size", 1), ("seed", -1), ("seed", 2**32)])
def test_impossible_training_options_are_refused(field: str, value: int) -> None:
    with pytest.raises(InvalidInputError, match=field.replace("_", " ")):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_the_early_head_can_train_under_each_scans_own_statistics(
    brain_dataset: Path, tmp_path: Path
) -> None:
    """ "scan" trains another head on the same U-Net and gives the U-Net's running statistics
    back bitwise; the spec says which statistics the head was trained under."""
    registry = BaseModelRegistry(tmp_path)
    tensors = {}
    for statistics in ("scan", "source"):
        config = TrainConfig(**{**TINY_TRAINING, "head_statistics": statistics})
        spec = train_base_model(brain_dataset, statistics, config, registry,
                                torch.device("cpu"), log=str)  # fmt: skip
        assert spec.training.head_statistics == statistics
        tensors[statistics] = registry.tensors(spec)
    scan, source = tensors["scan"], tensors["source"]
    heads = {key for key in scan if key.startswith("early_head.")}
    assert heads and all(not (scan[k] == source[k]).all() for k in heads if k.endswith("weight"))
    assert any(key.endswith("running_var") for key in scan)
    for key in scan.keys() - heads:
        assert (scan[key] == source[key]).all(), key


def test_the_early_head_can_train_on_augmented_slices(brain_dataset: Path, tmp_path: Path) -> None:
    """ "intensity" augments only the head's slices, under either statistics: the U-Net is
    bitwise the one trained without, the head differs, and the spec says so; specs written
    before the option read "none"."""
    registry = BaseModelRegistry(tmp_path)
    tensors = {}
    for augmentation, statistics in (("none", "source"), ("intensity", "source"),
                                     ("intensity", "scan")):  # fmt: skip
        options = {"head_augmentation": augmentation, "head_statistics": statistics}
        config = TrainConfig(**{**TINY_TRAINING, **options})  # type: ignore[arg-type]
        spec = train_base_model(brain_dataset, f"{augmentation}-{statistics}", config, registry,
                                torch.device("cpu"), log=str)  # fmt: skip
        assert spec.training.head_augmentation == augmentation
        tensors[augmentation, statistics] = registry.tensors(spec)
    plain = tensors["none", "source"]
    heads = {key for key in plain if key.startswith("early_head.")}
    for augmented in (tensors["intensity", "source"], tensors["intensity", "scan"]):
        assert all(not (augmented[k] == plain[k]).all() for k in heads if k.endswith("weight"))
        for key in plain.keys() - heads:
            assert (augmented[key] == plain[key]).all(), key
    written = json.loads(spec.model_dump_json())
    del written["training"]["head_augmentation"]
    assert type(spec).model_validate(written).training.head_augmentation == "none"


def test_a_bad_head_statistics_option_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="head statistics"):
        TrainConfig(head_statistics="batch")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="head augmentation"):
        TrainConfig(head_augmentation="spatial")  # type: ignore[arg-type]
