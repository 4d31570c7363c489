"""Overlap figures of two segmentations: volumetric Dice and surface Dice at a tolerance.

Used by the engine for the label-free quality figures (early-head mask vs final mask, base vs
adapted mask) and, when a reference is given, for the true figures; the HTTP server imports it
too, so it depends on numpy and scipy only (never torch).

Surface Dice is the one of Nikolov et al. 2018 as implemented by DeepMind's ``surface-distance``
package (``compute_surface_distances`` followed by ``compute_surface_dice_at_tolerance``), and
:func:`surface_dice` reproduces that package's value (to rounding of the final sums):

- surface elements ("surfels") sit on the corners of the voxel grid: every 2x2x2 cube of voxels
  whose eight values are not all equal is one, and its area (mm^2, at the voxel spacing) comes
  from the package's marching-cubes table of 256 neighbour codes;
- outside the volume counts as background, so masks that touch the volume edge are closed there;
- a surfel of one mask counts as overlapping when the Euclidean distance (mm) from its corner to
  the nearest surfel corner of the other mask is ``<=`` the tolerance, computed exactly as
  ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)`` computes it;
- the result is (overlapping area of both surfaces) / (total area of both surfaces): 0.0 when
  exactly one mask is empty, undefined (``None`` here, NaN in the package) when both are.

The package sorts every distance in Python and runs two Euclidean distance transforms over the
bounding box of both masks. Only "within tolerance or not" per surfel is needed, so here each
surfel looks up the other surface's surfel map at the grid offsets that lie within the tolerance
ball (lengths computed as the distance transform computes them), nearest first, and stops at the
first hit. The distance transform is used as in the package where the ball holds very many
offsets, or where the spacing and tolerance put two offsets on opposite sides of the tolerance by
a rounding error only (ties: which of several equally near points the package's distance
transform picks would then decide the outcome); and the look-ups of one surface hand their
remaining surfels to it once they have cost about as much as it would (surfaces far apart at a
tolerance of many voxels).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Final, TypedDict

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from sitefit.surfels import (
    BoolArray,
    FloatArray,
    bounding_box,
    is_surfel,
    neighbour_codes,
    surfel_area_table,
)

__all__ = [
    "OverlapFigures",
    "dice",
    "overlap",
    "overlap_per_class",
    "surface_dice",
]

IntArray = npt.NDArray[np.int64]

# Above this many grid offsets in the tolerance ball, use the distance transform (the offsets
# are not even listed).
_MAX_OFFSETS: Final = 20_000
# Cost of the distance transform per voxel of the corner grid, in offset look-ups per surfel
# (measured 25-100 on a 2-core machine: ~35-150 ns per voxel, depending on the masks, against
# ~1.3-2 ns per look-up). The look-ups of one surface stop and hand their remaining surfels to the
# distance transform once they have spent this many per voxel, so that surfaces far apart at a
# large tolerance cost at most about twice the distance transform alone.
_EDT_COST_IN_LOOKUPS: Final = 50
# Relative width of the band around the tolerance inside which rounding can decide a comparison.
_TIE_BAND: Final = 1e-9


class OverlapFigures(TypedDict):
    """Surface Dice (at the tolerance) and volumetric Dice of two masks; None where undefined."""

    surface_dice: float | None
    dice: float | None


def dice(pred: npt.ArrayLike, ref: npt.ArrayLike) -> float | None:
    """Volumetric Dice 2|P∩R| / (|P| + |R|) of two masks of the same shape.

    Non-boolean inputs count every non-zero value as foreground. Returns None when both masks
    are empty (the package's ``compute_dice_coefficient`` gives NaN there).
    """
    p, r = _as_mask_pair(pred, ref)
    total = np.count_nonzero(p) + np.count_nonzero(r)
    if total == 0:
        return None
    return 2.0 * np.count_nonzero(p & r) / total


def surface_dice(
    pred: npt.ArrayLike,
    ref: npt.ArrayLike,
    spacing_mm: Sequence[float],
    tolerance_mm: float,
) -> float | None:
    """Surface Dice at ``tolerance_mm`` (Nikolov et al. 2018) of two 3D masks.

    Equal, up to rounding of the final sums (~1e-12), to the DeepMind ``surface-distance``
    package's ``compute_surface_dice_at_tolerance(compute_surface_distances(ref, pred,
    spacing_mm), tolerance_mm)``; the figure is symmetric in ``pred`` and ``ref``. See the module
    docstring for the definition.

    Args:
        pred, ref: 3D masks of the same shape; non-boolean inputs count non-zero as foreground.
        spacing_mm: voxel size along the three array axes, in mm (positive, finite).
        tolerance_mm: largest surface-to-surface distance, in mm, that counts as overlapping
            (finite, >= 0).

    Returns:
        The surface Dice in [0, 1]; 0.0 when exactly one mask is empty; None when both are.

    Raises:
        ValueError: masks not 3D or of different shapes, bad spacing or tolerance.
    """
    p, r = _as_mask_pair(pred, ref)
    if p.ndim != 3:
        raise ValueError(f"surface Dice needs 3D masks, got shape {p.shape}")
    spacing = _check_spacing(spacing_mm)
    tolerance = _check_tolerance(tolerance_mm)

    box = bounding_box(p | r)
    if box is None:
        return None

    offsets = _tolerance_offsets(spacing, tolerance)
    margin = (0, 0, 0) if offsets is None else _margin(offsets)

    # Corner grid of the box (one more than its voxels on each axis), with `margin` extra corners
    # on each side so that offset look-ups from any surfel stay inside the array.
    codes_p = neighbour_codes(p, box, margin)
    codes_r = neighbour_codes(r, box, margin)
    border_p = is_surfel(codes_p)
    border_r = is_surfel(codes_r)
    idx_p = np.flatnonzero(border_p)
    idx_r = np.flatnonzero(border_r)
    areas = surfel_area_table(spacing)
    area_p = areas[codes_p.ravel()[idx_p]]
    area_r = areas[codes_r.ravel()[idx_r]]

    if idx_p.size == 0 or idx_r.size == 0:
        return 0.0  # one surface is empty: no surfel has a finite distance to the other

    if offsets is None:
        near_p = _within_by_distance_transform(idx_p, border_r, spacing, tolerance)
        near_r = _within_by_distance_transform(idx_r, border_p, spacing, tolerance)
    else:
        strides = np.array([codes_p.shape[1] * codes_p.shape[2], codes_p.shape[2], 1], np.int64)
        deltas = offsets @ strides
        budget = _EDT_COST_IN_LOOKUPS * codes_p.size
        near_p = _within_by_offsets(idx_p, border_r, deltas, budget, spacing, tolerance)
        near_r = _within_by_offsets(idx_r, border_p, deltas, budget, spacing, tolerance)

    overlap_area = float(area_p[near_p].sum()) + float(area_r[near_r].sum())
    return overlap_area / (float(area_p.sum()) + float(area_r.sum()))


def overlap(
    pred: npt.ArrayLike,
    ref: npt.ArrayLike,
    spacing_mm: Sequence[float],
    tolerance_mm: float,
) -> OverlapFigures:
    """Surface Dice at ``tolerance_mm`` and volumetric Dice of two 3D masks (see both)."""
    p, r = _as_mask_pair(pred, ref)
    return OverlapFigures(
        surface_dice=surface_dice(p, r, spacing_mm, tolerance_mm),
        dice=dice(p, r),
    )


def overlap_per_class(
    pred_labels: npt.ArrayLike,
    ref_labels: npt.ArrayLike,
    class_names: Mapping[int, str],
    spacing_mm: Sequence[float],
    tolerance_mm: float,
) -> dict[str, OverlapFigures]:
    """Binary figures of ``pred_labels == k`` vs ``ref_labels == k`` for each class ``k``.

    One entry per key of ``class_names`` except background (0), keyed by its name, in label
    order. A class absent from both label maps gets None figures; label values that
    ``class_names`` does not name are not reported.
    """
    p = np.asarray(pred_labels)
    r = np.asarray(ref_labels)
    if p.shape != r.shape:
        raise ValueError(f"label maps differ in shape: {p.shape} vs {r.shape}")
    names = [class_names[k] for k in sorted(class_names) if k != 0]
    if len(set(names)) != len(names):
        raise ValueError(f"class names are not unique: {names}")
    return {
        class_names[k]: overlap(p == k, r == k, spacing_mm, tolerance_mm)
        for k in sorted(class_names)
        if k != 0
    }


# --- input checks -------------------------------------------------------------------------------


def _as_mask(a: npt.ArrayLike) -> BoolArray:
    arr = np.asarray(a)
    if arr.dtype == np.bool_:
        return arr
    nonzero: BoolArray = np.not_equal(arr, 0)
    return nonzero


def _as_mask_pair(pred: npt.ArrayLike, ref: npt.ArrayLike) -> tuple[BoolArray, BoolArray]:
    p = _as_mask(pred)
    r = _as_mask(ref)
    if p.shape != r.shape:
        raise ValueError(f"masks differ in shape: {p.shape} vs {r.shape}")
    return p, r


def _check_spacing(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing_mm)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing_mm must be 3 positive finite numbers, got {spacing_mm!r}")
    return values[0], values[1], values[2]


def _check_tolerance(tolerance_mm: float) -> float:
    tolerance = float(tolerance_mm)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm!r}")
    return tolerance


# --- within tolerance ---------------------------------------------------------------------------


def _offset_distances(offsets: IntArray, spacing: tuple[float, float, float]) -> FloatArray:
    """Length in mm of integer grid offsets, computed as scipy's distance transform does."""
    scaled = offsets.astype(np.float64) * np.asarray(spacing, dtype=np.float64)
    squared = scaled * scaled
    result: FloatArray = np.sqrt(squared[:, 0] + squared[:, 1] + squared[:, 2])
    return result


