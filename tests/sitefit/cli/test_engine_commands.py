"""`sitefit phantoms|train|segment`: outputs, and one-line errors with a non-zero exit."""

import gzip
import json
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from model_store.base_models import BaseModelRegistry
from sitefit import defaults
from sitefit.cli import main
from sitefit.cli.engine_commands import DEMO_MODEL, DEMO_TARGET_DOMAIN
from sitefit.codes import DEFAULT_CODES
from sitefit.job_store import JOB_FILE_MODE
from sitefit.phantoms.dicom_series import write_dicom_series
from sitefit.report import Report
from sitefit.settings import Settings
from tests.conftest import PhantomCase
from tests.server.helpers import make_home
from tests.sitefit.test_seg import assert_seg_follows_mask


@pytest.fixture
def env_home(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Settings:
    """The CLI reads its configuration from the environment, like in production."""
    monkeypatch.setenv("SITEFIT_HOME", str(settings.home))
    monkeypatch.setenv("SITEFIT_REFINE_MAX_EPOCHS", "2")
    return settings


def test_phantoms_lists_domains(capsys: pytest.CaptureFixture[str], source_domain: str) -> None:
    assert main(["phantoms", "--list-domains"]) == 0
    assert source_domain in capsys.readouterr().out


def test_phantoms_writes_nnunet_layout(tmp_path: Path, source_domain: str) -> None:
    code = main(
        [
            "phantoms",
            "--task",
            "heart",
            "--domain",
            source_domain,
            "--n",
            "2",
            "--seed",
            "4",
            "--fov-mm",
            "32",
            "--out",
            str(tmp_path / "ds"),
        ]
    )
    assert code == 0
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and len(meta["labels"]) == 4
    assert len(list((tmp_path / "ds" / "imagesTr").glob("*_0000.nii.gz"))) == 2


def test_phantoms_writes_dicom_series_that_read_back_as_the_nifti(
    tmp_path: Path, source_domain: str
) -> None:
    from sitefit.dicom import read_series_dir

    out = tmp_path / "ds"
    argv = ["phantoms", "--domain", source_domain, "--n", "1", "--fov-mm", "32", "--out"]
    assert main([*argv, str(out), "--dicom"]) == 0
    (image,) = (out / "imagesTr").glob("*_0000.nii.gz")
    (series,) = (out / "dicom").iterdir()
    assert series.name == image.name.removesuffix("_0000.nii.gz")
    volume = read_series_dir(series, 10**8)
    nifti = nib.load(image)
    np.testing.assert_allclose(volume.affine, nifti.affine, atol=1e-4)
    span = float(np.ptp(nifti.get_fdata()))
    np.testing.assert_allclose(volume.data, nifti.get_fdata(), atol=span / 30000)
    assert source_domain in str(volume.header.ManufacturerModelName)


def test_segment_writes_mask_and_report(
    env_home: Settings,
    brain_model: str,
    shifted_brain_case: PhantomCase,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, report = tmp_path / "mask.nii.gz", tmp_path / "report.json"
    code = main(
        [
            "segment",
            str(shifted_brain_case.image),
            "--model",
            brain_model,
            "--mode",
            "adapt",
            "--out",
            str(out),
            "--reference",
            str(shifted_brain_case.label),
            "--report",
            str(report),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0
    assert nib.load(out).shape == nib.load(shifted_brain_case.image).shape
    payload = json.loads(report.read_text())
    refinement = payload["refinement"]
    assert payload["mode_used"] == "adapt" and refinement["statistics_average"] == "cumulative"
    # the path's points evaluated, the epoch cap (2 here) aside
    assert 1 <= refinement["epochs"] <= len(defaults.REFINE_STATISTICS_PATH)
    printed = capsys.readouterr().out
    assert "self-consistency" in printed and "reference" in printed


def test_segment_prints_each_refinement_step_once(
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    consistent_brain_model: str,
    near_source_brain_case: PhantomCase,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The engine reports the last step once more before it saves the site's version; the
    CLI prints it once."""
    monkeypatch.setenv("SITEFIT_HOME", str(make_home(tmp_path, settings.models_dir)))
    report = tmp_path / "report.json"
    mask = tmp_path / "mask.nii.gz"
    code = main(["segment", str(near_source_brain_case.image), "--model",
                 consistent_brain_model, "--site", "cli", "--mode", "adapt", "--out", str(mask),
                 "--report", str(report), "--device", "cpu"])  # fmt: skip
    assert code == 0
    payload = json.loads(report.read_text())
    assert payload["site_weights"]["saved_version"] == 1, "premise: a version is saved"
    steps = [line for line in capsys.readouterr().err.splitlines() if "refinement step" in line]
    assert len(steps) == payload["refinement"]["epochs"] == len(set(steps)), steps


def _bad_inputs(tmp_path: Path, case: PhantomCase) -> dict[str, tuple[Path, str]]:
    image = nib.load(case.image)
    data = np.asarray(image.dataobj, dtype=np.float32)
    cases: dict[str, tuple[Path, str]] = {}
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(case.image.read_bytes()[:400])
    cases["truncated"] = (truncated, "truncated")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(data[:, :, 0], image.affine), flat)
    cases["2d"] = (flat, "3D")
    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), image.affine), four)
    cases["4d"] = (four, "3D")
    nan = data.copy()
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, image.affine), tmp_path / "nan.nii.gz")
    cases["nan"] = (tmp_path / "nan.nii.gz", "NaN")
    inf = data.copy()
    inf[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(inf, image.affine), tmp_path / "inf.nii.gz")
    cases["inf"] = (tmp_path / "inf.nii.gz", "Inf")
    nib.save(nib.Nifti1Image(np.full_like(data, 3.0), image.affine), tmp_path / "const.nii.gz")
    cases["constant"] = (tmp_path / "const.nii.gz", "every voxel has the value")
    cases["missing"] = (tmp_path / "missing.nii.gz", "not found")
    (tmp_path / "garbage.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 30))
    cases["garbage"] = (tmp_path / "garbage.nii.gz", "NIfTI")
    return cases


@pytest.mark.parametrize(
    "kind", ["truncated", "2d", "4d", "nan", "inf", "constant", "missing", "garbage"]
)
def test_bad_scans_fail_with_one_line(
    kind: str,
    env_home: Settings,
    brain_model: str,
    shifted_brain_case: PhantomCase,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, expected = _bad_inputs(tmp_path, shifted_brain_case)[kind]
    out = tmp_path / "mask.nii.gz"
    code = main(["segment", str(path), "--model", brain_model, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("sitefit: error: "), err
    assert expected.lower() in err[0].lower()
    assert not out.exists()


def test_unknown_model_fails_with_one_line(
    env_home: Settings,
    shifted_brain_case: PhantomCase,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "segment",
            str(shifted_brain_case.image),
            "--model",
            "no-such-model",
            "--out",
            str(tmp_path / "m.nii.gz"),
            "--quiet",
        ]
    )
    assert code == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_real_process_prints_no_traceback(tmp_path: Path, env_home: Settings) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sitefit",
            "segment",
            str(tmp_path / "none.nii.gz"),
            "--model",
            "x",
            "--out",
            str(tmp_path / "m.nii.gz"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("sitefit: error:")


@pytest.mark.parametrize("flag", ["--out", "--report"])
@pytest.mark.parametrize("where", ["missing folder", "a folder"])
def test_unwritable_outputs_are_refused_before_the_run(
    flag: str,
    where: str,
    env_home: Settings,
    brain_model: str,
    shifted_brain_case: PhantomCase,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "nowhere" / "x.nii.gz" if where == "missing folder" else tmp_path
    paths = {"--out": tmp_path / "m.nii.gz", "--report": tmp_path / "r.json", flag: bad}
    argv = ["segment", str(shifted_brain_case.image), "--model", brain_model, "--quiet"]
    code = main([*argv, "--out", str(paths["--out"]), "--report", str(paths["--report"])])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith(f"sitefit: error: {flag} "), err
    assert captured.out == "" and not (tmp_path / "m.nii.gz").exists()  # nothing ran


@pytest.mark.parametrize(
    ("flag", "value"), [("--lr", "-1"), ("--lr", "nan"), ("--base-channels", "0")]
)
def test_train_refuses_impossible_hyper_parameters_in_one_line(
    flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(tmp_path), "--name", "x", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sitefit train: error: argument ") and flag in err[-1], err


def test_demo_adapts_a_shifted_scan_with_the_demo_model(
    tmp_path: Path,
    settings: Settings,
    brain_model: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`make run`'s first step, with the session's tiny model registered as the demo model
    (building it takes minutes: the demo trains only when the store has none)."""
    home = tmp_path / "home"
    source = BaseModelRegistry(settings.models_dir)
    spec = source.spec(brain_model)
    demo = spec.model_copy(update={"name": DEMO_MODEL})
    BaseModelRegistry(home / "models").register_payload(demo, source.payload(spec))
    monkeypatch.setenv("SITEFIT_HOME", str(home))  # the CLI's configuration path
    assert main(["demo", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert f"demo model {DEMO_MODEL} found" in captured.err
    report = Report.model_validate_json((home / "demo" / "report.json").read_bytes())
    assert report.mode_used == "adapt" and report.site == DEMO_TARGET_DOMAIN
    assert report.reference is not None and report.refinement.stopped != "skipped"
    mask = nib.load(home / "demo" / "mask.nii.gz")
    target = next((home / "demo" / "target" / "imagesTr").iterdir())
    assert mask.shape == nib.load(target).shape
    assert "reference (ground truth)" in captured.out and "mask: " in captured.out


# -- DICOM input and the SEG ------------------------------------------------------------------


@pytest.mark.parametrize("form", ["folder", "zip"])
def test_segment_a_dicom_series_and_write_its_seg(
    form: str,
    env_home: Settings,
    brain_model: str,
    shifted_brain_case: PhantomCase,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    series = tmp_path / "series"
    write_dicom_series(nib.load(shifted_brain_case.image), series, order="reversed")
    scan = series
    if form == "zip":
        scan = tmp_path / "series.zip"
        with zipfile.ZipFile(scan, "w") as archive:
            for path in sorted(series.iterdir()):
                archive.write(path, f"study/{path.name}")
    out, seg = tmp_path / "mask.nii.gz", tmp_path / "seg.dcm"
    argv = ["segment", str(scan), "--model", brain_model, "--mode", "adapt", "--quiet"]
    code = main([*argv, "--out", str(out), "--seg", str(seg)])
    printed = capsys.readouterr().out
    assert code == 0 and f"seg: {seg}" in printed
    mask = nib.load(out)
    assert mask.shape == nib.load(shifted_brain_case.image).shape
    assert_seg_follows_mask(seg, series, mask)
    assert pydicom.dcmread(seg).SeriesDescription.startswith(f"sitefit {brain_model}@1 adapt ")
    assert stat.S_IMODE(seg.stat().st_mode) == JOB_FILE_MODE


def test_seg_of_a_nifti_scan_is_refused_before_the_run(
    env_home: Settings,
    brain_model: str,
    shifted_brain_case: PhantomCase,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, seg = tmp_path / "mask.nii.gz", tmp_path / "seg.dcm"
    argv = ["segment", str(shifted_brain_case.image), "--model", brain_model, "--quiet"]
    code = main([*argv, "--out", str(out), "--seg", str(seg)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"sitefit: error: --seg {seg}: a DICOM SEG needs a DICOM series")
    assert captured.out == "" and not out.exists() and not seg.exists()


def test_a_bad_dicom_series_fails_with_one_line(
    env_home: Settings, brain_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    series = tmp_path / "series"
    series.mkdir()
    (series / "0001.dcm").write_bytes(b"not DICOM at all")
    out = tmp_path / "mask.nii.gz"
    code = main(["segment", str(series), "--model", brain_model, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("sitefit: error: "), err
    assert "not a DICOM file" in err[0] and not out.exists()


def test_trained_models_carry_their_class_codes(settings: Settings, heart_model: str) -> None:
    spec = BaseModelRegistry(settings.models_dir).spec(heart_model)
    assert spec.codes == {label: DEFAULT_CODES[name] for label, name in spec.foreground.items()}
    assert spec.require_codes() is spec


def test_train_refuses_a_class_without_a_code_in_one_line(
    tmp_path: Path,
    brain_dataset: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SITEFIT_HOME", str(tmp_path / "home"))
    dataset = tmp_path / "dataset"
    shutil.copytree(brain_dataset, dataset)
    meta = json.loads((dataset / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "lesion": 1}
    meta.pop("codes")
    (dataset / "dataset.json").write_text(json.dumps(meta))
    code = main(["train", str(dataset), "--name", "no-codes", "--epochs", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"sitefit: error: {dataset / 'dataset.json'}: class 'lesion' has no")
    assert '"codes": {"lesion": {"scheme": "SCT"' in err[0]
    assert BaseModelRegistry(tmp_path / "home" / "models").versions("no-codes") == []


def test_segment_writes_a_preview(
    env_home: Settings,
    brain_model: str,
    shifted_brain_case: PhantomCase,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from PIL import Image

    from worker.preview import MAX_BYTES

    out, preview = tmp_path / "mask.nii.gz", tmp_path / "preview.png"
    argv = ["segment", str(shifted_brain_case.image), "--model", brain_model, "--mode", "adapt"]
    assert main([*argv, "--out", str(out), "--preview", str(preview), "--quiet"]) == 0
    assert f"preview: {preview}" in capsys.readouterr().out
    assert 0 < preview.stat().st_size <= MAX_BYTES
    with Image.open(preview) as image:
        image.load()
        assert image.format == "PNG" and image.width > 100 and image.height > 100


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("preview.jpg", "the preview is written as .png"),
        ("nowhere/preview.png", "does not exist"),
        (".", "is a folder"),
    ],
)
def test_an_unwritable_preview_is_refused_before_the_run(
    name: str,
    message: str,
    env_home: Settings,
    brain_model: str,
    shifted_brain_case: PhantomCase,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "m.nii.gz"
    argv = ["segment", str(shifted_brain_case.image), "--model", brain_model, "--quiet"]
    code = main([*argv, "--out", str(out), "--preview", str(tmp_path / name)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("sitefit: error: --preview "), err
    assert message in err[0] and not out.exists()  # nothing ran
