"""Site policy (auto|adapt|cached|none) and the guard, through the real engine and store."""

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from model_store import ModelStore
from model_store.backend import FilesystemBackend
from model_store.sites import SiteVersion
from sitefit.exceptions import InvalidInputError
from sitefit.settings import Settings
from sitefit.volume import load_scan
from tests.conftest import PhantomCase
from worker.batchnorm import interpolate_statistics, is_running_statistic
from worker.engine import Engine, Progress, SegmentRequest, SegmentResult
from worker.inference import SlicePrediction, foreground_dice, predict
from worker.policy import auto_fast_path
from worker.preprocess import prepare_scan
from worker.refinement import scan_statistics
from worker.site_update import Refined, save_next_version
from worker.weights import load_state, mutable_state

GUARD_SIGNALS = {
    "agreement_start_vs_adapted_dice", "volume_change", "entropy_before", "entropy_after",
    "self_consistency_start", "self_consistency_last_epoch", "empty_mask", "oscillations",
    "largest_fall", "epochs_failing", "bn_shift",
}  # fmt: skip


@pytest.fixture
def home_settings(settings: Settings, tmp_path: Path) -> Settings:
    """The session's models with a private, empty site store."""
    (tmp_path / "sites").mkdir()
    return settings.model_copy(update={"home": tmp_path})


@pytest.fixture
def engine(home_settings: Settings, settings: Settings) -> Engine:
    store = ModelStore(
        models=FilesystemBackend(settings.models_dir),
        sites=FilesystemBackend(home_settings.sites_dir),
    )
    return Engine(home_settings, store)


def _mask(result) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(result.mask.dataobj)


def _seed_site(
    engine: Engine, model: str, site: str, consistency_after: float = 0.6, scale: float = 1.01
) -> int:
    """Store a real delta for ``site``: the base init path, scaled by ``scale``."""
    spec = engine.store.models.spec(model)
    net = engine.base_net(spec)
    with torch.no_grad():
        for parameter in net.init_path.parameters():
            parameter.mul_(scale)
    delta = {k: v.numpy() for k, v in mutable_state(net).items() if k.startswith("init_path.")}
    saved = engine.store.sites.append(site, spec, delta, scans_refined=1,
                                      self_consistency_before=0.5,
                                      self_consistency_after=consistency_after,
                                      refinement_epochs=1)  # fmt: skip
    return saved.version


def test_cached_without_site_weights_uses_the_base_model(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    report = engine.run(
        SegmentRequest(shifted_brain_case.image, brain_model, "s1", "cached")
    ).report
    assert report.mode_used == "none" and "no usable cached weights" in report.mode_reason
    assert report.refinement.stopped == "skipped"


def test_cached_uses_the_sites_latest_weights(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    version = _seed_site(engine, brain_model, "s2")
    result = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, "s2", "cached"))
    assert result.report.mode_used == "cached"
    assert result.report.site_weights.used_version == version
    assert result.report.refinement.stopped == "skipped"
    assert engine.site_models.misses == 1
    engine.run(SegmentRequest(shifted_brain_case.image, brain_model, "s2", "cached"))
    assert engine.site_models.hits == 1  # materialised once, then warm


def test_auto_takes_the_fast_path_at_or_above_the_threshold(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    _seed_site(engine, brain_model, "s3")
    engine.settings = engine.settings.model_copy(update={"auto_threshold": 0.0})
    report = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, "s3", "auto")).report
    assert report.mode_used == "cached" and ">= 0.0" in report.mode_reason


def test_auto_refines_below_the_threshold_warm_started(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    version = _seed_site(engine, brain_model, "s4")
    engine.settings = engine.settings.model_copy(
        update={"auto_threshold": 1.0, "auto_margin": None}
    )
    report = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, "s4", "auto")).report
    assert report.mode_used == "adapt" and f"from site 's4' v{version}" in report.mode_reason
    assert report.site_weights.used_version == version
    assert report.refinement.epochs >= 1 and report.guard is not None


