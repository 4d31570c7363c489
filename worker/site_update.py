"""What a refinement saves as a site's next version: a delta against the base model.

With the statistics-only refinement (learning rate 0) a site's weights differ from the base
model only in the batch-norm running statistics, and the ones a single scan gives fit that
scan: its bias field, its anatomy. Later scans of the site are served from the cached
version without refinement (mode ``cached``, and ``auto``'s fast path), so the version should
hold the site's statistics, not one scan's. ``pooled_state`` keeps a running mean over the
scans a site was refined on, each scan weighing the same: the version refined on n scans,
refined again on one more, saves (n * site + scan) / (n + 1). That is what refining once on
all n + 1 scans together (the paper's Table 1 and 3 setting) estimates.
"""

from __future__ import annotations

import numpy as np
import torch

from worker.refinement import interpolate_statistics


def pooled_state(
    site: dict[str, torch.Tensor], scan: dict[str, torch.Tensor], site_scans: int
) -> dict[str, torch.Tensor]:
    """``scan`` with every BN running statistic replaced by its mean with ``site``'s, the
    site's weighing ``site_scans`` scans and this scan one. Everything else is ``scan``'s."""
    if site_scans < 0:
        raise ValueError(f"site_scans must be >= 0, not {site_scans}")
    return interpolate_statistics(site, scan, 1 / (site_scans + 1))


def site_delta(
    state: dict[str, torch.Tensor], base: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The tensors of ``state`` that differ from the base model's (what a version stores)."""
    delta = {}
    for key, value in state.items():
        array = value.detach().cpu().numpy()
        if not np.array_equal(array, base[key]):
            delta[key] = array.copy()
    return delta