@functools.lru_cache(maxsize=32)
def _tolerance_offsets(spacing: tuple[float, float, float], tolerance: float) -> IntArray | None:
    """Grid offsets whose length is ``<= tolerance``, nearest first.

    None where the distance transform must be used instead: too many offsets, or an offset just
    below and another just above the tolerance within rounding (the package's distance transform
    returns the length of one nearest point of several at the same true distance, and which one
    would then decide the comparison).
    """
    reach = [math.floor(tolerance * (1 + _TIE_BAND) / s) for s in spacing]
    if math.prod(2 * r + 1 for r in reach) > 8 * _MAX_OFFSETS:
        return None
    axes = [np.arange(-r, r + 1, dtype=np.int64) for r in reach]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    lengths = _offset_distances(grid, spacing)
    in_band = np.abs(lengths - tolerance) <= _TIE_BAND * max(tolerance, min(spacing))
    if np.any(in_band & (lengths <= tolerance)) and np.any(in_band & (lengths > tolerance)):
        return None
    inside = lengths <= tolerance
    if np.count_nonzero(inside) > _MAX_OFFSETS:
        return None
    order = np.argsort(lengths[inside], kind="stable")
    result: IntArray = grid[inside][order]
    result.flags.writeable = False
    return result


def _margin(offsets: IntArray) -> tuple[int, int, int]:
    reach = np.abs(offsets).max(axis=0)
    return int(reach[0]), int(reach[1]), int(reach[2])


