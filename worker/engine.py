"""The segmentation engine: one scan in, a mask and a report out, no services needed.

``Engine`` keeps what is worth keeping between jobs (the device, verified base weights, warm
site models) and runs the whole job: load -> canonical orientation -> min-max scaling ->
slices -> base prediction -> site policy (cached weights or refinement, guarded) ->
figures -> mask in the input's grid. The CLI (``sitefit segment``), the in-process server
and the RQ worker all call it.

Site policy for a scan of site S (``Report.mode_used`` and ``mode_reason`` say what ran):
- ``none``: the base model.
- ``cached``: S's latest weights as they are; the base model when S has none usable.
- ``adapt``: one-shot refinement on this scan, warm-started from S's weights when present;
  the result becomes S's next version only when the guard kept it and its self-consistency
  beats the weights it started from (S's first version: see ``Settings.site_first_save``).
- ``auto``: S's weights as they are (the fast path) when their self-consistency on this scan
  reaches ``Settings.auto_threshold``, or comes within ``Settings.auto_margin`` of the
  self-consistency they reached on the scan they were refined on; otherwise as ``adapt``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

import sitefit
from model_store import ModelStore
from model_store.sites import SiteVersion, check_site
from model_store.spec import ModelSpec
from sitefit.exceptions import ModelStoreError
from sitefit.report import Mode, ModelIdentity, Report
from sitefit.settings import Settings
from sitefit.volume import load_label_map, load_scan, mask_to_image
from worker.cache import CacheKey, ModelCache
from worker.device import describe, resolve_device
from worker.figures import LabelVolumes, add_reference, compute_figures
from worker.guard import (
    GuardConfig,
    Verdict,
    acceptance,
    bn_shift,
    default_consistency_gain,
    judge,
    overrule_on_divergence,
)
from worker.inference import SlicePrediction, foreground_dice, predict
from worker.nets import SegmentationNet
from worker.policy import auto_fast_path
from worker.preprocess import PreparedScan, prepare_scan
from worker.preview import PreviewData
from worker.refinement import RefineConfig, RefinementResult, refine
from worker.report_blocks import guard_block, refinement_block, site_weights_block
from worker.reproducibility import file_sha256, reproducibility_block
from worker.site_update import Refined, save_next_version
from worker.stopwatch import Stopwatch
from worker.weights import build_net, load_numpy, load_state, mutable_state


@dataclass(frozen=True)
class SegmentRequest:
    scan: Path
    model: str
    site: str | None = None
    mode: Mode = "auto"
    reference: Path | None = None
    job_id: str | None = None  # the queued job this runs for: recorded with a site version


@dataclass(frozen=True)
class Progress:
    stage: str  # loading | segmenting | adapting | metrics | done
    epoch: int | None = None
    dice_trace: tuple[float, ...] = ()


ProgressCallback = Callable[[Progress], None]


@dataclass
class SegmentResult:
    report: Report
    mask: nib.Nifti1Image
    spec: ModelSpec  # the model that ran: its classes and codes name a DICOM SEG's segments
    seg_omit_empty_frames: bool = False  # Settings.seg_omit_empty_frames, for that SEG
    # the base model's mask on the input's grid when the output is not it (mode_used is not
    # "none"), for comparison; None: the mask is the base model's
    base_mask: nib.Nifti1Image | None = None
    preview: PreviewData | None = None  # what the preview (worker.preview) is drawn from


@dataclass(frozen=True)
class SiteModel:
    version: SiteVersion
    net: SegmentationNet  # shared with the cache: never refine it in place


@dataclass(frozen=True)
class SiteLookup:
    """What the store holds for the job's site and model."""

    usable: SiteModel | None = None  # the latest version, when it can be used
    latest_version: int | None = None  # its number, usable or not: what a save compares with


@dataclass
class _Outcome:
    mode_used: Mode
    reason: str
    after: SlicePrediction
    refinement: RefinementResult | None = None
    verdict: Verdict | None = None
    site_used: SiteVersion | None = None
    site_saved: SiteVersion | None = None
    site_consistency: float | None = None  # the site weights' Dice(early, final) on this scan
    site_saved_consistency: float | None = None  # the saved version's, on this scan
    site_save_reason: str | None = None


