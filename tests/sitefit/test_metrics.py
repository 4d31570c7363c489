"""sitefit.metrics against DeepMind's surface-distance package (the reference implementation)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
import pytest
import surface_distance
from scipy import ndimage

from sitefit import metrics
from sitefit.metrics import dice, overlap, overlap_per_class, surface_dice

Mask = npt.NDArray[np.bool_]

# The package calls scipy.ndimage.filters / .morphology, deprecated aliases.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

AGREE = 1e-9  # the contract is 1e-6; only the order of the final sums differs


@pytest.fixture(autouse=True)
def _numpy_inf_for_the_package() -> Iterator[None]:
    # The package still uses np.Inf (removed in NumPy 2) when one surface is empty.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(np, "Inf", np.inf, raising=False)
        yield


def package_sdice(pred: Mask, ref: Mask, spacing: Sequence[float], tol: float) -> float | None:
    distances = surface_distance.compute_surface_distances(ref, pred, list(spacing))
    with np.errstate(invalid="ignore", divide="ignore"):
        value = float(surface_distance.compute_surface_dice_at_tolerance(distances, tol))
    return None if math.isnan(value) else value


def assert_matches_package(pred: Mask, ref: Mask, spacing: Sequence[float], tol: float) -> float:
    expected = package_sdice(pred, ref, spacing, tol)
    got = surface_dice(pred, ref, spacing, tol)
    if expected is None:
        assert got is None
        return math.nan
    assert got is not None
    assert got == pytest.approx(expected, abs=AGREE), (expected, got)
    # The figure is symmetric; the package's argument order must not matter either.
    swapped = surface_dice(ref, pred, spacing, tol)
    assert swapped == pytest.approx(expected, abs=AGREE)
    return got


def blob(shape: tuple[int, int, int], seed: int, sigma: float, level: float) -> Mask:
    """Smoothed Gaussian noise thresholded at `level` standard deviations."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    mask: Mask = field > level * field.std()
    return mask


