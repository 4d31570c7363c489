"""Forward passes without gradient: segment a stack of slices with both heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.nets import SegmentationNet, labels_from_logits, probabilities


@dataclass(frozen=True)
class SlicePrediction:
    """Hard labels of the final output and the early head, on the net's device."""

    final: torch.Tensor  # (N, H, W) uint8
    early: torch.Tensor  # (N, H, W) uint8
    mean_entropy: float  # mean per-pixel entropy (nats) of the final probabilities


def predict(net: SegmentationNet, slices: torch.Tensor, batch_size: int) -> SlicePrediction:
    """Segment ``slices`` (N, 1, H, W) in eval mode, batch by batch."""
    was_training = net.training
    net.eval()
    finals, earlies = [], []
    entropy = torch.zeros((), device=slices.device, dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, slices.shape[0], batch_size):
            final_logits, early_logits = net(slices[start : start + batch_size])
            finals.append(labels_from_logits(final_logits))
            earlies.append(labels_from_logits(early_logits))
            entropy += _entropy_sum(final_logits)
    net.train(was_training)
    pixels = slices.shape[0] * slices.shape[2] * slices.shape[3]
    return SlicePrediction(torch.cat(finals), torch.cat(earlies), float(entropy) / pixels)


def _entropy_sum(logits: torch.Tensor) -> torch.Tensor:
    p = probabilities(logits.float())
    if logits.shape[1] == 1:
        p = torch.cat([p, 1 - p], dim=1)
    return -(p * torch.log(p.clamp_min(1e-12))).sum().double()


def foreground_dice(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> float:
    """Volumetric Dice of two label stacks, averaged over foreground classes present in either.

    1.0 when neither has any foreground (the heads agree on "nothing here").
    """
    scores = []
    for label in range(1, max(num_classes, 2)):
        in_a, in_b = a == label, b == label
        total = int(in_a.sum()) + int(in_b.sum())
        if total:
            scores.append(2.0 * int((in_a & in_b).sum()) / total)
    return sum(scores) / len(scores) if scores else 1.0