class Engine:
    """Runs segmentation jobs on one device; reuse one instance for many jobs (one thread)."""

    def __init__(self, settings: Settings, store: ModelStore | None = None) -> None:
        self.settings = settings
        self.store = store or ModelStore.from_settings(settings)
        self.device = resolve_device(settings.device)
        self.site_models: ModelCache[SegmentationNet] = ModelCache(settings.model_cache_bytes)
        self._base_tensors: dict[str, dict[str, np.ndarray]] = {}

    def refine_config(self) -> RefineConfig:
        return RefineConfig(
            max_epochs=self.settings.refine_max_epochs,
            learning_rate=self.settings.refine_lr,
            batch_size=self.settings.refine_batch_size,
            batchnorm=self.settings.refine_batchnorm,
            statistics_average=self.settings.refine_statistics_average,
            statistics_passes=self.settings.refine_statistics_passes,
            min_statistics_steps=self.settings.refine_min_statistics_steps,
        )

    def guard_config(self) -> GuardConfig:
        gain = self.settings.guard_min_consistency_gain
        if gain is None:  # the default of the refinement's mode
            gain = default_consistency_gain(self.settings.refine_lr)
        return GuardConfig(
            enabled=self.settings.guard,
            max_volume_change=self.settings.guard_max_volume_change,
            min_agreement=self.settings.guard_min_agreement,
            min_consistency_gain=gain,
            max_entropy_rise=self.settings.guard_max_entropy_rise,
        )

    def base_net(self, spec: ModelSpec) -> SegmentationNet:
        """A fresh net holding the base model's weights (verified once, then kept in memory)."""
        tensors = self._base_tensors.get(spec.sha256)
        if tensors is None:
            tensors = self.store.models.tensors(spec)
            self._base_tensors[spec.sha256] = tensors
        return build_net(spec, tensors, self.device)

    def run(
        self, request: SegmentRequest, progress: ProgressCallback | None = None
    ) -> SegmentResult:
        notify = progress or (lambda _: None)
        clock = Stopwatch()
        notify(Progress("loading"))
        if request.site is not None:
            check_site(request.site)
        spec = self.store.models.spec(request.model)
        scan = load_scan(request.scan, self.settings.max_voxels)
        input_sha256 = file_sha256(request.scan)  # the file as read: the record's input
        clock.lap("load")
        reference = load_label_map(request.reference, like=scan) if request.reference else None
        clock.lap("reference")
        prepared = prepare_scan(scan, spec.slice_axis, self.device)
        base_net = self.base_net(spec)
        warnings: list[str] = []
        lookup = self._site_model(request, spec, warnings)
        clock.lap("load")

        notify(Progress("segmenting"))
        base = predict(base_net, prepared.slices, self.settings.refine_batch_size,
                       region=prepared.region)  # fmt: skip
        clock.lap("segment")
        outcome = self._apply_policy(request, spec, prepared, base, base_net, lookup, notify)
        clock.lap("adapt")

        notify(Progress("metrics"))
        early_before, final_before = prepared.volume(base.early), prepared.volume(base.final)
        if outcome.after is base:
            early_after, final_after = early_before, final_before
        else:
            early_after = prepared.volume(outcome.after.early)
            final_after = prepared.volume(outcome.after.final)
        last_epoch = None
        if reference is not None and outcome.refinement is not None:
            last = outcome.refinement.prediction
            last_epoch = final_after if last is outcome.after else prepared.volume(last.final)
        volumes = LabelVolumes(early_before, final_before, early_after, final_after, last_epoch)
        tolerance = self.settings.tolerance_mm
        figures = compute_figures(volumes, spec.classes, scan.spacing_mm, tolerance)
        mask = mask_to_image(final_after, scan.source)
        base_mask = None
        if outcome.mode_used != "none":
            base_mask = mask_to_image(final_before, scan.source)
        clock.lap("metrics")
        if reference is not None:
            figures = add_reference(figures, volumes, spec.classes, scan.spacing_mm, tolerance,
                                    reference)  # fmt: skip
            clock.lap("reference")
        report = Report(
            model=ModelIdentity(name=spec.name, version=spec.version, sha256=spec.sha256),
            site=request.site,
            mode_requested=request.mode,
            mode_used=outcome.mode_used,
            mode_reason=outcome.reason,
            site_weights=site_weights_block(
                outcome.site_used,
                outcome.site_saved,
                outcome.site_consistency,
                outcome.site_saved_consistency,
                outcome.site_save_reason,
            ),
            tolerance_mm=self.settings.tolerance_mm,
            device=describe(self.device),
            spacing_mm=scan.spacing_mm,
            timings_s=clock.report(),
            self_consistency=figures.self_consistency,
            agreement_base_vs_adapted=figures.agreement_base_vs_adapted,
            reference=figures.reference,
            per_class=figures.per_class,
            refinement=refinement_block(outcome.refinement, outcome.verdict, self.refine_config()),
            guard=guard_block(outcome.verdict),
            warnings=warnings,
            sitefit_version=sitefit.__version__,
            reproducibility=reproducibility_block(
                spec=spec,
                input_sha256=input_sha256,
                device=self.device,
                device_name=describe(self.device),
                settings=self.settings,
                refine=self.refine_config(),
                guard=self.guard_config(),
                site_used=outcome.site_used,
                site_saved=outcome.site_saved,
            ),
        )
        preview = PreviewData(
            image=scan.data,
            mask=final_after,
            base=None if outcome.after is base else final_before,
            slice_axis=spec.slice_axis,
            spacing_mm=scan.spacing_mm,
            classes=spec.classes,
            title=f"{spec.name}@{spec.version}, mode {outcome.mode_used}",
        )
        notify(Progress("done"))
        return SegmentResult(report=report, mask=mask, spec=spec,
                             seg_omit_empty_frames=self.settings.seg_omit_empty_frames,
                             base_mask=base_mask, preview=preview)  # fmt: skip

    def _site_model(
        self, request: SegmentRequest, spec: ModelSpec, warnings: list[str]
    ) -> SiteLookup:
        """The site's latest weights, when usable (a warning says why when they are not)."""
        if request.site is None or request.mode == "none":
            return SiteLookup()
        number = None
        try:
            number = self.store.sites.latest_number(request.site, spec.name)
            latest = self.store.sites.latest(request.site, spec.name)
            if latest is None:
                return SiteLookup()
            site, version = request.site, latest

            def materialise() -> SegmentationNet:
                net = self.base_net(spec)
                load_numpy(net, self.store.sites.load(site, version, spec), strict=False)
                return net

            key = CacheKey(request.site, spec.name, latest.version, spec.sha256, latest.sha256)
            net = self.site_models.get_or_create(key, materialise)
        except ModelStoreError as error:
            warnings.append(f"site weights unusable, base model used instead: {error}")
            return SiteLookup(latest_version=number)
        return SiteLookup(SiteModel(latest, net), latest.version)

    def _apply_policy(
        self,
        request: SegmentRequest,
        spec: ModelSpec,
        prepared: PreparedScan,
        base: SlicePrediction,
        base_net: SegmentationNet,
        lookup: SiteLookup,
        notify: ProgressCallback,
    ) -> _Outcome:
        site = lookup.usable
        batch = self.settings.refine_batch_size
        classes = len(spec.classes)
        if request.mode == "none":
            return _Outcome("none", "base model requested", base)
        where = f"site {request.site!r}"
        if site is None and request.mode == "cached":
            return _Outcome("none", f"{where} has no usable cached weights: base model", base)
        candidate = None
        if site is not None:
            candidate = predict(site.net, prepared.slices, batch, region=prepared.region)
        consistency = None
        if candidate is not None:
            consistency = foreground_dice(candidate.early, candidate.final, classes)
        if site and candidate and request.mode == "cached":
            return _Outcome("cached", f"cached weights of {where} v{site.version.version}",
                            candidate, site_used=site.version,
                            site_consistency=consistency)  # fmt: skip
        reason = "one-shot refinement on this scan"
        if site and candidate and consistency is not None:
            fast, why = auto_fast_path(consistency, site.version, self.settings.auto_threshold,
                                       self.settings.auto_margin,
                                       bool(candidate.final.any()))  # fmt: skip
            if request.mode == "auto" and fast:
                return _Outcome("cached", f"{where} v{site.version.version} used as is: {why}",
                                candidate, site_used=site.version,
                                site_consistency=consistency)  # fmt: skip
            reason = f"refined on this scan from {where} v{site.version.version}"
            if request.mode == "auto":
                reason += f" ({why})"
        elif request.mode == "auto" and lookup.latest_version is not None:
            reason = (f"{where} v{lookup.latest_version} cannot be used (see warnings): "
                      f"{reason} from the base model")  # fmt: skip
        elif request.mode == "auto":
            reason = "no cached weights for this site: " + reason
        outcome = self._refine(request, spec, prepared, base_net, base, lookup, candidate,
                               reason, notify)  # fmt: skip
        outcome.site_consistency = consistency
        return outcome

    def _refine(
        self,
        request: SegmentRequest,
        spec: ModelSpec,
        prepared: PreparedScan,
        base_net: SegmentationNet,
        base: SlicePrediction,
        lookup: SiteLookup,
        candidate: SlicePrediction | None,
        reason: str,
        notify: ProgressCallback,
    ) -> _Outcome:
        site = lookup.usable
        classes = len(spec.classes)
        net = copy.deepcopy(site.net) if site else base_net
        start = candidate if candidate is not None else base
        start_state = mutable_state(net)
        trace: list[float] = []

        def on_epoch(epoch: int, dice: float) -> None:
            trace.append(dice)
            notify(Progress("adapting", epoch, tuple(trace)))

        notify(Progress("adapting", 0))
        start_consistency = foreground_dice(start.early, start.final, classes)
        guard = self.guard_config()
        passes_guard = acceptance(start, classes, guard)
        result = refine(net, prepared.slices, classes, start_consistency, self.refine_config(),
                        on_epoch, keep_states=True, accept=passes_guard,
                        region=prepared.region)  # fmt: skip
        verdict = judge(start, result.predictions, classes, guard, result.dice_trace)
        if self.settings.guard:
            verdict = overrule_on_divergence(verdict, start_state, result.states)
        kept = verdict.kept_epoch
        verdict.signals["bn_shift"] = round(
            bn_shift(start_state, result.states[(kept or len(result.states)) - 1]), 6
        )
        used = site.version if site else None
        if kept is None:
            load_state(net, start_state)
            outcome = _Outcome("adapt", reason, start, result, verdict, site_used=used)
            if request.site is not None:
                outcome.site_save_reason = "not saved: the guard reverted the refinement"
            return outcome
        kept_state = result.states[kept - 1]
        load_state(net, kept_state)
        after = result.predictions[kept - 1]
        outcome = _Outcome("adapt", reason, after, result, verdict, site_used=used)
        if request.site is not None:
            # saving is the job's one side effect outside its own results: the progress
            # callback is where a job notices it was canceled (or ran out of time), so it is
            # asked once more, and a canceled job leaves no site version behind
            notify(Progress("adapting", len(trace), tuple(trace)))
            refined = Refined(net, after, start_state, result.states[-1], start_consistency, kept,
                              passes_guard)  # fmt: skip
            save = save_next_version(self.store.sites, self.settings, spec,
                                     self._base_tensors[spec.sha256], request.site,
                                     prepared, used, lookup.latest_version,
                                     refined, request.job_id)  # fmt: skip
            outcome.site_save_reason = save.reason
            if save.version is not None and save.net is not None:
                outcome.site_saved, outcome.site_saved_consistency = save.version, save.consistency
                key = CacheKey(request.site, spec.name, save.version.version, spec.sha256,
                               save.version.sha256)  # fmt: skip
                self.site_models.put(key, save.net)
        return outcome
