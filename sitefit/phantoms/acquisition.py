"""Scanner simulation: sample an anatomy on a domain's voxel grid and make it an MR image.

Steps, in the order a scanner applies them: the anatomy is sampled at the voxel centres (and,
along axes of 1.6 mm or more, at three points across each slice, averaged: a box slice
profile with partial-volume effects); tissues get the domain's intensities with a smooth
texture; a Gaussian PSF blurs; the gamma transfer curve bends the contrast; a smooth
multiplicative bias field (drawn in the scanner frame) and Rician or Gaussian noise follow;
the result is scaled to the domain's stored range. Labels are the structures at the voxel
centres, mapped through the task's label table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sitefit.phantoms.domains import ScannerDomain, axis_directions
from sitefit.phantoms.fields import F32, F64, U8, PlaneWaves
from sitefit.phantoms.structures import REFERENCE_FOV_MM, Anatomy

THICK_SLICE_MM = 1.6  # axes at least this coarse integrate a box slice profile (3 samples)
FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclass(frozen=True, eq=False)
class Grid:
    """A voxel grid: shape per stored axis and the voxel-to-world (RAS, mm) affine."""

    shape: tuple[int, int, int]
    affine: F64

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along each stored axis (mm), read from the affine."""
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(s[0]), float(s[1]), float(s[2])


def domain_grid(domain: ScannerDomain, fov_world_mm: tuple[float, float, float]) -> Grid:
    """The domain's grid over a field of view centred on the world origin.

    ``fov_world_mm`` is the extent along world x, y, z; each stored axis runs along the world
    axis its axcode names, with the domain's spacing along it.
    """
    dirs = axis_directions(domain.axcodes)
    shape = tuple(
        max(2, round(fov_world_mm[w] / sp))
        for (w, _), sp in zip(dirs, domain.spacing_mm, strict=True)
    )
    affine = np.zeros((4, 4))
    for i, ((w, sign), sp) in enumerate(zip(dirs, domain.spacing_mm, strict=True)):
        affine[w, i] = sign * sp
    centre = (np.asarray(shape, np.float64) - 1.0) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre
    affine[3, 3] = 1.0
    return Grid((shape[0], shape[1], shape[2]), affine)


def oversampling(spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """Samples per voxel along each axis: 3 across thick slices (box profile), else 1."""
    f = tuple(3 if sp >= THICK_SLICE_MM else 1 for sp in spacing)
    return f[0], f[1], f[2]


def _local_coords(
    anatomy: Anatomy, grid: Grid, factors: tuple[int, int, int], scale: float
) -> tuple[F32, F32, F32]:
    """Subject-frame coordinates of the (over)sampled voxel grid, shape ``shape * factors``."""
    rot = anatomy.pose.rotation
    m = rot.T @ grid.affine[:3, :3] / scale
    offset = rot.T @ (grid.affine[:3, 3] / scale - anatomy.pose.translation)
    idx = [
        ((np.arange(n * f) + 0.5) / f - 0.5).astype(np.float32)
        for n, f in zip(grid.shape, factors, strict=True)
    ]
    i0, i1, i2 = idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]
    out = []
    for c in range(3):
        coord = (
            np.float32(m[c, 0]) * i0 + np.float32(m[c, 1]) * i1 + np.float32(m[c, 2]) * i2
        ) + np.float32(offset[c])
        out.append(np.asarray(coord, np.float32))
    return out[0], out[1], out[2]


def _box_mean(values: F32, shape: tuple[int, int, int], f: tuple[int, int, int]) -> F32:
    if f == (1, 1, 1):
        return values
    blocks = values.reshape(shape[0], f[0], shape[1], f[1], shape[2], f[2])
    return np.asarray(blocks.mean(axis=(1, 3, 5), dtype=np.float32), np.float32)


def acquire(
    anatomy: Anatomy, domain: ScannerDomain, fov_mm: float, rng: np.random.Generator
) -> tuple[F32, U8, Grid]:
    """Image (float32, domain scale), structure ids at voxel centres, and the grid."""
    scale = fov_mm / REFERENCE_FOV_MM
    fov_world = (
        fov_mm * anatomy.fov_shape[0],
        fov_mm * anatomy.fov_shape[1],
        fov_mm * anatomy.fov_shape[2],
    )
    grid = domain_grid(domain, fov_world)
    f = oversampling(domain.spacing_mm)
    x, y, z = _local_coords(anatomy, grid, f, scale)
    fine_shape = x.shape
    ids = anatomy.structure_ids(x.ravel(), y.ravel(), z.ravel()).reshape(fine_shape)
    centre = (slice(f[0] // 2, None, f[0]), slice(f[1] // 2, None, f[1]),
              slice(f[2] // 2, None, f[2]))  # fmt: skip
    table = domain.contrast(anatomy.kind)
    level = np.array([table[s.tissue] for s in anatomy.structures], np.float32)
    texture_amp = level * np.array([s.texture for s in anatomy.structures], np.float32)
    signal = _box_mean(level[ids], grid.shape, f)
    modulation = _box_mean(texture_amp[ids], grid.shape, f)
    signal = signal + modulation * anatomy.texture(
        x[centre].ravel(), y[centre].ravel(), z[centre].ravel()
    ).reshape(grid.shape)

    sigma = [fw * FWHM_TO_SIGMA / sp for fw, sp in zip(domain.psf_fwhm_mm, domain.spacing_mm,
                                                       strict=True)]  # fmt: skip
    signal = ndimage.gaussian_filter(signal, sigma, mode="nearest", truncate=3.0)
    signal = np.power(np.maximum(signal, np.float32(0.0)), np.float32(domain.gamma))
    signal = signal * _bias_field(grid, scale, domain.bias_strength, rng)
    signal = _add_noise(signal, domain, rng)
    image = np.asarray(signal * np.float32(domain.intensity_scale), np.float32)
    return image, np.ascontiguousarray(ids[centre]), grid


def _bias_field(grid: Grid, scale: float, strength: float, rng: np.random.Generator) -> F32:
    """``exp`` of a smooth random field in the scanner frame (wavelengths 90-250 mm)."""
    waves = PlaneWaves.random(rng, 5, (2 * np.pi / 250.0, 2 * np.pi / 90.0), strength)
    idx = [np.arange(n, dtype=np.float32) for n in grid.shape]
    a = grid.affine / scale
    world = [
        np.float32(a[c, 0]) * idx[0][:, None, None]
        + np.float32(a[c, 1]) * idx[1][None, :, None]
        + np.float32(a[c, 2]) * idx[2][None, None, :]
        + np.float32(a[c, 3])
        for c in range(3)
    ]
    wx, wy, wz = (np.broadcast_to(w, grid.shape) for w in world)
    return np.asarray(np.exp(waves(wx, wy, wz)), np.float32)


def _add_noise(signal: F32, domain: ScannerDomain, rng: np.random.Generator) -> F32:
    sigma = np.float32(domain.noise_sigma)
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    if domain.noise == "gaussian":
        return np.asarray(real, np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.asarray(np.sqrt(real * real + imag * imag), np.float32)
