"""The adaptation guard: judge a refinement by signals the refinement loss does not optimise.

Refinement minimises the early head's disagreement with the final output, so self-consistency
after refinement can be high while the final mask has been dragged somewhere wrong
(docs/method.md, "What the gains come from"). The guard looks elsewhere, at every epoch,
comparing the epoch's prediction with the starting weights' (the prediction refinement already
computes after each epoch: no extra forward pass). An epoch fails when

- ``empty``: its final mask lost every foreground voxel the start had;
- ``agreement`` (Dice of the start's and the epoch's final masks) < ``min_agreement``;
- ``volume_change`` (relative change of a class's predicted volume) > ``max_volume_change``;
- ``self_consistency`` (Dice(early, final), the loop's own figure) ends below the start's
  plus ``min_consistency_gain``: a loop that cannot even raise its own objective is not
  converging on the scan, it is drifting;
- ``entropy`` (mean entropy of the final output) rose by more than ``max_entropy_rise``
  relative to the start's.

Recorded, not checked: ``bn_shift`` (how far batch-norm running means moved, in source
standard deviations; non-zero only when the BN option adapts statistics) and the trace's shape
(oscillation: sign changes; collapse: the largest fall).

Decision (``decide``): keep the last epoch that passes every check, else revert to the
starting weights. "Best" is the most refined weights the guard accepts: every label-free
criterion that ranks epochs (the trace, the entropy) is either the loss itself or unreliable
on the phantoms, while passing the checks bounds how far the epoch is from the start. The
thresholds are calibrated on the phantom benchmark (``bench/guard_calibration.py``,
docs/benchmarks.md "Adaptation guard: calibration"); defaults in ``sitefit/defaults.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch

from sitefit import defaults
from worker.inference import SlicePrediction, foreground_dice

# an init-path tensor whose norm grows past this many times its start has diverged
DIVERGED_NORM_GROWTH = 100.0


@dataclass(frozen=True)
class GuardConfig:
    """Thresholds of the guard's checks (calibrated defaults: sitefit/defaults.py).

    An epoch fails when its final mask is empty where the start had foreground, when
    ``agreement < min_agreement``, when any class volume changed by more than
    ``max_volume_change`` (relative), when its self-consistency is below the start's plus
    ``min_consistency_gain``, or when the mean entropy of the final output rose by more than
    ``max_entropy_rise`` (relative to the start's).
    """

    enabled: bool
    max_volume_change: float
    min_agreement: float
    min_consistency_gain: float = defaults.GUARD_MIN_CONSISTENCY_GAIN
    max_entropy_rise: float = defaults.GUARD_MAX_ENTROPY_RISE


def default_consistency_gain(learning_rate: float) -> float:
    """The calibrated self-consistency threshold for a refinement mode (sitefit/defaults.py).

    The check asks the self-training to raise its own objective; with learning rate 0 nothing
    is optimised (only batch-norm statistics move), so there it only bounds a fall.
    """
    if learning_rate == 0:
        return defaults.GUARD_MIN_CONSISTENCY_GAIN_STATISTICS
    return defaults.GUARD_MIN_CONSISTENCY_GAIN


@dataclass(frozen=True)
class StartSignals:
    """What the checks compare each epoch with: the starting weights' prediction."""

    self_consistency: float  # Dice(early, final) before refinement
    entropy: float  # mean entropy of the final output before refinement


@dataclass(frozen=True)
class EpochSignals:
    epoch: int
    agreement: float
    volume_change: dict[int, float]
    empty: bool
    self_consistency: float
    entropy: float

    def problems(self, config: GuardConfig, start: StartSignals) -> list[str]:
        """Why this epoch's weights must not be kept (empty: it passes)."""
        found = []
        if self.empty:
            found.append("the final mask lost all foreground")
        if self.agreement < config.min_agreement:
            found.append(
                f"agreement with the starting mask {self.agreement:.3f} < {config.min_agreement}"
            )
        worst = max(self.volume_change.values(), default=0.0)
        if worst > config.max_volume_change:
            found.append(
                f"a class volume changed by {worst:.0%} (> {config.max_volume_change:.0%})"
            )
        if self.self_consistency < start.self_consistency + config.min_consistency_gain:
            found.append(
                f"self-consistency {self.self_consistency:.3f} < start "
                f"{start.self_consistency:.3f} + {config.min_consistency_gain:g}"
            )
        rise = self.entropy / start.entropy - 1 if start.entropy > 0 else 0.0
        if rise > config.max_entropy_rise:
            found.append(
                f"entropy of the final output rose by {rise:.0%} (> {config.max_entropy_rise:.0%})"
            )
        return found


@dataclass(frozen=True)
class Verdict:
    kept_epoch: int | None  # 1-based epoch whose weights are kept; None: reverted
    reason: str
    signals: dict[str, Any]


def class_volumes(labels: torch.Tensor, num_classes: int) -> dict[int, int]:
    counts = torch.bincount(labels.flatten().long(), minlength=max(num_classes, 2))
    return {k: int(counts[k]) for k in range(1, max(num_classes, 2))}


def epoch_signals(
    epoch: int, start: SlicePrediction, prediction: SlicePrediction, num_classes: int
) -> EpochSignals:
    before, after = (
        class_volumes(start.final, num_classes),
        class_volumes(prediction.final, num_classes),
    )
    change = {k: abs(after[k] - before[k]) / max(before[k], 1) for k in before}
    return EpochSignals(
        epoch=epoch,
        agreement=foreground_dice(start.final, prediction.final, num_classes),
        volume_change=change,
        empty=sum(before.values()) > 0 and sum(after.values()) == 0,
        self_consistency=foreground_dice(prediction.early, prediction.final, num_classes),
        entropy=prediction.mean_entropy,
    )


def bn_shift(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> float:
    """Mean |Δ running_mean| / source std over every BN channel (0 when BN was frozen)."""
    shifts = []
    for key, mean in start.items():
        if key.endswith("running_mean") and key in end:
            std = start[key.replace("running_mean", "running_var")].clamp_min(1e-5).sqrt()
            shifts.append(((end[key].float() - mean.float()).abs() / std.float()).mean())
    return float(torch.stack(shifts).mean()) if shifts else 0.0


def first_diverged(
    start: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]]
) -> int | None:
    """1-based epoch after which an init-path tensor is non-finite or its norm grew past
    ``DIVERGED_NORM_GROWTH`` times its start (refinement at sane step sizes stays within a
    few times); None when no epoch diverged."""
    for epoch, state in enumerate(states, start=1):
        for key, value in state.items():
            if not key.startswith("init_path.") or not value.is_floating_point():
                continue
            norm = float(torch.linalg.vector_norm(value.float()))
            reference = float(torch.linalg.vector_norm(start[key].float()))
            if not math.isfinite(norm) or norm > DIVERGED_NORM_GROWTH * max(reference, 1e-6):
                return epoch
    return None


