"""The adaptation guard: judge a refinement by signals the refinement loss does not optimise.

Refinement minimises the early head's disagreement with the final output, so self-consistency
after refinement can be high while the final mask has been dragged somewhere wrong
(ARCHITECTURE.md, "Known risk"). The guard looks elsewhere, at every epoch:

- ``agreement``: Dice between the starting model's final mask and the epoch's final mask;
- ``volume_change``: relative change of each class's predicted volume against the start;
- ``empty``: the final mask lost every foreground voxel the start had;
- ``self_consistency``: Dice(early, final) must not end below where it started;
- ``entropy``: mean prediction entropy of the final output (recorded);
- ``bn_shift``: how far batch-norm running means moved, in source standard deviations
  (recorded; only non-zero when the BN option adapts statistics);
- the trace's shape: oscillation (sign changes) and collapse (a fall of the trace).

The kept epoch is the last one that passes every check ("best" = the most refined weights the
guard accepts); when none passes, the refinement is reverted to the starting weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch

from worker.inference import SlicePrediction, foreground_dice


@dataclass(frozen=True)
class GuardConfig:
    enabled: bool
    max_volume_change: float
    min_agreement: float


@dataclass(frozen=True)
class EpochSignals:
    epoch: int
    agreement: float
    volume_change: dict[int, float]
    empty: bool
    self_consistency: float
    entropy: float

    def problems(self, config: GuardConfig, start_consistency: float) -> list[str]:
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
        if self.self_consistency < start_consistency:
            found.append(
                f"self-consistency fell from {start_consistency:.3f} to {self.self_consistency:.3f}"
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


def trace_shape(trace: list[float], start: float) -> dict[str, float | int]:
    steps = [b - a for a, b in zip([start, *trace], trace, strict=False)]
    signs = [s > 0 for s in steps if abs(s) > 1e-9]
    return {
        "oscillations": sum(a != b for a, b in pairwise(signs)),
        "largest_fall": round(max([0.0] + [-s for s in steps]), 6),
    }


def judge(
    start: SlicePrediction,
    epochs: list[SlicePrediction],
    num_classes: int,
    config: GuardConfig,
    trace: list[float],
) -> Verdict:
    """Pick the epoch to keep (or none) and report every signal."""
    start_consistency = foreground_dice(start.early, start.final, num_classes)
    per_epoch = [epoch_signals(i + 1, start, p, num_classes) for i, p in enumerate(epochs)]
    problems = {s.epoch: s.problems(config, start_consistency) for s in per_epoch}
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
    if not config.enabled:
        return Verdict(len(epochs), "guard disabled: last epoch kept", signals)
    passing = [e for e, p in problems.items() if not p]
    if not passing:
        return Verdict(None, "reverted: " + "; ".join(problems[last.epoch]), signals)
    kept = max(passing)
    if kept == last.epoch:
        return Verdict(kept, "every check passed", signals)
    return Verdict(
        kept, f"epoch {kept} kept: later epochs failed ({'; '.join(problems[last.epoch])})", signals
    )
