"""Forward passes without gradient: segment a stack of slices with both heads.

Execution plan (chosen by measurement; docs/benchmarks.md, "Refinement speed"):

- ``precision="fp32"``: float32, NCHW, the caller's batch size: the original numerics,
  bitwise.
- ``precision="bf16"``: bfloat16 autocast with the net's weights and activations in
  channels_last, eval batches picked for speed (:func:`eval_batch_size`), and on CUDA
  ``cudnn.benchmark``. Measured on a 2-core AVX512-BF16 CPU at 256x256 (min of runs, shared
  machine): an eval pass 4.2x faster than fp32/NCHW in batches of 20 (0.21 vs 0.90 s per
  slice); a refinement step of 20 slices 8.8 s vs 21 s (fp32/NCHW), 14 s (fp32,
  channels_last), 10.4 s (bf16 teacher only). bf16 on NCHW gains little, and channels_last
  inputs with NCHW weights were slower than plain NCHW: the weights must be converted too.
- ``precision="auto"`` (default): ``bf16`` where the device runs it natively (CUDA with bf16
  support; a CPU whose oneDNN has native bf16, e.g. AVX512-BF16 or AMX), ``fp32`` elsewhere.

bf16 moves a few boundary voxels; the quality benchmark (bench/adapt_speed.py --quality)
measured the effect on surface Dice (docs/benchmarks.md). Everything stays on the slices'
device; an eval pass syncs with the host once (the entropy), :func:`foreground_dice` once.

Padding: the slices are zero-padded in-plane (``worker.preprocess``) so the U-Net's pooling
divides them. An eval pass given the scan's ``region`` returns labels and entropy of the
scan's own pixels only, so every figure a decision is made from (the guard's, ``auto``'s,
the site save rule's) is that of the report, whatever the net predicts on the padding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from worker.nets import SegmentationNet, labels_from_logits, probabilities

Precision = Literal["auto", "fp32", "bf16"]
# the in-plane part of a padded slice that is the scan's own (rows, columns)
Region = tuple[slice, slice]

# Eval-pass batches: on CPU about this many pixels (cache-sized), within a memory budget;
# on CUDA a share of the free memory.
CPU_EVAL_PIXELS = 3 * 2**16
CPU_EVAL_BUDGET_BYTES = 1024**3
CUDA_EVAL_BUDGET_SHARE = 0.5
# Peak bytes of live activations per slice of an eval pass, in units of one full-resolution
# init-path feature map (H*W*M elements): measured ~6 (bf16, channels_last) at 128x128 and
# 256x256 with M=16; 8 leaves headroom.
_ACTIVATION_MAPS_PER_SLICE = 8


@dataclass(frozen=True)
class SlicePrediction:
    """Hard labels of the final output and the early head, on the net's device."""

    final: torch.Tensor  # (N, H, W) uint8, H x W the region's (the whole slice without one)
    early: torch.Tensor  # (N, H, W) uint8
    mean_entropy: float  # mean per-pixel entropy (nats) of the final probabilities, same pixels