def blob_pair(
    shape: tuple[int, int, int], seed: int, sigma: float = 2.0, level: float = 0.3
) -> tuple[Mask, Mask]:
    """Two close but different blobs: the second one's field is perturbed by extra noise."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    extra = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    a: Mask = base > level * base.std()
    b: Mask = base + 0.4 * extra > level * base.std()
    return a, b


SPACINGS = [(1.0, 1.0, 1.0), (0.9, 1.1, 1.5), (1.0, 1.0, 2.0), (0.5, 0.5, 3.0), (2.0, 0.8, 1.2)]


# --- surface Dice against the package -----------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "seed", "sigma"),
    [
        ((12, 14, 16), 0, 1.0),
        ((20, 24, 18), 1, 1.5),
        ((32, 28, 36), 2, 2.0),
        ((48, 40, 56), 3, 3.0),
    ],
)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_random_blobs_match_package(
    shape: tuple[int, int, int], seed: int, sigma: float, spacing: tuple[float, float, float]
) -> None:
    pred, ref = blob_pair(shape, seed, sigma)
    assert pred.any() and ref.any() and (pred != ref).any()
    values = [assert_matches_package(pred, ref, spacing, tol) for tol in (0.0, 1.0, 2.0, 3.7)]
    assert values == sorted(values)  # more tolerance, more overlap


@pytest.mark.parametrize("seed", range(6))
def test_blobs_touching_the_volume_edge_match_package(seed: int) -> None:
    # A low threshold makes the blobs spill over every face of the volume.
    pred, ref = blob_pair((18, 22, 20), seed, sigma=2.5, level=-0.6)
    for axis in range(3):
        assert np.take(pred, 0, axis=axis).any() and np.take(pred, -1, axis=axis).any()
    for spacing in [(0.9, 1.1, 1.5), (1.0, 1.0, 2.0)]:
        for tol in (1.0, 2.0):
            assert_matches_package(pred, ref, spacing, tol)


def test_full_volume_and_corner_voxels_match_package() -> None:
    full = np.ones((6, 7, 8), dtype=bool)
    corners = np.zeros_like(full)
    corners[0, 0, 0] = corners[-1, -1, -1] = corners[0, -1, 0] = True
    edge_slab = np.zeros_like(full)
    edge_slab[:, :, -2:] = True
    for pred, ref in [(full, full), (full, corners), (corners, edge_slab), (full, edge_slab)]:
        for spacing in [(1.0, 1.0, 1.0), (0.9, 1.1, 1.5)]:
            for tol in (0.0, 1.0, 1.5, 4.0):
                assert_matches_package(pred, ref, spacing, tol)


@pytest.mark.parametrize(
    ("spacing", "shift_axis", "shift", "tol"),
    [
        ((1.0, 1.0, 2.0), 2, 1, 2.0),  # every surfel of the shifted face exactly 2 mm away
        ((1.0, 1.0, 2.0), 0, 1, 1.0),
        ((1.0, 1.0, 2.0), 0, 2, 2.0),
        ((0.5, 0.5, 1.0), 1, 2, 1.0),
        ((1.0, 1.0, 2.0), 2, 1, 1.0),
    ],
)
def test_exact_ties_at_the_tolerance_match_package(
    spacing: tuple[float, float, float], shift_axis: int, shift: int, tol: float
) -> None:
    box = np.zeros((14, 14, 14), dtype=bool)
    box[4:9, 3:10, 4:8] = True
    moved = np.roll(box, shift, axis=shift_axis)
    rough_a, rough_b = blob_pair((14, 14, 14), 7, sigma=1.5)
    for pred, ref in [(box, moved), (rough_a, rough_b), (box | rough_a, moved)]:
        assert_matches_package(pred, ref, spacing, tol)
        assert_matches_package(pred, ref, spacing, math.nextafter(tol, 0.0))
        assert_matches_package(pred, ref, spacing, math.nextafter(tol, math.inf))
    # The configuration really puts surfels at exactly the tolerance.
    distances = surface_distance.compute_surface_distances(moved, box, list(spacing))
    assert np.any(distances["distances_gt_to_pred"] == tol)


def test_ties_that_rounding_splits_use_the_distance_transform() -> None:
    # At 0.7 mm, offsets (1, 2, 3) and (3, 2, 1) have the same true length but lengths one
    # rounding step apart: the package's answer depends on which one its EDT picks.
    spacing = (0.7, 0.7, 0.7)
    lengths = metrics._offset_distances(np.array([[1, 2, 3], [3, 2, 1], [2, 1, 3]]), spacing)
    assert len(set(lengths.tolist())) > 1
    tol = float(lengths.min())
    assert metrics._tolerance_offsets(spacing, tol) is None
    for seed in range(3):
        pred, ref = blob_pair((20, 20, 20), seed, sigma=1.5)
        assert_matches_package(pred, ref, spacing, tol)


def test_distance_transform_paths_match_package(monkeypatch: pytest.MonkeyPatch) -> None:
    pred, ref = blob_pair((26, 22, 24), 11, sigma=2.0)
    far = np.roll(pred, 9, axis=0)
    # Large tolerance: more offsets than listed, the distance transform from the start.
    assert metrics._tolerance_offsets((1.0, 1.0, 1.0), 30.0) is None
    assert_matches_package(pred, ref, (1.0, 1.0, 1.0), 30.0)
    # Look-up budget spent at once: every surfel goes to the distance transform.
    monkeypatch.setattr(metrics, "_EDT_COST_IN_LOOKUPS", 0)
    for a, b in [(pred, ref), (far, ref)]:
        for tol in (1.0, 2.5, 6.0):
            assert_matches_package(a, b, (0.9, 1.1, 1.5), tol)
    # Budget spent midway, with surfels still pending.
    monkeypatch.setattr(metrics, "_EDT_COST_IN_LOOKUPS", 1)
    assert_matches_package(far, ref, (0.9, 1.1, 1.5), 6.0)


def test_one_empty_mask_gives_zero_like_package() -> None:
    pred, _ = blob_pair((16, 16, 16), 3)
    empty = np.zeros_like(pred)
    for spacing in [(1.0, 1.0, 1.0), (0.9, 1.1, 1.5)]:
        assert package_sdice(pred, empty, spacing, 1.0) == 0.0
        assert package_sdice(empty, pred, spacing, 1.0) == 0.0
        assert surface_dice(pred, empty, spacing, 1.0) == 0.0
        assert surface_dice(empty, pred, spacing, 1.0) == 0.0


def test_both_empty_is_none_where_package_gives_nan() -> None:
    empty = np.zeros((8, 9, 10), dtype=bool)
    assert package_sdice(empty, empty, (1.0, 1.0, 1.0), 1.0) is None
    assert surface_dice(empty, empty, (1.0, 1.0, 1.0), 1.0) is None
    assert overlap(empty, empty, (1.0, 1.0, 1.0), 1.0) == {"surface_dice": None, "dice": None}


@pytest.mark.parametrize("tol", [0.0, 1.0])
def test_identical_masks_give_one(tol: float) -> None:
    mask = blob((20, 18, 16), 5, 2.0, 0.2)
    assert surface_dice(mask, mask, (0.9, 1.1, 1.5), tol) == 1.0
    assert package_sdice(mask, mask, (0.9, 1.1, 1.5), tol) == pytest.approx(1.0, abs=AGREE)


def test_non_boolean_masks_count_non_zero() -> None:
    pred, ref = blob_pair((16, 18, 14), 4)
    expected = surface_dice(pred, ref, (1.0, 1.0, 2.0), 1.0)
    assert surface_dice(pred.astype(np.uint8) * 3, ref.astype(np.float32), [1, 1, 2], 1) == expected


@pytest.mark.parametrize(
    ("pred_shape", "spacing", "tol"),
    [
        ((8, 8, 8), (1.0, 1.0), 1.0),  # spacing of the wrong length
        ((8, 8, 8), (1.0, 0.0, 1.0), 1.0),  # non-positive spacing
        ((8, 8, 8), (1.0, math.nan, 1.0), 1.0),
        ((8, 8, 8), (1.0, 1.0, 1.0), -0.5),  # negative tolerance
        ((8, 8, 8), (1.0, 1.0, 1.0), math.nan),
        ((8, 8, 8), (1.0, 1.0, 1.0), math.inf),
        ((8, 8, 9), (1.0, 1.0, 1.0), 1.0),  # shapes differ
        ((8, 8), (1.0, 1.0, 1.0), 1.0),  # not 3D
    ],
)
def test_bad_arguments_are_refused(
    pred_shape: tuple[int, ...], spacing: tuple[float, ...], tol: float
) -> None:
    pred = np.ones(pred_shape, dtype=bool)
    ref = np.ones((8, 8, 8) if len(pred_shape) == 3 else pred_shape, dtype=bool)
    with pytest.raises(ValueError):
        surface_dice(pred, ref, spacing, tol)


# --- volumetric Dice ----------------------------------------------------------------------------


def test_dice_values() -> None:
    a = np.zeros((4, 4, 4), dtype=bool)
    b = np.zeros_like(a)
    a[0, 0, :2] = True  # 2 voxels
    b[0, 0, 1:4] = True  # 3 voxels, 1 shared
    assert dice(a, b) == pytest.approx(2 * 1 / 5)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) is None
    assert dice(a.astype(np.int16) * 7, b.astype(np.uint8)) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        dice(a, b[:, :, :3])


@pytest.mark.parametrize("seed", range(3))
def test_dice_matches_package(seed: int) -> None:
    pred, ref = blob_pair((20, 22, 24), seed)
    assert dice(pred, ref) == pytest.approx(
        surface_distance.compute_dice_coefficient(ref, pred), abs=1e-12
    )


# --- overlap figures ----------------------------------------------------------------------------


def test_overlap_gives_both_figures() -> None:
    pred, ref = blob_pair((20, 18, 22), 8)
    figures = overlap(pred, ref, (0.9, 1.1, 1.5), 1.0)
    assert set(figures) == {"surface_dice", "dice"}
    assert figures["surface_dice"] == surface_dice(pred, ref, (0.9, 1.1, 1.5), 1.0)
    assert figures["dice"] == dice(pred, ref)


def test_overlap_per_class_on_a_three_class_label_map() -> None:
    shape = (24, 26, 22)
    spacing = (0.9, 1.1, 1.5)
    rng = np.random.default_rng(9)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5)
    cuts = np.quantile(field, [0.4, 0.6, 0.8])
    ref_labels = np.digitize(field, cuts).astype(np.uint8)  # 0 background, classes 1..3
    pred_labels = np.digitize(field + 0.3 * noise, cuts).astype(np.uint8)
    names = {0: "background", 1: "myocardium", 2: "left_ventricle", 3: "right_ventricle", 4: "x"}

    figures = overlap_per_class(pred_labels, ref_labels, names, spacing, 1.0)

    assert list(figures) == ["myocardium", "left_ventricle", "right_ventricle", "x"]
    for k in (1, 2, 3):
        pred_k, ref_k = pred_labels == k, ref_labels == k
        got = figures[names[k]]
        assert got["dice"] == dice(pred_k, ref_k)
        assert got["surface_dice"] == pytest.approx(
            package_sdice(pred_k, ref_k, spacing, 1.0), abs=AGREE
        )
        assert 0.0 < (got["dice"] or 0.0) < 1.0
    assert figures["x"] == {"surface_dice": None, "dice": None}  # in neither label map
    with pytest.raises(ValueError):
        overlap_per_class(pred_labels, ref_labels[:-1], names, spacing, 1.0)
