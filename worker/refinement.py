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
"What the gains come from"). How they move is ``statistics_average``:

- ``"cumulative"`` (the default): ``statistics_passes`` passes over the scan make them the
  plain mean of the passes' batch statistics, the scan's own (in train mode a batch is
  normalised with its own statistics, so they do not depend on the running ones: the loop's
  epochs only averaged more shuffles, with a fading memory of the source's). The
  candidates for the guard are then the points of ``statistics_path`` on the way from the
  starting statistics to the scan's, one eval pass each; no stopping rule is needed.
- ``"momentum"``: PyTorch's exponential average (momentum 0.1, the authors' code) over the
  epoch loop, which needs tens of steps to leave the source's behind, so there the stopping
  rule waits for ``min_statistics_steps`` steps (``sitefit.defaults`` says why).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from sitefit import defaults
from sitefit.settings import StatisticsAverage
from worker.batchnorm import (
    cumulative_average,
    interpolate_statistics,
    is_running_statistic,
    set_buffers,
)
from worker.inference import (
    Execution,
    Precision,
    Region,
    SlicePrediction,
    eval_batch_size,
    execution_for,
    foreground_dice,
    run_eval,
    running,
)
from worker.nets import SegmentationNet, probabilities, soft_cross_entropy
from worker.weights import mutable_state

BatchNormMode = Literal["train", "frozen"]
StopReason = Literal["converged", "max_epochs"]
EpochCallback = Callable[[int, float], None]
# whether the guard would keep the weights that gave this prediction (see ``refine``)
Acceptance = Callable[[SlicePrediction], bool]


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
    # statistics-only (learning rate 0): how the BN running statistics follow the scan
    statistics_average: StatisticsAverage = defaults.REFINE_STATISTICS_AVERAGE
    # with the cumulative average: the points evaluated on the way from the starting
    # statistics (0) to the scan's (1), the candidates the guard chooses from
    statistics_path: tuple[float, ...] = defaults.REFINE_STATISTICS_PATH
    # with the cumulative average: passes over the scan (each a new shuffle) it averages
    statistics_passes: int = defaults.REFINE_STATISTICS_PASSES
    # statistics-only with the momentum average: no stop before this many BN update steps
    min_statistics_steps: int = defaults.REFINE_MIN_STATISTICS_STEPS

    def __post_init__(self) -> None:
        path = self.statistics_path
        if not path or list(path) != sorted(set(path)) or path[0] <= 0 or path[-1] != 1:
            raise ValueError(
                f"statistics_path must rise strictly from above 0 to 1, not {list(path)}"
            )
        if self.statistics_passes < 1:
            raise ValueError(f"statistics_passes must be >= 1, not {self.statistics_passes}")


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
    # with the statistics path: the points evaluated (fractions of the way), in path order
    path_points: list[float] = field(default_factory=list)


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
    accept: Acceptance | None = None,
    region: Region | None = None,
) -> RefinementResult:
    """Refine ``net``'s init path in place on ``slices`` (N, 1, H, W) of one scan.

    ``initial_dice`` is Dice(early, final) before refinement, the reference for the first
    epoch's stopping test. With ``keep_states`` the state after each epoch is kept (on the
    net's device, contiguous) so that a caller may pick an epoch other than the last.
    ``config.precision`` picks the numerics; ``"fp32"`` reproduces the original loop bitwise.
    The net's parameters keep their memory format on return.

    ``region`` (``PreparedScan.region``) restricts every prediction, and so the stopping rule
    and ``accept``, to the scan's own pixels; the steps see the padded slices, as training did.

    ``accept`` (the guard's per-epoch checks, which keep the last epoch that passes) lets the
    statistics path evaluate its points from the scan's statistics back towards the start
    and stop at the first it accepts: the guard's choice is the same, with one eval pass
    where all of them pass. The result then holds the evaluated points, in path order.
    """
    started = time.perf_counter()
    execution = execution_for(slices.device, config.precision)
    generator = torch.Generator().manual_seed(config.seed)
    net.requires_grad_(False)
    parameters = refinable_parameters(net)
    for parameter in parameters:
        parameter.requires_grad_(True)
    statistics_only = config.learning_rate == 0 and config.batchnorm == "train"
    with running(net, execution):
        optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
        batch = config.eval_batch_size or eval_batch_size(
            slices, config.batch_size, execution, net.config.base_channels
        )
        evaluate = _Eval(execution, batch, region)
        if statistics_only and config.statistics_average == "cumulative":
            run = _statistics_path(net, slices, num_classes, config, evaluate, generator,
                                   on_epoch, accept)  # fmt: skip
        else:
            run = _epochs(net, slices, num_classes, initial_dice, config, evaluate, generator,
                          optimizer, on_epoch, keep_states)  # fmt: skip
        # no stale gradients (in the run's layout) left on the caller's parameters
        optimizer.zero_grad(set_to_none=True)
    net.requires_grad_(False)
    net.eval()
    return RefinementResult(
        epochs=len(run.trace),
        dice_trace=run.trace,
        stopped=run.stopped,
        prediction=run.predictions[-1],
        seconds=time.perf_counter() - started,
        states=run.states if keep_states else [],
        predictions=run.predictions if keep_states else [],
        train_seconds=run.train_seconds,
        eval_seconds=run.eval_seconds,
        path_points=run.points,
    )


