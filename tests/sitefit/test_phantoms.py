"""Scanner phantoms: determinism, geometry, labels, domains and the nnU-Net writer."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sitefit.exceptions import InvalidInputError
from sitefit.phantoms import (
    CLASS_NAMES,
    DOMAINS,
    TASKS,
    Phantom,
    case_name,
    list_domains,
    make_subject,
    subject_seed,
    write_dataset,
)
from sitefit.phantoms.subject import field_of_view

FOV = 32.0  # small and fast; the subject scales with the field of view


def _same(a: Phantom, b: Phantom) -> bool:
    return (
        a.image.tobytes() == b.image.tobytes()
        and a.label.tobytes() == b.label.tobytes()
        and np.array_equal(a.affine, b.affine)
    )


def test_tasks_and_domain_roles() -> None:
    assert TASKS == ("brain", "heart", "tissue")
    roles = [d.role for d in DOMAINS.values()]
    assert roles[0] == "source" and roles.count("source") == 1
    assert roles.count("near-source") >= 1 and roles.count("shifted") >= 3
    assert any(d.axcodes != "RAS" for d in DOMAINS.values())
    assert all(name == d.name for name, d in DOMAINS.items())


def test_list_domains_names_every_domain_and_parameter() -> None:
    text = list_domains()
    for d in DOMAINS.values():
        assert d.name in text and d.description in text and d.axcodes in text
    for word in ("source", "near-source", "shifted", "gamma", "bias", "rician", "wm", "blood"):
        assert word in text


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_bytes_other_seed_differs(task: str) -> None:
    a = make_subject(task, "b3t", 5, FOV)
    assert _same(a, make_subject(task, "b3t", 5, FOV))
    other = make_subject(task, "b3t", 6, FOV)
    assert a.image.tobytes() != other.image.tobytes()
    assert a.label.tobytes() != other.label.tobytes()


@pytest.mark.parametrize("domain", list(DOMAINS))
@pytest.mark.parametrize("task", TASKS)
def test_every_task_and_domain(task: str, domain: str) -> None:
    scanner = DOMAINS[domain]
    p = make_subject(task, domain, 1, FOV)
    assert p.image.dtype == np.float32 and p.label.dtype == np.uint8
    assert p.image.ndim == 3 and p.image.shape == p.label.shape
    assert np.isfinite(p.image).all() and p.image.std() > 0
    assert p.class_names == CLASS_NAMES[task]
    assert set(np.unique(p.label)) == set(CLASS_NAMES[task])  # every class present
    assert p.affine.shape == (4, 4) and np.array_equal(p.affine[3], [0, 0, 0, 1])
    np.testing.assert_allclose(p.spacing, scanner.spacing_mm, rtol=1e-9)
    assert "".join(nib.aff2axcodes(p.affine)) == scanner.axcodes
    # The field of view is centred on the world origin and spans about FOV mm per axis.
    extent = np.abs(p.affine[:3, :3]) @ np.asarray(p.image.shape, float)
    z_extent = 1.0 if task != "heart" else 0.625
    np.testing.assert_allclose(sorted(extent), sorted([FOV, FOV, FOV * z_extent]), atol=1.5)
    centre = p.affine @ np.append((np.asarray(p.image.shape) - 1) / 2, 1.0)
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


def _world_stats(p: Phantom, label: int) -> tuple[float, np.ndarray]:
    """Volume (mm3) and centroid (world mm) of one label."""
    idx = np.argwhere(p.label == label).astype(float)
    world = idx @ p.affine[:3, :3].T + p.affine[:3, 3]
    return len(idx) * float(np.prod(p.spacing)), world.mean(axis=0)


@pytest.mark.parametrize(("task", "label"), [("brain", 1), ("heart", 2)])
def test_anatomy_agrees_in_world_space_across_domains(task: str, label: int) -> None:
    """Same seed = same subject: each domain's affine puts it at the same place and size."""
    stats = [_world_stats(make_subject(task, d, 2, 48.0), label) for d in DOMAINS]
    volumes = np.array([v for v, _ in stats])
    centroids = np.array([c for _, c in stats])
    assert volumes.max() / volumes.min() < 1.15
    assert np.abs(centroids - centroids[0]).max() < 1.0


