"""The report's blocks about a refinement and its guard, from the worker's results."""

from __future__ import annotations

from sitefit.report import Guard, Refinement
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
    )


def guard_block(verdict: Verdict | None) -> Guard | None:
    if verdict is None:
        return None
    return Guard(
        verdict="reverted" if verdict.kept_epoch is None else "kept",
        reason=verdict.reason,
        signals=verdict.signals,
    )
