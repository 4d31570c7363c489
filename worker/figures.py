"""Overlap figures of the report: self-consistency, base-vs-adapted agreement, reference.

All figures are 3D, at the scan's voxel spacing, on canonical-orientation label volumes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from sitefit.metrics import OverlapFigures, overlap_per_class
from sitefit.report import BeforeAfter, ClassFigures, Overlap, ReferenceFigures


@dataclass(frozen=True)
class LabelVolumes:
    """Canonical label volumes of one scan, before and after refinement."""

    early_before: np.ndarray
    final_before: np.ndarray
    early_after: np.ndarray
    final_after: np.ndarray
    final_last_epoch: np.ndarray | None = None  # the last refinement epoch's, when one ran


@dataclass(frozen=True)
class Figures:
    self_consistency: BeforeAfter
    agreement_base_vs_adapted: Overlap
    reference: ReferenceFigures | None
    per_class: dict[str, ClassFigures] | None


def compute_figures(
    volumes: LabelVolumes,
    classes: Mapping[int, str],
    spacing_mm: tuple[float, float, float],
    tolerance_mm: float,
) -> Figures:
    """The label-free figures: self-consistency before and after, base-vs-adapted agreement."""
    foreground = _foreground(classes)
    per_class = _overlap(foreground, spacing_mm, tolerance_mm)
    sc_before = per_class(volumes.early_before, volumes.final_before)
    unchanged = _unchanged(volumes)
    sc_after = sc_before if unchanged else per_class(volumes.early_after, volumes.final_after)
    agreement = per_class(volumes.final_after, volumes.final_before)
    by_class = {
        name: ClassFigures(
            self_consistency=BeforeAfter(
                before=Overlap(**sc_before[name]), after=Overlap(**sc_after[name])
            ),
            agreement_base_vs_adapted=Overlap(**agreement[name]),
            reference=None,
        )
        for name in foreground.values()
    }
    return Figures(
        self_consistency=BeforeAfter(before=mean_overlap(sc_before), after=mean_overlap(sc_after)),
        agreement_base_vs_adapted=mean_overlap(agreement),
        reference=None,
        per_class=by_class if len(foreground) > 1 else None,
    )


def add_reference(
    figures: Figures,
    volumes: LabelVolumes,
    classes: Mapping[int, str],
    spacing_mm: tuple[float, float, float],
    tolerance_mm: float,
    reference: np.ndarray,
) -> Figures:
    """``figures`` with the comparison against a reference mask (before, after and, when a
    refinement ran, its last epoch). Kept apart so that its cost is timed apart: it is QA
    work the product does only when a reference is sent."""
    overlap = _overlap(_foreground(classes), spacing_mm, tolerance_mm)
    ref_before = overlap(volumes.final_before, reference)
    ref_after = ref_before if _unchanged(volumes) else overlap(volumes.final_after, reference)
    last, ref_last = volumes.final_last_epoch, None
    if last is not None:
        ref_last = ref_after if last is volumes.final_after else overlap(last, reference)
    per_class = None
    if figures.per_class is not None:
        per_class = {
            name: entry.model_copy(
                update={
                    "reference": BeforeAfter(
                        before=Overlap(**ref_before[name]), after=Overlap(**ref_after[name])
                    )
                }
            )
            for name, entry in figures.per_class.items()
        }
    return replace(
        figures,
        reference=ReferenceFigures(
            before=mean_overlap(ref_before),
            after=mean_overlap(ref_after),
            last_epoch=None if ref_last is None else mean_overlap(ref_last),
        ),
        per_class=per_class,
    )


def _foreground(classes: Mapping[int, str]) -> dict[int, str]:
    return {k: v for k, v in classes.items() if k != 0}


def _overlap(
    foreground: dict[int, str], spacing_mm: tuple[float, float, float], tolerance_mm: float
) -> Callable[[np.ndarray, np.ndarray], dict[str, OverlapFigures]]:
    def per_class(pred: np.ndarray, ref: np.ndarray) -> dict[str, OverlapFigures]:
        return overlap_per_class(pred, ref, foreground, spacing_mm, tolerance_mm)

    return per_class


def _unchanged(volumes: LabelVolumes) -> bool:
    return (
        volumes.final_after is volumes.final_before and volumes.early_after is volumes.early_before
    )


def mean_overlap(figures: Mapping[str, OverlapFigures]) -> Overlap:
    """Mean over classes of each figure, leaving out classes where it is undefined."""

    def mean(key: str) -> float | None:
        values = [f[key] for f in figures.values() if f[key] is not None]  # type: ignore[literal-required]
        return float(np.mean(values)) if values else None

    return Overlap(surface_dice=mean("surface_dice"), dice=mean("dice"))
