"""Scanner phantoms: seeded synthetic 3D MR-like datasets for tests, demos and the benchmark.

Three tasks (``TASKS``): ``brain`` (brain extraction in a head), ``heart`` (LV cavity, LV
myocardium, RV cavity in a chest) and ``tissue`` (grey vs white matter in the same heads as
``brain``). Anatomy is defined in millimetres and drawn from the seed; scanner domains
(``DOMAINS``, source first) change only appearance and voxel grid. numpy and scipy only.

>>> phantom = make_subject("brain", "a3t", seed=0, fov_mm=40)
>>> write_dataset("heart", "b3t", n=5, seed=1, out=Path("data/heart_b3t"))  # doctest: +SKIP
"""

from sitefit.phantoms.dataset import case_name, subject_seed, write_dataset
from sitefit.phantoms.domains import DOMAINS, ScannerDomain, get_domain, list_domains
from sitefit.phantoms.subject import (
    CLASS_NAMES,
    DEFAULT_FOV_MM,
    TASKS,
    Phantom,
    field_of_view,
    make_subject,
)

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_FOV_MM",
    "DOMAINS",
    "TASKS",
    "Phantom",
    "ScannerDomain",
    "case_name",
    "field_of_view",
    "get_domain",
    "list_domains",
    "make_subject",
    "subject_seed",
    "write_dataset",
]