def test_brain_and_tissue_share_the_scan_and_labels_nest() -> None:
    brain = make_subject("brain", "a15t", 3, FOV)
    tissue = make_subject("tissue", "a15t", 3, FOV)
    assert brain.image.tobytes() == tissue.image.tobytes()
    assert np.all(brain.label[tissue.label > 0] == 1)
    assert np.count_nonzero(tissue.label) < np.count_nonzero(brain.label)


def test_tissue_classes_are_ordered_by_intensity_on_the_source() -> None:
    p = make_subject("tissue", "a3t", 4, 64.0)
    grey, white = (np.median(p.image[p.label == c]) for c in (1, 2))
    assert grey < white


def _appearance(task: str, domain: str) -> np.ndarray:
    """Per-class median and spread of the min-max normalised image (what a U-Net sees)."""
    p = make_subject(task, domain, 0, 48.0)
    img = (p.image - p.image.min()) / (p.image.max() - p.image.min())
    out = []
    for c in sorted(CLASS_NAMES[task]):
        values = img[p.label == c]
        out += [np.median(values), np.subtract(*np.percentile(values, [75, 25]))]
    return np.asarray(out)


@pytest.mark.parametrize("task", ["tissue", "heart"])
def test_domains_differ_in_intensity_statistics(task: str) -> None:
    looks = {d: _appearance(task, d) for d in DOMAINS}
    for a, b in combinations(DOMAINS, 2):
        assert np.abs(looks[a] - looks[b]).max() > 0.02, (a, b)
    raw = {d: make_subject(task, d, 0, FOV).image for d in DOMAINS}
    for a, b in combinations(DOMAINS, 2):
        assert not np.isclose(raw[a].mean(), raw[b].mean(), rtol=0.05), (a, b)


def test_unknown_names_and_bad_arguments_raise() -> None:
    with pytest.raises(InvalidInputError, match="brain, heart, tissue"):
        make_subject("lung", "a3t", 0, FOV)
    with pytest.raises(InvalidInputError, match=", ".join(DOMAINS)):
        make_subject("brain", "z9t", 0, FOV)
    with pytest.raises(InvalidInputError, match="valid"):
        write_dataset("heart", "nope", 1, 0, Path("unused"))
    for bad_seed in (-1, 1.5, True):
        with pytest.raises(InvalidInputError, match="seed"):
            make_subject("brain", "a3t", bad_seed, FOV)  # type: ignore[arg-type]
    for bad_fov in (0.0, -5.0, float("nan"), 1e4):
        with pytest.raises(InvalidInputError, match="fov_mm"):
            make_subject("brain", "a3t", 0, bad_fov)
    for bad_n in (0, 10_001, 10**20):  # 10**20 once built every case name, then ran out of RAM
        with pytest.raises(InvalidInputError, match="n must be an integer from 1 to 10,000"):
            write_dataset("brain", "a3t", bad_n, 0, Path("unused"))


def test_write_dataset_layout_and_contents(tmp_path: Path) -> None:
    out = write_dataset("heart", "c15t", 2, 9, tmp_path / "ds", fov_mm=FOV)
    assert out == tmp_path / "ds"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MR"}
    assert meta["labels"] == {"background": 0, "lv_cavity": 1, "lv_myocardium": 2, "rv_cavity": 3}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    block = meta["sitefit"]
    assert (block["task"], block["domain"], block["seed"]) == ("heart", "c15t", 9)
    for i in range(2):
        case = case_name("heart", "c15t", 9, i)
        assert case == f"heart_c15t_9_{i:03d}"
        assert block["subject_seeds"][case] == subject_seed(9, i)
        image = nib.load(out / "imagesTr" / f"{case}_0000.nii.gz")
        label = nib.load(out / "labelsTr" / f"{case}.nii.gz")
        expected = make_subject("heart", "c15t", subject_seed(9, i), FOV)
        np.testing.assert_array_equal(np.asarray(image.dataobj), expected.image)
        np.testing.assert_array_equal(np.asarray(label.dataobj), expected.label)
        np.testing.assert_allclose(image.affine, expected.affine, atol=1e-5)
        np.testing.assert_allclose(label.affine, expected.affine, atol=1e-5)
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        assert nib.aff2axcodes(image.affine) == ("P", "I", "R")
    names = sorted(p.name for p in out.rglob("*"))
    assert not [n for n in names if n.endswith(".tmp")]
    assert len(names) == 2 + 2 + 2 + 1  # two folders, four volumes, dataset.json


