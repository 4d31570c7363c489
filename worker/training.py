"""Source training (paper §2.1, §2.2): the U-Net, then the early head with the U-Net frozen."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import sitefit
from model_store.base_models import BaseModelRegistry
from model_store.spec import ModelSpec, TrainingInfo, Validation, check_name
from sitefit import defaults
from sitefit.codes import Code, codes_from_dataset
from sitefit.exceptions import InvalidInputError
from worker.augmentation import augment_intensity
from worker.batchnorm import is_running_statistic
from worker.dataset import Dataset, Slices, load_slices, read_dataset
from worker.inference import foreground_dice, predict
from worker.nets import NetConfig, SegmentationNet, supervised_loss
from worker.refinement import scan_statistics
from worker.weights import architecture_of, snapshot, to_numpy

Log = Callable[[str], None]
HeadStatistics = Literal["scan", "source"]
HeadAugmentation = Literal["intensity", "none"]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = defaults.TRAIN_EPOCHS
    head_epochs: int = defaults.HEAD_EPOCHS
    batch_size: int = defaults.TRAIN_BATCH_SIZE
    learning_rate: float = defaults.TRAIN_LR
    head_learning_rate: float = defaults.HEAD_LR
    head_statistics: HeadStatistics = defaults.HEAD_STATISTICS
    head_augmentation: HeadAugmentation = defaults.HEAD_AUGMENTATION
    seed: int = defaults.SEED
    base_channels: int = defaults.BASE_CHANNELS
    levels: int = defaults.LEVELS
    res_blocks: int = defaults.INIT_RES_BLOCKS
    slice_axis: int = 2
    validation_fraction: float = defaults.VALIDATION_FRACTION

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.head_epochs < 1:
            raise InvalidInputError("epochs and head epochs must be at least 1")
        if self.batch_size < 2:  # batch norm in train mode needs two slices per batch
            raise InvalidInputError(f"batch size must be at least 2, not {self.batch_size}")
        if not 0 <= self.seed < 2**32:
            raise InvalidInputError(f"seed must be in 0..2**32-1, not {self.seed}")
        if self.slice_axis not in (0, 1, 2):
            raise InvalidInputError(f"slice axis must be 0, 1 or 2, not {self.slice_axis}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise InvalidInputError("validation fraction must be in [0, 1)")
        if self.head_statistics not in ("scan", "source"):
            raise InvalidInputError(
                f"head statistics must be 'scan' or 'source', not {self.head_statistics!r}"
            )
        if self.head_augmentation not in ("intensity", "none"):
            raise InvalidInputError(
                f"head augmentation must be 'intensity' or 'none', not {self.head_augmentation!r}"
            )


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def train_base_model(
    dataset_dir: Path,
    name: str,
    config: TrainConfig,
    registry: BaseModelRegistry,
    device: torch.device,
    log: Log = print,
) -> ModelSpec:
    """Train on an nnU-Net v2 raw dataset and register the result as ``name``'s next version
    (its spec carries each class's code: :func:`class_codes`)."""
    try:
        check_name("model", name)
    except ValueError as error:
        raise InvalidInputError(str(error)) from None
    started = time.perf_counter()
    generator = seed_everything(config.seed)
    dataset = read_dataset(dataset_dir)
    codes = class_codes(dataset)  # before training: a class without a code wastes no run
    cases = list(dataset.cases)
    random.Random(config.seed).shuffle(cases)
    n_val = round(len(cases) * config.validation_fraction) if len(cases) > 1 else 0
    n_val = max(n_val, 1) if config.validation_fraction > 0 and len(cases) > 1 else n_val
    val_cases, train_cases = cases[:n_val], cases[n_val:]
    log(
        f"dataset {dataset.name}: {len(train_cases)} training and {len(val_cases)} validation "
        f"cases, classes {dataset.classes}"
    )
    classes = len(dataset.classes)
    train = load_slices(train_cases, config.slice_axis, num_classes=classes)
    val = load_slices(val_cases, config.slice_axis, num_classes=classes) if val_cases else train

    num_outputs = 1 if len(dataset.classes) == 2 else len(dataset.classes)
    net_config = NetConfig(num_outputs, config.base_channels, config.levels, config.res_blocks)
    net = SegmentationNet(net_config).to(device)
    num_classes = len(dataset.classes)

    unet_params = [*net.init_path.parameters(), *net.body.parameters()]
    optimizer = torch.optim.Adam(unet_params, lr=config.learning_rate)
    for epoch in range(1, config.epochs + 1):
        net.train()
        tick = time.perf_counter()
        losses = []
        for images, labels in _batches(train, config.batch_size, generator, device):
            loss = supervised_loss(net.body(net.init_path(images)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        final_dice, _ = _validate(net, val, num_classes, config.batch_size, device)
        log(
            f"unet epoch {epoch}/{config.epochs}: loss {np.mean(losses):.4f}, "
            f"validation dice {final_dice:.4f} ({time.perf_counter() - tick:.1f} s)"
        )

    train_early_head(net, train, val, num_classes, config, generator, device, log)

    final_dice, early_dice = _validate(net, val, num_classes, config.batch_size, device)
    _refuse_broken_weights(net)
    spec = ModelSpec(
        name=name,
        version=1,
        created=datetime.now(UTC),
        sitefit_version=sitefit.__version__,
        classes=dataset.classes,
        codes=codes,
        architecture=architecture_of(net_config),
        slice_axis=config.slice_axis,
        training=TrainingInfo(
            dataset_name=dataset.name,
            dataset_fingerprint=dataset.fingerprint(),
            train_cases=[c.name for c in train_cases],
            validation_cases=[c.name for c in val_cases],
            epochs=config.epochs,
            head_epochs=config.head_epochs,
            learning_rate=config.learning_rate,
            head_learning_rate=config.head_learning_rate,
            head_statistics=config.head_statistics,
            head_augmentation=config.head_augmentation,
            batch_size=config.batch_size,
            seed=config.seed,
            seconds=round(time.perf_counter() - started, 2),
        ),
        validation=Validation(dice_final=final_dice, dice_early=early_dice),
        sha256="",
    )
    stored = registry.register(spec, to_numpy(net.cpu()))
    log(
        f"registered {stored.name}@{stored.version}: validation dice final {final_dice:.4f}, "
        f"early head {early_dice:.4f}"
    )
    return stored


def class_codes(dataset: Dataset) -> dict[int, Code]:
    """Each foreground class's coded concept: from ``dataset.json``'s ``"codes"`` (by class
    name), else sitefit's default for the class name (``sitefit.codes``); a class with neither
    is a ``DatasetError`` naming it. A new model must name its classes for its DICOM SEGs."""
    meta_path = dataset.root / "dataset.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))  # read_dataset has checked it
    return codes_from_dataset(meta, dataset.classes, str(meta_path))


def train_early_head(
    net: SegmentationNet,
    train: Slices,
    val: Slices,
    num_classes: int,
    config: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    log: Log,
) -> None:
    """Train the early head against the labels with the U-Net frozen (paper §2.2).

    Eval mode keeps the U-Net's BN statistics fixed; only head parameters get gradients. With
    ``config.head_statistics`` "scan" every batch is drawn from one training scan and the BN
    layers normalise with that scan's own statistics (as the statistics-only refinement
    computes them), so the head learns to read features in the regime refinement moves a
    target scan to; the U-Net's running statistics are restored bitwise afterwards. With
    ``config.head_augmentation`` "intensity" the head sees every slice re-imaged as another
    scanner might (``worker.augmentation``).
    """
    net.requires_grad_(False)
    net.early_head.requires_grad_(True)
    optimizer = torch.optim.Adam(net.early_head.parameters(), lr=config.head_learning_rate)
    per_scan = config.head_statistics == "scan"
    augment = config.head_augmentation == "intensity"
    source = _running_statistics(snapshot(net)) if per_scan else {}
    statistics = [
        scan_statistics(net, torch.from_numpy(train.images[start:stop]).to(device), num_classes)
        for start, stop in (train.case_ranges if per_scan and not augment else [])
    ]
    for epoch in range(1, config.head_epochs + 1):
        net.eval()
        tick = time.perf_counter()
        losses = []
        if per_scan:
            batches = _scan_batches(
                train, config.batch_size, generator, device, net, num_classes, statistics, augment
            )
        else:
            batches = (
                (augment_intensity(images, generator) if augment else images, labels)
                for images, labels in _batches(train, config.batch_size, generator, device)
            )
        for images, labels in batches:
            with torch.no_grad():
                features = net.init_path(images)
            loss = supervised_loss(net.early_head(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if per_scan:
            net.load_state_dict(source, strict=False)
        _, early_dice = _validate(net, val, num_classes, config.batch_size, device)
        log(
            f"early head epoch {epoch}/{config.head_epochs}: loss {np.mean(losses):.4f}, "
            f"validation dice {early_dice:.4f} ({time.perf_counter() - tick:.1f} s)"
        )
    net.requires_grad_(False)


def _running_statistics(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if is_running_statistic(k)}


def _scan_batches(
    slices: Slices,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    net: SegmentationNet,
    num_classes: int,
    statistics: list[dict[str, torch.Tensor]],
    augment: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches that never mix scans, with ``net``'s BN layers set to each scan's
    own statistics while its batches are used: the scans in random order, each one's slices
    shuffled. ``statistics`` holds every scan's; with ``augment`` each scan is first
    re-imaged as a whole and its statistics computed on the result."""
    for case in torch.randperm(len(slices.case_ranges), generator=generator).tolist():
        start, stop = slices.case_ranges[case]
        scan = torch.from_numpy(slices.images[start:stop]).to(device)
        if augment:
            scan = augment_intensity(scan, generator, one_scan=True)
            net.load_state_dict(scan_statistics(net, scan, num_classes), strict=False)
        else:
            net.load_state_dict(statistics[case], strict=False)
        order = torch.randperm(stop - start, generator=generator).numpy()
        for first in range(0, len(order), batch_size):
            index = np.sort(order[first : first + batch_size])
            if len(index) < 2:
                continue
            yield scan[index], torch.from_numpy(slices.labels[index + start]).to(device)


def _batches(
    slices: Slices, batch_size: int, generator: torch.Generator, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(slices.images.shape[0], generator=generator).numpy()
    for start in range(0, len(order), batch_size):
        index = np.sort(order[start : start + batch_size])
        if len(index) < 2:  # BatchNorm needs more than one value per channel in train mode
            continue
        yield (
            torch.from_numpy(slices.images[index]).to(device),
            torch.from_numpy(slices.labels[index]).to(device),
        )


def _validate(
    net: SegmentationNet, val: Slices, num_classes: int, batch_size: int, device: torch.device
) -> tuple[float, float]:
    """Mean per-case 3D Dice of the final output and of the early head against the labels."""
    finals, earlies = [], []
    for start, stop in val.case_ranges:
        images = torch.from_numpy(val.images[start:stop]).to(device)
        labels = torch.from_numpy(val.labels[start:stop]).to(device)
        prediction = predict(net, images, batch_size)
        finals.append(foreground_dice(prediction.final, labels, num_classes))
        earlies.append(foreground_dice(prediction.early, labels, num_classes))
    return float(np.mean(finals)), float(np.mean(earlies))


def _refuse_broken_weights(net: SegmentationNet) -> None:
    """No model is registered whose training diverged (a learning rate far too high) or
    never stepped: its weights would serve every later job."""
    broken = [k for k, v in net.state_dict().items() if v.is_floating_point() and not
              bool(torch.isfinite(v).all())]  # fmt: skip
    if broken:
        raise InvalidInputError(
            f"training diverged: {len(broken)} weight tensor(s) hold NaN or inf (e.g. "
            f"{broken[0]}); nothing was registered. Lower the learning rate."
        )
