"""Smooth random fields and shape primitives, all defined in millimetres.

The phantom anatomy is a set of implicit functions of a point's position in the subject's own
frame (millimetres at the reference field of view), so that every scanner domain can sample the
same subject on its own voxel grid. The randomness of a subject lives in small objects built
here from a seeded generator: plane-wave sums (shape perturbations on the sphere, bias fields)
and lattice fields (smoothed white noise, cubic-spline interpolated: cortical folding, texture).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]


def name_key(name: str) -> int:
    """A stable integer for a name (unlike ``hash``, which changes between processes)."""
    return zlib.crc32(name.encode("utf-8"))


def make_rng(*keys: int) -> np.random.Generator:
    """A generator seeded by a sequence of non-negative integers (stable across versions)."""
    return np.random.default_rng(np.random.SeedSequence(list(keys)))


def rotation(rx_deg: float, ry_deg: float, rz_deg: float) -> F64:
    """Rotation matrix, applied as ``Rz @ Ry @ Rx`` (angles in degrees)."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return np.asarray(rz @ ry @ rx, dtype=np.float64)


@dataclass(frozen=True)
class Pose:
    """Where a subject lies in the scanner: ``world = rotation @ local + translation`` (mm)."""

    rotation: F64
    translation: F64

    @classmethod
    def random(
        cls, rng: np.random.Generator, max_deg: tuple[float, float, float], max_shift_mm: float
    ) -> Pose:
        """A pose with uniform angles in ``±max_deg`` and a shift in ``±max_shift_mm``."""
        angles = rng.uniform(-1.0, 1.0, 3) * np.asarray(max_deg)
        shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
        return cls(rotation(*angles), shift.astype(np.float64))


