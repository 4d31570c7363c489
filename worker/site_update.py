"""What a refinement saves as a site's next version: a delta against the base model.

With the statistics-only refinement (learning rate 0) a site's weights differ from the base
model only in the batch-norm running statistics, and the ones a single scan gives fit that
scan: its bias field, its anatomy. Later scans of the site are served from the cached
version without refinement (mode ``cached``, and ``auto``'s fast path), so the version should
hold the site's statistics, not one scan's. ``pooled_state`` keeps a running mean over the
scans a site was refined on, each scan weighing the same: the version refined on n scans,
refined again on one more, saves (n * site + scan) / (n + 1). That is what refining once on
all n + 1 scans together (the paper's Table 1 and 3 setting) estimates.

One scan's statistics are also a noisy estimate of the site's, and a version is used on
scans it has not seen: ``version_statistics`` counts the base model's statistics as
``prior_scans`` scans of the pool (``Settings.site_statistics_prior``), so a version refined
on n scans holds (prior * base + sum of the scans) / (prior + n): the further from the source
a site's scans agree to be, the more scans it takes to move all the way. Each scan enters
with its own statistics (the refinement's last point), not the guard's choice for its output.
The prior was chosen on scans the benchmark does not report (docs/method.md, "Site
statistics").
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from model_store.sites import SiteStore, SiteVersion
from model_store.spec import ModelSpec
from sitefit.exceptions import ModelStoreError, VersionConflictError
from sitefit.settings import Settings, SiteFirstSave, SiteStatistics
from worker.batchnorm import interpolate_statistics, is_running_statistic
from worker.inference import SlicePrediction, foreground_dice, predict
from worker.nets import SegmentationNet
from worker.preprocess import PreparedScan
from worker.weights import load_state, mutable_state


def pooled_state(
    site: dict[str, torch.Tensor], scan: dict[str, torch.Tensor], site_scans: float
) -> dict[str, torch.Tensor]:
    """``scan`` with every BN running statistic replaced by its mean with ``site``'s, the
    site's weighing ``site_scans`` scans and this scan one. Everything else is ``scan``'s."""
    if site_scans < 0:
        raise ValueError(f"site_scans must be >= 0, not {site_scans}")
    return interpolate_statistics(site, scan, 1 / (site_scans + 1))


def version_statistics(
    base: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    scan: dict[str, torch.Tensor],
    start_scans: int,
    prior_scans: float,
    policy: SiteStatistics,
) -> dict[str, torch.Tensor]:
    """What a site version refined on one more scan holds: ``scan`` (what the refinement
    changed, the scan's own statistics) with every BN running statistic pooled with the
    base model's (``base``, weighing ``prior_scans`` scans) and, with ``policy`` "pooled",
    with those of the version it started from (``start``, refined on ``start_scans``)."""
    if prior_scans < 0:
        raise ValueError(f"prior_scans must be >= 0, not {prior_scans}")
    if policy == "pooled" and start_scans > 0:
        return pooled_state(start, scan, start_scans + prior_scans)
    return pooled_state(base, scan, prior_scans)


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


def base_statistics(
    base: dict[str, np.ndarray], like: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The BN running statistics of the base model's tensors ``base``, on the device of
    ``like``'s."""
    return {
        key: torch.from_numpy(base[key]).to(value.device)
        for key, value in like.items()
        if is_running_statistic(key)
    }


def choose_version(
    scores: list[tuple[str, float]], start: float, first: bool, first_save: SiteFirstSave
) -> tuple[int | None, str]:
    """Which candidate becomes the site's next version, and why (the report's
    ``site_weights.save_reason``).

    ``scores`` names each candidate, in order of preference, with its Dice(early, final) on
    the scan; ``start`` is that of the weights the refinement started from. The first
    candidate that beats ``start`` is chosen; with ``first_save`` "guarded" a site's
    ``first`` version is the first candidate whatever its figure (the guard kept the
    refinement). Returns (index or None, reason).
    """
    figures = ", ".join(f"{name} {score:.3f}" for name, score in scores)
    if first and first_save == "guarded" and scores:
        name, score = scores[0]
        return 0, (
            f"the site's first version, kept by the guard: {name} (Dice(early, final) "
            f"{score:.3f}, the start's {start:.3f}; site_first_save 'guarded')"
        )
    for index, (name, score) in enumerate(scores):
        if score > start:
            return index, f"{name} beats the start's Dice(early, final) {start:.3f}: {figures}"
    return None, f"not saved: none beats the start's Dice(early, final) {start:.3f}: {figures}"


@dataclass(frozen=True)
class Refined:
    """What a kept refinement of one scan leaves for the site's next version."""

    net: SegmentationNet  # holds what the guard kept: this scan's output
    after: SlicePrediction  # the output's prediction
    start_state: dict[str, torch.Tensor]  # what the refinement started from
    scan_state: dict[str, torch.Tensor]  # the refinement's last point (the scan's statistics)
    start_consistency: float  # Dice(early, final) of the start on this scan
    epochs: int
    # the guard's per-epoch checks on this scan (worker.guard.acceptance): a saved version
    # must pass them as the output did, whatever else it is judged by
    passes_guard: Callable[[SlicePrediction], bool]


@dataclass(frozen=True)
class SiteSave:
    """The outcome of :func:`save_next_version` (the report's ``site_weights`` block)."""

    reason: str
    version: SiteVersion | None = None  # None: nothing saved
    consistency: float | None = None  # the saved version's Dice(early, final) on the scan
    net: SegmentationNet | None = None  # the saved version, to keep warm


def save_next_version(
    sites: SiteStore,
    settings: Settings,
    spec: ModelSpec,
    base: dict[str, np.ndarray],
    site: str,
    scan: PreparedScan,
    started_from: SiteVersion | None,
    latest_version: int | None,
    refined: Refined,
    job_id: str | None = None,
) -> SiteSave:
    """Save the site's next version (what differs from the base model ``base``) when
    :func:`choose_version` picks a candidate: the pooled statistics (with the statistics-only
    refinement: the scan's own, the refinement's last point, pooled with the base model's and
    the site's earlier scans', judged by one more pass over ``scan``) or this scan's output
    (``refined.net``, what the guard kept). The save is a compare-and-set on
    ``latest_version``, the number of the site's latest version when the job looked (that of
    ``started_from``, or of a version that was unusable, e.g. made for another base model, in
    which case the refinement started from the base model): a version pools, and was judged
    against, what it started from, so when another job saved one meanwhile this one is not
    saved (the reason says so) rather than dropping that job's scan from the pool. Saving is
    a side effect of the job: a store that cannot be written is a reason, not an error.
    A job's retry does not save again over the version an earlier attempt of it saved (the
    version already pools this scan; ``job_id`` is recorded with every version).
    """
    if job_id is not None and started_from is not None and started_from.job_id == job_id:
        return SiteSave(
            f"not saved: an earlier attempt of this job saved version {started_from.version} "
            f"from this scan already"
        )
    classes = len(spec.classes)
    scans = (started_from.scans_refined if started_from else 0) + 1
    rejected = ""
    candidates = [("this scan's output", refined.net, refined.after)]
    if settings.refine_lr == 0:
        kept = mutable_state(refined.net)
        state = version_statistics(
            base_statistics(base, refined.scan_state), refined.start_state, refined.scan_state,
            scans - 1, settings.site_statistics_prior, settings.site_statistics,
        )  # fmt: skip
        if any(not torch.equal(state[k], kept[k]) for k in state):
            pooled = copy.deepcopy(refined.net)
            load_state(pooled, state)
            prediction = predict(pooled, scan.slices, settings.refine_batch_size,
                                 region=scan.region)  # fmt: skip
            if refined.passes_guard(prediction):
                candidates.insert(0, ("the pooled statistics", pooled, prediction))
            else:
                rejected = " (the pooled statistics fail the guard's checks on this scan)"
    scores = [(name, foreground_dice(p.early, p.final, classes)) for name, _, p in candidates]
    chosen, reason = choose_version(
        scores, refined.start_consistency, started_from is None, settings.site_first_save
    )
    reason += rejected
    if started_from is None and latest_version is not None:
        reason += f" (version {latest_version} is unusable: refined from the base model)"
    if chosen is None:
        return SiteSave(reason)
    candidate, consistency = candidates[chosen][1], scores[chosen][1]
    delta = site_delta(mutable_state(candidate), base)
    if not delta:
        return SiteSave("not saved: the refinement left every tensor as the base model's")
    try:  # compare-and-set: the version pools, and was judged against, its start
        saved = sites.save(
            site, spec, delta,
            expected_version=latest_version,
            scans_refined=scans,
            self_consistency_before=round(refined.start_consistency, 6),
            self_consistency_after=round(consistency, 6),
            refinement_epochs=refined.epochs,
            job_id=job_id,
        )  # fmt: skip
    except VersionConflictError:
        start = f"version {started_from.version}" if started_from else "the base model"
        return SiteSave(
            f"not saved: another job saved a version of the site, or deleted it, while this "
            f"one refined from {start} (it would have saved: {reason})"
        )
    except ModelStoreError as error:
        return SiteSave(f"not saved: the site store cannot be written ({error})")
    return SiteSave(reason, saved, consistency, candidate)
