"""The report's blocks about a refinement, its guard and the site's weights, from the
worker's results."""

from __future__ import annotations

from model_store.sites import SiteVersion
from sitefit.report import Guard, Refinement, SiteWeights
from worker.guard import Verdict
from worker.refinement import RefineConfig, RefinementResult


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def refinement_block(
    result: RefinementResult | None, verdict: Verdict | None, config: RefineConfig
) -> Refinement:
    """What ran (``Report.refinement``); ``stopped`` "skipped" when nothing was refined."""
    if result is None:
        return Refinement(epochs=0, dice_trace=[], stopped="skipped")
    return Refinement(
        epochs=result.epochs,
        dice_trace=[round(d, 6) for d in result.dice_trace],
        stopped=result.stopped,
        best_epoch=verdict.kept_epoch if verdict else result.epochs,
        batchnorm=config.batchnorm,
        learning_rate=config.learning_rate,
        statistics_average=config.statistics_average if config.learning_rate == 0 else None,
        path_points=list(result.path_points) or None,
    )


def guard_block(verdict: Verdict | None) -> Guard | None:
    if verdict is None:
        return None
    return Guard(
        verdict="reverted" if verdict.kept_epoch is None else "kept",
        reason=verdict.reason,
        signals=verdict.signals,
    )


def site_weights_block(
    used: SiteVersion | None,
    saved: SiteVersion | None,
    on_scan: float | None,
    saved_on_scan: float | None,
    save_reason: str | None,
) -> SiteWeights:
    """``Report.site_weights``: the version a job started from, the one it saved, their
    Dice(early, final) on the scan and why it saved one or did not."""
    return SiteWeights(
        used_version=used.version if used else None,
        saved_version=saved.version if saved else None,
        self_consistency_on_scan=rounded(on_scan),
        self_consistency_when_saved=used.self_consistency_after if used else None,
        self_consistency_saved=rounded(saved_on_scan),
        saved_scans=saved.scans_refined if saved else None,
        save_reason=save_reason,
    )