def _within_by_offsets(
    sources: IntArray,
    target: BoolArray,
    deltas: IntArray,
    budget: int,
    spacing: tuple[float, float, float],
    tolerance: float,
) -> BoolArray:
    """For each flat corner index in `sources`: is `target` set at any of the flat `deltas`?

    `deltas` (the tolerance ball, nearest first) must keep every source inside `target`. A source
    leaves the search at its first hit. Once `budget` look-ups are spent, the sources still
    pending are decided by the distance transform instead: same answers, since no offset lies
    within rounding of the tolerance on its other side (see `_tolerance_offsets`), so any
    nearest point the transform picks falls on the same side as the nearest offset.
    """
    flat_target = target.ravel()
    hit = np.zeros(sources.size, dtype=np.bool_)
    pending = np.arange(sources.size, dtype=np.int64)
    at = sources.copy()
    moved = np.empty_like(at)
    found = np.empty(at.size, dtype=np.bool_)
    spent = 0
    for delta in deltas.tolist():
        n = at.size
        if spent > budget:
            hit[pending] = _within_by_distance_transform(at, target, spacing, tolerance)
            break
        spent += n
        np.add(at, delta, out=moved[:n])
        np.take(flat_target, moved[:n], out=found[:n])
        if found[:n].any():
            hit[pending[found[:n]]] = True
            keep = ~found[:n]
            pending = pending[keep]
            at = at[keep]
            if pending.size == 0:
                break
    return hit


def _within_by_distance_transform(
    sources: IntArray,
    target: BoolArray,
    spacing: tuple[float, float, float],
    tolerance: float,
) -> BoolArray:
    """As the package: EDT (mm) to the target surfels over the corner grid, compared ``<=``."""
    distance: FloatArray = ndimage.distance_transform_edt(~target, sampling=spacing)
    result: BoolArray = distance.ravel()[sources] <= tolerance
    return result
