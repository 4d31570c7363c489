"""`sitefit phantoms|train|segment`: outputs, and one-line errors with a non-zero exit."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model_store.base_models import BaseModelRegistry
from sitefit import defaults
from sitefit.cli import main
from sitefit.cli.engine_commands import DEMO_MODEL, DEMO_TARGET_DOMAIN
from sitefit.report import Report
from sitefit.settings import Settings
from tests.conftest import PhantomCase
from tests.server.helpers import make_home


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
