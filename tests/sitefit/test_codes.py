"""Class codes: the defaults are real concepts, datasets give or inherit codes, bad ones are
refused naming the class."""

from __future__ import annotations

import pydicom.sr._concepts_dict as concept_dictionary
import pytest
from pydantic import ValidationError

from sitefit.codes import (
    ANATOMICAL_STRUCTURE,
    DEFAULT_CODES,
    GENERIC,
    TISSUE,
    Code,
    code_for,
    codes_from_dataset,
    missing_code,
)
from sitefit.exceptions import DatasetError
from sitefit.phantoms.subject import CLASS_NAMES

BRAIN = {0: "background", 1: "brain"}


def _meanings(scheme: str, value: str) -> set[str]:
    """The meanings pydicom's code dictionary gives ``value`` in ``scheme`` (lower case)."""
    entries = concept_dictionary.concepts.get(scheme, {}).values()
    return {str(entry[value][0]).lower() for entry in entries if value in entry}


def test_every_phantom_class_has_a_default_code() -> None:
    for classes in CLASS_NAMES.values():
        for label, name in classes.items():
            if label != 0:
                assert name in DEFAULT_CODES, name


def test_the_defaults_are_concepts_pydicom_knows() -> None:
    for code in [*DEFAULT_CODES.values(), GENERIC, ANATOMICAL_STRUCTURE, TISSUE]:
        assert code.meaning.lower() in _meanings(code.scheme, code.value), code
    assert DEFAULT_CODES["brain"].value == "12738006"
    assert DEFAULT_CODES["lv_cavity"].value == "87878005"
    assert DEFAULT_CODES["rv_cavity"].value == "53085002"
    assert DEFAULT_CODES["brain"].property_category == ANATOMICAL_STRUCTURE


def test_code_for_prefers_the_spec_then_the_class_name_then_generic() -> None:
    heart = Code(scheme="SCT", value="80891009", meaning="Heart")
    assert code_for("brain", {1: heart}, 1) == heart
    assert code_for("brain", {}, 1) == DEFAULT_CODES["brain"]
    assert code_for("lesion", {}, 1) == GENERIC
    assert GENERIC.property_category == TISSUE


def test_missing_code_names_the_class() -> None:
    classes = {0: "background", 1: "brain", 2: "lesion"}
    assert (
        missing_code(classes, {1: DEFAULT_CODES["brain"]}) == "class 'lesion' (label 2) has no code"
    )
    assert missing_code(classes, {1: GENERIC, 2: GENERIC}) is None


@pytest.mark.parametrize(
    "fields",
    [
        {"scheme": "SCT", "value": "1", "meaning": ""},
        {"scheme": "S\\CT", "value": "1", "meaning": "x"},
        {"scheme": "X" * 17, "value": "1", "meaning": "x"},
        {"scheme": "SCT", "value": "1", "meaning": "m" * 65},
        {"scheme": "SCT", "value": "1\n2", "meaning": "x"},
        {"scheme": "SCT", "value": "1", "meaning": "x", "colour": "red"},
        {"scheme": "SCT", "meaning": "x"},
    ],
)
def test_codes_that_dicom_cannot_carry_are_refused(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        Code.model_validate(fields)


def test_dataset_codes_given_or_by_default() -> None:
    tissue = {"scheme": "SCT", "value": "85756007", "meaning": "Tissue"}
    given = {
        "brain": {"scheme": "SCT", "value": "12738006", "meaning": "Brain", "category": tissue}
    }
    codes = codes_from_dataset({"codes": given}, BRAIN, "ds/dataset.json")
    assert codes[1].category == TISSUE and codes[1].value == "12738006"
    assert codes_from_dataset({}, BRAIN, "ds/dataset.json") == {1: DEFAULT_CODES["brain"]}
    assert codes_from_dataset({}, CLASS_NAMES["heart"], "x").keys() == {1, 2, 3}


def test_dataset_codes_refused_in_one_line_naming_the_class() -> None:
    lesion = {0: "background", 1: "lesion"}
    with pytest.raises(DatasetError) as missing:
        codes_from_dataset({}, lesion, "ds/dataset.json")
    message = str(missing.value)
    assert message.startswith("ds/dataset.json: class 'lesion' has no code: add \"codes\": ")
    assert '{"lesion": {"scheme": "SCT"' in message and "\n" not in message
    with pytest.raises(DatasetError, match="the code of class 'brain' is invalid"):
        codes_from_dataset({"codes": {"brain": {"scheme": "SCT"}}}, BRAIN, "d")
    with pytest.raises(DatasetError, match="'codes' names 'background', which is not a fore"):
        codes_from_dataset({"codes": {"background": {}}}, BRAIN, "d")
    with pytest.raises(DatasetError, match="'codes' must map class names"):
        codes_from_dataset({"codes": ["brain"]}, BRAIN, "d")
