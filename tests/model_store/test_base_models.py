"""BaseModelRegistry on the storage backend: versions, resolution, verified reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from model_store.backend import FilesystemBackend, with_checksum
from model_store.base_models import BaseModelRegistry
from model_store.spec import ModelSpec
from sitefit.codes import Code
from sitefit.exceptions import InvalidInputError, ModelNotFoundError, ModelStoreError

SpecFactory = Callable[..., ModelSpec]
TensorFactory = Callable[[int], dict[str, np.ndarray]]


def test_register_versions_and_resolve(
    tmp_path: Path, make_spec: SpecFactory, make_tensors: TensorFactory
) -> None:
    registry = BaseModelRegistry(tmp_path)
    first = registry.register(make_spec("brain"), make_tensors(1))
    second = registry.register(make_spec("brain"), make_tensors(2))
    registry.register(make_spec("heart", num_outputs=4), make_tensors(3))
    assert (first.version, second.version) == (1, 2)
    assert registry.names() == ["brain", "heart"]
    assert registry.versions("brain") == [1, 2]
    assert registry.spec("brain") == second
    assert registry.spec("brain@latest") == second
    assert registry.spec("brain@1") == first
    loaded = registry.tensors(registry.spec("brain@1"))
    for key, value in make_tensors(1).items():
        assert np.array_equal(loaded[key], value) and loaded[key].dtype == value.dtype
    assert (tmp_path / "brain" / "2" / "weights.safetensors").is_file()


def test_registry_accepts_a_backend(
    tmp_path: Path, make_spec: SpecFactory, make_tensors: TensorFactory
) -> None:
    registry = BaseModelRegistry(FilesystemBackend(tmp_path / "models"))
    spec = registry.register(make_spec(), make_tensors(0))
    assert BaseModelRegistry(tmp_path / "models").spec("brain") == spec


def test_unknown_models_and_bad_refs(
    tmp_path: Path, make_spec: SpecFactory, make_tensors: TensorFactory
) -> None:
    registry = BaseModelRegistry(tmp_path)
    with pytest.raises(ModelNotFoundError, match="none registered"):
        registry.spec("brain")
    registry.register(make_spec(), make_tensors(0))
    with pytest.raises(ModelNotFoundError, match="no version 7"):
        registry.spec("brain@7")
    for bad in ("../brain", "brain@0", "brain@x", "", "brain@²", "brain@01", "brain@١"):
        with pytest.raises(InvalidInputError):
            registry.spec(bad)
    assert registry.versions("../brain") == []


def test_corrupt_weights_are_detected(
    tmp_path: Path, make_spec: SpecFactory, make_tensors: TensorFactory
) -> None:
    registry = BaseModelRegistry(tmp_path)
    spec = registry.register(make_spec(), make_tensors(0))
    path = tmp_path / "brain" / "1" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelStoreError, match="checksum"):
        registry.tensors(spec)
    path.unlink()
    with pytest.raises(ModelStoreError, match="missing"):
        registry.tensors(spec)


def test_corrupt_spec_is_a_store_error(
    tmp_path: Path, make_spec: SpecFactory, make_tensors: TensorFactory
) -> None:
    registry = BaseModelRegistry(tmp_path)
    registry.register(make_spec(), make_tensors(0))
    (tmp_path / "brain" / "1" / "spec.json").write_text("{not json")
    with pytest.raises(ModelStoreError, match="unreadable spec"):
        registry.spec("brain")


def test_version_folders_are_plain_ascii_numbers(
    tmp_path: Path, make_spec: SpecFactory, make_tensors: TensorFactory
) -> None:
    registry = BaseModelRegistry(tmp_path)
    registry.register(make_spec(), make_tensors(0))
    for stray in ("²", "١٠", "01", "x"):  # isdigit() holds for the first two
        (tmp_path / "brain" / stray).mkdir()
    assert registry.versions("brain") == [1]
    assert registry.register(make_spec(), make_tensors(1)).version == 2


def test_a_lagging_listing_cannot_make_registration_spin(
    tmp_path: Path, make_spec: SpecFactory, make_tensors: TensorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    registry = BaseModelRegistry(tmp_path)
    registry.register(make_spec(), make_tensors(0))
    registry.register(make_spec(), make_tensors(1))
    monkeypatch.setattr(registry, "versions", lambda name: [])  # e.g. NFS attribute caching
    publishes: list[str] = []
    publish = registry.backend.create_exclusive

    def counted(prefix: str, files: dict[str, bytes], **kw: bool) -> bool:
        publishes.append(prefix)
        return publish(prefix, files, **kw)

    monkeypatch.setattr(registry.backend, "create_exclusive", counted)
    assert registry.register(make_spec(), make_tensors(2)).version == 3
    assert publishes == ["brain/1", "brain/2", "brain/3"]  # each loss moves past itself


def test_a_changed_spec_fails_its_checksum(
    tmp_path: Path, make_spec: SpecFactory, make_tensors: TensorFactory
) -> None:
    registry = BaseModelRegistry(tmp_path)
    registry.register(make_spec(), make_tensors(0))
    spec_file = tmp_path / "brain" / "1" / "spec.json"
    text = spec_file.read_text()
    assert '"slice_axis": 2' in text
    spec_file.write_text(text.replace('"slice_axis": 2', '"slice_axis": 1'))
    with pytest.raises(ModelStoreError, match="fails its checksum"):
        registry.spec("brain")


def test_class_codes_are_stored_and_specs_without_them_still_load(
    tmp_path: Path, make_spec: SpecFactory, make_tensors: TensorFactory
) -> None:
    registry = BaseModelRegistry(tmp_path)
    brain = Code(scheme="SCT", value="12738006", meaning="Brain")
    stored = registry.register(
        make_spec().model_copy(update={"codes": {1: brain}}), make_tensors(0)
    )
    assert registry.spec("brain@1").codes == {1: brain} == stored.codes
    # a spec written before codes existed: no "codes" key at all
    old = make_spec("old")
    files = {
        "weights.safetensors": b"",
        "spec.json": old.model_dump_json(exclude={"codes"}).encode(),
    }
    assert b'"codes"' not in files["spec.json"]
    FilesystemBackend(tmp_path).create_exclusive("old/1", with_checksum(files, "spec.json"))
    loaded = registry.spec("old")
    assert loaded.codes == {}
    with pytest.raises(
        InvalidInputError, match=r"model old: class 'brain' \(label 1\) has no code"
    ):
        loaded.require_codes()


def test_codes_must_name_foreground_classes(make_spec: SpecFactory) -> None:
    brain = Code(scheme="SCT", value="12738006", meaning="Brain")
    for label in (0, 2):
        with pytest.raises(ValidationError, match=f"label {label}, which is not a foreground"):
            ModelSpec.model_validate({**make_spec().model_dump(), "codes": {label: brain}})