@dataclass(frozen=True)
class Execution:
    """How forward (and backward) passes run on one device: numerics and memory layout."""

    device: torch.device
    autocast: torch.dtype | None  # None: float32 throughout
    channels_last: bool

    @property
    def exact(self) -> bool:
        """True for the original float32/NCHW path (results bitwise as before)."""
        return self.autocast is None and not self.channels_last

    def autocast_context(self) -> contextlib.AbstractContextManager[object]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory format the net runs in (a no-op for a 1-channel stack)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions natively (not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:  # oneDNN's own check: AVX512-BF16, AMX or similar
            return bool(torch.backends.mkldnn.is_available()
                        and torch.ops.mkldnn._is_mkldnn_bf16_supported())  # fmt: skip
        except (AttributeError, RuntimeError):
            return False
    return False


def execution_for(device: torch.device, precision: Precision = "auto") -> Execution:
    """The execution plan for ``precision`` on ``device`` (see the module docstring)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', not {precision!r}")
    # "auto" takes bf16 on CUDA only: on a CPU it changes results, and the quality
    # benchmark has not been run under it (an explicit "bf16" still selects it there).
    auto_fast = device.type == "cuda" and bf16_native(device)
    if precision == "fp32" or (precision == "auto" and not auto_fast):
        return Execution(device, None, False)
    return Execution(device, torch.bfloat16, True)


@contextlib.contextmanager
def running(net: SegmentationNet, execution: Execution) -> Iterator[None]:
    """Run ``net`` under ``execution`` and put its weights back as they were afterwards.

    channels_last needs the weights in that format too (with NCHW weights a channels_last
    input measured slower than plain NCHW); converting a few MB of weights costs
    milliseconds, and converting back keeps the caller's module as it was (values never
    change, and the parameter objects stay the same, so optimisers stay valid).
    """
    convert = execution.channels_last and not _is_channels_last(net)
    benchmark = torch.backends.cudnn.benchmark
    if execution.device.type == "cuda" and not execution.exact:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    if convert:
        _set_layout(net, torch.channels_last)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = benchmark  # the fp32 path elsewhere stays exact
        if convert:
            _set_layout(net, torch.contiguous_format)


def _set_layout(net: SegmentationNet, memory_format: torch.memory_format) -> None:
    # what Module.to(memory_format=...) does: swap each 4D parameter's data, keep the object
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.dim() == 4:
                parameter.data = parameter.data.contiguous(memory_format=memory_format)


def _is_channels_last(net: SegmentationNet) -> bool:
    # a 3x3 conv weight with several input channels is unambiguous (1-channel ones are not)
    for p in net.parameters():
        if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def eval_batch_size(slices: torch.Tensor, minimum: int, execution: Execution, base: int) -> int:
    """Slices per eval forward pass: ``minimum`` on the exact path, else chosen for speed.

    CPU: about ``CPU_EVAL_PIXELS`` pixels per batch, where the activations stay in cache (at
    256x256, bf16/channels_last, batches of 2-10 slices ran 1.3-1.8x faster than 20 or 40;
    at 96x96 and 48x48 batches of 20-48 were best). CUDA: as many slices as fit in a share of
    the free memory (whole volumes, typically). ``base`` is the net's init-path width M, for
    the memory estimate; ``minimum`` matters only on the exact path.
    """
    count, pixels = slices.shape[0], slices.shape[2] * slices.shape[3]
    if execution.exact:
        return max(1, minimum)
    element = 2 if execution.autocast is not None else 4
    per_slice = _ACTIVATION_MAPS_PER_SLICE * pixels * base * element
    if execution.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(execution.device)
        return max(1, min(count, int(CUDA_EVAL_BUDGET_SHARE * free // max(per_slice, 1))))
    fits = int(CPU_EVAL_BUDGET_BYTES // max(per_slice, 1))
    return max(1, min(count, fits, round(CPU_EVAL_PIXELS / max(pixels, 1))))


def predict(
    net: SegmentationNet,
    slices: torch.Tensor,
    batch_size: int,
    *,
    precision: Precision = "auto",
    eval_batch: int | None = None,
    region: Region | None = None,
) -> SlicePrediction:
    """Segment ``slices`` (N, 1, H, W) in eval mode, batch by batch; labels and entropy of
    ``region`` only (``PreparedScan.region``: the scan without its padding), when given.

    ``batch_size`` is the batch of the exact (fp32) path; the fast path picks its own
    (:func:`eval_batch_size`: cache-sized on CPU, whole volumes on CUDA); ``eval_batch``
    pins it.
    In eval mode a slice's output does not depend on its batch (bitwise on the CPUs measured,
    fp32/NCHW and bf16/channels_last alike), so the batch is a matter of speed and memory.
    """
    execution = execution_for(slices.device, precision)
    with running(net, execution):
        batch = eval_batch or _auto_batch(net, slices, batch_size, execution)
        return run_eval(net, slices, execution, batch, region)


def _auto_batch(
    net: SegmentationNet, slices: torch.Tensor, minimum: int, execution: Execution
) -> int:
    return eval_batch_size(slices, minimum, execution, net.config.base_channels)


def run_eval(
    net: SegmentationNet,
    slices: torch.Tensor,
    execution: Execution,
    batch_size: int,
    region: Region | None = None,
) -> SlicePrediction:
    """:func:`predict` for a net already :func:`running` under ``execution``."""
    rows, columns = region or (slice(None), slice(None))
    was_training = net.training
    net.eval()
    finals, earlies = [], []
    entropy = torch.zeros((), device=slices.device, dtype=torch.float64)
    with torch.inference_mode(), execution.autocast_context():
        for start in range(0, slices.shape[0], batch_size):
            final_logits, early_logits = net(execution.layout(slices[start : start + batch_size]))
            # cropped before the argmax: new tensors of the region's size, not views
            final_logits = final_logits[..., rows, columns]
            early_logits = early_logits[..., rows, columns]
            finals.append(labels_from_logits(final_logits))
            earlies.append(labels_from_logits(early_logits))
            entropy += _entropy_sum(final_logits)  # accumulated on the device: no sync
    net.train(was_training)
    final = finals[0] if len(finals) == 1 else torch.cat(finals)
    early = earlies[0] if len(earlies) == 1 else torch.cat(earlies)
    return SlicePrediction(final, early, float(entropy) / max(final.numel(), 1))


def _entropy_sum(logits: torch.Tensor) -> torch.Tensor:
    p = probabilities(logits.float())
    if logits.shape[1] == 1:
        p = torch.cat([p, 1 - p], dim=1)
    return -(p * torch.log(p.clamp_min(1e-12))).sum().double()


def foreground_dice(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> float:
    """Volumetric Dice of two label stacks, averaged over foreground classes present in either.

    1.0 when neither has any foreground (the heads agree on "nothing here"). Labels outside
    ``1 .. max(num_classes, 2) - 1`` are ignored. All counts are gathered on the tensors'
    device and read back with one sync.
    """
    counts = []
    for label in range(1, max(num_classes, 2)):
        in_a, in_b = a == label, b == label
        counts.append(torch.stack([in_a.sum(), in_b.sum(), (in_a & in_b).sum()]))
    scores = []
    for count_a, count_b, both in torch.stack(counts).tolist():
        total = count_a + count_b
        if total:
            scores.append(2.0 * both / total)
    return sum(scores) / len(scores) if scores else 1.0
