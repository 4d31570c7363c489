"""One-shot refinement of the init path on a target scan (paper §2.2).

Per step, the init path runs once; the teacher (the U-Net's final probabilities) is computed
from those features with no gradient, and the student (the frozen early head) is trained
towards it with Eq. 2. Only init-path parameters are in the optimiser and require gradients,
so the early head and every layer past the init path keep their weights bitwise. After each
epoch one evaluation pass over the whole scan gives Dice(early mask, final mask) for the
stopping rule — and that pass's final mask is the segmentation, so no extra pass is needed.

What is not done, and why: the eval pass cannot reuse the epoch's training forwards (the
weights change at every step, and with ``batchnorm="train"`` the training forwards normalise
with batch statistics while the eval pass uses the running ones), nor can a teacher be reused
across steps, without changing what is computed.

Speed (docs/benchmarks.md, "Refinement speed"): compared with the authors' loop
(``bench/reference_loop.py``) the teacher is detached, so backward stops at the early head
and the init path, the init path runs once per step, and the eval pass doubles as the
segmentation. ``precision`` picks the numerics (:mod:`worker.inference`): on the fast path
every forward and backward runs under bf16 autocast with channels_last weights and
activations, Adam keeps float32 weights, and the eval pass picks its own batch size.

Batch norm (``batchnorm``): ``"train"`` keeps the whole network in train mode while refining,
as the authors' code does, so every BN layer's running statistics drift to the target scan;
``"frozen"`` keeps BN in eval mode (source statistics). See docs/method.md for the measured
choice of default. A learning rate of 0 with ``"train"`` is the statistics-only variant: each
step is the forward pass alone, so only the BN running statistics move (docs/method.md,
"What the gains come from"). There the stopping rule waits for ``min_statistics_steps`` steps
(``sitefit.defaults.REFINE_MIN_STATISTICS_STEPS`` says why); the epoch cap still holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from sitefit import defaults
from worker.inference import (
    Execution,
    Precision,
    SlicePrediction,
    eval_batch_size,
    execution_for,
    foreground_dice,
    run_eval,
    running,
)
from worker.nets import SegmentationNet, probabilities, soft_cross_entropy

BatchNormMode = Literal["train", "frozen"]
StopReason = Literal["converged", "max_epochs"]
EpochCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class RefineConfig:
    max_epochs: int = defaults.REFINE_MAX_EPOCHS
    # the paper's init-path self-training; 0: batch-norm statistics only (the product default,
    # sitefit.settings.Settings.refine_lr)
    learning_rate: float = defaults.PAPER_REFINE_LR
    batch_size: int = defaults.REFINE_BATCH_SIZE
    batchnorm: BatchNormMode = "train"
    stop_delta: float = defaults.REFINE_STOP_DELTA
    seed: int = defaults.SEED
    # numerics and layout (worker.inference): "auto" is bf16/channels_last where native
    precision: Precision = "auto"
    # slices per eval pass; None: the batch size on the fp32 path, chosen for speed otherwise
    eval_batch_size: int | None = None
    # statistics-only (learning rate 0): no stop before this many BN update steps
    min_statistics_steps: int = defaults.REFINE_MIN_STATISTICS_STEPS


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
    # where ``seconds`` went (on CUDA the split is approximate: kernels run asynchronously)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0


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
    epoch's stopping test. With ``keep_states`` the state after each epoch is kept (on the
    net's device, contiguous) so that a caller may pick an epoch other than the last.
    ``config.precision`` picks the numerics; ``"fp32"`` reproduces the original loop bitwise.
    The net's parameters keep their memory format on return.
    """
    started = time.perf_counter()
    execution = execution_for(slices.device, config.precision)
    generator = torch.Generator().manual_seed(config.seed)
    net.requires_grad_(False)
    parameters = refinable_parameters(net)
    for parameter in parameters:
        parameter.requires_grad_(True)

    trace: list[float] = []
    states: list[dict[str, torch.Tensor]] = []
    predictions: list[SlicePrediction] = []
    previous = initial_dice
    stopped: StopReason = "max_epochs"
    prediction: SlicePrediction | None = None
    count = slices.shape[0]
    train_seconds = eval_seconds = 0.0
    statistics_only = config.learning_rate == 0 and config.batchnorm == "train"
    min_steps = config.min_statistics_steps if statistics_only else 0
    steps = 0
    with running(net, execution):
        optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
        eval_batch = config.eval_batch_size or eval_batch_size(
            slices, config.batch_size, execution, net.config.base_channels
        )
        for epoch in range(1, config.max_epochs + 1):
            tick = time.perf_counter()
            net.train(config.batchnorm == "train")
            order = torch.randperm(count, generator=generator).to(slices.device)
            for start in range(0, count, config.batch_size):
                index = order[start : start + config.batch_size]
                if index.numel() < 2 and config.batchnorm == "train":
                    continue  # a single slice gives BatchNorm no batch statistics worth using
                if config.learning_rate == 0:
                    _statistics_step(net, execution.layout(slices[index]), execution)
                else:
                    _step(net, execution.layout(slices[index]), optimizer, execution)
                steps += 1
            tock = time.perf_counter()
            train_seconds += tock - tick
            prediction = run_eval(net, slices, execution, eval_batch)
            dice = foreground_dice(prediction.early, prediction.final, num_classes)
            eval_seconds += time.perf_counter() - tock
            trace.append(dice)
            if keep_states:
                states.append(mutable_state(net))
                predictions.append(prediction)
            if on_epoch is not None:
                on_epoch(epoch, dice)
            if abs(dice - previous) < config.stop_delta and steps >= min_steps:
                stopped = "converged"
                break
            previous = dice
        # no stale gradients (in the run's layout) left on the caller's parameters
        optimizer.zero_grad(set_to_none=True)
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
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
    )


def _step(
    net: SegmentationNet,
    batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    execution: Execution,
) -> None:
    """One step of Eq. 2: shared init-path features, detached teacher, frozen student head.

    On the fp32 path ``.float()`` is the identity, so the step is the original one bitwise.
    Losses are taken in float32; backward runs outside autocast, as autocast requires.
    """
    with execution.autocast_context():
        features = net.init_path(batch)
        with torch.no_grad():  # not inference_mode: the teacher is saved for backward
            teacher = probabilities(net.body(features).float())
        loss = soft_cross_entropy(net.early_head(features).float(), teacher)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _statistics_step(net: SegmentationNet, batch: torch.Tensor, execution: Execution) -> None:
    """A step with learning rate 0: the forward pass alone, which in train mode moves every
    batch-norm layer's running statistics towards the scan's (no weight changes, no backward).
    The early head holds no batch norm, so the teacher's path is all that runs."""
    with torch.no_grad(), execution.autocast_context():
        net.body(net.init_path(batch))


def snapshot(net: SegmentationNet) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer (to restore or compare later)."""
    return {k: _copy(v) for k, v in net.state_dict().items()}


def mutable_state(net: SegmentationNet) -> dict[str, torch.Tensor]:
    """Copies of everything refinement can change: init-path tensors and every BN buffer."""
    buffers = {name for name, _ in net.named_buffers()}
    return {
        k: _copy(v)
        for k, v in net.state_dict().items()
        if k.startswith("init_path.") or k in buffers
    }


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    # contiguous whatever layout the net runs in (channels_last during refinement)
    return tensor.detach().clone(memory_format=torch.contiguous_format)