@pytest.mark.parametrize(("above", "fast"), [(0.01, True), (0.05, False)])
def test_auto_takes_the_fast_path_within_the_margin_of_the_saved_consistency(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase, above: float, fast: bool
) -> None:
    """Site weights that saved self-consistency X: auto uses them as they are on a scan where
    they reach at least X - margin (0.02), and refines where they fall further below."""
    _seed_site(engine, brain_model, "probe")
    probe = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, "probe", "cached"))
    on_scan = probe.report.site_weights.self_consistency_on_scan
    assert on_scan is not None and on_scan < 0.95
    _seed_site(engine, brain_model, "s3m", consistency_after=on_scan + above)
    engine.settings = engine.settings.model_copy(
        update={"auto_threshold": 1.0, "auto_margin": 0.02}
    )
    report = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, "s3m", "auto")).report
    assert report.mode_used == ("cached" if fast else "adapt"), report.mode_reason
    assert ("within 0.02" in report.mode_reason) is fast
    assert report.site_weights.self_consistency_on_scan == pytest.approx(on_scan)
    assert report.site_weights.self_consistency_when_saved == pytest.approx(on_scan + above)


def test_reference_figures_include_the_unguarded_last_epoch(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    """With a reference, the report says what the last epoch (no guard) would have scored:
    the same figures a run with the guard off gives as its output."""
    strict = {"refine_lr": 1.0, "guard_min_agreement": 0.999}
    request = SegmentRequest(shifted_brain_case.image, brain_model, None, "adapt",
                             shifted_brain_case.label)  # fmt: skip
    engine.settings = engine.settings.model_copy(update=strict)
    guarded = engine.run(request).report
    engine.settings = engine.settings.model_copy(update={**strict, "guard": False})
    unguarded = engine.run(request).report
    assert guarded.guard is not None and guarded.guard.verdict == "reverted"
    assert guarded.reference is not None and unguarded.reference is not None
    assert guarded.reference.after == guarded.reference.before  # reverted: the base output
    assert guarded.reference.last_epoch == unguarded.reference.after
    assert unguarded.reference.last_epoch == unguarded.reference.after
    none = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, None, "none",
                                     shifted_brain_case.label)).report  # fmt: skip
    assert none.reference is not None and none.reference.last_epoch is None


def test_adapt_saves_a_sites_first_version_when_the_guard_kept_the_refinement(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    """With the default first-save rule ("guarded") a new site's first version is the
    guard's call; a later one must also beat its start (the parametrised test below)."""
    report = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, "s5", "adapt")).report
    assert report.guard is not None and set(report.guard.signals) == GUARD_SIGNALS
    history = engine.store.sites.history("s5", brain_model)
    kept = report.guard.verdict == "kept"
    assert (report.site_weights.saved_version is not None) is kept
    assert len(history) == (1 if kept else 0)
    assert report.site_weights.save_reason is not None
    assert report.site_weights.save_reason.startswith("not saved") is not kept
    if kept:
        assert "first version, kept by the guard" in report.site_weights.save_reason
        assert report.site_weights.self_consistency_saved == pytest.approx(
            history[0].self_consistency_after, abs=1e-6
        )


class _Canceled(Exception):
    """What a job's progress callback raises once the job was canceled."""


def test_a_job_canceled_after_its_last_epoch_saves_no_site_version(
    engine: Engine, consistent_brain_model: str, near_source_brain_case: PhantomCase
) -> None:
    """The cancel lands after the refinement's last epoch was reported (the same refinement
    as in an uncanceled run, which saves a version): the progress
    callback is asked again before the site is saved, and nothing is saved."""
    request = SegmentRequest(near_source_brain_case.image, consistent_brain_model, "whole",
                             "adapt")  # fmt: skip
    report = engine.run(request).report
    assert report.site_weights.saved_version == 1, "premise: it saves"
    last = report.refinement.epochs
    seen: list[Progress] = []

    def progress(update: Progress) -> None:
        seen.append(update)
        if any(p.stage == "adapting" and p.epoch == last for p in seen[:-1]):
            raise _Canceled  # canceled right after the last epoch was reported

    with pytest.raises(_Canceled):
        engine.run(replace(request, site="canceled"), progress)
    assert engine.store.sites.history("canceled", consistent_brain_model) == []
    epoch, asked = seen[-2], seen[-1]
    assert epoch.stage == asked.stage == "adapting" and asked.epoch == epoch.epoch, seen


