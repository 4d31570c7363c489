"""Fixtures of the model-store tests: a small base-model spec and tensors, no torch needed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pytest

from model_store.spec import Architecture, ModelSpec, TrainingInfo, Validation

SpecFactory = Callable[..., ModelSpec]
TensorFactory = Callable[[int], dict[str, np.ndarray]]


@pytest.fixture
def make_spec() -> SpecFactory:
    def make(name: str = "brain", num_outputs: int = 1) -> ModelSpec:
        return ModelSpec(
            name=name,
            version=1,
            created=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            sitefit_version="0.1.0",
            classes={0: "background", 1: "brain"},
            architecture=Architecture(
                num_outputs=num_outputs, base_channels=16, levels=3, res_blocks=3
            ),
            slice_axis=2,
            training=TrainingInfo(
                dataset_name="phantoms",
                dataset_fingerprint="0" * 64,
                train_cases=["a", "b"],
                validation_cases=["c"],
                epochs=1,
                head_epochs=1,
                learning_rate=1e-3,
                batch_size=4,
                seed=0,
                seconds=1.0,
            ),
            validation=Validation(dice_final=0.9, dice_early=0.8),
            sha256="",
        )

    return make


@pytest.fixture
def make_tensors() -> TensorFactory:
    """Deterministic tensors shaped like a (tiny) net's, different for each seed."""

    def make(seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {
            "init_path.conv.weight": rng.normal(size=(16, 1, 3, 3)).astype(np.float32),
            "init_path.conv.bias": rng.normal(size=16).astype(np.float32),
            "init_path.blocks.0.bn1.running_mean": rng.normal(size=16).astype(np.float32),
            "init_path.blocks.0.bn1.num_batches_tracked": np.array(seed, dtype=np.int64),
            "body.out_conv.weight": rng.normal(size=(1, 16, 1, 1)).astype(np.float32),
        }

    return make
