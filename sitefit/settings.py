"""Configuration from ``SITEFIT_*`` environment variables, read once and passed explicitly."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sitefit import defaults

BatchNormMode = Literal["train", "frozen"]


class Settings(BaseSettings):
    """All of sitefit's configuration. Construct once at the edge (CLI, app factory, worker)."""

    model_config = SettingsConfigDict(env_prefix="SITEFIT_", extra="ignore")

    home: Path = Field(default=Path(defaults.HOME), description="Model store and job data root.")
    device: str | None = Field(
        default=None, description="Torch device for the engine; default: cuda when available."
    )
    tolerance_mm: float = Field(default=defaults.SURFACE_TOLERANCE_MM, gt=0)
    refine_max_epochs: int = Field(default=defaults.REFINE_MAX_EPOCHS, ge=1, le=200)
    refine_lr: float = Field(default=defaults.REFINE_LR, gt=0, le=10)
    refine_batch_size: int = Field(default=defaults.REFINE_BATCH_SIZE, ge=1)
    refine_batchnorm: BatchNormMode = Field(
        default="train",
        description="'train': BN layers use and update target batch statistics while refining "
        "(the authors' code); 'frozen': BN keeps the source statistics.",
    )
    max_voxels: int = Field(default=defaults.MAX_VOXELS, ge=1)

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str | None) -> str | None:
        if value is None or value == "cpu" or value == "cuda" or value.startswith("cuda:"):
            return value
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {value!r}")

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def sites_dir(self) -> Path:
        return self.home / "sites"