@dataclass(frozen=True)
class _Eval:
    """How a loop's eval passes run: numerics, batch, and the pixels they judge."""

    execution: Execution
    batch: int
    region: Region | None

    def __call__(self, net: SegmentationNet, slices: torch.Tensor) -> SlicePrediction:
        return run_eval(net, slices, self.execution, self.batch, self.region)


@dataclass
class _Run:
    """What a refinement loop gathered: per epoch (or point) the trace, state, prediction."""

    trace: list[float] = field(default_factory=list)
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    predictions: list[SlicePrediction] = field(default_factory=list)
    stopped: StopReason = "max_epochs"
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    points: list[float] = field(default_factory=list)  # the statistics path's, if any

    def add(self, state: dict[str, torch.Tensor], prediction: SlicePrediction, dice: float) -> None:
        self.trace.append(dice)
        self.states.append(state)
        self.predictions.append(prediction)


def _epochs(
    net: SegmentationNet,
    slices: torch.Tensor,
    num_classes: int,
    initial_dice: float,
    config: RefineConfig,
    evaluate: _Eval,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
    on_epoch: EpochCallback | None,
    keep_states: bool,
) -> _Run:
    """The epoch loop of the paper (and of the momentum average): steps over shuffled
    batches, then an eval pass, until Dice(early, final) settles or the epoch cap."""
    run, execution = _Run(), evaluate.execution
    statistics_only = config.learning_rate == 0 and config.batchnorm == "train"
    min_steps = config.min_statistics_steps if statistics_only else 0
    previous, steps, count = initial_dice, 0, slices.shape[0]
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
        run.train_seconds += tock - tick
        prediction = evaluate(net, slices)
        dice = foreground_dice(prediction.early, prediction.final, num_classes)
        run.eval_seconds += time.perf_counter() - tock
        run.add(mutable_state(net) if keep_states else {}, prediction, dice)
        if on_epoch is not None:
            on_epoch(epoch, dice)
        if abs(dice - previous) < config.stop_delta and steps >= min_steps:
            run.stopped = "converged"
            break
        previous = dice
    return run


def _statistics_path(
    net: SegmentationNet,
    slices: torch.Tensor,
    num_classes: int,
    config: RefineConfig,
    evaluate: _Eval,
    generator: torch.Generator,
    on_epoch: EpochCallback | None,
    accept: Acceptance | None,
) -> _Run:
    """The statistics-only refinement with the cumulative average: ``statistics_passes``
    passes over the scan in train mode (each a new shuffle) make every BN layer's running
    statistics the mean of their batch statistics (the scan's own); then each point of
    ``config.statistics_path`` (the fraction of the way from the starting statistics to the
    scan's) is set and evaluated, one eval pass each. The stopping rule has nothing to do:
    the path is fixed, and its last point, the scan's statistics, is what the net holds on
    return. With ``accept`` the points are evaluated from the last one back, until one is
    accepted (see ``refine``).
    """
    tick, execution = time.perf_counter(), evaluate.execution
    start = mutable_state(net)
    net.train()
    with cumulative_average(net):
        for _ in range(config.statistics_passes):
            order = torch.randperm(slices.shape[0], generator=generator).to(slices.device)
            for first in range(0, slices.shape[0], config.batch_size):
                index = order[first : first + config.batch_size]
                if index.numel() >= 2:  # a single slice gives BatchNorm no batch statistics
                    _statistics_step(net, execution.layout(slices[index]), execution)
    scan = mutable_state(net)
    net.eval()
    tock = time.perf_counter()
    path = config.statistics_path
    evaluated: list[tuple[float, dict[str, torch.Tensor], SlicePrediction, float]] = []
    for weight in path if accept is None else path[::-1]:
        state = interpolate_statistics(start, scan, weight)
        set_buffers(net, state)
        prediction = evaluate(net, slices)
        dice = foreground_dice(prediction.early, prediction.final, num_classes)
        evaluated.append((weight, state, prediction, dice))
        if on_epoch is not None:  # counts the points evaluated, whichever comes first
            on_epoch(len(evaluated), dice)
        if accept is not None and accept(prediction):
            break
    if accept is not None:
        evaluated.reverse()  # path order
        set_buffers(net, scan)  # the last point, as without ``accept``
    run = _Run(stopped="converged", train_seconds=tock - tick)
    for weight, state, prediction, dice in evaluated:
        run.add(state, prediction, dice)
        run.points.append(weight)
    run.eval_seconds = time.perf_counter() - tock
    return run


def scan_statistics(
    net: SegmentationNet,
    slices: torch.Tensor,
    num_classes: int,
    passes: int = defaults.REFINE_STATISTICS_PASSES,
) -> dict[str, torch.Tensor]:
    """The BN running statistics of ``slices`` (one scan) as the statistics-only refinement
    computes them: the cumulative average of ``passes`` shuffles of its batch statistics, the
    last point of the statistics path. ``net`` is left as it was."""
    probe = copy.deepcopy(net)
    config = RefineConfig(learning_rate=0.0, statistics_path=(1.0,), statistics_passes=passes)
    refine(probe, slices, num_classes, 0.0, config)
    return {k: v for k, v in mutable_state(probe).items() if is_running_statistic(k)}


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
