"""Batch-norm running statistics: which state-dict keys hold them and how they are moved.

The statistics-only refinement (``worker.refinement``, learning rate 0) and the site versions
(``worker.site_update``) change nothing but these buffers; docs/method.md says why.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from worker.nets import SegmentationNet


def interpolate_statistics(
    start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], weight: float
) -> dict[str, torch.Tensor]:
    """``end`` with every BN running mean and variance ``weight`` of the way from ``start``'s
    to its own (0: ``start``'s, 1: ``end``'s). Everything else is ``end``'s."""
    out = dict(end)
    for key, value in end.items():
        if is_running_statistic(key) and key in start:
            mixed = (1 - weight) * start[key].double() + weight * value.double()
            out[key] = mixed.to(value.dtype)
    return out


def is_running_statistic(key: str) -> bool:
    """Whether a state-dict key names a BN running mean or variance."""
    return key.rsplit(".", 1)[-1] in ("running_mean", "running_var")


def set_buffers(net: SegmentationNet, state: dict[str, torch.Tensor]) -> None:
    """Copy the buffers ``state`` names (e.g. BN running statistics) into ``net`` in place."""
    with torch.no_grad():
        for name, buffer in net.named_buffers():
            if name in state:
                buffer.copy_(state[name])


@contextmanager
def cumulative_average(net: SegmentationNet) -> Iterator[None]:
    """Inside, every BN layer's running statistics become the plain mean of the batch
    statistics of the steps taken (PyTorch's ``momentum=None``, counted from 0, so the first
    step drops the starting statistics). On exit each layer gets its momentum back and its
    step count is the one it came in with plus the steps taken, as with the momentum
    average."""
    saved: list[tuple[torch.nn.BatchNorm2d, float | None, int]] = []
    for layer in net.modules():
        if isinstance(layer, torch.nn.BatchNorm2d) and layer.num_batches_tracked is not None:
            saved.append((layer, layer.momentum, int(layer.num_batches_tracked)))
            layer.momentum = None
            layer.num_batches_tracked.zero_()
    try:
        yield
    finally:
        for layer, momentum, count in saved:
            layer.momentum = momentum
            assert layer.num_batches_tracked is not None
            layer.num_batches_tracked.add_(count)
