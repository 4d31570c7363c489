"""Write phantom subjects as an nnU-Net v2 raw dataset.

Layout: ``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz`` and ``dataset.json`` (which
also names each class's coded concept under ``"codes"``, see :mod:`sitefit.codes`). Subject
``i`` uses a seed derived from ``(seed, i)`` alone, so a dataset of ``n`` cases is a prefix of
one with more. Every file is written to a temporary name in its folder and renamed into place,
so a crash never leaves a half-written file under a final name; ``dataset.json`` comes last,
and a run that will change the cases of a folder removes its ``dataset.json`` first, so an
interrupted run never leaves a mix of old and new cases under a manifest.
Files are byte-for-byte reproducible (the gzip header carries no timestamp).
"""

from __future__ import annotations

import gzip
import json
import numbers
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import numpy.typing as npt

from sitefit.codes import DEFAULT_CODES
from sitefit.durable import fsync_dir, write_atomic
from sitefit.exceptions import InvalidInputError
from sitefit.phantoms.domains import get_domain
from sitefit.phantoms.subject import (
    CLASS_NAMES,
    check_fov,
    check_seed,
    check_task,
    field_of_view,
    make_subject,
)

# nibabel is only partly annotated: its calls go through this Any-typed handle.
nib: Any = nibabel

GENERATOR = "sitefit.phantoms/1"
FILE_ENDING = ".nii.gz"


def subject_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` in a dataset generated with ``seed``."""
    state = np.random.SeedSequence([check_seed(seed), index]).generate_state(1, dtype=np.uint32)
    return int(state[0])


MAX_SUBJECTS = 10_000  # per dataset: a typo must not fill the disk (or the memory)


def case_name(task: str, domain: str, seed: int, index: int) -> str:
    """nnU-Net case identifier of case ``index``."""
    return f"{task}_{domain}_{seed}_{index:03d}"


def nifti_bytes(data: npt.NDArray[Any], affine: npt.NDArray[np.float64]) -> bytes:
    """A gzipped NIfTI-1 file with ``affine`` as both qform and sform (mm units)."""
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _check_target(out: Path, expected: dict[str, set[str]]) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"output path {out} exists and is not a directory")
    for folder, names in expected.items():
        path = out / folder
        if not path.is_dir():
            continue
        foreign = sorted(
            p.name for p in path.iterdir() if p.name.endswith(FILE_ENDING) and p.name not in names
        )
        if foreign:
            shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            raise InvalidInputError(
                f"{path} already holds cases of another dataset ({shown}); use an empty folder"
            )


def write_dataset(
    task: str, domain: str, n: int, seed: int, out: Path, fov_mm: float | None = None
) -> Path:
    """Generate ``n`` subjects of ``task`` scanned by ``domain`` into ``out``; returns ``out``.

    Case ``i`` is named ``f"{task}_{domain}_{seed}_{i:03d}"`` and generated from
    :func:`subject_seed` ``(seed, i)``. Re-running with the same arguments rewrites identical
    files; a folder holding cases of another dataset is refused with ``InvalidInputError``.
    """
    check_task(task)
    scanner = get_domain(domain)
    seed = check_seed(seed)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_SUBJECTS:
        raise InvalidInputError(f"n must be an integer from 1 to {MAX_SUBJECTS:,}, got {n!r}")
    n = int(n)
    fov = check_fov(fov_mm)
    out = Path(out)
    cases = [case_name(task, scanner.name, seed, i) for i in range(n)]
    _check_target(out, {"imagesTr": {f"{c}_0000{FILE_ENDING}" for c in cases},
                        "labelsTr": {f"{c}{FILE_ENDING}" for c in cases}})  # fmt: skip
    seeds = {case: subject_seed(seed, i) for i, case in enumerate(cases)}
    meta = {
        "name": f"sitefit_{task}_{scanner.name}_{seed}",
        "description": f"sitefit phantom, task {task}, scanner domain {scanner.name} "
        f"({scanner.role}): {scanner.description}",
        "channel_names": {"0": "MR"},
        "labels": {name: value for value, name in sorted(CLASS_NAMES[task].items())},
        # each class's coded concept, which a trained model's DICOM SEG names it by
        "codes": {
            name: DEFAULT_CODES[name].model_dump(exclude_none=True)
            for value, name in sorted(CLASS_NAMES[task].items())
            if value != 0
        },
        "numTraining": n,
        "file_ending": FILE_ENDING,
        "sitefit": {
            "generator": GENERATOR,
            "task": task,
            "domain": scanner.name,
            "role": scanner.role,
            "seed": seed,
            "fov_mm": list(field_of_view(task, fov)),
            "spacing_mm": list(scanner.spacing_mm),
            "axcodes": scanner.axcodes,
            "subject_seeds": seeds,
        },
    }
    manifest, manifest_bytes = out / "dataset.json", (json.dumps(meta, indent=2) + "\n").encode()
    if manifest.is_file() and manifest.read_bytes() != manifest_bytes:
        # the cases are about to change (another field of view, say): until they all have,
        # no manifest may describe the folder, or an interrupted run would leave a mix that
        # looks complete
        manifest.unlink(missing_ok=True)
        fsync_dir(out)  # the removal, too, must outlive a power cut
    images, labels = out / "imagesTr", out / "labelsTr"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for case, subject in seeds.items():
        phantom = make_subject(task, scanner.name, subject, fov)
        write_atomic(
            images / f"{case}_0000{FILE_ENDING}", nifti_bytes(phantom.image, phantom.affine)
        )
        write_atomic(labels / f"{case}{FILE_ENDING}", nifti_bytes(phantom.label, phantom.affine))
    write_atomic(manifest, manifest_bytes)
    return out
