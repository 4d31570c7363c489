"""The guard's decision on constructed predictions (no network): worker.guard.judge."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sitefit import defaults
from worker.guard import (
    GuardConfig,
    StartSignals,
    acceptance,
    bn_shift,
    decide,
    epoch_signals,
    judge,
    overrule_on_divergence,
    trace_shape,
)
from worker.inference import SlicePrediction, foreground_dice

SIGNALS = {
    "agreement_start_vs_adapted_dice", "volume_change", "entropy_before", "entropy_after",
    "self_consistency_start", "self_consistency_last_epoch", "empty_mask", "oscillations",
    "largest_fall", "epochs_failing",
}  # fmt: skip

CONFIG = GuardConfig(
    enabled=True, max_volume_change=0.5, min_agreement=0.7, min_consistency_gain=0.0
)


def labels(*boxes: tuple[int, int, int]) -> torch.Tensor:
    """A (4, 32, 32) label stack with square boxes (label, first row/column, size)."""
    stack = torch.zeros(4, 32, 32, dtype=torch.uint8)
    for label, start, size in boxes:
        stack[:, start : start + size, start : start + size] = label
    return stack


def prediction(final: torch.Tensor, early: torch.Tensor | None = None, entropy: float = 0.3):
    return SlicePrediction(final=final, early=final.clone() if early is None else early,
                           mean_entropy=entropy)  # fmt: skip


START = prediction(labels((1, 4, 20)), early=labels((1, 5, 19)))
SAME = prediction(labels((1, 4, 20)))
SLIGHTLY_MOVED = prediction(labels((1, 4, 19)))  # volume -10 %, agreement ~0.95
EMPTY = prediction(labels())
DOUBLED = prediction(labels((1, 2, 28)))  # volume +96 %, agreement ~0.68


def test_collapse_to_an_empty_mask_is_reverted() -> None:
    verdict = judge(START, [SAME, EMPTY], 2, CONFIG, [1.0, 1.0])
    # epoch 1 passes: the last passing epoch is kept, not the collapsed one
    assert verdict.kept_epoch == 1
    verdict = judge(START, [EMPTY], 2, CONFIG, [1.0])
    assert verdict.kept_epoch is None
    assert verdict.reason.startswith("reverted") and "lost all foreground" in verdict.reason
    assert verdict.signals["empty_mask"] is True
    # both heads empty agree perfectly: self-consistency cannot be what catches it
    assert verdict.signals["self_consistency_last_epoch"] == 1.0


def test_a_large_volume_change_is_reverted() -> None:
    verdict = judge(START, [DOUBLED], 2, CONFIG, [1.0])
    assert verdict.kept_epoch is None
    assert "volume changed" in verdict.reason
    assert verdict.signals["volume_change"]["1"] > CONFIG.max_volume_change


def test_low_agreement_with_the_start_is_reverted() -> None:
    shifted = prediction(labels((1, 10, 20)))  # same volume, moved: agreement ~0.6
    verdict = judge(START, [shifted], 2, dataclasses.replace(CONFIG, max_volume_change=9.0), [1])
    assert verdict.kept_epoch is None and "agreement" in verdict.reason
    assert verdict.signals["agreement_start_vs_adapted_dice"] < CONFIG.min_agreement


def test_the_last_passing_epoch_is_kept() -> None:
    verdict = judge(START, [SAME, SLIGHTLY_MOVED, DOUBLED], 2, CONFIG, [0.96, 0.97, 0.98])
    assert verdict.kept_epoch == 2
    assert verdict.reason.startswith("epoch 2 kept")
    assert set(verdict.signals["epochs_failing"]) == {"3"}
    verdict = judge(START, [SAME, SLIGHTLY_MOVED], 2, CONFIG, [0.96, 0.97])
    assert verdict.kept_epoch == 2 and verdict.reason == "every check passed"


def test_a_fall_of_self_consistency_below_the_start_fails_the_epoch() -> None:
    start = prediction(labels((1, 4, 20)))  # heads agree: self-consistency 1.0
    worse = prediction(labels((1, 4, 20)), early=labels((1, 4, 14)))
    verdict = judge(start, [worse], 2, CONFIG, [0.6])
    assert verdict.kept_epoch is None and "self-consistency" in verdict.reason


def test_a_consistency_margin_asks_the_loop_to_improve_its_own_figure() -> None:
    start = prediction(labels((1, 4, 20)), early=labels((1, 4, 18)))
    unchanged = prediction(labels((1, 4, 20)), early=labels((1, 4, 18)))
    assert judge(start, [unchanged], 2, CONFIG, [0.9]).kept_epoch == 1  # margin 0: equal passes
    strict = dataclasses.replace(CONFIG, min_consistency_gain=0.02)
    verdict = judge(start, [unchanged], 2, strict, [0.9])
    assert verdict.kept_epoch is None and "self-consistency" in verdict.reason


def test_an_entropy_rise_fails_the_epoch() -> None:
    unsure = prediction(labels((1, 4, 20)), entropy=0.3 * 1.5)  # START's entropy is 0.3
    config = dataclasses.replace(CONFIG, max_entropy_rise=0.3)
    verdict = judge(START, [SAME, unsure], 2, config, [1.0, 1.0])
    assert verdict.kept_epoch == 1 and "entropy" in verdict.reason
    assert verdict.signals["entropy_after"] == pytest.approx(0.45)
    off = dataclasses.replace(CONFIG, max_entropy_rise=float("inf"))
    assert judge(START, [SAME, unsure], 2, off, [1.0, 1.0]).kept_epoch == 2


def test_disabled_guard_keeps_the_last_epoch_and_still_reports() -> None:
    off = dataclasses.replace(CONFIG, enabled=False)
    verdict = judge(START, [SAME, EMPTY], 2, off, [1.0, 1.0])
    assert verdict.kept_epoch == 2 and "disabled" in verdict.reason
    assert verdict.signals["empty_mask"] is True and "2" in verdict.signals["epochs_failing"]


def test_signals_are_complete_and_serialisable() -> None:
    import json

    verdict = judge(START, [SAME, SLIGHTLY_MOVED], 2, CONFIG, [0.96, 0.97])
    assert set(verdict.signals) >= SIGNALS
    json.dumps(verdict.signals)
    assert verdict.signals["entropy_before"] == pytest.approx(0.3)


def test_multiclass_volume_change_is_per_class() -> None:
    start = prediction(labels((1, 2, 28), (2, 8, 16)))
    # class 2 grows from 16x16 to 20x20 (+56 %), class 1 shrinks accordingly
    grown = prediction(labels((1, 2, 28), (2, 6, 20)))
    signals = epoch_signals(1, start, grown, 3)
    assert signals.volume_change[2] == pytest.approx(400 / 256 - 1)
    assert judge(start, [grown], 3, CONFIG, [1.0]).kept_epoch is None


def test_decide_is_what_judge_decides() -> None:
    epochs = [SAME, SLIGHTLY_MOVED, DOUBLED]
    trace = [1.0, 1.0, 1.0]
    per_epoch = [epoch_signals(i + 1, START, p, 2) for i, p in enumerate(epochs)]
    start = StartSignals(foreground_dice(START.early, START.final, 2), START.mean_entropy)
    kept, reason, problems = decide(start, per_epoch, CONFIG)
    verdict = judge(START, epochs, 2, CONFIG, trace)
    assert (kept, reason) == (verdict.kept_epoch, verdict.reason) == (2, verdict.reason)
    assert problems[3] and not problems[1]


def test_judge_needs_an_epoch() -> None:
    with pytest.raises(ValueError):
        judge(START, [], 2, CONFIG, [])


def test_bn_shift_and_trace_shape() -> None:
    state = {"bn.running_mean": torch.zeros(4), "bn.running_var": torch.full((4,), 4.0)}
    assert bn_shift(state, state) == 0.0
    moved = {**state, "bn.running_mean": torch.ones(4)}
    assert bn_shift(state, moved) == pytest.approx(0.5)  # |1 - 0| / sqrt(4)
    shape = trace_shape([0.9, 0.8, 0.85, 0.2], start=0.85)  # steps + - + -
    assert shape["oscillations"] == 3 and shape["largest_fall"] == pytest.approx(0.65)


def test_defaults_are_a_working_guard() -> None:
    config = GuardConfig(True, defaults.GUARD_MAX_VOLUME_CHANGE, defaults.GUARD_MIN_AGREEMENT)
    assert judge(START, [EMPTY], 2, config, [1.0]).kept_epoch is None
    assert judge(START, [SAME], 2, config, [1.0]).kept_epoch == 1


@pytest.mark.parametrize("enabled", [True, False])
def test_acceptance_is_the_per_epoch_half_of_the_decision(enabled: bool) -> None:
    config = dataclasses.replace(CONFIG, enabled=enabled)
    epochs = [SAME, SLIGHTLY_MOVED, EMPTY, DOUBLED]
    accepts = acceptance(START, 2, config)
    verdict = judge(START, epochs, 2, config, [0.9] * len(epochs))
    passing = [i for i, p in enumerate(epochs, 1) if accepts(p)]
    if enabled:
        assert passing == [1, 2] and verdict.kept_epoch == max(passing)
    else:
        assert passing == [1, 2, 3, 4] and verdict.kept_epoch == 4


def test_a_divergence_never_brings_back_an_epoch_that_failed_the_checks() -> None:
    """Epoch 1 fails, epoch 2 passes but its weights explode: nothing passing is left."""
    verdict = judge(START, [DOUBLED, SAME, SAME], 2, CONFIG, [0.9, 0.96, 0.96])
    assert verdict.kept_epoch == 3 and set(verdict.signals["epochs_failing"]) == {"1"}
    start = {"init_path.conv.weight": torch.ones(4)}
    states = [start, {"init_path.conv.weight": torch.full((4,), float("nan"))}, start]
    overruled = overrule_on_divergence(verdict, start, states)
    assert overruled.kept_epoch is None and overruled.reason.startswith("reverted: ")
    assert overruled.signals["diverged_at_epoch"] == 2
    fine_first = judge(START, [SAME, SAME, SAME], 2, CONFIG, [0.96, 0.96, 0.96])
    assert overrule_on_divergence(fine_first, start, states).kept_epoch == 1
