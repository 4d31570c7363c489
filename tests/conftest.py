"""Session fixtures that build real things once: phantom datasets and tiny trained models.

Tiny means: a 40 mm field of view, 4 base channels, one or two epochs. The models are poor,
but they are real models trained by the real code, which is what the tests need.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from sitefit.settings import Settings

TEST_FOV_MM = 40.0


def pytest_configure(config: pytest.Config) -> None:
    """The suite is hermetic: a developer's exported SITEFIT_* variables would reach every
    Settings() the tests build (pydantic-settings reads the environment), and the tests
    state what they need explicitly. Tests of the environment path set their own."""
    for name in [name for name in os.environ if name.startswith("SITEFIT_")]:
        del os.environ[name]


@dataclass(frozen=True)
class PhantomCase:
    image: Path
    label: Path


def _domain(role: str) -> str:
    from sitefit.phantoms import DOMAINS

    return next(name for name, domain in DOMAINS.items() if domain.role == role)


@pytest.fixture(scope="session")
def source_domain() -> str:
    return _domain("source")


@pytest.fixture(scope="session")
def shifted_domain() -> str:
    return _domain("shifted")


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sitefit-home")


@pytest.fixture(scope="session")
def settings(home: Path) -> Settings:
    return Settings(home=home, device="cpu", refine_max_epochs=3, refine_batch_size=8)


TINY_TRAINING = {"epochs": 2, "head_epochs": 1, "batch_size": 8, "base_channels": 4}
TRAINING_LOGS: dict[str, list[str]] = {}  # what each session model's training printed


def _train(settings: Settings, dataset: Path, name: str, **training: int) -> None:
    import torch

    from model_store.base_models import BaseModelRegistry
    from worker.training import TrainConfig, train_base_model

    registry = BaseModelRegistry(settings.models_dir)
    log = TRAINING_LOGS.setdefault(name, [])
    train_base_model(
        dataset,
        name,
        TrainConfig(**{**TINY_TRAINING, **training}),
        registry,
        torch.device("cpu"),
        log=log.append,
    )


@pytest.fixture(scope="session")
def brain_dataset(tmp_path_factory: pytest.TempPathFactory, source_domain: str) -> Path:
    from sitefit.phantoms import write_dataset

    out = tmp_path_factory.mktemp("brain-source")
    return write_dataset("brain", source_domain, 3, 0, out, TEST_FOV_MM)


@pytest.fixture(scope="session")
def brain_model(settings: Settings, brain_dataset: Path) -> str:
    """Name of a tiny binary model trained on source brain phantoms."""
    _train(settings, brain_dataset, "tiny-brain")
    return "tiny-brain"


@pytest.fixture(scope="session")
def consistent_brain_model(settings: Settings, brain_dataset: Path) -> str:
    """Like ``brain_model``, trained longer: its early head finds the brain (the tiny model's
    finds nothing on other domains), and refining on ``near_source_brain_case`` raises
    Dice(early, final), so a site version is saved."""
    _train(settings, brain_dataset, "brain-consistent", epochs=4, head_epochs=8)
    return "brain-consistent"


@pytest.fixture(scope="session")
def heart_model(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, source_domain: str
) -> str:
    """Name of a tiny 4-class (background, LV, myocardium, RV) model."""
    from sitefit.phantoms import write_dataset

    out = write_dataset("heart", source_domain, 2, 0, tmp_path_factory.mktemp("heart"), TEST_FOV_MM)
    _train(settings, out, "tiny-heart")
    return "tiny-heart"


def _case(tmp_path_factory: pytest.TempPathFactory, task: str, domain: str) -> PhantomCase:
    from sitefit.phantoms import write_dataset

    out = write_dataset(
        task, domain, 1, 1000, tmp_path_factory.mktemp(f"{task}-{domain}"), TEST_FOV_MM
    )
    return PhantomCase(next((out / "imagesTr").iterdir()), next((out / "labelsTr").iterdir()))


@pytest.fixture(scope="session")
def shifted_brain_case(
    tmp_path_factory: pytest.TempPathFactory, shifted_domain: str
) -> PhantomCase:
    return _case(tmp_path_factory, "brain", shifted_domain)


@pytest.fixture(scope="session")
def near_source_brain_case(tmp_path_factory: pytest.TempPathFactory) -> PhantomCase:
    return _case(tmp_path_factory, "brain", _domain("near-source"))


@pytest.fixture(scope="session")
def shifted_heart_case(
    tmp_path_factory: pytest.TempPathFactory, shifted_domain: str
) -> PhantomCase:
    return _case(tmp_path_factory, "heart", shifted_domain)
