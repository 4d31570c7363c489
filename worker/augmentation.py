"""Intensity augmentation for the early head's training: another scanner's look, on the fly.

The U-Net is trained without augmentation, as in the paper (its domain shift is what the
refinement is for). The early head may be trained on augmented slices instead
(``sitefit train --head-augmentation intensity``): a head that reads the init path's
features of a scan from another scanner about as well as a source scan's is less likely to
share the final output's errors there, so that Dice(early, final) can rise as a refinement
mends the final output, which is what the site save rule needs (docs/method.md).

Each slice independently gets, each with probability ``APPLY_PROBABILITY``: a transfer curve
``x ** gamma``, a smooth multiplicative bias field, a contrast and brightness change and
additive Gaussian noise: the generic intensity augmentations of nnU-Net, not the phantom
domains' parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

APPLY_PROBABILITY = 0.7
GAMMA_RANGE = (0.7, 1.5)  # log-uniform
BIAS_FIELD_SIGMA = 0.25  # at most: standard deviation of the field's log
BIAS_FIELD_GRID = 4  # control points per side, upsampled bicubically: a smooth field
CONTRAST_RANGE = (0.75, 1.25)
BRIGHTNESS_RANGE = (-0.1, 0.1)
NOISE_SIGMA = 0.06  # at most, relative to the slice's [0, 1] range


def augment_intensity(
    images: torch.Tensor, generator: torch.Generator, *, one_scan: bool = False
) -> torch.Tensor:
    """A randomly re-imaged copy of a batch of ``(N, 1, H, W)`` slices scaled to [0, 1].

    Each slice gets its own draw, or with ``one_scan`` all share one (the slices of one scan,
    re-imaged as one scanner would). Draws from ``generator`` on the CPU, so a seeded
    training stays reproducible on any device; the zero padding around a slice stays zero
    except for the noise.
    """
    _, _, height, width = images.shape
    n = 1 if one_scan else images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        value = low + (high - low) * torch.rand(n, 1, 1, 1, generator=generator)
        return value.to(images.device)

    def applied() -> torch.Tensor:
        return (torch.rand(n, 1, 1, 1, generator=generator) < APPLY_PROBABILITY).to(images.device)

    out = images.clamp(min=0.0)
    gamma = torch.exp(uniform(math.log(GAMMA_RANGE[0]), math.log(GAMMA_RANGE[1])))
    out = torch.where(applied(), out.pow(gamma), out)

    grid = torch.randn(n, 1, BIAS_FIELD_GRID, BIAS_FIELD_GRID, generator=generator)
    log_field = F.interpolate(
        grid.to(images.device), size=(height, width), mode="bicubic", align_corners=True
    )
    field = torch.exp(uniform(0.0, BIAS_FIELD_SIGMA) * log_field)
    out = torch.where(applied(), out * field, out)

    contrast = uniform(*CONTRAST_RANGE)
    brightness = uniform(*BRIGHTNESS_RANGE)
    out = torch.where(applied(), out * contrast + brightness * (out > 0), out)

    noise = torch.randn(images.shape, generator=generator).to(images.device)
    out = torch.where(applied(), out + uniform(0.0, NOISE_SIGMA) * noise, out)
    return out
