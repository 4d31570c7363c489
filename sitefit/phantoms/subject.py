"""One synthetic subject of a task, scanned by one domain: ``make_subject``.

The subject is drawn from the seed alone (same seed, same anatomy on every domain; the
``brain`` and ``tissue`` tasks share the head anatomy and differ only in labels); the scan's
own randomness (bias field, noise) is drawn from the seed and the domain name.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from sitefit.exceptions import InvalidInputError
from sitefit.phantoms.acquisition import acquire, domain_grid, oversampling
from sitefit.phantoms.anatomy_brain import BrainAnatomy
from sitefit.phantoms.anatomy_heart import HeartAnatomy
from sitefit.phantoms.domains import get_domain
from sitefit.phantoms.fields import F32, F64, U8, make_rng, name_key
from sitefit.phantoms.structures import Anatomy, label_lut

TASKS: tuple[str, ...] = ("brain", "heart", "tissue")
"""Segmentation tasks: brain extraction, cardiac LV/myocardium/RV, grey/white matter."""

CLASS_NAMES: dict[str, dict[int, str]] = {
    "brain": {0: "background", 1: "brain"},
    "heart": {0: "background", 1: "lv_cavity", 2: "lv_myocardium", 3: "rv_cavity"},
    "tissue": {0: "background", 1: "grey_matter", 2: "white_matter"},
}
ANATOMY_OF_TASK = {"brain": "brain", "tissue": "brain", "heart": "heart"}
DEFAULT_FOV_MM = 96.0
MIN_FOV_MM = 16.0
MAX_FOV_MM = 256.0
MAX_SAMPLES = 256**3  # anatomy evaluations per subject (voxels times slice oversampling)


@dataclass(frozen=True, eq=False)
class Phantom:
    """A synthetic scan with its ground truth.

    ``image`` is float32 in the domain's stored range, ``label`` uint8 with the task's class
    values, both indexed by stored voxel axes; ``affine`` maps voxel indices to RAS mm.
    """

    image: F32
    label: U8
    affine: F64
    class_names: dict[int, str]
    task: str
    domain: str
    seed: int

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along each stored axis."""
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(s[0]), float(s[1]), float(s[2])


def check_task(task: str) -> str:
    """``task`` if it is known, else ``InvalidInputError`` naming the valid tasks."""
    if not isinstance(task, str) or task not in TASKS:
        raise InvalidInputError(f"unknown phantom task {task!r}; valid: {', '.join(TASKS)}")
    return task


def check_seed(seed: int) -> int:
    """A seed must be a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_fov(fov_mm: float | None) -> float:
    """The field of view in mm (default when ``None``), within sane bounds."""
    if fov_mm is None:
        return DEFAULT_FOV_MM
    if isinstance(fov_mm, bool) or not isinstance(fov_mm, numbers.Real):
        raise InvalidInputError(f"fov_mm must be a number, got {fov_mm!r}")
    value = float(fov_mm)
    if not math.isfinite(value) or not MIN_FOV_MM <= value <= MAX_FOV_MM:
        raise InvalidInputError(
            f"fov_mm must lie in [{MIN_FOV_MM:g}, {MAX_FOV_MM:g}] mm, got {fov_mm!r}"
        )
    return value


def field_of_view(task: str, fov_mm: float | None = None) -> tuple[float, float, float]:
    """Extent (mm) of the field of view along world x, y, z: the heart's is shorter along z."""
    fov = check_fov(fov_mm)
    kind = ANATOMY_OF_TASK[check_task(task)]
    shape = HeartAnatomy.fov_shape if kind == "heart" else BrainAnatomy.fov_shape
    return fov * shape[0], fov * shape[1], fov * shape[2]


def make_anatomy(task: str, seed: int) -> Anatomy:
    """The subject of ``seed`` for ``task`` (tasks sharing an anatomy share subjects)."""
    kind = ANATOMY_OF_TASK[check_task(task)]
    rng = make_rng(check_seed(seed), name_key(kind))
    if kind == "brain":
        return BrainAnatomy.random(rng)
    return HeartAnatomy.random(rng)


def make_subject(task: str, domain: str, seed: int, fov_mm: float | None = None) -> Phantom:
    """Generate subject ``seed`` of ``task`` as scanned by ``domain``.

    ``fov_mm`` is the field of view (default 96 mm; the heart's is shorter along z). The
    subject scales with it, so a small FOV gives a small but complete subject on a coarse
    grid (tests); anatomy is otherwise fixed in millimetres and each domain samples it on its
    own grid. Deterministic: the same arguments give bit-identical arrays.
    """
    check_task(task)
    scanner = get_domain(domain)
    seed = check_seed(seed)
    fov = check_fov(fov_mm)
    grid = domain_grid(scanner, field_of_view(task, fov))
    samples = np.prod(grid.shape, dtype=np.int64) * np.prod(oversampling(scanner.spacing_mm))
    if samples > MAX_SAMPLES:
        raise InvalidInputError(f"fov_mm {fov:g} on domain {scanner.name} is too large to generate")
    anatomy = make_anatomy(task, seed)
    rng = make_rng(seed, name_key(anatomy.kind), name_key(scanner.name))
    image, ids, grid = acquire(anatomy, scanner, fov, rng)
    label = label_lut(anatomy.structures, task)[ids]
    return Phantom(image, label, grid.affine, dict(CLASS_NAMES[task]), task, scanner.name, seed)
