"""The JSON description of a base model, stored beside its weights (no torch here)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from sitefit.codes import Code, missing_code
from sitefit.exceptions import InvalidInputError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(kind: str, name: str) -> str:
    """Model and site names become directory names: allow a safe, small alphabet only."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid {kind} name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


class Architecture(BaseModel):
    num_outputs: int = Field(ge=1, description="1: binary (sigmoid); C: softmax over C classes")
    base_channels: int = Field(ge=1)
    levels: int = Field(ge=1)
    res_blocks: int = Field(ge=1)


class TrainingInfo(BaseModel):
    dataset_name: str
    dataset_fingerprint: str = Field(description="sha256 over the training files' names and bytes")
    train_cases: list[str]
    validation_cases: list[str]
    epochs: int
    head_epochs: int
    learning_rate: float
    head_learning_rate: float | None = None
    # BN statistics the early head was trained under (worker.training); specs written before
    # the option existed were trained with the source's
    head_statistics: Literal["scan", "source"] = "source"
    # intensity augmentation of the early head's slices (worker.augmentation); "none" before
    # the option existed
    head_augmentation: Literal["intensity", "none"] = "none"
    batch_size: int
    seed: int
    seconds: float


class Validation(BaseModel):
    """Mean volumetric Dice on the held-out source cases (foreground classes averaged)."""

    dice_final: float | None
    dice_early: float | None


class ModelSpec(BaseModel):
    name: str
    version: int = Field(ge=1)
    created: datetime
    sitefit_version: str
    classes: dict[int, str] = Field(description="label value -> class name, 0 is background")
    # specs stored before codes existed have none: their SEGs use sitefit.codes' defaults
    codes: dict[int, Code] = Field(
        default_factory=dict,
        description="foreground label value -> the coded concept (SNOMED CT) of its class",
    )
    architecture: Architecture
    slice_axis: int = Field(ge=0, le=2, description="canonical (RAS) axis the 2D model slices")
    normalization: Literal["minmax"] = "minmax"
    training: TrainingInfo
    validation: Validation
    sha256: str = Field(description="sha256 of weights.safetensors")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        return check_name("model", value)

    @model_validator(mode="after")
    def _codes_name_classes(self) -> ModelSpec:
        strays = sorted(set(self.codes) - set(self.foreground))
        if strays:
            raise ValueError(f"codes given for label {strays[0]}, which is not a foreground class")
        return self

    def require_codes(self) -> ModelSpec:
        """This spec, if every foreground class has a code (new models must); otherwise
        ``InvalidInputError`` naming the first class without one."""
        reason = missing_code(self.classes, self.codes)
        if reason is not None:
            raise InvalidInputError(
                f"model {self.name}: {reason}: add its SNOMED CT concept (scheme, value, "
                'meaning) to the spec\'s "codes"'
            )
        return self

    @property
    def ref(self) -> str:
        """``NAME@VERSION``: this version, whatever is registered after it."""
        return f"{self.name}@{self.version}"

    @property
    def foreground(self) -> dict[int, str]:
        return {k: v for k, v in self.classes.items() if k != 0}