def test_corrupt_site_delta_falls_back_to_base_with_a_warning(
    engine: Engine, home_settings: Settings, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    _seed_site(engine, brain_model, "s6")
    delta = next(home_settings.sites_dir.glob("s6/*/1/delta.safetensors.gz"))
    delta.write_bytes(delta.read_bytes()[:-20] + b"\0" * 20)
    result = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, "s6", "cached"))
    assert result.report.mode_used == "none"
    assert any("site weights unusable" in w for w in result.report.warnings)
    base = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, None, "none"))
    assert np.array_equal(_mask(result), _mask(base))
    assert engine.store.sites.integrity_errors >= 1


def test_diverging_refinement_is_reverted_and_never_saved(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    """An absurd step size blows the init path up: reverted, base output, nothing saved."""
    engine.settings = engine.settings.model_copy(update={"refine_lr": 10.0**6})
    result = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, "s7", "adapt"))
    report = result.report
    assert report.guard is not None and report.guard.verdict == "reverted", report.guard
    assert "diverged" in report.guard.reason
    assert report.refinement.best_epoch is None
    assert report.site_weights.saved_version is None
    assert engine.store.sites.history("s7", brain_model) == []
    base = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, None, "none"))
    assert np.array_equal(_mask(result), _mask(base))


def test_refinement_failing_the_guard_is_reverted_to_the_base_output(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    """Learning rate 1.0 moves the mask; a strict guard (agreement >= 0.999) refuses it."""
    engine.settings = engine.settings.model_copy(
        update={"refine_lr": 1.0, "guard_min_agreement": 0.999}
    )
    result = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, "s8", "adapt"))
    report = result.report
    assert report.guard is not None and report.guard.verdict == "reverted", report.guard
    assert "agreement" in report.guard.reason
    assert report.site_weights.saved_version is None
    assert report.site_weights.save_reason == "not saved: the guard reverted the refinement"
    assert engine.store.sites.history("s8", brain_model) == []
    base = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, None, "none"))
    assert np.array_equal(_mask(result), _mask(base))
    assert base.report.site_weights.save_reason is None


def test_self_consistency_threshold_defaults_by_refinement_mode(engine: Engine) -> None:
    """Self-training must raise its own objective; statistics only must not let it fall far."""
    statistics = engine.settings.model_copy(update={"refine_lr": 0.0})
    training = engine.settings.model_copy(update={"refine_lr": 1e-3})
    explicit = engine.settings.model_copy(update={"guard_min_consistency_gain": 0.2})
    gains = [Engine(s, engine.store).guard_config().min_consistency_gain
             for s in (statistics, training, explicit)]  # fmt: skip
    assert gains == [-0.05, 0.05, 0.2]


def test_guard_can_be_switched_off(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    engine.settings = engine.settings.model_copy(update={"refine_lr": 1.0, "guard": False})
    report = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, None, "adapt")).report
    assert report.guard is not None and report.guard.verdict == "kept"
    assert "disabled" in report.guard.reason