@dataclass(frozen=True)
class PlaneWaves:
    """``sum_k amp_k * cos(wave_k . p + phase_k)``: a smooth field with a handful of modes."""

    waves: F64  # (K, 3), radians per unit of the argument
    phases: F64  # (K,)
    amps: F64  # (K,)

    @classmethod
    def random(
        cls, rng: np.random.Generator, n: int, freq_range: tuple[float, float], std: float
    ) -> PlaneWaves:
        """``n`` modes in random directions with wave numbers in ``freq_range`` (rad/unit).

        The amplitudes are equal and chosen so that the field's standard deviation is ``std``.
        """
        dirs = rng.standard_normal((n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        freqs = rng.uniform(freq_range[0], freq_range[1], n)
        phases = rng.uniform(0.0, 2.0 * np.pi, n)
        amps = np.full(n, std * np.sqrt(2.0 / n))
        return cls(dirs * freqs[:, None], phases, amps)

    def __call__(self, x: F32, y: F32, z: F32) -> F32:
        """Evaluate at the points ``(x, y, z)`` (arrays of one shape)."""
        out = np.zeros(x.shape, dtype=np.float32)
        for (kx, ky, kz), phase, amp in zip(self.waves, self.phases, self.amps, strict=True):
            out += np.float32(amp) * np.cos(
                np.float32(kx) * x + np.float32(ky) * y + np.float32(kz) * z + np.float32(phase)
            )
        return out


@dataclass(frozen=True)
class LatticeField:
    """A stationary Gaussian random field with unit variance on a cube ``±half_width`` (mm).

    White noise on a lattice is smoothed with a Gaussian of ``corr_mm`` and interpolated with
    cubic (``order=3``) or trilinear (``order=1``) splines, so the field is defined at any
    point in millimetres, whatever grid samples it. With ``gradient=True`` the spatial
    derivatives are interpolated too (for distances to the field's zero set).
    """

    coeffs: tuple[F64, ...]  # value, then d/dx, d/dy, d/dz when built with gradient=True
    half_width_mm: float
    spacing_mm: float
    order: int

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        *,
        half_width_mm: float,
        spacing_mm: float,
        corr_mm: float,
        order: int = 3,
        gradient: bool = False,
    ) -> LatticeField:
        """Draw a field; ``corr_mm`` is the Gaussian smoothing sigma in millimetres."""
        n = int(np.ceil(2.0 * half_width_mm / spacing_mm)) + 1
        noise = rng.standard_normal((n, n, n))
        field = ndimage.gaussian_filter(noise, corr_mm / spacing_mm, mode="wrap")
        field /= field.std()
        lattices = [field]
        if gradient:
            lattices += [g / spacing_mm for g in np.gradient(field)]
        if order > 1:
            lattices = [ndimage.spline_filter(a, order=order, mode="nearest") for a in lattices]
        return cls(
            tuple(np.asarray(a, np.float64) for a in lattices), half_width_mm, spacing_mm, order
        )

    def _coords(self, x: F32, y: F32, z: F32) -> F64:
        scale = 1.0 / self.spacing_mm
        return np.stack(
            [(np.asarray(c, np.float64) + self.half_width_mm) * scale for c in (x, y, z)]
        )

    def __call__(self, x: F32, y: F32, z: F32) -> F32:
        """The field's value at the points ``(x, y, z)``."""
        return self.sample(x, y, z, 1)[0]

    def sample(self, x: F32, y: F32, z: F32, count: int) -> list[F32]:
        """The first ``count`` of (value, d/dx, d/dy, d/dz) at the points."""
        coords = self._coords(x, y, z)
        return [
            ndimage.map_coordinates(
                c, coords, order=self.order, prefilter=False, mode="nearest"
            ).astype(np.float32)
            for c in self.coeffs[:count]
        ]

    def zero_distance(self, x: F32, y: F32, z: F32) -> F32:
        """Approximate distance (mm) to the field's zero set: ``|f| / |grad f|``."""
        value, gx, gy, gz = self.sample(x, y, z, 4)
        grad = np.sqrt(gx * gx + gy * gy + gz * gz)
        floor = np.float32(0.25 / self.spacing_mm)
        return np.asarray(np.abs(value) / np.maximum(grad, floor), np.float32)


def ellipsoid_distance(
    x: F32, y: F32, z: F32, center: tuple[float, float, float], semi: tuple[float, float, float]
) -> F32:
    """Radial signed distance (mm, negative inside) to an axis-aligned ellipsoid."""
    dx, dy, dz = x - np.float32(center[0]), y - np.float32(center[1]), z - np.float32(center[2])
    r = np.sqrt(dx * dx + dy * dy + dz * dz)
    q = np.sqrt((dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2)
    return np.asarray(r - r / np.maximum(q, np.float32(1e-6)), dtype=np.float32)


def ellipse_distance(x: F32, y: F32, center: tuple[float, float], semi: tuple[float, float]) -> F32:
    """Radial signed distance (mm, negative inside) to an ellipse (an infinite cylinder)."""
    dx, dy = x - np.float32(center[0]), y - np.float32(center[1])
    r = np.sqrt(dx * dx + dy * dy)
    q = np.sqrt((dx / semi[0]) ** 2 + (dy / semi[1]) ** 2)
    return np.asarray(r - r / np.maximum(q, np.float32(1e-6)), dtype=np.float32)


def segment_distance(
    x: F32, y: F32, z: F32, a: tuple[float, float, float], b: tuple[float, float, float]
) -> F32:
    """Euclidean distance (mm) from the points to the line segment ``a``-``b``."""
    ax, ay, az = (np.float32(v) for v in a)
    ab = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    length2 = float(ab @ ab)
    t = ((x - ax) * ab[0] + (y - ay) * ab[1] + (z - az) * ab[2]) / np.float32(length2)
    t = np.clip(t, 0.0, 1.0)
    dx = x - (ax + t * np.float32(ab[0]))
    dy = y - (ay + t * np.float32(ab[1]))
    dz = z - (az + t * np.float32(ab[2]))
    return np.asarray(np.sqrt(dx * dx + dy * dy + dz * dz), dtype=np.float32)


def smooth_min(a: F32, b: F32, k: float) -> F32:
    """Polynomial smooth minimum of two distance fields (blend width ``k`` mm)."""
    h = np.maximum(np.float32(k) - np.abs(a - b), np.float32(0.0)) / np.float32(k)
    return np.asarray(np.minimum(a, b) - h * h * np.float32(k / 4.0), dtype=np.float32)
