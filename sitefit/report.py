"""The job report: its stable keys (the report contract), as pydantic models.

Top-level overlap figures of a multi-class model are the mean over its foreground classes
(classes where a figure is undefined, i.e. both masks empty, are left out of the mean);
``per_class`` holds each class's own figures. ``None`` (JSON null) means undefined.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Mode = Literal["auto", "adapt", "cached", "none"]
MODES: tuple[Mode, ...] = ("auto", "adapt", "cached", "none")


class Overlap(BaseModel):
    surface_dice: float | None = Field(description="surface Dice at tolerance_mm; null: undefined")
    dice: float | None = Field(description="volumetric Dice; null: both masks empty")


class BeforeAfter(BaseModel):
    before: Overlap
    after: Overlap


class ReferenceFigures(BeforeAfter):
    """The base model's and the output's masks against a reference mask."""

    last_epoch: Overlap | None = Field(
        default=None,
        description="the last refinement epoch's mask vs the reference: the output without the "
        "guard (null when no refinement ran)",
    )


class ClassFigures(BaseModel):
    self_consistency: BeforeAfter
    agreement_base_vs_adapted: Overlap
    reference: BeforeAfter | None = None


class ModelIdentity(BaseModel):
    name: str
    version: int
    sha256: str


class Timings(BaseModel):
    load: float = 0.0
    adapt: float = 0.0
    segment: float = 0.0
    metrics: float = 0.0
    # loading a reference mask and comparing with it (0 without one): QA work, not the job's
    reference: float = 0.0
    total: float = 0.0


class Refinement(BaseModel):
    epochs: int = Field(description="refinement epochs run (0 when skipped)")
    dice_trace: list[float] = Field(description="Dice(early mask, final mask) after each epoch")
    stopped: Literal["converged", "max_epochs", "skipped"]
    best_epoch: int | None = Field(default=None, description="epoch whose weights were kept")
    batchnorm: str | None = None
    learning_rate: float | None = None
    statistics_average: str | None = Field(
        default=None,
        description="with learning rate 0: how the batch-norm running statistics followed the "
        "scan ('cumulative' or 'momentum')",
    )
    path_points: list[float] | None = Field(
        default=None,
        description="with the statistics path (the default): the points evaluated, as "
        "fractions of the way from the starting statistics to the scan's, in path order, one "
        "per dice_trace entry ('epochs' counts them); the kept one is path_points[best_epoch - 1]",
    )


class SiteWeights(BaseModel):
    used_version: int | None = Field(description="site weights version the job started from")
    saved_version: int | None = Field(description="version this job saved for the site")
    self_consistency_on_scan: float | None = Field(
        default=None, description="Dice(early, final) of the site weights on this scan"
    )
    self_consistency_when_saved: float | None = Field(
        default=None, description="Dice(early, final) they reached on the scan they were refined on"
    )
    self_consistency_saved: float | None = Field(
        default=None,
        description="Dice(early, final) on this scan of the version this job saved (with "
        "pooled statistics that of the pool, not of this scan's output)",
    )
    saved_scans: int | None = Field(
        default=None, description="scans the saved version was refined on (its statistics pool)"
    )
    save_reason: str | None = Field(
        default=None,
        description="why this job saved a site version, or did not (null without a site or "
        "without refinement)",
    )


class Guard(BaseModel):
    verdict: Literal["kept", "reverted"]
    reason: str
    signals: dict[str, Any]


class Reproducibility(BaseModel):
    """What the mask came from (docs/api.md, "Reproducing a result", says how to use it)."""

    base_sha256: str = Field(description="sha256 of the base model's weights")
    site_version: int | None = Field(description="site version the job started from (null: none)")
    site_delta_sha256: str | None = Field(description="sha256 of that version's delta file")
    saved_site_version: int | None = Field(
        description="site version this job saved (null: none); the next job starts from it"
    )
    saved_site_delta_sha256: str | None = Field(description="sha256 of the saved delta file")
    input_sha256: str = Field(
        description="sha256 of the scan file the engine read (a DICOM series: its NIfTI "
        "conversion, the job's stored scan)"
    )
    sitefit: str
    torch: str
    numpy: str
    python: str
    device: str = Field(description="the device, with its CPU thread count on a CPU")
    numerics: str = Field(description="'fp32', or the autocast type and layout on a GPU")
    deterministic_algorithms: bool = Field(
        description="whether torch's deterministic algorithms were enforced"
    )
    settings: dict[str, Any] = Field(
        description="the settings that steer the site policy, refinement and guard, by name: "
        "SITEFIT_<NAME upper-cased> sets each again"
    )
    refinement: dict[str, Any] = Field(
        description="the refinement's full configuration (settings and constants)"
    )
    guard: dict[str, Any] = Field(description="the guard's thresholds as applied")
    seeds: dict[str, int] = Field(description="every seed: the refinement's slice shuffles")


class Report(BaseModel):
    model: ModelIdentity
    site: str | None
    mode_requested: Mode
    mode_used: Mode
    mode_reason: str = ""
    site_weights: SiteWeights = Field(
        default_factory=lambda: SiteWeights(used_version=None, saved_version=None)
    )
    tolerance_mm: float
    device: str
    spacing_mm: tuple[float, float, float]
    timings_s: Timings
    self_consistency: BeforeAfter
    agreement_base_vs_adapted: Overlap
    reference: ReferenceFigures | None = None
    per_class: dict[str, ClassFigures] | None = None
    refinement: Refinement
    guard: Guard | None = None
    warnings: list[str] = Field(default_factory=list)
    sitefit_version: str
    reproducibility: Reproducibility | None = Field(
        default=None, description="what the mask came from (null in reports stored before it was)"
    )