def overrule_on_divergence(
    verdict: Verdict, start: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]]
) -> Verdict:
    """``verdict``, or an earlier epoch (or a revert) when the init path diverged.

    Exploded weights make that epoch and every later one meaningless, whatever the masks look
    like: batch norm hides a blow-up of the init path from the output. Said first in the
    reason: it is the cause of whatever else the checks found.
    """
    diverged = first_diverged(start, states)
    if diverged is None:
        return verdict
    failing = verdict.signals.get("epochs_failing", {})
    # the last epoch before the blow-up that passed the checks too (never one that failed)
    kept_epoch = max((e for e in range(1, diverged) if str(e) not in failing), default=None)
    why = f"refinement diverged: init-path weights exploded in epoch {diverged}"
    if verdict.kept_epoch is None:  # the checks failed too: say what they found
        why += "; " + verdict.reason.removeprefix("reverted: ")
    return Verdict(
        kept_epoch,
        f"reverted: {why}" if kept_epoch is None else f"epoch {kept_epoch} kept: {why}",
        {**verdict.signals, "diverged_at_epoch": diverged},
    )


def trace_shape(trace: list[float], start: float) -> dict[str, float | int]:
    steps = [b - a for a, b in zip([start, *trace], trace, strict=False)]
    signs = [s > 0 for s in steps if abs(s) > 1e-9]
    return {
        "oscillations": sum(a != b for a, b in pairwise(signs)),
        "largest_fall": round(max([0.0] + [-s for s in steps]), 6),
    }


