"""The authors' refinement loop, re-implemented as the speed baseline (issue 5). Not product code.

This is how the published code of Sheikh & Schultz refines a model on a target scan, kept
faithful on purpose, inefficiencies included, with sitefit's nets and stopping rule:

- before the loop, one eval-mode pass over all slices gives Dice(early, final) to compare the
  first epoch with;
- per epoch, the whole model is in train mode (every BN layer uses and updates batch
  statistics); for each batch of ``batch_size`` (20) shuffled slices:
  - the teacher comes from a full forward pass (``net(x)``: init path, body and, unused, the
    early head) whose output is NOT detached, so autograd keeps the teacher's graph and the
    backward also runs through the body into the init path;
  - the init path is computed a second time for the student (the early head);
  - Adam (lr 1e-3) steps on the init-path parameters only;
- after each epoch a second, eval-mode pass over all slices, used only for Dice(early, final)
  and the stopping rule (|ΔDice| < 0.005, or the epoch cap); masks go to host memory and the
  Dice is computed there with numpy, as the authors' evaluation code does;
- after the loop, a separate eval-mode pass gives the segmentation.

One reading is the cheaper of two: only the init path's parameters require gradients (the
early head is frozen and nothing past the init path is in the optimiser), so backward through
the body computes input gradients only, not weight gradients that would never be used. A
loop that left the body's ``requires_grad`` on would be slower still; the baseline is not
inflated. Everything runs in float32, NCHW, on the slices' device.

Shuffling uses the same seeded generator as :func:`worker.refinement.refine`, so from the same
starting weights both loops see the same batches in the same order; they differ only in the
teacher's gradient, the extra init-path pass, and the extra passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from worker.nets import SegmentationNet, labels_from_logits, probabilities, soft_cross_entropy

StopReason = Literal["converged", "max_epochs"]


@dataclass(frozen=True)
class ReferenceConfig:
    max_epochs: int = 10
    learning_rate: float = 1e-3
    batch_size: int = 20
    stop_delta: float = 0.005
    seed: int = 0


@dataclass
class ReferenceResult:
    epochs: int
    dice_trace: list[float]
    initial_dice: float
    stopped: StopReason
    final: torch.Tensor  # (N, H, W) uint8: the segmentation pass's final labels
    early: torch.Tensor  # (N, H, W) uint8: the early head's labels in the same pass
    # wall time per stage: initial (Dice before), train (steps), evaluate (per-epoch passes),
    # segment (the last pass); on CUDA each stage ends with a host copy, so the split is exact
    seconds: dict[str, float] = field(default_factory=dict)


def reference_loss(net: SegmentationNet, batch: torch.Tensor) -> torch.Tensor:
    """The authors' per-step loss: attached teacher from a full pass, second init-path pass.

    The returned loss's graph holds both paths: backward reaches the init path through the
    early head (student) and through the body (teacher).
    """
    final_logits, _unused_early = net(batch)  # full forward pass; output not detached
    teacher = probabilities(final_logits)
    student_logits = net.early_head(net.init_path(batch))  # init path a second time
    return soft_cross_entropy(student_logits, teacher)


def eval_labels(
    net: SegmentationNet, slices: torch.Tensor, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Final and early labels of every slice, eval mode, copied to host memory batch by batch."""
    net.eval()
    finals, earlies = [], []
    with torch.no_grad():
        for start in range(0, slices.shape[0], batch_size):
            final_logits, early_logits = net(slices[start : start + batch_size])
            finals.append(labels_from_logits(final_logits).cpu().numpy())
            earlies.append(labels_from_logits(early_logits).cpu().numpy())
    return np.concatenate(finals), np.concatenate(earlies)


def dice_numpy(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
    """Dice(a, b) averaged over foreground classes present in either; 1.0 when both empty.

    The same definition as :func:`worker.inference.foreground_dice` (so the stopping rule is
    the same), computed on the host as the authors' code does.
    """
    scores = []
    for label in range(1, max(num_classes, 2)):
        in_a, in_b = a == label, b == label
        total = int(in_a.sum()) + int(in_b.sum())
        if total:
            scores.append(2.0 * int((in_a & in_b).sum()) / total)
    return sum(scores) / len(scores) if scores else 1.0


def reference_refine(
    net: SegmentationNet,
    slices: torch.Tensor,
    num_classes: int,
    config: ReferenceConfig,
    on_epoch: Callable[[int, float], None] | None = None,
) -> ReferenceResult:
    """Refine ``net`` in place on ``slices`` (N, 1, H, W) as the authors do, then segment."""
    seconds = {"initial": 0.0, "train": 0.0, "evaluate": 0.0, "segment": 0.0}
    tick = time.perf_counter()
    final, early = eval_labels(net, slices, config.batch_size)
    initial = previous = dice_numpy(early, final, num_classes)
    seconds["initial"] = time.perf_counter() - tick

    net.requires_grad_(False)
    net.init_path.requires_grad_(True)
    optimizer = torch.optim.Adam(net.init_path.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    trace: list[float] = []
    stopped: StopReason = "max_epochs"
    count = slices.shape[0]
    for epoch in range(1, config.max_epochs + 1):
        tick = time.perf_counter()
        net.train()
        order = torch.randperm(count, generator=generator).to(slices.device)
        for start in range(0, count, config.batch_size):
            index = order[start : start + config.batch_size]
            if index.numel() < 2:
                continue  # as sitefit: one slice gives BatchNorm no batch statistics
            loss = reference_loss(net, slices[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds["train"] += time.perf_counter() - tick
        tick = time.perf_counter()
        final, early = eval_labels(net, slices, config.batch_size)
        dice = dice_numpy(early, final, num_classes)
        seconds["evaluate"] += time.perf_counter() - tick
        trace.append(dice)
        if on_epoch is not None:
            on_epoch(epoch, dice)
        if abs(dice - previous) < config.stop_delta:
            stopped = "converged"
            break
        previous = dice
    net.requires_grad_(False)

    tick = time.perf_counter()
    final, early = eval_labels(net, slices, config.batch_size)  # the segmentation pass
    seconds["segment"] = time.perf_counter() - tick
    return ReferenceResult(
        epochs=len(trace),
        dice_trace=trace,
        initial_dice=initial,
        stopped=stopped,
        final=torch.from_numpy(final),
        early=torch.from_numpy(early),
        seconds=seconds,
    )
