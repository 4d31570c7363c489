"""From a canonical scan to the model's input slices, and from predicted slices back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sitefit import defaults
from sitefit.volume import Scan, from_slices, minmax_normalize, pad_to_multiple, to_slices
from worker.inference import Region


@dataclass(frozen=True)
class PreparedScan:
    """A scan as the 2D model sees it: min-max scaled slices, padded in-plane, on a device."""

    scan: Scan
    slices: torch.Tensor  # (N, 1, H, W) float32
    crop: tuple[slice, ...]  # undoes the in-plane padding of a (N, H, W) stack
    slice_axis: int

    @property
    def region(self) -> Region:
        """The scan's own pixels of a padded slice: predict with it (``worker.inference``)."""
        rows, columns = self.crop[-2:]
        return rows, columns

    def volume(self, labels: torch.Tensor) -> np.ndarray:
        """Predicted label slices of :attr:`region` (N, h, w) back to a canonical label
        volume (uint8)."""
        rows, columns = self.region
        expected = tuple(self.slices[:, 0, rows, columns].shape)  # a view: nothing copied
        if tuple(labels.shape) != expected:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} are not this scan's region {expected}: "
                f"predict with region=prepared.region"
            )
        return from_slices(labels.cpu().numpy(), self.slice_axis)


def prepare_scan(scan: Scan, slice_axis: int, device: torch.device) -> PreparedScan:
    """Min-max scale, slice along ``slice_axis``, pad in-plane; put the slices on ``device``.

    The slices go to the device once and stay there for the whole job. On CUDA the copy is
    made from pinned host memory without blocking the host (later work on the default
    stream is ordered after it).
    """
    stack = to_slices(minmax_normalize(scan.data), slice_axis)
    padded, crop = pad_to_multiple(stack, defaults.PAD_MULTIPLE)
    tensor = torch.from_numpy(np.ascontiguousarray(padded[:, None], dtype=np.float32))
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    return PreparedScan(scan, tensor, crop, slice_axis)