def decide(
    start: StartSignals, per_epoch: list[EpochSignals], config: GuardConfig
) -> tuple[int | None, str, dict[int, list[str]]]:
    """The decision alone, from per-epoch signals: (kept 1-based epoch or None, reason, problems).

    ``judge`` calls this; the calibration benchmark replays it on recorded signals, so the
    thresholds it reports are those of this very code.
    """
    problems = {s.epoch: s.problems(config, start) for s in per_epoch}
    last = per_epoch[-1].epoch
    if not config.enabled:
        return last, "guard disabled: last epoch kept", problems
    passing = [e for e, p in problems.items() if not p]
    if not passing:
        return None, "reverted: " + "; ".join(problems[last]), problems
    kept = max(passing)
    if kept == last:
        return kept, "every check passed", problems
    return kept, f"epoch {kept} kept: later epochs failed ({'; '.join(problems[last])})", problems


def acceptance(
    start: SlicePrediction, num_classes: int, config: GuardConfig
) -> Callable[[SlicePrediction], bool]:
    """The per-epoch checks of ``judge`` as a predicate on one epoch's prediction (for
    ``refine(..., accept=...)``): whether ``decide`` could keep it. With the guard off every
    epoch passes."""
    signals = StartSignals(
        foreground_dice(start.early, start.final, num_classes), start.mean_entropy
    )

    def passes(prediction: SlicePrediction) -> bool:
        if not config.enabled:
            return True
        return not epoch_signals(0, start, prediction, num_classes).problems(config, signals)

    return passes


def judge(
    start: SlicePrediction,
    epochs: list[SlicePrediction],
    num_classes: int,
    config: GuardConfig,
    trace: list[float],
) -> Verdict:
    """Pick the epoch to keep (or none) and report every signal.

    ``start`` is the prediction of the weights refinement started from, ``epochs`` the
    prediction after each epoch (``refine(..., keep_states=True).predictions``) and ``trace``
    the refinement's Dice(early, final) after each epoch. ``Verdict.kept_epoch`` is 1-based;
    None means: revert to the starting weights. With the guard disabled the last epoch is kept
    (the signals are still computed and reported).
    """
    if not epochs:
        raise ValueError("judge needs at least one epoch")
    start_consistency = foreground_dice(start.early, start.final, num_classes)
    per_epoch = [epoch_signals(i + 1, start, p, num_classes) for i, p in enumerate(epochs)]
    kept, reason, problems = decide(
        StartSignals(start_consistency, start.mean_entropy), per_epoch, config
    )
    last = per_epoch[-1]
    signals: dict[str, Any] = {
        "agreement_start_vs_adapted_dice": round(last.agreement, 6),
        "volume_change": {str(k): round(v, 6) for k, v in last.volume_change.items()},
        "entropy_before": round(start.mean_entropy, 6),
        "entropy_after": round(last.entropy, 6),
        "self_consistency_start": round(start_consistency, 6),
        "self_consistency_last_epoch": round(last.self_consistency, 6),
        "empty_mask": last.empty,
        **trace_shape(trace, start_consistency),
        "epochs_failing": {str(e): p for e, p in problems.items() if p},
    }
    return Verdict(kept, reason, signals)
