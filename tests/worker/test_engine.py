"""The whole job through the engine: mask geometry, report contract, modes."""

import nibabel as nib
import numpy as np
import pytest

from sitefit import defaults
from sitefit.exceptions import ModelNotFoundError
from sitefit.settings import Settings
from tests.conftest import PhantomCase
from worker.engine import Engine, Progress, SegmentRequest

REPORT_KEYS = {
    "model",
    "site",
    "mode_requested",
    "mode_used",
    "tolerance_mm",
    "device",
    "timings_s",
    "self_consistency",
    "agreement_base_vs_adapted",
    "reference",
    "per_class",
    "refinement",
}


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    return Engine(settings)


def test_adapt_returns_mask_on_input_grid_and_full_report(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    stages: list[Progress] = []
    request = SegmentRequest(
        shifted_brain_case.image, brain_model, "site-a", "adapt", shifted_brain_case.label
    )
    result = engine.run(request, stages.append)
    source = nib.load(shifted_brain_case.image)
    assert result.mask.shape == source.shape
    np.testing.assert_allclose(result.mask.affine, source.affine)
    assert result.mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(result.mask.dataobj))) <= {0, 1}

    report = result.report.model_dump(mode="json")
    assert set(report) >= REPORT_KEYS
    timings = report["timings_s"]
    assert set(timings) == {"load", "adapt", "segment", "metrics", "reference", "total"}
    assert timings["reference"] > 0  # the reference was loaded and compared with, timed apart
    assert sum(v for k, v in timings.items() if k != "total") <= timings["total"] + 1e-3
    assert set(report["self_consistency"]) == {"before", "after"}
    assert set(report["self_consistency"]["before"]) == {"surface_dice", "dice"}
    assert report["reference"]["after"]["surface_dice"] is not None
    assert report["model"]["sha256"] and report["mode_used"] == "adapt"
    refinement = report["refinement"]
    assert 1 <= refinement["epochs"] <= 3 and len(refinement["dice_trace"]) == refinement["epochs"]
    assert refinement["stopped"] in {"converged", "max_epochs"}
    assert refinement["learning_rate"] == 0 and refinement["statistics_average"] == "cumulative"
    points = refinement["path_points"]
    assert len(points) == refinement["epochs"] and points == sorted(points) and points[-1] == 1
    assert points[refinement["best_epoch"] - 1] in defaults.REFINE_STATISTICS_PATH
    assert report["per_class"] is None  # binary model
    assert [p.stage for p in stages][:2] == ["loading", "segmenting"]
    epochs = [p.epoch for p in stages if p.stage == "adapting" and p.epoch]
    assert epochs == sorted(epochs)  # the last may be reported again, just before a site save
    assert sorted(set(epochs)) == list(range(1, refinement["epochs"] + 1))


def test_none_mode_skips_refinement(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    result = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, None, "none"))
    report = result.report
    assert report.refinement.stopped == "skipped" and report.refinement.epochs == 0
    assert report.self_consistency.before == report.self_consistency.after
    assert report.agreement_base_vs_adapted.dice in (1.0, None)
    assert report.reference is None
    assert report.timings_s.reference == 0


def test_base_segmentation_is_deterministic(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    request = SegmentRequest(shifted_brain_case.image, brain_model, None, "none")
    first, second = engine.run(request), engine.run(request)
    assert np.array_equal(np.asarray(first.mask.dataobj), np.asarray(second.mask.dataobj))


def test_multiclass_report_has_per_class_figures(
    engine: Engine, heart_model: str, shifted_heart_case: PhantomCase
) -> None:
    request = SegmentRequest(
        shifted_heart_case.image, heart_model, None, "adapt", shifted_heart_case.label
    )
    report = engine.run(request).report
    assert report.per_class is not None
    spec = engine.store.models.spec(heart_model)
    assert list(report.per_class) == [spec.classes[k] for k in sorted(spec.classes) if k != 0]
    assert len(report.per_class) == 3
    for figures in report.per_class.values():
        assert figures.reference is not None


def test_unknown_model_is_a_clear_error(engine: Engine, shifted_brain_case: PhantomCase) -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'"):
        engine.run(SegmentRequest(shifted_brain_case.image, "nope"))


def test_decisions_are_made_on_the_scans_own_pixels_not_the_padding(
    engine: Engine, consistent_brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    """Slices are zero-padded in-plane to a multiple of 8 for the U-Net, and on this scan the
    final head marks much of that padding as brain (the early head none of it): what the net
    predicts there must not count in the figures the guard, ``auto`` and the save rule decide
    by, which are then the report's own. Counted with the padding, Dice(early, final) of the
    start is about 0.16 here against the report's 0.22."""
    shape = nib.load(shifted_brain_case.image).shape
    assert all(n % 8 for n in shape), f"premise: every axis is padded, {shape}"
    request = SegmentRequest(shifted_brain_case.image, consistent_brain_model, mode="adapt")
    report = engine.run(request).report
    assert report.guard is not None and report.refinement is not None
    before, after = report.self_consistency.before.dice, report.self_consistency.after.dice
    assert before is not None and after is not None, "premise: both heads find the brain"
    assert report.guard.signals["self_consistency_start"] == pytest.approx(before, abs=1e-6)
    kept = report.refinement.best_epoch
    assert kept is not None, "premise: the guard keeps an epoch"
    assert report.refinement.dice_trace[kept - 1] == pytest.approx(after, abs=1e-6)
