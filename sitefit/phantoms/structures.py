"""What an anatomy model provides: labelled structures over a continuous space in millimetres.

An anatomy assigns a structure id to any point of its own frame (millimetres at the reference
field of view). Each structure names the tissue that gives it its intensity in a scanner
domain's contrast table, its label in each task that uses the anatomy, and the amplitude of
the smooth intensity texture inside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Protocol

import numpy as np

from sitefit.phantoms.fields import F32, U8, Pose

REFERENCE_FOV_MM = 96.0
"""The field of view at which anatomy dimensions are given; other FOVs scale the subject."""


class Structure(NamedTuple):
    """A region of the anatomy with one tissue, one label per task and a texture amplitude."""

    name: str
    tissue: str
    labels: Mapping[str, int]
    texture: float


class Anatomy(Protocol):
    """A random subject: structure ids at points of its own frame, and its pose in the scanner."""

    @property
    def kind(self) -> str:
        """``"brain"`` or ``"heart"``: which contrast table of a domain applies."""
        ...

    @property
    def structures(self) -> tuple[Structure, ...]:
        """The structures, indexed by structure id."""
        ...

    @property
    def pose(self) -> Pose:
        """Where the subject lies in the scanner."""
        ...

    @property
    def fov_shape(self) -> tuple[float, float, float]:
        """Field-of-view extent along world x, y, z, in units of the FOV parameter."""
        ...

    def structure_ids(self, x: F32, y: F32, z: F32) -> U8:
        """Structure id at each point; ``x, y, z`` are flat arrays in the subject frame (mm)."""
        ...

    def texture(self, x: F32, y: F32, z: F32) -> F32:
        """A smooth unit-variance field that modulates intensities (multiplied per structure)."""
        ...


def label_lut(structures: tuple[Structure, ...], task: str) -> U8:
    """Look-up table from structure id to the label of ``task``."""
    return np.array([s.labels.get(task, 0) for s in structures], dtype=np.uint8)
