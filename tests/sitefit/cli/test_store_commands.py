"""`sitefit models ...` and `sitefit sites ...` against a store in a temporary home."""

from __future__ import annotations

import json
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_store import ModelStore
from model_store.spec import Architecture, ModelSpec, TrainingInfo, Validation
from sitefit.cli import main
from sitefit.settings import Settings

STATS: dict[str, Any] = {
    "scans_refined": 1,
    "self_consistency_before": 0.7,
    "self_consistency_after": 0.8,
    "refinement_epochs": 3,
}


def tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"init_path.conv.weight": rng.normal(size=(16, 1, 3, 3)).astype(np.float32)}


@pytest.fixture
def store_home(tmp_path: Path) -> Path:
    spec = ModelSpec(
        name="brain",
        version=1,
        created=datetime(2026, 1, 2, tzinfo=UTC),
        sitefit_version="0.1.0",
        classes={0: "background", 1: "brain"},
        architecture=Architecture(num_outputs=1, base_channels=16, levels=3, res_blocks=3),
        slice_axis=2,
        training=TrainingInfo(
            dataset_name="phantoms",
            dataset_fingerprint="0" * 64,
            train_cases=["a"],
            validation_cases=["b"],
            epochs=1,
            head_epochs=1,
            learning_rate=1e-3,
            batch_size=4,
            seed=0,
            seconds=1.0,
        ),
        validation=Validation(dice_final=0.9, dice_early=0.8),
        sha256="",
    )
    home = tmp_path / "home"
    ModelStore(home).models.register(spec, tensors(0))
    return home


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_models_list_show(store_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models", "list", "--home", str(store_home))
    assert code == 0 and "brain" in out and "latest 1" in out
    code, out, _ = run(capsys, "models", "list", "--home", str(store_home), "--json")
    assert json.loads(out)[0]["versions"] == [1]
    code, out, _ = run(capsys, "models", "show", "brain@1", "--home", str(store_home))
    assert code == 0 and "brain@1" in out and "sha256" in out
    code, out, _ = run(capsys, "models", "show", "brain", "--home", str(store_home), "--json")
    assert json.loads(out)["name"] == "brain"


def test_home_comes_from_the_environment(
    store_home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SITEFIT_HOME", str(store_home))
    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and "brain" in out


def test_models_export_import(
    settings: Settings, brain_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive, home = tmp_path / "brain.tar", str(settings.home)
    code, out, _ = run(capsys, "models", "export", brain_model, str(archive), "--home", home)
    assert code == 0 and archive.is_file() and f"exported {brain_model}@1" in out
    code, _, err = run(capsys, "models", "export", brain_model, str(archive), "--home", home)
    assert code == 1 and "exists" in err
    other = str(tmp_path / "other-home")
    code, out, _ = run(capsys, "models", "import", str(archive), "--home", other, "--json")
    assert code == 0 and json.loads(out)["version"] == 1


def test_models_import_refuses_weights_that_do_not_make_the_network(
    store_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``store_home``'s model holds one made-up tensor: importing it would make ``latest``
    a model that no job can load."""
    archive = tmp_path / "brain.tar"
    assert run(capsys, "models", "export", "brain", str(archive), "--home", str(store_home))[0] == 0
    code, out, err = run(capsys, "models", "import", str(archive), "--home", str(store_home))
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("sitefit: error: model brain: weights do not fit the architecture")
    assert ModelStore(store_home).models.versions("brain") == [1]


def test_unknown_model_is_a_one_line_error(
    store_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "models", "show", "heart", "--home", str(store_home))
    assert code == 1 and out == ""
    assert err.startswith("sitefit: error: unknown model 'heart'") and err.count("\n") == 1


def test_sites_commands(store_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ModelStore(store_home)
    code, out, _ = run(capsys, "sites", "list", "--home", str(store_home))
    assert code == 0 and "no sites" in out
    base = store.models.spec("brain")
    store.sites.save("site-a", base, tensors(1), expected_version=None, **STATS)
    store.sites.save("site-a", base, tensors(2), expected_version=1, **STATS)

    code, out, _ = run(capsys, "sites", "list", "--home", str(store_home), "--json")
    assert json.loads(out) == {"site-a": {"brain": 2}}
    code, out, _ = run(capsys, "sites", "show", "site-a", "--home", str(store_home))
    assert code == 0 and "2 version(s)" in out and "0.700 -> 0.800" in out
    code, out, _ = run(capsys, "sites", "history", "site-a", "--home", str(store_home), "--json")
    assert [v["version"] for v in json.loads(out)] == [1, 2]

    args = ["sites", "rollback", "site-a", "--model", "brain", "--version", "1"]
    code, out, _ = run(capsys, *args, "--home", str(store_home))
    assert code == 0 and "version 3 now holds the weights of version 1" in out
    restored = store.sites.load("site-a", 3, base)
    assert (
        restored["init_path.conv.weight"].tobytes() == tensors(1)["init_path.conv.weight"].tobytes()
    )

    code, out, _ = run(
        capsys, "sites", "history", "site-a", "--model", "brain", "--home", str(store_home)
    )
    assert code == 0 and len(out.splitlines()) == 3 and "rollback of 1" in out


def test_an_unreadable_version_is_named_and_hides_no_other(
    store_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ModelStore(store_home)
    base = store.models.spec("brain")
    for seed in (1, 2, 3):
        store.sites.append("site-a", base, tensors(seed), **STATS)
    (store_home / "sites" / "site-a" / "brain" / "1" / "meta.json").write_text("{")
    home = ("--home", str(store_home))
    code, out, err = run(capsys, "sites", "history", "site-a", *home, "--json")
    assert code == 0 and [v["version"] for v in json.loads(out)] == [2, 3]
    assert err.startswith("sitefit: warning: site 'site-a' model 'brain' version 1: meta.json")
    code, out, _ = run(capsys, "sites", "show", "site-a", *home)
    assert code == 0 and "3 version(s)" in out and "version      3" in out
    (store_home / "sites" / "site-a" / "brain" / "3" / "meta.json").write_text("{")
    code, out, err = run(capsys, "sites", "show", "site-a", *home)  # the newest readable
    assert code == 0 and "3 version(s)" in out and "version      2" in out
    assert "version 3: meta.json" in err
    (store_home / "models" / "brain" / "1" / "spec.json").write_text("{")
    code, out, err = run(capsys, "models", "list", *home)
    assert code == 0 and "no base models" in out and "brain@1: unreadable spec" in err


def test_sites_delete_needs_confirmation(
    store_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ModelStore(store_home)
    store.sites.save(
        "site-a", store.models.spec("brain"), tensors(1), expected_version=None, **STATS
    )
    code, _, err = run(capsys, "sites", "delete", "site-a", "--home", str(store_home))
    assert code == 1 and "without --yes" in err
    assert store.sites.sites() == ["site-a"]
    code, out, _ = run(capsys, "sites", "delete", "site-a", "--yes", "--home", str(store_home))
    assert code == 0 and "deleted site 'site-a'" in out
    assert store.sites.sites() == []
    code, _, err = run(capsys, "sites", "show", "site-a", "--home", str(store_home))
    assert code == 1 and "no adapted weights" in err
    code, _, err = run(capsys, "sites", "history", "../x", "--home", str(store_home))
    assert code == 1 and "invalid site name" in err


def test_rollback_to_weights_of_an_older_base_model_warns(
    store_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ModelStore(store_home)
    old = store.models.spec("brain")
    store.sites.save("site-b", old, tensors(1), expected_version=None, **STATS)
    store.models.register(old, tensors(5))  # brain@2: a retrained base model
    args = ["sites", "rollback", "site-b", "--model", "brain", "--version", "1"]
    code, out, err = run(capsys, *args, "--home", str(store_home))
    assert code == 0 and "version 2 now holds the weights of version 1" in out
    assert err.startswith("sitefit: warning: these weights were adapted from brain@1")
    assert "not the latest brain@2" in err and len(err.strip().splitlines()) == 1


def test_models_import_requires_class_codes(
    settings: Settings, brain_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An export whose spec names no concept for a class is refused (a spec written before
    codes existed, say): every new model's DICOM SEG must say what each segment is."""
    archive, home = tmp_path / "brain.tar", str(settings.home)
    assert run(capsys, "models", "export", brain_model, str(archive), "--home", home)[0] == 0
    export = tmp_path / "export"
    with tarfile.open(archive) as tar:
        tar.extractall(export, filter="data")
    spec = json.loads((export / "spec.json").read_text())
    assert spec["codes"] == {"1": {"scheme": "SCT", "value": "12738006", "meaning": "Brain",
                                   "category": None}}  # fmt: skip
    other = tmp_path / "other-home"
    code, out, _ = run(capsys, "models", "import", str(export), "--home", str(other), "--json")
    assert code == 0 and json.loads(out)["codes"] == spec["codes"]

    del spec["codes"]
    (export / "spec.json").write_text(json.dumps(spec))
    code, out, err = run(capsys, "models", "import", str(export), "--home", str(other))
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(
        f"sitefit: error: model {brain_model}: class 'brain' (label 1) has no code: add its "
        "SNOMED CT concept"
    )
    assert ModelStore(other).models.versions(brain_model) == [1]


def test_models_stored_without_codes_still_show(
    store_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "models", "show", "brain", "--home", str(store_home), "--json")
    assert code == 0 and json.loads(out)["codes"] == {}