def test_invalid_site_name_is_refused(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    with pytest.raises(InvalidInputError, match="invalid site name"):
        engine.run(SegmentRequest(shifted_brain_case.image, brain_model, "../etc", "adapt"))


def _statistics(engine: Engine, site: str, model: str) -> dict[str, np.ndarray]:
    """The BN running statistics of ``site``'s latest version."""
    spec = engine.store.models.spec(model)
    latest = engine.store.sites.latest(site, model)
    assert latest is not None
    delta = engine.store.sites.load(site, latest, spec)
    return {k: v for k, v in delta.items() if is_running_statistic(k)}


def _base_statistics(engine: Engine, model: str) -> dict[str, np.ndarray]:
    state = mutable_state(engine.base_net(engine.store.models.spec(model)))
    return {k: v.numpy() for k, v in state.items() if is_running_statistic(k)}


def _seed_statistics(engine: Engine, model: str, site: str, scans: int) -> dict[str, np.ndarray]:
    """Store a version refined on ``scans`` scans whose BN statistics are the base model's,
    off (means shifted by 0.2 standard deviations, variances by 30%): on the near-source case
    its Dice(early, final) is near 0, its mean with the scan's well above (0.12-0.18)."""
    spec = engine.store.models.spec(model)
    state = mutable_state(engine.base_net(spec))
    delta = {}
    for key, value in state.items():
        if key.endswith("running_mean"):
            delta[key] = (value + 0.2 * state[key.replace("mean", "var")].sqrt()).numpy()
        elif key.endswith("running_var"):
            delta[key] = (value * 1.3).numpy()
    engine.store.sites.append(site, spec, delta, scans_refined=scans, self_consistency_before=0.5,
                              self_consistency_after=0.6, refinement_epochs=1)  # fmt: skip
    return delta


@pytest.mark.parametrize("statistics", ["pooled", "latest"])
def test_adapt_saves_the_site_statistics_pooled_over_its_scans(
    engine: Engine,
    consistent_brain_model: str,
    near_source_brain_case: PhantomCase,
    statistics: str,
) -> None:
    engine.settings = engine.settings.model_copy(update={"site_statistics": statistics})
    prior = engine.settings.site_statistics_prior
    assert prior > 0
    scan = near_source_brain_case.image
    alone = engine.run(SegmentRequest(scan, consistent_brain_model, "alone", "adapt")).report
    assert alone.site_weights.saved_scans == 1
    # a 1-scan version holds (prior * base + scan) / (prior + 1): the scan's own statistics
    base = _base_statistics(engine, consistent_brain_model)
    own = {k: (1 + prior) * v - prior * base[k]
           for k, v in _statistics(engine, "alone", consistent_brain_model).items()}  # fmt: skip
    seeded = _seed_statistics(engine, consistent_brain_model, "pool", scans=1)
    report = engine.run(SegmentRequest(scan, consistent_brain_model, "pool", "adapt")).report
    saved = report.site_weights
    assert saved.saved_version == 2 and saved.saved_scans == 2, report.site_weights
    assert saved.self_consistency_on_scan is not None and saved.self_consistency_saved is not None
    assert saved.self_consistency_saved > saved.self_consistency_on_scan  # the save rule
    for key, value in _statistics(engine, "pool", consistent_brain_model).items():
        if statistics == "pooled":  # the seeded version weighs its scan and the prior
            expected = ((1 + prior) * seeded[key] + own[key]) / (2 + prior)
        else:
            expected = (prior * base[key] + own[key]) / (1 + prior)
        np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-6, err_msg=key)
    # this scan's output is refined on the scan alone, whatever the site version pools
    assert report.self_consistency.after == alone.self_consistency.after
    assert (saved.self_consistency_saved == alone.site_weights.self_consistency_saved) is (
        statistics == "latest"
    )


def _version(reached: float | None) -> SiteVersion:
    return SiteVersion(site="s", model="m", version=1, base_sha256="0" * 64, sha256="0" * 64,
                       created=datetime.now(UTC), scans_refined=1, self_consistency_before=0.1,
                       self_consistency_after=reached, refinement_epochs=1,
                       sitefit_version="0", nbytes=0)  # fmt: skip


@pytest.mark.parametrize(
    ("consistency", "reached", "margin", "fast", "why"),
    [
        (0.95, 0.5, 0.02, True, ">= 0.9"),
        (0.79, 0.80, 0.02, True, "within 0.02 of the 0.800"),
        (0.77, 0.80, 0.02, False, "< 0.9 and below 0.800 - 0.02"),
        (0.79, 0.80, None, False, "< 0.9"),
        (0.79, None, 0.02, False, "< 0.9"),
    ],
)
def test_auto_takes_the_cached_path_on_the_threshold_or_the_margin(
    consistency: float, reached: float | None, margin: float | None, fast: bool, why: str
) -> None:
    taken, reason = auto_fast_path(consistency, _version(reached), 0.9, margin)
    assert taken is fast and why in reason, reason


def test_auto_never_takes_the_cached_path_where_the_cached_weights_find_nothing() -> None:
    # two empty masks agree perfectly: 1.0 would pass any threshold and any margin
    taken, reason = auto_fast_path(1.0, _version(1.0), 0.9, 0.02, finds_something=False)
    assert not taken and "empty" in reason


