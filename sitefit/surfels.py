"""Surface elements ("surfels") of a 3D mask, as DeepMind's ``surface-distance`` package
defines them (``sitefit.metrics`` says how surface Dice uses them).

A surfel sits on a corner of the voxel grid: every 2x2x2 cube of voxels whose eight values are
not all equal is one. Its neighbour code (0..255) says which of the eight voxels are set, and its
area (mm^2, at the voxel spacing) comes from the package's marching-cubes table.
"""

from __future__ import annotations

import functools
import math
from typing import Final

import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]

# Surfel normals of the neighbour codes 0..127 from the ``surface-distance`` package's
# marching-cubes table (``lookup_tables._NEIGHBOUR_CODE_TO_NORMALS``), as absolute components in
# eighths: "400 222 111" is three normals (4/8, 0, 0), (2/8, 2/8, 2/8) and (1/8, 1/8, 1/8). The
# length of a normal is the area of its triangle; code 255 - c has the same normals up to sign.
# Bit 7 of a code is the voxel at (-1, -1, -1) of the corner, bit 0 the one at (0, 0, 0), bit
# (7 - (4a + 2b + c)) the one at offset (a - 1, b - 1, c - 1) (the package's encoding kernel).
_NORMALS_IN_EIGHTHS: Final = (
    "000, 111, 111, 220 220, 111, 202 202, 111 111, 400 222 111,"
    "111, 111 111, 202 202, 400 222 111, 220 220, 400 222 111, 400 222 111, 400 400,"
    "111, 022 022, 111 111, 040 222 111, 111 111, 004 222 111, 111 111 111, 111 222 222 111,"
    "111 111, 022 022 111, 202 202 111, 111 333 022 202, 111 220 220, 333 022 111 220,"
    " 400 111 222 111, 400 111 222,"
    "111, 111 111, 022 022, 040 111 222, 111 111, 111 202 202, 022 022 111, 333 022 111 202,"
    "111 111, 111 111 111, 004 222 111, 222 222 111 111, 111 220 220, 400 222 111 111,"
    " 022 333 111 220, 400 222 111,"
    "220 220, 040 222 111, 040 111 222, 040 040, 220 220 111, 333 202 111 220, 111 040 222 111,"
    " 040 222 111,"
    "111 220 220, 040 222 111 111, 333 220 111 202, 040 222 111, 220 220 220 220, 220 220 111,"
    " 111 220 220, 220 220,"
    "111, 111 111, 111 111, 111 220 220, 022 022, 004 222 111, 022 022 111, 333 022 111 220,"
    "111 111, 111 111 111, 111 202 202, 400 222 111 111, 040 222 111, 222 222 111 111,"
    " 202 333 022 111, 400 222 111,"
    "202 202, 004 222 111, 111 202 202, 202 333 220 111, 004 222 111, 004 004, 111 111 222 004,"
    " 111 222 004,"
    "202 202 111, 004 222 111 111, 202 202 202 202, 111 202 202, 202 333 220 111, 004 222 111,"
    " 111 202 202, 202 202,"
    "111 111, 111 111 111, 111 022 022, 040 111 222 111, 022 022 111, 004 222 111 111,"
    " 022 022 022 022, 022 022 111,"
    "111 111 111, 111 111 111 111, 004 222 111 111, 111 111 111, 040 222 111 111, 111 111 111,"
    " 022 022 111, 111 111,"
    "400 222 111, 222 111 222 111, 333 022 111 202, 040 222 111, 333 220 022 111, 111 222 004,"
    " 111 022 022, 022 022,"
    "400 222 111 111, 111 111 111, 202 202 111, 111 111, 220 220 111, 111 111, 111 111, 111"
)


def bounding_box(mask: BoolArray) -> tuple[tuple[int, int], ...] | None:
    """Half-open index range of the non-zero voxels along each axis; None for an empty mask."""
    box: list[tuple[int, int]] = []
    sub = mask
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        nonzero = np.flatnonzero(sub.any(axis=others))
        if nonzero.size == 0:
            return None
        lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
        box.append((lo, hi))
        # Later projections only need the slab already found (cheaper on large volumes).
        index = [slice(None)] * mask.ndim
        index[axis] = slice(lo, hi)
        sub = sub[tuple(index)]
    return tuple(box)


def neighbour_codes(
    mask: BoolArray, box: tuple[tuple[int, int], ...], margin: tuple[int, int, int]
) -> npt.NDArray[np.uint8]:
    """Neighbour code (0..255) of every corner of the box's voxels, plus `margin` corners.

    Corner ``m + q`` (``m`` the margin) is the package's corner ``q``: the 2x2x2 cube of voxels
    ``box_lo + q - 1`` and ``box_lo + q`` along each axis, outside the box counting as 0.
    """
    (lo0, hi0), (lo1, hi1), (lo2, hi2) = box
    m0, m1, m2 = margin
    vol = np.zeros(
        (hi0 - lo0 + 2 + 2 * m0, hi1 - lo1 + 2 + 2 * m1, hi2 - lo2 + 2 + 2 * m2), np.uint8
    )
    vol[1 + m0 : -1 - m0, 1 + m1 : -1 - m1, 1 + m2 : -1 - m2] = mask[lo0:hi0, lo1:hi1, lo2:hi2]
    # Combine neighbours one axis at a time: 2 values -> 2 bits, 4 -> 4 bits, 8 -> 8 bits.
    two = np.left_shift(vol[:, :, :-1], np.uint8(1))
    two |= vol[:, :, 1:]
    four = np.left_shift(two[:, :-1, :], np.uint8(2))
    four |= two[:, 1:, :]
    eight: npt.NDArray[np.uint8] = np.left_shift(four[:-1], np.uint8(4))
    eight |= four[1:]
    return eight


def is_surfel(codes: npt.NDArray[np.uint8]) -> BoolArray:
    """Corners whose 2x2x2 cube is neither all background (0) nor all foreground (255)."""
    shifted = codes - np.uint8(1)  # wraps 0 -> 255, so surfels are exactly the values < 254
    return shifted < 254


@functools.lru_cache(maxsize=32)
def surfel_area_table(spacing: tuple[float, float, float]) -> FloatArray:
    """Area (mm^2) of the surfel of each of the 256 neighbour codes at this voxel spacing.

    Computed as the package's ``create_table_neighbour_code_to_surface_area``.
    """
    s0, s1, s2 = spacing
    half = np.zeros(128, dtype=np.float64)
    for code, normals in enumerate(_NORMALS_IN_EIGHTHS.split(",")):
        area = 0.0
        for normal in normals.split():
            n0, n1, n2 = (int(digit) / 8 for digit in normal)
            area += math.sqrt((n0 * s1 * s2) ** 2 + (n1 * s0 * s2) ** 2 + (n2 * s0 * s1) ** 2)
        half[code] = area
    table = np.concatenate([half, half[::-1]])
    table.flags.writeable = False
    return table
