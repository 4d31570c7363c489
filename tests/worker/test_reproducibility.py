"""The reproducibility record: it names what a job's mask came from, and with it alone
``sitefit segment`` makes a finished job's mask again, bitwise (same machine), in each mode
that can be reproduced: ``none``, ``cached``, ``adapt`` from the base model, and ``adapt``
from a site version (the site rolled back to the recorded delta, since the job may have
saved a newer one)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch

import sitefit
from sitefit import defaults
from sitefit.cli import main
from sitefit.job_store import MASK, REPORT, JobStore
from sitefit.report import Mode, Report, Reproducibility
from sitefit.settings import Settings
from tests.conftest import PhantomCase
from tests.server.helpers import make_home
from tests.stored_jobs import publish_job
from worker.engine import Engine, SegmentRequest
from worker.job import run_job
from worker.weights import mutable_state


@pytest.fixture
def engine(tmp_path: Path, settings: Settings) -> Engine:
    """The session's models, a private site store and job store: the service's settings."""
    home = make_home(tmp_path, settings.models_dir)
    return Engine(settings.model_copy(update={"home": home}))


def _seed_site(engine: Engine, model: str, site: str, scale: float = 1.02) -> str:
    """Store a real site delta (the base init path, scaled); returns its sha256."""
    spec = engine.store.models.spec(model)
    net = engine.base_net(spec)
    with torch.no_grad():
        for parameter in net.init_path.parameters():
            parameter.mul_(scale)
    delta = {k: v.numpy() for k, v in mutable_state(net).items() if k.startswith("init_path.")}
    saved = engine.store.sites.append(site, spec, delta, scans_refined=1,
                                      self_consistency_before=0.5, self_consistency_after=0.6,
                                      refinement_epochs=1)  # fmt: skip
    return saved.sha256


def _finished_job(engine: Engine, scan: Path, model: str, site: str, mode: Mode) -> str:
    store = JobStore.from_settings(engine.settings)
    store.root.mkdir(parents=True, exist_ok=True)
    job_id = publish_job(store, scan=scan.read_bytes(), scan_file="scan.nii.gz", model=model,
                         site=site, mode=mode)  # fmt: skip
    assert run_job(job_id, store, engine) == "finished"
    return job_id


def _segment_args(report: Report, record: Reproducibility) -> list[str]:
    """The ``sitefit segment`` options that reproduce ``report``'s mask (docs/api.md,
    "Reproducing a result"), from the report alone."""
    args = ["--model", f"{report.model.name}@{report.model.version}", "--mode", report.mode_used]
    if record.site_version is not None:  # cached, or adapt warm-started: the site's weights
        assert report.site is not None
        args += ["--site", report.site]
    return [*args, "--device", record.device.split()[0]]


def _environment(monkeypatch: pytest.MonkeyPatch, home: Path, record: Reproducibility) -> None:
    monkeypatch.setenv("SITEFIT_HOME", str(home))
    for name, value in record.settings.items():
        text = value if isinstance(value, str) else json.dumps(value)
        monkeypatch.setenv(f"SITEFIT_{name.upper()}", text)


def _nifti_bytes(path: Path) -> bytes:
    """The NIfTI file itself, header and voxels (the gzip wrapper holds a time stamp)."""
    return gzip.decompress(path.read_bytes())


def test_the_record_names_inputs_weights_method_and_software(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    seeded = _seed_site(engine, brain_model, "s1")
    scan = shifted_brain_case.image
    result = engine.run(SegmentRequest(scan, brain_model, "s1", "cached"))
    record = result.report.reproducibility
    assert record is not None
    spec = engine.store.models.spec(brain_model)
    assert record.base_sha256 == spec.sha256 == result.report.model.sha256
    assert record.input_sha256 == hashlib.sha256(scan.read_bytes()).hexdigest()
    assert (record.site_version, record.site_delta_sha256) == (1, seeded)
    assert (record.saved_site_version, record.saved_site_delta_sha256) == (None, None)
    assert record.sitefit == sitefit.__version__ and record.torch == torch.__version__
    assert record.device == result.report.device and record.device.startswith("cpu (")
    assert record.numerics == "fp32" and record.deterministic_algorithms is False
    assert record.seeds == {"refinement_shuffle": defaults.SEED}
    assert set(record.settings) <= set(Settings.model_fields)  # each a SITEFIT_ variable
    assert record.settings["refine_max_epochs"] == engine.settings.refine_max_epochs == 3
    config = dataclasses.asdict(engine.refine_config())
    assert record.refinement == {**config, "statistics_path": list(config["statistics_path"])}
    assert record.guard["min_consistency_gain"] == engine.guard_config().min_consistency_gain
    # a stored report reads back equal (infinite thresholds, tuples and all)
    assert Report.model_validate_json(result.report.model_dump_json()) == result.report


def test_an_adapted_job_records_the_version_it_saved(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    _seed_site(engine, brain_model, "s2")
    report = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, "s2", "adapt")).report
    record = report.reproducibility
    assert record is not None and record.site_version == 1
    saved = report.site_weights.saved_version
    assert record.saved_site_version == saved
    if saved is not None:
        version = engine.store.sites.version("s2", brain_model, saved)
        assert record.saved_site_delta_sha256 == version.sha256
    else:
        assert record.saved_site_delta_sha256 is None


@pytest.mark.parametrize(
    ("mode", "seeded"),
    [("none", False), ("cached", True), ("adapt", False), ("adapt", True)],
    ids=["none", "cached", "adapt-from-base", "adapt-from-site"],
)
def test_sitefit_segment_reproduces_a_finished_jobs_mask_bitwise(
    engine: Engine,
    brain_model: str,
    shifted_brain_case: PhantomCase,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: Mode,
    seeded: bool,
) -> None:
    site = "site-r"
    if seeded:
        _seed_site(engine, brain_model, site)
    job_id = _finished_job(engine, shifted_brain_case.image, brain_model, site, mode)
    store = JobStore.from_settings(engine.settings)
    report = Report.model_validate_json(store.path(job_id, REPORT).read_bytes())
    record = report.reproducibility
    assert record is not None and report.mode_used == mode
    if mode == "adapt":
        assert report.refinement.epochs >= 1, "premise: the refinement ran"

    if seeded:  # the site moved on since the job (as a job that saved a version moves it)
        _seed_site(engine, brain_model, site, scale=1.05)

    # the site's weights as the job found them: roll back to the recorded delta when the
    # site's latest is another
    if record.site_version is not None:
        latest = engine.store.sites.latest(site, brain_model)
        assert latest is not None and latest.sha256 != record.site_delta_sha256
        engine.store.sites.rollback(site, brain_model, record.site_version)
    _environment(monkeypatch, engine.settings.home, record)
    scan = store.path(job_id, "scan.nii.gz")  # the job's stored scan: the same bytes
    out, again = tmp_path / "again.nii.gz", tmp_path / "again.json"
    argv = ["segment", str(scan), *_segment_args(report, record), "--out", str(out)]
    assert main([*argv, "--report", str(again), "--quiet"]) == 0

    repeated = Report.model_validate_json(again.read_text())
    assert repeated.reproducibility is not None
    assert repeated.reproducibility.input_sha256 == record.input_sha256
    assert repeated.reproducibility.site_delta_sha256 == record.site_delta_sha256
    assert repeated.mode_used == report.mode_used
    assert repeated.refinement.dice_trace == report.refinement.dice_trace
    assert _nifti_bytes(out) == _nifti_bytes(store.path(job_id, MASK))