def test_adapt_saves_this_scans_output_when_the_pooled_statistics_do_not_beat_the_start(
    engine: Engine, consistent_brain_model: str, near_source_brain_case: PhantomCase
) -> None:
    # a version pooled over 10^9 scans does not move in float32 when one more joins: the
    # pooled candidate is the start itself, so only this scan's output can beat the start
    assert engine.settings.site_statistics == "pooled"
    seeded = _seed_statistics(engine, consistent_brain_model, "out", scans=10**9)
    scan = near_source_brain_case.image
    report = engine.run(SegmentRequest(scan, consistent_brain_model, "out", "adapt")).report
    before, after = report.self_consistency.before.dice, report.self_consistency.after.dice
    assert before is not None and after is not None and after > before, "premise: refining helps"
    saved = report.site_weights
    assert saved.saved_version == 2 and saved.saved_scans == 10**9 + 1, saved
    assert saved.self_consistency_saved == pytest.approx(after, abs=1e-6)  # the output's
    stored = _statistics(engine, "out", consistent_brain_model)
    assert any(not np.array_equal(stored[k], seeded[k]) for k in seeded)


@pytest.mark.parametrize("rule", ["beats_start", "guarded"])
def test_a_sites_first_version_is_saved_by_the_first_save_rule(
    engine: Engine, consistent_brain_model: str, shifted_brain_case: PhantomCase, rule: str
) -> None:
    """On this scan the guard keeps a refinement whose Dice(early, final) falls: issue 3's
    rule saves no first version, "guarded" does; later versions must beat their start."""
    engine.settings = engine.settings.model_copy(update={"site_first_save": rule})
    scan = shifted_brain_case.image
    report = engine.run(SegmentRequest(scan, consistent_brain_model, "first", "adapt")).report
    before, after = report.self_consistency.before.dice, report.self_consistency.after.dice
    assert report.guard is not None and report.guard.verdict == "kept"
    assert before is not None and after is not None and after < before, "premise: it falls"
    saved = report.site_weights
    history = engine.store.sites.history("first", consistent_brain_model)
    if rule == "beats_start":
        assert saved.saved_version is None and history == []
        assert saved.save_reason is not None and saved.save_reason.startswith("not saved")
        return
    assert saved.saved_version == 1 and len(history) == 1
    assert saved.save_reason is not None and "first version, kept by the guard" in saved.save_reason
    assert saved.self_consistency_saved is not None and saved.self_consistency_saved < before
    again = engine.run(SegmentRequest(scan, consistent_brain_model, "first", "adapt")).report
    assert again.site_weights.used_version == 1
    # a later version must beat the version it starts from, which on this scan none does
    assert again.site_weights.saved_version is None, again.site_weights.save_reason
    assert (again.site_weights.save_reason or "").startswith("not saved: none beats")
    assert len(engine.store.sites.history("first", consistent_brain_model)) == 1


