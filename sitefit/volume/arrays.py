"""Array preprocessing for the 2D model: normalisation, padding and slicing along an axis."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

_T = TypeVar("_T", bound=np.generic)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def minmax_normalize(volume: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Scale a volume to [0, 1] by its own minimum and maximum (the paper's preprocessing).

    Returns a new float32 array (the input is not modified); the minimum maps to exactly 0 and
    the maximum to exactly 1. A constant volume maps to all zeros. Raises ValueError for an
    empty volume or one with NaN/Inf values.
    """
    values = np.asarray(volume, dtype=np.float32)
    if values.size == 0:
        raise ValueError("minmax_normalize: expected a non-empty volume")
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("minmax_normalize: expected finite values, found NaN or Inf")
    if high == low:
        return np.zeros(values.shape, np.float32)
    span = high - low
    if span > _FLOAT32_MAX:  # the difference would overflow float32
        return np.asarray((values.astype(np.float64) - low) / span, np.float32)
    normalized = values - np.float32(low)
    normalized /= np.float32(span)
    np.clip(normalized, 0.0, 1.0, out=normalized)
    return normalized


def pad_to_multiple(
    slices: npt.NDArray[_T], multiple: int, *, square: bool = False
) -> tuple[npt.NDArray[_T], tuple[slice, ...]]:
    """Zero-pad the last two (in-plane) axes up to a multiple of ``multiple``.

    Padding is symmetric (an odd remainder goes to the end). With ``square=True`` both axes
    are padded to the same size (the larger one, rounded up), as in the paper's
    "pad to square". Returns the padded array (always a new array) and the index
    ``crop`` with ``padded[crop]`` equal to ``slices``; it has one ``slice(None)`` per
    leading axis, so for outputs with extra leading axes use ``out[..., crop[-2], crop[-1]]``.
    """
    if multiple < 1:
        raise ValueError(f"pad_to_multiple: expected a multiple >= 1, got {multiple}")
    if slices.ndim < 2:
        raise ValueError(f"pad_to_multiple: expected at least 2 axes, got shape {slices.shape}")
    height, width = slices.shape[-2:]
    target_h = -(-height // multiple) * multiple
    target_w = -(-width // multiple) * multiple
    if square:
        target_h = target_w = max(target_h, target_w)
    before_h = (target_h - height) // 2
    before_w = (target_w - width) // 2
    widths = [(0, 0)] * (slices.ndim - 2)
    widths += [(before_h, target_h - height - before_h), (before_w, target_w - width - before_w)]
    padded = np.pad(slices, widths, mode="constant")
    crop = (slice(None),) * (slices.ndim - 2) + (
        slice(before_h, before_h + height),
        slice(before_w, before_w + width),
    )
    return padded, crop


def _check_axis(array: npt.NDArray[Any], axis: int, what: str) -> None:
    if array.ndim != 3:
        raise ValueError(f"{what}: expected a 3D array, got shape {array.shape}")
    if not -3 <= axis <= 2:
        raise ValueError(f"{what}: expected axis 0, 1 or 2, got {axis}")


def to_slices(volume: npt.NDArray[_T], axis: int) -> npt.NDArray[_T]:
    """View a 3D volume as 2D slices along ``axis``: shape ``(n_slices, H, W)``.

    The in-plane axes keep their order (for axis 1 of a canonical volume, H is R and W is S).
    Returns a view, not a copy; :func:`from_slices` with the same axis inverts it.
    """
    _check_axis(volume, axis, "to_slices")
    return np.moveaxis(volume, axis, 0)


def from_slices(slices: npt.NDArray[_T], axis: int) -> npt.NDArray[_T]:
    """Put a stack of 2D slices ``(n_slices, H, W)`` back into a volume (inverse of to_slices).

    Returns a view, not a copy.
    """
    _check_axis(slices, axis, "from_slices")
    return np.moveaxis(slices, 0, axis)
