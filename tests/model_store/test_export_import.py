"""Base-model export to one tar file and import as a new, verified version."""

from __future__ import annotations

import gzip
import io
import lzma
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from model_store import ModelStore
from model_store.files import sha256_bytes
from model_store.spec import ModelSpec
from sitefit.exceptions import InvalidInputError, ModelStoreError

SpecFactory = Callable[..., ModelSpec]
TensorFactory = Callable[[int], dict[str, np.ndarray]]


@pytest.fixture
def source(tmp_path: Path, make_spec: SpecFactory, make_tensors: TensorFactory) -> ModelStore:
    store = ModelStore(tmp_path / "source")
    store.models.register(make_spec("brain"), make_tensors(1))
    store.models.register(make_spec("brain"), make_tensors(2))
    return store


def test_round_trip_into_another_store(tmp_path: Path, source: ModelStore) -> None:
    exported = source.export("brain@1", tmp_path / "brain.tar")
    with tarfile.open(tmp_path / "brain.tar") as archive:
        assert archive.getnames() == ["spec.json", "weights.safetensors"]
    target = ModelStore(tmp_path / "target")
    imported = target.import_(tmp_path / "brain.tar")
    assert (imported.name, imported.version, imported.sha256) == ("brain", 1, exported.sha256)
    assert target.models.payload(imported) == source.models.payload(exported)
    again = target.import_(tmp_path / "brain.tar")
    assert again.version == 2 and again.sha256 == exported.sha256


def test_import_accepts_a_directory(tmp_path: Path, source: ModelStore) -> None:
    spec = source.models.spec("brain")
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "spec.json").write_text(spec.model_dump_json())
    (directory / "weights.safetensors").write_bytes(source.models.payload(spec))
    assert source.import_(directory).version == 3


def test_export_refuses_to_overwrite(tmp_path: Path, source: ModelStore) -> None:
    path = tmp_path / "out.tar"
    path.write_bytes(b"keep me")
    with pytest.raises(InvalidInputError, match="exists"):
        source.export("brain", path)
    assert path.read_bytes() == b"keep me"
    assert source.export("brain", path, overwrite=True).version == 2


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_import_verifies_the_checksum(tmp_path: Path, source: ModelStore) -> None:
    spec = source.models.spec("brain")
    payload = bytearray(source.models.payload(spec))
    payload[-1] ^= 0xFF
    bad = _tar(
        tmp_path / "bad.tar",
        {"spec.json": spec.model_dump_json().encode(), "weights.safetensors": bytes(payload)},
    )
    with pytest.raises(ModelStoreError, match="checksum"):
        source.import_(bad)
    assert source.models.versions("brain") == [1, 2]


def test_import_refuses_weights_that_are_not_safetensors(
    tmp_path: Path, source: ModelStore
) -> None:
    """The checksum only says the bytes arrived whole; registered, they would become
    ``latest`` and fail every job on the model."""
    spec = source.models.spec("brain")
    junk = b"not safetensors at all"
    export = _tar(
        tmp_path / "junk-weights.tar",
        {
            "spec.json": spec.model_copy(update={"sha256": sha256_bytes(junk)})
            .model_dump_json()
            .encode(),
            "weights.safetensors": junk,
        },
    )
    with pytest.raises(InvalidInputError, match=r"weights\.safetensors is not a safetensors file"):
        source.import_(export)
    assert source.models.versions("brain") == [1, 2]


def test_import_runs_the_check_before_registering(tmp_path: Path, source: ModelStore) -> None:
    source.export("brain@1", tmp_path / "brain.tar")
    seen: list[tuple[str, list[str]]] = []

    def refuse(spec: ModelSpec, tensors: dict[str, np.ndarray]) -> None:
        seen.append((spec.name, sorted(tensors)))
        raise InvalidInputError("weights do not fit the architecture")

    with pytest.raises(InvalidInputError, match="do not fit"):
        source.import_(tmp_path / "brain.tar", check=refuse)
    assert seen and seen[0][0] == "brain" and seen[0][1]
    assert source.models.versions("brain") == [1, 2]
    assert source.import_(tmp_path / "brain.tar", check=lambda spec, tensors: None).version == 3


def test_import_refuses_malformed_exports(tmp_path: Path, source: ModelStore) -> None:
    spec = source.models.spec("brain")
    payload = source.models.payload(spec)
    traversal = _tar(
        tmp_path / "t.tar",
        {"../spec.json": spec.model_dump_json().encode(), "weights.safetensors": payload},
    )
    with pytest.raises(InvalidInputError, match=r"no spec\.json"):
        source.import_(traversal)
    assert not (tmp_path / "spec.json").exists()
    bad_spec = _tar(tmp_path / "s.tar", {"spec.json": b"{}", "weights.safetensors": payload})
    with pytest.raises(InvalidInputError, match="not a valid model spec"):
        source.import_(bad_spec)
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all")
    with pytest.raises(InvalidInputError, match="not a model export"):
        source.import_(tmp_path / "junk.tar")
    with pytest.raises(InvalidInputError, match="no such file"):
        source.import_(tmp_path / "absent.tar")


def test_export_of_a_corrupt_model_fails(tmp_path: Path, source: ModelStore) -> None:
    weights = tmp_path / "source" / "models" / "brain" / "2" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(ModelStoreError, match="checksum"):
        source.export("brain", tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def test_export_refuses_targets_that_are_not_regular_files(
    tmp_path: Path, source: ModelStore
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    link = tmp_path / "link.tar"
    link.symlink_to(tmp_path / "elsewhere.tar")
    for target in (folder, link):
        with pytest.raises(InvalidInputError, match="not a regular file"):
            source.export("brain", target, overwrite=True)
    assert folder.is_dir() and link.is_symlink() and not (tmp_path / "elsewhere.tar").exists()


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress])
def test_import_refuses_a_truncated_compressed_export(
    tmp_path: Path, source: ModelStore, compress: Callable[[bytes], bytes]
) -> None:
    source.export("brain", tmp_path / "brain.tar")
    packed = compress((tmp_path / "brain.tar").read_bytes())
    (tmp_path / "cut.tar.z").write_bytes(packed[: len(packed) * 2 // 3])
    with pytest.raises(InvalidInputError, match="not a model export"):
        source.import_(tmp_path / "cut.tar.z")
