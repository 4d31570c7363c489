"""Intensity augmentation of the early head's slices."""

import torch

from worker.augmentation import augment_intensity


def _slices() -> torch.Tensor:
    """Two bright discs on a dark background, zero padding around them."""
    y, x = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    disc = (((y - 24) ** 2 + (x - 20) ** 2) < 100).float() * 0.8 + 0.1
    disc[:4], disc[-4:] = 0.0, 0.0
    return disc.expand(16, 1, 48, 48).clone()


def test_the_same_seed_gives_the_same_augmentation() -> None:
    images = _slices()
    first = augment_intensity(images, torch.Generator().manual_seed(7))
    again = augment_intensity(images, torch.Generator().manual_seed(7))
    other = augment_intensity(images, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.shape == images.shape


def test_slices_are_reimaged_but_keep_their_anatomy() -> None:
    images = _slices()
    augmented = augment_intensity(images, torch.Generator().manual_seed(0))
    changed = (augmented - images).abs().mean(dim=(1, 2, 3))
    assert (changed > 1e-3).sum() >= 12  # each transform applies with probability 0.7
    inside = images[0, 0] > 0.5
    for slice_ in augmented[:, 0]:
        # the disc stays brighter than its surroundings in every re-imaged slice
        assert slice_[inside].mean() > slice_[~inside & (images[0, 0] > 0)].mean() + 0.3
