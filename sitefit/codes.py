"""Coded concepts for segmentation classes: what a DICOM SEG says each segment is.

A model's spec carries one :class:`Code` per foreground class (``ModelSpec.codes``): the
segmented property type (a SNOMED CT concept such as Brain, SCT 12738006) and, optionally,
its category (Anatomical Structure unless told otherwise). :data:`DEFAULT_CODES` holds the
codes of the class names sitefit's phantom tasks use; ``sitefit train`` takes a class's code
from the dataset's ``dataset.json`` (``"codes"``, keyed by class name) or from this table, and
refuses a class with neither. :func:`code_for` is what a SEG falls back on for a spec stored
before codes existed: the table by class name, else :data:`GENERIC` (the class name is the
segment's label either way).

The concepts were checked against pydicom's code dictionary (``pydicom.sr.codedict``): e.g.
the left ventricle's myocardium is SCT 49848007; there is no plain "Myocardium" entry there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sitefit.exceptions import DatasetError

# DICOM value representations of a code: SH (16) for the scheme designator, LO (64) for the
# meaning; values longer than 16 characters go to LongCodeValue (UC), which highdicom handles
_NO_BACKSLASH = r"^[^\\\x00-\x1f]+$"


class Concept(BaseModel):
    """A coded concept: coding scheme designator, code value and code meaning."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: str = Field(
        min_length=1, max_length=16, pattern=_NO_BACKSLASH, description="e.g. SCT (SNOMED CT)"
    )
    value: str = Field(
        min_length=1, max_length=64, pattern=_NO_BACKSLASH, description="e.g. 12738006"
    )
    meaning: str = Field(
        min_length=1, max_length=64, pattern=_NO_BACKSLASH, description="e.g. Brain"
    )

    def __str__(self) -> str:
        return f"{self.scheme} {self.value} {self.meaning!r}"


class Code(Concept):
    """A class's segmented property type, and the category it belongs to."""

    category: Concept | None = Field(
        default=None, description="segmented property category; default: Anatomical Structure"
    )

    @property
    def property_category(self) -> Concept:
        return self.category or ANATOMICAL_STRUCTURE


ANATOMICAL_STRUCTURE = Concept(scheme="SCT", value="91723000", meaning="Anatomical Structure")
TISSUE = Concept(scheme="SCT", value="85756007", meaning="Tissue")

GENERIC = Code(scheme="SCT", value="85756007", meaning="Tissue", category=TISSUE)
"""The concept of a class nothing else describes (as 3D Slicer's generic segment)."""

DEFAULT_CODES: dict[str, Code] = {
    "brain": Code(scheme="SCT", value="12738006", meaning="Brain"),
    "lv_cavity": Code(scheme="SCT", value="87878005", meaning="Left ventricle"),
    "lv_myocardium": Code(scheme="SCT", value="49848007", meaning="Left ventricle myocardium"),
    "rv_cavity": Code(scheme="SCT", value="53085002", meaning="Right ventricle"),
    "grey_matter": Code(scheme="SCT", value="389081007", meaning="Gray matter"),
    "white_matter": Code(scheme="SCT", value="389080008", meaning="White matter"),
    "heart": Code(scheme="SCT", value="80891009", meaning="Heart"),
}
"""Codes by class name: the phantom tasks' classes (``sitefit.phantoms.subject.CLASS_NAMES``)."""


def code_for(name: str, codes: Mapping[int, Code], label: int) -> Code:
    """The code of class ``label`` named ``name``: the spec's, the table's, or GENERIC."""
    return codes.get(label) or DEFAULT_CODES.get(name) or GENERIC


def missing_code(classes: Mapping[int, str], codes: Mapping[int, Code]) -> str | None:
    """A one-line reason when a foreground class of ``classes`` has no code, else ``None``."""
    for label, name in sorted(classes.items()):
        if label != 0 and label not in codes:
            return f"class {name!r} (label {label}) has no code"
    return None


def codes_from_dataset(
    meta: Mapping[str, Any], classes: Mapping[int, str], where: str
) -> dict[int, Code]:
    """The codes of a dataset's foreground ``classes``, by label value.

    ``meta`` is the parsed ``dataset.json`` (at ``where``, for messages); its optional
    ``"codes"`` object maps class names to ``{"scheme", "value", "meaning"}`` (and, optionally,
    ``"category"``). A class it leaves out takes :data:`DEFAULT_CODES`'s code; a class with
    neither, or a malformed entry, is a :class:`DatasetError` naming the class.
    """
    given = meta.get("codes", {})
    if not isinstance(given, dict):
        raise DatasetError(f"{where}: 'codes' must map class names to codes")
    names = {name for label, name in classes.items() if label != 0}
    unknown = sorted(set(given) - names)
    if unknown:
        raise DatasetError(
            f"{where}: 'codes' names {unknown[0]!r}, which is not a foreground class of 'labels'"
        )
    codes: dict[int, Code] = {}
    for label, name in sorted(classes.items()):
        if label == 0:
            continue
        if name in given:
            try:
                codes[label] = Code.model_validate(given[name])
            except ValidationError as error:
                problem = error.errors()[0]
                field = ".".join(str(part) for part in problem["loc"]) or "code"
                raise DatasetError(
                    f"{where}: the code of class {name!r} is invalid ({field}: {problem['msg']})"
                ) from None
        elif name in DEFAULT_CODES:
            codes[label] = DEFAULT_CODES[name]
        else:
            raise DatasetError(
                f'{where}: class {name!r} has no code: add "codes": {{{json.dumps(name)}: '
                '{"scheme": "SCT", "value": ..., "meaning": ...}} (a SNOMED CT concept)'
            )
    return codes


__all__ = [
    "ANATOMICAL_STRUCTURE",
    "DEFAULT_CODES",
    "GENERIC",
    "TISSUE",
    "Code",
    "Concept",
    "code_for",
    "codes_from_dataset",
    "missing_code",
]
