"""The model store: base models and per-site adapted weights under ``$SITEFIT_HOME``.

``ModelStore(home)`` puts base models under ``home/models`` and site deltas under
``home/sites`` (see :mod:`model_store.base_models` and :mod:`model_store.sites` for the
layouts); both sit on a :class:`~model_store.backend.StorageBackend`.

Export format (``export``/``import_``): one POSIX tar file (written uncompressed; a gzip'd
one imports too) holding exactly two regular files at its top level: ``spec.json`` (the
ModelSpec, with the weights' sha256) and ``weights.safetensors`` (byte for byte as stored).
Import reads the two members into memory (nothing is extracted to disk, so member names
cannot escape), verifies the checksum, parses the weights (and, given a ``check``, tries them
on the spec's architecture) and only then registers the model as the next version of its
name, which ``latest`` resolves to at once; a directory holding the same two files is
accepted too.
"""

from __future__ import annotations

import io
import lzma
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from model_store.backend import FilesystemBackend, StorageBackend
from model_store.base_models import (
    SPEC_FILE,
    WEIGHTS_FILE,
    BaseModelRegistry,
    Tensors,
    parse_weights,
)
from model_store.files import sha256_bytes, write_bytes_atomic
from model_store.sites import SiteStore, SiteVersion
from model_store.spec import ModelSpec
from sitefit.exceptions import InvalidInputError, ModelStoreError

if TYPE_CHECKING:
    from sitefit.settings import Settings

__all__ = ["ModelStore", "SiteStore", "SiteVersion", "StorageBackend"]

MAX_IMPORT_BYTES = 4 * 1024**3
WeightsCheck = Callable[[ModelSpec, Tensors], None]
"""Raises :class:`InvalidInputError` when the tensors do not make the spec's network."""


class ModelStore:
    """Facade over the base-model registry (``.models``) and the site store (``.sites``)."""

    def __init__(
        self,
        home: Path | None = None,
        *,
        models: StorageBackend | None = None,
        sites: StorageBackend | None = None,
    ) -> None:
        self.models = BaseModelRegistry(_backend(models, home, "models"))
        self.sites = SiteStore(_backend(sites, home, "sites"))

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelStore:
        """The store of ``settings.models_dir`` and ``settings.sites_dir``."""
        return cls(
            models=FilesystemBackend(settings.models_dir),
            sites=FilesystemBackend(settings.sites_dir),
        )

    def export(self, ref: str, path: Path, *, overwrite: bool = False) -> ModelSpec:
        """Write base model ``NAME[@VERSION]`` to the tar file ``path``; returns its spec."""
        spec = self.models.spec(ref)
        payload = self.models.payload(spec)  # verified against its checksum
        path = Path(path)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            # replacing it would swap a device, a directory or a link for a plain file
            raise InvalidInputError(f"{path} exists and is not a regular file: choose a file path")
        if path.exists() and not overwrite:
            raise InvalidInputError(f"{path} exists: choose another path")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
            mtime = int(spec.created.timestamp())
            for name, data in (
                (SPEC_FILE, spec.model_dump_json(indent=2).encode()),
                (WEIGHTS_FILE, payload),
            ):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), mtime, 0o644
                archive.addfile(info, io.BytesIO(data))
        try:
            write_bytes_atomic(path, buffer.getvalue())
        except OSError as error:
            raise InvalidInputError(f"{path}: cannot write ({error.strerror})") from None
        return spec

    def import_(self, path: Path, *, check: WeightsCheck | None = None) -> ModelSpec:
        """Register the model in an export (tar file or directory) as a new version.

        The store does not build networks (the server imports it without torch): pass the
        worker's ``check`` to refuse weights that do not fit the spec's architecture before
        they become ``latest``."""
        spec_bytes, payload = _read_export(Path(path))
        try:
            spec = ModelSpec.model_validate_json(spec_bytes)
        except ValidationError as error:
            raise InvalidInputError(
                f"{path}: {SPEC_FILE} is not a valid model spec ({error.error_count()} error(s))"
            ) from None
        if sha256_bytes(payload) != spec.sha256:
            raise ModelStoreError(f"{path}: weights fail the checksum in {SPEC_FILE} (corrupt)")
        try:
            tensors = parse_weights(payload)
        except ValueError as error:
            raise InvalidInputError(f"{path}: {WEIGHTS_FILE} is {error}") from None
        if check is not None:
            check(spec, tensors)
        return self.models.register_payload(spec, payload)


def _backend(given: StorageBackend | None, home: Path | None, name: str) -> StorageBackend:
    if given is not None:
        return given
    if home is None:
        raise ValueError("ModelStore needs a home directory or both backends")
    return FilesystemBackend(Path(home) / name)


def _read_export(path: Path) -> tuple[bytes, bytes]:
    """The (spec.json, weights.safetensors) bytes of an export file or directory."""
    if path.is_dir():
        try:
            return (path / SPEC_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes()
        except OSError as error:
            raise InvalidInputError(f"{path}: not a model export ({error.strerror})") from None
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file or directory")
    try:
        with tarfile.open(path, mode="r:*") as archive:
            return _member(archive, path, SPEC_FILE), _member(archive, path, WEIGHTS_FILE)
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as error:
        # a truncated or corrupt compressed export fails in the decompressor, not in tarfile
        kind = error if str(error) else type(error).__name__
        raise InvalidInputError(f"{path}: not a model export tar file ({kind})") from None


def _member(archive: tarfile.TarFile, path: Path, name: str) -> bytes:
    try:
        info = archive.getmember(name)
    except KeyError:
        raise InvalidInputError(f"{path}: the export has no {name}") from None
    if not info.isreg() or info.size > MAX_IMPORT_BYTES:
        raise InvalidInputError(f"{path}: {name} is not a regular file of sane size")
    handle = archive.extractfile(info)
    if handle is None:
        raise InvalidInputError(f"{path}: {name} cannot be read")
    with handle:
        return handle.read()