def test_adapt_does_not_save_over_a_version_another_job_saved_meanwhile(
    engine: Engine, consistent_brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    """The save is a compare-and-set on the version the refinement started from: a version
    pools, and was judged against, its start, so another job's version is not overwritten
    in the history by one that never saw it."""
    model, site = consistent_brain_model, "race"

    def other_job_saves(progress: Progress) -> None:
        if progress.stage == "adapting" and not engine.store.sites.history(site, model):
            _seed_site(engine, model, site, consistency_after=0.123)

    request = SegmentRequest(shifted_brain_case.image, model, site, "adapt")
    report = engine.run(request, other_job_saves).report
    assert report.guard is not None and report.guard.verdict == "kept", "premise: it would save"
    assert report.site_weights.used_version is None and report.site_weights.saved_version is None
    reason = report.site_weights.save_reason
    assert reason is not None and reason.startswith("not saved: another job saved"), reason
    history = engine.store.sites.history(site, model)
    assert [(v.version, v.self_consistency_after) for v in history] == [(1, 0.123)]


def test_a_site_deleted_and_saved_again_is_not_served_from_the_old_cache(
    engine: Engine, consistent_brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    """Versions start at 1 again after a delete: the warm cache must not serve the old
    version 1 (its key names the delta's sha256)."""
    brain_model = consistent_brain_model
    request = SegmentRequest(shifted_brain_case.image, brain_model, "again", "cached")
    _seed_site(engine, brain_model, "again")
    old = engine.run(request)
    engine.store.sites.delete("again")
    assert _seed_site(engine, brain_model, "again", scale=0.8) == 1
    misses = engine.site_models.misses
    new = engine.run(request)
    assert new.report.site_weights.used_version == old.report.site_weights.used_version == 1
    assert engine.site_models.misses == misses + 1
    fresh = Engine(engine.settings, engine.store).run(request)
    assert np.array_equal(_labels(new), _labels(fresh))
    assert not np.array_equal(_labels(new), _labels(old)), "premise: the new weights differ"


def _labels(result: SegmentResult) -> np.ndarray:
    return np.asarray(result.mask.dataobj)


def test_a_sites_unusable_latest_version_does_not_stop_it_saving_again(
    engine: Engine, home_settings: Settings, consistent_brain_model: str,
    shifted_brain_case: PhantomCase,
) -> None:  # fmt: skip
    """A latest version that cannot be used (corrupt here; made for an older base model
    alike) is skipped: the refinement starts from the base model, and its version is saved
    after the unusable one rather than lost to a compare-and-set against no version."""
    model = consistent_brain_model
    _seed_site(engine, model, "stuck")
    delta = next(home_settings.sites_dir.glob("stuck/*/1/delta.safetensors.gz"))
    delta.write_bytes(b"\0" * delta.stat().st_size)
    report = engine.run(SegmentRequest(shifted_brain_case.image, model, "stuck", "adapt")).report
    assert any("site weights unusable" in w for w in report.warnings)
    assert report.guard is not None and report.guard.verdict == "kept", "premise: it would save"
    assert report.site_weights.used_version is None
    assert report.site_weights.saved_version == 2, report.site_weights.save_reason
    assert "version 1 is unusable" in (report.site_weights.save_reason or "")
    saved = engine.store.sites.latest("stuck", model)
    assert saved is not None and saved.scans_refined == 1  # from the base model
    assert engine.store.sites.load("stuck", saved, engine.store.models.spec(model))


def test_auto_says_the_sites_weights_exist_but_cannot_be_used(
    engine: Engine, home_settings: Settings, consistent_brain_model: str,
    shifted_brain_case: PhantomCase,
) -> None:  # fmt: skip
    _seed_site(engine, consistent_brain_model, "unusable")
    delta = next(home_settings.sites_dir.glob("unusable/*/1/delta.safetensors.gz"))
    delta.write_bytes(delta.read_bytes()[:-8])
    request = SegmentRequest(shifted_brain_case.image, consistent_brain_model, "unusable", "auto")
    report = engine.run(request).report
    assert report.mode_used == "adapt" and report.site_weights.used_version is None
    assert "site 'unusable' v1 cannot be used" in report.mode_reason, report.mode_reason
    assert "no cached weights" not in report.mode_reason


def test_a_site_store_that_cannot_be_written_does_not_fail_the_job(
    engine: Engine, home_settings: Settings, consistent_brain_model: str,
    shifted_brain_case: PhantomCase,
) -> None:  # fmt: skip
    (home_settings.sites_dir / "blocked").write_bytes(b"a file where the site's folder goes")
    request = SegmentRequest(shifted_brain_case.image, consistent_brain_model, "blocked", "adapt")
    report = engine.run(request).report
    assert report.guard is not None and report.guard.verdict == "kept", "premise: it would save"
    assert report.site_weights.saved_version is None
    reason = report.site_weights.save_reason
    assert reason is not None and reason.startswith("not saved: the site store cannot be written")


def test_a_retried_job_does_not_pool_its_scan_into_the_site_twice(
    engine: Engine, consistent_brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    """An attempt that saved a version and then died is run again: the retry must not save
    a version pooling the same scan once more."""
    model, scan, job = consistent_brain_model, shifted_brain_case.image, "0" * 32
    request = SegmentRequest(scan, model, "retried", "adapt", job_id=job)
    first = engine.run(request).report
    assert first.site_weights.saved_version == 1, "premise: the first attempt saves"
    assert engine.store.sites.version("retried", model, 1).job_id == job
    retry = engine.run(request).report
    assert retry.site_weights.used_version == 1 and retry.site_weights.saved_version is None
    reason = retry.site_weights.save_reason or ""
    assert reason.startswith("not saved: an earlier attempt of this job saved version 1")
    other = engine.run(SegmentRequest(scan, model, "retried", "adapt", job_id="1" * 32)).report
    assert not (other.site_weights.save_reason or "").startswith("not saved: an earlier")


@pytest.mark.parametrize("pooled_passes", [True, False])
def test_a_version_is_saved_only_from_weights_that_pass_the_guard_on_the_scan(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase, pooled_passes: bool
) -> None:
    """The guard kept this scan's output (the scan's own statistics here); the pooled
    statistics the site would save instead were never judged by it: they must pass its
    checks on the scan too, or the output is saved."""
    spec = engine.store.models.spec(brain_model)
    net = engine.base_net(spec)
    prepared = prepare_scan(load_scan(shifted_brain_case.image, 10**8), spec.slice_axis,
                            engine.device)  # fmt: skip
    start_state = mutable_state(net)
    start = predict(net, prepared.slices, 8, region=prepared.region)
    load_state(net, {**start_state, **scan_statistics(net, prepared.slices, 2)})
    judged: list[bool] = []

    def passes_guard(prediction: SlicePrediction) -> bool:
        judged.append(pooled_passes)
        return pooled_passes

    after = predict(net, prepared.slices, 8, region=prepared.region)
    refined = Refined(net, after, start_state, mutable_state(net),
                      foreground_dice(start.early, start.final, 2), 1, passes_guard)  # fmt: skip
    site = f"judged-{pooled_passes}"
    save = save_next_version(engine.store.sites, engine.settings, spec,
                             engine.store.models.tensors(spec), site, prepared, None,
                             None, refined)  # fmt: skip
    assert judged == [pooled_passes] and save.version is not None  # a guarded first save
    chosen = "the pooled statistics" if pooled_passes else "this scan's output"
    assert f"kept by the guard: {chosen}" in save.reason, save.reason
    assert ("fail the guard's checks" in save.reason) is not pooled_passes


def test_the_engine_saves_no_pooled_statistics_the_guard_rejects_on_the_scan(
    engine: Engine, consistent_brain_model: str, near_source_brain_case: PhantomCase
) -> None:
    """A guard margin between the pooled point's (0.75 of the way) Dice(early, final) and the
    scan's own (1.0): the guard keeps the scan's statistics for the output, and the engine
    must judge the pooled statistics by the same guard before it saves them."""
    model, scan = consistent_brain_model, near_source_brain_case.image
    spec = engine.store.models.spec(model)
    net = engine.base_net(spec)
    prepared = prepare_scan(load_scan(scan, 10**8), spec.slice_axis, engine.device)
    start = mutable_state(net)
    own = {**start, **scan_statistics(net, prepared.slices, 2)}
    consistency = {}
    for weight in (0.0, 0.75, 1.0):
        load_state(net, interpolate_statistics(start, own, weight))
        prediction = predict(net, prepared.slices, 8, region=prepared.region)
        consistency[weight] = foreground_dice(prediction.early, prediction.final, 2)
    assert consistency[1.0] > consistency[0.75], f"premise: {consistency}"
    gain = (consistency[0.75] + consistency[1.0]) / 2 - consistency[0.0]
    engine.settings = engine.settings.model_copy(update={"guard_min_consistency_gain": gain})
    report = engine.run(SegmentRequest(scan, model, "margin", "adapt")).report
    assert report.guard is not None and report.guard.verdict == "kept"
    reason = report.site_weights.save_reason or ""
    assert "kept by the guard: this scan's output" in reason, reason
    assert "the pooled statistics fail the guard's checks" in reason


def test_auto_refines_where_the_cached_weights_find_nothing(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    """Cached weights whose heads both predict nothing agree perfectly (1.0, above any
    threshold or margin): auto must not serve them as they are."""
    spec = engine.store.models.spec(brain_model)
    base = engine.store.models.tensors(spec)
    nothing = {k: np.full_like(base[k], -1e4) for k in ("body.out_conv.bias",
                                                        "early_head.layers.4.bias")}  # fmt: skip
    engine.store.sites.append("blind", spec, nothing, scans_refined=1,
                              self_consistency_before=0.5, self_consistency_after=1.0,
                              refinement_epochs=1)  # fmt: skip
    report = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, "blind", "auto"))
    assert report.report.mode_used == "adapt" and "empty" in report.report.mode_reason
