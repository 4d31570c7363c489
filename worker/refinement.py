"""One-shot refinement of the init path on a target scan (paper §2.2).

Per step, the init path runs once; the teacher (the U-Net's final probabilities) is computed
from those features with no gradient, and the student (the frozen early head) is trained
towards it with Eq. 2. Only init-path parameters are in the optimiser and require gradients,
so the early head and every layer past the init path keep their weights bitwise. After each
epoch one evaluation pass over the whole scan gives Dice(early mask, final mask) for the
stopping rule — and that pass's final mask is the segmentation, so no extra pass is needed.

Batch norm (``batchnorm``): ``"train"`` keeps the whole network in train mode while refining,
as the authors' code does, so every BN layer's running statistics drift to the target scan;
``"frozen"`` keeps BN in eval mode (source statistics). See docs/method.md for the measured
choice of default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from sitefit import defaults
from worker.inference import SlicePrediction, foreground_dice, predict
from worker.nets import SegmentationNet, probabilities, soft_cross_entropy

BatchNormMode = Literal["train", "frozen"]
StopReason = Literal["converged", "max_epochs"]
EpochCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class RefineConfig:
    max_epochs: int = defaults.REFINE_MAX_EPOCHS
    learning_rate: float = defaults.REFINE_LR
    batch_size: int = defaults.REFINE_BATCH_SIZE
    batchnorm: BatchNormMode = "train"
    stop_delta: float = defaults.REFINE_STOP_DELTA
    seed: int = defaults.SEED


@dataclass
class RefinementResult:
    epochs: int
    dice_trace: list[float]
    stopped: StopReason
    prediction: SlicePrediction  # with the weights the net holds on return
    seconds: float
    # with keep_states: after each epoch, what refinement may change, and the prediction
    states: list[dict[str, torch.Tensor]] = field(default_factory=list, repr=False)
    predictions: list[SlicePrediction] = field(default_factory=list, repr=False)


def refinable_parameters(net: SegmentationNet) -> list[torch.nn.Parameter]:
    """The only parameters refinement may change: those of the init path."""
    return list(net.init_path.parameters())


def refine(
    net: SegmentationNet,
    slices: torch.Tensor,
    num_classes: int,
    initial_dice: float,
    config: RefineConfig,
    on_epoch: EpochCallback | None = None,
    keep_states: bool = False,
) -> RefinementResult:
    """Refine ``net``'s init path in place on ``slices`` (N, 1, H, W) of one scan.

    ``initial_dice`` is Dice(early, final) before refinement, the reference for the first
    epoch's stopping test. With ``keep_states`` the state after each epoch is kept (on CPU)
    so that a caller may pick an epoch other than the last.
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    net.requires_grad_(False)
    parameters = refinable_parameters(net)
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)

    trace: list[float] = []
    states: list[dict[str, torch.Tensor]] = []
    predictions: list[SlicePrediction] = []
    previous = initial_dice
    stopped: StopReason = "max_epochs"
    prediction: SlicePrediction | None = None
    count = slices.shape[0]
    for epoch in range(1, config.max_epochs + 1):
        net.train(config.batchnorm == "train")
        order = torch.randperm(count, generator=generator).to(slices.device)
        for start in range(0, count, config.batch_size):
            index = order[start : start + config.batch_size]
            if index.numel() < 2 and config.batchnorm == "train":
                continue  # a single slice gives BatchNorm no batch statistics worth using
            features = net.init_path(slices[index])
            with torch.no_grad():
                teacher = probabilities(net.body(features))
            loss = soft_cross_entropy(net.early_head(features), teacher)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        prediction = predict(net, slices, config.batch_size)
        dice = foreground_dice(prediction.early, prediction.final, num_classes)
        trace.append(dice)
        if keep_states:
            states.append(mutable_state(net))
            predictions.append(prediction)
        if on_epoch is not None:
            on_epoch(epoch, dice)
        if abs(dice - previous) < config.stop_delta:
            stopped = "converged"
            break
        previous = dice
    net.requires_grad_(False)
    net.eval()
    assert prediction is not None  # max_epochs >= 1
    return RefinementResult(
        epochs=len(trace),
        dice_trace=trace,
        stopped=stopped,
        prediction=prediction,
        seconds=time.perf_counter() - started,
        states=states,
        predictions=predictions,
    )


def snapshot(net: SegmentationNet) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer (to restore or compare later)."""
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def mutable_state(net: SegmentationNet) -> dict[str, torch.Tensor]:
    """Copies of everything refinement can change: init-path tensors and every BN buffer."""
    buffers = {name for name, _ in net.named_buffers()}
    return {
        k: v.detach().clone()
        for k, v in net.state_dict().items()
        if k.startswith("init_path.") or k in buffers
    }