def test_smaller_dataset_is_a_byte_identical_prefix(tmp_path: Path) -> None:
    small = write_dataset("brain", "d3t", 2, 4, tmp_path / "small", fov_mm=FOV)
    large = write_dataset("brain", "d3t", 3, 4, tmp_path / "large", fov_mm=FOV)
    for folder in ("imagesTr", "labelsTr"):
        files = sorted(p.name for p in (small / folder).iterdir())
        assert len(files) == 2 and len(list((large / folder).iterdir())) == 3
        for name in files:
            assert (small / folder / name).read_bytes() == (large / folder / name).read_bytes()
    # Regenerating into the same folder is allowed and reproduces the files.
    before = (small / "labelsTr" / f"{case_name('brain', 'd3t', 4, 1)}.nii.gz").read_bytes()
    write_dataset("brain", "d3t", 2, 4, small, fov_mm=FOV)
    after = (small / "labelsTr" / f"{case_name('brain', 'd3t', 4, 1)}.nii.gz").read_bytes()
    assert before == after


def test_folder_of_another_dataset_is_refused(tmp_path: Path) -> None:
    write_dataset("tissue", "a3t", 1, 0, tmp_path, fov_mm=FOV)
    with pytest.raises(InvalidInputError, match="another dataset"):
        write_dataset("brain", "a3t", 1, 0, tmp_path, fov_mm=FOV)


def test_an_interrupted_rewrite_leaves_no_manifest_over_a_mix(tmp_path: Path) -> None:
    """Rewriting a folder with another field of view stops half-way (here: a case's file
    name is taken by a folder): no dataset.json may then describe the mix of old and new
    cases as one dataset (sitefit train refuses a folder without one)."""
    write_dataset("brain", "a3t", 2, 0, tmp_path, fov_mm=FOV)
    blocked = tmp_path / "labelsTr" / f"{case_name('brain', 'a3t', 0, 1)}.nii.gz"
    blocked.unlink()
    blocked.mkdir()
    with pytest.raises(OSError):
        write_dataset("brain", "a3t", 2, 0, tmp_path, fov_mm=FOV + 8)
    assert not (tmp_path / "dataset.json").exists()
    blocked.rmdir()
    write_dataset("brain", "a3t", 2, 0, tmp_path, fov_mm=FOV + 8)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["sitefit"]["fov_mm"] == list(field_of_view("brain", FOV + 8))


def test_an_interrupted_rerun_with_the_same_arguments_keeps_the_manifest(
    tmp_path: Path,
) -> None:
    """The same arguments rewrite identical cases: the manifest stays true throughout."""
    write_dataset("brain", "a3t", 2, 0, tmp_path, fov_mm=FOV)
    manifest = (tmp_path / "dataset.json").read_bytes()
    blocked = tmp_path / "labelsTr" / f"{case_name('brain', 'a3t', 0, 1)}.nii.gz"
    blocked.unlink()
    blocked.mkdir()
    with pytest.raises(OSError):
        write_dataset("brain", "a3t", 2, 0, tmp_path, fov_mm=FOV)
    assert (tmp_path / "dataset.json").read_bytes() == manifest


def test_crash_leaves_no_half_written_files(tmp_path: Path) -> None:
    """The second case's image cannot be renamed into place (a folder holds its name): the
    run stops there, and no temporary or partial file is left behind."""
    blocked = tmp_path / "imagesTr" / f"{case_name('brain', 'a3t', 0, 1)}_0000.nii.gz"
    blocked.mkdir(parents=True)
    with pytest.raises(OSError):
        write_dataset("brain", "a3t", 3, 0, tmp_path, fov_mm=FOV)
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert names == [
        f"imagesTr/{case_name('brain', 'a3t', 0, 0)}_0000.nii.gz",
        f"labelsTr/{case_name('brain', 'a3t', 0, 0)}.nii.gz",
    ]
