"""Scanner domains: how one site's scanner turns anatomy into an image.

A domain changes low-level appearance only, which is what the early layers of a U-Net see:
the tissue contrast (per-tissue intensities, then a gamma transfer curve), a smooth
multiplicative bias field, noise, blur (Gaussian PSF, plus a box slice profile along thick
axes), the voxel spacing and the stored voxel order (orientation). The anatomy is untouched:
the same seed gives the same subject on every domain.

Each domain carries two contrast tables: a T1-weighted head sequence (tasks ``brain`` and
``tissue``) and a bSSFP-like cine sequence (task ``heart``). Intensities are relative to the
brightest tissue (about 1.0) before the gamma curve, the bias field and the noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from sitefit.exceptions import InvalidInputError

Role = Literal["source", "near-source", "shifted"]
NoiseKind = Literal["rician", "gaussian"]

BRAIN_TISSUES = ("air", "skin", "fat", "muscle", "bone", "marrow", "csf", "gm", "deep_gm", "wm")
HEART_TISSUES = (
    "air", "skin", "fat", "muscle", "bone", "marrow", "lung", "blood", "myocardium", "liver",
    "fluid",
)  # fmt: skip

_AXES = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def axis_directions(axcodes: str) -> tuple[tuple[int, int], ...]:
    """For each stored voxel axis, the RAS world axis it runs along and its sign."""
    dirs = tuple(_AXES[c] for c in axcodes)
    if len(dirs) != 3 or sorted(d[0] for d in dirs) != [0, 1, 2]:
        raise ValueError(f"axcodes {axcodes!r} do not name three distinct world axes")
    return dirs


@dataclass(frozen=True, eq=False)
class ScannerDomain:
    """One simulated scanner (site). Spacing and PSF are per stored voxel axis."""

    name: str
    role: Role
    description: str
    axcodes: str  # direction each stored voxel axis points to, nibabel style ("RAS", "LPS")
    spacing_mm: tuple[float, float, float]
    psf_fwhm_mm: tuple[float, float, float]
    gamma: float  # transfer curve: out = in ** gamma, on the blurred [0, 1] signal
    bias_strength: float  # standard deviation of the log of the multiplicative bias field
    noise: NoiseKind
    noise_sigma: float  # relative to the brightest tissue (1.0)
    intensity_scale: float  # stored value of a signal of 1.0
    brain_contrast: Mapping[str, float]
    heart_contrast: Mapping[str, float]

    def __post_init__(self) -> None:
        axis_directions(self.axcodes)
        for table, tissues in ((self.brain_contrast, BRAIN_TISSUES),
                               (self.heart_contrast, HEART_TISSUES)):  # fmt: skip
            missing = set(tissues) - set(table)
            if missing:
                raise ValueError(f"domain {self.name}: no intensity for {sorted(missing)}")

    def contrast(self, anatomy: str) -> Mapping[str, float]:
        """The contrast table for an anatomy (``"brain"`` or ``"heart"``)."""
        return self.brain_contrast if anatomy == "brain" else self.heart_contrast


def _table(tissues: tuple[str, ...], values: tuple[float, ...]) -> Mapping[str, float]:
    if len(tissues) != len(values):
        raise ValueError("contrast table length mismatch")
    return MappingProxyType(dict(zip(tissues, values, strict=True)))


def _brain(*v: float) -> Mapping[str, float]:
    return _table(BRAIN_TISSUES, v)


def _heart(*v: float) -> Mapping[str, float]:
    return _table(HEART_TISSUES, v)


# Tables:   brain: air  skin fat  musc bone marrow csf gm deep_gm wm
#           heart: air  skin fat  musc bone marrow lung blood myo liver fluid
_DOMAIN_LIST = (
    ScannerDomain(
        name="a3t",
        role="source",
        description="vendor A 3T, 1 mm isotropic, clean: the training site",
        axcodes="RAS",
        spacing_mm=(1.0, 1.0, 1.0),
        psf_fwhm_mm=(1.0, 1.0, 1.0),
        gamma=1.0,
        bias_strength=0.06,
        noise="rician",
        noise_sigma=0.02,
        intensity_scale=1000.0,
        brain_contrast=_brain(0.0, 0.42, 0.92, 0.36, 0.05, 0.62, 0.13, 0.47, 0.55, 0.76),
        heart_contrast=_heart(0.0, 0.35, 0.86, 0.27, 0.07, 0.55, 0.05, 0.95, 0.26, 0.33, 0.9),
    ),
    ScannerDomain(
        name="a15t",
        role="near-source",
        description="vendor A 1.5T: same protocol family, a little noisier and softer",
        axcodes="RAS",
        spacing_mm=(1.0, 1.0, 1.2),
        psf_fwhm_mm=(1.1, 1.1, 1.3),
        gamma=0.95,
        bias_strength=0.1,
        noise="rician",
        noise_sigma=0.025,
        intensity_scale=800.0,
        brain_contrast=_brain(0.0, 0.45, 0.88, 0.38, 0.06, 0.58, 0.16, 0.46, 0.53, 0.72),
        heart_contrast=_heart(0.0, 0.36, 0.82, 0.29, 0.08, 0.52, 0.06, 0.9, 0.28, 0.35, 0.86),
    ),
    ScannerDomain(
        name="b3t",
        role="shifted",
        description="vendor B 3T, LPS, 1.2x1.2x1.5 mm: strong bias, flat contrast, Gaussian noise",
        axcodes="LPS",
        spacing_mm=(1.2, 1.2, 1.5),
        psf_fwhm_mm=(1.1, 1.1, 1.5),
        gamma=0.85,
        bias_strength=0.18,
        noise="gaussian",
        noise_sigma=0.02,
        intensity_scale=4095.0,
        brain_contrast=_brain(0.0, 0.46, 0.84, 0.4, 0.07, 0.55, 0.17, 0.5, 0.57, 0.74),
        heart_contrast=_heart(0.0, 0.38, 0.76, 0.3, 0.09, 0.5, 0.08, 0.82, 0.3, 0.38, 0.8),
    ),
    ScannerDomain(
        name="c15t",
        role="shifted",
        description="vendor C 1.5T, partial fat suppression, sagittal PIR storage, thick across LR",
        axcodes="PIR",
        spacing_mm=(1.1, 1.1, 1.4),
        psf_fwhm_mm=(1.2, 1.2, 1.6),
        gamma=1.0,
        bias_strength=0.22,
        noise="rician",
        noise_sigma=0.04,
        intensity_scale=1.0,
        brain_contrast=_brain(0.0, 0.4, 0.74, 0.35, 0.04, 0.5, 0.18, 0.5, 0.58, 0.78),
        heart_contrast=_heart(0.0, 0.32, 0.45, 0.28, 0.05, 0.35, 0.05, 0.88, 0.27, 0.36, 0.85),
    ),
    ScannerDomain(
        name="d3t",
        role="shifted",
        description="vendor D 3T, radiological LAS storage, 2 mm slices: low SNR, expanded gamma",
        axcodes="LAS",
        spacing_mm=(0.9, 0.9, 2.0),
        psf_fwhm_mm=(1.2, 1.2, 1.0),
        gamma=1.25,
        bias_strength=0.18,
        noise="rician",
        noise_sigma=0.05,
        intensity_scale=300.0,
        brain_contrast=_brain(0.0, 0.45, 0.9, 0.38, 0.05, 0.66, 0.1, 0.44, 0.52, 0.78),
        heart_contrast=_heart(0.0, 0.35, 0.9, 0.3, 0.06, 0.6, 0.04, 0.92, 0.3, 0.4, 0.9),
    ),
)

DOMAINS: dict[str, ScannerDomain] = {d.name: d for d in _DOMAIN_LIST}
"""Every scanner domain by name, source first."""


def get_domain(name: str) -> ScannerDomain:
    """The domain called ``name``; an unknown name raises ``InvalidInputError``."""
    try:
        return DOMAINS[name]
    except (KeyError, TypeError):
        valid = ", ".join(DOMAINS)
        raise InvalidInputError(f"unknown scanner domain {name!r}; valid: {valid}") from None


def _triple(values: tuple[float, float, float]) -> str:
    return "x".join(f"{v:.1f}" for v in values)


def list_domains() -> str:
    """A human-readable table of every domain, its role and its parameters."""
    head = (f"{'domain':<7}{'role':<13}{'orient':<8}{'spacing mm':<13}{'PSF FWHM mm':<13}"
            f"{'gamma':>6}{'bias':>6}  {'noise':<15}{'scale':>7}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for d in DOMAINS.values():
        noise = f"{d.noise} {d.noise_sigma:.3f}"
        lines.append(
            f"{d.name:<7}{d.role:<13}{d.axcodes:<8}{_triple(d.spacing_mm):<13}"
            f"{_triple(d.psf_fwhm_mm):<13}{d.gamma:>6.2f}{d.bias_strength:>6.2f}  "
            f"{noise:<15}{d.intensity_scale:>7g}"
        )
    for title, tissues, anatomy in (
        ("T1-weighted head contrast (tasks brain, tissue)", BRAIN_TISSUES, "brain"),
        ("bSSFP-like cardiac contrast (task heart)", HEART_TISSUES, "heart"),
    ):
        lines += ["", title, f"{'domain':<7}" + "".join(f"{t[:7]:>8}" for t in tissues[1:])]
        for d in DOMAINS.values():
            table = d.contrast(anatomy)
            lines.append(f"{d.name:<7}" + "".join(f"{table[t]:>8.2f}" for t in tissues[1:]))
    lines += ["", "descriptions"]
    lines += [f"{d.name:<7}{d.description}" for d in DOMAINS.values()]
    return "\n".join(lines)
